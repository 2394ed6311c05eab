"""Property tests: random operation sequences against a brute-force model."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from control_plane_model import Shadow, check_all_free, check_invariants
from distkv_jax.kv_cache_manager import RUNNING, SWAPPED, KVCacheManager
from distkv_jax.kv_types import KVCacheConfig

OPS = ("admit", "grow", "grow", "grow", "finish", "preempt", "swap_in",
       "migrate", "defragment", "step")

configs = st.builds(
    KVCacheConfig,
    num_instances=st.integers(1, 8),
    blocks_per_instance=st.integers(1, 6),
    block_size=st.sampled_from([1, 2, 4]),
    host_blocks_per_instance=st.integers(0, 4),
    kv_policy=st.sampled_from(["distributed", "local"]),
    lend_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    migrate_tokens_per_step=st.sampled_from([0, 1, 4, 16]),
    home_reserve_blocks=st.integers(0, 1),
    host_attention=st.booleans(),
)
ops = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, 63), st.integers(0, 9)),
    min_size=1, max_size=40,
)


def run_ops(cfg: KVCacheConfig, op_list, shadow_check: bool = True):
    mgr = KVCacheManager(cfg)
    shadow = Shadow(mgr)
    next_id = 0
    for op, a, b in op_list:
        live = mgr.requests()
        pick = live[a % len(live)] if live else None
        if op == "admit":
            mgr.admit(next_id, instance=None if a % 3 == 0 else a % cfg.num_instances)
            next_id += 1
        elif pick is None:
            continue
        elif op == "grow":
            if mgr.state(pick) == RUNNING:
                res = mgr.grow(pick, b)
                shadow.grow(res, pick)
                if res.status == "ok":
                    assert len(res.slots) == b
                    assert mgr.num_tokens(pick) == res.start + b
        elif op == "finish":
            mgr.finish(pick)
        elif op == "preempt":
            if mgr.state(pick) == RUNNING:
                p = mgr.preempt(pick)
                shadow.copy(p.swap_out)
                if p.mode == "recompute":
                    assert mgr.num_tokens(pick) == 0
        elif op == "swap_in":
            if mgr.state(pick) == SWAPPED:
                plan = mgr.swap_in(pick, b % 3)
                if plan is not None:
                    shadow.copy(plan)
        elif op == "migrate":
            before = mgr.ledger().sum()
            plan = mgr.migrate(max_blocks=b)
            shadow.copy(plan)
            assert len(plan) <= b and mgr.ledger().sum() == before - len(plan)
        elif op == "defragment":
            before = mgr.ledger().sum()
            plan = mgr.defragment(max_blocks=b)
            shadow.copy(plan)
            assert mgr.ledger().sum() == before - len(plan)
        elif op == "step":
            demands = [(r, (a + i) % 3) for i, r in enumerate(live) if (a >> (i % 6)) & 1 or b > 5]
            before = mgr.ledger().sum()
            plan = mgr.prepare_step(demands)
            shadow.step(plan, lambda r: r)
            assert len(plan.moves) <= max(cfg.migrate_blocks_per_step, 
                                          cfg.num_instances if cfg.migrate_blocks_per_step else 0)
            for rid, start, n in plan.scheduled:
                assert mgr.state(rid) == RUNNING and mgr.num_tokens(rid) == start + n
            del before
        check_invariants(mgr)
        if shadow_check:
            shadow.check(lambda r: r)
    for rid in mgr.requests():
        mgr.finish(rid)
        check_invariants(mgr)
    check_all_free(mgr)
    return mgr


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, op_list=ops)
def test_random_operation_sequences(cfg, op_list):
    run_ops(cfg, op_list)


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    n_inst=st.integers(2, 8),
    op_list=st.lists(st.tuples(st.sampled_from(("admit", "grow", "grow", "finish", "step",
                                                "defragment", "migrate")),
                               st.integers(0, 63), st.integers(0, 9)),
                     min_size=10, max_size=60),
)
def test_tight_distributed_pools(n_inst, op_list):
    """Small full pools with free lending: lots of borrowing, cycles, preemption."""
    cfg = KVCacheConfig(n_inst, 3, block_size=1, host_blocks_per_instance=1,
                        lend_fraction=1.0, migrate_tokens_per_step=2)
    run_ops(cfg, op_list)


def random_ops(seed: int, n: int, max_grow: int = 10):
    """A long op sequence from a seeded generator (denser than hypothesis')."""
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = np.array([3, 6, 0, 0, 1.5, 1, 1, 0.7, 0.7, 2], dtype=float)
    weights /= weights.sum()
    out = []
    for _ in range(n):
        op = OPS[int(rng.choice(len(OPS), p=weights))]
        out.append((op, int(rng.integers(0, 64)), int(rng.integers(0, max_grow))))
    return out


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, seed=st.integers(0, 2**31 - 1))
def test_long_seeded_sequences(cfg, seed):
    run_ops(cfg, random_ops(seed, 150))


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(n_inst=st.integers(2, 8), blocks=st.integers(2, 5), host=st.integers(0, 2),
       budget=st.sampled_from([1, 2, 3, 8]), host_attention=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_tight_seeded_sequences(n_inst, blocks, host, budget, host_attention, seed):
    """Full pools and small grows: borrowing, debt cycles, migration, swaps,
    offload to host-attended blocks and bringing them back."""
    cfg = KVCacheConfig(n_inst, blocks, block_size=1, host_blocks_per_instance=host,
                        lend_fraction=1.0, migrate_tokens_per_step=budget,
                        host_attention=host_attention)
    run_ops(cfg, random_ops(seed, 200, max_grow=3))


def test_tight_sequences_exercise_reclaim():
    """The random sequences above do reach both kinds of reclaim (moves and
    borrower preemption), so the invariants were checked through them."""
    moved = preempted = 0
    for seed in range(30):
        for host in (0, 2):
            cfg = KVCacheConfig(4, 3, block_size=1, host_blocks_per_instance=host,
                                lend_fraction=1.0, migrate_tokens_per_step=2)
            mgr = run_ops(cfg, random_ops(seed, 200, max_grow=3))
            moved += int(mgr.reclaimed_moved.sum())
            preempted += int(mgr.reclaimed_preempted.sum())
    assert moved > 0 and preempted > 0, (moved, preempted)


def test_sequences_exercise_host_attention():
    """With host attention on, the random sequences offload blocks, bring
    them back, and swap requests that hold host-attended blocks."""
    offloaded = back = 0
    for seed in range(30):
        for bs in (1, 2):
            cfg = KVCacheConfig(4, 3, block_size=bs, host_blocks_per_instance=3,
                                lend_fraction=1.0, migrate_tokens_per_step=2,
                                host_attention=True)
            mgr = run_ops(cfg, random_ops(seed, 200, max_grow=3))
            offloaded += int(mgr.offloaded.sum())
            back += int(mgr.brought_back.sum())
    assert offloaded > 0 and back > 0, (offloaded, back)
