"""MicroAttention: partial attention of query tiles over paged KV blocks.

A work list of items says what to compute: item w attends query tile
`item_tile[w]` to page `item_block[w]`, whose first slot holds key position
`item_kstart[w]`. A query at position p sees the keys at positions <= p
(causal; slots past the sequence's end hold positions > p, so the same test
hides them). Work is proportional to the number of items, i.e. to the blocks
actually attended, never to a [batch, max_blocks] grid.

Each item yields a partial (o_w, lse_w), normalized by its own softmax sum;
the partials of a tile are merged exactly (see DESIGN.md section 2):

    lse = logsumexp_w lse_w,     o = sum_w exp(lse_w - lse) o_w

Empty partials carry lse = -inf and weigh nothing; the 0 * inf and
(-inf) - (-inf) cases are guarded explicitly.

Two implementations of the per-item step share one signature: a pure-jnp
reference (default on CPU) and a Pallas kernel (written for the GPU Triton
lowering; checked on CPU with interpret=True).

Shapes:
    q            [n_tiles, q_tile, Hkv, G, D]   G = query heads per KV head
    q_pos        [n_tiles, q_tile] int32        -1 marks a padding row
    k/v_pages    [P, block_size, Hkv_stored, D] heads kv_head_offset.. are used
    item_*       [W] int32                      item_tile == n_tiles marks padding
    returns o    [n_tiles, q_tile, Hkv, G, D]   float32
            lse  [n_tiles, q_tile, Hkv, G]      float32
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def _safe_max(m):
    """Replace -inf (nothing attended) by 0 so that x - m never computes -inf - -inf."""
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _finish(o_sum, l, m_safe):
    """Normalize a weighted sum; rows that attended nothing get o = 0, lse = -inf."""
    o = o_sum / jnp.where(l > 0, l, 1.0)[..., None]
    lse = jnp.where(l > 0, m_safe + jnp.log(jnp.where(l > 0, l, 1.0)), NEG_INF)
    return o, lse


def merge_segments(o, lse, segment_ids, num_segments):
    """Merge partials o [N, ..., D], lse [N, ...] that share a segment id.
    Ids outside [0, num_segments) are dropped."""
    m = jax.ops.segment_max(lse, segment_ids, num_segments)
    m_safe = _safe_max(m)
    w = jnp.exp(lse - jnp.take(m_safe, segment_ids, axis=0, mode="clip"))
    w = jnp.where(jnp.isfinite(lse), w, 0.0)
    l = jax.ops.segment_sum(w, segment_ids, num_segments)
    o_sum = jax.ops.segment_sum(w[..., None] * o, segment_ids, num_segments)
    return _finish(o_sum, l, m_safe)


def merge_axis(o, lse, axis: int = 0):
    """Merge partials stacked along `axis` (o has one more trailing dim than lse)."""
    m_safe = _safe_max(jnp.max(lse, axis=axis, keepdims=True))
    w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m_safe), 0.0)
    l = jnp.sum(w, axis=axis)
    o_sum = jnp.sum(w[..., None] * o, axis=axis)
    return _finish(o_sum, l, jnp.squeeze(m_safe, axis))


# --------------------------------------------------------------------------
# per-item partials: reference


def _partials_dense(q, q_pos, k_pages, v_pages, item_tile, item_block, item_kstart, scale,
                    kv_head_offset):
    """Per-item partials for a batch of items, all gathered at once."""
    n_tiles, _, num_kv, _, _ = q.shape
    block_size = k_pages.shape[1]
    valid = item_tile < n_tiles
    tile = jnp.minimum(item_tile, n_tiles - 1)
    qw = q[tile].astype(jnp.float32)                                   # [C, Qt, Hkv, G, D]
    pos = q_pos[tile]                                                  # [C, Qt]
    kw = jax.lax.dynamic_slice_in_dim(k_pages[item_block], kv_head_offset, num_kv, axis=2)
    vw = jax.lax.dynamic_slice_in_dim(v_pages[item_block], kv_head_offset, num_kv, axis=2)
    s = jnp.einsum("wqhgd,wkhd->wqhgk", qw, kw.astype(jnp.float32)) * scale
    kpos = item_kstart[:, None] + jnp.arange(block_size, dtype=jnp.int32)   # [C, bs]
    visible = (kpos[:, None, :] <= pos[:, :, None]) & valid[:, None, None]  # [C, Qt, bs]
    s = jnp.where(visible[:, :, None, None, :], s, NEG_INF)
    m_safe = _safe_max(jnp.max(s, axis=-1))
    p = jnp.exp(s - m_safe[..., None])                                  # masked -> exactly 0
    l = jnp.sum(p, axis=-1)
    o_sum = jnp.einsum("wqhgk,wkhd->wqhgd", p, vw.astype(jnp.float32))
    return _finish(o_sum, l, m_safe)


def item_partials_reference(q, q_pos, k_pages, v_pages, item_tile, item_block, item_kstart, *,
                            scale: float, kv_head_offset=0, chunk: int = 64):
    """Per-item (o_w [W, q_tile, Hkv, G, D], lse_w [W, q_tile, Hkv, G]), pure jnp.

    Items are processed `chunk` at a time under lax.scan: gathering a few MB of
    blocks per iteration keeps them in cache, where gathering all W blocks at
    once would stream every block through memory twice more (measured ~3x
    slower on CPU).
    """
    num_items = item_tile.shape[0]
    chunk = min(chunk, num_items)
    if num_items % chunk:  # work lists are power-of-two buckets; pad anything else
        extra = chunk - num_items % chunk
        pad = lambda a, v: jnp.concatenate([a, jnp.full((extra,), v, a.dtype)])
        item_tile, item_block, item_kstart = (pad(item_tile, q.shape[0]), pad(item_block, 0),
                                              pad(item_kstart, 0))
    xs = tuple(a.reshape(-1, chunk) for a in (item_tile, item_block, item_kstart))

    def body(_, x):
        return None, _partials_dense(q, q_pos, k_pages, v_pages, *x, scale, kv_head_offset)

    _, (o, lse) = jax.lax.scan(body, None, xs)
    o = o.reshape((-1,) + o.shape[2:])[:num_items]
    lse = lse.reshape((-1,) + lse.shape[2:])[:num_items]
    return o, lse


# --------------------------------------------------------------------------
# per-item partials: Pallas


def _pallas_kernel(tile_ref, block_ref, kstart_ref, off_ref, q_ref, qpos_ref, k_ref, v_ref,
                   o_ref, lse_ref, *, scale, n_tiles, block_size, use_dot):
    from jax.experimental import pallas as pl

    w = pl.program_id(0)
    h = pl.program_id(1)
    raw_tile = tile_ref[w]
    tile = jnp.minimum(raw_tile, n_tiles - 1)
    blk = block_ref[w]
    head = off_ref[0] + h
    q = q_ref[tile, h].astype(jnp.float32)                  # [M, D], M = q_tile * G
    pos = qpos_ref[tile]                                     # [M]
    k = k_ref[blk, :, head, :].astype(jnp.float32)           # [bs, D]
    v = v_ref[blk, :, head, :].astype(jnp.float32)
    if use_dot:
        s = jnp.dot(q, k.T) * scale
    else:  # tiny M (decode): a broadcast product avoids tensor-core shape limits
        s = jnp.sum(q[:, None, :] * k[None, :, :], axis=-1) * scale
    kpos = kstart_ref[w] + jax.lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
    visible = (kpos <= pos[:, None]) & (raw_tile < n_tiles)
    s = jnp.where(visible, s, NEG_INF)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(m > NEG_INF, m, 0.0)
    p = jnp.exp(s - m_safe[:, None])
    l = jnp.sum(p, axis=-1)
    if use_dot:
        o = jnp.dot(p, v)
    else:
        o = jnp.sum(p[:, :, None] * v[None, :, :], axis=1)
    l_safe = jnp.where(l > 0, l, 1.0)
    o_ref[w, h] = (o / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[w, h] = jnp.where(l > 0, m_safe + jnp.log(l_safe), NEG_INF)


def item_partials_pallas(q, q_pos, k_pages, v_pages, item_tile, item_block, item_kstart, *,
                         scale: float, kv_head_offset=0, interpret: bool = False):
    """Per-item partials with a Pallas kernel: grid (items, KV heads).

    On GPU (Triton lowering) q_tile * G, block_size and head_dim must be
    powers of two; tl.dot is used when q_tile * G >= 16.
    """
    from jax.experimental import pallas as pl

    n_tiles, q_tile, num_kv, groups, head_dim = q.shape
    block_size = k_pages.shape[1]
    num_items = item_tile.shape[0]
    rows = q_tile * groups
    q_t = q.transpose(0, 2, 1, 3, 4).reshape(n_tiles, num_kv, rows, head_dim)
    pos_t = jnp.repeat(q_pos, groups, axis=1)                     # row order (q, g)
    offset = jnp.reshape(jnp.asarray(kv_head_offset, jnp.int32), (1,))
    kernel = functools.partial(_pallas_kernel, scale=scale, n_tiles=n_tiles,
                               block_size=block_size, use_dot=rows >= 16)
    o, lse = pl.pallas_call(
        kernel,
        grid=(num_items, num_kv),
        out_shape=(jax.ShapeDtypeStruct((num_items, num_kv, rows, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((num_items, num_kv, rows), jnp.float32)),
        interpret=interpret,
    )(item_tile, item_block, item_kstart, offset, q_t, pos_t, k_pages, v_pages)
    o = o.reshape(num_items, num_kv, q_tile, groups, head_dim).transpose(0, 2, 1, 3, 4)
    lse = lse.reshape(num_items, num_kv, q_tile, groups).transpose(0, 2, 1, 3)
    return o, lse


# --------------------------------------------------------------------------


def micro_attention(q, q_pos, k_pages, v_pages, item_tile, item_block, item_kstart, *,
                    scale: float, kv_head_offset=0, impl: str = "reference",
                    interpret: bool = False):
    """Partial attention of every query tile over the items that name it.

    impl: "reference" (pure jnp) or "pallas" (interpret=True to run on CPU).
    """
    if impl == "reference":
        o_w, lse_w = item_partials_reference(q, q_pos, k_pages, v_pages, item_tile, item_block,
                                             item_kstart, scale=scale, kv_head_offset=kv_head_offset)
    elif impl == "pallas":
        o_w, lse_w = item_partials_pallas(q, q_pos, k_pages, v_pages, item_tile, item_block,
                                          item_kstart, scale=scale, kv_head_offset=kv_head_offset,
                                          interpret=interpret)
    else:
        raise ValueError(f"impl must be 'reference' or 'pallas', got {impl!r}")
    return merge_segments(o_w, lse_w, item_tile, q.shape[0])
