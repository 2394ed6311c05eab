"""The attention boundary between the model and the KV cache.

Every decoder layer calls exactly one function with this signature:

    attention_fn(q, k, v, layer_cache, meta) -> (out, new_layer_cache)

    q:            [B, S, num_heads, head_dim]     (rotary already applied)
    k, v:         [B, S, num_kv_heads, head_dim]  (the new tokens' keys/values)
    layer_cache:  this layer's slice of the cache pytree (the model scans the
                  leading layer axis of the whole cache)
    meta:         per-step metadata shared by all layers (positions, block
                  tables, ...), opaque to the model
    out:          [B, S, num_heads, head_dim]

The model never looks inside `layer_cache` or `meta`, so a different cache
(the paged, mesh-distributed pool of DistAttention) plugs in here without
touching model code. This module holds the reference backend: a dense,
contiguous per-sequence cache with causal attention.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp


class AttentionFn(Protocol):
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, layer_cache: Any, meta: Any
                 ) -> tuple[jax.Array, Any]: ...


class DenseKVCache(NamedTuple):
    """Contiguous cache: k, v of shape [num_layers, B, max_len, num_kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> "DenseKVCache":
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class DenseMeta(NamedTuple):
    """positions[b, s]: absolute position of token s of sequence b (its cache slot)."""

    positions: jax.Array


def make_dense_attention(scale: float, sliding_window: int | None = None) -> AttentionFn:
    """Dense causal attention over a contiguous cache.

    New k, v are written at their positions first, then each query attends to
    every cache slot at or before its own position. Slots after a query's
    position may hold stale or padding data; the mask hides them.
    """

    def dense_attention(q, k, v, layer_cache, meta: DenseMeta):
        k_cache, v_cache = layer_cache
        positions = meta.positions
        b_idx = jnp.arange(q.shape[0])[:, None]
        k_cache = k_cache.at[b_idx, positions].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[b_idx, positions].set(v.astype(v_cache.dtype), mode="drop")

        batch, seq, num_heads, head_dim = q.shape
        num_kv = k_cache.shape[2]
        groups = num_heads // num_kv
        qg = q.reshape(batch, seq, num_kv, groups, head_dim)
        scores = jnp.einsum("bskgd,btkd->bkgst", qg, k_cache.astype(q.dtype)) * scale
        key_pos = jnp.arange(k_cache.shape[1])
        visible = key_pos[None, None, :] <= positions[:, :, None]          # [B, S, T]
        if sliding_window is not None:
            visible &= positions[:, :, None] - key_pos[None, None, :] < sliding_window
        scores = jnp.where(visible[:, None, None], scores.astype(jnp.float32), -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgst,btkd->bskgd", probs, v_cache.astype(q.dtype))
        return out.reshape(batch, seq, num_heads, head_dim), DenseKVCache(k_cache, v_cache)

    return dense_attention
