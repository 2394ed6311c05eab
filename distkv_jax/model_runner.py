"""The model runner: KV pools, the jitted step, KV copies and the step's
sampling inputs (uses JAX).

    runner.copy_kv(step_kv_plan)                 migrations, swap out, swap in
    runner.dispatch(plan, rows, prev) -> result  one step, asynchronously
    runner.warm_start()                          compile the step programs up front

The step is one program per bucket shape: (rows per instance, tiles, query
tile, work-list runs, run length, logits rows, banned-token columns, penalty
entries per row; with or without logprobs is a traced flag). Steps where no
row has penalties or logit bias have no penalty entries (width 0, the only
width warm start builds); each penalty width a step uses (a power of two,
at least MIN_PENALTY) is one more program per shape.
`compiled_programs()` counts them; `step_shapes()` lists the ones the
configuration can use for warm start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .attention_plan import MASKED, bucket, coarse_bucket
from .dist_attention import DistMeta
from .engine_args import EngineArgs
from .kernels.dense import PACKED_IMPLS, pack as pack_dense, resolve_impl as resolve_dense_impl
from .kernels.micro_attention import resolve_impl
from .kv_copy import KVCopier, bucket_size
from .kv_pool import PagedKVCache, PoolLayout, create_kv_pool, storage_dtype
from .kv_types import StepKVPlan
from .memory_budget import RUNTIME_RESERVE, TEMP_FACTOR, StepLimits, kv_blocks_for_memory, step_temp_bytes
from .mesh import INST, TP
from .models.config import ModelConfig
from .models.llama import pack_dense_kernels, unstack_layers
from .models.loader import resolve_dtype
from .paged_model import paged_forward_fn, pool_layout
from .penalties import request_row
from .request import Request
from .sampling import SampleResult, SamplingTensors, make_sampling_tensors, report_logprobs, sample
from .scheduler import LogitsRow, StepPlan, tiles_bucket

log = logging.getLogger("distkv_jax")

MIN_BANNED = 8  # banned-token columns (more only when a request bans more)
# Penalty entries per row when some row has penalties: a floor of 64 keeps a
# short request on one program for its first tokens; wider only as needed.
MIN_PENALTY = 64
# Query rows per attention tile in steps with prefill chunks. The native
# kernel's prefill path puts 16 rows of one KV head in a vector (q_tile x
# query heads per KV head); the jnp and Pallas kernels compute q_tile x block
# scores per item, so a smaller tile wastes less above the causal diagonal.
PREFILL_Q_TILE = {"native": 16}
DEFAULT_PREFILL_Q_TILE = 8
_GREEDY_ROW = {"temperature": 0.0}


class CompileStats:
    """XLA programs this process built: compiled, or loaded from the
    persistent compilation cache (jax.monitoring events)."""

    built = 0            # programs built (compiled or loaded)
    cache_hits = 0       # ... of which loaded from the persistent cache
    seconds = 0.0        # time spent building them

    @classmethod
    def compiled(cls) -> int:
        return cls.built - cls.cache_hits

    @classmethod
    def snapshot(cls) -> dict:
        return {"built": cls.built, "compiled": cls.compiled(), "cache_hits": cls.cache_hits,
                "seconds": cls.seconds}


def _on_event(event: str, **kw) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        CompileStats.cache_hits += 1


def _on_duration(event: str, secs: float, **kw) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        CompileStats.built += 1
        CompileStats.seconds += secs


jax.monitoring.register_event_listener(_on_event)
jax.monitoring.register_event_duration_secs_listener(_on_duration)


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The static shape of one step program."""

    rows: int        # T: rows per instance
    tiles: int       # query tiles
    q_tile: int
    runs: int        # R: work-list runs per instance
    run: int         # items per run
    logits: int      # S: logits rows per instance
    banned: int = 8  # banned-token columns
    penalty: int = 0  # penalty entries per row (0: no row has penalties)
    host_runs: int = 0  # host-attended KV work-list runs per instance (0: none)
    host_run: int = 0


