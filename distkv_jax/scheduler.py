"""Continuous-batching scheduler (plain Python + numpy, no JAX).

Queues: waiting (not yet admitted), running (admitted, KV on device or about
to be recomputed), swapped (KV in host memory). Between steps requests join
and leave; each step is planned as:

1. Demands per instance under a token budget (rows per instance) and a cap on
   sequences per instance: running requests first (decodes, then short
   prefill chunks, then long ones with a floor: see `policy`), then swapped
   requests (oldest first), then, only when nothing is swapped, new requests
   (arrival order; one waiting for KV may be passed, under an aging bound),
   each assigned to the least loaded instance (fewest requests; ties: most
   free blocks, lowest id).
2. The KV cache manager turns demands into slots, migrations, preemptions
   (swap to host, recompute when the host is full) and swap-ins.
3. The step's arrays (tokens, positions, DistAttention plan, rows to compute
   logits for) are padded to buckets so XLA compiles a bounded set of
   programs, known in advance (`step_buckets`): rows per instance T, a power
   of two; logits rows S = T, or min_rows in steps with at most that many
   (prefill chunks); query tiles from (T, S, query tile); work-list runs in
   power-of-four buckets.

A request is a token stream (prompt + generated) and a count of tokens whose
KV is cached; a step processes the next chunk of that stream. When a chunk
reaches the stream's end, its last row's logits give the next token. Prefill,
decode and recompute after preemption are all this one case.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .attention_plan import AttentionPlan, PoolGeometry, SeqQuery, bucket, build_attention_plan
from .kv_cache_manager import KVCacheManager
from .kv_types import StepKVPlan
from .policy import PolicyConfig, SchedulingPolicy
from .request import Request, RequestStatus

WAITING, RUNNING, SWAPPED = RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.SWAPPED

@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits; the pool's geometry comes from the KV manager's config."""

    max_num_seqs: int = 64            # per instance
    max_num_batched_tokens: int = 256    # rows per instance per step
    prefill_q_tile: int = 8           # query tile for steps with prefill chunks
    run_choices: tuple[int, ...] = (4, 16)
    min_rows: int = 8
    watermark_blocks: int = 1         # free blocks kept when admitting new requests
    # long and short requests together (policy.py); None: the defaults
    # PolicyConfig.resolve derives from the limits above and the pool
    policy: PolicyConfig | None = None


def logits_bucket(num_logits: int, rows: int, min_rows: int) -> int:
    """Logits rows per instance: few (a step of prefill chunks) or all rows."""
    return min_rows if num_logits <= min_rows else rows


