"""The engine loop: input processing -> scheduler + KV manager -> model
runner -> output processing.

    engine.add_request(prompt, params, request_id) -> request id
    engine.abort(request_id)
    engine.step() -> RequestOutputs that changed this step
    engine.iterate(admit) -> every step's outputs, calling admit() between steps

`iterate` is the one loop every driver uses (`LLM.generate`,
`generate_stream`, `AsyncLLM`'s engine thread, launch's batch jobs, the
workload benchmark): between steps it calls the driver's `admit`, which adds
and aborts requests, then runs a step while there is work.

Each step: the scheduler plans (host, numpy); the KV copies the control plane
asked for run (migrations, swap out, swap in: jitted whole-block copies); the
jitted step runs the model with DistAttention over the mesh and samples on
device; the host appends the tokens and checks stop conditions.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from .engine_args import EngineArgs
from .input_processor import InputLimits, InputProcessor
from .kv_cache_manager import KVCacheManager
from .model_runner import ModelRunner
from .models.config import ModelConfig
from .output_processor import OutputProcessor
from .outputs import RequestMetrics, RequestOutput
from .request import Request, RequestStatus
from .sampling_params import SamplingParams
from .policy import CLASSES
from .scheduler import Scheduler, SchedulerConfig, StepPlan

log = logging.getLogger("distkv_jax")


class _InFlight:
    """A dispatched step: its plan and its (device) results."""

    __slots__ = ("plan", "result")

    def __init__(self, plan: StepPlan, result):
        self.plan, self.result = plan, result


class Engine:
    def __init__(self, cfg: ModelConfig, params, mesh: Mesh, tokenizer=None,
                 args: EngineArgs = EngineArgs(), progress: bool = True):
        self.args, self.cfg, self.mesh, self.tokenizer = args, cfg, mesh, tokenizer
        self.runner = ModelRunner(cfg, params, mesh, args)
        # the salt keeps KV of another model or dtype from ever matching a prefix
        salt = f"{args.model}|{args.dtype}|{cfg.num_layers}|{cfg.vocab_size}"
        self.kv = KVCacheManager(args.kv_cache_config(self.runner.layout.blocks_per_instance, salt))
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            prefill_q_tile=self.runner.prefill_q_tile,
            policy=args.policy_config(self.runner.layout.blocks_per_instance)), self.kv)
        kv_tokens = self.kv.max_request_tokens(0)
        self.max_model_len = args.context_limit(cfg.max_position_embeddings, kv_tokens,
                                                cfg.sliding_window)
        self.eos_ids = set(cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        self.inputs = InputProcessor(InputLimits(
            cfg.vocab_size, kv_tokens, args.kv_policy, self.max_model_len, args.max_logprobs,
            cfg.sliding_window), tokenizer, args.seed)
        self.outputs = OutputProcessor(tokenizer, self.eos_ids)
        self._live: dict[str, Request] = {}       # added, final output not yet emitted
        # n > 1: submitted id -> its sequences by index (_live holds sequence 0)
        self._groups: dict[str, list[Request]] = {}
        self._settled: dict[str, Request] = {}    # finished outside a step (refused, aborted)
        self._inflight: _InFlight | None = None
        self._arrivals = 0
        # (prefill rows, decode rows, seconds) of every step that ran the model
        self.step_log: list[tuple[int, int, float]] = []
        self.stats = {"steps": 0, "preemptions": 0, "swapped_out_blocks": 0,
                      "swapped_in_blocks": 0, "migrated_blocks": 0, "prompt_tokens": 0,
                      "generation_tokens": 0, "max_remote_blocks": 0, "aborted": 0}
        self.warm_start_info: dict | None = None
        if args.warm_start:
            self.warm_start(progress)

    # ------------------------------------------------------------- pieces
    @property
    def layout(self):
        return self.runner.layout

    @property
    def pools(self):
        return self.runner.pools

    @property
    def attention_impl(self) -> str:
        return self.runner.attention_impl

    @property
    def dense_impl(self) -> str:
        return self.runner.dense_impl

    def compiled_programs(self) -> int:
        """XLA programs compiled so far: step shapes plus KV copy batches."""
        return self.runner.compiled_programs()

    def warm_start(self, progress: bool = True) -> dict:
        """Build every program this configuration can run (see
        ModelRunner.step_shapes and .warm_start) before the engine takes
        requests; with the persistent compilation cache a restart loads them."""
        cfg = self.scheduler.config
        shapes = self.runner.step_shapes(self.max_model_len, cfg.run_choices, cfg.min_rows)
        kc = self.kv.config
        info = self.runner.warm_start(shapes, max(kc.migrate_blocks_per_step, kc.num_instances),
                                      progress=progress and jax.process_index() == 0)
        self.warm_start_info = info
        if jax.process_index() == 0:
            log.info("warm start: %d programs (%d step shapes; %d compiled, %d from the cache) "
                     "in %.1f s", info["programs"], info["step_shapes"], info["compiled"],
                     info["from_cache"], info["seconds"])
        return info

    # --------------------------------------------------------------- requests
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. A refused request (bad input) is
        not an exception: its final output (finish_reason "error", `error`
        saying why) comes with the next step's outputs. A request_id that is
        still live is refused with ValueError (its outputs would be
        ambiguous).

        Parallel sampling (params.n > 1, as vLLM v1): the request is checked
        once, then fans out into n sequences, each its own record in the
        scheduler and the output processor (scheduler id
        f"{request_id}\x1f{i}"); sequence i samples with seed (request
        seed) + i. Their outputs come back as one RequestOutput under
        request_id, with n CompletionOutputs (index 0..n-1)."""
        arrival = self._arrivals
        self._arrivals += 1
        request_id = str(arrival) if request_id is None else str(request_id)
        if request_id in self._live:
            raise ValueError(f"request_id {request_id!r} is already in use by a live request")
        now = time.time()
        try:
            req = self.inputs.process(request_id, prompt, params, arrival)
        except ValueError as e:
            req = Request(request_id, params if isinstance(params, SamplingParams) else SamplingParams(),
                          [], 0, prompt=prompt if isinstance(prompt, str) else None,
                          status=RequestStatus.FINISHED_ERROR, error=str(e))
            req.metrics = RequestMetrics(arrival_time=now, finished_time=now)
            self._live[request_id] = req
            self._settled[request_id] = req
            return request_id
        if params.n > 1:
            self._add_group(req, now)
            return request_id
        req.metrics = RequestMetrics(arrival_time=now)
        self._live[request_id] = req
        self.outputs.add(req)
        self.scheduler.add(req)
        return request_id

    def _add_group(self, req: Request, now: float) -> None:
        """The n sequences of a checked n > 1 request. Only sequence 0
        computes prompt logprobs (they are the same for every sequence);
        sequences 1..n-1 fork from sequence 0's prompt KV (fork_of)."""
        parent, params = req.request_id, req.params
        rest = params if params.prompt_logprobs is None else \
            dataclasses.replace(params, prompt_logprobs=None)
        seqs: list[Request] = []
        for i in range(params.n):
            seq = dataclasses.replace(
                req, request_id=f"{parent}\x1f{i}", params=params if i == 0 else rest,
                tokens=list(req.tokens), seed=req.seed + i, parent_id=parent, index=i,
                fork_of=seqs[0] if i else None, metrics=RequestMetrics(arrival_time=now))
            seqs.append(seq)
        self._live[parent] = seqs[0]
        self._groups[parent] = seqs
        for seq in seqs:
            self.outputs.add(seq)
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """End a request now: every block it holds (own, borrowed, host) is
        freed before the next step, and a row of it in the step in flight is
        dropped. Its final output (finish_reason "abort") comes with the next
        step's outputs. Unknown or finished ids: a no-op (False). An n > 1
        request: every sequence still running is aborted (finished ones keep
        their finish reason)."""
        request_id = str(request_id)
        req = self._live.get(request_id)
        if req is None:
            return False
        seqs = self._groups.get(request_id) if req.parent_id is not None else None
        live = [s for s in (seqs or (req,)) if not s.is_finished]
        if not live:
            return False
        for s in live:
            self._finish(s, RequestStatus.FINISHED_ABORTED, {})
            self._settled[s.request_id] = s
        self.stats["aborted"] += 1
        return True

    def abort_all(self) -> int:
        """Abort every live request (in arrival order); returns how many."""
        return sum(self.abort(rid) for rid in list(self._live))

    def sync(self) -> None:
        """Wait until the step in flight (overlap_steps) has run on the device."""
        if self._inflight is not None:
            jax.block_until_ready(self._inflight.result)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None or bool(self._settled)

    def num_live(self) -> int:
        """Submitted requests whose final output is not yet emitted (an n > 1
        request counts once)."""
        return len(self._live)

    # ------------------------------------------------------------------ loop
    def iterate(self, admit: Callable[[], bool] | None = None,
                only_finished: bool = False) -> Iterator[list[RequestOutput]]:
        """The engine loop. Before each step `admit()` adds and aborts
        requests and returns whether more may still come; the loop ends when
        nothing is left to run and admit says no more will come. Yields each
        step's outputs."""
        while True:
            more = admit() if admit is not None else False
            if not self.has_unfinished():
                if more:
                    continue
                return
            yield self.step(only_finished)

    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """Run one step; returns the outputs of requests that changed (only
        those that finished, with only_finished: building an output copies
        the request's tokens and detokenizes, so generate() skips it).

        With overlap_steps (the default) a step is planned and dispatched
        while the previous one still runs on the device, and the previous
        step's tokens are read back and handled after that: the host's
        planning hides behind the device's work. Tokens sampled by the step
        in flight reach the next step on the device (Request.pending). A
        request that stops on such a token has computed one row too many;
        that row is dropped. Outputs are the same as without overlap; they
        come back one step() call later.
        """
        t_start = time.perf_counter()
        changed: dict[str, Request] = dict(self._settled)
        self._settled.clear()
        prev, self._inflight = self._inflight, None
        plan = self.scheduler.schedule()
        if plan is None:
            if prev is not None:
                self._process(prev, changed)
            elif self.scheduler.has_unfinished():
                self._unblock(changed)
            return self._emit(changed, only_finished)
        kvp = plan.kv
        self.stats["preemptions"] += len(kvp.preempted)
        self.stats["migrated_blocks"] += len(kvp.moves.pairs)
        self.stats["swapped_out_blocks"] += len(kvp.swap_out.pairs)
        self.stats["swapped_in_blocks"] += len(kvp.swap_in.pairs)
        self.runner.copy_kv(kvp)

        current = None
        if plan.seqs:
            current = self._dispatch(plan, prev)
        if prev is not None:
            self._process(prev, changed)
        for rid in kvp.too_long:  # reached the most KV the policy allows
            req = self.scheduler.get(rid)
            if req is not None:
                self._finish(req, RequestStatus.FINISHED_LENGTH, changed)
        if current is not None:
            for k, row in enumerate(current.plan.logits_rows):
                if row is not None and row.target < 0 and not row.request.is_finished:
                    self.scheduler.mark_pending(row.request, k)
            if self.args.overlap_steps:
                self._inflight = current
            else:
                self._process(current, changed)
            decode = sum(1 for s in plan.seqs if s.count == 1)
            self.step_log.append((sum(s.count for s in plan.seqs) - decode, decode,
                                  time.perf_counter() - t_start))
        return self._emit(changed, only_finished)

    def _dispatch(self, plan: StepPlan, prev: _InFlight | None) -> _InFlight:
        """Launch the step (asynchronously: nothing is read back here)."""
        now = time.time()
        for s in plan.seqs:
            m = s.request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
        result = self.runner.dispatch(plan, self.eos_ids, prev.result if prev is not None else None)
        self.scheduler.advance(plan)
        self.stats["steps"] += 1
        self.stats["max_remote_blocks"] = max(self.stats["max_remote_blocks"],
                                              int(self.kv.ledger().sum()))
        return _InFlight(plan, result)

    def _process(self, step: _InFlight, changed: dict[str, Request]) -> None:
        """Read the step's results back and apply them."""
        res, target_lp, target_rank = step.result
        res = jax.tree.map(np.asarray, res)
        target_lp, target_rank = np.asarray(target_lp), np.asarray(target_rank)
        now = time.time()
        rows = step.plan.logits_rows
        # A chunk split over instances puts its rows in instance order, not
        # position order: prompt logprobs are recorded in position order,
        # before any sampled token.
        order = range(len(rows))
        if any(row is not None and row.target >= 0 for row in rows):
            order = sorted((k for k, row in enumerate(rows) if row is not None),
                           key=lambda k: (rows[k].target < 0,
                                          rows[k].position if rows[k].target >= 0 else k))
        for k in order:
            row = rows[k]
            if row is None:
                continue
            req = row.request
            if req.is_finished:  # stopped or aborted meanwhile: the row is dropped
                continue
            if row.target >= 0:
                if self.outputs.on_prompt_logprob(req, row.position, row.target, target_lp[k],
                                                  target_rank[k], res.top_ids[k], res.top_logprobs[k]):
                    self.scheduler.record_prompt_logprob(row)
                continue
            tok = int(res.tokens[k])
            self.scheduler.append_token(req, tok)
            self.stats["generation_tokens"] += 1
            m = req.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            changed[req.request_id] = req
            final = self.outputs.on_token(req, tok, float(res.logprobs[k]), res.ranks[k],
                                          res.top_ids[k], res.top_logprobs[k])
            if final is not None:
                self._finish(req, final, changed)

    def _unblock(self, changed: dict[str, Request]) -> None:
        """Nothing could be scheduled although requests remain: the head of the
        queue can never fit. Fail it (every sequence of it, for n > 1: they
        need the same KV) rather than spin."""
        for req in list(self.scheduler.requests.values()):
            why = "request cannot be scheduled with the configured KV capacity"
            group = self._groups.get(req.parent_id, ()) if req.parent_id is not None else ()
            for s in group or (req,):
                if not s.is_finished:
                    s.error = why
                    self._finish(s, RequestStatus.FINISHED_ERROR, changed)
            return

    def _finish(self, req: Request, status: RequestStatus, changed: dict[str, Request]) -> None:
        req.metrics.finished_time = time.time()
        # the prompt counts once per submitted request (sequence 0 of an n > 1 one)
        if req.index == 0 and (status != RequestStatus.FINISHED_ERROR or req.prompt_len):
            self.stats["prompt_tokens"] += req.prompt_len
        self.scheduler.finish(req, status)
        changed[req.request_id] = req

    def _emit(self, changed: dict[str, Request], only_finished: bool) -> list[RequestOutput]:
        outs = []
        groups_done: set[str] | None = None
        for req in changed.values():
            if req.parent_id is not None:  # a sequence of an n > 1 request
                parent = req.parent_id
                if groups_done is None:
                    groups_done = set()
                elif parent in groups_done:
                    continue
                groups_done.add(parent)
                seqs = self._groups.get(parent)
                if seqs is None:  # its final output went out already
                    continue
                finished = all(s.is_finished for s in seqs)
                if finished:
                    del self._groups[parent]
                    self._live.pop(parent, None)
                elif only_finished:
                    continue
                outs.append(self.outputs.make_group_output(parent, seqs, finished))
                continue
            if req.is_finished:
                self._live.pop(req.request_id, None)
            elif only_finished:
                continue
            outs.append(self.outputs.make_output(req))
        return outs

    def metrics_snapshot(self) -> dict:
        """The engine's state for monitoring (/metrics), as plain data: request
        counts by status, KV use per instance (device and host tier), the
        debt ledger, borrowed blocks, the most instances one request's KV
        spans now, and the running counters. Reads only; call it between
        steps (AsyncLLM does, on its engine thread)."""
        counts = {s: 0 for s in (RequestStatus.WAITING, RequestStatus.RUNNING,
                                 RequestStatus.SWAPPED)}
        waiting_by_class = {c: 0 for c in CLASSES}
        for req in self.scheduler.requests.values():
            if req.status in counts:
                counts[req.status] += 1
            if req.status == RequestStatus.WAITING:
                waiting_by_class[req.metrics.request_class] += 1
        kv = self.kv
        kc = kv.config
        ledger = kv.ledger()
        span = 0
        for rid in self.kv.requests():  # arrival order
            if self.kv.state(rid) == RequestStatus.RUNNING:
                blocks = self.kv.block_ids(rid)
                blocks = blocks[blocks < kc.num_device_blocks]  # host-attended ones: not a device
                if len(blocks):
                    span = max(span, len(np.unique(blocks // kc.blocks_per_instance)))
        host_total = kc.host_blocks_per_instance
        host_used = (host_total - self.kv.free_host_blocks()) if host_total else \
            np.zeros(kc.num_instances, np.int64)
        return {
            "num_waiting": counts[RequestStatus.WAITING],
            "num_running": counts[RequestStatus.RUNNING],
            "num_swapped": counts[RequestStatus.SWAPPED],
            "kv_usage": self.kv_usage().tolist(),
            "host_blocks_used": np.asarray(host_used).tolist(),
            "host_blocks_per_instance": host_total,
            "blocks_per_instance": kc.blocks_per_instance,
            "ledger": ledger.tolist(),            # [debtor][creditor]
            "borrowed": (ledger.sum(axis=1) - np.diag(ledger)).tolist(),
            "max_request_instances": span,
            # prefix cache, in tokens, per home instance of the querying
            # request: queried (prompt tokens looked up), hit (found cached
            # anywhere), and hit on blocks held by another instance
            "prefix_cache_queries": kv.prefix_queries.tolist(),
            "prefix_cache_hits": (kv.prefix_hits_local + kv.prefix_hits_remote).tolist(),
            "prefix_cache_hits_remote": kv.prefix_hits_remote.tolist(),
            "prefix_cache_blocks": kv.num_cached_blocks().tolist(),   # evictable, per instance
            "prefix_cache_evictions": [m.evictions for m in kv.gm.managers],
            # reclaimable lending, per creditor instance: lent blocks taken
            # back by moving the borrower's data, or by preempting the borrower
            "kv_reclaimed_moved": kv.reclaimed_moved.tolist(),
            "kv_reclaimed_preempted": kv.reclaimed_preempted.tolist(),
            "kv_reclaimed_offloaded": kv.reclaimed_offloaded.tolist(),
            "kv_host_attended_blocks": kv.host_attended_blocks().tolist(),
            "kv_offloaded_blocks": kv.offloaded.tolist(),
            "kv_brought_back_blocks": kv.brought_back.tolist(),
            # long and short requests together (policy.py): waiting requests
            # by arrival class, steps that ran a long prefill chunk, and the
            # blocks per instance a long request's growth leaves free
            "num_waiting_by_class": waiting_by_class,
            "long_prefill_steps": self.scheduler.long_prefill_steps,
            "kv_blocks_reserved": self.scheduler.policy.config.short_reserve_blocks,
            "compiled_programs": self.compiled_programs(),
            "stats": dict(self.stats),
        }

    def kv_usage(self) -> np.ndarray:
        """Fraction of each instance's device blocks in use."""
        free = self.kv.free_device_blocks()
        return 1.0 - free / self.layout.blocks_per_instance
