"""Long and short requests together (distkv_jax/policy.py), on the real
scheduler and KV manager with the model replaced by a token stub (no JAX):
rows per step by class, prefill limits, overtaking a long request that waits
for KV, the aging bound on that wait, the reserve a long request's growth
leaves, and that the decisions repeat exactly.
"""

import dataclasses

import numpy as np
import pytest

from distkv_jax.kv_cache_manager import KVCacheManager
from distkv_jax.kv_types import KVCacheConfig
from distkv_jax.policy import LONG, SHORT, PolicyConfig, SchedulingPolicy
from distkv_jax.request import Request, RequestStatus
from distkv_jax.sampling_params import SamplingParams
from distkv_jax.scheduler import Scheduler, SchedulerConfig


def _req(rid: str, prompt: int, out: int = 4) -> Request:
    h = sum(map(ord, rid)) * 31
    toks = [3 + (h + 17 * k) % 400 for k in range(prompt)]
    return Request(rid, SamplingParams(max_tokens=out, ignore_eos=True), toks, prompt)


class Driver:
    """Steps the scheduler as the engine does (no overlap): plan, advance,
    append a stub token to every sampled row, finish requests at their
    limit. Records each step's (request id, start, count) and admissions."""

    def __init__(self, instances=2, blocks=16, block_size=4, rows=16, seqs=8,
                 host_blocks=0, kv_policy="distributed", **policy):
        self.kv = KVCacheManager(KVCacheConfig(instances, blocks, block_size=block_size,
                                               host_blocks_per_instance=host_blocks,
                                               kv_policy=kv_policy))
        pc = PolicyConfig.resolve(max_num_batched_tokens=rows, block_size=block_size,
                                  blocks_per_instance=blocks, max_num_seqs=seqs, **policy)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=rows,
                                               min_rows=4, policy=pc), self.kv)
        self.steps: list[tuple] = []
        self.admitted: dict[str, int] = {}    # request -> step of its first rows
        self.started: dict[str, int] = {}     # request -> step it left the waiting queue
        self.finished: dict[str, int] = {}
        self.preempted: list[str] = []
        self.free_after: list[np.ndarray] = []

    def add(self, *reqs):
        for r in reqs:
            self.sched.add(r)

    def step(self):
        waiting = [r for r in self.sched.requests.values() if r.status == RequestStatus.WAITING]
        plan = self.sched.schedule()
        k = len(self.steps)
        for r in waiting:
            if r.status != RequestStatus.WAITING:
                self.started.setdefault(r.request_id, k)
        if plan is None:
            self.steps.append(())
            return None
        self.preempted += [p.request_id for p in plan.kv.preempted]
        self.sched.advance(plan)
        for row in plan.logits_rows:
            if row is not None and row.target < 0 and not row.request.is_finished:
                r = row.request
                self.sched.append_token(r, 7)
                if r.reached_limit(len(r.tokens)):
                    self.sched.finish(r, RequestStatus.FINISHED_LENGTH)
                    self.finished[r.request_id] = k
        for s in plan.seqs:
            self.admitted.setdefault(s.request.request_id, k)
        self.steps.append(tuple(sorted((s.request.request_id, s.start, s.count)
                                       for s in plan.seqs)))
        self.free_after.append(self.kv.free_device_blocks().copy())
        return plan

    def run(self, max_steps=400):
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError(f"not done after {max_steps} steps")

    def rows(self, k: int, rid: str) -> int:
        return sum(n for r, _, n in self.steps[k] if r == rid)


def test_policy_config_defaults_and_validation():
    pc = PolicyConfig.resolve(max_num_batched_tokens=256, block_size=16, blocks_per_instance=64)
    assert pc.long_prefill_token_threshold == 256 and pc.long_prefill_min_tokens == 64
    assert pc.short_reserve_blocks == 16 and pc.max_long_partial_prefills == 1
    pc = PolicyConfig.resolve(max_num_batched_tokens=256, block_size=16, blocks_per_instance=20)
    assert pc.short_reserve_blocks == 5  # at most a quarter of an instance
    pol = SchedulingPolicy(pc, 2)
    assert pol.arrival_class(256) == SHORT and pol.arrival_class(257) == LONG
    with pytest.raises(ValueError, match="max_long_partial_prefills"):
        PolicyConfig(max_num_partial_prefills=1, max_long_partial_prefills=2)
    with pytest.raises(ValueError, match="admission_aging_steps"):
        PolicyConfig(admission_aging_steps=0)


