"""KV sizing from accelerator memory: the step-temporaries estimate bounds
what XLA allocates for every step a mixed workload compiles, and the sizing
rule leaves the stated headroom (checked with a device that reports
memory_stats like a GPU does)."""

import types

import numpy as np
import pytest

from distkv_jax import LLM, SamplingParams
from distkv_jax import model_runner
from distkv_jax.attention_plan import bucket
from distkv_jax.memory_budget import (GiB, RUNTIME_RESERVE, TEMP_FACTOR, StepLimits,
                                      kv_blocks_for_memory, step_temp_bytes)


def _limits(llm) -> StepLimits:
    r = llm.engine.runner
    a = llm.engine.args if hasattr(llm.engine, "args") else r.args
    return StepLimits(tokens=bucket(a.max_num_batched_tokens), instances=r.layout.num_instances,
                      tp=r.layout.tp, max_model_len=a.max_model_len or r.cfg.max_position_embeddings,
                      block_size=r.layout.block_size, prefill_q_tile=r.prefill_q_tile)


@pytest.mark.parametrize("mesh,kw", [("2x2", {}), ("1x1", {"max_num_batched_tokens": 128})])
def test_estimate_bounds_compiled_step_temporaries(mesh, kw):
    llm = LLM("tiny", mesh=mesh, block_size=16, kv_blocks=64, warm_start=False,
              **{"max_num_batched_tokens": 32, **kw})
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (300, 90, 7, 1, 33)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, logprobs=2))
    r = llm.engine.runner
    c = r.cfg
    est = step_temp_bytes(c.hidden_size, c.intermediate_size, c.vocab_size, c.num_heads,
                          c.num_kv_heads, c.head_dim, _limits(llm))
    shapes = sorted(r.shapes_run, key=str)
    assert len(shapes) >= 2
    for shape in shapes:
        temp = r.lower_step(shape).compile().memory_analysis().temp_size_in_bytes
        assert temp <= TEMP_FACTOR * est, (shape, temp, est)


LLAMA3_8B = dict(hidden=4096, intermediate=14336, vocab=128256, num_heads=32, num_kv_heads=8,
                 head_dim=128)


def test_budget_on_an_h200_sized_device():
    """Llama-3-8B in bfloat16 on one 141 GB GPU (JAX preallocates 75%):
    the pool gets 90% of what is left after weights, 2x temporaries and 1 GiB."""
    lim = StepLimits(tokens=2048, instances=1, tp=1, max_model_len=131072, block_size=16,
                     prefill_q_tile=8)
    temps = step_temp_bytes(**LLAMA3_8B, lim=lim)
    # logits (3 x 2048 x 128K x 4 B = 3.2 GB) and the per-run partials of a
    # 2,048-token chunk at the end of a 128K context (32,768 runs: 4.3 GB)
    assert 6 * GiB < temps < 9 * GiB
    limit, weights = int(0.75 * 141e9), int(16.1e9)
    block = 32 * 16 * 8 * 128 * 2 * 2  # layers x slots x KV heads x D x (k, v) x bf16
    n = kv_blocks_for_memory(limit, weights, block, temps, 0.9)
    free = limit - weights - TEMP_FACTOR * temps - RUNTIME_RESERVE
    assert n == int(free * 0.9) // block
    assert n * block + TEMP_FACTOR * temps + RUNTIME_RESERVE + weights <= limit
    assert n * 16 > 450_000  # ~0.5M tokens of KV (131 KB per token)
    assert kv_blocks_for_memory(limit, limit - GiB, block, temps, 0.9) == 0


class _FakeGPU:
    """A device that reports memory like a GPU (CPU devices report none)."""

    platform = "cpu"

    def __init__(self, limit, in_use):
        self.stats = {"bytes_limit": limit, "bytes_in_use": in_use}

    def memory_stats(self):
        return self.stats


def test_runner_sizes_the_pool_from_memory_stats(monkeypatch):
    real = model_runner.jax.local_devices
    fake = types.SimpleNamespace(limit=RUNTIME_RESERVE + 64 * 2**20)

    def local_devices(*a, **k):
        devs = real(*a, **k)
        return [_FakeGPU(fake.limit, 0)] + list(devs[1:])

    monkeypatch.setattr(model_runner.jax, "local_devices", local_devices)
    llm = LLM("tiny", mesh="1x1", block_size=16, warm_start=False, max_num_batched_tokens=32)
    r = llm.engine.runner
    c = r.cfg
    temps = step_temp_bytes(c.hidden_size, c.intermediate_size, c.vocab_size, c.num_heads,
                            c.num_kv_heads, c.head_dim, _limits(llm))
    per_block = r.layout.bytes(r.dtype) // r.layout.blocks_per_instance
    expect = kv_blocks_for_memory(fake.limit, 0, per_block, temps, r.args.kv_memory_fraction)
    cap = -(-r.args.max_num_seqs * c.max_position_embeddings // 16)
    assert r.layout.blocks_per_instance == min(expect, cap) > 0
    fake.limit = RUNTIME_RESERVE  # nothing left beside the reserve: a clear error
    with pytest.raises(ValueError, match="no device memory left for KV"):
        LLM("tiny", mesh="1x1", block_size=16, warm_start=False, max_num_batched_tokens=32)
