"""MicroAttention kernels on one device: reference, Pallas (interpret mode) and
the native C++ kernel against float64 dense attention, and the exact merge of
partials."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distkv_jax.attention_plan import MASKED
from distkv_jax.kernels import native
from distkv_jax.kernels.micro_attention import merge_axis, merge_segments, micro_attention, resolve_impl

from attention_reference import dense_attention_f64


def _paged_problem(rng, seq_lens, new_tokens, block_size, num_kv, groups, head_dim, q_tile,
                   num_pages=None, item_pad=3, run=1, round_bf16=False):
    """Sequences with KV in randomly chosen pages; the last `new_tokens` of each
    are queries, cut into tiles of q_tile rows. Returns kernel inputs plus the
    dense per-row reference. round_bf16: queries and KV are bfloat16 values
    (held in float32), so that bfloat16 kernels see exactly what the
    reference sees."""
    rnd = (lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))) \
        if round_bf16 else (lambda x: x)
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_pages = num_pages or sum(blocks_needed) + 4
    page_ids = rng.permutation(num_pages)
    k_pages = rnd(rng.standard_normal((num_pages, block_size, num_kv, head_dim)).astype(np.float32))
    v_pages = rnd(rng.standard_normal((num_pages, block_size, num_kv, head_dim)).astype(np.float32))
    tiles_q, tiles_pos, items, refs = [], [], [], []
    used = 0
    for n, nb, new in zip(seq_lens, blocks_needed, new_tokens):
        table = page_ids[used:used + nb]
        used += nb
        pos = np.arange(n)
        keys = k_pages[table[pos // block_size], pos % block_size]
        values = v_pages[table[pos // block_size], pos % block_size]
        qpos = np.arange(n - new, n)
        q = rnd(rng.standard_normal((new, num_kv * groups, head_dim)).astype(np.float32))
        refs.append((q, dense_attention_f64(q, keys, values, qpos, 1 / np.sqrt(head_dim))))
        for t0 in range(0, new, q_tile):
            rows = slice(t0, min(t0 + q_tile, new))
            tq = np.zeros((q_tile, num_kv, groups, head_dim), np.float32)
            tp = np.full(q_tile, -1, np.int32)
            cnt = rows.stop - rows.start
            tq[:cnt] = q[rows].reshape(cnt, num_kv, groups, head_dim)
            tp[:cnt] = qpos[rows]
            tile = len(tiles_q)
            tiles_q.append(tq)
            tiles_pos.append(tp)
            mine = [(tile, table[lb], lb * block_size) for lb in range(int(tp.max()) // block_size + 1)]
            rng.shuffle(mine)  # the merge must not depend on item order
            mine += [(tile, 0, MASKED)] * (-len(mine) % run)  # pad the tile's runs
            items.append(mine)
    n_tiles = len(tiles_q)
    order = rng.permutation(len(items))  # runs of different tiles in any order
    items = [it for k in order for it in items[k]]
    items += [(n_tiles, 0, 0)] * (item_pad * run)  # padding runs
    item_tile, item_block, item_kstart = (np.array(c, np.int32) for c in zip(*items))
    return dict(q=np.stack(tiles_q), q_pos=np.stack(tiles_pos), k_pages=k_pages, v_pages=v_pages,
                item_tile=item_tile, item_block=item_block, item_kstart=item_kstart), refs


def _unpack(o, problem, refs, q_tile, num_kv, groups, head_dim):
    """Tile outputs back to per-sequence rows, compared with the f64 reference."""
    tile = 0
    err = 0.0
    for q, ref in refs:
        new = q.shape[0]
        rows = []
        for t0 in range(0, new, q_tile):
            cnt = min(q_tile, new - t0)
            rows.append(np.asarray(o[tile, :cnt]).reshape(cnt, num_kv * groups, head_dim))
            tile += 1
        err = max(err, np.abs(np.concatenate(rows) - ref).max())
    return err


CASES = [
    # seq_lens, new_tokens, block_size, num_kv, groups, head_dim, q_tile, run
    ([37, 5, 64], [1, 1, 1], 8, 2, 2, 16, 1, 1),      # decode, GQA
    ([37, 5, 64], [1, 1, 1], 8, 2, 2, 16, 1, 4),      # decode, runs of 4 blocks
    ([37, 16, 50], [9, 16, 3], 16, 2, 1, 8, 4, 2),    # chunked prefill, MHA
    ([1, 33], [1, 33], 8, 1, 4, 16, 8, 1),            # whole prompt, MQA
    ([37, 5, 64], [1, 1, 1], 8, 4, 2, 16, 1, 2),      # decode, 4 KV heads: the all-heads product
    ([37, 5, 64], [1, 1, 1], 8, 8, 4, 16, 1, 2),      # decode, 8 KV heads: per-head products
    ([300] * 6 + [40] * 10, [1] * 16, 8, 2, 2, 16, 1, 4),  # 236 items: the native kernel's threads
    ([200, 90], [64, 40], 16, 2, 2, 16, 8, 2),        # prefill tiles over many blocks, threaded
    ([300, 70], [256, 17], 16, 8, 1, 8, 16, 1),       # the workload bench's prefill: 16 rows x 1 group
    ([90, 40], [30, 40], 16, 2, 3, 16, 8, 2),         # 24 rows per KV head: a partial row block
    # the native kernel's fixed-size row path (head_dim, block a multiple of
    # 16; fewer than 8 rows per KV head): keys shared by the group's heads
    ([37, 5, 64, 130], [1, 1, 1, 1], 16, 2, 4, 64, 1, 4),   # decode, 4 query heads per KV head
    ([40, 77], [3, 5], 32, 2, 2, 64, 2, 2),           # 2-row tiles: causal masks inside 32-key blocks
    ([300] * 4 + [20] * 8, [1] * 12, 16, 1, 8, 128, 1, 4),  # MQA, head_dim 128, threaded
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["reference", "pallas", "native"])
def test_micro_attention_matches_dense_f64(case, impl):
    seq_lens, new, bs, num_kv, groups, head_dim, q_tile, run = case
    rng = np.random.default_rng(sum(seq_lens))
    problem, refs = _paged_problem(rng, seq_lens, new, bs, num_kv, groups, head_dim, q_tile, run=run)
    o, lse = micro_attention(**{k: jnp.asarray(v) for k, v in problem.items()},
                             scale=1 / np.sqrt(head_dim), run=run, impl=impl, interpret=True)
    assert _unpack(o, problem, refs, q_tile, num_kv, groups, head_dim) <= 1e-5
    # padding rows attend nothing: lse = -inf and o = 0, never NaN
    pad = problem["q_pos"] < 0
    assert np.all(np.isneginf(np.asarray(lse)[pad])) and not np.isnan(np.asarray(o)).any()
    assert np.all(np.asarray(o)[pad] == 0)


@pytest.mark.parametrize("run", [1, 4])
def test_pallas_equals_reference(run):
    rng = np.random.default_rng(7)
    problem, _ = _paged_problem(rng, [45, 20], [5, 20], 8, 2, 2, 16, 4, run=run)
    args = {k: jnp.asarray(v) for k, v in problem.items()}
    ref = micro_attention(**args, scale=0.25, run=run, impl="reference")
    pal = micro_attention(**args, scale=0.25, run=run, impl="pallas", interpret=True)
    for a, b in zip(ref, pal):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=0)


def test_kv_head_offset_selects_heads():
    """Pages stored with more KV heads than the queries use (KV replicated over tp)."""
    rng = np.random.default_rng(3)
    problem, _ = _paged_problem(rng, [30], [1], 8, 4, 2, 8, 1)
    args = {k: jnp.asarray(v) for k, v in problem.items()}
    full = micro_attention(**args, scale=0.3)[0]
    for impl in ("reference", "pallas", "native"):
        part = micro_attention(**dict(args, q=args["q"][:, :, 2:3]), scale=0.3, kv_head_offset=2,
                               impl=impl, interpret=True)[0]
        np.testing.assert_allclose(np.asarray(part), np.asarray(full[:, :, 2:3]), atol=1e-6)


def test_native_kernel_builds_and_is_the_cpu_default():
    """The C++ kernel compiles here (CI has g++) and "auto" picks it on CPU."""
    assert native.available(), native.error()
    assert resolve_impl("auto") == "native"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("fast")


@pytest.mark.parametrize("q_tile", [1, 4, 16])  # the fixed-size row path (1), lanes (4, 16)
def test_native_bfloat16_pages_match_reference(q_tile):
    rng = np.random.default_rng(11)
    problem, _ = _paged_problem(rng, [70, 33], [20, 1], 16, 2, 2, 16, q_tile, run=2)
    args = {k: jnp.asarray(v) for k, v in problem.items()}
    for name in ("k_pages", "v_pages"):
        args[name] = args[name].astype(jnp.bfloat16)
    ref = micro_attention(**args, scale=0.25, run=2, impl="reference")
    nat = micro_attention(**args, scale=0.25, run=2, impl="native")
    for a, b in zip(ref, nat):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=0)


PAIRS_CASES = [
    # seq_lens, new_tokens, block_size, num_kv, groups, head_dim, q_tile
    ([300, 70], [256, 17], 16, 2, 2, 64, 16),     # the engine's prefill tiles: 32 rows per KV head
    ([90, 40], [30, 40], 32, 2, 3, 64, 8),        # 24 rows: a partial row block; 32-key blocks
    ([130, 20], [64, 20], 16, 1, 8, 128, 2),      # MQA, head_dim 128
    ([50, 33], [50, 9], 16, 4, 1, 32, 8),         # 8 rows per KV head: half-empty lanes
]

_PORTABLE = """
import sys, numpy as np, jax.numpy as jnp
from distkv_jax.kernels.micro_attention import micro_attention
a = {k: jnp.asarray(v) for k, v in np.load(sys.argv[1]).items()}
for name in ("k_pages", "v_pages"):
    a[name] = a[name].astype(jnp.bfloat16)
