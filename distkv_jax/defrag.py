"""Defragmentation and locality (our rendering of the paper's DGFM). No JAX.

The debts form a directed graph: an edge d -> c with weight ``ledger[d, c]``
when requests homed on ``d`` hold blocks of ``c``. A cycle
X0 -> X1 -> ... -> Xk-1 -> X0 is pure waste: request r_j (home X_j) holds a
block b_{j+1} on X_{j+1} while X_j's own block b_j is held by r_{j-1}. One
*cycle unit* rotates the blocks: r_j takes b_j (moving its data b_{j+1} -> b_j),
so k blocks come home, every edge of the cycle loses one unit of debt, and no
block is allocated or freed. The k moves run as one gather-then-scatter batch
(all sources read before any write), which is what makes the rotation safe.

Return-home migration: a request holding borrowed blocks whose home instance
has free blocks again gets them copied into fresh home blocks; the borrowed
blocks are freed (one move per block).

Shared blocks (prefix-cache hits and forks, read by several requests) are
never moved: they are charged to no debtor, so no debt asks for it, and the
planners skip them. A private block that is registered in the prefix cache
moves with its hash.

Reclaim (lending that can be taken back): a creditor whose own requests
need the blocks it has lent moves the borrowers' data elsewhere: to the
borrower's home when it has a free block, else to the instance with the most
lendable free blocks; one move per block, bounded per step with migration.

All planners mutate the managers and the block table as they plan, and
return the (src, dst) device block moves that the engine must execute.
Cycle rotation and return-home migration never increase the number of remote
blocks; a reclaim move may keep a block remote (on another creditor).
"""
from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np

from distkv_jax.block_table import BlockTable
from distkv_jax.global_manager import GlobalManager
from distkv_jax.kv_types import RequestId

Running = Sequence[tuple[RequestId, int]]  # (request id, home) in arrival order


def shortest_cycle(ledger: np.ndarray) -> list[int] | None:
    """The shortest cycle of the debt graph, or None.

    Deterministic: BFS from each start node with neighbours in ascending id
    order; the shortest cycle wins, ties go to the lowest start node. The
    cycle is returned starting at that node, in edge direction.
    """
    n = ledger.shape[0]
    adj = [np.flatnonzero(ledger[i] > 0).tolist() for i in range(n)]
    best: list[int] | None = None
    for s in range(n):
        if not adj[s]:
            continue
        parent = {s: -1}
        q = deque([s])
        found = None
        while q and found is None:
            u = q.popleft()
            for v in adj[u]:
                if v == s:
                    found = u
                    break
                if v not in parent:
                    parent[v] = u
                    q.append(v)
        if found is None:
            continue
        path = []
        u = found
        while u != -1:
            path.append(u)
            u = parent[u]
        path.reverse()  # s -> ... -> found (-> s)
        if best is None or len(path) < len(best):
            best = path
            if len(best) == 2:
                break
    return best


