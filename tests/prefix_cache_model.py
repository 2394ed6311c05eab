"""Brute-force model of the KV control plane with shared blocks (no JAX).

Requests are token streams drawn from a few shared "documents", so prefixes
collide. ``SlotShadow`` replays every write and copy slot by slot: a device
(or host) slot holds the token prefix whose KV it contains (the stream up to
and including that position), so

- a running request's slot of position p must hold its stream[:p + 1];
- a block registered under a prefix hash must hold exactly the prefix whose
  chained hash that is (recomputed here from the slots, independently);
- no write may land in a block that another request reads.

``check_shared_invariants`` recomputes reference counts, states and the
ledger from the block tables and compares.
"""
from __future__ import annotations

import hashlib

import numpy as np

from distkv_jax.block_manager import CACHED, FREE, SHARED
from distkv_jax.kv_cache_manager import RUNNING, SWAPPED, KVCacheManager
from distkv_jax.kv_types import CopyPlan, StepKVPlan


def stream_for(rid: int, doc: int, shared: int, docs: list[list[int]], length: int) -> list[int]:
    """The first ``shared`` tokens of document ``doc``, then tokens of rid's own."""
    own = [1000 + (rid * 7919 + k * 104729) % 9973 for k in range(length)]
    return (docs[doc][:shared] + own)[:length]


