"""Device-side block copies on a 2x4 simulated mesh: bytes move exactly."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from distkv_jax.kv_cache_manager import KVCacheManager
from distkv_jax.kv_copy import KVCopier, bucket_size, make_pool, pad_pairs
from distkv_jax.kv_types import KVCacheConfig

I, T = 2, 4
L, B, BS, H, D, HB = 2, 4, 4, 4, 8, 3  # layers, blocks/inst, block size, kv heads, head dim, host blocks/inst


@pytest.fixture(scope="module")
def mesh():
    devs = np.array(jax.devices()[: I * T]).reshape(I, T)
    return Mesh(devs, ("inst", "tp"))


@pytest.fixture(scope="module")
def copier(mesh):
    return KVCopier(mesh)


def random_bits(shape, seed):
    """float32 data with awkward values: -0.0, inf, NaN with payloads."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[::97] = -0.0
    flat[5::131] = np.inf
    flat[7::173] = np.frombuffer(np.uint32(0x7FC00123).tobytes(), np.float32)[0]
    return x


def bits(x):
    return np.asarray(x).view(np.uint32)


def np_copy(src_arr, dst_arr, pairs, axis=1):
    """Reference: gather every source, then scatter (same semantics)."""
    if not pairs:
        return dst_arr
    s = [p[0] for p in pairs]
    d = [p[1] for p in pairs]
    vals = np.take(src_arr, s, axis=axis).copy()
    out = dst_arr.copy()
    idx = (slice(None),) * axis + (d,)
    out[idx] = vals
    return out


def test_bucket_and_padding():
    assert [bucket_size(n) for n in (0, 1, 2, 3, 4, 5, 16, 17)] == [1, 1, 2, 4, 4, 8, 16, 32]
    s, d = pad_pairs([3, 1, 2], [5, 6, 7])
    assert s.tolist() == [3, 1, 2, 0] and d.tolist() == [5, 6, 7, -1]


