"""float32 against bfloat16: the engine's step times on the same model.

    python -m distkv_jax.bench dtype [--shapes 21M,55M] [--quick]

For each model shape (random-weight Llamas built with transformers, as
`bench throughput` builds them) and each dtype, an LLM on a 1x1 mesh serves
--requests prompts of --prompt tokens, --new greedy tokens each: once to
compile, then timed. The dtypes alternate (float32, bfloat16, float32,
bfloat16) so that both meet the machine's drift alike; medians of the two
passes. Reported: the median decode step (ms, the engine's step log), the
median prefill step, generated tokens per second, and bfloat16 over float32.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import numpy as np
from absl import flags

from distkv_jax.bench.common import cpu_model, make_llama_dir, write_json

FLAGS = flags.FLAGS

SHAPES = {
    "21M": dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1536, vocab=8192),
    "55M": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408, vocab=32000),
    "quick": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512),
}


def define_flags() -> None:
    flags.DEFINE_list("shapes", ["21M", "55M"], f"model shapes: {', '.join(SHAPES)}")
    flags.DEFINE_integer("requests", 16, "requests")
    flags.DEFINE_integer("prompt", 128, "prompt tokens")
    flags.DEFINE_integer("new", 64, "new tokens")
    flags.DEFINE_integer("passes", 2, "timed passes per dtype (alternating)")
    flags.DEFINE_bool("quick", False, "tiny sizes (for the test suite)")
    flags.DEFINE_string("output_json", "bench_results/dtype.json", "result file")


def _run(path, dtype, prompts, new):
    from distkv_jax import LLM, SamplingParams

    blocks = len(prompts) * -(-(len(prompts[0]) + new) // 16) + 8
    llm = LLM(path, mesh="1x1", kv_blocks=blocks, block_size=16, warm_start=False, dtype=dtype,
              max_num_batched_tokens=512, max_num_seqs=len(prompts),
              enable_prefix_caching=False)  # the timed call repeats the prompts
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    llm.generate(prompts, params)                  # compiles
    eng = llm.engine
    eng.step_log.clear()
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    dec = [s for pf, d, s in eng.step_log if pf == 0 and d > 0]
    pre = [s for pf, d, s in eng.step_log if pf > 0]
    return {"decode_step_ms": float(np.median(dec)) * 1e3,
            "prefill_step_ms": float(np.median(pre)) * 1e3 if pre else None,
            "tok_per_s": len(prompts) * new / wall}


def main(argv) -> None:
    del argv
    shapes, n_req, prompt, new, passes = FLAGS.shapes, FLAGS.requests, FLAGS.prompt, FLAGS.new, FLAGS.passes
    if FLAGS.quick:
        shapes, n_req, prompt, new, passes = ["quick"], 4, 16, 8, 1
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            dims = SHAPES[name]
            path = os.path.join(tmp, name)
            make_llama_dir(path, dims)
            prompts = [rng.integers(3, dims["vocab"] - 1, size=prompt).tolist() for _ in range(n_req)]
            runs = {"float32": [], "bfloat16": []}
            for _ in range(passes):
                for dtype in runs:
                    runs[dtype].append(_run(path, dtype, prompts, new))
            row = {"shape": name, "model": dims}
            for dtype, rs in runs.items():
                row[dtype] = {k: (float(np.median([r[k] for r in rs])) if rs[0][k] is not None else None)
                              for k in rs[0]}
            row["bf16_over_f32_decode_step"] = (row["bfloat16"]["decode_step_ms"]
                                                / row["float32"]["decode_step_ms"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json(FLAGS.output_json, {"bench": "dtype", "rows": rows, "requests": n_req, "prompt": prompt,
                                   "new": new, "passes": passes, "cpu": cpu_model(),
                                   "cpus": os.cpu_count(), "machine": platform.machine(),
                                   "quick": FLAGS.quick})
