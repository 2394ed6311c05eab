"""The serving engine: scheduler + KV control plane + one jitted step.

    engine.add_request(prompt, params) -> request id
    engine.step() -> RequestOutputs that changed this step
    engine.has_unfinished()

Each step: the scheduler plans (host, numpy); the KV copies the control plane
asked for run (migrations, swap out, swap in: jitted whole-block copies); the
jitted step runs the model with DistAttention over the mesh and samples on
device; the host appends the tokens and checks stop conditions.

The step is one program per bucket shape: (rows per instance, tiles, query
tile, work-list runs, run length, logits rows). `compiled_programs()` counts
them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .dist_attention import DistMeta
from .kernels.micro_attention import resolve_impl
from .kv_cache_manager import KVCacheManager
from .kv_copy import KVCopier
from .kv_pool import PagedKVCache, PoolLayout, create_kv_pool
from .kv_types import KVCacheConfig
from .models.config import ModelConfig
from .models.llama import unstack_layers
from .models.loader import resolve_dtype
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .paged_model import paged_forward_fn, pool_layout
from .sampling import SamplingTensors, make_sampling_tensors, sample
from .sampling_params import SamplingParams
from .attention_plan import bucket
from .scheduler import FINISHED, LogitsRow, Request, Scheduler, SchedulerConfig, StepPlan

MIN_BANNED = 8  # banned-token columns (more only when a request bans more)
# Query rows per attention tile in steps with prefill chunks. The native
# kernel's prefill path puts 16 rows of one KV head in a vector (q_tile x
# query heads per KV head); the jnp and Pallas kernels compute q_tile x block
# scores per item, so a smaller tile wastes less above the causal diagonal.
PREFILL_Q_TILE = {"native": 16}
DEFAULT_PREFILL_Q_TILE = 8
_GREEDY_ROW = {"temperature": 0.0}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_blocks: int | None = None        # per instance; None: from free memory
    host_kv_blocks: int = 0             # per instance
    kv_policy: str = "distributed"
    max_num_seqs: int = 64              # per instance
    max_tokens_per_step: int = 256      # per instance
    max_logprobs: int = 20
    seed: int = 0
    impl: str = "auto"                  # MicroAttention: auto | native | reference | pallas
    kv_memory_fraction: float = 0.9     # of free accelerator memory (CPU: see kv_blocks_from_memory)
    scan_layers: bool = False           # False: layers unrolled, per-layer weights (faster steps)
    overlap_steps: bool = True          # plan step n+1 while step n runs (see Engine.step)


@dataclasses.dataclass(frozen=True)
class _InFlight:
    """A dispatched step: its plan and its (device) results."""

    plan: Any
    result: Any  # (SampleResult, target logprobs, target ranks)


@dataclasses.dataclass
class _Tracked:
    """Output-side state of one request."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    sched: Request | None
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict] | None = None
    prompt_logprobs: list | None = None
    cumulative_logprob: float = 0.0
    text: str = ""
    text_tokens: int = 0            # `text` decodes generated[:text_tokens]
    text_exact: bool = True         # ... by a full decode (else incrementally)
    text_final: bool = False        # cut at a stop string: never re-decoded
    text_prefix: int = 0            # incremental: context tokens re-decoded with new ones
    finish_reason: str | None = None
    stop_reason: Any = None
    error: str | None = None
    metrics: RequestMetrics = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def kv_blocks_from_memory(layout: PoolLayout, dtype, cfg: ModelConfig, max_num_seqs: int,
                          fraction: float) -> int:
    """KV blocks per instance that fit in free device memory.

    Accelerators: `fraction` of (bytes_limit - bytes_in_use), i.e. 10% headroom
    by default. CPU devices report no memory stats: a quarter of the host's
    available memory, shared by the local devices. Capped at what max_num_seqs
    sequences of max_position_embeddings tokens can use.
    """
    per_block = layout.bytes(dtype) // (layout.num_instances * layout.blocks_per_instance)
    per_block_per_device = per_block // layout.tp  # (over-estimate when KV is replicated over tp)
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        free = (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * fraction
    else:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        free = avail * 0.25 / len(jax.local_devices())
    blocks = int(free // max(per_block_per_device, 1))
    cap = -(-max_num_seqs * cfg.max_position_embeddings // layout.block_size)
    return max(1, min(blocks, cap))


class Engine:
    def __init__(self, cfg: ModelConfig, params, mesh: Mesh, tokenizer=None,
                 config: EngineConfig = EngineConfig(), dtype: Any = "float32"):
        self.config = config
        # the MicroAttention implementation the step uses ("auto" resolved once)
        self.attention_impl = resolve_impl(config.impl)
        if not config.scan_layers:  # the stacked arrays are dropped: no second copy
            params = unstack_layers(params, cfg.num_layers)
        self.cfg, self.params, self.mesh, self.tokenizer = cfg, params, mesh, tokenizer
        self.dtype = resolve_dtype(dtype)
        I = mesh.shape["inst"]
        nb = config.kv_blocks
        if nb is None:
            nb = kv_blocks_from_memory(pool_layout(cfg, mesh, 1, config.block_size), self.dtype,
                                       cfg, config.max_num_seqs, config.kv_memory_fraction)
            if jax.process_count() > 1:  # every process must build the same pool and plans
                from jax.experimental import multihost_utils

                nb = int(np.min(multihost_utils.process_allgather(np.asarray([nb], np.int64))))
        self.layout = pool_layout(cfg, mesh, nb, config.block_size)
        self.pools = create_kv_pool(mesh, self.layout, self.dtype)
        self.host_pools = None
        if config.host_kv_blocks > 0:
            host_layout = dataclasses.replace(self.layout, blocks_per_instance=config.host_kv_blocks)
            sh = NamedSharding(mesh, host_layout.spec, memory_kind="pinned_host")
            zeros = jax.jit(lambda: jnp.zeros(host_layout.shape, self.dtype), out_shardings=sh)
            self.host_pools = PagedKVCache(zeros(), zeros())
        self.kv = KVCacheManager(KVCacheConfig(
            I, nb, block_size=config.block_size, host_blocks_per_instance=config.host_kv_blocks,
            kv_policy=config.kv_policy))
        self.scheduler = Scheduler(SchedulerConfig(
            I, config.block_size, nb, max_num_seqs=config.max_num_seqs,
            max_tokens_per_step=config.max_tokens_per_step,
            prefill_q_tile=PREFILL_Q_TILE.get(self.attention_impl, DEFAULT_PREFILL_Q_TILE)), self.kv)
        self.copier = KVCopier(mesh)
        self.eos_ids = set(cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        self._step = self._make_step()
        self._feed_tokens = jax.jit(
            lambda tokens, src, prev: jnp.where(src >= 0, prev[jnp.maximum(src, 0)], tokens))
        self._inflight: _InFlight | None = None
        self._tracked: dict[int, _Tracked] = {}
        self._next_rid = 0
        # (prefill rows, decode rows, seconds) of every step that ran the model
        self.step_log: list[tuple[int, int, float]] = []
        self.stats = {"steps": 0, "preemptions": 0, "swapped_out_blocks": 0,
                      "swapped_in_blocks": 0, "migrated_blocks": 0, "prompt_tokens": 0,
                      "generation_tokens": 0, "max_remote_blocks": 0}

    # ------------------------------------------------------------ device step
    def _make_step(self):
        forward = paged_forward_fn(self.cfg, self.mesh, self.layout, self.dtype, self.attention_impl,
                                   scan_layers=self.config.scan_layers)

        def step(params, pools, tokens, positions, meta, logits_index, targets, st, num_top):
            logits, pools = forward(params, tokens, positions, pools, meta, logits_index)
            logits = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)
            res = sample(logits, st, num_top or 0, self.config.seed, with_logprobs=num_top is not None)
            if num_top is None:  # no row reports logprobs
                zeros = jnp.zeros(targets.shape, jnp.float32)
                return pools, res, zeros, zeros.astype(jnp.int32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            target_lp = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[:, None], axis=1)[:, 0]
            target_rank = 1 + jnp.sum(logp > target_lp[:, None], axis=-1)
            return pools, res, target_lp, target_rank

        # num_top (static): top logprobs per row; None when no row of the step
        # reports logprobs (log-softmax, ranks and top-k are skipped)
        if jax.process_count() == 1:
            return jax.jit(step, donate_argnums=(1,), static_argnums=(8,))
        # Multi-process mesh: every process reads the sampled tokens back, so
        # the small outputs must be replicated (a sharded output would span
        # devices of other processes). Single-process programs are unchanged.
        pool_sh = NamedSharding(self.mesh, self.layout.spec)
        rep = NamedSharding(self.mesh, P())
        return jax.jit(step, donate_argnums=(1,), static_argnums=(8,),
                       out_shardings=(PagedKVCache(pool_sh, pool_sh), rep, rep, rep))

    def compiled_programs(self) -> int:
        """XLA programs compiled so far: step shapes plus KV copy batches."""
        return self._step._cache_size() + self.copier.compiles()

    # --------------------------------------------------------------- requests
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        rid = self._next_rid
        self._next_rid += 1
        request_id = str(rid) if request_id is None else str(request_id)
        now = time.time()
        text = prompt if isinstance(prompt, str) else None
        seed = params.seed if params.seed is not None else (self.config.seed * 1_000_003 + rid) % (2 ** 31)
        t = _Tracked(request_id, text, [], params, seed, None,
                     logprobs=[] if params.logprobs is not None else None,
                     metrics=RequestMetrics(arrival_time=now, first_scheduled_time=None,
                                            first_token_time=None, last_token_time=None,
                                            finished_time=None))
        self._tracked[rid] = t
        error = None
        try:
            ids = self._prompt_ids(prompt)
            t.prompt_ids = ids
            capacity = self.kv.max_request_tokens(0)
            window = self.cfg.sliding_window
            if len(ids) > capacity:
                error = (f"prompt has {len(ids)} tokens, more than the {capacity} tokens of KV "
                         f"one request may hold under kv_policy={self.config.kv_policy!r}")
            elif window is not None and len(ids) > window:
                error = (f"prompt has {len(ids)} tokens, more than the model's sliding window "
                         f"({window}), which DistAttention does not implement")
        except ValueError as e:
            error = str(e)
        if error is not None:
            t.error = error
            t.finish_reason = "error"
            t.metrics.finished_time = now
            return request_id
        if params.prompt_logprobs is not None:
            t.prompt_logprobs = [None]
        t.sched = Request(rid, list(ids), len(ids), params.prompt_logprobs is not None)
        self.scheduler.add(t.sched)
        return request_id

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a string prompt needs a tokenizer; this model directory has none "
                                 "(pass token ids instead)")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            try:
                ids = [int(x) for x in prompt]
            except (TypeError, ValueError):
                raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
            if any(isinstance(x, bool) or int(x) != x for x in prompt):
                raise ValueError("token ids must be integers")
        if not ids:
            raise ValueError("empty prompt: a request needs at least one prompt token")
        bad = [x for x in ids if not 0 <= x < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return ids

    def sync(self) -> None:
        """Wait until the step in flight (overlap_steps) has run on the device."""
        if self._inflight is not None:
            jax.block_until_ready(self._inflight.result)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def take_finished_errors(self) -> list[RequestOutput]:
        """Requests refused at submission (they never reach the scheduler)."""
        out = []
        for rid, t in list(self._tracked.items()):
            if t.sched is None and t.finished:
                out.append(self._output(t))
                del self._tracked[rid]
        return out

    # ------------------------------------------------------------------ step
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
        changed: dict[int, _Tracked] = {}

        def emit():
            return [self._emit(t) for t in changed.values() if t.finished or not only_finished]

        prev, self._inflight = self._inflight, None
        plan = self.scheduler.schedule()
        if plan is None:
            if prev is not None:
                self._process(prev, changed)
            else:
                self._unblock(changed)
            return emit()
        kvp = plan.kv
        self.stats["preemptions"] += len(kvp.preempted)
        if kvp.moves.pairs:
            self.pools = self.copier.move(self.pools, kvp.moves)
            self.stats["migrated_blocks"] += len(kvp.moves.pairs)
        if kvp.swap_out.pairs:
            self.host_pools = self.copier.swap_out(self.pools, self.host_pools, kvp.swap_out)
            self.stats["swapped_out_blocks"] += len(kvp.swap_out.pairs)
        if kvp.swap_in.pairs:
            self.pools = self.copier.swap_in(self.host_pools, self.pools, kvp.swap_in)
            self.stats["swapped_in_blocks"] += len(kvp.swap_in.pairs)

        current = None
        if plan.seqs:
            current = self._dispatch(plan, prev)
        if prev is not None:
            self._process(prev, changed)
        for rid in kvp.too_long:  # reached the most KV the policy allows
            t = self._tracked.get(rid)
            if t is not None and not t.finished:
                self._finish(t, "length", None, changed)
        if current is not None:
            self._mark_pending(current)
            if self.config.overlap_steps:
                self._inflight = current
            else:
                self._process(current, changed)
            decode = sum(1 for s in plan.seqs if s.count == 1)
            self.step_log.append((sum(s.count for s in plan.seqs) - decode, decode,
                                  time.perf_counter() - t_start))
        return emit()

    def _dispatch(self, plan: StepPlan, prev: "_InFlight | None") -> "_InFlight":
        """Launch the step (asynchronously: nothing is read back here)."""
        now = time.time()
        for s in plan.seqs:
            t = self._tracked[s.request.rid]
            if t.metrics.first_scheduled_time is None:
                t.metrics.first_scheduled_time = now
        tokens = plan.tokens
        if plan.token_src is not None:  # pending tokens: taken from the step in flight
            tokens = self._feed_tokens(tokens, plan.token_src, prev.result[0].tokens)
        st = self._sampling_tensors(plan.logits_rows)
        self.pools, *result = self._step(
            self.params, self.pools, tokens, plan.positions, DistMeta.from_plan(plan.attention),
            plan.logits_index, plan.targets, st, self._num_top(plan.logits_rows))
        self.scheduler.advance(plan)
        self.stats["steps"] += 1
        self.stats["max_remote_blocks"] = max(self.stats["max_remote_blocks"],
                                              int(self.kv.ledger().sum()))
        return _InFlight(plan, result)

    def _mark_pending(self, step: "_InFlight") -> None:
        """The step's sampled tokens are pending until it is processed; a
        request whose pending token is its last gets nothing more scheduled."""
        for k, row in enumerate(step.plan.logits_rows):
            if row is None or row.target >= 0:
                continue
            t = self._tracked.get(row.request.rid)
            if t is None or t.finished:
                continue
            r = t.sched
            r.pending, r.pending_row = 1, k
            p, n = t.params, len(t.generated) + 1
            window = self.cfg.sliding_window
            r.hold = ((p.max_tokens is not None and n >= p.max_tokens)
                      or (window is not None and len(r.tokens) + 1 > window))

    def _process(self, step: "_InFlight", changed) -> None:
        """Read the step's results back and apply them."""
        res, target_lp, target_rank = step.result
        res = jax.tree.map(np.asarray, res)
        target_lp, target_rank = np.asarray(target_lp), np.asarray(target_rank)
        now = time.time()
        for k, row in enumerate(step.plan.logits_rows):
            if row is None:
                continue
            t = self._tracked.get(row.request.rid)
            if t is None or t.finished:  # stopped earlier: the row is dropped
                continue
            if row.target >= 0:
                self._record_prompt_logprob(t, row, k, res, target_lp, target_rank)
            else:
                t.sched.pending, t.sched.pending_row = 0, -1
                self._append_token(t, k, res, now, changed)

    def _unblock(self, changed) -> None:
        """Nothing could be scheduled although requests remain: the head of the
        queue can never fit. Fail it rather than spin."""
        for r in list(self.scheduler.requests.values()):
            t = self._tracked[r.rid]
            t.error = "request cannot be scheduled with the configured KV capacity"
            self._finish(t, "error", None, changed)
            return

    def _num_top(self, rows: Sequence[LogitsRow | None]) -> int | None:
        for row in rows:
            if row is not None:
                p = self._tracked[row.request.rid].params
                if (p.prompt_logprobs if row.target >= 0 else p.logprobs) is not None:
                    return self.config.max_logprobs
        return None

    def _sampling_tensors(self, rows: Sequence[LogitsRow | None]) -> SamplingTensors:
        params, counters, seeds, bans = [], [], [], []
        for row in rows:
            if row is None or row.target >= 0:  # padding / prompt-logprob rows: greedy, unused
                params.append(_GREEDY_ROW)
                counters.append(0)
                seeds.append(0)
                bans.append(None)
                continue
            t = self._tracked[row.request.rid]
            p = t.params
            params.append(p)
            generated = len(t.generated) + t.sched.pending  # a pending token counts
            counters.append(generated)
            seeds.append(t.seed)
            # EOS and stop ids wait until min_tokens is reached
            bans.append(sorted(set(p.stop_token_ids or ()) | (set() if p.ignore_eos else self.eos_ids))
                        if generated < p.min_tokens else None)
        width = bucket(max((len(b) for b in bans if b), default=0), MIN_BANNED)
        return make_sampling_tensors(params, counters, bans, seeds=seeds, banned_width=width)

    def _logprob_dict(self, chosen: int, chosen_lp: float, chosen_rank: int, top_ids, top_lps,
                      k: int) -> dict:
        d = {int(chosen): Logprob(float(chosen_lp), int(chosen_rank), self._decode_one(chosen))}
        for j in range(k):
            tid = int(top_ids[j])
            if tid not in d:
                d[tid] = Logprob(float(top_lps[j]), j + 1, self._decode_one(tid))
        return d

    def _decode_one(self, tid: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([tid])

    def _record_prompt_logprob(self, t: _Tracked, row: LogitsRow, k: int, res, target_lp,
                               target_rank) -> None:
        if t.prompt_logprobs is None or len(t.prompt_logprobs) != row.position + 1:
            return  # already recorded (a recompute after preemption)
        t.prompt_logprobs.append(self._logprob_dict(
            row.target, target_lp[k], target_rank[k], res.top_ids[k], res.top_logprobs[k],
            t.params.prompt_logprobs))
        self.scheduler.record_prompt_logprob(row)

    def _append_token(self, t: _Tracked, k: int, res, now: float, changed) -> None:
        tok = int(res.tokens[k])
        lp = float(res.logprobs[k])
        t.generated.append(tok)
        t.sched.tokens.append(tok)
        t.cumulative_logprob += lp
        self.stats["generation_tokens"] += 1
        if t.logprobs is not None:
            t.logprobs.append(self._logprob_dict(tok, lp, res.ranks[k], res.top_ids[k],
                                                 res.top_logprobs[k], t.params.logprobs))
        if t.metrics.first_token_time is None:
            t.metrics.first_token_time = now
        t.metrics.last_token_time = now
        changed[t.sched.rid] = t
        p = t.params
        if p.stop:  # stop strings are matched on the text: keep it current
            self._refresh_text(t)
        n = len(t.generated)
        if n >= p.min_tokens:
            if tok in self.eos_ids and not p.ignore_eos:
                return self._finish(t, "stop", None, changed)
            if p.stop_token_ids and tok in p.stop_token_ids:
                return self._finish(t, "stop", tok, changed)
            for s in p.stop or ():
                at = t.text.find(s)
                if at >= 0:
                    t.text = t.text[:at + len(s)] if p.include_stop_str_in_output else t.text[:at]
                    t.text_final = True
                    return self._finish(t, "stop", s, changed)
        if p.max_tokens is not None and n >= p.max_tokens:
            return self._finish(t, "length", None, changed)
        window = self.cfg.sliding_window
        if window is not None and len(t.sched.tokens) > window:
            # the next position would need a sliding-window mask: stop exactly here
            return self._finish(t, "length", None, changed)

    def _finish(self, t: _Tracked, reason: str, stop_reason, changed) -> None:
        t.finish_reason, t.stop_reason = reason, stop_reason
        t.metrics.finished_time = time.time()
        self.stats["prompt_tokens"] += len(t.prompt_ids)
        if t.sched is not None and t.sched.state != FINISHED:
            self.scheduler.finish(t.sched)
        changed[t.sched.rid if t.sched is not None else -1] = t

    # --------------------------------------------------------------- outputs
    def _refresh_text(self, t: _Tracked) -> None:
        """Bring t.text up to date with t.generated. A finished request, or one
        with stop strings (matched on the text), gets a full decode: exactly
        the tokenizer's decode of its tokens. A running request's streamed
        text is decoded incrementally, as vLLM does: only the new tokens plus
        a few tokens of context, so a streamed request costs O(tokens), not
        O(tokens^2), in decoding. The new text is taken once it no longer
        ends in an incomplete UTF-8 character (U+FFFD)."""
        if self.tokenizer is None or t.text_final:
            return
        ids, skip = t.generated, t.params.skip_special_tokens
        exact = t.finished or bool(t.params.stop)
        if t.text_tokens == len(ids) and (t.text_exact or not exact):
            return
        if exact:
            t.text = self.tokenizer.decode(ids, skip_special_tokens=skip)
            t.text_tokens = t.text_prefix = len(ids)
            t.text_exact = True
            return
        before = self.tokenizer.decode(ids[t.text_prefix:t.text_tokens], skip_special_tokens=skip)
        after = self.tokenizer.decode(ids[t.text_prefix:], skip_special_tokens=skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            t.text += after[len(before):]
            t.text_prefix, t.text_tokens = t.text_tokens, len(ids)
            t.text_exact = False

    def _output(self, t: _Tracked) -> RequestOutput:
        self._refresh_text(t)
        comp = CompletionOutput(index=0, text=t.text, token_ids=list(t.generated),
                                cumulative_logprob=t.cumulative_logprob if t.logprobs is not None else None,
                                logprobs=list(t.logprobs) if t.logprobs is not None else None,
                                finish_reason=t.finish_reason, stop_reason=t.stop_reason)
        return RequestOutput(request_id=t.request_id, prompt=t.prompt, prompt_token_ids=list(t.prompt_ids),
                             prompt_logprobs=list(t.prompt_logprobs) if t.prompt_logprobs is not None else None,
                             outputs=[comp], finished=t.finished, metrics=t.metrics, error=t.error)

    def _emit(self, t: _Tracked) -> RequestOutput:
        out = self._output(t)
        if t.finished and t.sched is not None:
            self._tracked.pop(t.sched.rid, None)
        return out

    def kv_usage(self) -> np.ndarray:
        """Fraction of each instance's device blocks in use."""
        free = self.kv.free_device_blocks()
        return 1.0 - free / self.layout.blocks_per_instance