def test_engine_args_name_and_check_the_policy_knobs():
    from distkv_jax.engine_args import EngineArgs

    for name, bad in (("max_long_partial_prefills", 0), ("admission_aging_steps", 0),
                      ("short_reserve_blocks", -2), ("long_prefill_token_threshold", -1)):
        with pytest.raises(ValueError, match=name):
            EngineArgs(**{name: bad})
    with pytest.raises(ValueError, match="max_long_partial_prefills"):
        EngineArgs(max_num_partial_prefills=2, max_long_partial_prefills=3)
    pc = EngineArgs(max_num_batched_tokens=64, block_size=8).policy_config(32)
    assert (pc.long_prefill_token_threshold, pc.long_prefill_min_tokens,
            pc.short_reserve_blocks) == (64, 16, 8)


def test_decodes_then_short_prefills_then_the_long_one_with_its_floor():
    d = Driver(instances=2, blocks=64, rows=16, long_prefill_min_tokens=4)
    long = _req("L", 200)
    d.add(long)
    d.step()                               # alone: it takes every row it can (16)
    assert d.rows(0, "L") == 16
    shorts = [_req(f"s{k}", 10) for k in range(4)]
    d.add(*shorts)
    d.step()
    # 32 rows: the long one's floor (4) is kept, the shorts take 28 (10 + 10 + 8),
    # the long one then gets the floor plus nothing left
    assert d.rows(1, "L") == 4
    assert [d.rows(1, f"s{k}") for k in range(4)] == [10, 10, 8, 0]
    d.step()
    # decodes of s0, s1 (1 row each), s2's last 2, s3's 10, then L: 32 - 14 = 18, cut to 16
    assert [d.rows(2, f"s{k}") for k in range(4)] == [1, 1, 2, 10]
    assert d.rows(2, "L") == 16
    d.run()
    assert set(d.finished) == {"L", "s0", "s1", "s2", "s3"}


def test_at_most_max_long_partial_prefills_long_ones_prefill_and_shorts_pass_the_rest():
    d = Driver(instances=2, blocks=64, rows=16)
    a, b = _req("A", 120), _req("B", 120)
    s = [_req(f"s{k}", 6) for k in range(3)]
    d.add(a, b, *s)
    d.step()
    assert d.rows(0, "A") > 0 and d.rows(0, "B") == 0
    assert all(d.rows(0, f"s{k}") == 6 for k in range(3))   # passed B
    assert d.sched.get("B").status == RequestStatus.WAITING
    d.run()
    # B starts once A's remaining prefill is short (or A is done)
    assert d.admitted["B"] > d.admitted["A"]
    assert all(d.admitted[f"s{k}"] == 0 for k in range(3))


def test_short_requests_pass_a_long_one_waiting_for_kv_and_aging_bounds_its_wait():
    """16 blocks of 4 per instance, reserve 4 per instance (8 in all): a long
    request needs 8 free blocks beyond the reserve to be admitted; a stream
    of shorts keeps fewer free than that, so they pass it until it has been
    passed over admission_aging_steps times; from then on no short behind it
    starts before it does."""
    aging = 6
    d = Driver(instances=2, blocks=16, block_size=4, rows=8, seqs=16,
               admission_aging_steps=aging, short_reserve_blocks=4)
    blockers = [_req(f"b{k}", 40, out=30) for k in range(2)]   # 10 + 8 blocks each, long-lived
    d.add(*blockers)
    for _ in range(12):
        d.step()
    long = _req("L", 12 * 4, out=2)
    d.add(long)
    arrivals = {}
    for k in range(40):
        r = _req(f"s{k}", 4, out=2)
        d.add(r)
        arrivals[r.request_id] = len(d.steps)
        d.step()
        if "L" in d.started:
            break
    assert "L" in d.started, "the long request was never admitted"
    passed_by = [rid for rid, k in d.started.items() if rid.startswith("s") and k < d.started["L"]]
    assert passed_by, "no short request passed the long one"
    # it was passed in `aging` steps at most: after that, nobody who came
    # later started before it
    first_pass = min(d.started[rid] for rid in passed_by)
    assert len({d.started[rid] for rid in passed_by}) <= aging
    assert max(d.started[rid] for rid in passed_by) < first_pass + aging
    assert long.passed_steps == 0
    d.run()
    assert "L" in d.finished and all(f"s{k}" in d.finished for k in range(len(arrivals)))


