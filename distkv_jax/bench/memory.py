"""This machine's memory bandwidth, measured two ways (shared by the benchmarks)."""

from __future__ import annotations

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
