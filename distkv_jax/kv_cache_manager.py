"""Scheduler-facing facade of the distributed KV cache (plain Python + numpy).

Owns the rManagers and gManager (``GlobalManager``), the host tier and the
block table, and turns scheduler events into plans for the device:

    admit(rid, instance=None) -> home instance
    grow(rid, n) -> GrowResult              # slots for n new tokens, preempting if needed
    finish(rid)                              # frees device and host blocks
    preempt(rid) -> Preemption               # swap to host, or recompute if host is full
    swap_in(rid) -> CopyPlan | None          # host -> device, None if no room
    defragment(max_blocks=None) -> CopyPlan  # debt-cycle rotation
    migrate(max_blocks=None) -> CopyPlan     # borrowed blocks back home
    plan_migration(max_blocks=None) -> CopyPlan  # both, within the per-step budget
    prepare_step(demands) -> StepKVPlan      # all of the above for one engine step

Reclaimable lending: an instance lends any free block (lend_fraction 1.0 by
default) and takes lent blocks back when its own requests need them. When a
request's home has too few free blocks but has lent some, ``grow`` first
moves borrowers' blocks to their homes or to other instances with free
blocks (bounded per step, with migration, and not once a request was
preempted this step: a move must not land in a block whose data is still to
be swapped out, nor in one an earlier move of the batch wrote). When memory is exhausted, the borrowers of the home's blocks
are preempted (newest first, after any newer request that would help),
whatever their age: blocks lent are lent on the condition that they come
back. A preempted borrower is swapped in again only when it fits and leaves
every instance a block of headroom per running request homed there.

Host-attended KV (``host_attention``): when a growing request finds no
device block anywhere, full private blocks of running requests are copied
to the host tier (borrowers' blocks on its home first: reclaim to the host;
then its own oldest; then the newest requests' oldest) and stay in their
tables as host entries (``num_device_blocks + h``): DistAttention attends
them on the host. Only then is anyone preempted. Host blocks come back
(newest first, within the migration budget) in steps that offloaded and
preempted nothing, while every instance keeps a free block per running
request homed there. A swapped request comes back with its last (partial)
block on device and as many of its other blocks as fit.

Prefix cache and forks (blocks shared by several readers):

    reuse_prefix(rid, tokens) -> int         # longest cached prefix, in whole blocks
    register(rid, tokens)                    # the request's computed full blocks join the cache
    fork(child, parent, num_tokens) -> bool  # share the parent's blocks, copy its partial one

The ledger's rule for shared blocks: a block read by one request is private
to it and charged to its home (lent when it lives elsewhere); a block read
through the cache or a fork is shared: it belongs to the mesh-wide cache and
is charged to no debtor. Shared blocks are never migrated, rotated or evicted
while read; a request taken off the device (swap or recompute) lets go of its
references, so the other readers keep their blocks, and a swapped request
comes back to private copies.

Requests are ordered by arrival (``admit`` order); every loop over requests
follows that order, so all decisions are deterministic. Preemption victims are
the newest running requests; growth is served oldest first.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from distkv_jax import defrag
from distkv_jax.block_table import BlockTable
from distkv_jax.global_manager import GlobalManager
from distkv_jax.host_tier import HostTier
from distkv_jax.kv_types import (
    CopyPlan,
    GrowResult,
    KVCacheConfig,
    Preemption,
    RequestId,
    StepKVPlan,
)

from distkv_jax.request import RequestStatus

RUNNING, SWAPPED = RequestStatus.RUNNING, RequestStatus.SWAPPED

_EMPTY_SLOTS = np.zeros(0, dtype=np.int64)


@dataclass
class _Allocation:
    """The blocks side of one request id: its home, KV length and host
    blocks (as vLLM's KV manager keeps req_to_blocks). The request itself is
    `request.Request`; this manager is keyed by its id and tested alone."""

    rid: RequestId
    seq: int
    home: int
    state: str = RUNNING
    num_tokens: int = 0
    host_blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of its stream's full blocks
    num_registered: int = 0      # table blocks already offered to the prefix cache
    promised: list[bytes] = field(default_factory=list)  # prompt blocks it is computing
    # instances that took blocks back from it (reclaim): it never preempts
    # their requests in turn (a lent block comes back on the lender's terms)
    reclaimed_by: set = field(default_factory=set)


@dataclass
class _StepState:
    """Planning state shared by the growths of one step."""

    budget: int                                   # device moves left this step
    dests: set = field(default_factory=set)      # blocks written by this step's moves
    preempted: bool = False                       # a request was taken off this step
    grown: dict = field(default_factory=dict)     # request id -> KV length before this step
    # host blocks let go of this step (a request with blocks offloaded this
    # step, then preempted for recompute): freed when the step's plan is
    # done, so that no two copies of the step's swap-out batch write one block
    host_freed: list = field(default_factory=list)


class KVCacheManager:
    def __init__(self, config: KVCacheConfig) -> None:
        self.config = config
        self.gm = GlobalManager(config)
        self.host = HostTier(config)
        self.table = BlockTable(
            config.block_size, config.blocks_per_instance, config.num_instances
        )
        self._reqs: dict[RequestId, _Allocation] = {}
        self._next_seq = 0
        self._root = hashlib.blake2b(b"distkv-prefix:" + config.cache_salt.encode(),
                                     digest_size=16).digest()
        self._forks: list[tuple[int, int]] = []  # partial-block copies of this step's forks
        # prompt blocks being computed by a running request (hash -> request):
        # a request that needs one next waits for it instead of computing it twice
        self._promised: dict[bytes, RequestId] = {}
        I = config.num_instances
        # prefix cache counters per home instance, in tokens: queried, hit on
        # the home instance's blocks, hit on other instances' blocks
        self.prefix_queries = np.zeros(I, np.int64)
        self.prefix_hits_local = np.zeros(I, np.int64)
        self.prefix_hits_remote = np.zeros(I, np.int64)
        # blocks creditors took back (by instance): moved away, or freed by
        # preempting the borrower
        self.reclaimed_moved = np.zeros(I, np.int64)
        self.reclaimed_preempted = np.zeros(I, np.int64)
        self.reclaimed_offloaded = np.zeros(I, np.int64)   # ... or moved to the host tier
        # host-attended KV: blocks offloaded to / brought back from the host
        # tier, by the instance whose host pool holds them
        self.offloaded = np.zeros(I, np.int64)
        self.brought_back = np.zeros(I, np.int64)
        self._D = config.num_device_blocks
        self._step_state: _StepState | None = None

    # ------------------------------------------------------------------ queries
    def requests(self) -> list[RequestId]:
        """Live request ids in arrival order."""
        return [r.rid for r in self._ordered()]

    def _ordered(self, state: str | None = None) -> list[_Allocation]:
        rs = sorted(self._reqs.values(), key=lambda r: r.seq)
        return rs if state is None else [r for r in rs if r.state == state]

    def _running(self) -> list[tuple[RequestId, int]]:
        return [(r.rid, r.home) for r in self._ordered(RUNNING)]

    def state(self, rid: RequestId) -> str:
        return self._reqs[rid].state

    def home(self, rid: RequestId) -> int:
        return self._reqs[rid].home

    def num_tokens(self, rid: RequestId) -> int:
        return self._reqs[rid].num_tokens

    def block_ids(self, rid: RequestId) -> np.ndarray:
        """Global device block ids of a running request, logical order."""
        return self.table.blocks(rid)

    def host_block_ids(self, rid: RequestId) -> tuple[int, ...]:
        return tuple(self._reqs[rid].host_blocks)

    def ledger(self) -> np.ndarray:
        """``ledger[d, c]``: blocks of instance c held by requests homed on d."""
        return self.gm.ledger.copy()

    def free_device_blocks(self) -> np.ndarray:
        return self.gm.free_counts()

    def reclaimable(self, instance: int) -> int:
        """Blocks ``instance`` has lent to running requests: it can take them
        back for its own requests (moving or preempting the borrowers)."""
        if self.config.kv_policy == "local":
            return 0
        return self.gm.managers[instance].lent

    def free_host_blocks(self) -> np.ndarray:
        return self.host.free_counts()

    def host_attended_blocks(self) -> np.ndarray:
        """Host blocks in running requests' tables, per host pool's instance."""
        out = np.zeros(self.config.num_instances, np.int64)
        if not self.config.host_attention:
            return out
        for r in self._ordered(RUNNING):
            ids = self.table.blocks(r.rid)
            h = ids[ids >= self._D] - self._D
            if len(h):
                out += np.bincount(h // self.config.host_blocks_per_instance,
                                   minlength=self.config.num_instances)
        return out

    def offloadable(self, instance: int) -> int:
        """Device blocks on ``instance`` that running requests' growth could
        move to the host tier (full, private), capped by the host's room."""
        if not self.config.host_attention:
            return 0
        room = self.host.available_for(instance)
        n = 0
        bs, bpi = self.config.block_size, self.config.blocks_per_instance
        m = self.gm.managers[instance]
        for r in self._ordered(RUNNING):
            if n >= room:
                break
            ids = self.table.blocks(r.rid)[:r.num_tokens // bs]
            for g in ids[(ids // bpi) == instance].tolist():
                n += m.refs[g - m.base] == 1
        return min(n, room)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size)

    def max_request_tokens(self, instance: int = 0) -> int:
        return self.config.max_request_blocks(instance) * self.config.block_size

    def slots(self, rid: RequestId, start: int, n: int) -> np.ndarray:
        return self.table.slots(rid, start, n)

    def snapshot(self) -> dict:
        """Plain-data state, for determinism checks and debugging."""
        reqs = []
        for r in self._ordered():
            blocks = self.table.blocks(r.rid).tolist() if r.state == RUNNING else []
            reqs.append((repr(r.rid), r.seq, r.home, r.state, r.num_tokens, blocks,
                         list(r.host_blocks)))
        return {
            "requests": reqs,
            "ledger": self.gm.ledger.tolist(),
            "free": [m.free_blocks().tolist() for m in self.gm.managers],
            "host_free": [p.free_blocks().tolist() for p in self.host.pools],
            "cached": [sorted((h.hex(), p) for h, p in m.cached.items()) for m in self.gm.managers],
            "evictable": [m.evictable_blocks() for m in self.gm.managers],
        }

    # --------------------------------------------------------------- lifecycle
    def choose_instance(self) -> int:
        """Home for a new request: most free device blocks, ties to lowest id."""
        return int(np.argmax(self.gm.free_counts()))

    def admit(self, rid: RequestId, instance: int | None = None,
              hashes: list[bytes] | None = None) -> int:
        """A new request, homed on ``instance`` (default: most free blocks).
        ``hashes``: its prefix-hash chain computed so far (see
        ``prefix_hashes``), adopted and extended in place."""
        if rid in self._reqs:
            raise KeyError(f"request {rid!r} already admitted")
        home = self.choose_instance() if instance is None else int(instance)
        if not 0 <= home < self.config.num_instances:
            raise ValueError(f"instance {home} out of range")
        self._reqs[rid] = _Allocation(rid, self._next_seq, home,
                                      hashes=[] if hashes is None else hashes)
        self._next_seq += 1
        self.table.add(rid)
        return home

    def finish(self, rid: RequestId) -> None:
        r = self._reqs.pop(rid)
        self._unpromise(r)
        ids = self.table.remove(rid)
        dev, host = self._split(ids)
        # last block first: a released prefix is evicted from its tail
        self.gm.free(r.home, dev[::-1])
        if self._forks:  # admitted and dropped in the same planning: no copy into a freed block
            mine = set(dev)
            self._forks = [(a, b) for a, b in self._forks if b not in mine]
        self.host.free(host + list(r.host_blocks))

    def _split(self, ids) -> tuple[list[int], list[int]]:
        """Table entries -> (device block ids, host block ids), in order."""
        D = self._D
        ids = [int(g) for g in ids]
        return [g for g in ids if g < D], [g - D for g in ids if g >= D]

    # ------------------------------------------------------------ prefix cache
    def _chain(self, r: _Allocation, tokens: Sequence[int], k: int) -> list[bytes]:
        return self.prefix_hashes(tokens, k, r.hashes)

    def prefix_hashes(self, tokens: Sequence[int], k: int, hs: list[bytes]) -> list[bytes]:
        """The first ``k`` full-block hashes of a token stream, extending the
        chain ``hs`` (computed so far) in place: each block's hash is chained
        over its parent's hash and its token ids (the salt is in the root).
        Streams only grow, so each is computed once."""
        bs = self.config.block_size
        while len(hs) < k:
            j = len(hs)
            block = np.asarray(tokens[j * bs:(j + 1) * bs], dtype=np.int64)
            parent = hs[-1] if hs else self._root
            hs.append(hashlib.blake2b(parent + block.tobytes(), digest_size=16).digest())
        return hs[:k]

    def _scope(self, home: int) -> list[int]:
        """Instances whose cached blocks a request homed on ``home`` may read:
        its own first, then (distributed) every other, ascending."""
        if self.config.kv_policy == "local":
            return [home]
        return [home] + [i for i in range(self.config.num_instances) if i != home]

    def _find(self, h: bytes, scope: list[int]) -> int | None:
        for c in scope:
            g = self.gm.managers[c].lookup(h)
            if g is not None:
                return g
        return None

    def reuse_prefix(self, rid: RequestId, tokens: Sequence[int]) -> int:
        """Start a request with no KV yet (just admitted, or preempted for
        recompute) on the longest cached prefix of ``tokens``: whole blocks,
        and never the last token (its logits are needed, so it is always
        computed). The blocks are shared in place, wherever they live.
        Returns the cached tokens (0 when caching is off)."""
        r = self._reqs[rid]
        if r.state != RUNNING or r.num_tokens or self.table.num_blocks(rid):
            raise ValueError(f"reuse_prefix of {rid!r}: it already has KV")
        if not self.config.enable_prefix_caching or len(tokens) < 2:
            return 0
        self.prefix_queries[r.home] += len(tokens)
        bs, bpi = self.config.block_size, self.config.blocks_per_instance
        scope = self._scope(r.home)
        hits: list[int] = []
        for h in self._chain(r, tokens, (len(tokens) - 1) // bs):
            g = self._find(h, scope)
            if g is None:
                break
            hits.append(g)
        for g in hits:
            self.gm.share(g)
        self.table.append(rid, hits)
        r.num_tokens = len(hits) * bs
        r.num_registered = len(hits)
        # the rest of its prompt's full blocks: promised to later requests
        for h in self._chain(r, tokens, len(tokens) // bs)[len(hits):]:
            if h not in self._promised and self._find(h, scope) is None:
                self._promised[h] = rid
                r.promised.append(h)
        local = sum(1 for g in hits if g // bpi == r.home)
        self.prefix_hits_local[r.home] += local * bs
        self.prefix_hits_remote[r.home] += (len(hits) - local) * bs
        return r.num_tokens

    def register(self, rid: RequestId, tokens: Sequence[int]) -> int:
        """Offer a running request's full blocks whose KV is written (its
        first min(num_tokens, len(tokens)) tokens: call after the step that
        writes them is dispatched) to the prefix cache. A block whose hash is
        cached already, in the request's scope, stays private (no duplicate
        entries). Returns how many blocks were registered."""
        if not self.config.enable_prefix_caching:
            return 0
        r = self._reqs[rid]
        if r.state != RUNNING:
            return 0
        full = min(r.num_tokens, len(tokens)) // self.config.block_size
        if full <= r.num_registered:
            return 0
        hs = self._chain(r, tokens, full)
        ids = self.table.blocks(rid)
        scope = self._scope(r.home)
        added = 0
        for j in range(r.num_registered, full):
            g = int(ids[j])
            if g >= self._D:  # host-attended: not shared through the cache
                continue
            m = self.gm.manager_of(g)
            if m.hash_of_block(g) is not None or self._find(hs[j], scope) is not None:
                continue
            m.register(g, hs[j])
            added += 1
        if r.promised:
            for j in range(r.num_registered, full):
                if self._promised.get(hs[j]) == rid:
                    del self._promised[hs[j]]
        r.num_registered = full
        return added

    def _unpromise(self, r: _Allocation) -> None:
        for h in r.promised:
            if self._promised.get(h) == r.rid:
                del self._promised[h]
        r.promised = []

    def awaits_prefix(self, tokens: Sequence[int], hashes: list[bytes]) -> bool:
        """True when the first block of ``tokens`` (a waiting request's
        prompt; ``hashes`` its chain so far, extended in place) that no
        instance has cached is being computed by a running request: admitting
        it now would compute that block twice. Distributed policy only (under
        local the request may land on another instance)."""
        if not self.config.enable_prefix_caching or self.config.kv_policy == "local" \
                or not self._promised:
            return False
        scope = list(range(self.config.num_instances))
        for h in self.prefix_hashes(tokens, (len(tokens) - 1) // self.config.block_size, hashes):
            if self._find(h, scope) is None:
                return h in self._promised
        return False

    def fork(self, child: RequestId, parent: RequestId, num_tokens: int) -> bool:
        """Start ``child`` (running, no KV yet) on the first ``num_tokens``
        tokens of ``parent``'s KV: the full blocks are shared, the partial
        last one is copied (copy on write: each sequence writes its own
        tokens after the fork). The copy runs first in the next step's KV
        plan (``StepKVPlan.forks``). False, with nothing changed, when the
        copy finds no free block, or under ``local`` when the two requests
        live on different instances."""
        c, p = self._reqs[child], self._reqs[parent]
        if c.state != RUNNING or c.num_tokens or self.table.num_blocks(child):
            raise ValueError(f"fork into {child!r}: it already has KV")
        if p.state != RUNNING or num_tokens > p.num_tokens:
            raise ValueError(f"fork from {parent!r}: its first {num_tokens} tokens are not on device")
        if self.config.kv_policy == "local" and c.home != p.home:
            return False
        bs = self.config.block_size
        full, part = divmod(num_tokens, bs)
        pids = self.table.blocks(parent)
        if (pids[:-(-num_tokens // bs)] >= self._D).any():
            return False  # host-attended blocks are not shared (the child recomputes)
        copy = []
        if part:
            got = self.gm.allocate(c.home, 1)
            if got is None:
                return False
            copy = [(int(pids[full]), got[0])]
        for g in pids[:full].tolist():
            self.gm.share(g)
        self.table.append(child, pids[:full].tolist() + [d for _, d in copy])
        self._forks.extend(copy)
        c.num_tokens = num_tokens
        c.num_registered = full  # the parent's blocks: registered by the parent
        return True

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block no request reads (vLLM's
        reset_prefix_cache); True when the cache is now empty (no running
        request holds registered blocks)."""
        for m in self.gm.managers:
            m.drop_cached()
        return all(not m.cached for m in self.gm.managers)

    def num_cached_blocks(self) -> np.ndarray:
        """Evictable prefix-cache blocks per instance (no reader)."""
        return np.asarray([m.num_evictable for m in self.gm.managers], np.int64)

    # ------------------------------------------------------------------ growth
    def grow(self, rid: RequestId, n: int, keep: int = 0) -> GrowResult:
        """Allocate slots for ``n`` new tokens of a running request (see
        ``_grow``)."""
        if self._step_state is not None:
            return self._grow(rid, n, keep)
        # outside prepare_step: a state for this growth alone (no reclaim moves)
        self._step_state = _StepState(0)
        try:
            return self._grow(rid, n, keep)
        finally:
            self.host.free(self._step_state.host_freed)
            self._step_state = None

    def _grow(self, rid: RequestId, n: int, keep: int = 0) -> GrowResult:
        """Allocate slots for ``n`` new tokens of a running request.
        ``keep``: device blocks its host offload leaves free for others (the
        scheduler's reserve for short requests).

        When the home instance is short of free blocks but has lent some, the
        borrowers' blocks are moved away first (reclaim, within the step's
        move budget). When the blocks cannot be found: under host attention,
        full blocks go to the host tier (``_offload``); then the newest
        running requests that are newer than this one and whose blocks would
        help are preempted, newest first; then borrowers of the home's blocks
        (any age, newest first); if none is left, this request itself is
        preempted.
        """
        r = self._reqs[rid]
        if r.state != RUNNING:
            raise ValueError(f"grow of {r.state} request {rid!r}: swap it in first")
        if n < 0:
            raise ValueError("n must be >= 0")
        start = r.num_tokens
        total = self.blocks_needed(start + n)
        if total > self.config.max_request_blocks(r.home):
            return GrowResult(rid, "too_long", start, n, _EMPTY_SLOTS)
        need = total - self.table.num_blocks(rid)
        # reclaim moves are planned within a step (prepare_step), which runs
        # them with its migration moves; a growth outside one only preempts
        st = self._step_state
        moves: list[tuple[int, int]] = []
        home = self.gm.managers[r.home]
        short = need - home.num_unused
        if short > 0 and home.lent > 0 and st.budget > 0 and not st.preempted \
                and self.config.kv_policy != "local":
            moves = defrag.reclaim(self.gm, self.table, self._running(), r.home,
                                   min(short, st.budget), st.dests)
            st.budget -= len(moves)
            st.dests.update(d for _, d in moves)
            self.reclaimed_moved[r.home] += len(moves)
        plan = CopyPlan("move", tuple(moves))
        offload: list[tuple[int, int]] = []
        if need > 0 and self.config.host_attention and self.gm.available_for(r.home) < need + keep:
            offload = self._offload(r, need + keep, st)
            if offload:
                st.preempted = True  # device blocks were freed: no reclaim moves after this
        off_plan = CopyPlan("swap_out", tuple(offload))
        preemptions: list[Preemption] = []
        while need > 0 and self.gm.available_for(r.home) < need:
            victim = self._pick_victim(r)
            if victim is None:
                preemptions.append(self._preempt(r))
                st.preempted = True
                return GrowResult(rid, "preempted", start, n, _EMPTY_SLOTS, tuple(preemptions),
                                  plan, off_plan)
            if victim.seq < r.seq:  # an older borrower: the home takes its blocks back
                self.reclaimed_preempted[r.home] += self._blocks_on(victim, r.home)
                victim.reclaimed_by.add(r.home)
                if victim.rid in st.grown:  # grown earlier this step: undo, nothing was written
                    self._shrink(victim, st.grown[victim.rid])
            preemptions.append(self._preempt(victim))
            st.preempted = True
        if need > 0:
            ids = self.gm.allocate(r.home, need)
            assert ids is not None
            self.table.append(rid, ids)
        r.num_tokens = start + n
        st.grown.setdefault(rid, start)
        return GrowResult(rid, "ok", start, n, self.table.slots(rid, start, n), tuple(preemptions),
                          plan, off_plan)

    def _offload(self, r: _Allocation, need: int, st: _StepState) -> list[tuple[int, int]]:
        """Copy full private device blocks of running requests to the host
        tier until ``r``'s home can get ``need`` blocks: the blocks of
        borrowers of ``r``'s home first (reclaim), then ``r``'s own, then the
        newest requests'; each request's oldest first. A block counts
        when freeing it helps ``r`` (on its home, or on an instance that can
        lend it) and its KV is written (before this step's growth). The
        block stays in its table as a host entry. Returns (device, host)
        copies."""
        cfg = self.config
        bs, bpi = cfg.block_size, cfg.blocks_per_instance
        newest = [q for q in reversed(self._ordered(RUNNING)) if q is not r]
        # borrowers' blocks on r's home first (lent blocks come back: reclaim
        # to the host tier), newest borrower first; then r's own blocks; then
        # the other requests', newest first
        borrowers = [q for q in newest if q.home != r.home and self._blocks_on(q, r.home)]
        order = [(q, True) for q in borrowers] + [(q, False) for q in [r] + newest]
        pairs: list[tuple[int, int]] = []
        for q, home_only in order:
            written = st.grown.get(q.rid, q.num_tokens) // bs  # its full, written blocks
            ids = self.table.blocks(q.rid)[:written]
            sel = (ids // bpi == r.home) if home_only else (ids < self._D)
            for j in np.flatnonzero(sel).tolist():
                if self.gm.available_for(r.home) >= need:
                    return pairs
                g = int(ids[j])
                c = g // bpi
                m = self.gm.managers[c]
                if m.refs[g - m.base] != 1:
                    continue  # shared (cache, fork): stays on device for its other readers
                if c != r.home and (cfg.kv_policy == "local" or min(
                        m.num_free + 1, m.lend_cap - m.lent + (c != q.home)) <= m.lendable):
                    continue  # freeing it would not give r a block
                host = self.host.allocate_for(q.home, [g])
                if host is None:
                    return pairs  # host tier full
                m.unregister(g)  # its cache entry (if any) goes: the block leaves the device
                self.gm.free(q.home, [g])
                self.table.set(q.rid, j, self._D + host[0])
                pairs.append((g, host[0]))
                self.offloaded[host[0] // cfg.host_blocks_per_instance] += 1
                if c == r.home and q.home != r.home:
                    self.reclaimed_offloaded[r.home] += 1
        return pairs

    def _bring_back(self, budget: int) -> list[tuple[int, int]]:
        """Host-attended blocks back to device blocks (oldest request first,
        each from its newest host block down), within ``budget``: on the
        request's home, else (distributed) borrowed from the instance with the
        most spare blocks (migration later moves them home), while every
        instance keeps a free block per running request homed there. Evictable prefix-cache blocks count as free: device
        attention of a running request outweighs a prefix that may return."""
        cfg = self.config
        pairs: list[tuple[int, int]] = []
        running = self._ordered(RUNNING)
        homed = np.bincount([q.home for q in running], minlength=cfg.num_instances)
        for q in running:
            if len(pairs) >= budget:
                break
            ids = self.table.blocks(q.rid)
            for j in np.flatnonzero(ids >= self._D)[::-1].tolist():
                if len(pairs) >= budget:
                    break
                # home first; else (distributed) a lender with spare blocks
                room = [m.num_free - homed[c] if c == q.home else
                        min(m.lendable, m.num_free - homed[c])
                        for c, m in enumerate(self.gm.managers)]
                if cfg.kv_policy == "local":
                    room = [room[c] if c == q.home else 0 for c in range(len(room))]
                dest = q.home if room[q.home] > 0 else int(np.argmax(room))
                if room[dest] <= 0:
                    break
                h = int(ids[j]) - self._D
                if dest == q.home:
                    (g,) = self.gm.managers[dest].allocate_local(1)
                else:
                    (g,) = self.gm.managers[dest].allocate_remote(q.home, 1)
                    self.gm.ledger[q.home, dest] += 1
                self.table.set(q.rid, j, g)
                self.host.free([h])
                pairs.append((h, g))
                self.brought_back[h // cfg.host_blocks_per_instance] += 1
        return pairs

    def _shrink(self, r: _Allocation, num_tokens: int) -> None:
        """Back to ``num_tokens`` of KV: the blocks past them (allocated for
        tokens not yet written) are let go of."""
        keep = self.blocks_needed(num_tokens)
        ids = self.table.blocks(r.rid).tolist()
        if len(ids) > keep:  # blocks allocated this step: on device
            self.table.clear(r.rid)
            self.table.append(r.rid, ids[:keep])
            self.gm.free(r.home, ids[keep:][::-1])
        r.num_tokens = num_tokens

    def _blocks_on(self, r: _Allocation, instance: int) -> int:
        """Blocks of ``r`` on ``instance`` that it alone reads (lent to it, or
        reached through the cache with no other reader): what ``instance``
        gets back if ``r`` lets go."""
        m = self.gm.managers[instance]
        ids = self.table.blocks(r.rid)
        return sum(1 for g in ids[ids // self.config.blocks_per_instance == instance].tolist()
                   if m.refs[g - m.base] == 1)

    def _gain(self, victim: _Allocation, home: int) -> int:
        """How many more blocks a request homed on ``home`` could get if
        ``victim`` let go of its device blocks (a block other requests still
        read stays taken)."""
        ids = self.table.blocks(victim.rid)
        ids = ids[ids < self._D]
        if ids.shape[0] == 0:
            return 0
        I, bpi = self.config.num_instances, self.config.blocks_per_instance
        freed = np.zeros(I, np.int64)      # blocks that would become free or evictable
        unlent = np.zeros(I, np.int64)     # ... of which lent to the victim
        for g in ids.tolist():
            c = g // bpi
            m = self.gm.managers[c]
            p = g - m.base
            if m.refs[p] == 1:
                freed[c] += 1
                if int(m.holder[p]) >= 0 and c != victim.home:
                    unlent[c] += 1
        gain = int(freed[home])
        if self.config.kv_policy == "local":
            return gain
        for c in np.flatnonzero(freed).tolist():
            if c == home:
                continue
            m = self.gm.managers[c]
            gain += max(0, min(m.num_free + int(freed[c]), m.lend_cap - (m.lent - int(unlent[c])))) \
                - m.lendable
        return gain

    def _pick_victim(self, r: _Allocation) -> _Allocation | None:
        running = self._ordered(RUNNING)
        for v in reversed(running):      # newer requests first (FCFS)
            if v.seq <= r.seq:
                break
            if v.home not in r.reclaimed_by and self._gain(v, r.home) > 0:
                return v
        if self.config.kv_policy == "local":
            return None
        for v in reversed(running):      # reclaim: older borrowers of the home's blocks
            if v.seq < r.seq and v.home != r.home and self._blocks_on(v, r.home) > 0 \
                    and self._gain(v, r.home) > 0:
                return v
        return None

    # -------------------------------------------------------------- host tier
    def preempt(self, rid: RequestId) -> Preemption:
        r = self._reqs[rid]
        if r.state != RUNNING:
            raise ValueError(f"preempt of {r.state} request {rid!r}")
        return self._preempt(r)

    def _preempt(self, r: _Allocation) -> Preemption:
        self._unpromise(r)
        table = self.table.blocks(r.rid).tolist()
        if not table:
            r.num_tokens = 0
            return Preemption(r.rid, "recompute")
        ids, attended = self._split(table)  # host-attended blocks stay where they are
        host = self.host.allocate_for(r.home, ids)
        self.table.clear(r.rid)
        self.gm.free(r.home, ids[::-1])  # shared blocks stay with their other readers
        r.num_registered = 0
        if host is None:
            if self._step_state is not None:
                self._step_state.host_freed.extend(attended)
            else:
                self.host.free(attended)
            r.num_tokens = 0
            return Preemption(r.rid, "recompute")
        r.state = SWAPPED
        new = iter(host)
        r.host_blocks = [g - self._D if g >= self._D else next(new) for g in table]
        return Preemption(r.rid, "swap", CopyPlan("swap_out", tuple(zip(ids, host))))

    def can_swap_in(self, rid: RequestId, extra_tokens: int = 0) -> bool:
        """It and its next tokens fit, leaving one free block per running
        request on every instance (so that a request swapped back in is not
        at once taken back by a creditor's growing requests)."""
        r = self._reqs[rid]
        total = self.blocks_needed(r.num_tokens + extra_tokens)
        if total > self.config.max_request_blocks(r.home):
            return False
        # device blocks it needs: all of them, or under host attention only its
        # partial last block and the new tokens' (full blocks may stay on host)
        need = total - (self._may_stay(r) if self.config.host_attention else 0)
        return self.gm.available_for(r.home) >= need + self._headroom(r)

    def _headroom(self, r: _Allocation) -> int:
        running = self._ordered(RUNNING)
        if self.config.kv_policy != "local":
            return len(running)
        return sum(1 for q in running if q.home == r.home)

    def _may_stay(self, r: _Allocation) -> int:
        """Blocks of a swapped request that may stay host-attended: full ones."""
        return min(len(r.host_blocks), r.num_tokens // self.config.block_size)

    def swap_in(self, rid: RequestId, extra_tokens: int = 0) -> CopyPlan | None:
        """Bring a swapped request back to device blocks, or None if no room.
        Under host attention its oldest full blocks stay host-attended when
        the devices cannot take them all (keeping room for ``extra_tokens``
        and the headroom of ``can_swap_in``)."""
        r = self._reqs[rid]
        if r.state != SWAPPED:
            raise ValueError(f"swap_in of {r.state} request {rid!r}")
        hb = list(r.host_blocks)
        stay = 0
        if self.config.host_attention:
            new = max(0, self.blocks_needed(r.num_tokens + extra_tokens) - len(hb))
            room = self.gm.available_for(r.home) - new - self._headroom(r)
            stay = min(self._may_stay(r), max(0, len(hb) - room))
        ids = self.gm.allocate(r.home, len(hb) - stay)
        if ids is None:
            return None
        self.table.append(rid, [self._D + h for h in hb[:stay]] + ids)
        plan = CopyPlan("swap_in", tuple(zip(hb[stay:], ids)))
        self.host.free(hb[stay:])
        r.host_blocks = []
        r.state = RUNNING
        return plan

    # ------------------------------------------------------- defrag / migrate
    def _budget(self, max_blocks: int | None) -> int:
        return self.config.migrate_blocks_per_step if max_blocks is None else max_blocks

    def defragment(self, max_blocks: int | None = None) -> CopyPlan:
        moves = defrag.cancel_cycles(self.gm, self.table, self._running(), self._budget(max_blocks))
        return CopyPlan("move", tuple(moves))

    def migrate(self, max_blocks: int | None = None) -> CopyPlan:
        moves = defrag.return_home(self.gm, self.table, self._running(),
                                   self._budget(max_blocks), self.config.home_reserve_blocks)
        return CopyPlan("move", tuple(moves))

    def plan_migration(self, max_blocks: int | None = None) -> CopyPlan:
        """Cycle rotation first, then return-home moves, in one move batch."""
        budget = self._budget(max_blocks)
        if budget <= 0 or self.gm.remote_blocks() == 0:
            return CopyPlan("move")
        running = self._running()
        moves = defrag.cancel_cycles(self.gm, self.table, running, budget)
        moves += defrag.return_home(self.gm, self.table, running,
                                    budget - len(moves), self.config.home_reserve_blocks)
        return CopyPlan("move", tuple(moves))

    # -------------------------------------------------------------------- step
    def prepare_step(self, demands: Iterable[tuple[RequestId, int]],
                     keep_free: dict[RequestId, int] | None = None) -> StepKVPlan:
        """Plan one engine step.

        ``demands``: (request id, new tokens this step) for every request the
        scheduler wants to run (running or swapped). ``keep_free``: blocks a
        request's host offload leaves free for the others (see ``_grow``). Planning order, which is
        also the execution order of the returned copies: migration moves;
        growth of running requests, oldest first, preempting newest ones when
        memory runs out (swap outs); swap-in of swapped requests, oldest
        first, only when they and their new tokens fit without preempting.
        """
        want = {}
        for rid, n in demands:
            if rid in want:
                raise ValueError(f"duplicate demand for {rid!r}")
            want[rid] = int(n)
        ordered = sorted((self._reqs[rid] for rid in want), key=lambda r: r.seq)
        swapped_at_start = [r for r in ordered if r.state == SWAPPED]
        moves = self.plan_migration()
        self._step_state = _StepState(max(0, self.config.migrate_blocks_per_step - len(moves)),
                                      {d for _, d in moves.pairs})

        scheduled = []
        preempted: list[Preemption] = []
        gone: set = set()  # membership only, never iterated
        too_long = []
        swap_out = CopyPlan("swap_out")
        for r in ordered:
            if r.state != RUNNING or r.rid in gone:
                continue
            res = self.grow(r.rid, want[r.rid], (keep_free or {}).get(r.rid, 0))
            moves = moves.concat(res.moves)
            swap_out = swap_out.concat(res.offload)
            for p in res.preemptions:
                preempted.append(p)
                gone.add(p.request_id)
                swap_out = swap_out.concat(p.swap_out)
            if res.status == "ok":
                scheduled.append((r.rid, res.start, res.num_new))
            elif res.status == "too_long":
                too_long.append(r.rid)
        # a borrower scheduled earlier in the step may have been taken off
        # since (reclaim): it runs no tokens this step
        scheduled = [x for x in scheduled if x[0] not in gone]

        swap_in = CopyPlan("swap_in")
        swapped_in, deferred = [], []
        for r in swapped_at_start:
            n = want[r.rid]
            if self.blocks_needed(r.num_tokens + n) > self.config.max_request_blocks(r.home):
                too_long.append(r.rid)
                continue
            if not self.can_swap_in(r.rid, n):
                deferred.append(r.rid)
                continue
            swap_in = swap_in.concat(self.swap_in(r.rid, n))
            self._step_state.budget = 0  # no reclaim moves once swap-ins are planned
            res = self.grow(r.rid, n)
            assert res.status == "ok" and not res.preemptions and not res.moves \
                and not res.offload
            swapped_in.append(r.rid)
            scheduled.append((r.rid, res.start, res.num_new))
        if self.config.host_attention and not self._step_state.preempted:
            # planned last: no later copy of this step allocates a freed host block
            back = self._bring_back(self._step_state.budget)
            swap_in = swap_in.concat(CopyPlan("swap_in", tuple(back)))

        forks, self._forks = CopyPlan("move", tuple(self._forks)), []
        self.host.free(self._step_state.host_freed)
        self._step_state = None
        return StepKVPlan(
            forks=forks,
            moves=moves,
            swap_out=swap_out,
            swap_in=swap_in,
            scheduled=tuple(scheduled),
            preempted=tuple(preempted),
            swapped_in=tuple(swapped_in),
            too_long=tuple(too_long),
            deferred=tuple(deferred),
        )
