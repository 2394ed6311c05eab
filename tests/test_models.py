"""Flax models loaded by the project against transformers (PyTorch) models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distkv_jax.mesh import make_mesh
from distkv_jax.models.loader import load_params
from distkv_jax.models.params import param_specs, tree_from_specs
from distkv_jax.models.reference import dense_model, forward_logits, greedy_generate
from distkv_jax.models.attention import DenseKVCache, DenseMeta

from hf_models import FAMILIES, hf_greedy, hf_logits, make_hf_model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """name -> (model dir, torch model), built lazily once per module."""
    built = {}

    def get(name):
        if name not in built:
            path = str(tmp_path_factory.mktemp(name))
            built[name] = (path, make_hf_model(name, path))
        return built[name]

    return get


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh("1x1")


def _tokens(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, size=shape).astype(np.int32)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_float32(hf, mesh1, family):
    path, torch_model = hf(family)
    cfg, params = load_params(path, mesh1, "float32")
    tokens = _tokens(cfg.vocab_size, (2, 40), seed=1)
    ours = np.asarray(forward_logits(cfg, params, tokens))
    ref = hf_logits(torch_model, tokens)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


# bfloat16 has an 8-bit mantissa: compared with transformers' float32 logits,
# our bfloat16 logits are within BF16_ATOL (logits here span about +-3); the
# test also requires our error to be no worse than 2x transformers' own
# bfloat16 error, so a real bug cannot hide inside the tolerance.
BF16_ATOL = 0.1


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_bias_tied"])
def test_logits_bfloat16(hf, mesh1, family):
    import torch
    import transformers

    path, torch_model = hf(family)
    cfg, params = load_params(path, mesh1, "bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    tokens = _tokens(cfg.vocab_size, (2, 24), seed=2)
    ours = np.asarray(forward_logits(cfg, params, tokens, jnp.bfloat16).astype(jnp.float32))
    ref32 = hf_logits(torch_model, tokens)
    # A separate bfloat16 copy: casting the shared fixture model would round its weights.
    torch_bf16 = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="eager")
    ref16 = hf_logits(torch_bf16, tokens)
    ours_err = np.abs(ours - ref32).max()
    hf_err = np.abs(ref16 - ref32).max()
    print(f"bf16 max abs error vs float32: ours {ours_err:.4f}, transformers {hf_err:.4f}")
    assert ours_err <= BF16_ATOL, (ours_err, hf_err)
    assert ours_err <= 2 * hf_err + 1e-3, (ours_err, hf_err)


@pytest.mark.parametrize("family", ["llama_gqa", "llama3_rope", "qwen2_bias_tied"])
def test_greedy_matches_transformers_generate(hf, mesh1, family):
    path, torch_model = hf(family)
    cfg, params = load_params(path, mesh1, "float32")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in (5, 17, 1, 30)]
    ours, logprobs = greedy_generate(cfg, params, prompts, max_new_tokens=32)
    for prompt, got, lps in zip(prompts, ours, logprobs):
        assert got == hf_greedy(torch_model, prompt, 32)
        assert len(lps) == 32 and all(lp <= 0 for lp in lps)


def test_mesh_2x4_matches_1x1(hf, mesh1):
    path, _ = hf("llama_gqa")
    mesh = make_mesh("2x4")
    cfg, p1 = load_params(path, mesh1)
    _, p8 = load_params(path, mesh)
    # Sharded over tp where the layer is tensor-parallel, replicated over inst.
    q = p8["params"]["layers"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, "tp")
    assert len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (2, 64, 16)
    tokens = _tokens(cfg.vocab_size, (2, 33), seed=4)
    np.testing.assert_allclose(np.asarray(forward_logits(cfg, p8, tokens)),
                               np.asarray(forward_logits(cfg, p1, tokens)), atol=1e-5, rtol=0)
    out1, _ = greedy_generate(cfg, p1, [tokens[0, :9].tolist()], 8)
    out8, _ = greedy_generate(cfg, p8, [tokens[0, :9].tolist()], 8)
    assert out1 == out8


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_bias_tied", "llama_mha_bias_tied"])
def test_param_table_matches_flax_init(hf, family):
    """The loader's parameter table describes exactly the tree Flax builds."""
    from distkv_jax.models.config import ModelConfig

    path, _ = hf(family)
    cfg = ModelConfig.from_dir(path)
    model = dense_model(cfg)
    tokens = jnp.zeros((1, 4), jnp.int32)
    cache = DenseKVCache.zeros(cfg.num_layers, 1, 4, cfg.num_kv_heads, cfg.head_dim)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens, cache,
                                               DenseMeta(tokens)))
    expected = tree_from_specs(param_specs(cfg), lambda s: s.shape)
    assert jax.tree.map(lambda x: x.shape, shapes) == expected
