"""Hugging Face directory -> orbax checkpoint laid out for a mesh.

    python -m distkv_jax.convert --model HF_DIR|tiny --output CKPT_DIR --mesh 2x4 [--dtype bfloat16]

Loads the safetensors onto the mesh shard by shard (models/loader.py: no
device holds more than its shards) and saves them with orbax: each device
writes its own shards, so the whole model is never gathered on one host. The
checkpoint directory also holds config.json and the tokenizer files, so
`python -m distkv_jax.launch --model CKPT_DIR` (and `LLM(CKPT_DIR)`) runs from
it directly, restoring each shard straight to its device on any mesh.

Multi-host conversion takes the same --coordinator_address / --num_processes /
--process_id flags (or JAX_* environment variables) as the launcher; every
process must see the source and output directories.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from .runtime import fail

_MODEL = flags.DEFINE_string("model", None, "Hugging Face model directory, or 'tiny'")
_OUTPUT = flags.DEFINE_string("output", None, "orbax checkpoint directory to write")
_MESH = flags.DEFINE_string("mesh", "1x1", "device mesh IxT to lay the checkpoint out for")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "stored dtype")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROC = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROC_ID = flags.DEFINE_integer("process_id", None, "this process")


def main(argv) -> int:
    if len(argv) > 1:
        return fail(f"unexpected arguments {argv[1:]}")
    if not _MODEL.value or not _OUTPUT.value:
        return fail("--model and --output are required")
    import logging

    logging.getLogger("jax").setLevel(logging.WARNING)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax reports every read at INFO
    from . import runtime
    from .llm import resolve_model_dir
    from .mesh import MeshShape

    try:
        shape = MeshShape.parse(_MESH.value)
    except ValueError as e:
        return fail(str(e))
    src = resolve_model_dir(_MODEL.value)
    config_path = os.path.join(src, "config.json")
    if not os.path.isfile(config_path):
        return fail(f"{src} is not a Hugging Face model directory (no config.json)")
    from .models.checkpoint import is_orbax_checkpoint

    if is_orbax_checkpoint(src):
        return fail(f"{src} is already an orbax checkpoint")
    out = os.path.abspath(_OUTPUT.value)
    if os.path.abspath(src) == out:
        return fail("--output must differ from --model")
    try:
        info = runtime.setup(shape.size, _COORD.value, _NUM_PROC.value, _PROC_ID.value)
    except ValueError as e:
        return fail(str(e))

    from .mesh import make_mesh
    from .models.checkpoint import save_params
    from .models.loader import load_params

    t0 = time.perf_counter()
    mesh = make_mesh(shape)
    with open(config_path) as f:
        hf_config = json.load(f)
    try:
        cfg, params = load_params(src, mesh, _DTYPE.value)
    except (ValueError, OSError, KeyError) as e:
        return fail(f"cannot load {src}: {e}")
    save_params(out, params, hf_config=hf_config, tokenizer_dir=src)
    if info.is_main:
        print(f"wrote {out}: {cfg.num_layers} layers, {_DTYPE.value}, mesh {_MESH.value}, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    app.run(main)