o, lse = micro_attention(**a, scale=float(sys.argv[3]), run=1, impl="native")
np.savez(sys.argv[2], o=np.asarray(o), lse=np.asarray(lse))
"""


@pytest.mark.parametrize("case", PAIRS_CASES)
def test_native_bfloat16_prefill_pairs_path(case, tmp_path):
    """Prefill tiles over bfloat16 pages (head_dim a multiple of 32, blocks of
    16 keys) take bfloat16 pair products (VDPBF16PS where the CPU has it):
    scores are exact products of the bfloat16 queries and keys, the softmax
    is float32, and the probabilities are rounded to bfloat16 before the
    product with V, as transformers' bfloat16 attention does. Against float64
    dense attention: lse within float32 rounding, outputs within that
    probability rounding (a relative 2^-9 of the values: 4e-3 of these); the
    portable build (no pair products) stays within 1e-5."""
    seq_lens, new, bs, num_kv, groups, head_dim, q_tile = case
    rng = np.random.default_rng(sum(seq_lens) + head_dim)
    problem, refs = _paged_problem(rng, seq_lens, new, bs, num_kv, groups, head_dim, q_tile,
                                   run=1, round_bf16=True)
    args = {k: jnp.asarray(v) for k, v in problem.items()}
    for name in ("k_pages", "v_pages"):
        args[name] = args[name].astype(jnp.bfloat16)
    scale = 1 / np.sqrt(head_dim)
    o, lse = micro_attention(**args, scale=scale, run=1, impl="native")
    ref_o, ref_lse = micro_attention(**args, scale=scale, run=1, impl="reference")
    err = _unpack(o, problem, refs, q_tile, num_kv, groups, head_dim)
    assert err <= 4e-3, err
    real = problem["q_pos"] >= 0
    np.testing.assert_allclose(np.asarray(lse)[real], np.asarray(ref_lse)[real], rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(np.asarray(lse)[~real])) and np.all(np.asarray(o)[~real] == 0)
    if not native.dense_vectorized():
        return  # no AVX512_BF16: the portable loop is the only build
    np.savez(tmp_path / "in.npz", **problem)
    env = dict(os.environ, DISTKV_NATIVE_PORTABLE="1", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _PORTABLE, str(tmp_path / "in.npz"),
                    str(tmp_path / "out.npz"), str(scale)], env=env, check=True)
    port = np.load(tmp_path / "out.npz")
    assert _unpack(port["o"], problem, refs, q_tile, num_kv, groups, head_dim) <= 1e-5
    # the pair products are what differ from the portable loop, and only by
    # the probabilities' rounding
    assert 0 < np.abs(np.asarray(o) - port["o"]).max() <= 4e-3


@pytest.mark.parametrize("impl", ["native", "reference", "pallas"])
def test_bfloat16_bits_as_uint16_pages_equal_bfloat16_pages(impl):
    """The engine stores bfloat16 KV as its bits (uint16): every kernel reads
    them as the same bfloat16 values, bit for bit the same results."""
    rng = np.random.default_rng(12)
    problem, _ = _paged_problem(rng, [70, 33], [20, 1], 16, 2, 2, 16, 4, run=2)
    bf = {k: jnp.asarray(v) for k, v in problem.items()}
    for name in ("k_pages", "v_pages"):
        bf[name] = bf[name].astype(jnp.bfloat16)
    bits = dict(bf, **{name: jax.lax.bitcast_convert_type(bf[name], jnp.uint16)
                       for name in ("k_pages", "v_pages")})
    kw = dict(scale=0.25, run=2, impl=impl, interpret=impl == "pallas")
    for a, b in zip(micro_attention(**bf, **kw), micro_attention(**bits, **kw)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_native_items_of_a_tile_need_not_be_adjacent():
    """With runs of one item the work list may interleave tiles: a tile's
    accumulators are put away and taken up again (prefill path)."""
    rng = np.random.default_rng(13)
    problem, refs = _paged_problem(rng, [60, 45], [32, 20], 8, 2, 2, 16, 8, item_pad=0)
    perm = rng.permutation(len(problem["item_tile"]))
    for name in ("item_tile", "item_block", "item_kstart"):
        problem[name] = problem[name][perm]
    o, lse = micro_attention(**{k: jnp.asarray(v) for k, v in problem.items()},
                             scale=1 / np.sqrt(16), run=1, impl="native")
    assert _unpack(o, problem, refs, 8, 2, 2, 16) <= 1e-5


_ONE_THREAD = """
import sys, numpy as np, jax.numpy as jnp
from distkv_jax.kernels.micro_attention import micro_attention
a = dict(np.load(sys.argv[1]))
o, lse = micro_attention(**{k: jnp.asarray(v) for k, v in a.items()}, scale=0.25, run=4, impl="native")
np.savez(sys.argv[2], o=np.asarray(o), lse=np.asarray(lse))
"""


def test_native_result_does_not_depend_on_thread_count(tmp_path):
    """Tiles are split into ranges run on XLA's pool threads; a tile's items
    are always summed in work-list order by one thread, so one thread or
    several give the same bits (hosts of a multi-host job must agree)."""
    rng = np.random.default_rng(12)
    problem, refs = _paged_problem(rng, [300] * 6 + [40] * 10, [1] * 16, 8, 2, 2, 16, 1, run=4)
    many = micro_attention(**{k: jnp.asarray(v) for k, v in problem.items()}, scale=0.25, run=4,
                           impl="native")
    np.savez(tmp_path / "in.npz", **problem)
    env = dict(os.environ, DISTKV_CPU_THREADS="1", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _ONE_THREAD, str(tmp_path / "in.npz"),
                    str(tmp_path / "out.npz")], env=env, check=True)
    one = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(np.asarray(many[0]), one["o"])
    np.testing.assert_array_equal(np.asarray(many[1]), one["lse"])
    assert _unpack(one["o"], problem, refs, 1, 2, 2, 16) <= 1e-5


def test_merge_is_exact_and_guards_empty():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((3, 40)) * 3           # 3 rows, 40 keys
    v = rng.standard_normal((40, 5))
    full = np.exp(s - s.max(1, keepdims=True)) @ v / np.exp(s - s.max(1, keepdims=True)).sum(1)[:, None]
    cuts = [0, 7, 7, 25, 40]                       # includes an empty chunk
    os_, lses = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if a == b:
            os_.append(np.zeros((3, 5)))
            lses.append(np.full(3, -np.inf))
            continue
        m = s[:, a:b].max(1)
        p = np.exp(s[:, a:b] - m[:, None])
        os_.append(p @ v[a:b] / p.sum(1)[:, None])
        lses.append(m + np.log(p.sum(1)))
    o, lse = merge_axis(jnp.asarray(np.stack(os_), jnp.float32), jnp.asarray(np.stack(lses), jnp.float32))
    np.testing.assert_allclose(np.asarray(o), full, atol=1e-5)
    ref_lse = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=1e-5)
    # all-empty rows stay empty, with no NaN
    o, lse = merge_axis(jnp.zeros((2, 3, 5)), jnp.full((2, 3), -jnp.inf))
    assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))
    # segment form: a segment nobody names is empty; an out-of-range id is dropped
    o, lse = merge_segments(jnp.asarray(np.stack(os_), jnp.float32), jnp.asarray(np.stack(lses), jnp.float32),
                            jnp.array([0, 0, 0, 5]), 2)
    assert np.all(np.isneginf(np.asarray(lse)[1])) and not np.isnan(np.asarray(o)).any()
