"""Decode-step attention versus context length on an Ix1 mesh.

    python -m distkv_jax.bench attention [--contexts=1024,...,65536] [--quick]

Workload: one decode step of one layer with one sequence per instance (I
sequences of N tokens each, 1 query row per instance), Llama-3-8B-like heads
by default (32 query heads, 8 KV heads, head_dim 128, float32, block 16).

  (a) local:     every sequence's blocks on its owner instance (DistAttention)
  (b) spread:    every sequence's blocks round-robin over all instances (DistAttention)
  (c) kv_moving: blocks spread as in (b), but the remote blocks are moved to the
                 owner (one all_to_all of KV), which then attends locally

Bytes between instances are counted from the collectives' payload shapes. On
simulated CPU devices a collective is a memory copy, so the times understate
what moving KV costs on a network; the bytes are the figure that transfers.

The mesh comparisons use the engine's default MicroAttention ("auto": the
native C++ kernel on CPU). Also measured: MicroAttention (the jnp reference and
the native kernel; one device, one sequence: one query tile, so the native
kernel runs on one thread) KV bytes read per second at --bandwidth_context, against this machine's memory
bandwidth measured two ways: XLA streaming read (jnp.sum over 1 GiB on one
CPU device; XLA may use both cores) and one-thread numpy sum.

A tensor-parallel point: the spread step at --tp_context tokens on I/2
instances with tp=2 (4x2) against tp=1 (4x1), same sequences, checked equal.

`--preset gpu` (what `make gpu-check` runs on an NVIDIA GPU): no mesh rows
(one accelerator); per context, one decode step of --gpu_sequences sequences
over bfloat16 pages (Llama-3-8B's attention shape) with the jnp reference and
the "auto" kernel (the Triton kernel on a GPU), their KV bytes read per second
against the device's measured streaming-read bandwidth (jnp.sum over 1 GiB),
and a bfloat16 prefill chunk. Run on a CPU it measures the same with the
native kernel (the test suite's --quick form does).

A host-attended point (--host_context tokens per sequence, one sequence per
instance, blocks on their owner): all blocks on device, against the oldest
half of every sequence's blocks in its instance's host pool (pinned_host,
attended by the host CPU in place: DistAttention's host path), against
bringing that half back to device memory every step (the engine's swap-in
copy, then the all-device step), with the bytes each moves across the
device-host boundary per step (queries down and partials up, against the KV
blocks), all three checked equal, and the floor of any swap-in here (one
memcpy of those bytes). The engine's swap-in copy is far above that floor for
large batches: it moves the host pool through device memory per 64-block
batch (kv_copy.py). On a CPU host and device memory are the
same RAM, so the times show the cost of the mechanisms, not of a PCIe link.

And a prefill point: MicroAttention alone on one device for one chunk of
--prefill_chunk new tokens at a context of --prefill_context tokens, with the
workload benchmark's heads (--prefill_heads query = KV heads of head_dim
--prefill_head_dim), planned as the engine plans it (query tiles of 8 and of
16 rows), jnp reference and native kernel; both checked against each other.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import time

import numpy as np
from absl import flags

from distkv_jax.attention_plan import MAX_RUN, choose_run
from distkv_jax.bench.common import (cpu_model, median_time, pyplot, save_figure,
                                     stream_read_bandwidth, write_json)
from distkv_jax.mesh import simulate_cpu_devices

FLAGS = flags.FLAGS
flags.DEFINE_list("contexts", ["1024", "4096", "16384", "32768", "65536"], "context lengths (tokens)")
flags.DEFINE_integer("instances", 8, "instances (mesh Ix1)")
flags.DEFINE_integer("block_size", 16, "tokens per KV block")
flags.DEFINE_integer("num_heads", 32, "query heads")
flags.DEFINE_integer("num_kv_heads", 8, "KV heads")
flags.DEFINE_integer("head_dim", 128, "head dimension")
flags.DEFINE_integer("iters", 5, "timed iterations per point (median reported)")
flags.DEFINE_integer("bandwidth_context", 32768, "context of the single-device bandwidth measurement")
flags.DEFINE_integer("prefill_context", 4096, "prefill point: context (tokens) at the chunk's end")
flags.DEFINE_integer("prefill_chunk", 256, "prefill point: new tokens in the chunk")
flags.DEFINE_integer("prefill_heads", 8, "prefill point: query heads = KV heads")
flags.DEFINE_integer("prefill_head_dim", 8, "prefill point: head dimension")
flags.DEFINE_enum("preset", "cpu", ["cpu", "gpu"],
                  "cpu: the mesh comparisons on simulated CPU devices (above); gpu: MicroAttention "
                  "on one accelerator, bfloat16 pages, long contexts, against its memory-bandwidth floor")
flags.DEFINE_list("gpu_contexts", ["8192", "32768", "131072", "524288"], "contexts (tokens), gpu preset")
flags.DEFINE_integer("gpu_sequences", 8, "sequences per decode step, gpu preset")
flags.DEFINE_integer("tp_context", 16384, "tp point: context (tokens) of the 4x1 vs 4x2 comparison")
flags.DEFINE_integer("host_context", 16384, "host point: context (tokens) per sequence")
flags.DEFINE_list("points", ["mesh", "tp", "host", "bandwidth", "prefill"],
                  "which measurements to run (cpu preset)")
flags.DEFINE_bool("quick", False, "tiny sizes (for the test suite)")
flags.DEFINE_string("output_json", "bench_results/attention.json", "result file")
flags.DEFINE_string("output_png", "bench_results/attention.png", "plot ('' to skip)")


def _setup(I, N, bs, Hq, Hkv, D, tp=1):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from distkv_jax.attention_plan import PoolGeometry, SeqQuery, build_attention_plan
    from distkv_jax.dist_attention import (DistAttentionConfig, DistMeta, dist_attention,
                                           step_traffic_bytes)
    from distkv_jax.kv_pool import PoolLayout
    from distkv_jax.mesh import make_mesh

    mesh = make_mesh(f"{I}x{tp}")
    nblocks = -(-N // bs)
    layout = PoolLayout(1, I, nblocks, bs, Hkv, D, tp)
    cfg = DistAttentionConfig(layout, Hq, 1 / math.sqrt(D))
    pool_sh = NamedSharding(mesh, layout.spec)
    rows_sh = NamedSharding(mesh, P("inst"))

    def rand(key, shape, sharding):
        return jax.jit(lambda: jax.random.normal(jax.random.key(key), shape, jnp.float32),
                       out_shardings=sharding)()

    q = rand(1, (I, 1, Hq, D), rows_sh)
    k_new = rand(2, (I, 1, Hkv, D), rows_sh)
    v_new = rand(3, (I, 1, Hkv, D), rows_sh)
    geom = PoolGeometry(I, nblocks, bs)

    def tables(spread):
        # Sequence i's logical block b lives on instance (i + b) % I when
        # spread, else on instance i; physical slots fill each instance in order.
        used = [0] * I
        out = []
        for i in range(I):
            t = []
            for b in range(nblocks):
                inst = (i + b) % I if spread else i
                t.append(inst * nblocks + used[inst])
                used[inst] += 1
            out.append(t)
        return out

    step = jax.jit(functools.partial(dist_attention, mesh=mesh, cfg=cfg), donate_argnums=(3, 4))
    return dict(jax=jax, jnp=jnp, mesh=mesh, layout=layout, cfg=cfg, q=q, k_new=k_new, v_new=v_new,
                geom=geom, tables=tables, step=step, rand=rand, pool_sh=pool_sh,
                SeqQuery=SeqQuery, build=build_attention_plan, DistMeta=DistMeta,
                traffic=step_traffic_bytes)


def _dist_point(s, N, spread, iters):
    I = s["layout"].num_instances
    queries = [s["SeqQuery"](i, 0, [N - 1], t) for i, t in enumerate(s["tables"](spread))]
    plan = s["build"](queries, s["geom"], 1)
    meta = s["DistMeta"].from_plan(plan)
    pools = [s["rand"](10, s["layout"].shape, s["pool_sh"]), s["rand"](11, s["layout"].shape, s["pool_sh"])]

    def run():
        out, pools[0], pools[1] = s["step"](s["q"], s["k_new"], s["v_new"], pools[0], pools[1], 0, meta)
        out.block_until_ready()
        return out

    ref = run()  # compile
    t = median_time(run, iters)
    return t, np.asarray(ref), plan.items_per_instance().tolist(), pools


def _tp_point(N, bs, Hq, Hkv, D, iters, devices):
    """The spread decode step with tensor parallelism: I/2 instances of tp=2
    against I/2 instances of tp=1 (same sequences; tp splits the heads),
    checked equal."""
    inst = max(1, devices // 2)
    out = {"context": N, "instances": inst}
    res = {}
    for tp in (1, 2):
        s = _setup(inst, N, bs, Hq, Hkv, D, tp=tp)
        t, o, items, pools = _dist_point(s, N, True, iters)
        del pools, s
        out[f"tp{tp}_ms"] = t * 1e3
        out[f"tp{tp}_items_per_instance"] = items
        res[tp] = o
    out["tp2_over_tp1"] = out["tp2_ms"] / out["tp1_ms"]
    out["max_abs_diff"] = float(np.abs(res[2] - res[1]).max())
    return out


def _host_point(N, bs, Hq, Hkv, D, iters, I):
    """Decode step with the oldest half of each sequence's blocks on the host
    (attended there), against all on device and against swapping that half
    in every step."""
    import jax
    from jax.sharding import NamedSharding

    from distkv_jax.kv_copy import KVCopier
    from distkv_jax.kv_pool import PoolLayout

    s = _setup(I, N, bs, Hq, Hkv, D)
    lay = s["layout"]
    NB = lay.blocks_per_instance
    HB = NB // 2                                    # the oldest half of each sequence
    host_lay = PoolLayout(1, I, HB, bs, Hkv, D, 1)
    host_sh = NamedSharding(s["mesh"], host_lay.spec, memory_kind="pinned_host")
    rng = np.random.default_rng(12)
    k_np = rng.standard_normal(lay.shape, np.float32)
    v_np = rng.standard_normal(lay.shape, np.float32)
    # host block i*HB + j holds what device block i*NB + j holds: the same KV
    pick = (np.arange(I)[:, None] * NB + np.arange(HB)[None]).reshape(-1)
    host = [jax.device_put(x[:, pick], host_sh) for x in (k_np, v_np)]
    tables = s["tables"](False)                     # sequence i: blocks i*NB .. i*NB+NB-1
    geom_h = type(s["geom"])(I, NB, bs, HB)
    host_tables = [[I * NB + i * HB + b if b < HB else g for b, g in enumerate(t)]
                   for i, t in enumerate(tables)]
    out = {"context": N, "instances": I, "host_blocks_per_sequence": HB,
           "device_blocks_per_sequence": NB - HB}
    res = {}
    for name, tabs, geom in (("all_device", tables, s["geom"]), ("half_host", host_tables, geom_h)):
        plan = s["build"]([s["SeqQuery"](i, 0, [N - 1], t) for i, t in enumerate(tabs)], geom, 1)
        meta = s["DistMeta"].from_plan(plan, host if name == "half_host" else None)
        pools = [jax.device_put(k_np, s["pool_sh"]), jax.device_put(v_np, s["pool_sh"])]

        def run():
            o, pools[0], pools[1] = s["step"](s["q"], s["k_new"], s["v_new"], pools[0], pools[1], 0,
                                              meta)
            return o.block_until_ready()

        res[name] = np.asarray(run())
        out[f"{name}_ms"] = median_time(run, iters) * 1e3
        if name == "half_host":
            out["host_items_per_instance"] = plan.host_items_per_instance().tolist()
            out["device_items_per_instance"] = plan.items_per_instance().tolist()
    # swap the host half in every step: copy it into device blocks, then attend
    copier = KVCopier(s["mesh"])
    pairs = [(i * HB + b, i * NB + b) for i in range(I) for b in range(HB)]
    plan = s["build"]([s["SeqQuery"](i, 0, [N - 1], t) for i, t in enumerate(tables)], s["geom"], 1)
    meta = s["DistMeta"].from_plan(plan)
    pools = [jax.device_put(k_np, s["pool_sh"]), jax.device_put(v_np, s["pool_sh"])]

    def swap_run():
        pools[0], pools[1] = copier.swap_in(tuple(host), (pools[0], pools[1]), pairs)
        o, pools[0], pools[1] = s["step"](s["q"], s["k_new"], s["v_new"], pools[0], pools[1], 0, meta)
        return o.block_until_ready()

    res["swap_in"] = np.asarray(swap_run())
    out["swap_in_each_step_ms"] = median_time(swap_run, iters) * 1e3
    out["half_host_over_all_device"] = out["half_host_ms"] / out["all_device_ms"]
    out["swap_in_over_half_host"] = out["swap_in_each_step_ms"] / out["half_host_ms"]
    # bytes across the device-host boundary per layer and step (float32)
    tiles = plan.tile_rows.shape[0]                 # query tiles the host part receives
    out["host_path_bytes_per_step"] = I * tiles * (Hq * D + Hq * (D + 1)) * 4
    out["swap_in_bytes_per_step"] = I * HB * bs * Hkv * D * 2 * 4
    # the floor of any swap-in here: one memcpy of those bytes (numpy, one thread)
    src = np.ones(out["swap_in_bytes_per_step"] // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    out["swap_in_memcpy_floor_ms"] = median_time(lambda: np.copyto(dst, src), iters) * 1e3
    del src, dst
    out["max_abs_diff_half_host_vs_all_device"] = float(np.abs(res["half_host"] - res["all_device"]).max())
    out["max_abs_diff_swap_in_vs_all_device"] = float(np.abs(res["swap_in"] - res["all_device"]).max())
    return out


def _kv_moving_point(s, N, iters, pools):
    """(c): send each sequence's remote blocks to its owner, then attend there.
    `pools` are (b)'s pools after its steps (the new token already written)."""
    jax, jnp = s["jax"], s["jnp"]
    from jax.sharding import PartitionSpec as P

    from distkv_jax.kernels.micro_attention import micro_attention

    lay, cfg, mesh = s["layout"], s["cfg"], s["mesh"]
    I, NB, bs = lay.num_instances, lay.blocks_per_instance, lay.block_size
    tabs = s["tables"](True)
    per_src = -(-NB // I)  # blocks of one sequence held by one instance (round-robin)
    send = np.zeros((I, I, per_src), np.int32)     # [src, dst owner, w] local block on src
    kstart = np.full((I, I, per_src), 1 << 30, np.int32)  # [owner, src, w] key start (pad: masked)
    fill = np.zeros((I, I), np.int32)
    for owner, t in enumerate(tabs):
        for lb, gb in enumerate(t):
            src = gb // NB
            w = fill[src, owner]
            send[src, owner, w] = gb % NB
            kstart[owner, src, w] = lb * bs
            fill[src, owner] += 1
    pos = np.full((I, 1), N - 1, np.int32)
    Hkv, D, Hq = lay.num_kv_heads, lay.head_dim, cfg.num_heads

    def body(q, k_pool, v_pool, send, kstart, pos):
        kp, vp = k_pool[0], v_pool[0]                            # [NB, bs, Hkv, D]
        k_out = kp[send[0]]                                      # [I, per_src, bs, Hkv, D]
        v_out = vp[send[0]]
        k_in = jax.lax.all_to_all(k_out, "inst", 0, 0, tiled=True).reshape(I * per_src, bs, Hkv, D)
        v_in = jax.lax.all_to_all(v_out, "inst", 0, 0, tiled=True).reshape(I * per_src, bs, Hkv, D)
        W = I * per_src
        qt = q[0].reshape(1, 1, Hkv, Hq // Hkv, D)
        o, _ = micro_attention(qt, pos[:, :1], k_in, v_in, jnp.zeros(W, jnp.int32),
                               jnp.arange(W, dtype=jnp.int32), kstart[0].reshape(W), scale=cfg.scale,
                               run=math.gcd(W, MAX_RUN), impl=cfg.impl)  # the kernel (a), (b) use
        return o.reshape(1, 1, Hq, D)

    fn = jax.jit(jax.shard_map(body, mesh=mesh,
                               in_specs=(P("inst"), lay.spec, lay.spec, P("inst"), P("inst"), P("inst")),
                               out_specs=P("inst"), check_vma=False))
    args = (s["q"], pools[0], pools[1], jnp.asarray(send), jnp.asarray(kstart), jnp.asarray(pos))
    out = fn(*args).block_until_ready()
    t = median_time(lambda: fn(*args).block_until_ready(), iters)
    itemsize = 4
    moved = I * (I - 1) * per_src * bs * Hkv * D * 2 * itemsize     # all_to_all payload, off-device
    remote = sum(1 for o, t_ in enumerate(tabs) for gb in t_ if gb // NB != o) * bs * Hkv * D * 2 * itemsize
    return t, np.asarray(out), moved, remote


def _bandwidth(N, bs, Hq, Hkv, D, iters):
    import jax
    import jax.numpy as jnp

    from distkv_jax.kernels.micro_attention import micro_attention

    bw = stream_read_bandwidth(iters)
    dev = jax.devices()[0]
    P_ = -(-N // bs)
    rng = np.random.default_rng(0)
    k = jax.device_put(rng.standard_normal((P_, bs, Hkv, D), np.float32), dev)
    v = jax.device_put(rng.standard_normal((P_, bs, Hkv, D), np.float32), dev)
    q = jnp.ones((8, 1, Hkv, Hq // Hkv, D), jnp.float32)
    q_pos = jnp.full((8, 1), -1, jnp.int32).at[0, 0].set(N - 1)
    blocks = jnp.asarray(rng.permutation(P_).astype(np.int32))
    run = choose_run(np.array([P_]))  # what the plan picks for one long sequence
    args = (q, q_pos, k, v, jnp.zeros(P_, jnp.int32), blocks, jnp.arange(P_, dtype=jnp.int32) * bs)
    kv_bytes = k.nbytes + v.nbytes
    out = {"context": N, "run": run, "kv_bytes": int(kv_bytes), **bw}
    for impl in ("reference", "native"):
        fn = jax.jit(functools.partial(micro_attention, scale=0.1, run=run, impl=impl))
        fn(*args)[0].block_until_ready()
        t = median_time(lambda: fn(*args)[0].block_until_ready(), iters)
        key = "" if impl == "reference" else "native_"
        out.update({f"{key}micro_attention_ms": t * 1e3, f"{key}kv_read_GBps": kv_bytes / t / 1e9,
                    f"{key}fraction_of_xla_bw": kv_bytes / t / 1e9 / bw["xla_stream_read_GBps"],
                    f"{key}fraction_of_numpy_bw": kv_bytes / t / 1e9 / bw["numpy_1thread_read_GBps"]})
    return out


def _prefill_point(N, chunk, bs, H, D, iters):
    """MicroAttention for one prefill chunk (the last `chunk` of N tokens), per
    query tile and implementation."""
    import jax
    import jax.numpy as jnp

    from distkv_jax.attention_plan import PoolGeometry, SeqQuery, build_attention_plan
    from distkv_jax.kernels.micro_attention import micro_attention

    P_ = -(-N // bs)
    rng = np.random.default_rng(1)
    k = jnp.asarray(rng.standard_normal((P_, bs, H, D), np.float32))
    v = jnp.asarray(rng.standard_normal((P_, bs, H, D), np.float32))
    seq = SeqQuery(0, 0, range(N - chunk, N), rng.permutation(P_).tolist())
    scores = H * sum(p + 1 for p in range(N - chunk, N))  # causal (query, key) pairs
    out = {"context": N, "chunk": chunk, "heads": H, "head_dim": D, "scores": scores}
    for q_tile in (8, 16):
        plan = build_attention_plan([seq], PoolGeometry(1, P_, bs), chunk, q_tile=q_tile)
        rows = plan.tile_rows
        q = jnp.asarray(rng.standard_normal((rows.shape[0], q_tile, H, 1, D), np.float32))
        q_pos = jnp.asarray(np.where(rows >= 0, plan.positions[np.maximum(rows, 0)], -1), jnp.int32)
        args = (q, q_pos, k, v, *(jnp.asarray(a.reshape(-1)) for a in
                                  (plan.item_tile, plan.item_block, plan.item_kstart)))
        res = {}
        for impl in ("reference", "native"):
            fn = jax.jit(functools.partial(micro_attention, scale=D ** -0.5, run=plan.run, impl=impl))
            res[impl] = np.asarray(fn(*args)[0])
            t = median_time(lambda: fn(*args)[0].block_until_ready(), iters)
            out[f"{impl}_q_tile{q_tile}_ms"] = t * 1e3
            out[f"{impl}_q_tile{q_tile}_ns_per_score"] = t / scores * 1e9
        out[f"max_abs_diff_q_tile{q_tile}"] = float(np.abs(res["native"] - res["reference"]).max())
    return out


def _gpu_decode_point(N, seqs, bs, Hq, Hkv, D, iters, impls):
    """One decode step of `seqs` sequences of N tokens, bfloat16 pages (stored
    as their bits, as the engine stores them), blocks in random pool order."""
    import jax
    import jax.numpy as jnp

    from distkv_jax.attention_plan import PoolGeometry, SeqQuery, build_attention_plan
    from distkv_jax.kernels.micro_attention import micro_attention

    nb = -(-N // bs)
    pages = seqs * nb
    key = jax.random.key(0)

    @jax.jit
    def make():
        k = jax.random.normal(key, (pages, bs, Hkv, D), jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 1), (pages, bs, Hkv, D), jnp.bfloat16)
        return (jax.lax.bitcast_convert_type(k, jnp.uint16), jax.lax.bitcast_convert_type(v, jnp.uint16))

    k, v = make()
    perm = np.random.default_rng(0).permutation(pages)
    queries = [SeqQuery(0, i, [N - 1], perm[i * nb:(i + 1) * nb].tolist()) for i in range(seqs)]
    plan = build_attention_plan(queries, PoolGeometry(1, pages, bs), seqs)
    rows = plan.tile_rows
    q = jax.random.normal(jax.random.fold_in(key, 2), (rows.shape[0], 1, Hkv, Hq // Hkv, D), jnp.bfloat16)
    q_pos = jnp.asarray(np.where(rows >= 0, plan.positions[np.maximum(rows, 0)], -1), jnp.int32)
    args = (q, q_pos, k, v, *(jnp.asarray(a.reshape(-1)) for a in
                              (plan.item_tile, plan.item_block, plan.item_kstart)))
    kv_bytes = 2 * seqs * N * Hkv * D * 2  # the KV a step must read (bfloat16)
    out = {"context": N, "sequences": seqs, "run": plan.run, "kv_bytes": int(kv_bytes)}
    res = {}
    for impl in impls:
        fn = jax.jit(functools.partial(micro_attention, scale=D ** -0.5, run=plan.run, impl=impl))
        t0 = time.perf_counter()
        res[impl] = np.asarray(fn(*args)[0])
        out[f"{impl}_first_call_s"] = time.perf_counter() - t0
        t = median_time(lambda: fn(*args)[0].block_until_ready(), iters)
        out.update({f"{impl}_ms": t * 1e3, f"{impl}_kv_read_GBps": kv_bytes / t / 1e9})
    out["max_abs_diff"] = float(np.abs(res[impls[-1]] - res[impls[0]]).max())
    del k, v
    return out


def _gpu_main() -> None:
    import jax

    from distkv_jax.kernels.micro_attention import resolve_impl

    bs, Hq, Hkv, D = FLAGS.block_size, FLAGS.num_heads, FLAGS.num_kv_heads, FLAGS.head_dim
    contexts, seqs, iters = [int(c) for c in FLAGS.gpu_contexts], FLAGS.gpu_sequences, FLAGS.iters
    if FLAGS.quick:
        contexts, seqs, Hq, Hkv, D, iters = [512, 2048], 2, 4, 2, 64, 2
    dev = jax.devices()[0]
    auto = resolve_impl("auto", dev.platform, D, bs)
    impls = ("reference", auto) if auto != "reference" else ("reference",)
    bw = stream_read_bandwidth(iters, 0.25 if FLAGS.quick else 1.0)
    rows = []
    for N in contexts:
        row = _gpu_decode_point(N, seqs, bs, Hq, Hkv, D, iters, impls)
        for impl in impls:
            row[f"{impl}_fraction_of_stream_bw"] = row[f"{impl}_kv_read_GBps"] / bw["xla_stream_read_GBps"]
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
              flush=True)
    result = {"bench": "attention", "preset": "gpu", "device": dev.device_kind,
              "platform": dev.platform, "block_size": bs, "num_heads": Hq, "num_kv_heads": Hkv,
              "head_dim": D, "dtype": "bfloat16", "attention_impl": auto, "rows": rows,
              "bandwidth": bw, "cpu": cpu_model(), "quick": FLAGS.quick}
    write_json(FLAGS.output_json, result)


def main(argv) -> None:
    del argv
    if FLAGS.preset == "gpu":
        return _gpu_main()
    pre = (FLAGS.prefill_context, FLAGS.prefill_chunk, FLAGS.prefill_heads, FLAGS.prefill_head_dim)
    if FLAGS.quick:
        contexts, Hq, Hkv, D, iters, bw_ctx = [256, 1024], 4, 2, 16, 2, 1024
        pre = (256, 64, 2, 8)
    else:
        contexts = [int(c) for c in FLAGS.contexts]
        Hq, Hkv, D, iters, bw_ctx = (FLAGS.num_heads, FLAGS.num_kv_heads, FLAGS.head_dim,
                                     FLAGS.iters, FLAGS.bandwidth_context)
    I, bs = FLAGS.instances, FLAGS.block_size
    simulate_cpu_devices(I)
    import jax

    rows = []
    points = set(FLAGS.points)
    for N in contexts if "mesh" in points else []:
        s = _setup(I, N, bs, Hq, Hkv, D)
        t_a, _, items_a, pools = _dist_point(s, N, False, iters)
        del pools
        t_b, out_b, items_b, pools = _dist_point(s, N, True, iters)
        t_c, out_c, moved, remote = _kv_moving_point(s, N, iters, pools)
        del pools
        # (b) and (c) attend the same blocks, once where they are, once moved
        diff = float(np.abs(out_c - out_b).max())
        traffic = s["traffic"](s["cfg"], 1, 4)
        dist_bytes = int(sum(traffic.values()))
        row = {"context": N, "local_ms": t_a * 1e3, "spread_ms": t_b * 1e3, "kv_moving_ms": t_c * 1e3,
               "spread_over_local": t_b / t_a, "kv_moving_over_spread": t_c / t_b,
               "dist_bytes_per_step": dist_bytes, "dist_bytes_detail": traffic,
               "kv_moving_bytes_per_step": int(moved), "kv_remote_bytes_minimum": int(remote),
               "bytes_ratio_kv_moving_over_dist": moved / dist_bytes,
               "items_per_instance_local": items_a, "items_per_instance_spread": items_b,
               "max_abs_diff_spread_vs_kv_moving": diff}
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if not isinstance(v, (list, dict))}), flush=True)
        del s
    tp_row = host_row = bw = prefill = None
    if "tp" in points:
        tp_row = _tp_point(FLAGS.tp_context if not FLAGS.quick else contexts[-1], bs, Hq, Hkv, D,
                           iters, I)
        print(json.dumps(tp_row), flush=True)
    if "host" in points:
        host_row = _host_point(FLAGS.host_context if not FLAGS.quick else contexts[-1], bs, Hq,
                               Hkv, D, iters, I)
        print(json.dumps(host_row), flush=True)
    if "bandwidth" in points:
        bw = _bandwidth(bw_ctx, bs, Hq, Hkv, D, iters)
        print(json.dumps(bw), flush=True)
    if "prefill" in points:
        prefill = _prefill_point(*pre[:2], bs, *pre[2:], iters)
        print(json.dumps(prefill), flush=True)
    from distkv_jax.kernels.micro_attention import resolve_impl

    result = {"bench": "attention", "instances": I, "block_size": bs, "num_heads": Hq,
              "num_kv_heads": Hkv, "head_dim": D, "dtype": "float32", "sequences_per_step": I,
              "attention_impl": resolve_impl("auto"), "rows": rows, "bandwidth": bw,
              "prefill": prefill, "tp": tp_row, "host": host_row, "cpu": cpu_model(),
              "devices": len(jax.devices()),
              "machine": platform.machine(), "cpus": os.cpu_count(), "quick": FLAGS.quick}
    write_json(FLAGS.output_json, result)
    if FLAGS.output_png and rows:
        _plot(rows, FLAGS.output_png)


def _plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    ctx = [r["context"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("local_ms", "(a) all blocks local"), ("spread_ms", "(b) spread, DistAttention"),
                       ("kv_moving_ms", "(c) spread, move KV to owner")):
        ax1.plot(ctx, [r[key] for r in rows], marker="o", label=label)
    ax1.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="ms per decode step (1 layer)")
    ax1.legend()
    ax2.plot(ctx, [r["dist_bytes_per_step"] for r in rows], marker="o", label="DistAttention")
    ax2.plot(ctx, [r["kv_moving_bytes_per_step"] for r in rows], marker="o", label="move KV")
    ax2.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="bytes between instances per step")
    ax2.legend()
    fig.tight_layout()
    save_figure(fig, path)
