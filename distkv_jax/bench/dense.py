"""bfloat16 dense layers: XLA's dot against the native kernel over packed
weights (kernels/dense.py), side by side per shape.

    python -m distkv_jax.bench dense [--quick]

Shapes: the 55M bench model's layers (hidden 512, MLP 1,408, 2 KV heads of
64, vocab 32,000) at decode row counts (1, 8, 16) and prefill row counts
(512, 2,048). Each configuration is jitted alone; the two take turns, best
of `--repeats` timed loops. Reported: time per call, weight GB/s (decode:
the weights are the stream) and GFLOP/s, and the largest difference from a
float64 product of the same bfloat16 values (both round once to bfloat16).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from distkv_jax.bench.common import cpu_model, write_json
from distkv_jax.kernels import dense as D
from distkv_jax.kernels import native

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 5, "timed loops per configuration (best reported)")
flags.DEFINE_bool("quick", False, "two small shapes (for the test suite)")
flags.DEFINE_string("output_json", "bench_results/dense.json", "result file")

SHAPES = [(1, 512, 32000), (8, 512, 32000), (16, 512, 32000), (16, 512, 1408),
          (16, 1408, 512), (16, 512, 128), (512, 512, 1408), (512, 1408, 512),
          (2048, 512, 1408)]
QUICK_SHAPES = [(4, 64, 96), (40, 96, 64)]


def _xla(x, w):
    y = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(jnp.bfloat16)


def _time(f, args, loops: int, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            out = f(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / loops)
    return best


def main(argv) -> None:
    del argv
    if not native.available():
        raise SystemExit(f"the native kernels are unavailable: {native.error()}")
    rng = np.random.default_rng(0)
    xla = jax.jit(_xla)
    nat = jax.jit(D.dense_native, static_argnums=2)
    rows = []
    for m, k, n in (QUICK_SHAPES if FLAGS.quick else SHAPES):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
        packed = D.pack(w)
        exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
        err = {name: float(np.abs(np.asarray(y, np.float64) - exact).max())
               for name, y in (("xla", xla(x, w)), ("native", nat(x, packed, n)))}
        loops = max(3, min(200, int(2e8 // (m * k * n))))
        t_x = t_n = float("inf")
        for _ in range(2):  # the two take turns
            t_x = min(t_x, _time(xla, (x, w), loops, FLAGS.repeats))
            t_n = min(t_n, _time(nat, (x, packed, n), loops, FLAGS.repeats))
        row = {"m": m, "k": k, "n": n, "xla_us": t_x * 1e6, "native_us": t_n * 1e6,
               "native_over_xla": t_x / t_n,
               "xla_weight_GBps": 2 * k * n / t_x / 1e9, "native_weight_GBps": 2 * k * n / t_n / 1e9,
               "xla_GFLOPs": 2 * m * k * n / t_x / 1e9, "native_GFLOPs": 2 * m * k * n / t_n / 1e9,
               "max_abs_err_xla": err["xla"], "max_abs_err_native": err["native"]}
        rows.append(row)
        print(json.dumps({a: round(b, 3) if isinstance(b, float) else b for a, b in row.items()}),
              flush=True)
    write_json(FLAGS.output_json, {"bench": "dense", "quick": FLAGS.quick, "rows": rows,
                                   "cpu": cpu_model(), "cpus": os.cpu_count(),
                                   "vectorized": native.dense_vectorized(),
                                   "jax": jax.__version__})
