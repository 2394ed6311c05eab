"""Host-side plan of one DistAttention step (plain Python + numpy, no JAX).

From one global block table (per sequence: its global block ids in logical
order) and the step's query rows, build the fixed-shape int32 arrays the
jitted step reads:

    slots       [I*T]        global KV slot of each row's new token (-1: padding row)
    positions   [I*T]        position of each row's token (-1: padding row)
    tile_rows   [n_tiles, q_tile]  rows of each query tile (-1: padding); a tile
                             holds consecutive rows of one sequence
    item_tile   [I, R, run]  per instance, the work list in R runs of `run` items:
                             tile index (n_tiles: padding)
    item_block  [I, R, run]  local block index within the instance
    item_kstart [I, R, run]  position of the block's first slot (MASKED: padding)
    host_item_* [I, Rh, runh] the same for blocks in the instances' host pools
                             (host-attended KV), or None when the step has none

A block-table entry b >= I * blocks_per_instance names host block
b - I * blocks_per_instance, in the host pool of instance
(b - I * blocks_per_instance) // host_blocks_per_instance: the host CPU
attends it in place (DistAttention sends the query there, as to any
instance). New tokens are always written to device blocks.

Row r belongs to instance r // T (its owner, where the output returns). A
global block id b lives on instance b // blocks_per_instance; its slots are
b * block_size .. b * block_size + block_size - 1. Each (tile, block) pair
that the tile's queries can see becomes one item on the block's instance, so
work per device is proportional to the blocks it holds. A run is `run`
consecutive items of one tile (MicroAttention attends a run's blocks in one
matrix product); each tile's items on an instance are padded to a multiple of
`run` with masked items. `run` is chosen per step from the work (long
contexts: long runs; short: short runs). n_tiles is padded to a power-of-two
bucket (at least the caller's `min_tiles`), R to a power-of-four bucket
(`coarse_bucket`: work lists span orders of magnitude, and padding runs cost
almost nothing: MicroAttention skips them), and run is a power of two <=
MAX_RUN, so XLA compiles few programs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


MAX_RUN = 64
MASKED = 1 << 30  # a key start past any position: the item attends nothing
# Run length of host work lists: host-attended blocks are the old part of
# long contexts (long runs), and one fixed length keeps the host part to one
# program per runs bucket.
HOST_RUN = 16


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
    host_blocks_per_instance: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionPlan:
    slots: np.ndarray
    positions: np.ndarray
    tile_rows: np.ndarray
    item_tile: np.ndarray
    item_block: np.ndarray
    item_kstart: np.ndarray
    host_item_tile: np.ndarray | None = None
    host_item_block: np.ndarray | None = None
    host_item_kstart: np.ndarray | None = None

    @property
    def shape_key(self) -> tuple:
        """The shapes that decide which compiled program runs."""
        host = None if self.host_item_tile is None else self.host_item_tile.shape
        return (self.slots.shape, self.tile_rows.shape, self.item_tile.shape, host)

    @property
    def has_host_work(self) -> bool:
        return self.host_item_tile is not None

    @property
    def run(self) -> int:
        return self.item_tile.shape[-1]

    def items_per_instance(self) -> np.ndarray:
        """Real (unmasked) device items per instance."""
        real = (self.item_tile < self.tile_rows.shape[0]) & (self.item_kstart != MASKED)
        return real.reshape(real.shape[0], -1).sum(axis=1)

    def host_items_per_instance(self) -> np.ndarray:
        """Real items per instance's host pool (zeros without host work)."""
        if self.host_item_tile is None:
            return np.zeros(self.item_tile.shape[0], np.int64)
        real = (self.host_item_tile < self.tile_rows.shape[0]) & (self.host_item_kstart != MASKED)
        return real.reshape(real.shape[0], -1).sum(axis=1)


def coarse_bucket(n: int, minimum: int = 8) -> int:
    """Smallest minimum * 4**k >= n."""
    b = max(int(minimum), 1)
    while b < n:
        b *= 4
    return b


RUN_CHOICES = tuple(1 << k for k in range(MAX_RUN.bit_length()))  # 1, 2, 4, ..., 64


# Fixed cost of one run, in items (a run is one small matrix product; many
# tiny ones are slow). Measured on XLA:CPU by timing the engine's step at
# forced run lengths: ~0.6 of an item for one-row (decode) tiles, ~1 for
# prefill tiles.
RUN_OVERHEAD_DECODE = 0.6
RUN_OVERHEAD_PREFILL = 1.0


