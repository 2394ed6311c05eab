"""Hugging Face model directory -> sharded params pytree (+ tokenizer).

Each parameter is read from the safetensors files and placed on the mesh with
its target NamedSharding as it is read: `jax.make_array_from_callback` asks
for one shard at a time, and we read only that slice of the memory-mapped
tensor. No device ever holds more than its own shards, and the host never
holds more than one parameter.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .config import ModelConfig
from .params import ParamSpec, param_specs, tree_from_specs
from .safetensors_io import CheckpointReader
from .sharding import TP, rules_for, spec_sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if jnp.dtype(dtype) not in {jnp.dtype(d) for d in DTYPES.values()}:
        raise ValueError(f"dtype {dtype} is not supported; choose float32 or bfloat16")
    return dtype


# "org/name" as on the Hugging Face hub (one slash, no leading dot or slash)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def describe_missing_model(path: str) -> str | None:
    """Why `path` is not a loadable model directory, in words (None when it
    has a config.json: a Hugging Face directory or an orbax checkpoint, which
    the loaders then check in detail). Nothing is ever downloaded."""
    path = os.fspath(path)
    if not path:
        return "no model given (a Hugging Face model directory, an orbax checkpoint or 'tiny')"
    if not os.path.exists(path):
        if _HUB_ID.fullmatch(path) and not path.startswith("."):
            return (f"model directory {path} does not exist; {path!r} looks like a Hugging Face "
                    "hub id, but nothing is downloaded: give a local directory (e.g. "
                    f"`huggingface-cli download {path} --local-dir DIR`, then DIR)")
        return f"model directory {path} does not exist"
    if not os.path.isdir(path):
        return (f"model path {path} is a file, not a directory (give the directory holding "
                "config.json and the *.safetensors files)")
    if os.path.isfile(os.path.join(path, "config.json")):
        return None
    if os.path.isdir(os.path.join(path, "params")):
        return (f"orbax checkpoint directory {path} has no config.json (python -m "
                "distkv_jax.convert writes it beside params/)")
    if os.path.isdir(os.path.join(path, "snapshots")):
        return (f"model directory {path} has no config.json; it looks like a Hugging Face cache "
                "entry: give one of its snapshots/<revision> directories")
    return (f"model directory {path} has no config.json: neither a Hugging Face model directory "
            "nor an orbax checkpoint (python -m distkv_jax.convert)")


def _hf_names(spec: ParamSpec, cfg: ModelConfig) -> list[str]:
    if spec.per_layer:
        return [spec.hf_name.format(i=i) for i in range(cfg.num_layers)]
    return [spec.hf_name]


def _read_slice(reader: CheckpointReader, spec: ParamSpec, cfg: ModelConfig, index: tuple,
                np_dtype) -> np.ndarray:
    """The part of the target array that `index` (a tuple of slices) covers."""
    names = _hf_names(spec, cfg)
    inner = index
    if spec.per_layer:
        names = names[index[0]]
        inner = index[1:]
    hf_index = tuple(reversed(inner)) if spec.transpose else inner
    parts = []
    for name in names:
        part = np.asarray(reader.tensor(name)[hf_index])
        parts.append(part.T if spec.transpose else part)
    block = np.stack(parts) if spec.per_layer else parts[0]
    return block.astype(np_dtype)


def load_params(model_dir: str, mesh: Mesh, dtype: Any = "float32",
                cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict]:
    """Read the checkpoint in `model_dir` onto `mesh`. Returns (config, params)."""
    if cfg is None:
        problem = describe_missing_model(model_dir)
        if problem:
            raise FileNotFoundError(problem)
    cfg = cfg or ModelConfig.from_dir(model_dir)
    dtype = resolve_dtype(dtype)
    rules = rules_for(cfg, mesh.shape[TP])
    reader = CheckpointReader(model_dir)
    specs = param_specs(cfg)

    # Check every tensor's presence, shape and extent before moving any data,
    # so a bad checkpoint fails fast and names the culprit.
    for spec in specs:
        for name in _hf_names(spec, cfg):
            reader.tensor(name, spec.hf_shape)

    np_dtype = jnp.dtype(dtype)

    def place(spec: ParamSpec) -> jax.Array:
        cache: dict[tuple, np.ndarray] = {}  # replicas over `inst` ask for the same slice

        def shard(index):
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in cache:
                cache[key] = _read_slice(reader, spec, cfg, index, np_dtype)
            return cache[key]

        return jax.make_array_from_callback(spec.shape, spec_sharding(spec, rules, mesh), shard)

    params = tree_from_specs(specs, place)
    return cfg, params


def load_tokenizer(model_dir: str):
    """The tokenizer saved beside the weights, or None when the directory has none."""
    if not any(os.path.exists(os.path.join(model_dir, f))
               for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
