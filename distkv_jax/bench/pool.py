"""Does a step cost grow with the KV pool? Decode step time and step memory
at a small and a 16x larger pool, per mesh, in one process.

    python -m distkv_jax.bench pool [--meshes 1x1,2x1,1x2,2x2,2x4] [--quick]

For each mesh and each pool size (--kv_blocks, then --factor times as many
blocks per instance) an LLM on the model (default: the built-in tiny model,
2 KV heads, so 1x2 and 2x2 hold one KV head per device: the case that used to
copy the whole pool every step) generates --new greedy tokens for --requests
prompts of --prompt tokens, once to compile and once timed. Reported: the
median decode step (ms, from the engine's step log), the ratio large / small
pool (target <= 1.2), the compiled decode step's temporary memory
(XLA's memory analysis: what a step allocates besides its inputs, so a pool
copy shows up) and the pool's bytes per device.
"""

from __future__ import annotations

import json
import os
import platform

import numpy as np
from absl import flags

from distkv_jax.bench.common import cpu_model, write_json

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_list("meshes", ["1x1", "2x1", "1x2", "2x2", "2x4"], "meshes IxT")
    flags.DEFINE_integer("kv_blocks", 1024, "KV blocks per instance, small pool")
    flags.DEFINE_integer("factor", 16, "the large pool has this many times more blocks")
    flags.DEFINE_integer("block_size", 16, "tokens per block")
    flags.DEFINE_integer("requests", 4, "requests")
    flags.DEFINE_integer("prompt", 32, "prompt tokens")
    flags.DEFINE_integer("new", 64, "new tokens (decode steps)")
    flags.DEFINE_string("model", "tiny", "model directory")
    flags.DEFINE_bool("quick", False, "tiny sizes (for the test suite)")
    flags.DEFINE_string("output_json", "bench_results/pool.json", "result file")


def _decode_ms(llm, prompts, new) -> float:
    from distkv_jax import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    llm.generate(prompts, params)                  # compiles
    eng = llm.engine
    eng.step_log.clear()
    llm.generate(prompts, params)
    dec = [s for pf, d, s in eng.step_log if pf == 0 and d > 0]
    return float(np.median(dec)) * 1e3


def _step_memory(llm) -> dict:
    runner = llm.engine.runner
    shapes = [s for s in runner.shapes_run if s.q_tile == 1] or list(runner.shapes_run)
    shape = max(shapes, key=lambda s: (s.rows, s.runs))
    mem = runner.lower_step(shape).compile().memory_analysis()
    pool = runner.pools.k.addressable_shards[0].data
    return {"temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
            "pool_bytes_per_device": 2 * pool.size * pool.dtype.itemsize}


def main(argv) -> None:
    del argv
    meshes, small, factor, new = FLAGS.meshes, FLAGS.kv_blocks, FLAGS.factor, FLAGS.new
    if FLAGS.quick:
        meshes, small, new = ["1x2", "2x2"], 64, 8
    from distkv_jax.mesh import MeshShape, simulate_cpu_devices

    simulate_cpu_devices(max(MeshShape.parse(m).size for m in meshes))
    import jax

    from distkv_jax import LLM

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, size=FLAGS.prompt).tolist() for _ in range(FLAGS.requests)]
    rows = []
    for mesh in meshes:
        row = {"mesh": mesh}
        for name, blocks in (("small", small), ("large", small * factor)):
            llm = LLM(FLAGS.model, mesh=mesh, kv_blocks=blocks, block_size=FLAGS.block_size,
                      warm_start=False, max_num_batched_tokens=max(64, FLAGS.prompt * FLAGS.requests),
                      enable_prefix_caching=False)  # the timed call repeats the prompts
            row[name] = {"kv_blocks": blocks, "decode_step_ms": _decode_ms(llm, prompts, new),
                         **_step_memory(llm)}
            del llm
            jax.clear_caches()
        row["large_over_small_step"] = row["large"]["decode_step_ms"] / row["small"]["decode_step_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"bench": "pool", "rows": rows, "factor": factor, "model": FLAGS.model,
              "requests": FLAGS.requests, "prompt": FLAGS.prompt, "new": new,
              "cpu": cpu_model(), "cpus": os.cpu_count(), "machine": platform.machine(),
              "quick": FLAGS.quick}
    write_json(FLAGS.output_json, result)
