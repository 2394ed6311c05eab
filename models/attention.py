"""The attention boundary between the model and the KV cache.

Every decoder layer calls exactly one function with this signature:

    attention_fn(q, k, v, cache, meta) -> (out, new_cache)

    q:      [B, S, num_heads, head_dim]     (rotary already applied)
    k, v:   [B, S, num_kv_heads, head_dim]  (the new tokens' keys/values)
    cache:  a LayerCache handle: the whole cache pytree (every leaf has a
            leading num_layers axis) plus this layer's index. The cache is
            the carry of the layer scan, so writes update it in place instead
            of copying a per-layer slice in and out every step.
    meta:   per-step metadata shared by all layers (positions, block tables,
            ...), opaque to the model
    out:    [B, S, num_heads, head_dim]

The model never looks inside `cache` or `meta`, so a different cache
(the paged, mesh-distributed pool of DistAttention) plugs in here without
touching model code. This module holds the reference backend: a dense,
contiguous per-sequence cache with causal attention.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp


class LayerCache(NamedTuple):
    """The cache handle one layer sees: the full stacked cache and its layer index."""

    cache: Any
    layer: jax.Array


class AttentionFn(Protocol):
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, cache: LayerCache, meta: Any
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

    def dense_attention(q, k, v, handle: LayerCache, meta: DenseMeta):
        full, layer = handle
        positions = meta.positions
        b_idx = jnp.arange(q.shape[0])[:, None]
        k_full = full.k.at[layer, b_idx, positions].set(k.astype(full.k.dtype), mode="drop")
        v_full = full.v.at[layer, b_idx, positions].set(v.astype(full.v.dtype), mode="drop")
        k_cache, v_cache = k_full[layer], v_full[layer]

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
        return out.reshape(batch, seq, num_heads, head_dim), DenseKVCache(k_full, v_full)

    return dense_attention
