"""MicroAttention for GPUs: a Pallas kernel lowered through Triton.

Same contract as kernels/micro_attention.py `run_partials_reference`: per run
(`run` consecutive work-list items of one query tile), the partial attention
(o, lse) of the tile's rows over the run's pages, read in place from the pool.

Why Triton and not Mosaic GPU (Pallas's default GPU backend): Mosaic GPU
stages every operand of a kernel without BlockSpecs whole in shared memory,
and a BlockSpec pipeline cannot express "the page named by item w of the work
list" for the KV operands without one grid step per page (the online softmax
over a run would then need an output-resident accumulator across grid steps).
Under Triton a kernel's refs are pointers into HBM: each program loads just
the [block_size, head_dim] pages its items name, by index, at any pool size
(offsets switch to 64 bits when the pool passes 4 GiB), and keeps the online
softmax of its run in registers.

One program: one run x one KV head (grid (runs, Hkv)).
    q     [n_tiles, Hkv, M, D]   M = q_tile * G padded to a power of two >= 16
    pos   [n_tiles, M]           -1: a padding row (attends nothing)
    pages [P, block_size, Hs, D] float32, bfloat16, or uint16 holding bfloat16
                                 bits (kv_pool.storage_dtype); bitcast in the kernel
Rows are padded to >= 16 so that both products are tensor-core-shaped dots
(Triton's tl.dot needs M, N, K >= 16): decode has M = G (1-8) real rows, and
decode is bound by reading the pages, not by the padded flops.

Precision: float32 operands use IEEE float32 dots (Triton's default for
float32 is TF32, ~1e-3 relative error). q.k of bfloat16 q and bfloat16 pages
is a bfloat16 dot accumulated in float32 (exact products). p.v is float32 x
the pages upcast to float32. The online softmax is float32.

GPU constraints (checked by `gpu_supports`): head_dim and block_size powers
of two, both >= 16. In interpret mode (CPU tests) any shape runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")
MIN_DOT = 16            # tl.dot's smallest M, N, K
NUM_WARPS = 4           # a [16..128, D] x [D, block_size] product per step: 4 warps fill it
NUM_STAGES = 2          # software pipelining: the next page's loads overlap this page's math


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def gpu_supports(head_dim: int, block_size: int) -> str | None:
    """Why the Triton kernel cannot take these shapes (None: it can)."""
    if not (_pow2(head_dim) and head_dim >= MIN_DOT):
        return f"head_dim={head_dim} is not a power of two >= {MIN_DOT}"
    if not (_pow2(block_size) and block_size >= MIN_DOT):
        return f"block_size={block_size} is not a power of two >= {MIN_DOT}"
    return None


def padded_rows(rows: int) -> int:
    """Rows of a tile in the kernel: a power of two, at least MIN_DOT."""
    return max(MIN_DOT, 1 << max(0, rows - 1).bit_length())


def _as_float(x):
    """Pages as stored -> their values (uint16 holds bfloat16 bits)."""
    if x.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x, jnp.bfloat16)
    return x


def _dot(a, b, contract_b: int):
    """a [M, K] . b (contracting b's axis `contract_b`) in float32. Float32
    operands: IEEE (HIGHEST); 16-bit operands: their own dot, f32 accumulate."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=prec,
                               preferred_element_type=jnp.float32)


