"""Unit tests of the KV control plane: capacities, borrowing, defrag, host tier,
fairness, determinism and the no-JAX rule."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from control_plane_model import Shadow, check_all_free, check_invariants
from distkv_jax.defrag import shortest_cycle
from distkv_jax.kv_cache_manager import RUNNING, SWAPPED, KVCacheManager
from distkv_jax.kv_types import KVCacheConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTROL_PLANE_MODULES = [
    "distkv_jax",
    "distkv_jax.kv_types",
    "distkv_jax.block_manager",
    "distkv_jax.global_manager",
    "distkv_jax.host_tier",
    "distkv_jax.block_table",
    "distkv_jax.defrag",
    "distkv_jax.kv_cache_manager",
    "distkv_jax.bench.control_plane",
]


def test_control_plane_imports_no_jax():
    code = (
        "import sys\n"
        f"for m in {CONTROL_PLANE_MODULES!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib')))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_config_validation_and_budget():
    cfg = KVCacheConfig(4, 10, block_size=16)
    assert cfg.migrate_blocks_per_step == 1  # 16 tokens of KV = 1 block of 16
    assert KVCacheConfig(4, 10, block_size=4).migrate_blocks_per_step == 4
    assert KVCacheConfig(4, 10, block_size=16, migrate_tokens_per_step=0).migrate_blocks_per_step == 0
    assert cfg.lend_cap == 10  # the default lends every free block (reclaimable)
    assert cfg.max_request_blocks(0) == 40  # one request may hold the whole mesh
    assert KVCacheConfig(4, 10, lend_fraction=0.9).lend_cap == 9  # floor(0.9 * 10)
    assert KVCacheConfig(4, 10, kv_policy="local").lend_cap == 0
    with pytest.raises(ValueError):
        KVCacheConfig(4, 10, kv_policy="nope")
    with pytest.raises(ValueError):
        KVCacheConfig(0, 10)
    with pytest.raises(ValueError):
        KVCacheConfig(2, 10, lend_fraction=1.5)


# ---------------------------------------------------------------- capacities
@pytest.mark.parametrize(
    "policy,lend_fraction,capacity_blocks",
    [
        ("distributed", 1.0, 4 * 16),          # the whole distributed pool
        ("distributed", 0.9, 16 + 3 * 14),     # own 16 + floor(0.9*16)=14 from each of 3
        ("distributed", 0.5, 16 + 3 * 8),
        ("local", 1.0, 16),                    # confined to its instance
    ],
)
def test_single_request_capacity(policy, lend_fraction, capacity_blocks):
    cfg = KVCacheConfig(4, 16, block_size=4, kv_policy=policy, lend_fraction=lend_fraction)
    assert cfg.max_request_blocks(1) == capacity_blocks
    mgr = KVCacheManager(cfg)
    mgr.admit("r", instance=1)
    cap_tokens = capacity_blocks * 4
    assert mgr.max_request_tokens(1) == cap_tokens
    # grow in uneven chunks up to exactly the capacity
    grown = 0
    while grown < cap_tokens:
        n = min(7, cap_tokens - grown)
        res = mgr.grow("r", n)
        assert res.status == "ok", (grown, res)
        grown += n
        check_invariants(mgr)
    assert mgr.num_tokens("r") == cap_tokens
    assert len(mgr.block_ids("r")) == capacity_blocks
    # its own instance's blocks were used first
    assert (np.asarray(mgr.block_ids("r")[:16]) // 16 == 1).all()
    assert mgr.grow("r", 1).status == "too_long"
    assert mgr.num_tokens("r") == cap_tokens
    mgr.finish("r")
    check_all_free(mgr)


def test_creditor_choice_most_lendable_ties_by_id():
    cfg = KVCacheConfig(4, 4, block_size=1, lend_fraction=1.0)
    mgr = KVCacheManager(cfg)
    mgr.admit("x2", 2); mgr.grow("x2", 1)   # instance 2: 3 free
    mgr.admit("x3", 3); mgr.grow("x3", 1)   # instance 3: 3 free
    mgr.admit("a", 0)
    res = mgr.grow("a", 4 + 5)  # 4 local; then 4 from instance 1 (most free), then 1 from 2
    assert res.status == "ok"
    owners = (np.asarray(mgr.block_ids("a")) // 4).tolist()
    assert owners == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert mgr.ledger().tolist() == [[0, 4, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # slot mapping: global slot = block * block_size + offset
    assert res.slots.tolist() == mgr.block_ids("a").tolist()


def test_lending_cap_and_no_borrowing_on_behalf():
    cfg = KVCacheConfig(3, 4, block_size=1, lend_fraction=0.5)  # cap 2 per creditor
    mgr = KVCacheManager(cfg)
    mgr.admit("a", 0)
    assert mgr.grow("a", 8).status == "ok"  # 4 own + 2 + 2
    assert mgr.gm.managers[1].lent == 2 and mgr.gm.managers[2].lent == 2
    # instance 1 has 2 free blocks but lent its cap: it serves its own requests only
    assert mgr.gm.managers[1].allocate_remote(0, 1) is None
    mgr.admit("b", 1)
    assert mgr.grow("b", 2).status == "ok"
    assert (np.asarray(mgr.block_ids("b")) // 4 == 1).all()
    # instance 1 is full now; instance 2 has 2 free but lent 2 (its cap): b can't borrow
    assert mgr.gm.available_for(1) == 0
    check_invariants(mgr)


def test_competing_debtors_served_in_arrival_order():
    """Two instances run out in the same step; the older request gets the loan."""
    cfg = KVCacheConfig(3, 2, block_size=1, lend_fraction=1.0)
    for order in ([("late", 1), ("early", 0)], [("early", 0), ("late", 1)]):
        mgr = KVCacheManager(cfg)
        for name, inst in (("f0", 0), ("f1", 1), ("early", 0), ("late", 1)):
            mgr.admit(name, inst)
        mgr.grow("f0", 2); mgr.grow("f1", 2)
        # instance 2 has 2 free blocks; early and late each want 2
        plan = mgr.prepare_step([(name, 2) for name, _ in order])
        assert [s[0] for s in plan.scheduled] == ["early"]
        assert [p.request_id for p in plan.preempted] == ["late"]
        assert (np.asarray(mgr.block_ids("early")) // 2 == 2).all()


# ---------------------------------------------------------------- defrag
def _fill_then_borrow(mgr, steps):
    """Run (op, name, instance, tokens) steps with block_size 1."""
    for op, name, inst, n in steps:
        if op == "grow":
            if name not in mgr.requests():
                mgr.admit(name, inst)
            assert mgr.grow(name, n).status == "ok"
        else:
            mgr.finish(name)


def _remote_blocks(mgr):
    return int(mgr.ledger().sum())


def _cycle_exists(mgr):
    return shortest_cycle(mgr.ledger()) is not None


def test_defrag_removes_two_instance_cycle():
    cfg = KVCacheConfig(2, 2, block_size=1, lend_fraction=1.0, migrate_tokens_per_step=16)
    mgr = KVCacheManager(cfg)
    _fill_then_borrow(mgr, [
        ("grow", "f0", 0, 2), ("grow", "f1", 1, 2),   # both full
        ("finish", "f1", 1, 0),
        ("grow", "a", 0, 1),                          # a (home 0) borrows from 1
        ("grow", "g1", 1, 1),                         # instance 1 full again
        ("finish", "f0", 0, 0),
        ("grow", "b", 1, 1),                          # b (home 1) borrows from 0
        ("grow", "g0", 0, 1),                         # instance 0 full again
    ])
    assert mgr.ledger().tolist() == [[0, 1], [1, 0]]
    assert mgr.free_device_blocks().tolist() == [0, 0]
    shadow = Shadow(mgr)
    seq = {r: i for i, r in enumerate(mgr.requests())}
    for r in mgr.requests():
        shadow.new_blocks_from(r, seq[r], 0)
    before = _remote_blocks(mgr)
    plan = mgr.defragment()  # default budget: 1 block; a 2-cycle unit is atomic
    assert plan.kind == "move" and len(plan) == 2
    shadow.copy(plan)
    shadow.check(lambda r: seq[r])
    assert not _cycle_exists(mgr)
    assert _remote_blocks(mgr) == before - 2 == 0
    assert (np.asarray(mgr.block_ids("a")) // 2 == 0).all()
    assert (np.asarray(mgr.block_ids("b")) // 2 == 1).all()
    check_invariants(mgr)
    assert len(mgr.defragment()) == 0


def test_defrag_removes_three_instance_cycle():
    cfg = KVCacheConfig(3, 2, block_size=1, lend_fraction=1.0)
    mgr = KVCacheManager(cfg)
    _fill_then_borrow(mgr, [
        ("grow", "f0", 0, 2), ("grow", "f1", 1, 2), ("grow", "f2", 2, 2),
        ("finish", "f1", 1, 0), ("grow", "a", 0, 1), ("grow", "g1", 1, 1),  # 0 -> 1
        ("finish", "f2", 2, 0), ("grow", "b", 1, 1), ("grow", "g2", 2, 1),  # 1 -> 2
        ("finish", "f0", 0, 0), ("grow", "c", 2, 1), ("grow", "g0", 0, 1),  # 2 -> 0
    ])
    assert mgr.ledger().tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    assert mgr.free_device_blocks().tolist() == [0, 0, 0]
    assert shortest_cycle(mgr.ledger()) == [0, 1, 2]
    shadow = Shadow(mgr)
    seq = {r: i for i, r in enumerate(mgr.requests())}
    for r in mgr.requests():
        shadow.new_blocks_from(r, seq[r], 0)
    # migration cannot help (no free memory): only the rotation does
    assert len(mgr.migrate(max_blocks=8)) == 0
    plan = mgr.plan_migration()
    assert len(plan) == 3
    shadow.copy(plan)
    shadow.check(lambda r: seq[r])
    assert not _cycle_exists(mgr) and _remote_blocks(mgr) == 0
    for name, home in (("a", 0), ("b", 1), ("c", 2)):
        assert mgr.block_ids(name)[0] // 2 == home
    check_invariants(mgr)


def test_defrag_partial_cycle_respects_budget_and_never_adds_remote_blocks():
    cfg = KVCacheConfig(2, 6, block_size=1, lend_fraction=1.0, migrate_tokens_per_step=3)
    mgr = KVCacheManager(cfg)
    _fill_then_borrow(mgr, [
        ("grow", "f0", 0, 6), ("grow", "f1", 1, 6),
        ("finish", "f1", 1, 0), ("grow", "a", 0, 3), ("grow", "g1", 1, 3),
        ("finish", "f0", 0, 0), ("grow", "b", 1, 3), ("grow", "g0", 0, 3),
    ])
    assert mgr.ledger().tolist() == [[0, 3], [3, 0]]
    remote = [_remote_blocks(mgr)]
    sizes = []
    while True:
        plan = mgr.plan_migration()
        if not plan:
            break
        sizes.append(len(plan))
        remote.append(_remote_blocks(mgr))
        check_invariants(mgr)
    assert sizes == [2, 2, 2]  # 3-block budget: one atomic 2-cycle unit per step
    assert remote == [6, 4, 2, 0]


def test_return_home_migration_is_bounded_and_oldest_first():
    cfg = KVCacheConfig(2, 4, block_size=16, lend_fraction=1.0)  # budget: 1 block/step
    mgr = KVCacheManager(cfg)
    mgr.admit("filler", 0); mgr.grow("filler", 3 * 16)
    mgr.admit("long", 0); mgr.grow("long", 4 * 16)  # 1 local + 3 borrowed
    assert mgr.ledger().tolist() == [[0, 3], [0, 0]]
    mgr.finish("filler")
    steps = []
    while (plan := mgr.plan_migration()):
        assert len(plan) == 1
        steps.append(plan.pairs[0])
        check_invariants(mgr)
    assert len(steps) == 3 and mgr.ledger().sum() == 0
    assert all(src // 4 == 1 and dst // 4 == 0 for src, dst in steps)


# ---------------------------------------------------------------- host tier
def test_preempt_newest_swap_then_recompute_then_swap_in():
    cfg = KVCacheConfig(1, 4, block_size=2, host_blocks_per_instance=2)
    mgr = KVCacheManager(cfg)
    for r in ("old", "mid", "new"):
        mgr.admit(r, 0)
    assert mgr.grow("old", 4).status == "ok"   # 2 blocks
    assert mgr.grow("mid", 2).status == "ok"   # 1 block
    assert mgr.grow("new", 2).status == "ok"   # 1 block: device full
    res = mgr.grow("old", 2)  # needs 1 more block: newest request is swapped out
    assert res.status == "ok"
    assert [(p.request_id, p.mode) for p in res.preemptions] == [("new", "swap")]
    assert len(res.preemptions[0].swap_out) == 1
    assert mgr.state("new") == SWAPPED and mgr.num_tokens("new") == 2
    res = mgr.grow("old", 2)  # needs 1 more: "mid" goes to host (1 host block left)
    assert [(p.request_id, p.mode) for p in res.preemptions] == [("mid", "swap")]
    assert mgr.free_host_blocks().tolist() == [0]
    # host full: the next preemption recomputes (drops KV)
    mgr.admit("newest", 0)
    p = mgr.preempt("old")  # 4 blocks, host full
    assert p.mode == "recompute" and mgr.num_tokens("old") == 0 and mgr.state("old") == RUNNING
    plan = mgr.swap_in("mid")
    assert plan is not None and plan.kind == "swap_in" and len(plan) == 1
    assert mgr.state("mid") == RUNNING and mgr.num_tokens("mid") == 2
    check_invariants(mgr)
    for r in mgr.requests():
        mgr.finish(r)
    check_all_free(mgr)


def test_request_preempts_itself_when_it_is_newest():
    cfg = KVCacheConfig(1, 2, block_size=1, host_blocks_per_instance=4)
    mgr = KVCacheManager(cfg)
    mgr.admit("old", 0); mgr.grow("old", 2)
    mgr.admit("new", 0); mgr.grow("new", 0)
    res = mgr.grow("new", 1)
    assert res.status == "preempted"
    assert [p.request_id for p in res.preemptions] == ["new"]
    assert mgr.num_tokens("old") == 2


def test_prepare_step_swaps_back_when_room_returns():
    cfg = KVCacheConfig(2, 2, block_size=1, host_blocks_per_instance=2,
                        kv_policy="local")
    mgr = KVCacheManager(cfg)
    mgr.admit("a", 0); mgr.admit("b", 0)
    plan = mgr.prepare_step([("a", 1), ("b", 1)])
    assert [s[0] for s in plan.scheduled] == ["a", "b"]
    plan = mgr.prepare_step([("a", 1), ("b", 1)])  # a needs a 2nd block: b swapped
    assert [s[0] for s in plan.scheduled] == ["a"]
    assert [(p.request_id, p.mode) for p in plan.preempted] == [("b", "swap")]
    assert len(plan.swap_out) == 1
    plan = mgr.prepare_step([("a", 1), ("b", 1)])
    assert plan.deferred == ("b",)
    mgr.finish("a")
    plan = mgr.prepare_step([("b", 1)])
    assert plan.swapped_in == ("b",) and len(plan.swap_in) == 1
    assert plan.scheduled == (("b", 1, 1),)
    # under "local" nothing ever lives on instance 1
    assert (np.asarray(mgr.block_ids("b")) // 2 == 0).all()


def test_block_ids_and_slots():
    cfg = KVCacheConfig(2, 3, block_size=2, lend_fraction=1.0)
    mgr = KVCacheManager(cfg)
    mgr.admit("a", 0); mgr.admit("b", 1)
    mgr.grow("a", 9)  # 5 blocks: 0,1,2 on inst 0 then 3,4 on inst 1
    mgr.grow("b", 1)  # 1 block on inst 1 (5)
    assert mgr.block_ids("a").tolist() == [0, 1, 2, 3, 4]
    assert mgr.block_ids("b").tolist() == [5]
    assert mgr.slots("a", 7, 2).tolist() == [3 * 2 + 1, 4 * 2 + 0]


# ---------------------------------------------------------------- determinism
def scripted_trace(seed: int = 7) -> str:
    """A long scripted run with string ids (hash randomization would show)."""
    rng = np.random.default_rng(seed)
    cfg = KVCacheConfig(5, 6, block_size=2, host_blocks_per_instance=3,
                        lend_fraction=0.75, migrate_tokens_per_step=4)
    mgr = KVCacheManager(cfg)
    out = []
    names = [f"req-{i}-{'x' * (i % 5)}" for i in range(60)]
    k = 0
    for step in range(120):
        if k < len(names) and rng.random() < 0.5:
            mgr.admit(names[k], None if rng.random() < 0.5 else int(rng.integers(0, 5)))
            k += 1
        live = mgr.requests()
        if live and rng.random() < 0.15:
            mgr.finish(live[int(rng.integers(0, len(live)))])
            live = mgr.requests()
        demands = [(r, int(rng.integers(0, 4))) for r in live if rng.random() < 0.8]
        plan = mgr.prepare_step(demands)
        out.append([plan.moves.pairs, plan.swap_out.pairs, plan.swap_in.pairs,
                    [list(s) for s in plan.scheduled],
                    [mgr.slots(r, s, n).tolist() for r, s, n in plan.scheduled],
                    [(p.request_id, p.mode) for p in plan.preempted],
                    list(plan.swapped_in), list(plan.deferred), list(plan.too_long)])
        if step % 10 == 0:
            out.append(mgr.defragment(max_blocks=6).pairs)
        out.append(mgr.snapshot())
    return json.dumps(out, sort_keys=True, default=str)


def test_determinism_same_process():
    assert scripted_trace() == scripted_trace()


def test_determinism_across_hash_seeds():
    code = ("import sys, hashlib; sys.path.insert(0, 'tests')\n"
            "from test_control_plane import scripted_trace\n"
            "print(hashlib.sha256(scripted_trace().encode()).hexdigest())\n")
    digests = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        digests.append(out.stdout.strip())
    here = hashlib.sha256(scripted_trace().encode()).hexdigest()
    assert digests == [here, here]


def test_bench_control_plane_subcommand(tmp_path):
    out_json = tmp_path / "cp.json"
    out = subprocess.run(
        [sys.executable, "-m", "distkv_jax.bench", "control_plane", "--requests=16",
         "--total_tokens=4096", "--instances=4", "--steps=2", "--warmup=1",
         f"--output_json={out_json}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out_json.read_text())
    assert res["total_tokens"] == 4096 and res["requests"] == 16
    assert res["step_ms_median"] > 0 and res["preempted"] == 0
    # the engine's host path, timed per part; the parts add up to the step
    parts = ("schedule", "sampling", "meta", "advance")
    assert all(res[f"{p}_ms_{k}"] > 0 for p in parts for k in ("median", "mean", "p90"))
    assert res["step_ms_mean"] == pytest.approx(sum(res[f"{p}_ms_mean"] for p in parts))
    assert res["rows_per_instance"] == 8  # 16 decode rows over 4 instances, bucket >= 8
    assert res["cpu_model"] and "engine_decode_step_ms_median" not in res
    bad = subprocess.run([sys.executable, "-m", "distkv_jax.bench", "nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "control_plane" in bad.stderr


def test_scheduler_spreads_a_long_chunk_over_instances():
    """A long prefill chunk is split into consecutive pieces on instances with
    spare rows, so the step's rows per instance (T) stay near the average
    instead of every instance padding to the chunk's length."""
    from distkv_jax.request import Request
    from distkv_jax.sampling_params import SamplingParams
    from distkv_jax.scheduler import Scheduler, SchedulerConfig

    I, bs = 4, 4
    kv = KVCacheManager(KVCacheConfig(I, 64, block_size=bs))
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, min_rows=8), kv)
    long = Request("0", SamplingParams(), list(range(3, 3 + 100)), 100)
    shorts = [Request(str(k), SamplingParams(), [5, 6, 7], 3) for k in range(1, 4)]
    for r in [long] + shorts:
        sched.add(r)
    plan = sched.schedule()
    rows = plan.tokens.shape[1]
    assert rows == 32  # 64 + 3 * 3 = 73 rows over 4 instances -> bucket 32, not 64
    pieces = sorted((s.start, s.count, s.instance, s.row) for s in plan.seqs if s.request is long)
    assert len({p[2] for p in pieces}) > 1  # on more than one instance
    assert [p[0] for p in pieces] == [0] + list(np.cumsum([p[1] for p in pieces])[:-1])
    assert sum(p[1] for p in pieces) == 64  # the whole chunk, in order
    used = set()
    for s in plan.seqs:  # no row holds two tokens
        cells = {(s.instance, s.row + j) for j in range(s.count)}
        assert not cells & used and all(row < rows for _, row in cells)
        used |= cells
        np.testing.assert_array_equal(plan.tokens[s.instance, s.row:s.row + s.count],
                                      s.request.tokens[s.start:s.start + s.count])
        np.testing.assert_array_equal(plan.positions[s.instance, s.row:s.row + s.count],
                                      np.arange(s.start, s.start + s.count))
    sched.advance(plan)
    assert long.num_computed == 64


