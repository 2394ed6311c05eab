"""bfloat16 dense layers on XLA:CPU over packed weights.

A dense layer's kernel w [K, N] is packed once, when the weights are loaded,
into panels of PANEL columns whose rows are taken in pairs:

    packed[p, kp, j, t] = w[2 kp + t, PANEL p + j]     (zero past the edges)
    shape [ceil(N / PANEL), ceil(K / 2), PANEL, 2]

which is the operand layout of the native kernel (dense_cpu.cc: AVX512_BF16
pair dot products, each panel one contiguous stream). `dense(x, packed, n)`
computes x [..., K] @ w in bfloat16 with float32 accumulation, rounded once,
as the model's unpacked bfloat16 layers do. Two implementations share the
signature: the native kernel (impl="native") and a jnp reference that
unpacks and multiplies (impl="reference"). `dense_silu_mul` does the same
for an MLP's gate and up packed together (`pack_gate_up`): one call, whose
result is silu(x @ gate) * (x @ up) with PyTorch's bfloat16 roundings.

The engine's `dense_impl` (`resolve_impl`): "xla" keeps the weights as they
are (XLA's dot); "native" and "reference" pack them; "auto" is "native" for
bfloat16 on CPU with tp = 1 where the kernel builds with AVX512_BF16 (its
portable loop is slower than XLA's dot), else "xla". (With tp > 1 XLA's
partitioner cannot split the kernel's custom call.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import native

PANEL = 32
IMPLS = ("auto", "xla", "native", "reference")
PACKED_IMPLS = ("native", "reference")


def packed_shape(k: int, n: int) -> tuple[int, int, int, int]:
    return (-(-n // PANEL), -(-k // 2), PANEL, 2)


def pack(w):
    """w [K, N] -> packed [ceil(N / PANEL), ceil(K / 2), PANEL, 2], same dtype
    (numpy in, numpy out; a jax array in, a jax array out)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    k, n = w.shape
    np_, kp, _, _ = packed_shape(k, n)
    w = xp.pad(w, ((0, 2 * kp - k), (0, np_ * PANEL - n)))
    return w.reshape(kp, 2, np_, PANEL).transpose(2, 0, 3, 1)


def unpack(packed, k: int, n: int):
    """The inverse of `pack`: w [K, N]."""
    np_, kp, panel, two = packed.shape
    if (np_, kp, panel, two) != packed_shape(k, n):
        raise ValueError(f"packed shape {packed.shape} does not hold a [{k}, {n}] kernel "
                         f"(expected {packed_shape(k, n)})")
    return packed.transpose(1, 3, 0, 2).reshape(2 * kp, np_ * PANEL)[:k, :n]


def dense_reference(x, packed, n: int):
    """x [..., K] @ unpack(packed) -> [..., n], accumulated in float32, rounded
    once to x's dtype."""
    w = unpack(packed, x.shape[-1], n)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return y.astype(jnp.result_type(x, packed))


def _native_call(target: str, x, packed, n: int, expected: tuple, what: str):
    """x [..., K] (bfloat16) and packed bfloat16 weights of shape `expected`
    through the native target -> [..., n] bfloat16."""
    if not native.available():
        raise RuntimeError(f"the native dense kernel is unavailable: {native.error()}")
    if x.dtype != jnp.bfloat16 or packed.dtype != jnp.bfloat16:
        raise ValueError(f"native dense takes bfloat16 x and weights, got {x.dtype} and "
                         f"{packed.dtype}")
    k = x.shape[-1]
    if packed.shape != expected:
        raise ValueError(f"{what} {packed.shape} do not match x [..., {k}] and n={n} "
                         f"(expected {expected})")
    lead = x.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    out = jax.ShapeDtypeStruct((rows, n), jnp.bfloat16)
    y = jax.ffi.ffi_call(target, out)(x.reshape(rows, k), packed)
    return y.reshape(*lead, n)


def dense_native(x, packed, n: int):
    """The same contract from dense_cpu.cc (bfloat16 x and packed weights)."""
    return _native_call(native.DENSE_TARGET, x, packed, n, packed_shape(x.shape[-1], n),
                        "packed weights")


