"""Host-side plan of one DistAttention step (plain Python + numpy, no JAX).

From one global block table (per sequence: its global block ids in logical
order) and the step's query rows, build the fixed-shape int32 arrays the
jitted step reads:

    slots       [I*T]        global KV slot of each row's new token (-1: padding row)
    positions   [I*T]        position of each row's token (-1: padding row)
    tile_rows   [n_tiles, q_tile]  rows of each query tile (-1: padding); a tile
                             holds consecutive rows of one sequence
    item_tile   [I, W]       per instance, the work list: tile index (n_tiles: padding)
    item_block  [I, W]       local block index within the instance
    item_kstart [I, W]       position of the block's first slot

Row r belongs to instance r // T (its owner, where the output returns). A
global block id b lives on instance b // blocks_per_instance; its slots are
b * block_size .. b * block_size + block_size - 1. Each (tile, block) pair
that the tile's queries can see becomes one item on the block's instance, so
work per device is proportional to the blocks it holds. W and n_tiles are
padded to power-of-two buckets so XLA compiles few programs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def bucket(n: int, minimum: int = 8) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class SeqQuery:
    """One sequence's part of a step: `len(positions)` new tokens in rows
    row .. row + n - 1 of `instance`'s batch, at consecutive positions."""

    instance: int
    row: int
    positions: Sequence[int]
    block_table: Sequence[int]


@dataclasses.dataclass(frozen=True)
class PoolGeometry:
    num_instances: int
    blocks_per_instance: int
    block_size: int


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionPlan:
    slots: np.ndarray
    positions: np.ndarray
    tile_rows: np.ndarray
    item_tile: np.ndarray
    item_block: np.ndarray
    item_kstart: np.ndarray

    @property
    def shape_key(self) -> tuple:
        """The shapes that decide which compiled program runs."""
        return (self.slots.shape, self.tile_rows.shape, self.item_tile.shape)

    def items_per_instance(self) -> np.ndarray:
        return (self.item_tile < self.tile_rows.shape[0]).sum(axis=1)


def build_attention_plan(seqs: Sequence[SeqQuery], geom: PoolGeometry, tokens_per_instance: int,
                         q_tile: int = 1, min_items: int = 8, min_tiles: int = 8) -> AttentionPlan:
    I, NB, bs = geom.num_instances, geom.blocks_per_instance, geom.block_size
    T = tokens_per_instance
    slots = np.full(I * T, -1, np.int32)
    positions = np.full(I * T, -1, np.int32)
    tiles: list[np.ndarray] = []
    item_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    rows_used = np.zeros((I, T), bool)

    for n, s in enumerate(seqs):
        pos = np.asarray(s.positions, np.int64)
        table = np.asarray(s.block_table, np.int64)
        count = len(pos)
        if count == 0:
            continue
        if not 0 <= s.instance < I:
            raise ValueError(f"sequence {n}: instance {s.instance} outside 0..{I - 1}")
        if s.row < 0 or s.row + count > T:
            raise ValueError(f"sequence {n}: rows {s.row}..{s.row + count - 1} exceed {T} rows per instance")
        if rows_used[s.instance, s.row:s.row + count].any():
            raise ValueError(f"sequence {n}: rows overlap another sequence's rows")
        rows_used[s.instance, s.row:s.row + count] = True
        if np.any(np.diff(pos) != 1) or pos[0] < 0:
            raise ValueError(f"sequence {n}: positions must be consecutive and >= 0")
        needed = int(pos[-1]) // bs + 1
        if len(table) < needed:
            raise ValueError(f"sequence {n}: block table has {len(table)} blocks, position "
                             f"{int(pos[-1])} needs {needed}")
        if table[:needed].min() < 0 or table[:needed].max() >= I * NB:
            raise ValueError(f"sequence {n}: block id outside 0..{I * NB - 1}")

        rows = s.instance * T + s.row + np.arange(count)
        positions[rows] = pos
        slots[rows] = table[pos // bs] * bs + pos % bs
        for t0 in range(0, count, q_tile):
            tile_rows = np.full(q_tile, -1, np.int32)
            chunk = rows[t0:t0 + q_tile]
            tile_rows[:len(chunk)] = chunk
            tile = len(tiles)
            tiles.append(tile_rows)
            blocks = int(pos[min(t0 + q_tile, count) - 1]) // bs + 1  # causal: up to the last query
            item_parts.append((np.full(blocks, tile, np.int64), table[:blocks],
                               np.arange(blocks, dtype=np.int64) * bs))

    n_tiles = bucket(len(tiles), min_tiles)
    tile_rows = np.full((n_tiles, q_tile), -1, np.int32)
    if tiles:
        tile_rows[:len(tiles)] = np.stack(tiles)

    if item_parts:
        it, gb, ks = (np.concatenate(c) for c in zip(*item_parts))
    else:
        it = gb = ks = np.zeros(0, np.int64)
    inst = gb // NB
    counts = np.bincount(inst, minlength=I)
    W = bucket(int(counts.max()) if len(counts) else 0, min_items)
    item_tile = np.full((I, W), n_tiles, np.int32)
    item_block = np.zeros((I, W), np.int32)
    item_kstart = np.zeros((I, W), np.int32)
    order = np.argsort(inst, kind="stable")  # deterministic: grouped by instance, in build order
    starts = np.concatenate([[0], np.cumsum(counts)])
    for i in range(I):
        sel = order[starts[i]:starts[i + 1]]
        item_tile[i, :len(sel)] = it[sel]
        item_block[i, :len(sel)] = gb[sel] % NB
        item_kstart[i, :len(sel)] = ks[sel]
    return AttentionPlan(slots, positions, tile_rows, item_tile, item_block, item_kstart)