# ----------------------------------------------------------- reclaimable lending


def _step(mgr, shadow, seq, demands):
    plan = mgr.prepare_step(demands)
    shadow.step(plan, lambda r: seq[r])
    shadow.check(lambda r: seq[r])
    check_invariants(mgr)
    return plan


def test_reclaim_moves_the_borrowers_blocks_to_free_memory():
    """Instance 1 lent its blocks to A; when its own request B needs them and
    instance 2 has free ones, A's data moves there and B gets local blocks."""
    cfg = KVCacheConfig(3, 2, block_size=1, migrate_tokens_per_step=2)
    mgr = KVCacheManager(cfg)
    shadow, seq = Shadow(mgr), {"A": 0, "B": 1}
    mgr.admit("A", 0)
    _step(mgr, shadow, seq, [("A", 4)])          # 2 at home, 2 borrowed from instance 1
    assert mgr.ledger().tolist() == [[0, 2, 0], [0, 0, 0], [0, 0, 0]]
    mgr.admit("B", 1)
    plan = _step(mgr, shadow, seq, [("B", 2)])
    assert sorted(s // 2 for s, _ in plan.moves.pairs) == [1, 1]   # from instance 1 ...
    assert sorted(d // 2 for _, d in plan.moves.pairs) == [2, 2]   # ... to instance 2
    assert (np.asarray(mgr.block_ids("B")) // 2 == 1).all()         # B is local
    assert mgr.ledger().tolist() == [[0, 0, 2], [0, 0, 0], [0, 0, 0]]
    assert mgr.reclaimed_moved.tolist() == [0, 2, 0] and not plan.preempted


def test_reclaim_moves_are_bounded_per_step():
    cfg = KVCacheConfig(3, 4, block_size=1, migrate_tokens_per_step=1)
    mgr = KVCacheManager(cfg)
    shadow, seq = Shadow(mgr), {"A": 0, "B": 1}
    mgr.admit("A", 0)
    _step(mgr, shadow, seq, [("A", 8)])          # 4 borrowed from instance 1
    mgr.admit("B", 1)
    plan = _step(mgr, shadow, seq, [("B", 3)])
    assert len(plan.moves) == 1                   # one move; the rest borrowed elsewhere
    assert mgr.reclaimed_moved[1] == 1 and ("B", 0, 3) in plan.scheduled


def test_reclaim_preempts_an_older_borrower_when_memory_is_exhausted():
    """Nowhere to move A's blocks: A (older) is swapped out so that the
    creditor's own request runs; A comes back once there is room."""
    cfg = KVCacheConfig(2, 2, block_size=1, host_blocks_per_instance=4, migrate_tokens_per_step=2)
    mgr = KVCacheManager(cfg)
    shadow, seq = Shadow(mgr), {"A": 0, "B": 1}
    mgr.admit("A", 0)
    _step(mgr, shadow, seq, [("A", 4)])          # the whole mesh: 2 borrowed from instance 1
    mgr.admit("B", 1)
    plan = _step(mgr, shadow, seq, [("A", 0), ("B", 1)])
    assert [(p.request_id, p.mode) for p in plan.preempted] == [("A", "swap")]
    assert [s[0] for s in plan.scheduled] == ["B"]
    assert mgr.state("A") == SWAPPED and mgr.reclaimed_preempted.tolist() == [0, 2]
    assert (np.asarray(mgr.block_ids("B")) // 2 == 1).all()
    mgr.finish("B")
    plan = _step(mgr, shadow, seq, [("A", 0)])
    assert plan.swapped_in == ("A",) and mgr.num_tokens("A") == 4
    mgr.finish("A")
    check_all_free(mgr)


def test_reclaim_undoes_a_growth_planned_earlier_in_the_step():
    """A grew this step (older: planned first), then B's growth reclaims A:
    A's new block is let go of, A is swapped with the tokens it had, and it
    is not scheduled."""
    cfg = KVCacheConfig(2, 2, block_size=1, host_blocks_per_instance=4, migrate_tokens_per_step=0)
    mgr = KVCacheManager(cfg)
    shadow, seq = Shadow(mgr), {"A": 0, "B": 1}
    mgr.admit("A", 0)
    _step(mgr, shadow, seq, [("A", 3)])
    mgr.admit("B", 1)
    plan = _step(mgr, shadow, seq, [("A", 1), ("B", 2)])
    assert [s[0] for s in plan.scheduled] == ["B"] and plan.preempted[0].request_id == "A"
    assert mgr.num_tokens("A") == 3 and len(mgr.host_block_ids("A")) == 3
    assert len(plan.swap_out) == 3


def test_local_policy_never_reclaims():
    cfg = KVCacheConfig(2, 2, block_size=1, kv_policy="local", host_blocks_per_instance=4)
    mgr = KVCacheManager(cfg)
    mgr.admit("A", 0)
    assert mgr.grow("A", 2).status == "ok"
    mgr.admit("B", 1)
    assert mgr.grow("B", 2).status == "ok"
    assert not mgr.reclaimed_moved.any() and not mgr.reclaimed_preempted.any()


def test_a_reclaimed_borrower_does_not_preempt_the_reclaimers_requests():
    """A (older) lost its blocks to instance 1's reclaim and is recomputed;
    its growth then waits instead of preempting B, instance 1's request."""
    cfg = KVCacheConfig(2, 2, block_size=1, migrate_tokens_per_step=0)
    mgr = KVCacheManager(cfg)
    mgr.admit("A", 0)
    assert mgr.grow("A", 4).status == "ok"
    mgr.admit("B", 1)
    res = mgr.grow("B", 2)
    assert res.status == "ok" and [p.request_id for p in res.preemptions] == ["A"]
    assert res.preemptions[0].mode == "recompute" and mgr.reclaimed_preempted[1] == 4 - 2
    res = mgr.grow("A", 4)        # A again: the mesh is full, B is newer but B's home reclaimed
    assert res.status == "preempted" and [p.request_id for p in res.preemptions] == ["A"]
    assert mgr.state("B") == RUNNING and mgr.num_tokens("B") == 2
    mgr.finish("B")
    assert mgr.grow("A", 4).status == "ok"


# ------------------------------------------------------------ host-attended KV
def _host_cfg(**kw):
    base = dict(num_instances=1, blocks_per_instance=4, block_size=2, host_blocks_per_instance=8,
                host_attention=True, migrate_tokens_per_step=4)
    base.update(kw)
    return KVCacheConfig(**base)


def test_one_request_grows_past_the_devices_onto_the_host():
    """A request holds every device block and the host's: its oldest full
    blocks are offloaded (device -> host copies), the block being written
    stays on device, and the data follows the table (shadow)."""
    cfg = _host_cfg()
    mgr = KVCacheManager(cfg)
    shadow = Shadow(mgr)
    mgr.admit("a")
    assert mgr.max_request_tokens() == (4 + 8) * 2
    for _ in range(23):
        res = mgr.grow("a", 1)
        assert res.status == "ok" and not res.preemptions
        shadow.grow(res, 0)
        check_invariants(mgr)
        shadow.check(lambda r: 0)
    ids = mgr.block_ids("a").tolist()
    D = cfg.num_device_blocks
    assert ids[-1] < D and sum(g >= D for g in ids) == 8  # the host is full, the last block local
    assert [g >= D for g in ids] == sorted([g >= D for g in ids], reverse=True)  # oldest on host
    assert int(mgr.offloaded.sum()) == 8 and mgr.host_attended_blocks().tolist() == [8]
    assert mgr.grow("a", 2).status == "too_long"  # past device + host
    mgr.finish("a")
    check_all_free(mgr)


def test_offload_before_preempting_and_bring_back_when_memory_frees():
    cfg = _host_cfg(num_instances=2, blocks_per_instance=3, host_blocks_per_instance=4)
    mgr = KVCacheManager(cfg)
    shadow = Shadow(mgr)
    mgr.admit("old", 0)
    mgr.admit("new", 1)
    step = lambda d: (shadow.step(p := mgr.prepare_step(d), {"old": 0, "new": 1}.get), p)[1]  # noqa: E731
    step([("old", 8)])            # 4 blocks: 3 own + 1 borrowed
    # new needs 3 blocks, the mesh is full: the block old borrowed from new's
    # home goes to the host tier (reclaim to the host), not preemption
    step([("new", 6)])
    assert mgr.state("old") == RUNNING and mgr.state("new") == RUNNING
    assert int(mgr.offloaded.sum()) == 1 and mgr.block_ids("old")[3] >= cfg.num_device_blocks
    assert mgr.reclaimed_offloaded.tolist() == [0, 1]
    p = step([("old", 2), ("new", 1)])
    assert not p.preempted       # the host tier made room: nobody preempted
    check_invariants(mgr)
    shadow.check({"old": 0, "new": 1}.get)
    mgr.finish("new")
    back = 0
    for _ in range(4):           # memory freed: host blocks come back, within the budget
        p = step([("old", 0)])
        assert len(p.swap_in) <= cfg.migrate_blocks_per_step
        back += len(p.swap_in)
        check_invariants(mgr)
        shadow.check({"old": 0}.get)
    assert back > 0 and int(mgr.brought_back.sum()) == back
    mgr.finish("old")
    check_all_free(mgr)


def test_swapped_request_with_host_blocks_comes_back_partly_host_attended():
    cfg = _host_cfg(blocks_per_instance=4, host_blocks_per_instance=10)
    mgr = KVCacheManager(cfg)
    shadow = Shadow(mgr)
    mgr.admit("a")
    for _ in range(7):           # 14 tokens: 7 blocks, 3+ of them on the host
        shadow.grow(mgr.grow("a", 2), 0)
    p = mgr.preempt("a")
    assert p.mode == "swap" and len(p.swap_out) == 4   # its device blocks only
    shadow.copy(p.swap_out)
    assert len(mgr.host_block_ids("a")) == 7
    assert mgr.can_swap_in("a", 1)
    plan = mgr.swap_in("a", 1)   # 4 device blocks minus headroom: the oldest stay on the host
    shadow.copy(plan)
    check_invariants(mgr)
    shadow.check(lambda r: 0)
    ids = mgr.block_ids("a")
    assert (ids >= cfg.num_device_blocks).sum() >= 3 and ids[-1] < cfg.num_device_blocks
    mgr.finish("a")
    check_all_free(mgr)
