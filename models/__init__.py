"""Flax Llama-family models and checkpoint loading (installed as ``distkv_jax.models``)."""
