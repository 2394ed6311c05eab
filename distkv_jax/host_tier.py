"""Host-memory tier: per-instance pools of host blocks (no JAX).

Placement of a swapped-out request's blocks: under ``distributed`` the host
memory of all instances is pooled; each device block goes to the host pool of
the instance that owns it (a local PCIe copy), else to its request's home
instance, else to the instance with the most free host blocks (ties: lowest
id). Under ``local`` only the home instance's host pool is used.
Allocation is all-or-nothing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from distkv_jax.block_manager import HostPool
from distkv_jax.kv_types import KVCacheConfig


class HostTier:
    def __init__(self, config: KVCacheConfig) -> None:
        self.config = config
        self.pools = [
            HostPool(i, config.host_blocks_per_instance) for i in range(config.num_instances)
        ]

    def free_counts(self) -> np.ndarray:
        return np.asarray([p.num_free for p in self.pools], dtype=np.int64)

    def available_for(self, home: int) -> int:
        if self.config.kv_policy == "local":
            return self.pools[home].num_free
        return int(self.free_counts().sum())

    def allocate_for(self, home: int, device_blocks: Sequence[int]) -> list[int] | None:
        """One host block per device block (same order), or None."""
        n = len(device_blocks)
        if self.available_for(home) < n:
            return None
        if self.config.kv_policy == "local":
            return self.pools[home].allocate(n)
        free = self.free_counts()
        bpi = self.config.blocks_per_instance
        out: list[int] = []
        for g in device_blocks:
            c = int(g) // bpi
            if free[c] > 0:
                dest = c
            elif free[home] > 0:
                dest = home
            else:
                dest = int(np.argmax(free))
            out.extend(self.pools[dest].allocate(1))
            free[dest] -= 1
        return out

    def free(self, host_blocks: Sequence[int]) -> None:
        if len(host_blocks) == 0:
            return
        ids = np.asarray(host_blocks, dtype=np.int64)
        owners = ids // self.config.host_blocks_per_instance
        for c in np.unique(owners):
            self.pools[int(c)].free(ids[owners == c].tolist())