def kv_blocks_from_memory(layout: PoolLayout, dtype, cfg: ModelConfig, args: EngineArgs,
                          prefill_q_tile: int) -> int:
    """KV blocks per instance that fit in free device memory.

    Accelerators (devices that report memory_stats): memory_budget's rule,
    i.e. kv_memory_fraction of (bytes_limit - bytes_in_use - 2 x the largest
    step's estimated temporaries - 1 GiB runtime reserve). CPU devices
    report no memory stats: a quarter of the host's available memory, shared
    by the local devices. Capped at what max_num_seqs sequences of
    max_position_embeddings tokens can use.
    """
    per_block = layout.bytes(dtype) // (layout.num_instances * layout.blocks_per_instance)
    per_block_per_device = per_block // layout.tp  # (over-estimate when KV is replicated over tp)
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    cap = -(-args.max_num_seqs * cfg.max_position_embeddings // layout.block_size)
    if stats and stats.get("bytes_limit"):
        lim = StepLimits(tokens=bucket(args.max_num_batched_tokens),
                         instances=layout.num_instances, tp=layout.tp,
                         max_model_len=args.max_model_len or cfg.max_position_embeddings,
                         block_size=layout.block_size, prefill_q_tile=prefill_q_tile)
        temps = step_temp_bytes(cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size,
                                cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, lim)
        blocks = kv_blocks_for_memory(stats["bytes_limit"], stats.get("bytes_in_use", 0),
                                      per_block_per_device, temps, args.kv_memory_fraction)
        if blocks < 1:
            raise ValueError(
                f"no device memory left for KV: {dev} has {stats['bytes_limit']} bytes, "
                f"{stats.get('bytes_in_use', 0)} in use (weights), and the step needs about "
                f"{int(TEMP_FACTOR * temps)} bytes of temporaries plus {RUNTIME_RESERVE} reserved; "
                "lower max_num_batched_tokens or max_model_len, or use a larger mesh")
        return min(blocks, cap)
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    free = avail * 0.25 / len(jax.local_devices())
    blocks = int(free // max(per_block_per_device, 1))
    return max(1, min(blocks, cap))


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params, mesh: Mesh, args: EngineArgs):
        self.args, self.cfg, self.mesh = args, cfg, mesh
        # the MicroAttention implementation the step uses ("auto" resolved once)
        self.platform = mesh.devices.flat[0].platform
        self.attention_impl = resolve_impl(args.attention_impl, self.platform, cfg.head_dim,
                                           args.block_size)
        if self.attention_impl == "pallas" and self.platform != "cpu":
            from .kernels.micro_attention_gpu import gpu_supports

            why = gpu_supports(cfg.head_dim, args.block_size)
            if why:
                raise ValueError(f"attention_impl='pallas': the Triton kernel cannot take {why}; "
                                 "use attention_impl='auto' (the jnp reference for these shapes)")
        self.prefill_q_tile = PREFILL_Q_TILE.get(self.attention_impl, DEFAULT_PREFILL_Q_TILE)
        if not args.scan_layers:  # the stacked arrays are dropped: no second copy
            params = unstack_layers(params, cfg.num_layers)
        self.dtype = resolve_dtype(args.dtype)
        # dense layers: XLA's dot, or a kernel over weights packed here once
        self.dense_impl = resolve_dense_impl(args.dense_impl, self.platform, self.dtype,
                                             mesh.shape[TP])
        if self.dense_impl in PACKED_IMPLS:  # the unpacked kernels are dropped
            params = pack_dense_kernels(params, jax.jit(pack_dense))
        self.params = params
        nb = args.kv_blocks
        if nb is None:
            nb = kv_blocks_from_memory(pool_layout(cfg, mesh, 1, args.block_size), self.dtype,
                                       cfg, args, self.prefill_q_tile)
            if jax.process_count() > 1:  # every process must build the same pool and plans
                from jax.experimental import multihost_utils

                nb = int(np.min(multihost_utils.process_allgather(np.asarray([nb], np.int64))))
        self.layout = pool_layout(cfg, mesh, nb, args.block_size)
        self.pools = create_kv_pool(mesh, self.layout, self.dtype)
        self.host_pools = None
        if args.host_kv_blocks > 0:
            host_layout = dataclasses.replace(self.layout, blocks_per_instance=args.host_kv_blocks)
            sh = NamedSharding(mesh, host_layout.spec, memory_kind="pinned_host")
            zeros = jax.jit(lambda: jnp.zeros(host_layout.shape, storage_dtype(self.dtype)),
                            out_shardings=sh)
            self.host_pools = PagedKVCache(zeros(), zeros())
        self.copier = KVCopier(mesh)
        # move batches warm start compiles (fork copies are cut to this size)
        self._fork_batch = bucket_size(max(args.kv_cache_config(1).migrate_blocks_per_step,
                                           self.layout.num_instances))
        self._step = self._make_step(self.attention_impl, self.dense_impl)
        self._steps_for: dict[str, object] = {}  # other platforms' steps (lowering only)
        self.shapes_run: set[StepShape] = set()  # shapes of the steps dispatched so far
        # The step's tokens are always a device array sharded like its rows
        # (fed from the step in flight or put there), so one program serves
        # both kinds of step.
        self._rows = NamedSharding(mesh, P(INST, None))
        self._feed_tokens = jax.jit(
            lambda tokens, src, prev: jnp.where(src >= 0, prev[jnp.maximum(src, 0)], tokens),
            out_shardings=self._rows)

    # ------------------------------------------------------------ device step
    def _make_step(self, attention_impl: str, dense_impl: str):
        forward = paged_forward_fn(self.cfg, self.mesh, self.layout, self.dtype, attention_impl,
                                   scan_layers=self.args.scan_layers, dense_impl=dense_impl)
        base_seed, num_top = self.args.seed, self.args.max_logprobs
        # sampled tokens leave the step padded to one length, so the next
        # step's token hand-over is one program per row count, not one per
        # (rows, this step's logits rows) pair
        max_sampled = self.layout.num_instances * bucket(self.args.max_num_batched_tokens)

        def step(params, pools, tokens, positions, meta, logits_index, targets, st, report):
            logits, pools = forward(params, tokens, positions, pools, meta, logits_index)
            logits = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)
            last = None
            if st.pen_ids is not None:  # static: only steps with penalties
                # each logits row's input token: a pending one (sampled by the
                # previous step) is counted by the penalties on the device
                last = jnp.take_along_axis(tokens, logits_index, axis=1).reshape(-1)
            tokens = sample(logits, st, 0, base_seed, with_logprobs=False, last_tokens=last).tokens

            # `report` (a traced flag, not a static one: one program serves
            # steps with and without logprobs): some row reports logprobs.
            # Otherwise the log-softmax, ranks and top-k are skipped.
            def reported():
                logp = jax.nn.log_softmax(logits, axis=-1)
                res = report_logprobs(logp, tokens, num_top)
                target_lp = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[:, None], axis=1)[:, 0]
                target_rank = (1 + jnp.sum(logp > target_lp[:, None], axis=-1)).astype(jnp.int32)
                return res, target_lp, target_rank

            def skipped():
                n = tokens.shape[0]
                z = jnp.zeros((n,), jnp.float32)
                return (SampleResult(tokens, z, jnp.zeros((n, num_top), jnp.int32),
                                     jnp.zeros((n, num_top), jnp.float32), z.astype(jnp.int32)),
                        jnp.zeros(targets.shape, jnp.float32), jnp.zeros(targets.shape, jnp.int32))

            res, target_lp, target_rank = jax.lax.cond(report, reported, skipped)
            res = res._replace(tokens=jnp.pad(res.tokens, (0, max_sampled - res.tokens.shape[0])))
            return pools, res, target_lp, target_rank

        if jax.process_count() == 1:
            return jax.jit(step, donate_argnums=(1,))
        # Multi-process mesh: every process reads the sampled tokens back, so
        # the small outputs must be replicated (a sharded output would span
        # devices of other processes). Single-process programs are unchanged.
        pool_sh = NamedSharding(self.mesh, self.layout.spec)
        rep = NamedSharding(self.mesh, P())
        return jax.jit(step, donate_argnums=(1,),
                       out_shardings=(PagedKVCache(pool_sh, pool_sh), rep, rep, rep))

    def compiled_programs(self) -> int:
        """XLA programs compiled so far: step shapes plus KV copy batches."""
        return self._step._cache_size() + self.copier.compiles()

    # --------------------------------------------------------------- copies
    def copy_kv(self, kvp: StepKVPlan) -> None:
        """The control plane's block copies, in their documented order."""
        if kvp.forks.pairs:
            # fork copies read parents' blocks that no copy of theirs
            # writes, so they may run in chunks of the warmed batch sizes
            pairs, k = kvp.forks.pairs, self._fork_batch
            for i in range(0, len(pairs), k):
                self.pools = self.copier.move(self.pools, pairs[i:i + k])
        if kvp.moves.pairs:
            self.pools = self.copier.move(self.pools, kvp.moves)
        if kvp.swap_out.pairs:
            self.host_pools = self.copier.swap_out(self.pools, self.host_pools, kvp.swap_out)
        if kvp.swap_in.pairs:
            self.pools = self.copier.swap_in(self.host_pools, self.pools, kvp.swap_in)

    # ----------------------------------------------------------------- step
    def dispatch(self, plan: StepPlan, eos_ids: set[int], prev_result=None):
        """Launch the step (asynchronously: nothing is read back here).
        Returns the device results (SampleResult, target logprobs, ranks)."""
        if plan.token_src is not None:  # pending tokens: taken from the step in flight
            tokens = self._feed_tokens(plan.tokens, plan.token_src, prev_result[0].tokens)
        else:
            tokens = self._put_rows(plan.tokens)
        st = sampling_tensors(plan.logits_rows, eos_ids)
        a = plan.attention
        host = a.host_item_tile.shape[1:] if a.has_host_work else (0, 0)
        self.shapes_run.add(StepShape(plan.tokens.shape[1], a.tile_rows.shape[0], a.tile_rows.shape[1],
                                      a.item_tile.shape[1], a.item_tile.shape[2],
                                      plan.logits_index.shape[1], st.banned.shape[1],
                                      0 if st.pen_ids is None else st.pen_ids.shape[1], *host))
        self.pools, *result = self._step(
            self.params, self.pools, tokens, plan.positions,
            DistMeta.from_plan(plan.attention, self.host_pools),
            plan.logits_index, plan.targets, st, self._reports_logprobs(plan.logits_rows))
        return result

    def _put_rows(self, x: np.ndarray) -> jax.Array:
        if jax.process_count() == 1:
            return jax.device_put(x, self._rows)
        # every process holds the same x; each supplies its own devices' rows
        return jax.make_array_from_callback(x.shape, self._rows, lambda idx: x[idx])

    @staticmethod
    def _reports_logprobs(rows: Sequence[LogitsRow | None]) -> np.bool_:
        for row in rows:
            if row is not None:
                p = row.request.params
                if (p.prompt_logprobs if row.target >= 0 else p.logprobs) is not None:
                    return np.True_
        return np.False_

    # ------------------------------------------------------------ warm start
    def step_shapes(self, max_model_len: int, run_choices: Sequence[int],
                    min_rows: int) -> list[StepShape]:
        """Every step program the scheduler can ask for (scheduler.py's
        buckets): rows T up to max_num_batched_tokens; decode steps (query
        tile 1) and steps with prefill chunks; logits rows and tiles as the
        scheduler derives them from T; every run length; runs R up to what
        an instance's blocks, or its tiles' contexts at max_model_len, can
        fill. Steps with more than 8 banned tokens per row (a request with
        many stop ids under min_tokens) are outside the set; so are plans
        whose chunks split into more pieces than `tiles_bucket` allows."""
        I, nb, bs = self.layout.num_instances, self.layout.blocks_per_instance, self.layout.block_size
        ctx_blocks = -(-max_model_len // bs)
        t_max = bucket(self.args.max_num_batched_tokens, min_rows)
        shapes = []
        T = bucket(1, min_rows)
        while T <= t_max:
            for q_tile in (1, self.prefill_q_tile):
                for S in sorted({T} if q_tile == 1 else {min_rows, T}):
                    tiles = tiles_bucket(I, T, S, q_tile)
                    for run in run_choices:
                        reach = min(nb // run + tiles, tiles * -(-ctx_blocks // run))
                        R = coarse_bucket(1, 8)
                        while True:
                            shapes.append(StepShape(T, tiles, q_tile, R, run, S))
                            if R >= reach:
                                break
                            R *= 4
            T *= 2
        return shapes

    def warm_start(self, shapes: Sequence[StepShape], move_batches: int,
                   progress: bool = True) -> dict:
        """Build every program the engine can run before it takes requests:
        each step shape (an all-padding step: it writes no KV), the token
        hand-over between overlapped steps for each (rows, previous logits
        rows) pair, and the KV copies for each batch bucket (moves up to
        `move_batches` blocks, swaps up to the copier's swap batch). Programs
        come from the persistent compilation cache when it has them."""
        before = CompileStats.snapshot()
        t0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(shapes), desc="[distkv] warm start: step programs", unit="prog",
                       mininterval=1.0, dynamic_ncols=True)
        sampled = None  # a step's sampled tokens, as the next step gets them
        warmed = 0
        for shape in shapes:
            if _near_map_limit():
                break
            sampled = self._run_padding_step(shape)[0].tokens
            warmed += 1
            if bar is not None:
                bar.update(1)
        if warmed < len(shapes):
            used, limit = _memory_maps()
            log.warning("warm start stopped after %d of %d step programs: the process holds %d of "
                        "its %d memory mappings (vm.max_map_count; XLA:CPU maps a few hundred per "
                        "program). The rest compile on first use, and may hit the same limit: raise "
                        "vm.max_map_count or lower max_num_batched_tokens.",
                        warmed, len(shapes), used, limit)
        I = self.layout.num_instances
        for T in sorted({sh.rows for sh in shapes[:warmed]}):
            none = np.full((I, T), -1, np.int32)
            self._feed_tokens(none, none, sampled)
        n = 1
        while n <= bucket_size(move_batches):
            self.pools = self.copier.move(self.pools, [(0, -1)] * n)
            n *= 2
        if self.host_pools is not None:
            n = 1
            while n <= self.copier.max_swap_batch:
                self.host_pools = self.copier.swap_out(self.pools, self.host_pools, [(0, -1)] * n)
                self.pools = self.copier.swap_in(self.host_pools, self.pools, [(0, -1)] * n)
                n *= 2
        jax.block_until_ready((self.pools, self.host_pools))
        if bar is not None:
            bar.close()
        after = CompileStats.snapshot()
        return {"step_shapes": len(shapes), "warmed_step_shapes": warmed,
                "seconds": time.perf_counter() - t0,
                "programs": after["built"] - before["built"],
                "compiled": after["compiled"] - before["compiled"],
                "from_cache": after["cache_hits"] - before["cache_hits"],
                "compile_seconds": after["seconds"] - before["seconds"]}

    def _padding_step_args(self, s: StepShape) -> tuple:
        """Arguments of an all-padding step of shape `s` (it writes no KV)."""
        I = self.layout.num_instances
        n = I * s.logits
        meta = DistMeta(
            slots=np.full(I * s.rows, -1, np.int32), positions=np.full(I * s.rows, -1, np.int32),
            tile_rows=np.full((s.tiles, s.q_tile), -1, np.int32),
            item_tile=np.full((I, s.runs, s.run), s.tiles, np.int32),
            item_block=np.zeros((I, s.runs, s.run), np.int32),
            item_kstart=np.full((I, s.runs, s.run), MASKED, np.int32))
        if s.host_runs:  # host-attended KV: an all-padding host work list
            hw = (I, s.host_runs, s.host_run)
            meta = meta._replace(host_item_tile=np.full(hw, s.tiles, np.int32),
                                 host_item_block=np.zeros(hw, np.int32),
                                 host_item_kstart=np.full(hw, MASKED, np.int32),
                                 host_k=self.host_pools.k, host_v=self.host_pools.v)
        st = make_sampling_tensors([_GREEDY_ROW] * n, [0] * n, [None] * n, seeds=[0] * n,
                                   banned_width=s.banned, penalty_rows=[None] * n,
                                   penalty_width=s.penalty)
        zeros = np.zeros((I, s.rows), np.int32)
        return (self.params, self.pools, self._put_rows(zeros), zeros, meta,
                np.zeros((I, s.logits), np.int32), np.full(n, -1, np.int32), st, np.False_)

    def _run_padding_step(self, s: StepShape):
        self.pools, *result = self._step(*self._padding_step_args(s))
        return result

    def lower_step(self, s: StepShape, platform: str | None = None):
        """The step program of shape `s`, lowered (jax.stages.Lowered): for
        inspecting what XLA builds (copies, memory).

        platform: lower for another platform (e.g. "cuda" on a CPU host) with
        the MicroAttention that `attention_impl` resolves to there: the
        program a GPU would compile for the same step, checked without one.
        """
        if platform is None or platform == self.platform:
            return self._step.lower(*self._padding_step_args(s))
        if platform not in self._steps_for:
            impl = resolve_impl(self.args.attention_impl, platform, self.cfg.head_dim,
                                self.args.block_size)
            # weights packed here are read by the jnp reference there
            dense_impl = "reference" if self.dense_impl in PACKED_IMPLS else "xla"
            self._steps_for[platform] = self._make_step(impl, dense_impl)
        traced = self._steps_for[platform].trace(*self._padding_step_args(s))
        return traced.lower(lowering_platforms=(platform,))

    def lower_copies(self, platform: str | None = None) -> dict:
        """Every KV copy program this runner has run (moves, forks, host
        swaps), lowered (for `platform` when given): {(direction, size): Lowered}."""
        out = {}
        for direction, size in sorted(self.copier.batches_run):
            if direction == "move":
                a, b = self.pools, None
            elif direction == "out":
                a, b = self.pools, self.host_pools
            else:
                a, b = self.host_pools, self.pools
            out[(direction, size)] = self.copier.lower(direction, a, b, size, platform)
        return out


def _memory_maps() -> tuple[int, int]:
    """(memory mappings this process holds, the kernel's limit), or (0, 0)
    where /proc does not tell."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            used = sum(1 for _ in f)
        return used, limit
    except (OSError, ValueError):
        return 0, 0


def _near_map_limit(fraction: float = 0.85) -> bool:
    """XLA:CPU maps each compiled program's code into a few hundred memory
    mappings; past the kernel's vm.max_map_count the next compile aborts the
    process. Warm start stops short of it."""
    used, limit = _memory_maps()
    return limit > 0 and used > fraction * limit


def sampling_tensors(rows: Sequence[LogitsRow | None], eos_ids: set[int]) -> SamplingTensors:
    """Per-row sampling inputs of a step. Padding and prompt-logprob rows are
    greedy and unused, without penalties. A request's counter counts its
    pending token; EOS and stop ids are banned until min_tokens is reached.
    Penalties: the request's sparse row (penalties.py); a row whose input
    token is the pending one (position past the known tokens) has the device
    count that token. No row with entries: width 0, the ordinary programs."""
    params, counters, seeds, bans, pens = [], [], [], [], []
    for row in rows:
        if row is None or row.target >= 0:
            params.append(_GREEDY_ROW)
            counters.append(0)
            seeds.append(0)
            bans.append(None)
            pens.append(None)
            continue
        r: Request = row.request
        p = r.params
        params.append(p)
        generated = r.num_output_tokens + r.pending
        counters.append(generated)
        seeds.append(r.seed)
        bans.append(sorted(set(p.stop_token_ids or ()) | (set() if p.ignore_eos else eos_ids))
                    if generated < p.min_tokens else None)
        pens.append(request_row(r, pending=row.position >= len(r.tokens))
                    if p.has_penalties else None)
    width = bucket(max((len(b) for b in bans if b), default=0), MIN_BANNED)
    live = [pr for pr in pens if pr is not None and (len(pr.ids) or pr.pending)]
    pen_width = bucket(max(len(pr.ids) for pr in live), MIN_PENALTY) if live else 0
    return make_sampling_tensors(params, counters, bans, seeds=seeds, banned_width=width,
                                 penalty_rows=pens, penalty_width=pen_width)
