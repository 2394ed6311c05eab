"""Property tests of the prefix cache and forks: random operation sequences
(admit with shared prefixes, grow, register, finish, abort, preempt with swap
or recompute, swap in, fork, migrate, defragment, steps; eviction happens
whenever an allocation needs it) against the brute-force model."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from prefix_cache_model import (SlotShadow, check_all_released, check_shared_invariants,
                                chain_hashes, stream_for)
from distkv_jax.block_manager import SHARED
from distkv_jax.kv_cache_manager import RUNNING, SWAPPED, KVCacheManager
from distkv_jax.kv_types import KVCacheConfig

OPS = ("admit", "admit", "grow", "grow", "grow", "register", "finish", "preempt", "swap_in",
       "fork", "migrate", "defragment", "step", "step")
LENGTH = 40


def make_docs(seed: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, LENGTH).tolist() for _ in range(3)]


class Model:
    """Drives a KVCacheManager as the scheduler does and checks it after every op."""

    def __init__(self, cfg: KVCacheConfig, docs) -> None:
        self.mgr = KVCacheManager(cfg)
        self.shadow = SlotShadow(self.mgr)
        self.docs = docs
        self.streams: dict[int, list[int]] = {}
        self.prompt: dict[int, int] = {}
        self.shared: set[int] = set()
        self.next_id = 0
        self.hits = 0

    # -- helpers ----------------------------------------------------------
    def _new(self, stream, instance) -> int:
        rid = self.next_id
        self.next_id += 1
        self.streams[rid] = stream
        self.mgr.admit(rid, instance=instance)
        return rid

    def _reuse(self, rid) -> None:
        m = self.mgr
        got = m.reuse_prefix(rid, self.streams[rid][:self.prompt[rid]])
        assert got % m.config.block_size == 0 and got <= max(0, self.prompt[rid] - 1)
        if m.config.enable_prefix_caching is False:
            assert got == 0
        ids = m.block_ids(rid).tolist()
        assert len(ids) * m.config.block_size == got
        self.shared.update(ids)
        self.hits += got

    def _refresh_shared(self) -> None:
        m = self.mgr
        self.shared = {g for g in self.shared if m.gm.manager_of(g).refs[g - m.gm.manager_of(g).base] > 0}

    def _room(self, rid) -> int:
        return len(self.streams[rid]) - self.mgr.num_tokens(rid)

    # -- ops ----------------------------------------------------------------
    def admit(self, a: int, b: int) -> None:
        cfg = self.mgr.config
        doc, shared = a % len(self.docs), (a * 5 + b) % (LENGTH + 1)
        rid = self._new(stream_for(self.next_id, doc, shared, self.docs, LENGTH),
                        None if a % 3 == 0 else a % cfg.num_instances)
        self.prompt[rid] = 1 + (a * 3 + b * 11) % LENGTH
        self._reuse(rid)

    def grow(self, rid, n: int) -> None:
        m = self.mgr
        if m.state(rid) != RUNNING:
            return
        if m.num_tokens(rid) == 0:
            self._reuse(rid)  # preempted for recompute: start on the cache, as the scheduler
        n = min(n, self._room(rid))
        res = m.grow(rid, n)
        self.shadow.copy(res.moves)  # reclaim moves run first
        for p in res.preemptions:
            self.shadow.copy(p.swap_out)
        if res.status == "ok":
            self.shadow.write(rid, self.streams[rid], res.start, n)

    def fork(self, parent, a: int) -> None:
        m = self.mgr
        if m.state(parent) != RUNNING or m.num_tokens(parent) == 0:
            return
        k = 1 + a % m.num_tokens(parent)
        cfg = m.config
        inst = m.home(parent) if cfg.kv_policy == "local" or a % 2 else a % cfg.num_instances
        stream = self.streams[parent][:k] + stream_for(self.next_id, 0, 0, self.docs, LENGTH)
        child = self._new(stream[:LENGTH + k], inst)
        self.prompt[child] = k + 1
        before = m.snapshot()
        if m.fork(child, parent, k):
            ids = m.block_ids(child).tolist()
            self.shared.update(ids[:k // cfg.block_size])
            assert m.num_tokens(child) == k
        else:
            after = m.snapshot()
            assert after == before  # nothing changed
            self._reuse(child)
        plan = m.prepare_step([])  # the fork's copy runs with the next step's KV plan
        self.shadow.step(plan, self.streams)

    def step(self, a: int, b: int) -> None:
        m = self.mgr
        live = m.requests()
        demands = []
        for i, rid in enumerate(live):
            if (a >> (i % 6)) & 1 or b > 5:
                if m.state(rid) == RUNNING and m.num_tokens(rid) == 0:
                    self._reuse(rid)
                demands.append((rid, min((a + i) % 3, self._room(rid))))
        plan = m.prepare_step(demands)
        self.shadow.step(plan, self.streams)
        for rid, start, n in plan.scheduled:
            assert m.state(rid) == RUNNING and m.num_tokens(rid) == start + n
            m.register(rid, self.streams[rid])

    def run(self, op_list) -> None:
        m = self.mgr
        for op, a, b in op_list:
            live = m.requests()
            pick = live[a % len(live)] if live else None
            if op == "admit":
                self.admit(a, b)
            elif pick is None:
                continue
            elif op == "grow":
                self.grow(pick, b)
            elif op == "register":
                m.register(pick, self.streams[pick])
            elif op == "finish":
                m.finish(pick)
            elif op == "preempt":
                if m.state(pick) == RUNNING:
                    self.shadow.copy(m.preempt(pick).swap_out)
            elif op == "swap_in":
                if m.state(pick) == SWAPPED:
                    plan = m.swap_in(pick)
                    if plan is not None:
                        self.shadow.copy(plan)
            elif op == "fork":
                self.fork(pick, a * 7 + b)
            elif op in ("migrate", "defragment"):
                before = m.ledger().sum()
                shared_now = {bm.base + p for bm in m.gm.managers
                              for p in np.flatnonzero(bm.holder == SHARED).tolist()}
                plan = m.migrate(max_blocks=b) if op == "migrate" else m.defragment(max_blocks=b)
                for s, _ in plan.pairs:  # shared blocks never move
                    assert s not in shared_now
                self.shadow.copy(plan)
                assert m.ledger().sum() == before - len(plan)
            elif op == "step":
                self.step(a, b)
            self._refresh_shared()
            check_shared_invariants(m, self.shared)
            self.shadow.check(self.streams)
        for rid in m.requests():
            m.finish(rid)
            self._refresh_shared()
            check_shared_invariants(m, self.shared)
        check_all_released(m)
        self.shadow.check(self.streams)  # cached blocks still hold their prefixes


configs = st.builds(
    KVCacheConfig,
    num_instances=st.integers(1, 6),
    blocks_per_instance=st.integers(2, 10),
    block_size=st.sampled_from([1, 2, 4]),
    host_blocks_per_instance=st.integers(0, 6),
    kv_policy=st.sampled_from(["distributed", "local"]),
    lend_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    migrate_tokens_per_step=st.sampled_from([0, 1, 4, 16]),
    home_reserve_blocks=st.integers(0, 1),
    enable_prefix_caching=st.sampled_from([True, True, False]),
)


def seeded_ops(seed: int, n: int):
    rng = np.random.default_rng(seed)
    return [(OPS[int(rng.integers(len(OPS)))], int(rng.integers(0, 64)), int(rng.integers(0, 10)))
            for _ in range(n)]


@settings(max_examples=250, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, seed=st.integers(0, 2**31 - 1), vocab=st.sampled_from([2, 50]))
def test_shared_blocks_random_sequences(cfg, seed, vocab):
    Model(cfg, make_docs(seed, vocab)).run(seeded_ops(seed, 80))


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(n_inst=st.integers(2, 6), blocks=st.integers(2, 6), host=st.integers(0, 3),
       seed=st.integers(0, 2**31 - 1))
def test_shared_blocks_tight_pools(n_inst, blocks, host, seed):
    """Full pools: every allocation evicts, borrowing, cycles, preemption."""
    cfg = KVCacheConfig(n_inst, blocks, block_size=2, host_blocks_per_instance=host,
                        lend_fraction=1.0, migrate_tokens_per_step=4, enable_prefix_caching=True)
    Model(cfg, make_docs(seed, 3)).run(seeded_ops(seed, 120))


def test_hit_reads_blocks_in_place_across_instances():
    """A prefix computed on instance 0 serves a request homed on 1, in place,
    charged to no one; when every reader is gone it stays cached, evictable."""
    cfg = KVCacheConfig(2, 4, block_size=4, enable_prefix_caching=True)
    m = KVCacheManager(cfg)
    doc = list(range(100, 114))                     # 14 tokens: 3 full blocks + 2
    m.admit("a", 0)
    assert m.reuse_prefix("a", doc) == 0
    m.grow("a", 14)
    assert m.register("a", doc) == 3
    a_blocks = m.block_ids("a").tolist()
    m.admit("b", 1)
    assert m.reuse_prefix("b", doc[:13] + [7, 8]) == 12   # 3 blocks; the rest computed
    assert m.block_ids("b").tolist() == a_blocks[:3]
    assert not m.ledger().any()                      # shared: nobody's debt
    assert m.prefix_hits_remote[1] == 12 and m.prefix_hits_local[1] == 0
    m.finish("a")
    # b still reads the three shared blocks; a's partial block is free
    assert m.gm.managers[0].num_evictable == 0 and m.gm.managers[0].num_unused == 1
    m.finish("b")
    assert m.num_cached_blocks().tolist() == [3, 0]
    assert m.free_device_blocks().tolist() == [4, 4]
    # the whole prompt cached: the last token is still computed
    m.admit("c", 1)
    assert m.reuse_prefix("c", doc[:12]) == 8
    assert chain_hashes(doc, 4)[:2] == [m.gm.managers[0].hash_of_block(g)
                                        for g in m.block_ids("c").tolist()]


def test_eviction_is_lru_tail_first():
    cfg = KVCacheConfig(1, 4, block_size=2, enable_prefix_caching=True)
    m = KVCacheManager(cfg)
    toks = list(range(8))
    m.admit("a", 0)
    m.grow("a", 8)
    m.register("a", toks)
    blocks = m.block_ids("a").tolist()
    m.finish("a")
    m.admit("b", 0)
    m.grow("b", 2)                    # evicts one block: a's tail
    assert m.block_ids("b").tolist() == [blocks[-1]]
    m.finish("b")
    m.admit("c", 0)
    assert m.reuse_prefix("c", toks) == 6  # the first three blocks survived


@pytest.mark.parametrize("policy", ["distributed", "local"])
def test_fork_shares_full_blocks_and_copies_partial(policy):
    cfg = KVCacheConfig(2, 6, block_size=4, kv_policy=policy, enable_prefix_caching=False)
    m = KVCacheManager(cfg)
    m.admit("p", 0)
    m.grow("p", 10)
    m.admit("c", 0)
    assert m.fork("c", "p", 9)
    pb, cb = m.block_ids("p").tolist(), m.block_ids("c").tolist()
    assert cb[:2] == pb[:2] and cb[2] != pb[2]
    plan = m.prepare_step([])
    assert plan.forks.pairs == ((pb[2], cb[2]),)
    m.admit("d", 1)
    assert m.fork("d", "p", 9) is (policy == "distributed")


def test_a_prefix_being_computed_is_awaited_not_computed_twice():
    cfg = KVCacheConfig(2, 8, block_size=4, enable_prefix_caching=True)
    m = KVCacheManager(cfg)
    doc = list(range(50, 70))                       # 5 full blocks
    m.admit("a", 0)
    assert m.reuse_prefix("a", doc) == 0            # a computes the document: promised
    question = doc[:12] + [1, 2, 3]
    chain: list = []
    assert m.awaits_prefix(question, chain)         # its first uncached block is a's
    assert not m.awaits_prefix([9, 9, 9, 9, 9], [])  # nothing of it is being computed
    m.grow("a", 8)
    m.register("a", doc)                            # two blocks done; the third still promised
    assert m.awaits_prefix(question, chain)
    m.grow("a", 12)
    m.register("a", doc)
    assert not m.awaits_prefix(question, chain)     # all cached: admit it now
    m.admit("b", 1, chain)
    assert m.reuse_prefix("b", question) == 12
    # a preempted (or finished) request's promises are withdrawn
    m.admit("c", 1)
    m.reuse_prefix("c", [7] * 9)
    assert m.awaits_prefix([7] * 6, [])
    m.preempt("c")
    assert not m.awaits_prefix([7] * 6, [])
    local = KVCacheManager(KVCacheConfig(2, 8, block_size=4, kv_policy="local",
                                         enable_prefix_caching=True))
    local.admit("a", 0)
    local.reuse_prefix("a", doc)
    assert not local.awaits_prefix(question, [])     # local: it may land elsewhere anyway


def test_reset_prefix_cache_drops_unread_blocks_only():
    m = KVCacheManager(KVCacheConfig(1, 6, block_size=2, enable_prefix_caching=True))
    for rid in ("a", "b"):
        m.admit(rid, 0)
        m.grow(rid, 4)
        m.register(rid, [1, 2, 3, 4] if rid == "a" else [5, 6, 7, 8])
    m.finish("a")
    assert m.num_cached_blocks().tolist() == [2]
    assert m.reset_prefix_cache() is False          # b's blocks are read: kept
    assert m.num_cached_blocks().tolist() == [0] and m.free_device_blocks().tolist() == [4]
    m.finish("b")
    assert m.reset_prefix_cache() is True
    assert m.gm.managers[0].num_unused == 6
