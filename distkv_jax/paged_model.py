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
from .kv_pool import PagedKVCache, PoolLayout
from .mesh import INST, TP
from .models.config import ModelConfig
from .models.llama import LlamaForCausalLM
from .models.loader import resolve_dtype


def pool_layout(cfg: ModelConfig, mesh: Mesh, blocks_per_instance: int, block_size: int) -> PoolLayout:
    return PoolLayout(cfg.num_layers, mesh.shape[INST], blocks_per_instance, block_size,
                      cfg.num_kv_heads, cfg.head_dim, mesh.shape[TP])


def paged_forward_fn(cfg: ModelConfig, mesh: Mesh, layout: PoolLayout, dtype: Any = "float32",
                     impl: str = "auto", interpret: bool = False, scan_layers: bool = True):
    """forward(params, tokens, positions, pools, meta, logits_index=None)
    -> (logits, pools), not yet jitted (the engine wraps it with sampling).
    scan_layers=False takes per-layer params (models.llama.unstack_layers)."""
    attn_cfg = DistAttentionConfig(layout, cfg.num_heads, 1.0 / math.sqrt(cfg.head_dim),
                                   impl=impl, interpret=interpret)
    model = LlamaForCausalLM(cfg, make_dist_attention(mesh, attn_cfg), resolve_dtype(dtype),
                            scan_layers=scan_layers)
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
