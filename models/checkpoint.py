"""Orbax checkpoints of the params, restored straight into target shardings.

Layout of a checkpoint directory:
    config.json      the Hugging Face config the params were built from
    params/          orbax StandardCheckpointer tree ({"params": ...})
    tokenizer files  copied from the source directory when present (chat template too)

Restore builds an abstract tree (shape, dtype, NamedSharding per leaf) from
the parameter table, so each device reads only its own shards.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
from jax.sharding import Mesh
import orbax.checkpoint as ocp

from .config import ModelConfig
from .loader import describe_missing_model, resolve_dtype
from .params import param_specs, tree_from_specs
from .sharding import TP, rules_for, spec_sharding

# The chat template travels with the tokenizer: transformers 5 saves it as
# chat_template.jinja (named extra templates under additional_chat_templates/),
# older versions inside tokenizer_config.json or chat_template.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja",
                   "chat_template.json")
TOKENIZER_DIRS = ("additional_chat_templates",)


def save_params(ckpt_dir: str, params: dict, hf_config: dict | None = None,
                tokenizer_dir: str | None = None) -> None:
    ckpt_dir = os.path.abspath(ckpt_dir)
    os.makedirs(ckpt_dir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(ckpt_dir, "params"), params, force=True)
    checkpointer.wait_until_finished()
    if hf_config is not None and jax.process_index() == 0:
        with open(os.path.join(ckpt_dir, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
    if tokenizer_dir is not None and jax.process_index() == 0:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(ckpt_dir, name))
        for name in TOKENIZER_DIRS:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(ckpt_dir, name), dirs_exist_ok=True)


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "params"))


def restore_params(ckpt_dir: str, mesh: Mesh, dtype: Any = "float32",
                   cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict]:
    if cfg is None:
        problem = describe_missing_model(ckpt_dir)
        if problem:
            raise FileNotFoundError(problem)
    ckpt_dir = os.path.abspath(ckpt_dir)
    cfg = cfg or ModelConfig.from_dir(ckpt_dir)
    dtype = resolve_dtype(dtype)
    rules = rules_for(cfg, mesh.shape[TP])
    abstract = tree_from_specs(
        param_specs(cfg),
        lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=spec_sharding(s, rules, mesh)),
    )
    params = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, "params"), abstract)
    return cfg, params
