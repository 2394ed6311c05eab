"""gManager: the debt ledger over all rManagers (plain Python + numpy, no JAX).

``ledger[d, c]`` is the number of instance ``c``'s blocks held by requests
homed on instance ``d`` (debtor ``d`` owes creditor ``c``). Allocation is
local first; the rest is borrowed from the creditor with the most lendable
blocks, ties to the lowest instance id, repeatedly, until served. Free
blocks come before evictable cached ones: first the home's and the
creditors' free lists, then the home's cache, then the creditors'. Allocation
is all-or-nothing: if the blocks cannot all be found nothing is taken.

Shared blocks (prefix-cache hits, forks) are charged to no debtor: see
``BlockManager``. The ledger counts private blocks only.

Fairness between competing debtors is the caller's order: the facade serves
requests in arrival order (oldest first), never in dict or set order.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from distkv_jax.block_manager import BlockManager
from distkv_jax.kv_types import KVCacheConfig


class GlobalManager:
    def __init__(self, config: KVCacheConfig) -> None:
        self.config = config
        n = config.num_instances
        self.managers = [
            BlockManager(i, config.blocks_per_instance, config.lend_cap) for i in range(n)
        ]
        self.ledger = np.zeros((n, n), dtype=np.int64)

    # -- queries -----------------------------------------------------------
    def free_counts(self) -> np.ndarray:
        return np.asarray([m.num_free for m in self.managers], dtype=np.int64)

    def lendable_counts(self) -> np.ndarray:
        return np.asarray([m.lendable for m in self.managers], dtype=np.int64)

    def available_for(self, debtor: int) -> int:
        """Blocks a request homed on ``debtor`` could get right now."""
        own = self.managers[debtor].num_free
        if self.config.kv_policy == "local":
            return own
        lend = self.lendable_counts()
        return own + int(lend.sum() - lend[debtor])

    def remote_blocks(self) -> int:
        return int(self.ledger.sum())

    # -- allocation ----------------------------------------------------------
    def allocate(self, debtor: int, n: int) -> list[int] | None:
        """``n`` global block ids for a request homed on ``debtor``, or None."""
        if n <= 0:
            return []
        if self.available_for(debtor) < n:
            return None
        home = self.managers[debtor]
        out: list[int] = []
        # Free-list blocks first, the home's then lent ones; cached prefixes
        # are evicted only when no instance in reach has a free block: a
        # borrowed block costs a remote partial, an evicted prefix a prefill.
        for evict in (False, True):
            k = min(n - len(out), home.num_free if evict else home.num_unused)
            out.extend(home.allocate_local(k))
            if self.config.kv_policy == "local":
                continue
            while len(out) < n:
                lend = np.asarray([m.lendable if evict else m.lendable_unused
                                   for m in self.managers], dtype=np.int64)
                lend[debtor] = -1
                creditor = int(np.argmax(lend))  # first max: ties go to the lowest id
                take = min(n - len(out), int(lend[creditor]))
                if take <= 0:
                    break
                got = self.managers[creditor].allocate_remote(debtor, take)
                if got is None:  # cannot happen: take <= lendable
                    raise RuntimeError("gManager: creditor refused a checked loan")
                self.ledger[debtor, creditor] += take
                out.extend(got)
        if len(out) != n:  # cannot happen after the check above
            raise RuntimeError(f"gManager: found {len(out)} of {n} checked blocks")
        return out

    def free(self, debtor: int, global_ids: Sequence[int]) -> None:
        """A request homed on ``debtor`` lets go of blocks (its own, borrowed
        or shared ones). A shared block is freed by its last reader only."""
        if len(global_ids) == 0:
            return
        bpi = self.config.blocks_per_instance
        for g in global_ids:  # in the caller's order: the cache's LRU order follows it
            c = int(g) // bpi
            h = self.managers[c].release(g)
            if h >= 0:
                if h != debtor:
                    raise RuntimeError(f"block {g} is private to {h}, freed by {debtor}")
                if c != debtor:
                    self.ledger[debtor, c] -= 1

    def share(self, global_id: int) -> None:
        """One more request reads a block (cache hit or fork). A private block
        becomes shared: its debt, if any, is cancelled (the ledger's rule for
        shared blocks: they are the mesh-wide cache's, charged to no one)."""
        c = int(global_id) // self.config.blocks_per_instance
        h = self.managers[c].share(global_id)
        if h >= 0 and h != c:
            self.ledger[h, c] -= 1

    def manager_of(self, global_id: int) -> BlockManager:
        return self.managers[int(global_id) // self.config.blocks_per_instance]

    def rehold(self, global_id: int, old_home: int, new_home: int) -> None:
        """A block passes from a request of ``old_home`` to one of ``new_home``."""
        c = int(global_id) // self.config.blocks_per_instance
        self.managers[c].rehold(global_id, new_home)
        if old_home != c:
            self.ledger[old_home, c] -= 1
        if new_home != c:
            self.ledger[new_home, c] += 1
