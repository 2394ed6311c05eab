"""The device mesh: axes ("inst", "tp") built from a string such as "4x8"."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh

INST, TP = "inst", "tp"


@dataclasses.dataclass(frozen=True)
class MeshShape:
    inst: int
    tp: int

    @property
    def size(self) -> int:
        return self.inst * self.tp

    @classmethod
    def parse(cls, text: str) -> "MeshShape":
        parts = str(text).lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"mesh {text!r} must look like IxT, e.g. '2x4' (instances x tensor-parallel)")
        inst, tp = (int(p) for p in parts)
        if inst < 1 or tp < 1:
            raise ValueError(f"mesh {text!r}: both sizes must be >= 1")
        return cls(inst, tp)


def make_mesh(shape: str | MeshShape, devices=None) -> Mesh:
    """A Mesh with axes ("inst", "tp"). The tp axis runs over consecutive
    devices (on a multi-host job: the devices of one host)."""
    if isinstance(shape, str):
        shape = MeshShape.parse(shape)
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < shape.size:
        raise ValueError(
            f"mesh {shape.inst}x{shape.tp} needs {shape.size} devices, only {len(devices)} available "
            "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)"
        )
    grid = np.array(devices[: shape.size], dtype=object).reshape(shape.inst, shape.tp)
    return Mesh(grid, (INST, TP))


def simulate_cpu_devices(count: int) -> None:
    """Ask XLA for `count` simulated CPU devices. Effective only before JAX
    initializes its backend (first jax.devices() or computation); an explicit
    device count already in XLA_FLAGS wins."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