def silu_mul(gate, up):
    """silu(gate) * up with PyTorch's roundings in a narrow dtype: silu
    computed in float32 and rounded once, then the product rounded once.
    (XLA's bfloat16 silu rounds inside the sigmoid as well, and XLA:CPU ran
    it ~1.9x slower: 0.95 against 0.51 ms on 512 x 1,408.)"""
    if gate.dtype == jnp.float32:
        return jax.nn.silu(gate) * up
    f32 = jnp.float32
    s = jax.nn.silu(gate.astype(f32)).astype(gate.dtype)
    return (s.astype(f32) * up.astype(f32)).astype(jnp.result_type(gate, up))


def pack_gate_up(gate_packed, up_packed):
    """The MLP's gate and up kernels, both packed ([..., P, Kp, 32, 2]), as
    one array whose panels alternate gate, up ([..., 2P, Kp, 32, 2]): the
    fused kernel reads gate panel p and up panel p one after the other."""
    if gate_packed.shape != up_packed.shape:
        raise ValueError(f"gate and up kernels differ in shape: {gate_packed.shape} and "
                         f"{up_packed.shape}")
    xp = np if isinstance(gate_packed, np.ndarray) else jnp
    both = xp.stack([gate_packed, up_packed], axis=-4)  # [..., P, 2, Kp, 32, 2]
    return both.reshape(*gate_packed.shape[:-4], 2 * gate_packed.shape[-4],
                        *gate_packed.shape[-3:])


def silu_mul_reference(x, gate_up, n: int):
    """silu(x @ gate) * (x @ up) from pack_gate_up's array, each product
    rounded once to x's dtype, then `silu_mul`."""
    return silu_mul(dense_reference(x, gate_up[0::2], n), dense_reference(x, gate_up[1::2], n))


def silu_mul_native(x, gate_up, n: int):
    """The same contract from dense_cpu.cc in one call: each row block's gate
    and up panels stay in L1 and only silu(gate) * up is written."""
    p, kp, panel, two = packed_shape(x.shape[-1], n)
    return _native_call(native.SILU_MUL_TARGET, x, gate_up, n, (2 * p, kp, panel, two),
                        "packed gate/up")


def _pick(impl: str, native_fn, reference_fn):
    if impl == "auto":
        impl = "native" if native.available() else "reference"
    if impl == "native":
        return native_fn
    if impl == "reference":
        return reference_fn
    raise ValueError(f"dense impl must be 'auto', 'native' or 'reference', got {impl!r}")


def dense(x, packed, n: int, impl: str = "auto"):
    """x [..., K] @ w [K, n] from packed w; impl "native", "reference" or
    "auto" (native where it is built)."""
    return _pick(impl, dense_native, dense_reference)(x, packed, n)


def dense_silu_mul(x, gate_up, n: int, impl: str = "auto"):
    """silu(x @ gate) * (x @ up) [..., n] from pack_gate_up's array; impl as `dense`."""
    return _pick(impl, silu_mul_native, silu_mul_reference)(x, gate_up, n)


def resolve_impl(impl: str, platform: str, dtype, tp: int) -> str:
    """The dense implementation `impl` means for a model in `dtype` on
    `platform` with tensor parallelism `tp` (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"dense_impl must be one of {IMPLS}, got {impl!r}")
    bf16 = jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
    if impl == "auto":
        ok = platform == "cpu" and bf16 and tp == 1 and native.dense_vectorized()
        return "native" if ok else "xla"
    if impl in PACKED_IMPLS:
        if not bf16:
            raise ValueError(f"dense_impl={impl!r} packs bfloat16 weights; the model runs in "
                             f"{jnp.dtype(dtype).name} (use dense_impl='xla' or 'auto')")
        if tp != 1:
            raise ValueError(f"dense_impl={impl!r} needs tp=1 (replicated weights), the mesh "
                             f"has tp={tp} (use dense_impl='xla' or 'auto')")
        if impl == "native" and platform != "cpu":
            raise ValueError(f"dense_impl='native' is an XLA:CPU kernel; this job runs on "
                             f"{platform} (use dense_impl='xla' or 'auto')")
        if impl == "native" and not native.available():
            raise ValueError(f"dense_impl='native': the native kernel is unavailable here "
                             f"({native.error()}); use dense_impl='auto'")
    return impl