def _kernel(tile_ref, block_ref, kstart_ref, off_ref, q_ref, pos_ref, k_ref, v_ref,
            o_ref, lse_ref, *, scale: float, n_tiles: int, run: int):
    from jax.experimental import pallas as pl

    r = pl.program_id(0)
    h = pl.program_id(1)
    raw_tile = tile_ref[r * run]
    tile = jnp.minimum(raw_tile, n_tiles - 1)
    head = off_ref[0] + h
    q = q_ref[tile, h]                                   # [M, D]
    pos = pos_ref[tile]                                  # [M]
    rows, head_dim = q.shape
    block_size = k_ref.shape[1]
    kv_dtype = jnp.bfloat16 if k_ref.dtype == jnp.uint16 else k_ref.dtype
    # q.k in bfloat16 only when both sides are bfloat16 (exact products)
    qk_dtype = jnp.bfloat16 if (q.dtype == jnp.bfloat16 and kv_dtype == jnp.bfloat16) else jnp.float32
    q = q.astype(qk_dtype)
    offs = jax.lax.broadcasted_iota(jnp.int32, (1, block_size), 1)

    def step(j, carry):
        m_prev, l_prev, acc = carry
        item = r * run + j
        blk = block_ref[item]
        k = _as_float(k_ref[blk, :, head, :]).astype(qk_dtype)     # [bs, D], read in place
        v = _as_float(v_ref[blk, :, head, :]).astype(jnp.float32)
        s = _dot(q, k, 1) * scale                                  # [M, bs]
        kpos = kstart_ref[item] + offs
        s = jnp.where(kpos <= pos[:, None], s, NEG_INF)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new > NEG_INF, m_new, 0.0)            # -inf - -inf never computed
        alpha = jnp.where(m_prev > NEG_INF, jnp.exp(m_prev - m_safe), 0.0)
        p = jnp.exp(s - m_safe[:, None])                           # masked -> exactly 0
        acc = acc * alpha[:, None] + _dot(p, v, 0)
        return m_new, l_prev * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((rows,), NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    # a padding run (tile == n_tiles) reads no page at all
    trips = jnp.where(raw_tile < n_tiles, run, 0)
    m, l, acc = jax.lax.fori_loop(0, trips, step, init)
    m_safe = jnp.where(m > NEG_INF, m, 0.0)
    l_safe = jnp.where(l > 0, l, 1.0)
    o_ref[r, h] = acc / l_safe[:, None]
    lse_ref[r, h] = jnp.where(l > 0, m_safe + jnp.log(l_safe), NEG_INF)


def run_partials_gpu(q, q_pos, k_pages, v_pages, item_tile, item_block, item_kstart, *,
                     scale: float, run: int = 1, kv_head_offset=0, interpret: bool = False):
    """Per-run (o [W/run, q_tile, Hkv, G, D], lse [W/run, q_tile, Hkv, G]), float32.

    Pages stay as stored (no conversion or copy of the pool outside the kernel).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    n_tiles, q_tile, num_kv, groups, head_dim = q.shape
    num_runs = item_tile.shape[0] // run
    rows = q_tile * groups
    m = padded_rows(rows)
    q_t = q.transpose(0, 2, 1, 3, 4).reshape(n_tiles, num_kv, rows, head_dim)
    pos_t = jnp.repeat(q_pos, groups, axis=1)                       # row order (q, g)
    if m > rows:
        q_t = jnp.pad(q_t, ((0, 0), (0, 0), (0, m - rows), (0, 0)))
        pos_t = jnp.pad(pos_t, ((0, 0), (0, m - rows)), constant_values=-1)
    offset = jnp.reshape(jnp.asarray(kv_head_offset, jnp.int32), (1,))
    kernel = functools.partial(_kernel, scale=float(scale), n_tiles=n_tiles, run=run)
    o, lse = pl.pallas_call(
        kernel,
        grid=(num_runs, num_kv),
        out_shape=(jax.ShapeDtypeStruct((num_runs, num_kv, m, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((num_runs, num_kv, m), jnp.float32)),
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="micro_attention_gpu",
    )(item_tile, item_block, item_kstart, offset, q_t, pos_t, k_pages, v_pages)
    o = o[:, :, :rows].reshape(num_runs, num_kv, q_tile, groups, head_dim).transpose(0, 2, 1, 3, 4)
    lse = lse[:, :, :rows].reshape(num_runs, num_kv, q_tile, groups).transpose(0, 2, 1, 3)
    return o, lse