def choose_run(run_lengths: np.ndarray, choices: Sequence[int] = RUN_CHOICES,
               overhead: float = RUN_OVERHEAD_PREFILL) -> int:
    """The run length minimizing padded items + `overhead` items per run."""
    if len(run_lengths) == 0:
        return min(choices)
    best, best_cost = None, None
    for r in sorted(choices):
        runs = -(-run_lengths // r)
        cost = float((runs * r).sum() + overhead * runs.sum())
        if best_cost is None or cost < best_cost:
            best, best_cost = r, cost
    return best


def _decode_rows(seqs, I: int, NB: int, HB: int, bs: int, T: int):
    """The per-sequence part of build_attention_plan for a decode step (one
    query per sequence, tiles of one row), vectorized over the sequences:
    (slots, positions, tile_rows [n, 1], item tile, block, key start).
    None when a sequence is invalid: the per-sequence loop then raises the
    error that names it."""
    n = len(seqs)
    inst = np.fromiter((s.instance for s in seqs), np.int64, n)
    row = np.fromiter((s.row for s in seqs), np.int64, n)
    pos = np.fromiter((s.positions[0] for s in seqs), np.int64, n)
    needed = pos // bs + 1
    lens = np.fromiter((len(s.block_table) for s in seqs), np.int64, n)
    rows = inst * T + row
    if not (np.all((inst >= 0) & (inst < I) & (row >= 0) & (row < T) & (pos >= 0) & (lens >= needed))
            and len(np.unique(rows)) == n):
        return None
    table = np.concatenate([np.asarray(s.block_table[:k], np.int64)
                            for s, k in zip(seqs, needed.tolist())])
    ends = np.cumsum(needed)
    written = table[ends - 1]
    if table.min() < 0 or table.max() >= I * (NB + HB) or written.max() >= I * NB:
        return None
    slots = np.full(I * T, -1, np.int32)
    positions = np.full(I * T, -1, np.int32)
    positions[rows] = pos
    slots[rows] = written * bs + pos % bs
    it = np.repeat(np.arange(n, dtype=np.int32), needed)
    ks = ((np.arange(len(table)) - np.repeat(ends - needed, needed)) * bs).astype(np.int32)
    return slots, positions, rows.astype(np.int32)[:, None], it, table.astype(np.int32), ks


def build_attention_plan(seqs: Sequence[SeqQuery], geom: PoolGeometry, tokens_per_instance: int,
                         q_tile: int = 1, run: int | None = None, min_runs: int = 8,
                         min_tiles: int = 8, run_choices: Sequence[int] = RUN_CHOICES) -> AttentionPlan:
    """The step's plan. run=None chooses the run length from the work, among
    `run_choices` (fewer choices: fewer compiled programs)."""
    I, NB, bs = geom.num_instances, geom.blocks_per_instance, geom.block_size
    HB = geom.host_blocks_per_instance
    T = tokens_per_instance
    slots = np.full(I * T, -1, np.int32)
    positions = np.full(I * T, -1, np.int32)
    tiles: list[np.ndarray] = []
    item_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    rows_used = np.zeros((I, T), bool)

    decode = q_tile == 1 and len(seqs) > 0 and all(len(s.positions) == 1 for s in seqs)
    fast = _decode_rows(seqs, I, NB, HB, bs, T) if decode else None
    for n, s in enumerate(seqs if fast is None else ()):
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
        if table[:needed].min() < 0 or table[:needed].max() >= I * (NB + HB):
            raise ValueError(f"sequence {n}: block id outside 0..{I * (NB + HB) - 1}")
        written = table[int(pos[0]) // bs:needed]
        if written.max() >= I * NB:
            raise ValueError(f"sequence {n}: new tokens must go to device blocks, "
                             f"a written block is host block {int(written.max()) - I * NB}")

        rows = s.instance * T + s.row + np.arange(count)
        positions[rows] = pos
        slots[rows] = table[pos // bs] * bs + pos % bs
        # int32 items (half the bytes of int64): long prefill chunks make millions
        table32 = table[:needed].astype(np.int32)
        kstart32 = np.arange(needed, dtype=np.int32) * bs
        for t0 in range(0, count, q_tile):
            tile_rows = np.full(q_tile, -1, np.int32)
            chunk = rows[t0:t0 + q_tile]
            tile_rows[:len(chunk)] = chunk
            tile = len(tiles)
            tiles.append(tile_rows)
            blocks = int(pos[min(t0 + q_tile, count) - 1]) // bs + 1  # causal: up to the last query
            item_parts.append((np.full(blocks, tile, np.int32), table32[:blocks],
                               kstart32[:blocks]))

    if fast is not None:
        slots, positions, tile_arr, it, gb, ks = fast
    else:
        tile_arr = np.stack(tiles) if tiles else np.zeros((0, q_tile), np.int32)
        if item_parts:
            it, gb, ks = (np.concatenate(c) for c in zip(*item_parts))
        else:
            it = gb = ks = np.zeros(0, np.int32)
    n_tiles = bucket(len(tile_arr), min_tiles)
    tile_rows = np.full((n_tiles, q_tile), -1, np.int32)
    tile_rows[:len(tile_arr)] = tile_arr
    overhead = RUN_OVERHEAD_DECODE if q_tile == 1 else RUN_OVERHEAD_PREFILL
    on_host = gb >= I * NB
    any_host = bool(on_host.any())
    dev = ~on_host
    d_it, d_gb, d_ks = (it[dev], gb[dev], ks[dev]) if any_host else (it, gb, ks)
    item_tile, item_block, item_kstart = _work_list(
        d_it, d_gb // NB, d_gb % NB, d_ks, I, n_tiles, run, run_choices, overhead, min_runs)
    host = (None, None, None)
    if any_host:
        hb = gb[on_host] - I * NB
        host = _work_list(it[on_host], hb // HB, hb % HB, ks[on_host], I, n_tiles, HOST_RUN,
                          run_choices, overhead, min_runs)
    return AttentionPlan(slots, positions, tile_rows, item_tile, item_block, item_kstart, *host)


def _work_list(it, inst, local, ks, I: int, n_tiles: int, run: int | None, run_choices,
               overhead: float, min_runs: int):
    """Per-instance padded work lists [I, R, run] (tile, local block, key
    start) of items (tile it[k] x block local[k] of instance inst[k])."""
    # Group by instance, keeping build order: each tile's items stay contiguous.
    # (16-bit keys: numpy's stable sort is then a radix sort, O(n).)
    if len(inst) > 1 and np.any(inst[1:] < inst[:-1]):
        order = np.argsort(inst.astype(np.int16), kind="stable")
        it, local, ks, inst = it[order], local[order], ks[order], inst[order]
    # Segments of equal (instance, tile): their lengths decide the run length.
    new_seg = np.ones(len(it), bool)
    new_seg[1:] = (it[1:] != it[:-1]) | (inst[1:] != inst[:-1])
    seg_id = np.cumsum(new_seg) - 1
    seg_start = np.flatnonzero(new_seg)
    seg_len = np.diff(np.append(seg_start, len(it)))
    run = run or choose_run(seg_len, run_choices, overhead)
    # Each item's slot in its instance's padded work list.
    seg_padded = -(-seg_len // run) * run
    seg_inst = inst[seg_start]
    seg_offset = np.zeros(len(seg_len), np.int64)  # start of each segment within its instance
    for i in range(I):
        sel = np.flatnonzero(seg_inst == i)
        seg_offset[sel] = np.concatenate([[0], np.cumsum(seg_padded[sel])[:-1]]) if len(sel) else []
    per_inst = np.bincount(seg_inst, weights=seg_padded, minlength=I).astype(np.int64)
    R = coarse_bucket(int(per_inst.max()) // run if len(per_inst) else 0, min_runs)
    W = R * run
    item_tile = np.full((I, W), n_tiles, np.int32)
    item_block = np.zeros((I, W), np.int32)
    item_kstart = np.full((I, W), MASKED, np.int32)
    # padding inside a run keeps the run's tile, with a masked key start
    rep = np.repeat(np.arange(len(seg_len)), seg_padded)
    within = np.arange(len(rep)) - np.repeat(np.cumsum(seg_padded) - seg_padded, seg_padded)
    # flat indices: one 1-D scatter each (a 2-D fancy index costs ~2x)
    item_tile.reshape(-1)[seg_inst[rep] * W + seg_offset[rep] + within] = it[seg_start[rep]]
    flat = inst * W + seg_offset[seg_id] + (np.arange(len(it)) - seg_start[seg_id])
    item_block.reshape(-1)[flat] = local
    item_kstart.reshape(-1)[flat] = ks
    shape = (I, R, run)
    return item_tile.reshape(shape), item_block.reshape(shape), item_kstart.reshape(shape)
