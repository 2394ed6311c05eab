"""The bfloat16 dense kernel over packed weights (kernels/dense.py,
dense_cpu.cc) against float64 products of the same bfloat16 values, beside
its jnp reference; the packing; the engine's choice of implementation."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distkv_jax.kernels import dense as D
from distkv_jax.kernels import native

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")

# M x K x N: decode rows (1..9, around the 8-row block), prefill rows, odd K,
# N off the 32-column panels, one column, tiny K
SHAPES = [(1, 64, 32), (3, 64, 96), (8, 128, 64), (9, 130, 100), (16, 512, 1408),
          (37, 513, 100), (300, 96, 33), (5, 7, 1), (2, 1, 40)]


def _case(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
    return x, w


def _check(y, x, w):
    """bfloat16 y within one rounding of the float64 product (plus float32
    accumulation error), elementwise."""
    xf, wf = np.asarray(x, np.float64), np.asarray(w, np.float64)
    exact = xf @ wf
    scale = np.abs(xf) @ np.abs(wf)
    err = np.abs(np.asarray(y, np.float64) - exact)
    bound = 2.0 ** -8 * np.abs(exact) + 1e-6 * scale + 1e-30
    assert y.shape == exact.shape and y.dtype == jnp.bfloat16
    assert np.all(err <= bound), f"max excess {np.max(err - bound)}"


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_roundtrip(shape):
    _, k, n = shape
    _, w = _case(*shape)
    packed = D.pack(w)
    assert packed.shape == D.packed_shape(k, n)
    np.testing.assert_array_equal(np.asarray(D.unpack(packed, k, n)), np.asarray(w))
    # numpy in, numpy out; the layout's definition element by element
    wn = np.asarray(w, np.float32)
    pn = D.pack(wn)
    assert isinstance(pn, np.ndarray)
    p, kp, j, t = 1 if pn.shape[0] > 1 else 0, pn.shape[1] - 1, 3, 1
    row, col = 2 * kp + t, D.PANEL * p + j
    want = wn[row, col] if row < k and col < n else 0.0
    assert pn[p, kp, j, t] == want


@pytest.mark.parametrize("impl", ["reference", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_matches_float64(shape, impl):
    x, w = _case(*shape)
    y = jax.jit(D.dense, static_argnums=(2, 3))(x, D.pack(w), shape[2], impl)
    _check(y, x, w)


@needs_native
def test_native_agrees_with_reference_and_keeps_leading_axes():
    x, w = _case(48, 256, 200, seed=3)
    x3 = x.reshape(4, 12, 256)
    a = np.asarray(D.dense(x3, D.pack(w), 200, "native"), np.float32)
    b = np.asarray(D.dense(x3, D.pack(w), 200, "reference"), np.float32)
    assert a.shape == (4, 12, 200)
    # both round the float32 sum once; summation orders differ, so a rare
    # element may land one bfloat16 step apart
    assert np.mean(a == b) > 0.99
    np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=1e-6)


@needs_native
def test_native_refuses_mismatched_weights():
    x, w = _case(4, 64, 64)
    with pytest.raises(ValueError, match="do not match"):
        D.dense_native(x, D.pack(w), 96)
    with pytest.raises(ValueError, match="bfloat16"):
        D.dense_native(x.astype(jnp.float32), D.pack(w), 64)
    with pytest.raises(ValueError, match="does not hold"):
        D.unpack(D.pack(w), 64, 100)


@needs_native
def test_portable_loop_matches_float64():
    """The loop that machines without AVX512_BF16 build, built here on
    purpose ($DISTKV_NATIVE_PORTABLE=1), in a fresh process."""
    code = """
import numpy as np, jax.numpy as jnp
from distkv_jax.kernels import dense as D, native
assert native.available(), native.error()
assert not native.dense_vectorized()
rng = np.random.default_rng(1)
for m, k, n in [(9, 130, 100), (1, 7, 33), (17, 64, 64)]:
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
    y = np.asarray(D.dense_native(x, D.pack(w), n), np.float64)
    xf, wf = np.asarray(x, np.float64), np.asarray(w, np.float64)
    exact = xf @ wf
    assert np.all(np.abs(y - exact) <= 2.0 ** -8 * np.abs(exact) + 1e-6 * (np.abs(xf) @ np.abs(wf))), (m, k, n)
print("ok")
"""
    env = dict(os.environ, **{native.PORTABLE_ENV: "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_resolve_impl():
    bf16, f32 = jnp.bfloat16, jnp.float32
    fast = native.dense_vectorized()
    assert D.resolve_impl("auto", "cpu", bf16, 1) == ("native" if fast else "xla")
    assert D.resolve_impl("auto", "cpu", f32, 1) == "xla"
    assert D.resolve_impl("auto", "cpu", bf16, 2) == "xla"
    assert D.resolve_impl("auto", "cuda", bf16, 1) == "xla"
    assert D.resolve_impl("reference", "cuda", bf16, 1) == "reference"
    with pytest.raises(ValueError, match="packs bfloat16"):
        D.resolve_impl("native", "cpu", f32, 1)
    with pytest.raises(ValueError, match="tp=1"):
        D.resolve_impl("reference", "cpu", bf16, 4)
    with pytest.raises(ValueError, match="XLA:CPU"):
        D.resolve_impl("native", "cuda", bf16, 1)
    with pytest.raises(ValueError, match="must be one of"):
        D.resolve_impl("fast", "cpu", bf16, 1)