def chain_hashes(tokens, block_size: int, salt: str = "") -> list[bytes]:
    """Independent re-implementation of the documented hash chain."""
    parent = hashlib.blake2b(b"distkv-prefix:" + salt.encode(), digest_size=16).digest()
    out = []
    for j in range(len(tokens) // block_size):
        block = np.asarray(tokens[j * block_size:(j + 1) * block_size], dtype=np.int64)
        parent = hashlib.blake2b(parent + block.tobytes(), digest_size=16).digest()
        out.append(parent)
    return out


class SlotShadow:
    def __init__(self, mgr: KVCacheManager) -> None:
        cfg = mgr.config
        self.mgr, self.bs = mgr, cfg.block_size
        self.dev = [None] * (cfg.num_device_blocks * cfg.block_size)
        self.host = [None] * (max(cfg.num_host_blocks, 1) * cfg.block_size)

    def copy(self, plan: CopyPlan) -> None:
        if not plan:
            return
        src_arr = self.host if plan.kind == "swap_in" else self.dev
        dst_arr = self.host if plan.kind == "swap_out" else self.dev
        bs = self.bs
        vals = [src_arr[s * bs:(s + 1) * bs] for s in plan.src.tolist()]  # gather all first
        assert len(set(plan.dst.tolist())) == len(plan), "duplicate destinations"
        for d, v in zip(plan.dst.tolist(), vals):
            dst_arr[d * bs:(d + 1) * bs] = v

    def write(self, rid, stream, start: int, n: int) -> None:
        """The step writes positions start..start+n-1 of rid's stream."""
        if n <= 0:
            return
        m = self.mgr
        slots = m.slots(rid, start, n).tolist()
        for k, slot in enumerate(slots):
            g = slot // self.bs
            bm = m.gm.manager_of(g)
            p = g - bm.base
            assert bm.holder[p] >= 0 and bm.refs[p] == 1, \
                f"{rid!r} writes into block {g} that others read (holder {bm.holder[p]})"
            self.dev[slot] = tuple(stream[:start + k + 1])

    def step(self, plan: StepKVPlan, streams) -> None:
        self.copy(plan.forks)
        self.copy(plan.moves)
        self.copy(plan.swap_out)
        self.copy(plan.swap_in)
        for rid, start, n in plan.scheduled:
            self.write(rid, streams[rid], start, n)

    def check(self, streams) -> None:
        m, bs = self.mgr, self.bs
        for rid in m.requests():
            n = m.num_tokens(rid)
            s = streams[rid]
            if m.state(rid) == RUNNING:
                ids = m.block_ids(rid).tolist()
                got = [self.dev[ids[p // bs] * bs + p % bs] for p in range(n)]
            else:
                hb = list(m.host_block_ids(rid))
                got = [self.host[hb[p // bs] * bs + p % bs] for p in range(n)]
            want = [tuple(s[:p + 1]) for p in range(n)]
            assert got == want, (rid, m.state(rid), got, want)
        # every registered block holds the prefix its hash names
        for bm in m.gm.managers:
            for h, p in bm.cached.items():
                g = bm.base + p
                content = self.dev[g * bs:(g + 1) * bs]
                assert all(c is not None for c in content), (g, content)
                toks = content[-1]
                assert len(toks) % bs == 0
                for i, c in enumerate(content):
                    assert c == toks[:len(toks) - bs + i + 1], (g, i)
                assert chain_hashes(toks, bs, m.config.cache_salt)[-1] == h, f"block {g}: wrong hash"


def check_shared_invariants(mgr: KVCacheManager, shared_blocks: set) -> None:
    """Recompute reference counts, block states and the ledger.

    ``shared_blocks``: the model's set of blocks taken through a cache hit or
    a fork (read by several requests, they must be SHARED). Only those may be
    SHARED; any other block read once is private to its reader."""
    cfg = mgr.config
    I, B = cfg.num_instances, cfg.blocks_per_instance
    refs = np.zeros(cfg.num_device_blocks, np.int64)
    reader_home = {}
    host_holder = np.full(cfg.num_host_blocks, -1, dtype=np.int64)
    for k, rid in enumerate(mgr.requests()):
        home, n_tok = mgr.home(rid), mgr.num_tokens(rid)
        if mgr.state(rid) == RUNNING:
            ids = mgr.block_ids(rid).tolist()
            assert len(ids) == -(-n_tok // cfg.block_size), (rid, len(ids), n_tok)
            assert len(set(ids)) == len(ids), f"{rid!r} holds a block twice"
            assert not mgr.host_block_ids(rid)
            for g in ids:
                if g >= cfg.num_device_blocks:  # host-attended: held by this request alone
                    h = g - cfg.num_device_blocks
                    assert host_holder[h] == -1, f"host block {h} owned twice"
                    host_holder[h] = k
                    continue
                refs[g] += 1
                reader_home[g] = home
                if cfg.kv_policy == "local":
                    assert g // B == home
        else:
            assert mgr.state(rid) == SWAPPED and len(mgr.block_ids(rid)) == 0
            hb = mgr.host_block_ids(rid)
            assert len(hb) == -(-n_tok // cfg.block_size)
            for h in hb:
                assert host_holder[h] == -1, f"host block {h} owned twice"
                host_holder[h] = k
    ledger = np.zeros((I, I), np.int64)
    for c, bm in enumerate(mgr.gm.managers):
        free = set(bm.free_blocks().tolist())
        evictable = bm.evictable_blocks()
        assert len(set(evictable)) == len(evictable)
        assert not free & set(evictable)
        for p in range(B):
            g = bm.base + p
            h = int(bm.holder[p])
            assert bm.refs[p] == refs[g], (g, bm.refs[p], refs[g])
            if refs[g] == 0:
                if p in bm.hash_of:
                    assert h == CACHED and g in evictable, (g, h)
                else:
                    assert h == FREE and g in free, (g, h)
                assert g not in shared_blocks
            else:
                assert g not in free and g not in evictable
                if refs[g] > 1:
                    assert h == SHARED, (g, h, refs[g])
                elif g in shared_blocks and h == SHARED:
                    pass  # (a block shared earlier may have been freed and reallocated
                          # within one operation: then it is private, checked below)
                else:
                    assert h == reader_home[g], (g, h, reader_home[g])
                    if h != c:
                        ledger[h, c] += 1
        assert {bm.base + p for p in bm.hash_of} == {bm.base + p for p in bm.cached.values()}
        assert all(bm.cached[bm.hash_of[p]] == p for p in bm.hash_of)
    assert np.array_equal(mgr.ledger(), ledger), (mgr.ledger(), ledger)
    lent = ledger.sum(axis=0)
    for c, bm in enumerate(mgr.gm.managers):
        assert bm.lent == lent[c] and lent[c] <= cfg.lend_cap
    # a hash is cached at most once in a request's scope
    if cfg.kv_policy == "distributed":
        all_hashes = [h for bm in mgr.gm.managers for h in bm.cached]
        assert len(all_hashes) == len(set(all_hashes))
    hfree = np.zeros(cfg.num_host_blocks, dtype=bool)
    for pool in mgr.host.pools:
        hfree[pool.free_blocks()] = True
    assert np.array_equal(hfree, host_holder == -1)


def check_all_released(mgr: KVCacheManager) -> None:
    """Nothing read: every device block is free or evictable, no debts."""
    cfg = mgr.config
    assert mgr.requests() == []
    for bm in mgr.gm.managers:
        assert bm.num_free == cfg.blocks_per_instance
        assert not bm.refs.any() and bm.lent == 0
    assert not mgr.ledger().any()
    assert mgr.free_host_blocks().tolist() == [cfg.host_blocks_per_instance] * cfg.num_instances
