"""rManager: one instance's physical KV blocks (plain Python + numpy, no JAX).

An instance's blocks are free, held by one request (private), shared by
several readers through the prefix cache, or cached (no reader, evictable).
A request has a home instance (the instance that serves it); a private block
held by a request homed elsewhere is *lent*. The rManager allocates for its
own requests first, lends at most ``lend_cap`` blocks at a time, and serves a
remote allocation only from its own free blocks (it never borrows on another
instance's behalf).
"""
from __future__ import annotations

import heapq
from collections import OrderedDict

import numpy as np

FREE = -1      # on the free list
SHARED = -2    # read through the prefix cache or a fork: charged to no debtor
CACHED = -3    # no reader, registered in the prefix cache: evictable


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

    A block is in one of four states (``holder[p]``):

    - free (``FREE``): on the free list;
    - private (a home instance id): read by exactly one request, homed on
      ``holder[p]``; a private block of another home is *lent* and is what
      the debt ledger counts;
    - shared (``SHARED``): reached through the prefix cache or a fork. It
      belongs to the mesh-wide cache, not to any one reader: it is charged
      to no debtor, never lent, and stays where it is (migration and
      defragmentation leave it in place) until its last reader lets go;
    - cached (``CACHED``): no reader, but its KV is registered under a
      prefix hash. It is evictable (least recently released first) and
      counts as free memory: allocation takes the free list first, then
      evicts.

    ``refs[p]`` counts the requests whose block table holds ``p``. A private
    block has one reader; it turns shared when a second reader takes it.
    ``cached`` maps prefix hashes to this instance's registered blocks.
    """

    def __init__(self, instance: int, num_blocks: int, lend_cap: int) -> None:
        self.instance = instance
        self.num_blocks = num_blocks
        self.lend_cap = lend_cap
        self.base = instance * num_blocks
        self._free = FreeList(num_blocks)
        self.holder = np.full(num_blocks, FREE, dtype=np.int32)
        self.refs = np.zeros(num_blocks, dtype=np.int32)
        self.lent = 0
        self.hash_of: dict[int, bytes] = {}       # physical -> prefix hash (registered blocks)
        self.cached: dict[bytes, int] = {}        # prefix hash -> physical
        # refs == 0 registered blocks; insertion order = release order (LRU first)
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0

    # -- queries -----------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_unused(self) -> int:
        """Blocks on the free list (evictable cache blocks not counted)."""
        return len(self._free)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def lendable(self) -> int:
        """Blocks this instance could lend right now."""
        return max(0, min(self.num_free, self.lend_cap - self.lent))

    @property
    def lendable_unused(self) -> int:
        """Blocks this instance could lend without evicting a cached prefix."""
        return max(0, min(self.num_unused, self.lend_cap - self.lent))

    def free_blocks(self) -> np.ndarray:
        """Global ids of the free-list blocks, ascending."""
        return self._free.free_indices() + self.base

    def evictable_blocks(self) -> list[int]:
        """Global ids of the evictable blocks, in eviction order."""
        return [self.base + p for p in self._evictable]

    def _phys(self, global_id: int) -> int:
        p = int(global_id) - self.base
        if not 0 <= p < self.num_blocks:
            raise ValueError(f"block {global_id} is not on instance {self.instance}")
        return p

    def is_private(self, global_id: int) -> bool:
        return int(self.holder[self._phys(global_id)]) >= 0

    # -- allocation ----------------------------------------------------------
    def _take(self, n: int, holder: int) -> list[int]:
        if n > self.num_free:
            raise ValueError(f"want {n} blocks, {self.num_free} free")
        k = min(n, len(self._free))
        phys = self._free.pop(k)
        for _ in range(n - k):  # evict least recently released cache blocks
            p, _ = self._evictable.popitem(last=False)
            del self.cached[self.hash_of.pop(p)]
            self.evictions += 1
            phys.append(p)
        self.holder[phys] = holder
        self.refs[phys] = 1
        return [self.base + p for p in phys]

    def allocate_local(self, n: int) -> list[int]:
        """``n`` blocks for this instance's own requests (global ids)."""
        return self._take(n, self.instance)

    def allocate_remote(self, debtor: int, n: int) -> list[int] | None:
        """Lend ``n`` blocks to a request homed on ``debtor``.

        Refused (None) if the blocks cannot all come from this instance's own
        free blocks within its lending cap.
        """
        if debtor == self.instance:
            raise ValueError("allocate_remote called for the instance itself")
        if n > self.lendable:
            return None
        self.lent += n
        return self._take(n, debtor)

    def release(self, global_id: int) -> int:
        """A reader lets go of a block; returns the block's holder before
        (a home id for a private block, ``SHARED``). The last reader frees
        it, or leaves it evictable when its hash is registered."""
        p = self._phys(global_id)
        h = int(self.holder[p])
        if h in (FREE, CACHED) or self.refs[p] <= 0:
            raise ValueError(f"double free of block {global_id}")
        if h >= 0 and h != self.instance:
            self.lent -= 1
        self.refs[p] -= 1
        if self.refs[p] > 0:
            return h
        if p in self.hash_of:
            self.holder[p] = CACHED
            self._evictable[p] = None
        else:
            self.holder[p] = FREE
            self._free.push((p,))
        return h

    def free(self, global_ids) -> None:
        for g in global_ids:
            self.release(g)

    def share(self, global_id: int) -> int:
        """One more reader takes a block (a prefix-cache hit or a fork);
        returns its holder before. The block becomes shared: a private block
        stops counting as lent."""
        p = self._phys(global_id)
        h = int(self.holder[p])
        if h == FREE:
            raise ValueError(f"share of free block {global_id}")
        if h == CACHED:
            del self._evictable[p]
        elif h >= 0 and h != self.instance:
            self.lent -= 1
        self.holder[p] = SHARED
        self.refs[p] += 1
        return h

    def rehold(self, global_id: int, new_home: int) -> None:
        """A private block changes hands (defragmentation) without moving."""
        p = self._phys(global_id)
        old = int(self.holder[p])
        if old < 0:
            raise ValueError(f"rehold of a block that is not private: {global_id}")
        self.lent += (new_home != self.instance) - (old != self.instance)
        self.holder[p] = new_home

    # -- prefix cache --------------------------------------------------------
    def lookup(self, h: bytes) -> int | None:
        p = self.cached.get(h)
        return None if p is None else self.base + p

    def register(self, global_id: int, h: bytes) -> None:
        """The block's KV is complete and is the prefix with hash ``h``."""
        p = self._phys(global_id)
        if self.refs[p] <= 0:
            raise ValueError(f"register of unread block {global_id}")
        if p in self.hash_of or h in self.cached:
            raise ValueError(f"block {global_id} or its hash is registered already")
        self.hash_of[p] = h
        self.cached[h] = p

    def unregister(self, global_id: int) -> bytes | None:
        """Forget a read block's hash (its KV moves elsewhere); the hash."""
        p = self._phys(global_id)
        h = self.hash_of.pop(p, None)
        if h is not None:
            del self.cached[h]
        return h

    def drop_cached(self) -> int:
        """Forget every evictable block's prefix (they become free); blocks
        still read keep theirs. Returns how many were dropped."""
        n = len(self._evictable)
        for p in self._evictable:
            del self.cached[self.hash_of.pop(p)]
            self.holder[p] = FREE
        self._free.push(list(self._evictable))
        self._evictable.clear()
        return n

    def hash_of_block(self, global_id: int) -> bytes | None:
        return self.hash_of.get(self._phys(global_id))


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
