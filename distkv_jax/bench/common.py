"""Shared by the benchmarks: timing, this machine's memory bandwidth, result files."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np


def median_time(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def stream_read_bandwidth(iters: int = 5, gib: float = 1.0) -> dict:
    """Bytes per second of a streaming read of `gib` GiB: XLA (jnp.sum on one
    device; XLA may use every core) and numpy (one thread)."""
    import jax
    import jax.numpy as jnp

    n = int(gib * (1 << 28))  # float32 elements
    dev = jax.devices()[0]
    big = jax.jit(lambda: jax.random.uniform(jax.random.key(0), (n,)),
                  out_shardings=jax.sharding.SingleDeviceSharding(dev))()
    total = jax.jit(jnp.sum)
    total(big).block_until_ready()
    xla = big.nbytes / median_time(lambda: total(big).block_until_ready(), iters)
    del big
    host = np.random.default_rng(0).random(n, np.float32)
    host.sum()
    numpy_bw = host.nbytes / median_time(lambda: host.sum(), iters)
    return {"xla_stream_read_GBps": xla / 1e9, "numpy_1thread_read_GBps": numpy_bw / 1e9}


def write_json(path: str, result: dict) -> None:
    """Write a result file ('' or None: skip)."""
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def pyplot():
    """matplotlib.pyplot with a file backend, or None (with a note) when the
    bench extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)


def cpu_model() -> str:
    """The CPU's model name (figures are only comparable on one machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def make_llama_dir(path: str, dims: dict) -> None:
    """A random-weight Llama (transformers, seed 0) saved as a Hugging Face
    directory; dims: hidden, layers, heads, kv_heads, intermediate, vocab
    (optional: max_position, save_dtype)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=dims.get("max_position", 4096), initializer_range=0.05,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    if dims.get("save_dtype") == "bfloat16":  # half the bytes on disk and to load
        model = model.to(torch.bfloat16)
    model.save_pretrained(path)


def take_turns(runs, slice_steps: int) -> None:
    """Advance every run (objects with done() and advance(steps)) to its end,
    slice_steps engine steps each in turn, round robin, the first to go
    rotating: a slow spell of this shared machine falls on all alike. As a
    serving process does after start-up (vLLM freezes its heap), what is
    alive now is left out of the collector's full passes, whose pauses
    would otherwise land on whichever run happens to be going."""
    import gc

    gc.collect()
    gc.freeze()
    try:
        turn = 0
        while any(not r.done() for r in runs):
            for j in range(len(runs)):
                r = runs[(turn + j) % len(runs)]
                if not r.done():
                    r.advance(slice_steps)
            turn += 1
    finally:
        gc.unfreeze()


def long_tiny_model(max_len: int) -> str:
    """The tiny model with max_position_embeddings >= max_len (same weights)."""
    from distkv_jax.models.tiny import tiny_model_dir

    src = tiny_model_dir()
    dst = f"{src}-pos{max_len}"
    if not os.path.exists(os.path.join(dst, "config.json")):
        tmp = f"{dst}.tmp-{os.getpid()}"
        shutil.copytree(src, tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            cfg = json.load(f)
        cfg["max_position_embeddings"] = max_len
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        try:
            os.rename(tmp, dst)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return dst
