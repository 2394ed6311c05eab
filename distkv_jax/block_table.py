"""Block table: per request, its logical blocks' global device ids (no JAX).

Plus the global slots of a request's token positions (``slots``).
"""
from __future__ import annotations

import numpy as np

from distkv_jax.kv_types import RequestId


class _Row:
    """A growable int64 array (amortized O(1) append)."""

    __slots__ = ("buf", "n")

    def __init__(self) -> None:
        self.buf = np.empty(4, dtype=np.int64)
        self.n = 0

    def extend(self, ids) -> None:
        k = len(ids)
        if self.n + k > self.buf.shape[0]:
            cap = max(self.n + k, 2 * self.buf.shape[0])
            nb = np.empty(cap, dtype=np.int64)
            nb[: self.n] = self.buf[: self.n]
            self.buf = nb
        self.buf[self.n : self.n + k] = ids
        self.n += k

    def view(self) -> np.ndarray:
        return self.buf[: self.n]


class BlockTable:
    def __init__(self, block_size: int, blocks_per_instance: int, num_instances: int) -> None:
        self.block_size = block_size
        self.blocks_per_instance = blocks_per_instance
        self.num_instances = num_instances
        self._rows: dict[RequestId, _Row] = {}

    def __contains__(self, rid: RequestId) -> bool:
        return rid in self._rows

    def add(self, rid: RequestId) -> None:
        if rid in self._rows:
            raise KeyError(f"request {rid!r} already has a block table")
        self._rows[rid] = _Row()

    def remove(self, rid: RequestId) -> np.ndarray:
        """Drop a request's row; returns its block ids (a copy)."""
        return self._rows.pop(rid).view().copy()

    def clear(self, rid: RequestId) -> np.ndarray:
        """Empty a request's row but keep it; returns the old ids (a copy)."""
        old = self._rows[rid].view().copy()
        self._rows[rid] = _Row()
        return old

    def append(self, rid: RequestId, ids) -> None:
        self._rows[rid].extend(ids)

    def set(self, rid: RequestId, logical: int, global_id: int) -> None:
        row = self._rows[rid]
        if not 0 <= logical < row.n:
            raise IndexError(f"logical block {logical} out of range for {rid!r}")
        row.buf[logical] = global_id

    def blocks(self, rid: RequestId) -> np.ndarray:
        """Read-only view of a request's global block ids, in logical order."""
        v = self._rows[rid].view()
        v = v.view()
        v.flags.writeable = False
        return v

    def num_blocks(self, rid: RequestId) -> int:
        return self._rows[rid].n

    # -- step views ----------------------------------------------------------
    def slots(self, rid: RequestId, start: int, n: int) -> np.ndarray:
        """Global slots of token positions ``start .. start+n-1``."""
        ids = self._rows[rid].view()
        if n <= 4:  # decode: plain Python is faster than numpy for a few tokens
            bs = self.block_size
            return np.asarray([int(ids[p // bs]) * bs + p % bs for p in range(start, start + n)],
                              dtype=np.int64)
        pos = np.arange(start, start + n, dtype=np.int64)
        return ids[pos // self.block_size] * self.block_size + pos % self.block_size
