"""Flax Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2).

Mirrors transformers' `LlamaForCausalLM`: RMSNorm -> attention (GQA, rotary,
optional q/k/v bias) -> residual -> RMSNorm -> SwiGLU MLP -> residual, with the
decoder layers stacked and run by `nn.scan` so one layer body is compiled once.

Attention goes through `attention_fn` (see `models/attention.py`): the model
computes q, k, v and hands them with the layer's cache slice to that function.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..kernels.dense import pack_gate_up, silu_mul
from .attention import AttentionFn, LayerCache
from .config import ModelConfig


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        # Normalize in float32, cast back, then scale (as transformers does).
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale * xf.astype(x.dtype)


def rotary_cos_sin(positions: jax.Array, inv_freq: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [..., head_dim] for integer positions [...]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, S, H, D]; cos, sin: [B, S, D]. Half-split (rotate_half) convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _accumulate_f32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                    **kw):
    """dot_general accumulating in float32, result in the inputs' dtype (as a
    bfloat16 matmul in PyTorch rounds once at the end). For bfloat16 it also
    lets XLA:CPU multiply bfloat16 directly instead of converting every weight
    to float32 on every step."""
    del preferred_element_type
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=jnp.float32, **kw)
    return out.astype(jnp.result_type(lhs, rhs))


# x [..., K], packed kernel, N -> [..., N]: a dense layer over weights packed
# by `pack_dense_kernels` (kernels/dense.py), given by the engine. With
# silu_mul=True the kernel is the MLP's gate and up packed together
# (dense.pack_gate_up) and the result is silu(x @ gate) * (x @ up).
PackedDenseFn = Callable[..., jax.Array]


class Dense(nn.Module):
    """nn.Dense's layer (params "kernel" [K, N], "bias" [N], the same
    initializers), whose kernel may instead come packed, in the variable
    collection "packed", for `packed_dense` (the native bfloat16 CPU kernel).
    In bfloat16 the product accumulates in float32 either way."""

    features: int
    use_bias: bool
    dtype: Any = jnp.float32
    packed_dense: PackedDenseFn | None = None

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        if self.has_variable("packed", "kernel"):
            if self.packed_dense is None:
                raise ValueError(f"{self.name}: the kernel is packed, but the model was built "
                                 "without a packed_dense function")
            y = self.packed_dense(x, self.get_variable("packed", "kernel"), self.features)
        else:
            kernel = self.param("kernel", nn.initializers.lecun_normal(),
                                (x.shape[-1], self.features), self.dtype)
            dims = (((x.ndim - 1,), (0,)), ((), ()))
            if jnp.dtype(self.dtype) == jnp.dtype(jnp.float32):
                y = jax.lax.dot_general(x, kernel.astype(self.dtype), dims)
            else:
                y = _accumulate_f32(x, kernel.astype(self.dtype), dims)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.dtype)
            y = y + bias.astype(self.dtype)
        return y


class DecoderLayer(nn.Module):
    config: ModelConfig
    attention_fn: AttentionFn
    dtype: Any = jnp.float32
    packed_dense: PackedDenseFn | None = None

    def _dense(self, features: int, bias: bool, name: str) -> Dense:
        return Dense(features, bias, self.dtype, self.packed_dense, name=name)

    @nn.compact
    def __call__(self, carry, layer, cos, sin, meta):
        h, cache = carry
        cfg = self.config
        batch, seq, _ = h.shape
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_norm")(h)
        q = self._dense(cfg.num_heads * cfg.head_dim, cfg.qkv_bias, "q_proj")(x)
        k = self._dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, "k_proj")(x)
        v = self._dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, "v_proj")(x)
        q = apply_rotary(q.reshape(batch, seq, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rotary(k.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = v.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)

        attn, cache = self.attention_fn(q, k, v, LayerCache(cache, layer), meta)
        attn = attn.reshape(batch, seq, cfg.num_heads * cfg.head_dim)
        h = h + self._dense(cfg.hidden_size, cfg.o_bias, "o_proj")(attn)

        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_norm")(h)
        if self.has_variable("packed", "gate_up"):  # one fused call (pack_dense_kernels)
            act = self.packed_dense(x.astype(self.dtype), self.get_variable("packed", "gate_up"),
                                    cfg.intermediate_size, silu_mul=True)
        else:
            gate = self._dense(cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x)
            up = self._dense(cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x)
            act = silu_mul(gate, up)
        h = h + self._dense(cfg.hidden_size, cfg.mlp_bias, "down_proj")(act)
        return (h, cache), None


class LlamaForCausalLM(nn.Module):
    """tokens, positions: [B, S] int32 -> (logits, new cache).

    `cache` is any pytree whose leaves have a leading num_layers axis; it is
    carried through the layer scan and each layer gets it with its index. `logits_index` ([B, K], optional) selects which
    positions of each row get logits, so decode steps skip the vocab
    projection of positions nobody samples from.
    """

    config: ModelConfig
    attention_fn: AttentionFn
    dtype: Any = jnp.float32
    # True: layers stacked ([L, ...] params) under nn.scan, one compiled body.
    # False: layers_0 .. layers_{L-1} applied in a Python loop: each layer's
    # weights are their own arrays, so no per-step copy of a weight slice out
    # of the stack (XLA:CPU copies it; about a quarter of a decode step).
    scan_layers: bool = True
    # set when dense kernels come packed (`pack_dense_kernels`)
    packed_dense: PackedDenseFn | None = None

    @nn.compact
    def __call__(self, tokens, positions, cache, meta, logits_index=None):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                         param_dtype=self.dtype, name="embed")
        h = embed(tokens)
        inv_freq = jnp.asarray(cfg.rope.inv_freq(cfg.head_dim), jnp.float32)
        cos, sin = rotary_cos_sin(positions, inv_freq, self.dtype)

        if self.scan_layers:
            layers = nn.scan(
                DecoderLayer,
                variable_axes={"params": 0, "packed": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
            )(cfg, self.attention_fn, self.dtype, self.packed_dense, name="layers")
            (h, cache), _ = layers((h, cache), jnp.arange(cfg.num_layers, dtype=jnp.int32),
                                   cos, sin, meta)
        else:
            for i in range(cfg.num_layers):
                layer = DecoderLayer(cfg, self.attention_fn, self.dtype, self.packed_dense,
                                     name=f"layers_{i}")
                (h, cache), _ = layer((h, cache), i, cos, sin, meta)

        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="final_norm")(h)
        if logits_index is not None:
            h = jnp.take_along_axis(h, logits_index[..., None], axis=1)
        if cfg.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = Dense(cfg.vocab_size, False, self.dtype, self.packed_dense,
                           name="lm_head")(h)
        return logits, cache


def unstack_layers(params, num_layers: int):
    """Stacked params (`layers`, leading [L] axis) -> per-layer `layers_i`
    (the scan_layers=False layout). Each slice keeps its array's sharding."""
    inner = dict(params["params"])
    stacked = inner.pop("layers")
    for i in range(num_layers):
        inner[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "params": inner}


