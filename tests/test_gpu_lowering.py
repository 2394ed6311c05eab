"""The GPU path, checked on this CPU: the Triton MicroAttention lowers for CUDA
over the shape matrix a GPU user meets, its interpret-mode numerics equal
float64 dense attention, and the engine's whole step (shard_map and its
collectives, sampling) plus its KV copy and host-swap programs lower for CUDA
with the kernel inside, for every bucket shape a mixed workload compiles.

Lowering stops at Triton IR inside the StableHLO module: compiling that IR to
PTX, and running it, needs a GPU (`make gpu-check`)."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distkv_jax import LLM, SamplingParams
from distkv_jax.kernels.micro_attention import micro_attention, resolve_impl
from distkv_jax.kernels.micro_attention_gpu import gpu_supports, padded_rows

from test_micro_attention import _paged_problem, _unpack

TRITON_CALL = "__gpu$xla.gpu.triton"
NATIVE_CALL = "distkv_micro_attention"

# the shape matrix: page dtype (bfloat16 stored as its bits, as the engine
# does), head_dim, block_size, query heads per KV head, decode / prefill tiles
PAGE_DTYPES = {"float32": (jnp.float32, jnp.float32), "bfloat16": (jnp.bfloat16, jnp.uint16)}
HEAD_DIMS = (64, 128)
BLOCK_SIZES = (16, 32)
GROUPS = (1, 2, 4, 8)
Q_TILES = (1, 8)


def _lower_kernel(q_dtype, page_dtype, head_dim, block_size, groups, q_tile, pages=37,
                  num_kv=2, run=4, items=16):
    sds = jax.ShapeDtypeStruct
    q = sds((4, q_tile, num_kv, groups, head_dim), q_dtype)
    q_pos = sds((4, q_tile), jnp.int32)
    kv = sds((pages, block_size, num_kv, head_dim), page_dtype)
    it = sds((items,), jnp.int32)
    f = jax.jit(lambda *a: micro_attention(*a, scale=head_dim ** -0.5, run=run, impl="pallas"))
    return f.trace(q, q_pos, kv, kv, it, it, it).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype,head_dim,block_size", list(itertools.product(
    PAGE_DTYPES, HEAD_DIMS, BLOCK_SIZES)))
def test_kernel_lowers_for_cuda(dtype, head_dim, block_size):
    q_dtype, page_dtype = PAGE_DTYPES[dtype]
    for groups, q_tile in itertools.product(GROUPS, Q_TILES):
        text = _lower_kernel(q_dtype, page_dtype, head_dim, block_size, groups, q_tile)
        assert text.count(TRITON_CALL) == 1, (groups, q_tile)


def test_kernel_reads_the_pool_in_place():
    """The pool reaches the Triton call as it is stored: no whole-pool
    conversion (bfloat16 bits are bitcast inside the kernel), copy or staging,
    at a pool size past 4 GiB (64-bit offsets)."""
    pages = 600_000  # x 16 x 8 x 128 x 2 bytes = 19.7 GB per pool
    sds = jax.ShapeDtypeStruct
    q = sds((8, 1, 8, 4, 128), jnp.bfloat16)
    kv = sds((pages, 16, 8, 128), jnp.uint16)
    it = sds((64,), jnp.int32)
    f = jax.jit(lambda *a: micro_attention(*a, scale=0.088, run=8, impl="pallas"))
    text = f.trace(q, sds((8, 1), jnp.int32), kv, kv, it, it, it).lower(
        lowering_platforms=("cuda",)).as_text()
    pool_type = f"tensor<{pages}x16x8x128x"
    uses = [line for line in text.splitlines() if pool_type in line]
    assert uses and all(TRITON_CALL in line or "func.func" in line for line in uses), uses


def test_auto_picks_the_gpu_kernel_on_cuda():
    assert resolve_impl("auto", "cpu") == "native"
    assert resolve_impl("auto", "cuda", 128, 16) == "pallas"
    assert resolve_impl("auto", "gpu", 64, 32) == "pallas"
    # shapes Triton's tl.dot cannot take: the jnp reference, with the reason logged
    assert resolve_impl("auto", "cuda", 80, 16) == "reference"
    assert resolve_impl("auto", "cuda", 128, 8) == "reference"
    assert gpu_supports(96, 16) and gpu_supports(128, 8) and gpu_supports(128, 16) is None
    assert [padded_rows(r) for r in (1, 4, 8, 16, 24, 64)] == [16, 16, 16, 16, 32, 64]


# interpret-mode numerics over the matrix: every value of every factor, in a
# covering set of cases (all combinations would take minutes in interpret mode)
NUMERIC_CASES = [
    # dtype, head_dim, block_size, groups, q_tile
    ("float32", 64, 16, 1, 1),
    ("float32", 128, 32, 2, 8),
    ("float32", 64, 32, 4, 1),
    ("float32", 128, 16, 8, 8),
    ("bfloat16", 64, 16, 8, 1),
    ("bfloat16", 128, 32, 4, 8),
    ("bfloat16", 64, 32, 2, 8),
    ("bfloat16", 128, 16, 1, 1),
    ("float32", 64, 16, 3, 1),   # 3 rows: padded to 16
]


@pytest.mark.parametrize("case", NUMERIC_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_kernel_interpret_matches_dense_f64(case):
    dtype, head_dim, block_size, groups, q_tile = case
    new = [q_tile, 1, min(q_tile, 3)] if q_tile > 1 else [1, 1, 1]
    rng = np.random.default_rng(head_dim + block_size + groups)
    problem, refs = _paged_problem(rng, [3 * block_size + 5, 7, 2 * block_size], new, block_size,
                                   2, groups, head_dim, q_tile, run=2,
                                   round_bf16=dtype == "bfloat16")
    args = {k: jnp.asarray(v) for k, v in problem.items()}
    if dtype == "bfloat16":  # exact: the values are bfloat16 already
        for name in ("k_pages", "v_pages"):
            args[name] = jax.lax.bitcast_convert_type(args[name].astype(jnp.bfloat16), jnp.uint16)
        args["q"] = args["q"].astype(jnp.bfloat16)
    o, lse = micro_attention(**args, scale=1 / np.sqrt(head_dim), run=2, impl="pallas",
                             interpret=True)
    assert _unpack(o, problem, refs, q_tile, 2, groups, head_dim) <= 1e-5
    pad = problem["q_pos"] < 0
    assert np.all(np.isneginf(np.asarray(lse)[pad])) and np.all(np.asarray(o)[pad] == 0)


# ---------------------------------------------------------------- the engine


def _mixed_workload(dtype: str, mesh: str):
    """Chunked prefill, decode, n=2 (fork copies), penalties, logprobs and a
    pool small enough that requests are swapped to host and back."""
    llm = LLM("tiny", mesh=mesh, dtype=dtype, block_size=16, kv_blocks=4, host_kv_blocks=16,
              max_num_batched_tokens=32, warm_start=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (70, 40, 5, 21)]
    params = [SamplingParams(temperature=0, max_tokens=12),
              SamplingParams(temperature=0.8, seed=1, max_tokens=10, n=2),
              SamplingParams(temperature=0, max_tokens=8, presence_penalty=0.5, logprobs=2),
              SamplingParams(temperature=0, max_tokens=30)]
    outs = llm.generate(prompts, params)
    assert all(o.outputs[0].token_ids for o in outs)
    return llm


@pytest.mark.parametrize("dtype,mesh", [("float32", "2x4"), ("bfloat16", "2x2")])
def test_engine_programs_lower_for_cuda(dtype, mesh):
    llm = _mixed_workload(dtype, mesh)
    runner = llm.engine.runner
    stats = llm.engine.stats
    # the small pool sends older blocks to the host tier (host-attended KV)
    assert sum(llm.engine.kv.offloaded) > 0 and stats["swapped_out_blocks"] > 0, stats
    assert runner.attention_impl == "native"  # this CPU ran the native kernel
    shapes = sorted(runner.shapes_run, key=str)
    assert {s.q_tile for s in shapes} >= {1, runner.prefill_q_tile}, shapes  # decode + prefill
    assert any(s.host_runs for s in shapes) and not all(s.host_runs for s in shapes), shapes
    for shape in shapes:
        text = runner.lower_step(shape, platform="cuda").as_text()
        # one Triton MicroAttention per layer body (layers are scanned)
        assert TRITON_CALL in text, shape
        assert re.search(r"all_to_all|all_gather", text), shape  # DistAttention's collectives
        # the native CPU kernel only as the host's part, over host memory
        native = [line for line in text.splitlines() if NATIVE_CALL in line]
        assert bool(native) == bool(shape.host_runs), shape
        assert all('_xla_compute_type = "host"' in line for line in native), native
    copies = runner.lower_copies("cuda")
    kinds = {d for d, _ in copies}
    assert kinds == {"move", "out", "in"}, kinds  # forks, swap out, swap in
    for (direction, size), lowered in copies.items():
        text = lowered.as_text()
        if direction != "move":
            assert "pinned_host" in text, (direction, size)
