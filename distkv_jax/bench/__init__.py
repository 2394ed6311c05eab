"""Benchmarks: ``python -m distkv_jax.bench <subcommand> [--flags]``.

Subcommands are listed in ``distkv_jax.bench.__main__.SUBCOMMANDS`` (name ->
module path); each module defines its absl flags at import and a
``main(argv)``. Only the chosen module is imported.
"""
