"""How many KV blocks an instance gets from an accelerator's free memory.

Plain Python (no JAX): the device's memory numbers come in as arguments.

The KV pool is allocated after the weights, so `bytes_in_use` already holds
them. What else must stay free while the engine runs:

  - the step's temporaries, estimated from the model and the step limits
    (`step_temp_bytes`): the largest step's gathered q/k/v and attention
    partials, one layer's activations (layers are scanned), the logits and
    their log-softmax, and MicroAttention's per-run partials for a long
    prefill chunk. XLA's buffer assignment keeps several temporaries alive at
    once: the estimate is doubled (TEMP_FACTOR);
  - a fixed RUNTIME_RESERVE for what no estimate sees: cuBLAS/cuDNN
    workspaces, XLA's autotuning scratch, collective buffers, the compiled
    programs' code and constants;
  - then `fraction` (kv_memory_fraction, 0.9) of what is left goes to KV: the
    remaining 10% absorbs fragmentation of XLA's allocator.

How it was chosen: TEMP_FACTOR = 2 bounds XLA's own accounting
(`compiled.memory_analysis().temp_size_in_bytes`) of every step program a
mixed workload compiles, with margin (tests/test_memory_budget.py checks that
on CPU, the estimate against the compiled programs); 1 GiB is the order of
cuBLAS's workspace plus NCCL's buffers on a Hopper GPU.
"""

from __future__ import annotations

import dataclasses

GiB = 1 << 30
RUNTIME_RESERVE = 1 * GiB
TEMP_FACTOR = 2.0
LONG_RUN = 64          # attention_plan.MAX_RUN: long contexts use long runs
MIN_KERNEL_ROWS = 16   # the GPU kernel pads a tile's rows to >= 16


@dataclasses.dataclass(frozen=True)
class StepLimits:
    """What bounds one step's size, per instance (tp shard)."""

    tokens: int           # rows per instance (max_num_batched_tokens, bucketed)
    instances: int        # I: q/k/v are gathered over the instances
    tp: int
    max_model_len: int    # the longest context a prefill chunk attends
    block_size: int
    prefill_q_tile: int


def step_temp_bytes(hidden: int, intermediate: int, vocab: int, num_heads: int,
                    num_kv_heads: int, head_dim: int, lim: StepLimits) -> int:
    """Temporaries of the largest step on one device, float32 activations
    (an over-estimate for bfloat16 models), before TEMP_FACTOR."""
    f32 = 4
    t, rows = lim.tokens, lim.instances * lim.tokens
    heads, kv_heads = max(1, num_heads // lim.tp), max(1, num_kv_heads // lim.tp)
    gathered = rows * (heads + 2 * kv_heads) * head_dim * f32
    merged = 3 * rows * heads * (head_dim + 1) * f32           # partials, all_to_all, merged
    layer = t * (4 * hidden + 3 * intermediate // lim.tp) * f32
    logits = 3 * t * vocab * f32                              # logits, log-softmax, top-k work
    # per-run partials of a prefill chunk at the end of the longest context
    tiles = -(-rows // lim.prefill_q_tile)
    runs = tiles * -(-lim.max_model_len // (lim.block_size * LONG_RUN))
    rows_pad = max(MIN_KERNEL_ROWS, lim.prefill_q_tile * max(1, heads // kv_heads))
    partials = runs * kv_heads * rows_pad * (head_dim + 1) * f32
    return gathered + merged + layer + logits + partials


def kv_blocks_for_memory(bytes_limit: int, bytes_in_use: int, block_bytes: int,
                         temp_bytes: int, fraction: float) -> int:
    """KV blocks that fit beside the temporaries and the runtime reserve."""
    free = bytes_limit - bytes_in_use - TEMP_FACTOR * temp_bytes - RUNTIME_RESERVE
    return max(0, int(free * fraction) // max(block_bytes, 1))