def pack_dense_kernels(variables, pack):
    """Every dense layer's "kernel" [K, N] (stacked: [L, K, N]) moved from
    "params" to the "packed" collection at the same path, as pack(kernel)
    (kernels/dense.py's layout; applied per layer to stacked kernels); an
    MLP's gate_proj and up_proj without biases are replaced by one
    "gate_up" (dense.pack_gate_up)."""
    def split(tree):
        params, packed = {}, {}
        for name, value in tree.items():
            if isinstance(value, dict):
                p, k = split(value)
                if p:
                    params[name] = p
                if k:
                    packed[name] = k
            elif name == "kernel":
                packed[name] = pack(value) if value.ndim == 2 else jax.vmap(pack)(value)
            else:
                params[name] = value
        return params, packed

    def fuse_mlp(packed, params):
        # gate and up without biases: one array, panels alternating (the
        # fused silu(gate) * up call reads both for one pass over x)
        for name, value in list(packed.items()):
            if isinstance(value, dict):
                fuse_mlp(value, params.get(name, {}))
        g, u = packed.get("gate_proj"), packed.get("up_proj")
        if g is not None and u is not None and "gate_proj" not in params \
                and "up_proj" not in params:  # (a bias would stay in params)
            packed["gate_up"] = pack_gate_up(g.pop("kernel"), u.pop("kernel"))
            del packed["gate_proj"], packed["up_proj"]

    params, packed = split(dict(variables["params"]))
    fuse_mlp(packed, params)
    return {**variables, "params": params, "packed": packed}
