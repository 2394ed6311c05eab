"""Logical-axis -> mesh-axis rules for the model parameters.

Weights are replicated over the mesh axis `inst` (every instance holds a full
copy) and tensor-parallel over `tp`: attention heads, KV heads and MLP columns
are split over `tp`; norms and the input embedding are replicated.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import ModelConfig
from .params import ParamSpec, param_specs, tree_from_specs

INST, TP = "inst", "tp"


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    layers: str | None = None
    embed: str | None = None
    norm: str | None = None
    vocab_embed: str | None = None
    vocab: str | None = TP
    heads: str | None = TP
    kv_heads: str | None = TP
    mlp: str | None = TP

    def spec(self, axes: tuple[str | None, ...]) -> P:
        return P(*(None if a is None else getattr(self, a) for a in axes))


def rules_for(cfg: ModelConfig, tp: int) -> ShardingRules:
    """Rules for a given tp size, refusing head counts that `tp` cannot split."""
    if cfg.num_heads % tp:
        raise ValueError(
            f"mesh tp={tp} does not divide num_attention_heads={cfg.num_heads}; "
            f"choose tp among the divisors of {cfg.num_heads}"
        )
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise ValueError(
            f"mesh tp={tp} and num_key_value_heads={cfg.num_kv_heads}: one must divide the other "
            "(KV heads are split over tp, or replicated when there are fewer than tp)"
        )
    if cfg.intermediate_size % tp:
        raise ValueError(f"mesh tp={tp} does not divide intermediate_size={cfg.intermediate_size}")
    return ShardingRules(
        kv_heads=TP if cfg.num_kv_heads % tp == 0 else None,
        # An odd vocabulary stays replicated rather than failing.
        vocab=TP if cfg.vocab_size % tp == 0 else None,
    )


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    """NamedSharding for every parameter, in the params tree layout."""
    rules = rules_for(cfg, mesh.shape[TP])
    return tree_from_specs(param_specs(cfg), lambda s: NamedSharding(mesh, rules.spec(s.axes)))


def spec_sharding(spec: ParamSpec, rules: ShardingRules, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, rules.spec(spec.axes))
