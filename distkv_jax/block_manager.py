"""rManager: one instance's physical KV blocks (plain Python + numpy, no JAX).

An instance's blocks are either free or held by a request. A request has a
home instance (the instance that serves it); a block held by a request homed
elsewhere is *lent*. The rManager allocates for its own requests first, lends
at most ``lend_cap`` blocks at a time, and serves a remote allocation only
from its own free blocks (it never borrows on another instance's behalf).
"""
from __future__ import annotations

import heapq

import numpy as np

FREE = -1


class FreeList:
    """Deterministic free list of indices ``0..n-1``: lowest index first."""

    def __init__(self, n: int) -> None:
        self._heap: list[int] = list(range(n))  # a sorted list is a valid heap
        self._is_free = np.ones(n, dtype=bool)

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def capacity(self) -> int:
        return self._is_free.shape[0]

    def pop(self, k: int) -> list[int]:
        if k > len(self._heap):
            raise ValueError(f"want {k} blocks, {len(self._heap)} free")
        out = [heapq.heappop(self._heap) for _ in range(k)]
        self._is_free[out] = False
        return out

    def push(self, indices) -> None:
        for i in indices:
            i = int(i)
            if self._is_free[i]:
                raise ValueError(f"double free of block {i}")
            self._is_free[i] = True
            heapq.heappush(self._heap, i)

    def is_free(self, i: int) -> bool:
        return bool(self._is_free[i])

    def free_indices(self) -> np.ndarray:
        return np.flatnonzero(self._is_free)


class BlockManager:
    """rManager of one instance's device blocks.

    ``holder[p]`` is the home instance of the request holding physical block
    ``p`` (``FREE`` when free); ``lent`` counts blocks held by other homes.
    """

    def __init__(self, instance: int, num_blocks: int, lend_cap: int) -> None:
        self.instance = instance
        self.num_blocks = num_blocks
        self.lend_cap = lend_cap
        self.base = instance * num_blocks
        self._free = FreeList(num_blocks)
        self.holder = np.full(num_blocks, FREE, dtype=np.int32)
        self.lent = 0

    # -- queries -----------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def lendable(self) -> int:
        """Blocks this instance could lend right now."""
        return max(0, min(self.num_free, self.lend_cap - self.lent))

    def free_blocks(self) -> np.ndarray:
        """Global ids of the free blocks, ascending."""
        return self._free.free_indices() + self.base

    # -- allocation ----------------------------------------------------------
    def allocate_local(self, n: int) -> list[int]:
        """``n`` blocks for this instance's own requests (global ids)."""
        phys = self._free.pop(n)
        self.holder[phys] = self.instance
        return [self.base + p for p in phys]

    def allocate_remote(self, debtor: int, n: int) -> list[int] | None:
        """Lend ``n`` blocks to a request homed on ``debtor``.

        Refused (None) if the blocks cannot all come from this instance's own
        free blocks within its lending cap.
        """
        if debtor == self.instance:
            raise ValueError("allocate_remote called for the instance itself")
        if n > self.lendable:
            return None
        phys = self._free.pop(n)
        self.holder[phys] = debtor
        self.lent += n
        return [self.base + p for p in phys]

    def free(self, global_ids) -> None:
        for g in global_ids:
            p = int(g) - self.base
            if not 0 <= p < self.num_blocks:
                raise ValueError(f"block {g} is not on instance {self.instance}")
            h = int(self.holder[p])
            if h == FREE:
                raise ValueError(f"double free of block {g}")
            if h != self.instance:
                self.lent -= 1
            self.holder[p] = FREE
        self._free.push(int(g) - self.base for g in global_ids)

    def rehold(self, global_id: int, new_home: int) -> None:
        """An allocated block changes hands (defragmentation) without moving."""
        p = int(global_id) - self.base
        old = int(self.holder[p])
        if old == FREE:
            raise ValueError(f"rehold of free block {global_id}")
        self.lent += (new_home != self.instance) - (old != self.instance)
        self.holder[p] = new_home


class HostPool:
    """One instance's host-memory blocks (the swap tier): a free list."""

    def __init__(self, instance: int, num_blocks: int) -> None:
        self.instance = instance
        self.num_blocks = num_blocks
        self.base = instance * num_blocks
        self._free = FreeList(num_blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        return [self.base + p for p in self._free.pop(n)]

    def free(self, global_ids) -> None:
        self._free.push(int(g) - self.base for g in global_ids)

    def free_blocks(self) -> np.ndarray:
        return self._free.free_indices() + self.base
