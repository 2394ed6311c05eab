"""Brute-force reference checks for the KV control plane tests (no JAX).

``Shadow`` replays plans on tag arrays: every device/host block holds the tag
(request, logical index) of the KV it contains, so executing the copy plans
in the documented order must leave each request's blocks holding its own tags.
"""
from __future__ import annotations

import numpy as np

from distkv_jax.kv_cache_manager import RUNNING, SWAPPED, KVCacheManager
from distkv_jax.kv_types import CopyPlan, GrowResult, StepKVPlan

NO_TAG = -1


def tag(seq: int, logical: int) -> int:
    return seq * 100_000 + logical


class Shadow:
    def __init__(self, mgr: KVCacheManager) -> None:
        cfg = mgr.config
        self.mgr = mgr
        self.dev = np.full(cfg.num_device_blocks, NO_TAG, dtype=np.int64)
        self.host = np.full(max(cfg.num_host_blocks, 1), NO_TAG, dtype=np.int64)

    def copy(self, plan: CopyPlan) -> None:
        if not plan:
            return
        src_arr = self.host if plan.kind == "swap_in" else self.dev
        dst_arr = self.host if plan.kind == "swap_out" else self.dev
        vals = src_arr[plan.src].copy()  # gather all, then scatter
        assert len(set(plan.dst.tolist())) == len(plan), "duplicate destinations"
        dst_arr[plan.dst] = vals

    def grow(self, res: GrowResult, seq: int) -> None:
        self.copy(res.moves)  # reclaim moves run first (with the step's moves)
        out = res.offload  # then one swap-out batch: offloads and preemptions
        for p in res.preemptions:
            out = out.concat(p.swap_out)
        self.copy(out)
        if res.status == "ok" and res.num_new:
            self.new_blocks_from(res.request_id, seq, res.start)

    def step(self, plan: StepKVPlan, seq_of) -> None:
        self.copy(plan.moves)
        self.copy(plan.swap_out)
        self.copy(plan.swap_in)
        for rid, start, n in plan.scheduled:
            if n:
                self.new_blocks_from(rid, seq_of(rid), start)

    def new_blocks_from(self, rid, seq, start) -> None:
        bs = self.mgr.config.block_size
        ids = self.mgr.block_ids(rid)
        first_new = -(-start // bs)  # blocks at index >= this were allocated now
        for j in range(first_new, len(ids)):
            self.dev[int(ids[j])] = tag(seq, j)

    def check(self, seq_of) -> None:
        m = self.mgr
        for rid in m.requests():
            seq = seq_of(rid)
            if m.state(rid) == RUNNING:
                ids = m.block_ids(rid)
                want = [tag(seq, j) for j in range(len(ids))]
                D = m.config.num_device_blocks
                got = [int(self.host[g - D]) if g >= D else int(self.dev[g]) for g in ids.tolist()]
                assert got == want, (rid, ids, got)
            else:
                hb = list(m.host_block_ids(rid))
                want = [tag(seq, j) for j in range(len(hb))]
                assert self.host[hb].tolist() == want, (rid, hb, self.host[hb])


def check_invariants(mgr: KVCacheManager) -> None:
    """Recompute everything from the block tables and compare."""
    cfg = mgr.config
    I, B, bs = cfg.num_instances, cfg.blocks_per_instance, cfg.block_size
    holder = np.full(cfg.num_device_blocks, -1, dtype=np.int64)
    host_holder = np.full(cfg.num_host_blocks, -1, dtype=np.int64)
    ledger = np.zeros((I, I), dtype=np.int64)
    for k, rid in enumerate(mgr.requests()):
        home = mgr.home(rid)
        n_tok = mgr.num_tokens(rid)
        if mgr.state(rid) == RUNNING:
            ids = mgr.block_ids(rid)
            assert len(ids) == -(-n_tok // bs), (rid, len(ids), n_tok)
            assert len(mgr.host_block_ids(rid)) == 0
            for g in ids.tolist():
                if g >= cfg.num_device_blocks:  # host-attended
                    assert cfg.host_attention, (rid, g)
                    h = g - cfg.num_device_blocks
                    assert host_holder[h] == -1, f"host block {h} owned twice"
                    host_holder[h] = k
                    if cfg.kv_policy == "local":
                        assert h // cfg.host_blocks_per_instance == home
                    continue
                assert 0 <= g < cfg.num_device_blocks
                assert holder[g] == -1, f"block {g} owned twice"
                holder[g] = k
                c = g // B
                if c != home:
                    ledger[home, c] += 1
            if cfg.kv_policy == "local":
                assert all(g // B == home for g in ids.tolist() if g < cfg.num_device_blocks)
            if n_tok % bs and len(ids):  # the block being written is on device
                assert ids[-1] < cfg.num_device_blocks
        else:
            assert mgr.state(rid) == SWAPPED
            assert len(mgr.block_ids(rid)) == 0
            hb = mgr.host_block_ids(rid)
            assert len(hb) == -(-n_tok // bs)
            for h in hb:
                assert host_holder[h] == -1, f"host block {h} owned twice"
                host_holder[h] = k
                if cfg.kv_policy == "local":
                    assert h // cfg.host_blocks_per_instance == home
    # every block is either free or owned by exactly one request
    free = np.zeros(cfg.num_device_blocks, dtype=bool)
    for m in mgr.gm.managers:
        fb = m.free_blocks()
        assert not free[fb].any()
        free[fb] = True
    assert np.array_equal(free, holder == -1)
    hfree = np.zeros(cfg.num_host_blocks, dtype=bool)
    for p in mgr.host.pools:
        hfree[p.free_blocks()] = True
    assert np.array_equal(hfree, host_holder == -1)
    # ledger equals the blocks actually lent; caps respected
    assert np.array_equal(mgr.ledger(), ledger), (mgr.ledger(), ledger)
    lent = ledger.sum(axis=0)
    for c, m in enumerate(mgr.gm.managers):
        assert m.lent == lent[c]
        assert lent[c] <= cfg.lend_cap
    if cfg.kv_policy == "local":
        assert ledger.sum() == 0


def check_all_free(mgr: KVCacheManager) -> None:
    cfg = mgr.config
    assert mgr.requests() == []
    assert mgr.free_device_blocks().tolist() == [cfg.blocks_per_instance] * cfg.num_instances
    assert mgr.free_host_blocks().tolist() == [cfg.host_blocks_per_instance] * cfg.num_instances
    assert mgr.ledger().sum() == 0 and not mgr.ledger().any()
    assert all(m.lent == 0 for m in mgr.gm.managers)
