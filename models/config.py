"""Model configuration for the Llama family (Llama 2/3/3.1, Mistral, Qwen2).

`ModelConfig.from_hf` reads a Hugging Face ``config.json`` (both the
transformers v4 layout with ``rope_theta`` / ``rope_scaling`` and the v5 layout
with ``rope_parameters``) and refuses anything this implementation would get
wrong, with a message that says what is unsupported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented."""


# architectures name -> model_type, for the families we implement.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF ``rope_parameters``)."""

    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies (float64 numpy), following transformers' rope init functions."""
        inv = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        if self.kind == "default":
            return inv
        if self.kind == "linear":
            return inv / self.factor
        if self.kind == "llama3":
            old_len = self.original_max_position_embeddings
            low_wavelen = old_len / self.low_freq_factor
            high_wavelen = old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            # Long wavelengths are slowed by `factor`, short ones are kept,
            # the band between is interpolated smoothly.
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old_len / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled)
        raise UnsupportedModelError(f"rope type {self.kind!r} is not supported")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        archs = list(hf.get("architectures") or [])
        model_type = hf.get("model_type")
        known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if archs and not known:
            raise UnsupportedModelError(
                f"unsupported architecture {archs}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if model_type not in SUPPORTED_ARCHITECTURES.values():
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r}; supported: "
                f"{sorted(set(SUPPORTED_ARCHITECTURES.values()))}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")

        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // num_heads

        # Qwen2 uses a sliding window only when use_sliding_window is set;
        # Mistral uses it whenever sliding_window is set.
        window = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            window = None

        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            # Llama's attention_bias covers q, k, v and o; Qwen2 has q, k, v bias only.
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None,
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json in model directory {model_dir}")
        with open(path) as f:
            return cls.from_hf(json.load(f))


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    # transformers v5 writes rope_parameters (theta inside); v4 writes
    # rope_theta plus an optional rope_scaling dict.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(
            f"rope scaling type {kind!r} is not supported (default, linear, llama3)"
        )
    fields = dict(theta=float(theta), kind=kind)
    if kind in ("linear", "llama3"):
        fields["factor"] = float(params["factor"])
    if kind == "llama3":
        fields["low_freq_factor"] = float(params["low_freq_factor"])
        fields["high_freq_factor"] = float(params["high_freq_factor"])
        fields["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(**fields)
