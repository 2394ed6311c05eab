"""The paged KV pool on the mesh.

One stacked array each for K and V, global shape
[num_layers, I * blocks_per_instance, block_size, num_kv_heads, head_dim],
sharded P(None, "inst", None, "tp", None): instance i holds global blocks
i * blocks_per_instance .. (i + 1) * blocks_per_instance - 1, and KV heads are
split over tp (replicated over tp when there are fewer KV heads than tp).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .mesh import INST, TP


class PagedKVCache(NamedTuple):
    k: jax.Array
    v: jax.Array


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    num_layers: int
    num_instances: int
    blocks_per_instance: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    tp: int

    @property
    def kv_sharded(self) -> bool:
        """KV heads split over tp (else replicated: fewer KV heads than tp)."""
        return self.num_kv_heads % self.tp == 0

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, self.num_instances * self.blocks_per_instance, self.block_size,
                self.num_kv_heads, self.head_dim)

    @property
    def spec(self) -> P:
        return P(None, INST, None, TP if self.kv_sharded else None, None)

    def bytes(self, dtype) -> int:
        n = 2 * jnp.dtype(dtype).itemsize
        for d in self.shape:
            n *= d
        return n


def storage_dtype(dtype) -> jnp.dtype:
    """The dtype a pool of `dtype` KV is stored in: bfloat16 KV is kept as its
    bits (uint16). XLA:CPU has no bfloat16 scatter or bitcast in place: writing
    new tokens into a bfloat16 pool converted the whole pool to float32 and
    back around every layer's write. The kernels read the bits as bfloat16."""
    d = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if d == jnp.dtype(jnp.bfloat16) else d


def create_kv_pool(mesh: Mesh, layout: PoolLayout, dtype=jnp.float32) -> PagedKVCache:
    """Zero-filled pools of `dtype` KV (stored as `storage_dtype(dtype)`),
    created directly in their shards (never whole on one device)."""
    sharding = NamedSharding(mesh, layout.spec)
    dtype = storage_dtype(dtype)
    zeros = jax.jit(lambda: jnp.zeros(layout.shape, dtype), out_shardings=sharding)
    return PagedKVCache(zeros(), zeros())
