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
    # the fused MLP activation: the same as the two layers and silu_mul
    u = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
    fused = D.silu_mul_native(x, D.pack_gate_up(D.pack(w), D.pack(u)), n)
    sep = D.silu_mul(D.dense_native(x, D.pack(w), n), D.dense_native(x, D.pack(u), n))
    assert np.array_equal(np.asarray(fused), np.asarray(sep)), (m, k, n)
print("ok")
"""
    env = dict(os.environ, **{native.PORTABLE_ENV: "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def _silu_mul_f64(x, wg, wu):
    """The fused MLP activation from float64 products: each product rounded
    to bfloat16 (as the unfused layers round them), silu in float64 rounded
    to bfloat16, the product rounded to bfloat16."""
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)  # noqa: E731
    xf = np.asarray(x, np.float64)
    g, u = bf(xf @ np.asarray(wg, np.float64)), bf(xf @ np.asarray(wu, np.float64))
    return bf(bf(g / (1 + np.exp(-g))) * u)


SILU_SHAPES = [(1, 64, 32), (9, 130, 100), (16, 512, 1408), (37, 513, 100), (300, 96, 33)]


@pytest.mark.parametrize("impl", ["reference", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("shape", SILU_SHAPES)
def test_fused_silu_mul_matches_float64(shape, impl):
    """dense_silu_mul over pack_gate_up's array: silu(x @ gate) * (x @ up)
    with PyTorch's bfloat16 roundings, within a bfloat16 step or two of the
    float64 model of those roundings (each product may round the other way
    after float32 accumulation); native and reference agree bit for bit
    except where their float32 sums differ."""
    m, k, n = shape
    x, wg = _case(m, k, n, seed=5)
    _, wu = _case(m, k, n, seed=6)
    gate_up = D.pack_gate_up(D.pack(wg), D.pack(wu))
    y = jax.jit(D.dense_silu_mul, static_argnums=(2, 3))(x, gate_up, n, impl)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    want = _silu_mul_f64(x, wg, wu)
    err = np.abs(np.asarray(y, np.float64) - want)
    assert np.all(err <= 2.0 ** -6 * np.abs(want) + 1e-6), np.max(err)
    assert np.mean(err <= 2.0 ** -8 * np.abs(want) + 1e-30) > 0.97
    if impl == "native":  # the fused call equals the two layers and silu_mul
        sep = D.silu_mul(D.dense(x, D.pack(wg), n, "native"), D.dense(x, D.pack(wu), n, "native"))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(sep))


def test_pack_gate_up_alternates_panels():
    _, wg = _case(1, 70, 100, seed=1)
    _, wu = _case(1, 70, 100, seed=2)
    pg, pu = D.pack(wg), D.pack(wu)
    both = D.pack_gate_up(pg, pu)
    assert both.shape == (2 * pg.shape[0],) + pg.shape[1:]
    np.testing.assert_array_equal(np.asarray(both[0::2]), np.asarray(pg))
    np.testing.assert_array_equal(np.asarray(both[1::2]), np.asarray(pu))
    stacked = D.pack_gate_up(jnp.stack([pg, pg]), jnp.stack([pu, pu]))  # scanned layers
    np.testing.assert_array_equal(np.asarray(stacked[1]), np.asarray(both))
    with pytest.raises(ValueError, match="differ in shape"):
        D.pack_gate_up(pg, pu[:1])
    if native.available():
        with pytest.raises(ValueError, match="do not match"):
            D.silu_mul_native(_case(2, 70, 100)[0], pg, 100)


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
