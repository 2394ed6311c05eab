"""Attention kernels (installed as ``distkv_jax.kernels``)."""