def test_a_long_prefill_leaves_the_reserve_and_preempts_no_short_request():
    """While shorts run, the long prefill's growth keeps the reserve free
    and never preempts anyone; once stalled for admission_aging_steps it
    may take the reserve (so it always finishes)."""
    reserve = 3
    d = Driver(instances=2, blocks=16, block_size=4, rows=16, seqs=16,
               short_reserve_blocks=reserve, admission_aging_steps=50)
    long = _req("L", 100, out=2)    # 25 blocks of the mesh's 32
    d.add(long)
    d.step()
    for k in range(6):
        d.add(_req(f"s{k}", 8, out=6))
    grew = []
    for _ in range(60):
        before = d.kv.num_tokens("L") if d.sched.get("L") and \
            d.sched.get("L").status == RequestStatus.RUNNING else None
        if not d.sched.has_unfinished():
            break
        d.step()
        r = d.sched.get("L")
        if before is not None and r is not None and r.status == RequestStatus.RUNNING and \
                d.kv.num_tokens("L") > before and len(d.sched.requests) > 1:
            grew.append(int(d.free_after[-1].sum()))
    d.run()
    assert grew and min(grew) >= 1   # the long one grew beside others, leaving blocks free
    assert d.preempted == [], d.preempted
    assert "L" in d.finished and all(f"s{k}" in d.finished for k in range(6))


def test_reserve_waived_after_stalling_so_the_long_one_finishes():
    """A reserve that leaves the long request no room at all: it stalls,
    then, after admission_aging_steps steps, ignores the reserve and
    completes."""
    d = Driver(instances=1, blocks=16, block_size=4, rows=8, seqs=4,
               short_reserve_blocks=4, admission_aging_steps=5)
    long, short = _req("L", 52, out=2), _req("s", 4, out=40)   # 13 + 11 blocks > 16
    d.add(long, short)
    d.run()
    assert set(d.finished) == {"L", "s"}
    assert d.sched.long_prefill_steps > 0


def _trace(seed: int):
    rng = np.random.default_rng(seed)
    d = Driver(instances=3, blocks=24, block_size=4, rows=16, seqs=6, host_blocks=8,
               admission_aging_steps=8)
    pending = [_req(f"r{k}", int(n), out=int(o)) for k, (n, o) in
               enumerate(zip(rng.choice([5, 9, 30, 90, 140], 30), rng.integers(1, 12, 30)))]
    while pending or d.sched.has_unfinished():
        for _ in range(int(rng.integers(0, 3))):
            if pending:
                d.add(pending.pop(0))
        d.step()
        assert len(d.steps) < 2000
    return d


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_streams_finish_every_request_and_repeat_exactly(seed):
    a, b = _trace(seed), _trace(seed)
    assert a.steps == b.steps and a.admitted == b.admitted
    assert len(a.finished) == 30
    assert a.sched.long_prefill_steps > 0
    # the KV manager got every block back
    assert (a.kv.free_device_blocks() == 24).all()


def test_the_long_prefill_furthest_along_runs_first_so_two_long_ones_do_not_livelock():
    """An older long request preempted back to its start, which may not take
    blocks from the newer long one (the newer one's home reclaimed from it
    before), must not hold the long-prefill slot: it would preempt itself
    every step while the newer one never ran (seen in bench serving)."""
    d = Driver(instances=2, blocks=64, block_size=16, rows=256, seqs=16)
    a, b = _req("A", 1827, out=16), _req("B", 1574, out=16)
    d.add(a, b)
    a.instance = d.kv.admit("A", 1)
    b.instance = d.kv.admit("B", 0)
    a.status = b.status = RequestStatus.RUNNING
    d.kv.grow("B", 512)
    b.num_computed = 512
    d.kv._reqs["A"].reclaimed_by.add(0)
    d.run(200)
    assert d.finished["B"] < d.finished["A"]
    assert d.preempted == []