def _pick_block(
    gm: GlobalManager,
    table: BlockTable, running: Running, debtor: int, creditor: int
) -> tuple[RequestId, int, int]:
    """The first (oldest request, lowest logical) block of debtor's on creditor."""
    bpi = table.blocks_per_instance
    mgr = gm.managers[creditor]
    for rid, home in running:
        if home != debtor:
            continue
        ids = table.blocks(rid)
        for k in np.flatnonzero(ids // bpi == creditor).tolist():
            if mgr.is_private(int(ids[k])):  # shared blocks stay in place
                return rid, k, int(ids[k])
    raise RuntimeError(f"ledger says {debtor} owes {creditor} but no block found")


def cancel_cycles(
    gm: GlobalManager, table: BlockTable, running: Running, budget: int
) -> list[tuple[int, int]]:
    """Rotate blocks along debt cycles, shortest first, within ``budget`` moves.

    A cycle unit is atomic; it may exceed the budget only when it is the first
    unit planned (so a 1-block budget still cancels 2-cycles, one per step).
    """
    moves: list[tuple[int, int]] = []
    if budget <= 0:
        return moves
    while True:
        cyc = shortest_cycle(gm.ledger)
        if cyc is None:
            break
        k = len(cyc)
        if moves and len(moves) + k > budget:
            break
        picks = [_pick_block(gm, table, running, cyc[j], cyc[(j + 1) % k]) for j in range(k)]
        # r_j := picks[j][0] holds b_{j+1} = picks[j][2]; it takes b_j = picks[j-1][2].
        # A registered prefix hash follows its KV to the new block.
        hashes = [gm.manager_of(p[2]).unregister(p[2]) for p in picks]
        for j in range(k):
            rid, logical, old = picks[j]
            new = picks[j - 1][2]
            gm.rehold(new, old_home=cyc[j - 1], new_home=cyc[j])
            table.set(rid, logical, new)
            if hashes[j] is not None:
                gm.manager_of(new).register(new, hashes[j])
            moves.append((old, new))
        if len(moves) >= budget:
            break
    return moves


def return_home(
    gm: GlobalManager,
    table: BlockTable,
    running: Running,
    budget: int,
    reserve: int = 0,
) -> list[tuple[int, int]]:
    """Copy borrowed blocks home while the home has free blocks (oldest first)."""
    moves: list[tuple[int, int]] = []
    if budget <= 0 or gm.remote_blocks() == 0:
        return moves
    bpi = table.blocks_per_instance
    for rid, home in running:
        if len(moves) >= budget:
            break
        mgr = gm.managers[home]
        # only free-list blocks: evicting cached prefixes to move KV home
        # would trade a sure loss for a small gain in locality
        if mgr.num_unused <= reserve or gm.ledger[home].sum() == 0:
            continue
        ids = table.blocks(rid)
        remote = np.flatnonzero((ids // bpi != home) & (ids < gm.config.num_device_blocks))
        for k in remote.tolist():
            if len(moves) >= budget or mgr.num_unused <= reserve:
                break
            old = int(ids[k])
            if not gm.manager_of(old).is_private(old):  # shared blocks stay in place
                continue
            (new,) = mgr.allocate_local(1)
            table.set(rid, k, new)
            h = gm.manager_of(old).unregister(old)
            gm.free(home, [old])
            if h is not None:
                mgr.register(new, h)
            moves.append((old, new))
    return moves


def reclaim(
    gm: GlobalManager,
    table: BlockTable,
    running: Running,
    creditor: int,
    want: int,
    exclude: set[int] | frozenset = frozenset(),
) -> list[tuple[int, int]]:
    """Take back up to ``want`` of ``creditor``'s lent blocks by moving each
    borrower's data to another instance with a free-list block: its own home
    first (the block comes home), else the instance with the most lendable
    free blocks (ties: lowest id). Borrowers are taken newest first, each from
    its last block back; shared blocks and ``exclude`` (blocks written by an
    earlier move of the same batch) stay. Returns the (src, dst) moves; every
    source block is free on ``creditor`` afterwards."""
    moves: list[tuple[int, int]] = []
    if want <= 0 or gm.managers[creditor].lent == 0:
        return moves
    bpi = table.blocks_per_instance
    mgr = gm.managers[creditor]
    for rid, home in reversed(list(running)):
        if len(moves) >= want:
            break
        if home == creditor:
            continue
        ids = table.blocks(rid)
        for k in np.flatnonzero(ids // bpi == creditor)[::-1].tolist():
            if len(moves) >= want:
                break
            old = int(ids[k])
            if old in exclude or not mgr.is_private(old):
                continue
            room = np.asarray([m.num_unused if c == home else m.lendable_unused
                               for c, m in enumerate(gm.managers)], dtype=np.int64)
            room[creditor] = -1
            dest = home if room[home] > 0 else int(np.argmax(room))
            if room[dest] <= 0:
                return moves  # no free block anywhere else: nothing more to move
            if dest == home:
                (new,) = gm.managers[home].allocate_local(1)
            else:
                (new,) = gm.managers[dest].allocate_remote(home, 1)
                gm.ledger[home, dest] += 1
            table.set(rid, k, new)
            h = mgr.unregister(old)
            gm.free(home, [old])
            if h is not None:
                gm.managers[dest].register(new, h)
            moves.append((old, new))
    return moves