def tiles_bucket(num_instances: int, rows: int, logits: int, q_tile: int) -> int:
    """Query tiles of a step (the least the plan pads to). One row per tile
    (q_tile 1): one per row. Otherwise a tile per logits row (decodes and
    chunk ends), the chunks' full tiles, and a few split pieces; never more
    than one per row."""
    I = num_instances
    if q_tile == 1:
        return bucket(I * rows)
    return min(bucket(I * logits + -(-I * rows // q_tile) + 4 * I), bucket(I * rows))


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    request: Request
    instance: int
    row: int
    start: int
    count: int


@dataclasses.dataclass(frozen=True)
class LogitsRow:
    """A row whose logits are computed: sampling (target -1) or a prompt logprob."""

    request: Request
    position: int          # position of the row's token
    target: int            # next prompt token for prompt logprobs, -1 when sampling


@dataclasses.dataclass(frozen=True, eq=False)
class StepPlan:
    tokens: np.ndarray          # [I, T] int32
    positions: np.ndarray       # [I, T] int32
    attention: AttentionPlan
    logits_index: np.ndarray    # [I, S] int32 rows of each instance with logits
    targets: np.ndarray         # [I * S] int32
    logits_rows: tuple[LogitsRow | None, ...]  # [I * S], None for padding
    seqs: tuple[ScheduledSeq, ...]
    kv: StepKVPlan
    # [I, T] int32: row of the previous step's sampled tokens that feeds this
    # row (a pending token), -1 where `tokens` holds it; None: no such row
    token_src: np.ndarray | None = None

    @property
    def shape_key(self) -> tuple:
        return self.attention.shape_key + (self.logits_index.shape,)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.requests: dict[str, Request] = {}   # live (not finished), insertion = arrival order
        kc = kv.config
        self.num_instances = kc.num_instances
        self.geom = PoolGeometry(kc.num_instances, kc.blocks_per_instance, kc.block_size,
                                 kc.host_blocks_per_instance)
        pc = config.policy or PolicyConfig.resolve(
            max_num_batched_tokens=config.max_num_batched_tokens, block_size=kc.block_size,
            blocks_per_instance=kc.blocks_per_instance, max_num_seqs=config.max_num_seqs)
        self.policy = SchedulingPolicy(pc, kc.num_instances)
        # blocks a long request's growth leaves free (on every instance it may borrow from)
        self.reserve_blocks = pc.short_reserve_blocks * (
            kc.num_instances if kc.kv_policy == "distributed" else 1)
        self.long_prefill_steps = 0   # steps in which a long prefill chunk ran
        self._stuck = False           # the last plan ran nothing but preempted (see schedule)

    # ---------------------------------------------------------------- queues
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already live")
        req.status = WAITING
        req.block_hashes = []                   # its own chain (records may be copies)
        req.metrics.request_class = self.policy.arrival_class(req.prompt_len)
        self.requests[req.request_id] = req

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def get(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def _by_state(self, state: RequestStatus) -> list[Request]:
        return [r for r in self.requests.values() if r.status == state]

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a live request: every block it holds (own, borrowed, host) is
        freed now, so the next plan and the ledger already reflect it. Rows
        of it in a step still in flight are dropped when that step is read."""
        if not status.is_finished:
            raise ValueError(f"finish with non-final status {status}")
        if req.status in (RUNNING, SWAPPED):
            self.kv.finish(req.request_id)
        req.status = status
        req.pending, req.pending_row, req.hold = 0, -1, False
        self.requests.pop(req.request_id, None)

    # ---------------------------------------------------- results of a step
    def mark_pending(self, req: Request, row: int) -> None:
        """The step in flight samples req's next token at output row `row`; a
        request whose pending token is its last gets nothing more scheduled."""
        req.pending, req.pending_row = 1, row
        req.hold = req.reached_limit(len(req.tokens) + 1)

    def append_token(self, req: Request, token: int) -> None:
        req.pending, req.pending_row = 0, -1
        req.tokens.append(token)

    # ------------------------------------------------------------- planning
    def _reuse(self, r: Request) -> int:
        """Cached prefix tokens a request with no KV starts on. A request
        asking for prompt logprobs computes its whole prompt (as vLLM)."""
        if r.wants_prompt_logprobs:
            return 0
        return self.kv.reuse_prefix(r.request_id, r.tokens)

    def _forkable(self, leader: Request, r: Request) -> bool:
        """The leader's prompt, but its last token, is computed and on device."""
        need = r.prompt_len - 1
        return (leader.status == RUNNING and leader.num_computed >= need
                and self.kv.num_tokens(leader.request_id) >= need)

    def _choose_instance(self, load: list[int], rows_left: list[int],
                         prefer: Request | None = None) -> int | None:
        """Least loaded instance (fewest requests; ties: most free blocks,
        lowest id). A forked sequence goes to its leader's instance when it
        has room there (under kv_policy local a fork needs it)."""
        if prefer is not None and prefer.status == RUNNING:
            i = prefer.instance
            if load[i] < self.config.max_num_seqs and rows_left[i] > 0:
                return i
        free = self.kv.free_device_blocks()
        best = None
        for i in range(self.num_instances):
            if load[i] >= self.config.max_num_seqs or rows_left[i] <= 0:
                continue
            key = (load[i], -int(free[i]), i)
            if best is None or key < best[0]:
                best = (key, i)
        return None if best is None else best[1]

    def _reserve_applies(self, r: Request) -> bool:
        """A long request leaves the reserve while a short one is live (a
        decode, a short prefill, a short request waiting), unless it stalled
        on it for admission_aging_steps steps."""
        if self.reserve_blocks == 0 or self.policy.long_ignores_reserve(r.stalled_steps):
            return False
        return any(not self.policy.is_long(q.remaining) for q in self.requests.values())

    def _long_room(self, r: Request) -> int | None:
        """Tokens a long request may grow by this step, leaving the reserve
        free for the other live requests (None: no limit: no reserve, nobody
        else, or it stalled long enough). Its own full device blocks that the
        host tier can take (host-attended KV) count as room."""
        if not self._reserve_applies(r):
            return None
        bs = self.geom.block_size
        rid = r.request_id
        n = self.kv.num_tokens(rid)
        slack = self.kv.table.num_blocks(rid) * bs - n
        host = 0
        if self.kv.config.host_attention:
            own = self.kv.block_ids(rid)[:n // bs]
            host = min(int((own < self.kv.config.num_device_blocks).sum()),
                       self.kv.host.available_for(r.instance))
        free = self.kv.gm.available_for(r.instance) - self.reserve_blocks
        return max(0, slack + (max(0, free) + host) * bs)

    def _room(self, inst: int, keep: int) -> int:
        """Tokens a new request homed on `inst` may take for its first chunk."""
        return (self.kv.gm.available_for(inst) + self.kv.reclaimable(inst)
                + self.kv.offloadable(inst) - keep) * self.geom.block_size

    def schedule(self) -> StepPlan | None:
        cfg, pol = self.config, self.policy
        I = self.num_instances
        rows_left = [cfg.max_num_batched_tokens] * I
        load = [0] * I          # requests occupying a place on each instance (running or swapped)
        for r in self.requests.values():
            if r.status in (RUNNING, SWAPPED):
                load[r.instance] += 1
        demands: list[tuple[Request, int]] = []

        def take(r: Request, n: int, keep: int = 0) -> int:
            # A chunk uses its instance's row budget first, then other
            # instances' spare rows (rows are placed after KV planning,
            # spread over instances: see _place_rows). `keep` rows stay for
            # later demands (the long prefills' floors).
            n = min(n, cfg.max_num_batched_tokens, sum(rows_left) - keep)
            if n <= 0:
                return 0
            demands.append((r, n))
            order = [r.instance] + sorted((i for i in range(I) if i != r.instance),
                                          key=lambda i: (-rows_left[i], i))
            left = n
            for i in order:
                used = min(left, rows_left[i])
                rows_left[i] -= used
                left -= used
            return n

        running = [r for r in self._by_state(RUNNING) if not r.hold]
        for r in running:                       # preempted for recompute: start on the cache
            if r.num_computed == 0 and self.kv.num_tokens(r.request_id) == 0:
                r.num_computed = self._reuse(r)
        for r in running:                       # decodes first: one row each
            if r.remaining == 1:
                take(r, 1)
        # then prefill / recompute chunks: short ones, swapped ones, new
        # requests; then long ones, each with a floor of rows kept for it
        # (policy.py)
        short_p, long_p, long_wait = pol.split_prefills([r for r in running if r.remaining > 1])
        if self._stuck:
            # the last plan ran nothing and preempted someone: no long-prefill
            # limit this step (first come, first served), so no two requests
            # can keep taking turns preempting each other
            long_p, long_wait = long_p + long_wait, []
            for r in long_p:
                r.stalled_steps = max(r.stalled_steps, pol.config.admission_aging_steps)
        cap = pol.long_chunk_cap(len(self.requests) > 1)
        want = {}
        for r in long_p:
            n = r.remaining if cap is None else min(r.remaining, cap)
            room = self._long_room(r)
            want[r.request_id] = n if room is None else min(n, room)
        floors = [pol.long_floor(want[r.request_id]) for r in long_p]
        keep = sum(floors)
        for r in short_p:
            take(r, r.remaining, keep)
        swapped = self._by_state(SWAPPED)
        for r in swapped:
            if not r.hold:
                take(r, r.remaining, keep)
        new_long = []                           # admitted long ones: (request, first chunk)
        if not swapped:                         # new requests, before the long prefills' rest
            new_long = self._admit(load, rows_left, lambda r, n: take(r, n, keep))
        for k, r in enumerate(long_p):          # what is left, at least the floor
            got = take(r, want[r.request_id], keep=sum(floors[k + 1:]))
            r.stalled_steps = 0 if got else r.stalled_steps + 1
        for r, n in new_long:                   # then the new long ones' first chunks
            take(r, n)
        if not demands:                         # only long prefills stalled on the reserve:
            for r in long_p:                    # nobody to keep it for runs now
                r.stalled_steps = pol.config.admission_aging_steps
                take(r, r.remaining if cap is None else min(r.remaining, cap))
        if not demands:
            return None

        # a long prefill's host offload (host-attended KV) also leaves the reserve
        keep_free = {r.request_id: self.reserve_blocks for r, n in demands
                     if n > 1 and pol.is_long(r.remaining) and self._reserve_applies(r)}
        kv_plan = self.kv.prepare_step([(r.request_id, n) for r, n in demands], keep_free)
        for p in kv_plan.preempted:
            r = self.requests[p.request_id]
            r.preemptions += 1
            if p.mode == "swap":
                r.status = SWAPPED
            else:                               # KV dropped: recompute from the start
                r.status = RUNNING
                r.num_computed = 0
        for rid in kv_plan.swapped_in:
            self.requests[rid].status = RUNNING

        long_ran = False
        for rid, start, n in kv_plan.scheduled:
            r = self.requests[rid]
            assert start == r.num_computed, (rid, start, r.num_computed)
            long_ran = long_ran or (n > 1 and pol.is_long(r.remaining))
        self.long_prefill_steps += long_ran
        self._stuck = not kv_plan.scheduled and bool(kv_plan.preempted)
        seqs, rows_used = self._place_rows(kv_plan.scheduled)
        if not seqs:
            # Nothing could run (e.g. everything preempted or too long): let the
            # caller settle the too_long requests and try again.
            return StepPlan(np.zeros((I, 0), np.int32), np.zeros((I, 0), np.int32), None,
                            np.zeros((I, 0), np.int32), np.zeros(0, np.int32), (), (), kv_plan)
        return self._arrays(seqs, rows_used, kv_plan)

    def _admit(self, load: list[int], rows_left: list[int], take) -> list[tuple[Request, int]]:
        """New requests, in arrival order. One over the prefill limits, or
        one that finds no KV room, is passed by the requests behind it, until
        it has been passed in `admission_aging_steps` steps (policy.py).
        Short ones take their first chunk's rows here; the long ones are
        returned with theirs, to take what the short ones leave."""
        cfg, pol = self.config, self.policy
        prefilling = [r for r in self._by_state(RUNNING) if r.remaining > 1]
        partial = len(prefilling)
        long_partial = sum(1 for r in prefilling if pol.is_long(r.remaining))
        cap = pol.long_chunk_cap(len(self.requests) > 1)
        passed: list[Request] = []      # waiting for KV, behind which someone may be admitted
        new_long: list[tuple[Request, int]] = []
        for r in self._by_state(WAITING):
            leader = r.fork_of
            if leader is not None and not leader.is_finished and not self._forkable(leader, r):
                continue                    # a sibling sequence waits for its leader's prompt
            if leader is None and not r.wants_prompt_logprobs and \
                    self.kv.awaits_prefix(r.tokens, r.block_hashes):
                continue                    # its next prefix block is being computed: wait for it
            long = pol.is_long(r.remaining)
            if not pol.may_start_prefill(long, partial, long_partial):
                if pol.blocks_queue(r.passed_steps):
                    break                   # aged (waiting for KV before): nobody passes it
                continue                    # over the prefill limits: others may pass it
            inst = self._choose_instance(load, rows_left, leader)
            if inst is None:
                break
            # The first chunk must fit in free blocks (keeping a
            # watermark) or in blocks its instance lent and can take back
            # (reclaim); otherwise admitting never preempts a running request.
            # The watermark only guards running requests: with none, the
            # last free block may go (a request whose cached prefix leaves
            # it one block short would otherwise wait forever). A long
            # request also leaves the short requests' reserve. Checked before
            # admitting (nothing to undo) and after (its cached prefix's
            # blocks are no longer evictable).
            busy = sum(load) > 0            # running or swapped requests
            keep = (cfg.watermark_blocks if busy else 0) + \
                (self.reserve_blocks if long and busy and self._reserve_applies(r) else 0)
            room = self._room(inst, keep)
            if room > 0:
                r.instance = self.kv.admit(r.request_id, inst, r.block_hashes)
                r.status = RUNNING
                if leader is not None and not leader.is_finished and \
                        self.kv.fork(r.request_id, leader.request_id, r.prompt_len - 1):
                    r.num_computed = r.prompt_len - 1
                else:
                    r.num_computed = self._reuse(r)
                room = self._room(inst, keep)
                if room <= 0:               # undo
                    self.kv.finish(r.request_id)
                    r.status, r.instance, r.num_computed = WAITING, -1, 0
            if room <= 0:                   # it waits
                if pol.blocks_queue(r.passed_steps):
                    break                   # aged: FCFS from here until it is admitted
                passed.append(r)
                continue
            for q in passed:                # passed over this step (counted once a step)
                q.passed_steps += 1
            passed.clear()
            r.passed_steps = 0
            if r.num_cached_tokens < 0:     # first admission: vLLM's num_cached_tokens
                r.num_cached_tokens = r.num_computed
            load[inst] += 1
            if r.remaining > 1:
                partial += 1
                long_partial += long
            n = min(r.remaining, room)
            if long:
                new_long.append((r, n if cap is None else min(n, cap)))
            else:
                take(r, n)
        return new_long

    def _place_rows(self, scheduled) -> tuple[list[ScheduledSeq], list[int]]:
        """Rows for the step's chunks, balanced over instances.

        The step is one SPMD program: every instance computes T rows, T the
        bucketed maximum over instances. A request's rows need not sit on its
        own instance (its KV slots and blocks may be anywhere; a row's
        attention output returns to the row's instance), so a long prefill
        chunk is split into consecutive pieces on instances with spare rows
        instead of padding every instance to the chunk's length. Rows go to
        the request's own instance first, then to the instance with the most
        free rows (ties: lowest id). T is the smallest bucket that fits.
        """
        cfg = self.config
        I = self.num_instances
        total = sum(n for _, _, n in scheduled)
        T = bucket(-(-total // I), cfg.min_rows)
        while True:
            free = [T] * I
            seqs: list[ScheduledSeq] = []
            ok = True
            for rid, start, n in scheduled:
                r = self.requests[rid]
                pos = start
                while n > 0:
                    i = r.instance if free[r.instance] > 0 else max(range(I), key=lambda j: (free[j], -j))
                    take = min(n, free[i])
                    if take == 0:
                        ok = False
                        break
                    seqs.append(ScheduledSeq(r, i, T - free[i], pos, take))
                    free[i] -= take
                    pos += take
                    n -= take
                if not ok:
                    break
            if ok:
                return seqs, [T - f for f in free]
            T *= 2

    def _arrays(self, seqs: list[ScheduledSeq], rows_used: list[int], kv_plan: StepKVPlan) -> StepPlan:
        cfg = self.config
        I = self.num_instances
        T = bucket(max(rows_used), cfg.min_rows)
        tokens = np.zeros((I, T), np.int32)
        token_src = None
        queries = []
        logits: list[list[tuple[int, LogitsRow]]] = [[] for _ in range(I)]
        for s in seqs:
            r = s.request
            known = min(s.start + s.count, len(r.tokens)) - s.start
            tokens[s.instance, s.row:s.row + known] = r.tokens[s.start:s.start + known]
            if known < s.count:  # the chunk ends with the pending token
                if token_src is None:
                    token_src = np.full((I, T), -1, np.int32)
                token_src[s.instance, s.row + known] = r.pending_row
            queries.append(SeqQuery(s.instance, s.row, range(s.start, s.start + s.count),
                                    self.kv.block_ids(r.request_id)))
            if r.wants_prompt_logprobs:
                first = max(s.start, r.prompt_logprobs_done - 1)
                for p in range(first, min(s.start + s.count, r.prompt_len - 1)):
                    logits[s.instance].append((s.row + p - s.start,
                                               LogitsRow(r, p, r.tokens[p + 1])))
            if s.start + s.count == r.length:
                logits[s.instance].append((s.row + s.count - 1,
                                           LogitsRow(r, s.start + s.count - 1, -1)))
        q_tile = 1 if all(s.count == 1 for s in seqs) else cfg.prefill_q_tile
        S = logits_bucket(max(len(x) for x in logits), T, cfg.min_rows)
        attention = build_attention_plan(queries, self.geom, T, q_tile=q_tile,
                                         min_tiles=tiles_bucket(I, T, S, q_tile),
                                         run_choices=cfg.run_choices)
        logits_index = np.zeros((I, S), np.int32)
        targets = np.full(I * S, -1, np.int32)
        rows: list[LogitsRow | None] = [None] * (I * S)
        for i in range(I):
            for k, (row, lr) in enumerate(logits[i]):
                logits_index[i, k] = row
                targets[i * S + k] = lr.target
                rows[i * S + k] = lr
        positions = np.maximum(attention.positions, 0).reshape(I, T)
        return StepPlan(tokens, positions, attention, logits_index, targets, tuple(rows),
                        tuple(seqs), kv_plan, token_src)

    def advance(self, plan: StepPlan) -> None:
        """Record that the step's chunks are now cached (the step is
        dispatched: later steps read its KV), and offer the full blocks to
        the prefix cache."""
        done: dict[str, Request] = {}
        for s in plan.seqs:
            s.request.num_computed = max(s.request.num_computed, s.start + s.count)
            done[s.request.request_id] = s.request
        if self.kv.config.enable_prefix_caching:
            for r in done.values():             # batch order: deterministic
                self.kv.register(r.request_id, r.tokens)

    @staticmethod
    def record_prompt_logprob(row: LogitsRow) -> None:
        """A prompt logprob is recorded: a recompute after preemption skips it."""
        row.request.prompt_logprobs_done = max(row.request.prompt_logprobs_done, row.position + 2)
