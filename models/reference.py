"""Reference forward and greedy generation on the dense, contiguous cache.

This is the path the distributed engine is checked against: a plain batch of
sequences, a [B, max_len] cache per layer, one jitted prefill and one jitted
decode step.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .attention import DenseKVCache, DenseMeta, make_dense_attention
from .config import ModelConfig
from .llama import LlamaForCausalLM


def dense_model(cfg: ModelConfig, dtype: Any = jnp.float32) -> LlamaForCausalLM:
    attention = make_dense_attention(1.0 / math.sqrt(cfg.head_dim), cfg.sliding_window)
    return LlamaForCausalLM(cfg, attention, dtype)


@functools.lru_cache(maxsize=None)
def _compiled(cfg: ModelConfig, dtype: Any):
    model = dense_model(cfg, dtype)

    @jax.jit
    def forward(params, tokens):
        batch, seq = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        cache = DenseKVCache.zeros(cfg.num_layers, batch, seq, cfg.num_kv_heads, cfg.head_dim, dtype)
        logits, _ = model.apply(params, tokens, positions, cache, DenseMeta(positions))
        return logits

    @functools.partial(jax.jit, donate_argnums=(3,))
    def step(params, tokens, positions, cache, last_index):
        logits, cache = model.apply(params, tokens, positions, cache, DenseMeta(positions),
                                    logits_index=last_index[:, None])
        logits = logits[:, 0].astype(jnp.float32)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jax.nn.log_softmax(logits), cache

    return forward, step


def forward_logits(cfg: ModelConfig, params: dict, tokens, dtype: Any = jnp.float32) -> jax.Array:
    """Logits [B, S, vocab] of full sequences (no padding), attending causally."""
    forward, _ = _compiled(cfg, dtype)
    return forward(params, jnp.asarray(tokens, jnp.int32))


def greedy_generate(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, dtype: Any = jnp.float32,
                    eos_token_ids: Sequence[int] = ()) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy decoding of a batch of prompts of different lengths.

    Returns per prompt the generated token ids and their logprobs. A sequence
    stops after emitting one of `eos_token_ids` (kept in the output).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    _, step = _compiled(cfg, dtype)
    batch = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max())
    tokens = np.zeros((batch, width), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    # Right padding: pad tokens write junk to slots >= the prompt length; each
    # slot is overwritten by the real token there before any query can see it.
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width))
    cache = DenseKVCache.zeros(cfg.num_layers, batch, width + max_new_tokens,
                               cfg.num_kv_heads, cfg.head_dim, dtype)
    next_tok, logp, cache = step(params, tokens, positions, cache, lengths - 1)

    out: list[list[int]] = [[] for _ in prompts]
    out_lp: list[list[float]] = [[] for _ in prompts]
    done = np.zeros(batch, bool)
    eos = set(int(e) for e in eos_token_ids)
    cur = lengths.copy()
    for i in range(max_new_tokens):
        nt = np.asarray(next_tok)
        lp = np.asarray(logp)
        for b in range(batch):
            if not done[b]:
                out[b].append(int(nt[b]))
                out_lp[b].append(float(lp[b, nt[b]]))
                done[b] = int(nt[b]) in eos
        if i == max_new_tokens - 1 or done.all():
            break
        next_tok, logp, cache = step(params, nt[:, None], cur[:, None], cache, np.zeros(batch, np.int32))
        cur = cur + 1
    return out, out_lp
