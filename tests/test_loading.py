"""Checkpoint loading: config parsing, sharded placement, orbax round trip,
the built-in tiny model, and a clear error for every broken input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from distkv_jax.mesh import make_mesh
from distkv_jax.models.checkpoint import restore_params, save_params
from distkv_jax.models.config import ModelConfig, UnsupportedModelError
from distkv_jax.models.loader import load_params, load_tokenizer
from distkv_jax.models.reference import forward_logits, greedy_generate
from distkv_jax.models.safetensors_io import CheckpointError
from distkv_jax.models.sharding import rules_for
from distkv_jax.models.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def broken(tiny, tmp_path):
    """A fresh copy of the tiny model directory to damage."""
    path = str(tmp_path / "m")
    shutil.copytree(tiny, path)
    return path


def _edit_config(path, **changes):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_tiny_model_tokenizer_and_generation(tiny):
    tok = load_tokenizer(tiny)
    ids = tok("The quick brown fox")["input_ids"]
    assert tok.decode(ids) == "The quick brown fox"
    cfg, params = load_params(tiny, make_mesh("1x1"))
    out, _ = greedy_generate(cfg, params, [ids], 8)
    assert len(out[0]) == 8 and all(0 <= t < cfg.vocab_size for t in out[0])


def test_sharded_checkpoint_with_index_loads_the_same(tiny, tmp_path):
    """A model split over several safetensors files with an index file."""
    tensors = load_file(os.path.join(tiny, "model.safetensors"))
    names = sorted(tensors)
    out = tmp_path / "sharded"
    out.mkdir()
    weight_map = {}
    for k, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / fname))
        weight_map.update({n: fname for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(os.path.join(tiny, "config.json"), out / "config.json")
    mesh = make_mesh("1x1")
    cfg, a = load_params(tiny, mesh)
    _, b = load_params(str(out), mesh)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip_bit_for_bit(tiny, tmp_path, dtype):
    mesh = make_mesh("2x4")
    cfg, params = load_params(tiny, mesh, dtype)
    with open(os.path.join(tiny, "config.json")) as f:
        hf_cfg = json.load(f)
    save_params(str(tmp_path / "ckpt"), params, hf_cfg, tokenizer_dir=tiny)
    for target in ("2x4", "1x1"):
        tmesh = make_mesh(target)
        cfg2, restored = restore_params(str(tmp_path / "ckpt"), tmesh, dtype)
        assert cfg2 == cfg
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert b.sharding.mesh == tmesh
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    assert load_tokenizer(str(tmp_path / "ckpt")) is not None


def test_config_v4_layout_with_rope_scaling():
    """Older config.json files put rope_theta at the top and use rope_scaling."""
    base = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=100,
                hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    cfg = ModelConfig.from_hf(dict(base, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    assert cfg.rope.kind == "llama3" and cfg.rope.theta == 500000.0 and cfg.head_dim == 16
    cfg = ModelConfig.from_hf(dict(base, rope_scaling={"type": "linear", "factor": 2.0}))
    assert cfg.rope.kind == "linear" and cfg.rope.factor == 2.0 and cfg.rope.theta == 10000.0
    # linear scaling halves every frequency
    np.testing.assert_allclose(cfg.rope.inv_freq(16) * 2, ModelConfig.from_hf(base).rope.inv_freq(16))


# ---- errors -----------------------------------------------------------------

def test_unsupported_architecture(broken):
    _edit_config(broken, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_params(broken, make_mesh("1x1"))


def test_unsupported_rope_type(broken):
    _edit_config(broken, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(UnsupportedModelError, match="rope scaling type 'yarn'"):
        load_params(broken, make_mesh("1x1"))


def test_missing_tensor(broken):
    path = os.path.join(broken, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        load_params(broken, make_mesh("1x1"))


def test_truncated_file(broken):
    path = os.path.join(broken, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match="truncated"):
        load_params(broken, make_mesh("1x1"))


def test_index_names_missing_file(broken):
    os.rename(os.path.join(broken, "model.safetensors"), os.path.join(broken, "a.safetensors"))
    with open(os.path.join(broken, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.embed_tokens.weight": "b.safetensors"}}, f)
    with pytest.raises(CheckpointError, match="b.safetensors.*missing"):
        load_params(broken, make_mesh("1x1"))


def test_shape_mismatch(broken):
    _edit_config(broken, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"has shape \(128, 64\), expected \(96, 64\)"):
        load_params(broken, make_mesh("1x1"))


def test_missing_config(broken):
    os.remove(os.path.join(broken, "config.json"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_params(broken, make_mesh("1x1"))


def test_tp_must_divide_heads(tiny):
    # 4 attention heads cannot be split 8 ways.
    with pytest.raises(ValueError, match="tp=8 does not divide num_attention_heads=4"):
        load_params(tiny, make_mesh("1x8"))
    cfg = ModelConfig.from_dir(tiny)
    odd = ModelConfig(**{**cfg.__dict__, "num_heads": 12, "num_kv_heads": 3, "head_dim": 16})
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        rules_for(odd, 2)
    # fewer KV heads than tp: replicated, not an error
    assert rules_for(cfg, 4).kv_heads is None and rules_for(cfg, 2).kv_heads == "tp"


def test_bad_mesh_and_dtype(tiny):
    with pytest.raises(ValueError, match="IxT"):
        make_mesh("4by2")
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh("4x4")
    with pytest.raises(ValueError, match="dtype 'float16' is not supported"):
        load_params(tiny, make_mesh("1x1"), "float16")


def test_fewer_kv_heads_than_tp_matches(tiny):
    """KV heads replicated over tp (2 KV heads, tp=4) still compute the same logits."""
    cfg, p1 = load_params(tiny, make_mesh("1x1"))
    _, p4 = load_params(tiny, make_mesh("2x4"))
    tokens = np.arange(3, 23, dtype=np.int32)[None]
    np.testing.assert_allclose(np.asarray(forward_logits(cfg, p4, tokens)),
                               np.asarray(forward_logits(cfg, p1, tokens)), atol=1e-5)
