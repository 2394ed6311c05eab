"""The model forward on the paged, mesh-distributed KV pool.

Binds the Flax model's attention boundary to DistAttention and jits one
forward step: tokens [I, T] (row block i is instance i's batch), positions
[I, T], the pools (donated: updated in place) and the step's DistMeta.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .dist_attention import DistAttentionConfig, DistMeta, make_dist_attention
from .kernels.dense import PACKED_IMPLS, dense, dense_silu_mul
from .kv_pool import PagedKVCache, PoolLayout
from .mesh import INST, TP
from .models.config import ModelConfig
from .models.llama import LlamaForCausalLM
from .models.loader import resolve_dtype


def pool_layout(cfg: ModelConfig, mesh: Mesh, blocks_per_instance: int, block_size: int) -> PoolLayout:
    return PoolLayout(cfg.num_layers, mesh.shape[INST], blocks_per_instance, block_size,
                      cfg.num_kv_heads, cfg.head_dim, mesh.shape[TP])


def packed_dense_fn(mesh: Mesh, impl: str):
    """The model's dense layer over packed kernels (kernels/dense.py, impl
    "native" or "reference"). The kernel is a custom call XLA cannot
    partition, so on a mesh it runs per device under shard_map: each
    instance's rows (the leading axis, sharded over `inst`) times the
    replicated weights (tp = 1)."""
    def local(x, packed, n, silu_mul=False):
        return (dense_silu_mul if silu_mul else dense)(x, packed, n, impl)

    if mesh.size == 1:
        return local

    def fn(x, packed, n, silu_mul=False):
        spec = P(INST, *([None] * (x.ndim - 1)))
        return jax.shard_map(lambda xl, wl: local(xl, wl, n, silu_mul), mesh=mesh,
                             in_specs=(spec, P()), out_specs=spec, check_vma=False)(x, packed)

    return fn


def paged_forward_fn(cfg: ModelConfig, mesh: Mesh, layout: PoolLayout, dtype: Any = "float32",
                     impl: str = "auto", interpret: bool = False, scan_layers: bool = True,
                     dense_impl: str = "xla"):
    """forward(params, tokens, positions, pools, meta, logits_index=None)
    -> (logits, pools), not yet jitted (the engine wraps it with sampling).
    scan_layers=False takes per-layer params (models.llama.unstack_layers);
    dense_impl "native" or "reference" takes packed dense kernels
    (models.llama.pack_dense_kernels), "xla" the kernels as loaded."""
    attn_cfg = DistAttentionConfig(layout, cfg.num_heads, 1.0 / math.sqrt(cfg.head_dim),
                                   impl=impl, interpret=interpret)
    packed = packed_dense_fn(mesh, dense_impl) if dense_impl in PACKED_IMPLS else None
    model = LlamaForCausalLM(cfg, make_dist_attention(mesh, attn_cfg), resolve_dtype(dtype),
                            scan_layers=scan_layers, packed_dense=packed)
    rows = NamedSharding(mesh, P(INST, None))

    def forward(params, tokens, positions, pools: PagedKVCache, meta: DistMeta, logits_index=None):
        # Each instance's rows stay on that instance through the dense layers.
        tokens = jax.lax.with_sharding_constraint(tokens, rows)
        positions = jax.lax.with_sharding_constraint(positions, rows)
        return model.apply(params, tokens, positions, pools, meta, logits_index=logits_index)

    return forward


def make_paged_forward(cfg: ModelConfig, mesh: Mesh, layout: PoolLayout, dtype: Any = "float32",
                       impl: str = "auto", interpret: bool = False):
    """jitted forward(params, tokens, positions, pools, meta, logits_index=None)
    -> (logits, pools), pools donated."""
    return jax.jit(paged_forward_fn(cfg, mesh, layout, dtype, impl, interpret), donate_argnums=(3,))
