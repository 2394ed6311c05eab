"""Dispatch ``python -m distkv_jax.bench <subcommand> [--flags]``.

To add a subcommand, add ``name: "module.path"`` to SUBCOMMANDS; the module
defines its absl flags at import time (or in ``define_flags()``, called before
parsing) and ``main(argv)``.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, str] = {
    "attention": "distkv_jax.bench.attention",
    "capacity": "distkv_jax.bench.capacity",
    "control_plane": "distkv_jax.bench.control_plane",
    "dense": "distkv_jax.bench.dense",
    "dtype": "distkv_jax.bench.dtype",
    "longctx": "distkv_jax.bench.longctx",
    "pool": "distkv_jax.bench.pool",
    "prefix": "distkv_jax.bench.prefix",
    "serving": "distkv_jax.bench.serving",
    "throughput": "distkv_jax.bench.throughput",
    "vllm_cpu": "distkv_jax.bench.vllm_cpu",
    "workload": "distkv_jax.bench.workload",
}


def _usage() -> str:
    names = ", ".join(sorted(SUBCOMMANDS))
    return f"usage: python -m distkv_jax.bench <subcommand> [--flags]; subcommands: {names}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
        print(_usage(), file=sys.stderr)
        sys.exit(2)
    name = argv[1]
    module = importlib.import_module(SUBCOMMANDS[name])
    if hasattr(module, "define_flags"):
        module.define_flags()
    from absl import app

    app.run(module.main, argv=[f"{argv[0]} {name}"] + argv[2:])


if __name__ == "__main__":
    main()