def test_swap_out_and_in_restore_bytes(mesh, copier):
    cfg = KVCacheConfig(I, B, block_size=BS, host_blocks_per_instance=HB, lend_fraction=1.0)
    mgr = KVCacheManager(cfg)
    mgr.admit("a", 0); mgr.admit("b", 1)
    assert mgr.grow("a", 5 * BS - 1).status == "ok"   # 4 blocks on 0, 1 borrowed on 1
    assert mgr.grow("b", 2 * BS).status == "ok"
    a_blocks = mgr.block_ids("a").tolist()
    assert [g // B for g in a_blocks] == [0, 0, 0, 0, 1]

    k0 = random_bits((L, I * B, BS, H, D), 1)
    v0 = random_bits((L, I * B, BS, H, D), 2)
    dev = (make_pool(mesh, k0.shape, fill=k0), make_pool(mesh, v0.shape, fill=v0))
    host = (make_pool(mesh, (L, I * HB, BS, H, D), host=True),
            make_pool(mesh, (L, I * HB, BS, H, D), host=True))
    assert host[0].sharding.memory_kind == "pinned_host"

    p = mgr.preempt("a")
    assert p.mode == "swap" and len(p.swap_out) == 5
    host = copier.swap_out(dev, host, p.swap_out)
    assert host[0].sharding.memory_kind == "pinned_host"
    hb = list(mgr.host_block_ids("a"))
    for x0, h in zip((k0, v0), host):
        assert np.array_equal(bits(h)[:, hb], bits(x0)[:, a_blocks])

    # "a"'s device blocks are reused by "c" and overwritten, then "c" finishes
    mgr.admit("c", 0)
    assert mgr.grow("c", 4 * BS).status == "ok"
    junk = tuple(x.at[:, :B].set(7.0) for x in dev)
    junk_np = tuple(np.asarray(x) for x in junk)
    mgr.finish("c")
    plan = mgr.swap_in("a")
    assert plan is not None and len(plan) == 5
    dev2 = copier.swap_in(host, junk, plan)
    assert dev2[0].sharding.memory_kind == "device"
    new_blocks = mgr.block_ids("a").tolist()
    others = [g for g in range(I * B) if g not in new_blocks]
    for x0, j, x in zip((k0, v0), junk_np, dev2):
        assert np.array_equal(bits(x)[:, new_blocks], bits(x0)[:, a_blocks])
        # blocks not written by the swap in are untouched
        assert np.array_equal(bits(x)[:, others], bits(j)[:, others])


def test_migration_and_cycle_rotation_move_bytes(mesh, copier):
    cfg = KVCacheConfig(I, B, block_size=1, lend_fraction=1.0, migrate_tokens_per_step=8)
    mgr = KVCacheManager(cfg)
    # a 2-cycle (0 owes 1, 1 owes 0) plus a borrowed block that can go home
    for name, inst, n in (("f0", 0, 4), ("f1", 1, 4)):
        mgr.admit(name, inst); mgr.grow(name, n)
    mgr.finish("f1"); mgr.admit("a", 0); mgr.grow("a", 2); mgr.admit("g1", 1); mgr.grow("g1", 2)
    mgr.finish("f0"); mgr.admit("b", 1); mgr.grow("b", 2); mgr.admit("g0", 0); mgr.grow("g0", 1)
    assert mgr.ledger().tolist() == [[0, 2], [2, 0]]
    assert mgr.free_device_blocks().tolist() == [1, 0]
    before = {r: mgr.block_ids(r).tolist() for r in mgr.requests()}

    k0 = random_bits((L, I * B, BS, H, D), 3)
    v0 = random_bits((L, I * B, BS, H, D), 4)
    pools = {"k": make_pool(mesh, k0.shape, fill=k0), "v": make_pool(mesh, v0.shape, fill=v0)}
    plan = mgr.plan_migration()
    # two 2-cycle rotations (4 moves) remove every debt; the free block stays free
    assert len(plan) == 4 and mgr.ledger().sum() == 0
    assert any(s // B != d // B for s, d in plan.pairs)  # crosses instances
    pools = copier.move(pools, plan)
    for name, x0 in (("k", k0), ("v", v0)):
        got = bits(pools[name])
        ref = np_copy(x0, x0, list(plan.pairs))
        assert np.array_equal(got, ref.view(np.uint32))
        for r, old in before.items():
            assert np.array_equal(got[:, mgr.block_ids(r).tolist()], bits(x0)[:, old])

    # return-home migration: h (home 1) borrows from 0, then room returns on 1
    mgr.finish("g0")
    mgr.admit("h", 1); assert mgr.grow("h", 1).status == "ok"  # 1 full -> borrows from 0
    mgr.finish("g1")
    old = mgr.block_ids("h").tolist()
    plan = mgr.migrate()
    assert len(plan) == 1 and plan.pairs[0][0] // B == 0 and plan.pairs[0][1] // B == 1
    k_before = bits(pools["k"]).copy()
    pools = copier.move(pools, plan)
    assert np.array_equal(bits(pools["k"])[:, mgr.block_ids("h").tolist()], k_before[:, old])


def test_padding_is_noop_and_buckets_compile_once(mesh):
    copier = KVCopier(mesh)
    x0 = random_bits((L, I * B, BS, H, D), 5)
    pool = make_pool(mesh, x0.shape, fill=x0)
    ref = x0
    for pairs in ([(1, 6), (6, 1), (2, 3)], [(0, 7), (7, 0), (4, 5), (5, 4)], [(3, 2)]):
        pool = copier.move(pool, pairs)
        ref = np_copy(ref, ref, pairs)
        assert np.array_equal(bits(pool), ref.view(np.uint32))
    # sizes 3 and 4 share bucket 4, size 1 is bucket 1: two programs
    assert copier.compiles() == 2
    pool = copier.move(pool, [(5, 6), (6, 5)])  # bucket 2
    pool = copier.move(pool, [(5, 6), (6, 5)])
    assert copier.compiles() == 3


def test_per_layer_pools_and_tp_replicated_heads(mesh, copier):
    """4-D per-layer pools (P("inst", None, "tp", None)) and a pool whose heads
    are replicated over tp (fewer KV heads than tp)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    x0 = random_bits((I * B, BS, H, D), 6)
    y0 = random_bits((I * B, BS, 1, D), 7)
    x = make_pool(mesh, x0.shape, fill=x0)
    y = jax.device_put(jnp.asarray(y0), NamedSharding(mesh, P("inst", None, None, None)))
    pairs = [(0, 7), (6, 1)]
    x, y = copier.move([x, y], pairs)
    assert np.array_equal(bits(x), np_copy(x0, x0, pairs, axis=0).view(np.uint32))
    assert np.array_equal(bits(y), np_copy(y0, y0, pairs, axis=0).view(np.uint32))
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("inst", None, None, None)), 4)


def test_step_plans_end_to_end_on_device(mesh, copier):
    """Drive prepare_step for many steps and execute every plan on real pools,
    in the documented order (moves, swap_out, swap_in, then the step's writes
    to the scheduled tokens' slots). Every token of every request must read back its value,
    wherever its block went (borrowed, migrated, rotated, swapped to host)."""
    bs, hd = 2, 2
    cfg = KVCacheConfig(I, 3, block_size=bs, host_blocks_per_instance=2,
                        lend_fraction=1.0, migrate_tokens_per_step=4)
    mgr = KVCacheManager(cfg)
    dev = make_pool(mesh, (1, cfg.num_device_blocks, bs, H, hd))
    host = make_pool(mesh, (1, cfg.num_host_blocks, bs, H, hd), host=True)

    def value(rid, pos):
        return rid * 1000.0 + pos + 0.5

    rng = np.random.default_rng(8)  # a seed whose run exercises all three copy kinds
    next_id, seen = 0, {"moves": 0, "swap_out": 0, "swap_in": 0}
    for step in range(30):
        if rng.random() < 0.5:
            mgr.admit(next_id, int(rng.integers(0, I))); next_id += 1
        live = mgr.requests()
        if live and rng.random() < 0.25:
            mgr.finish(live[int(rng.integers(0, len(live)))]); live = mgr.requests()
        plan = mgr.prepare_step([(r, int(rng.integers(1, 3))) for r in live])
        dev = copier.move(dev, plan.moves)
        host = copier.swap_out(dev, host, plan.swap_out)
        dev = copier.swap_in(host, dev, plan.swap_in)
        for k in seen:
            seen[k] += len(getattr(plan, k))
        if plan.scheduled:
            vals = np.concatenate([[value(r, p) for p in range(s, s + n)]
                                   for r, s, n in plan.scheduled]).astype(np.float32)
            sl = np.concatenate([mgr.slots(r, s, n) for r, s, n in plan.scheduled])
            upd = np.broadcast_to(vals[None, :, None, None], (1, len(vals), H, hd))
            dev = dev.at[:, sl // bs, sl % bs].set(upd)
        dev_np, host_np = np.asarray(dev), np.asarray(host)
        for r in mgr.requests():
            n = mgr.num_tokens(r)
            want = np.asarray([value(r, p) for p in range(n)], np.float32)
            if mgr.state(r) == "running":
                sl = mgr.slots(r, 0, n)
                got = dev_np[0, sl // bs, sl % bs, 0, 0]
            else:
                hb = np.asarray(mgr.host_block_ids(r))
                pos = np.arange(n)
                got = host_np[0, hb[pos // bs], pos % bs, 0, 0]
            assert np.array_equal(got, want), (step, r, got, want)
    assert all(v > 0 for v in seen.values()), seen  # every copy kind exercised
