"""MicroAttention: partial attention of query tiles over paged KV blocks.

A work list says what to compute: item w attends query tile `item_tile[w]` to
page `item_block[w]`, whose first slot holds key position `item_kstart[w]`. A
query at position p sees the keys at positions <= p (causal; slots past the
sequence's end hold positions > p, so the same test hides them). Work is
proportional to the number of items, i.e. to the blocks actually attended,
never to a [batch, max_blocks] grid.

Items come in runs of `run` consecutive items that share one tile (the plan
pads each tile's items to a multiple of `run` with masked items). A run is
one unit of work: its `run` blocks are attended together (one matrix product
per KV head of [q_tile * G, D] x [D, run * block_size]) and yield one partial
(o, lse), normalized by its own softmax sum. Long contexts use long runs (big
products, few partials); short ones use short runs (little padding).

The partials of a tile are merged exactly (DESIGN.md section 2):

    lse = logsumexp_j lse_j,     o = sum_j exp(lse_j - lse) o_j

Empty partials carry lse = -inf and weigh nothing; the 0 * inf and
(-inf) - (-inf) cases are guarded explicitly.

Two implementations of the per-run step share one signature: a pure-jnp
reference and a Pallas kernel for GPUs (kernels/micro_attention_gpu.py,
lowered through Triton; run on CPU with interpret=True; impl="pallas", the
"auto" choice on CUDA). A third, native C++ kernel for XLA:CPU
(micro_attention_cpu.cc, via XLA FFI; impl="native", the "auto" choice on CPU)
fuses the block gather into the attention and returns per-tile results.

Shapes:
    q            [n_tiles, q_tile, Hkv, G, D]   G = query heads per KV head
    q_pos        [n_tiles, q_tile] int32        -1 marks a padding row
    k/v_pages    [P, block_size, Hkv_stored, D] heads kv_head_offset.. are used
    item_*       [W] int32, W a multiple of run; item_tile == n_tiles marks padding
    returns o    [n_tiles, q_tile, Hkv, G, D]   float32
            lse  [n_tiles, q_tile, Hkv, G]      float32
"""

from __future__ import annotations

import functools
import math

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
# per-run partials: reference

SCAN_STEP_BYTES = 2 << 20  # KV gathered per scan step: bounded, to stay in cache
MIN_SCAN_STEPS = 4         # at least this many steps (when there are as many runs), so that
                           # skipping padding-only steps trims the bucket padding finely


def _run_keys(run_tile, run_kstart, n_tiles: int, block_size: int):
    """Per run: is it real (not padding), its tile (clamped), and the key
    position of each of its run * block_size slots [S, n]."""
    valid = run_tile < n_tiles
    tile = jnp.minimum(run_tile, n_tiles - 1)
    kpos = (run_kstart[:, :, None] + jnp.arange(block_size, dtype=jnp.int32)).reshape(run_kstart.shape[0], -1)
    return valid, tile, kpos


def _runs_partials(q, q_pos, k_pages, v_pages, run_tile, run_blocks, run_kstart, scale,
                   kv_head_offset):
    """Partials of a batch of runs: run_tile [S], run_blocks/run_kstart [S, run].

    Operands are laid out as canonical batched matmuls ([S, Hkv] batch dims
    first): XLA:CPU runs "hgd,nhd->hgn" about 20x slower than the same product
    with K transposed to [h, n, d] first.
    """
    n_tiles, q_tile, num_kv, groups, head_dim = q.shape
    block_size = k_pages.shape[1]
    num_runs, run = run_blocks.shape
    rows = q_tile * groups
    n = run * block_size
    valid, tile, kpos = _run_keys(run_tile, run_kstart, n_tiles, block_size)
    qs = q[tile].astype(jnp.float32).transpose(0, 2, 1, 3, 4).reshape(num_runs, num_kv, rows, head_dim)
    pos = jnp.repeat(q_pos[tile], groups, axis=1)                       # [S, M], row order (q, g)
    kw, vw = as_kv(k_pages[run_blocks]), as_kv(v_pages[run_blocks])    # [S, run, bs, Hs, D]
    if not (isinstance(kv_head_offset, int) and kv_head_offset == 0 and num_kv == k_pages.shape[2]):
        kw = jax.lax.dynamic_slice_in_dim(kw, kv_head_offset, num_kv, axis=3)
        vw = jax.lax.dynamic_slice_in_dim(vw, kv_head_offset, num_kv, axis=3)
    kw = kw.reshape(num_runs, n, num_kv, head_dim).transpose(0, 2, 1, 3).astype(jnp.float32)
    vw = vw.reshape(num_runs, n, num_kv, head_dim).transpose(0, 2, 1, 3).astype(jnp.float32)
    s = jnp.einsum("shmd,shnd->shmn", qs, kw) * scale                   # [S, Hkv, M, N]
    visible = (kpos[:, None, :] <= pos[:, :, None]) & valid[:, None, None]  # [S, M, N]
    s = jnp.where(visible[:, None], s, NEG_INF)
    m_safe = _safe_max(jnp.max(s, axis=-1))
    p = jnp.exp(s - m_safe[..., None])                                  # masked -> exactly 0
    l = jnp.sum(p, axis=-1)
    o, lse = _finish(jnp.einsum("shmn,shnd->shmd", p, vw), l, m_safe)  # [S, Hkv, M, (D)]
    o = o.reshape(num_runs, num_kv, q_tile, groups, head_dim).transpose(0, 2, 1, 3, 4)
    lse = lse.reshape(num_runs, num_kv, q_tile, groups).transpose(0, 2, 1, 3)
    return o, lse


