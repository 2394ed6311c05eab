"""Control-plane planning throughput (no JAX).

Builds a distributed KV cache holding ``--total_tokens`` tokens of KV for
``--requests`` running requests over ``--instances`` instances (lengths drawn
log-normal with sigma ``--sigma``, fixed seed, scaled to the total; homes
round-robin, so long requests borrow), then times planning decode steps:
``prepare_step`` for every request (1 new token each; includes migration /
defrag planning, growth, slot mapping) plus the per-instance block views of
the batch. Prints a JSON line and writes it to ``--output_json``.
"""
from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
from absl import flags

from distkv_jax.kv_cache_manager import KVCacheManager
from distkv_jax.kv_types import KVCacheConfig

FLAGS = flags.FLAGS
flags.DEFINE_integer("requests", 256, "running requests")
flags.DEFINE_integer("total_tokens", 1 << 20, "tokens of KV held in total")
flags.DEFINE_integer("instances", 8, "serving instances")
flags.DEFINE_integer("block_size", 16, "tokens per KV block")
flags.DEFINE_float("headroom", 0.10, "spare device blocks, as a fraction of the KV held")
flags.DEFINE_float("sigma", 1.0, "log-normal sigma of request lengths")
flags.DEFINE_integer("steps", 50, "timed decode steps")
flags.DEFINE_integer("warmup", 5, "untimed decode steps")
flags.DEFINE_integer("seed", 0, "seed of the length draw")
flags.DEFINE_enum("kv_policy", "distributed", ["distributed", "local"], "KV policy")
flags.DEFINE_string("output_json", "bench_results/control_plane.json", "where to write the result")


def build(requests: int, total_tokens: int, instances: int, block_size: int,
          headroom: float, sigma: float, seed: int, kv_policy: str):
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=0.0, sigma=sigma, size=requests)
    lengths = np.maximum(1, np.floor(raw / raw.sum() * total_tokens)).astype(np.int64)
    lengths[0] += total_tokens - int(lengths.sum())  # exact total
    blocks_needed = int(sum(-(-int(n) // block_size) for n in lengths))
    per_inst = int(np.ceil(blocks_needed * (1 + headroom) / instances))
    cfg = KVCacheConfig(instances, per_inst, block_size=block_size,
                        kv_policy=kv_policy, lend_fraction=0.9)
    mgr = KVCacheManager(cfg)
    # Longest first. "distributed": homes round-robin, so the instances that
    # get the longest requests borrow. "local": each request goes to the
    # instance with the most free blocks (it cannot borrow).
    order = np.argsort(-lengths, kind="stable").tolist()
    for k, i in enumerate(order):
        mgr.admit(i, instance=k % instances if kv_policy == "distributed" else None)
        if kv_policy == "local":
            _grow(mgr, i, int(lengths[i]))
    if kv_policy == "distributed":
        for i in order:
            _grow(mgr, i, int(lengths[i]))
    return mgr, lengths


def _grow(mgr: KVCacheManager, rid, n: int) -> None:
    res = mgr.grow(rid, n)
    if res.status != "ok" or res.preemptions:
        raise RuntimeError(f"setup failed for request {rid}: {res.status}")


def run(mgr: KVCacheManager, steps: int, warmup: int) -> dict:
    rids = mgr.requests()
    times = []
    moved = preempted = 0
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        plan = mgr.prepare_step([(r, 1) for r in rids])
        batch = [x[0] for x in plan.scheduled]
        views = mgr.instance_views(batch)
        dt = time.perf_counter() - t0
        assert sum(v.block.shape[0] for v in views) > 0
        if s >= warmup:
            times.append(dt)
            moved += len(plan.moves)
            preempted += len(plan.preempted)
    t = np.asarray(times) * 1e3
    return {
        "step_ms_median": float(np.median(t)),
        "step_ms_mean": float(t.mean()),
        "step_ms_p90": float(np.percentile(t, 90)),
        "blocks_moved": moved,
        "preempted": preempted,
    }


def main(argv) -> None:
    del argv
    t0 = time.perf_counter()
    mgr, lengths = build(FLAGS.requests, FLAGS.total_tokens, FLAGS.instances,
                         FLAGS.block_size, FLAGS.headroom, FLAGS.sigma, FLAGS.seed,
                         FLAGS.kv_policy)
    setup_s = time.perf_counter() - t0
    remote0 = int(mgr.ledger().sum())
    res = run(mgr, FLAGS.steps, FLAGS.warmup)
    out = {
        "bench": "control_plane",
        "requests": FLAGS.requests,
        "total_tokens": int(lengths.sum()),
        "instances": FLAGS.instances,
        "block_size": FLAGS.block_size,
        "blocks_per_instance": mgr.config.blocks_per_instance,
        "kv_policy": FLAGS.kv_policy,
        "max_request_tokens": int(lengths.max()),
        "remote_blocks_at_start": remote0,
        "steps": FLAGS.steps,
        "setup_s": setup_s,
        **res,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    line = json.dumps(out, sort_keys=True)
    print(line)
    if FLAGS.output_json:
        d = os.path.dirname(FLAGS.output_json)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(FLAGS.output_json, "w") as f:
            f.write(line + "\n")
