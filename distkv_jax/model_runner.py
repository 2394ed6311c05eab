"""The model runner: KV pools, the jitted step, KV copies and the step's
sampling inputs (uses JAX).

    runner.copy_kv(step_kv_plan)                 migrations, swap out, swap in
    runner.dispatch(plan, rows, prev) -> result  one step, asynchronously
    runner.warm_start()                          compile the step programs up front

The step is one program per bucket shape: (rows per instance, tiles, query
tile, work-list runs, run length, logits rows, with or without logprobs).
`compiled_programs()` counts them; `step_shapes()` lists the ones the
configuration can use for warm start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .attention_plan import MASKED, bucket
from .dist_attention import DistMeta
from .engine_args import EngineArgs
from .kernels.micro_attention import resolve_impl
from .kv_copy import KVCopier
from .kv_pool import PagedKVCache, PoolLayout, create_kv_pool
from .kv_types import StepKVPlan
from .models.config import ModelConfig
from .models.llama import unstack_layers
from .models.loader import resolve_dtype
from .paged_model import paged_forward_fn, pool_layout
from .request import Request
from .sampling import SamplingTensors, make_sampling_tensors, sample
from .scheduler import LogitsRow, StepPlan

log = logging.getLogger("distkv_jax")

MIN_BANNED = 8  # banned-token columns (more only when a request bans more)
# Query rows per attention tile in steps with prefill chunks. The native
# kernel's prefill path puts 16 rows of one KV head in a vector (q_tile x
# query heads per KV head); the jnp and Pallas kernels compute q_tile x block
# scores per item, so a smaller tile wastes less above the causal diagonal.
PREFILL_Q_TILE = {"native": 16}
DEFAULT_PREFILL_Q_TILE = 8
_GREEDY_ROW = {"temperature": 0.0}


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The static shape of one step program."""

    rows: int        # T: rows per instance
    tiles: int       # query tiles
    q_tile: int
    runs: int        # R: work-list runs per instance
    run: int         # items per run
    logits: int      # S: logits rows per instance
    num_top: int | None  # top logprobs (None: the step reports none)


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


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params, mesh: Mesh, args: EngineArgs):
        self.args, self.cfg, self.mesh = args, cfg, mesh
        # the MicroAttention implementation the step uses ("auto" resolved once)
        self.attention_impl = resolve_impl(args.attention_impl)
        self.prefill_q_tile = PREFILL_Q_TILE.get(self.attention_impl, DEFAULT_PREFILL_Q_TILE)
        if not args.scan_layers:  # the stacked arrays are dropped: no second copy
            params = unstack_layers(params, cfg.num_layers)
        self.params = params
        self.dtype = resolve_dtype(args.dtype)
        nb = args.kv_blocks
        if nb is None:
            nb = kv_blocks_from_memory(pool_layout(cfg, mesh, 1, args.block_size), self.dtype,
                                       cfg, args.max_num_seqs, args.kv_memory_fraction)
            if jax.process_count() > 1:  # every process must build the same pool and plans
                from jax.experimental import multihost_utils

                nb = int(np.min(multihost_utils.process_allgather(np.asarray([nb], np.int64))))
        self.layout = pool_layout(cfg, mesh, nb, args.block_size)
        self.pools = create_kv_pool(mesh, self.layout, self.dtype)
        self.host_pools = None
        if args.host_kv_blocks > 0:
            host_layout = dataclasses.replace(self.layout, blocks_per_instance=args.host_kv_blocks)
            sh = NamedSharding(mesh, host_layout.spec, memory_kind="pinned_host")
            zeros = jax.jit(lambda: jnp.zeros(host_layout.shape, self.dtype), out_shardings=sh)
            self.host_pools = PagedKVCache(zeros(), zeros())
        self.copier = KVCopier(mesh)
        self._step = self._make_step()
        self._feed_tokens = jax.jit(
            lambda tokens, src, prev: jnp.where(src >= 0, prev[jnp.maximum(src, 0)], tokens))

    # ------------------------------------------------------------ device step
    def _make_step(self):
        forward = paged_forward_fn(self.cfg, self.mesh, self.layout, self.dtype, self.attention_impl,
                                   scan_layers=self.args.scan_layers)
        base_seed = self.args.seed

        def step(params, pools, tokens, positions, meta, logits_index, targets, st, num_top):
            logits, pools = forward(params, tokens, positions, pools, meta, logits_index)
            logits = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)
            res = sample(logits, st, num_top or 0, base_seed, with_logprobs=num_top is not None)
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

    # --------------------------------------------------------------- copies
    def copy_kv(self, kvp: StepKVPlan) -> None:
        """The control plane's block copies, in their documented order."""
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
        tokens = plan.tokens
        if plan.token_src is not None:  # pending tokens: taken from the step in flight
            tokens = self._feed_tokens(tokens, plan.token_src, prev_result[0].tokens)
        st = sampling_tensors(plan.logits_rows, eos_ids)
        self.pools, *result = self._step(
            self.params, self.pools, tokens, plan.positions, DistMeta.from_plan(plan.attention),
            plan.logits_index, plan.targets, st, self._num_top(plan.logits_rows))
        return result

    def _num_top(self, rows: Sequence[LogitsRow | None]) -> int | None:
        for row in rows:
            if row is not None:
                p = row.request.params
                if (p.prompt_logprobs if row.target >= 0 else p.logprobs) is not None:
                    return self.args.max_logprobs
        return None

    # ------------------------------------------------------------ warm start
    def step_shapes(self, max_model_len: int, run_choices: Sequence[int],
                    min_rows: int) -> list[StepShape]:
        """The step programs the engine compiles before it is ready.

        Rows T: every bucket up to max_num_batched_tokens. Decode steps
        (query tile 1): one tile per row and one logits row per row, so tiles
        and logits rows follow from T. Steps with prefill chunks: tiles from
        one chunk's (T / q_tile) up to one per row, logits rows 8 (the common
        case: a few chunks end in the step). Runs R: every bucket up to what
        the instance's blocks, or the rows' contexts at max_model_len, can
        fill. Each with and without logprobs. Shapes outside this set (more
        logits rows in a prefill step, more than 8 banned tokens) compile on
        first use (from the persistent compilation cache after a restart).
        """
        I, nb, bs = self.layout.num_instances, self.layout.blocks_per_instance, self.layout.block_size
        ctx_blocks = -(-max_model_len // bs)
        t_max = bucket(self.args.max_num_batched_tokens, min_rows)
        shapes = []
        T = bucket(1, min_rows)
        while T <= t_max:
            lo_rows = 1 if T == min_rows else I * T // 2 + 1  # total rows of a step with this T
            for q_tile in (1, self.prefill_q_tile):
                if q_tile == 1:
                    tile_set = _buckets(bucket(lo_rows, 8), bucket(I * T, 8))
                    logits = T
                else:  # one chunk's tiles, or twice that (a few chunks, some decodes)
                    lo = bucket(-(-lo_rows // q_tile), 8)
                    tile_set = [t for t in (lo, 2 * lo) if t <= bucket(I * T, 8)]
                    logits = min_rows
                for tiles in tile_set:
                    for run in run_choices:
                        # per instance: its blocks, and each tile's context, in runs
                        reach = min(nb // run + tiles, tiles * -(-ctx_blocks // run))
                        for R in _buckets(8, bucket(reach, 8)):
                            shapes.append(StepShape(T, tiles, q_tile, R, run, logits, None))
            T *= 2
        return shapes

    def warm_start(self, shapes: Sequence[StepShape], progress: bool = True) -> tuple[int, float]:
        """Compile (by running an all-padding step: it writes no KV) every
        shape; returns (programs compiled, seconds)."""
        t0 = time.perf_counter()
        before = self._step._cache_size()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(shapes), desc="[distkv] compiling step programs", unit="prog",
                       mininterval=1.0, dynamic_ncols=True)
        out = None
        for shape in shapes:
            out = self._run_padding_step(shape)
            if bar is not None:
                bar.update(1)
        if out is not None:
            jax.block_until_ready(out)
        if bar is not None:
            bar.close()
        return self._step._cache_size() - before, time.perf_counter() - t0

    def _run_padding_step(self, s: StepShape):
        I = self.layout.num_instances
        n = I * s.logits
        meta = DistMeta(
            slots=np.full(I * s.rows, -1, np.int32), positions=np.full(I * s.rows, -1, np.int32),
            tile_rows=np.full((s.tiles, s.q_tile), -1, np.int32),
            item_tile=np.full((I, s.runs, s.run), s.tiles, np.int32),
            item_block=np.zeros((I, s.runs, s.run), np.int32),
            item_kstart=np.full((I, s.runs, s.run), MASKED, np.int32))
        st = make_sampling_tensors([_GREEDY_ROW] * n, [0] * n, [None] * n, seeds=[0] * n,
                                   banned_width=MIN_BANNED)
        zeros = np.zeros((I, s.rows), np.int32)
        self.pools, *result = self._step(
            self.params, self.pools, zeros, zeros, meta, np.zeros((I, s.logits), np.int32),
            np.full(n, -1, np.int32), st, s.num_top)
        return result


def _buckets(lo: int, hi: int) -> list[int]:
    """Powers of two from bucket(lo) to hi."""
    out, b = [], bucket(lo, 1)
    while b <= hi:
        out.append(b)
        b *= 2
    return out


def sampling_tensors(rows: Sequence[LogitsRow | None], eos_ids: set[int]) -> SamplingTensors:
    """Per-row sampling inputs of a step. Padding and prompt-logprob rows are
    greedy and unused. A request's counter counts its pending token; EOS and
    stop ids are banned until min_tokens is reached."""
    params, counters, seeds, bans = [], [], [], []
    for row in rows:
        if row is None or row.target >= 0:
            params.append(_GREEDY_ROW)
            counters.append(0)
            seeds.append(0)
            bans.append(None)
            continue
        r: Request = row.request
        p = r.params
        params.append(p)
        generated = r.num_output_tokens + r.pending
        counters.append(generated)
        seeds.append(r.seed)
        bans.append(sorted(set(p.stop_token_ids or ()) | (set() if p.ignore_eos else eos_ids))
                    if generated < p.min_tokens else None)
    width = bucket(max((len(b) for b in bans if b), default=0), MIN_BANNED)
    return make_sampling_tensors(params, counters, bans, seeds=seeds, banned_width=width)