def _runs_partials_decode(q, q_pos, k_pages, v_pages, run_tile, run_blocks, run_kstart, scale):
    """_runs_partials for one query row per tile (decode), all stored KV heads.

    The gathered blocks [S, run, bs, Hkv, D] are used as they lie, as
    [S, keys * Hkv, D], without the per-head transpose copy: each run's rows
    (h, g) are multiplied with every (key, h') and the h' != h products are
    masked out. That is Hkv times the flops of the per-head products but no
    extra pass over the KV; on XLA:CPU it is ~1.3x faster for decode, where
    the KV bytes, not the flops, set the time.
    """
    n_tiles, _, num_kv, groups, head_dim = q.shape
    block_size = k_pages.shape[1]
    num_runs, run = run_blocks.shape
    n = run * block_size
    rows = num_kv * groups
    valid, tile, kpos = _run_keys(run_tile, run_kstart, n_tiles, block_size)
    qs = q[tile, 0].astype(jnp.float32).reshape(num_runs, rows, head_dim)        # [S, (h, g), D]
    kw = as_kv(k_pages[run_blocks]).reshape(num_runs, n * num_kv, head_dim).astype(jnp.float32)
    vw = as_kv(v_pages[run_blocks]).reshape(num_runs, n * num_kv, head_dim).astype(jnp.float32)
    s = jnp.einsum("smd,skd->smk", qs, kw) * scale                             # [S, (h, g), (n, h')]
    visible = (kpos <= q_pos[tile, 0][:, None]) & valid[:, None]                 # [S, n]
    visible = jnp.broadcast_to(visible[:, :, None], (num_runs, n, num_kv)).reshape(num_runs, 1, -1)
    # h' != h: a constant additive -inf (3-D, minor-axis reductions: cheap on CPU)
    other_head = ~jnp.eye(num_kv, dtype=bool)[:, None, None, :]                # [h, 1, 1, h']
    head_bias = jnp.where(jnp.broadcast_to(other_head, (num_kv, groups, n, num_kv)),
                          NEG_INF, 0.0).reshape(rows, n * num_kv)
    s = jnp.where(visible, s + head_bias, NEG_INF)
    m_safe = _safe_max(jnp.max(s, axis=-1))                                     # [S, (h, g)]
    p = jnp.exp(s - m_safe[..., None])                                          # masked -> 0
    l = jnp.sum(p, axis=-1)
    o, lse = _finish(jnp.einsum("smk,skd->smd", p, vw), l, m_safe)
    o = o.reshape(num_runs, num_kv, groups, head_dim)
    lse = lse.reshape(num_runs, num_kv, groups)
    return o[:, None], lse[:, None]


