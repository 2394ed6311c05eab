"""The parameter layout: one table that maps every Flax parameter to its
Hugging Face tensor, target shape and logical axes.

Loading, sharding and checkpoint restore all read this table, so the three
cannot disagree about what a parameter is.
"""

from __future__ import annotations

import dataclasses

from .config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    path: tuple[str, ...]            # path in the Flax params tree (under "params")
    hf_name: str                     # HF tensor name; "{i}" is the layer index
    shape: tuple[int, ...]           # target shape (leading num_layers axis when per_layer)
    axes: tuple[str | None, ...]     # logical axis names, one per target dim
    transpose: bool = False          # HF Linear stores [out, in]; Flax Dense wants [in, out]
    per_layer: bool = False

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """Shape of one HF tensor (one layer's, for per-layer params)."""
        shape = self.shape[1:] if self.per_layer else self.shape
        return tuple(reversed(shape)) if self.transpose else shape


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    L, H = cfg.num_layers, cfg.hidden_size
    q_dim = cfg.num_heads * cfg.head_dim
    kv_dim = cfg.num_kv_heads * cfg.head_dim
    inter = cfg.intermediate_size
    pre = "model.layers.{i}."

    specs = [ParamSpec(("embed", "embedding"), "model.embed_tokens.weight",
                       (cfg.vocab_size, H), ("vocab_embed", "embed"))]

    def linear(name, hf, d_in, d_out, axes, bias):
        specs.append(ParamSpec(("layers", name, "kernel"), pre + hf + ".weight", (L, d_in, d_out),
                               ("layers",) + axes, transpose=True, per_layer=True))
        if bias:
            specs.append(ParamSpec(("layers", name, "bias"), pre + hf + ".bias", (L, d_out),
                                   ("layers", axes[1]), per_layer=True))

    linear("q_proj", "self_attn.q_proj", H, q_dim, ("embed", "heads"), cfg.qkv_bias)
    linear("k_proj", "self_attn.k_proj", H, kv_dim, ("embed", "kv_heads"), cfg.qkv_bias)
    linear("v_proj", "self_attn.v_proj", H, kv_dim, ("embed", "kv_heads"), cfg.qkv_bias)
    linear("o_proj", "self_attn.o_proj", q_dim, H, ("heads", "embed"), cfg.o_bias)
    linear("gate_proj", "mlp.gate_proj", H, inter, ("embed", "mlp"), cfg.mlp_bias)
    linear("up_proj", "mlp.up_proj", H, inter, ("embed", "mlp"), cfg.mlp_bias)
    linear("down_proj", "mlp.down_proj", inter, H, ("mlp", "embed"), cfg.mlp_bias)
    for name, hf in (("input_norm", "input_layernorm"),
                     ("post_attention_norm", "post_attention_layernorm")):
        specs.append(ParamSpec(("layers", name, "scale"), pre + hf + ".weight", (L, H),
                               ("layers", "norm"), per_layer=True))
    specs.append(ParamSpec(("final_norm", "scale"), "model.norm.weight", (H,), ("norm",)))
    if not cfg.tie_word_embeddings:
        specs.append(ParamSpec(("lm_head", "kernel"), "lm_head.weight", (H, cfg.vocab_size),
                               ("embed", "vocab"), transpose=True))
    return specs


def tree_from_specs(specs: list[ParamSpec], leaf_fn) -> dict:
    """Build the nested {"params": ...} dict with leaf_fn(spec) at each leaf."""
    tree: dict = {}
    for spec in specs:
        node = tree
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        node[spec.path[-1]] = leaf_fn(spec)
    return {"params": tree}
