"""Every engine setting, declared once (plain Python, no JAX).

`EngineArgs` is the one place a setting lives: `LLM(model, **kwargs)` and
`AsyncLLM(model, **kwargs)` accept exactly its fields, the launcher's absl
flags are generated from it (`define_flags`, help text included), and the
KV, scheduler and pool configs are derived from it here. Names follow vLLM
where vLLM has the setting (`max_num_seqs`, `max_num_batched_tokens`,
`block_size`, `max_model_len`, `seed`, `dtype`).

Every field is checked on construction; an invalid value raises ValueError
naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

from .kv_types import POLICIES, KVCacheConfig
from .mesh import MeshShape
from .policy import PolicyConfig

DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "native", "reference", "pallas")
DENSE_IMPLS = ("auto", "xla", "native", "reference")  # kernels/dense.py IMPLS
CACHE_ENV = "DISTKV_CACHE"


def _field(default, help: str, choices: tuple | None = None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class EngineArgs:
    model: str = _field("tiny", "Hugging Face model directory, orbax checkpoint directory "
                        "(python -m distkv_jax.convert), or 'tiny' (the built-in model)")
    mesh: str = _field("1x1", "device mesh IxT (instances x tensor-parallel)")
    dtype: str = _field("float32", "compute, weight and KV dtype", DTYPES)
    block_size: int = _field(16, "tokens per KV block")
    kv_blocks: int | None = _field(None, "KV blocks per instance (default: from free memory)")
    host_kv_blocks: int = _field(0, "host-memory KV blocks per instance (swap space, and "
                                 "host-attended KV)")
    host_attention: bool = _field(True, "a running request's full, older KV blocks may live in "
                                  "host memory (host_kv_blocks) and be attended there by the "
                                  "host CPU, before anyone is preempted")
    kv_policy: str = _field("distributed", "distributed: requests may borrow KV blocks of other "
                            "instances; local: each request is confined to its instance", POLICIES)
    lend_fraction: float = _field(1.0, "share of an instance's KV blocks it may lend at once "
                                  "(1.0: any free block; lent blocks are taken back when the "
                                  "lender needs them)")
    migrate_tokens_per_step: int = _field(16, "KV migrated toward its home per step, in tokens "
                                          "(rounded up to whole blocks; 0: no migration)")
    enable_prefix_caching: bool = _field(True, "reuse the KV of cached prompt prefixes (full "
                                         "blocks, hashed), held on any instance under "
                                         "kv_policy=distributed, on the request's own under local")
    kv_memory_fraction: float = _field(0.9, "share of free accelerator memory used for KV when "
                                       "kv_blocks is not given")
    max_num_seqs: int = _field(64, "running sequences per instance")
    max_num_batched_tokens: int = _field(256, "tokens per step per instance")
    long_prefill_token_threshold: int = _field(0, "a request whose remaining prefill is over "
                                               "this many tokens is long (0: "
                                               "max_num_batched_tokens); while other requests "
                                               "are live a long prefill takes at most this many "
                                               "rows a step, after decodes and short prefills")
    long_prefill_min_tokens: int = _field(0, "rows a long prefill gets every step before short "
                                          "prefills take theirs, so it always progresses (0: "
                                          "a quarter of the threshold, at least a block)")
    max_num_partial_prefills: int = _field(0, "most requests prefilling at once (0: "
                                           "max_num_seqs); a new request over it waits, others "
                                           "may pass it")
    max_long_partial_prefills: int = _field(1, "most long requests prefilling at once; a new "
                                            "long request over it waits while short ones pass")
    admission_aging_steps: int = _field(64, "steps a waiting request may be passed over (for want "
                                        "of KV) before nobody behind it is admitted; also the "
                                        "steps a long prefill may wait on the reserve before "
                                        "ignoring it")
    short_reserve_blocks: int = _field(-1, "KV blocks per instance a long request's growth leaves "
                                       "free for short requests (-1: the threshold's worth, at "
                                       "most a quarter of an instance's blocks; 0: none)")
    max_model_len: int | None = _field(None, "most tokens (prompt + output) of one request "
                                       "(default: the model's max_position_embeddings, lowered "
                                       "to what the KV can hold)")
    max_logprobs: int = _field(20, "most logprobs a request may ask for per token")
    seed: int = _field(0, "base seed: requests without their own seed derive theirs from it")
    attention_impl: str = _field("auto", "MicroAttention implementation (auto: the native C++ "
                                 "kernel on CPU where it builds, else the jnp reference)",
                                 ATTENTION_IMPLS)
    dense_impl: str = _field("auto", "dense layers (auto: for bfloat16 on CPU with tp=1 the "
                             "native kernel over packed weights where it builds, else XLA's dot)",
                             DENSE_IMPLS)
    scan_layers: bool = _field(False, "run the layers with lax.scan over stacked weights "
                               "(compiles faster; steps are slower on CPU)")
    overlap_steps: bool = _field(True, "plan step n+1 while step n runs on the device")
    warm_start: bool = _field(True, "compile every step program before the engine is ready")
    compile_cache_dir: str | None = _field("auto", "JAX persistent compilation cache ('auto': "
                                           f"${CACHE_ENV}/xla, else ~/.cache/distkv_jax/xla; "
                                           "'none': off)")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            allowed = _allowed_types(hints[f.name])
            if v is None and type(None) in allowed:
                continue
            if isinstance(v, bool) and bool not in allowed:
                raise _bad(f.name, v, f"must be {_type_words(allowed)}")
            if float in allowed and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, f.name, float(v))
                continue
            if not isinstance(v, tuple(t for t in allowed if t is not type(None))):
                raise _bad(f.name, v, f"must be {_type_words(allowed)}")
            choices = f.metadata.get("choices")
            if choices and v not in choices:
                raise _bad(f.name, v, f"must be one of {', '.join(map(repr, choices))}")
        try:
            MeshShape.parse(self.mesh)
        except ValueError as e:
            raise _bad("mesh", self.mesh, str(e)) from None
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "must be >= 1")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise _bad("kv_blocks", self.kv_blocks, "must be >= 1 (or None: sized from free memory)")
        for name in ("max_long_partial_prefills", "admission_aging_steps"):
            if getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "must be >= 1")
        if self.short_reserve_blocks < -1:
            raise _bad("short_reserve_blocks", self.short_reserve_blocks,
                       "must be >= 0 (or -1: derived)")
        if self.max_num_partial_prefills and \
                self.max_long_partial_prefills > self.max_num_partial_prefills:
            raise _bad("max_long_partial_prefills", self.max_long_partial_prefills,
                       f"must be <= max_num_partial_prefills ({self.max_num_partial_prefills})")
        for name in ("host_kv_blocks", "migrate_tokens_per_step", "max_logprobs", "seed",
                     "long_prefill_token_threshold", "long_prefill_min_tokens",
                     "max_num_partial_prefills"):
            if getattr(self, name) < 0:
                raise _bad(name, getattr(self, name), "must be >= 0")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise _bad("max_model_len", self.max_model_len, "must be >= 1 (or None: from the model)")
        if not 0.0 <= self.lend_fraction <= 1.0:
            raise _bad("lend_fraction", self.lend_fraction, "must be in [0, 1]")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise _bad("kv_memory_fraction", self.kv_memory_fraction, "must be in (0, 1]")
        if self.model == "":
            raise _bad("model", self.model, "must name a model directory or 'tiny'")

    # ------------------------------------------------------------ derived
    @property
    def mesh_shape(self) -> MeshShape:
        return MeshShape.parse(self.mesh)

    def kv_cache_config(self, blocks_per_instance: int, cache_salt: str = "") -> KVCacheConfig:
        return KVCacheConfig(self.mesh_shape.inst, blocks_per_instance, block_size=self.block_size,
                             host_blocks_per_instance=self.host_kv_blocks,
                             kv_policy=self.kv_policy, lend_fraction=self.lend_fraction,
                             migrate_tokens_per_step=self.migrate_tokens_per_step,
                             enable_prefix_caching=self.enable_prefix_caching,
                             cache_salt=cache_salt, host_attention=self.host_attention)

    def policy_config(self, blocks_per_instance: int) -> PolicyConfig:
        """The scheduling policy's settings, the derived defaults filled in."""
        return PolicyConfig.resolve(
            max_num_batched_tokens=self.max_num_batched_tokens, block_size=self.block_size,
            blocks_per_instance=blocks_per_instance,
            long_prefill_token_threshold=self.long_prefill_token_threshold,
            long_prefill_min_tokens=self.long_prefill_min_tokens,
            max_num_partial_prefills=self.max_num_partial_prefills,
            max_long_partial_prefills=self.max_long_partial_prefills,
            admission_aging_steps=self.admission_aging_steps,
            short_reserve_blocks=self.short_reserve_blocks, max_num_seqs=self.max_num_seqs)

    def resolved_compile_cache_dir(self) -> str | None:
        d = self.compile_cache_dir
        if d is None or d.lower() in ("none", "off", ""):
            return None
        if d == "auto":
            root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "distkv_jax")
            return os.path.join(root, "xla")
        return d

    def context_limit(self, max_position_embeddings: int, kv_tokens: int,
                      sliding_window: int | None) -> int:
        """max_model_len: the given value, else the model's context lowered to
        what one request's KV can hold (+1: the last sampled token needs no KV)
        and to the sliding window (+1 likewise; DistAttention attends the whole
        context, so a window model stops where the window would start to slide)."""
        limit = min(max_position_embeddings, kv_tokens + 1)
        if sliding_window is not None:
            limit = min(limit, sliding_window + 1)
        if self.max_model_len is None:
            return limit
        if self.max_model_len > kv_tokens + 1:
            raise _bad("max_model_len", self.max_model_len,
                       f"one request's KV holds at most {kv_tokens} tokens under "
                       f"kv_policy={self.kv_policy!r} (raise kv_blocks or lower max_model_len)")
        if sliding_window is not None and self.max_model_len > sliding_window + 1:
            raise _bad("max_model_len", self.max_model_len,
                       f"more than the model's sliding window ({sliding_window}) + 1, which "
                       "DistAttention does not implement")
        return self.max_model_len

    # ----------------------------------------------------------- flags
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, caller: str, model: str, kwargs: dict) -> "EngineArgs":
        """`caller(model, **kwargs)`'s arguments; TypeError for a name that is
        not a field (as Python reports an unknown keyword)."""
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise TypeError(f"{caller}() got unknown argument(s) {', '.join(unknown)}; "
                            f"engine arguments are: {', '.join(cls.field_names())}")
        return cls(model=model, **kwargs)

    @classmethod
    def define_flags(cls, flag_values=None) -> None:
        """One absl flag per field (same name, type, default and help)."""
        from absl import flags

        fv = flags.FLAGS if flag_values is None else flag_values
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            types = _allowed_types(hints[f.name])
            help_ = f.metadata["help"]
            choices = f.metadata.get("choices")
            if choices:
                flags.DEFINE_enum(f.name, f.default, list(choices), help_, flag_values=fv)
            elif bool in types:
                flags.DEFINE_boolean(f.name, f.default, help_, flag_values=fv)
            elif int in types:
                flags.DEFINE_integer(f.name, f.default, help_, flag_values=fv)
            elif float in types:
                flags.DEFINE_float(f.name, f.default, help_, flag_values=fv)
            else:
                flags.DEFINE_string(f.name, f.default, help_, flag_values=fv)

    @classmethod
    def from_flags(cls, flag_values=None, **overrides: Any) -> "EngineArgs":
        from absl import flags

        fv = flags.FLAGS if flag_values is None else flag_values
        kw = {name: getattr(fv, name) for name in cls.field_names()}
        kw.update(overrides)
        return cls(**kw)


def _allowed_types(hint) -> tuple:
    args = typing.get_args(hint)
    return args if args else (hint,)


def _type_words(types: tuple) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             type(None): "None"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _bad(name: str, value, why: str) -> ValueError:
    return ValueError(f"{name}={value!r}: {why}")
