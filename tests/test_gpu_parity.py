"""Parity on a real GPU (`make gpu-check`; skipped where JAX sees no GPU).

  - The Triton MicroAttention, compiled and run on the GPU, against float64
    dense attention over the whole shape matrix (float32 and bfloat16 pages,
    head_dim 64/128, block 16/32, 1-8 query heads per KV head, decode and
    prefill tiles): within 1e-5, as in interpret mode.
  - The engine on a 1x1 GPU mesh (impl "auto", which must pick the Triton
    kernel) against transformers: float32 greedy ids equal and logprobs
    within 1e-4 (XLA's float32 matmuls run at "highest" precision for this:
    GPUs default to TF32), through chunked prefill and host swaps; bfloat16
    within the stated bfloat16 tolerance (first token equal, logprob 0.1).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_gpu_lowering import BLOCK_SIZES, GROUPS, HEAD_DIMS, PAGE_DTYPES, Q_TILES
from test_micro_attention import _paged_problem, _unpack


def _gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


pytestmark = pytest.mark.skipif(_gpu() is None, reason="needs a GPU (make gpu-check)")


@pytest.mark.parametrize("dtype,head_dim,block_size", list(itertools.product(
    PAGE_DTYPES, HEAD_DIMS, BLOCK_SIZES)))
def test_kernel_on_gpu_matches_dense_f64(dtype, head_dim, block_size):
    from distkv_jax.kernels.micro_attention import micro_attention

    dev = _gpu()
    for groups, q_tile in itertools.product(GROUPS, Q_TILES):
        new = [q_tile, 1, min(q_tile, 3)]
        rng = np.random.default_rng(head_dim * groups + q_tile)
        problem, refs = _paged_problem(rng, [5 * block_size + 3, 7, 40 * block_size], new,
                                       block_size, 2, groups, head_dim, q_tile, run=4,
                                       round_bf16=dtype == "bfloat16")
        args = {k: jax.device_put(jnp.asarray(v), dev) for k, v in problem.items()}
        if dtype == "bfloat16":
            for name in ("k_pages", "v_pages"):
                args[name] = jax.lax.bitcast_convert_type(args[name].astype(jnp.bfloat16), jnp.uint16)
            args["q"] = args["q"].astype(jnp.bfloat16)
        fn = jax.jit(lambda **a: micro_attention(**a, scale=head_dim ** -0.5, run=4, impl="pallas"))
        o, lse = fn(**args)
        err = _unpack(np.asarray(o), problem, refs, q_tile, 2, groups, head_dim)
        assert err <= 1e-5, (groups, q_tile, err)
        assert not np.isnan(np.asarray(o)).any()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from hf_models import make_hf_model

    path = str(tmp_path_factory.mktemp("gpu_llama"))
    return path, make_hf_model("llama_gqa", path)


@pytest.fixture(scope="module")
def reference(llama):
    from hf_models import hf_greedy_logprobs

    _, model = llama
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (70, 5, 33, 1)]
    return [(p, *hf_greedy_logprobs(model, p, 12)) for p in prompts]


@pytest.mark.parametrize("host_kv_blocks", [0, 16], ids=["fits", "swaps"])
def test_engine_float32_on_gpu_matches_transformers(llama, reference, host_kv_blocks):
    from distkv_jax import LLM, SamplingParams

    path, _ = llama
    kv_blocks = 64 if not host_kv_blocks else 8
    with jax.default_matmul_precision("highest"):
        llm = LLM(path, mesh="1x1", block_size=16, kv_blocks=kv_blocks,
                  host_kv_blocks=host_kv_blocks, max_num_batched_tokens=32, warm_start=False)
        assert llm.engine.runner.platform == "gpu" or llm.engine.runner.platform == "cuda"
        assert llm.engine.attention_impl == "pallas"
        outs = llm.generate([p for p, _, _ in reference],
                            SamplingParams(temperature=0, max_tokens=12, logprobs=1))
    for out, (_, toks, lps) in zip(outs, reference):
        comp = out.outputs[0]
        assert comp.token_ids == toks, out.error
        got = [comp.logprobs[i][t].logprob for i, t in enumerate(toks)]
        np.testing.assert_allclose(got, lps, atol=1e-4, rtol=0)
    if host_kv_blocks:
        assert llm.engine.stats["swapped_out_blocks"] > 0, llm.engine.stats


def test_engine_bfloat16_on_gpu(llama, reference):
    from distkv_jax import LLM, SamplingParams

    path, _ = llama
    llm = LLM(path, mesh="1x1", block_size=16, kv_blocks=64, dtype="bfloat16",
              max_num_batched_tokens=32, warm_start=False)
    assert llm.engine.attention_impl == "pallas"
    outs = llm.generate([p for p, _, _ in reference],
                        SamplingParams(temperature=0, max_tokens=4, logprobs=0))
    for out, (_, toks, lps) in zip(outs, reference):
        comp = out.outputs[0]
        assert comp.token_ids[0] == toks[0], out.error
        assert abs(comp.logprobs[0][toks[0]].logprob - lps[0]) < 0.1