def run_partials_reference(q, q_pos, k_pages, v_pages, item_tile, item_block, item_kstart, *,
                           scale: float, run: int = 1, kv_head_offset=0):
    """Per-run (o [W/run, q_tile, Hkv, G, D], lse [W/run, q_tile, Hkv, G]), pure jnp.

    Runs are processed a few at a time under lax.scan: gathering a few MB of
    blocks per step keeps them in cache, where gathering all W blocks at once
    streams every block through memory twice more (measured ~3x slower on CPU).
    """
    num_runs = item_tile.shape[0] // run
    block_bytes = 2 * k_pages.dtype.itemsize * math.prod(k_pages.shape[1:3]) * q.shape[-1]
    per_step = max(1, min(num_runs, SCAN_STEP_BYTES // (block_bytes * run),
                          -(-num_runs // MIN_SCAN_STEPS)))
    steps = -(-num_runs // per_step)
    extra = steps * per_step - num_runs
    tiles = item_tile.reshape(num_runs, run)[:, 0]
    blocks = item_block.reshape(num_runs, run)
    kstart = item_kstart.reshape(num_runs, run)
    if extra:  # pad to whole scan steps with runs of padding
        tiles = jnp.concatenate([tiles, jnp.full((extra,), q.shape[0], tiles.dtype)])
        blocks = jnp.concatenate([blocks, jnp.zeros((extra, run), blocks.dtype)])
        kstart = jnp.concatenate([kstart, jnp.zeros((extra, run), kstart.dtype)])
    xs = (tiles.reshape(steps, per_step), blocks.reshape(steps, per_step, run),
          kstart.reshape(steps, per_step, run))

    whole_heads = (isinstance(kv_head_offset, int) and kv_head_offset == 0
                   and q.shape[2] == k_pages.shape[2])
    # The decode form spends Hkv times the flops to save a transpose copy of
    # the KV: worth it only while G * (Hkv - 1) is small (measured on CPU:
    # 1.3x faster at Hkv=4, G=2; 2x slower at Hkv=8, G=4).
    decode_form = q.shape[1] == 1 and whole_heads and q.shape[3] * (q.shape[2] - 1) <= 8

    def partials(x):
        if decode_form:
            return _runs_partials_decode(q, q_pos, k_pages, v_pages, *x, scale)
        return _runs_partials(q, q_pos, k_pages, v_pages, *x, scale, kv_head_offset)

    def body(_, x):
        # The plan pads each instance's work list at its end (bucketed run
        # count): steps holding only padding are skipped at run time.
        def empty():
            shape = (per_step,) + q.shape[1:]
            return (jnp.zeros(shape, jnp.float32), jnp.full(shape[:-1], NEG_INF, jnp.float32))
        return None, jax.lax.cond(jnp.any(x[0] < q.shape[0]), partials, lambda _: empty(), x)

    if steps == 1:  # the whole work list fits one step: no loop to pay for
        o, lse = partials(tuple(x[0] for x in xs))
        return o[:num_runs], lse[:num_runs]
    _, (o, lse) = jax.lax.scan(body, None, xs)
    o = o.reshape((-1,) + o.shape[2:])[:num_runs]
    lse = lse.reshape((-1,) + lse.shape[2:])[:num_runs]
    return o, lse


# --------------------------------------------------------------------------


IMPLS = ("auto", "native", "reference", "pallas")


def resolve_impl(impl: str, platform: str | None = None, head_dim: int | None = None,
                 block_size: int | None = None) -> str:
    """The implementation `impl` means on `platform` (default: JAX's backend).

    'auto': on CPU the native kernel where it builds (else the jnp
    reference); on CUDA GPUs the Triton Pallas kernel where the shapes allow
    it (head_dim, block_size: see micro_attention_gpu.gpu_supports), else the
    reference. The choice is logged once per (platform, choice).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform == "cpu":
        from . import native

        if native.available():
            return _chosen(platform, "native", "the native C++ kernel (XLA FFI)")
        _warn_fallback(native.error())
        return _chosen(platform, "reference", "native kernel unavailable")
    if platform in ("cuda", "gpu"):
        from .micro_attention_gpu import gpu_supports

        why = gpu_supports(head_dim, block_size) if head_dim and block_size else None
        if why is None:
            return _chosen(platform, "pallas", "the Triton Pallas kernel")
        return _chosen(platform, "reference", f"Triton kernel unsupported: {why}")
    return _chosen(platform, "reference", "no kernel for this platform")


@functools.lru_cache(maxsize=None)
def _chosen(platform: str, impl: str, why: str) -> str:
    import logging

    logging.getLogger("distkv_jax").info("MicroAttention on %s: impl=%s (%s)", platform, impl, why)
    return impl


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    import warnings

    warnings.warn(f"native MicroAttention unavailable, using the jnp reference: {reason}",
                  RuntimeWarning, stacklevel=3)


def as_kv(pages):
    """Pages as KV values: uint16 pages hold bfloat16 bits (kv_pool.storage_dtype)."""
    if pages.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(pages, jnp.bfloat16)
    return pages


def micro_attention(q, q_pos, k_pages, v_pages, item_tile, item_block, item_kstart, *,
                    scale: float, run: int = 1, kv_head_offset=0, impl: str = "reference",
                    interpret: bool = False):
    """Partial attention of every query tile over the items that name it.

    run: items per run (static; the work list holds runs of one tile each).
    impl: "reference" (pure jnp), "pallas" (the Triton GPU kernel; interpret=True
    to run it on CPU),
    "native" (the C++ CPU kernel, kernels/micro_attention_cpu.cc) or "auto".
    Pages are float32, bfloat16, or uint16 holding bfloat16 bits (how the
    engine stores bfloat16 KV: see kv_pool.storage_dtype).
    """
    if item_tile.shape[0] % run:
        raise ValueError(f"work list length {item_tile.shape[0]} is not a multiple of run={run}")
    impl = resolve_impl(impl)
    args = (q, q_pos, k_pages, v_pages, item_tile, item_block, item_kstart)
    if impl == "native":  # per-tile results directly: no per-run partials to merge
        from .native import micro_attention_native

        return micro_attention_native(*args, scale=scale, kv_head_offset=kv_head_offset)
    if impl == "reference":
        o_r, lse_r = run_partials_reference(*args, scale=scale, run=run,
                                            kv_head_offset=kv_head_offset)
    elif impl == "pallas":
        from .micro_attention_gpu import run_partials_gpu

        o_r, lse_r = run_partials_gpu(*args, scale=scale, run=run,
                                      kv_head_offset=kv_head_offset, interpret=interpret)
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    run_tile = item_tile.reshape(-1, run)[:, 0]
    return merge_segments(o_r, lse_r, run_tile, q.shape[0])
