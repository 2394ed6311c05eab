"""On-device sampling (uses JAX): penalties, logit bias, greedy, temperature,
top-k, top-p, min-p.

``sample`` is a pure, jit-friendly function of ``[N, V]`` logits and a
``SamplingTensors`` of per-row parameters; it has no Python control flow on
traced values and can be called inside the engine's jitted step.

Per row, in float32:

0. Penalties and logit bias, in vLLM v1's order, on the row's sparse list of
   tokens (``st.pen_*``; built on the host by ``penalties.py``): logit +=
   bias; then the repetition penalty on tokens of the prompt or the output
   (logit / p where logit > 0, else logit * p: transformers' and vLLM's
   rule); then logit -= frequency * (count in the output) and
   -= presence * (count > 0). The W listed logits are gathered, transformed
   and scattered back, so the cost is O(N * W), not O(N * V). A batch
   without any (``st.pen_ids`` None) compiles none of it.
1. Banned tokens (``st.banned``, -1 = padding) get -inf.
2. Greedy rows (``temperature < 1e-5``) take the argmax of the masked logits.
3. Other rows: logits / temperature; keep the top ``top_k`` (if > 0); then
   top-p on the renormalized remaining distribution (the smallest prefix of
   the descending order whose mass >= top_p; always at least one token); then
   min-p (keep tokens with prob >= min_p * max prob); then draw by Gumbel-max
   with the key ``fold_in(fold_in(key(base_key_seed), seed), counter)``, so a
   request's draws depend only on (seed, counter): not on its row, nor on the
   other rows of the batch.

Filters are applied as thresholds on the logit values, so tokens tied with
the last kept token are kept too (as in vLLM). No sort: the top-k and top-p
thresholds are found exactly by a 32-step bisection over the order-preserving
uint32 keys of the float32 values (each step one masked count / sum over
[N, V]), which on CPU is ~10x cheaper than sorting the vocabulary. The top-k
and top-p stages, and the random draw, are skipped at run time (``lax.cond``)
when no row of the batch needs them.

Reported logprobs are those of the RAW model distribution (log-softmax of the
unmodified logits, before penalties, logit bias, banning and temperature), as
vLLM reports by default (logprobs_mode "raw_logprobs"); ``ranks`` are
1-based (the number of tokens with logprob >= the chosen token's).
"""
from __future__ import annotations

from collections.abc import Mapping  # not typing.Mapping: its isinstance is ~10x slower
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distkv_jax.penalties import PenaltyRow
from distkv_jax.sampling_params import GREEDY_EPS

__all__ = ["SamplingTensors", "SampleResult", "make_sampling_tensors", "sample", "report_logprobs"]


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _get(p: Any, name: str, default):
    if isinstance(p, Mapping):
        return p.get(name, default)
    return getattr(p, name, default)


class SamplingTensors(NamedTuple):
    """Per-row sampling parameters for N rows (numpy on the host, jax inside jit)."""
    temperature: Any  # f32 [N]; < 1e-5 means greedy
    top_k: Any        # i32 [N]; 0 = off
    top_p: Any        # f32 [N]; 1 = off
    min_p: Any        # f32 [N]; 0 = off
    seed: Any         # u32 [N]
    counter: Any      # i32 [N]; index of the token being generated in its request
    banned: Any       # i32 [N, B]; token ids forced to -inf, -1 = padding
    # Penalties and logit bias: W entries per row (W a static width), or all
    # None when no row of the batch has any (the step compiles without them).
    pen_ids: Any = None      # i32 [N, W]; unique token ids per row, -1 = padding
    pen_count: Any = None    # i32 [N, W]; occurrences in the output so far
    pen_in_seq: Any = None   # bool [N, W]; in the prompt or the output
    pen_bias: Any = None     # f32 [N, W]; logit bias
    pen_pending: Any = None  # bool [N]; the row's input token (``last_tokens``) is an
    #                          output token not counted in pen_count (overlapped steps)
    presence: Any = None     # f32 [N]
    frequency: Any = None    # f32 [N]
    repetition: Any = None   # f32 [N]; 1 = off

    @classmethod
    def from_rows(cls, rows, counters, banned_lists=None, num_rows_padded=None,
                  *, seeds=None, banned_width=None, penalty_rows=None,
                  penalty_width=None) -> "SamplingTensors":
        return make_sampling_tensors(rows, counters, banned_lists, num_rows_padded,
                                     seeds=seeds, banned_width=banned_width,
                                     penalty_rows=penalty_rows, penalty_width=penalty_width)


class SampleResult(NamedTuple):
    tokens: Any        # i32 [N]
    logprobs: Any      # f32 [N]: chosen token's raw log-softmax
    top_ids: Any       # i32 [N, num_top]: raw top tokens, descending logprob
    top_logprobs: Any  # f32 [N, num_top]
    ranks: Any         # i32 [N]: 1-based rank of the chosen token (raw distribution)


def make_sampling_tensors(
    params_list: Sequence[Any],
    counters: Sequence[int],
    banned_lists: Optional[Sequence[Optional[Sequence[int]]]] = None,
    num_rows_padded: Optional[int] = None,
    *,
    seeds: Optional[Sequence[Optional[int]]] = None,
    banned_width: Optional[int] = None,
    penalty_rows: Optional[Sequence[Optional[PenaltyRow]]] = None,
    penalty_width: Optional[int] = None,
) -> SamplingTensors:
    """Build numpy ``SamplingTensors`` for ``len(params_list)`` rows.

    ``params_list``: ``SamplingParams`` or dicts with keys ``temperature``,
    ``top_k``, ``top_p``, ``min_p``, ``seed`` (missing keys take the
    disabled / default values; temperature defaults to 1). ``counters[i]``:
    index of the token row i generates within its request. ``banned_lists[i]``:
    token ids row i must not draw (or None). ``seeds`` overrides the params'
    seeds (the engine passes its assigned seeds here); a seed that is None in
    both becomes 0. Seeds are reduced mod 2**32.

    ``penalty_rows[i]``: row i's ``penalties.PenaltyRow`` (or None: no
    penalties). The penalty width W is ``penalty_width`` or the longest row
    rounded up to a power of two; W = 0 (the default when no row has an
    entry or a pending token) leaves the ``pen_*`` fields None.

    Rows are padded to ``num_rows_padded`` (default: no padding) with greedy
    rows; the banned width is ``banned_width`` or the longest list rounded up
    to a power of two (at least 1), padded with -1.
    """
    n = len(params_list)
    if len(counters) != n:
        raise ValueError(f"counters has {len(counters)} entries for {n} rows")
    if banned_lists is not None and len(banned_lists) != n:
        raise ValueError(f"banned_lists has {len(banned_lists)} entries for {n} rows")
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"seeds has {len(seeds)} entries for {n} rows")
    if penalty_rows is not None and len(penalty_rows) != n:
        raise ValueError(f"penalty_rows has {len(penalty_rows)} entries for {n} rows")
    rows = n if num_rows_padded is None else int(num_rows_padded)
    if rows < n:
        raise ValueError(f"num_rows_padded={rows} < {n} rows")
    max_banned = 0 if banned_lists is None else max(
        (len(b) for b in banned_lists if b is not None), default=0)
    width = _next_pow2(max(1, max_banned)) if banned_width is None else int(banned_width)
    if width < max_banned or width < 1:
        raise ValueError(f"banned_width={width} cannot hold {max_banned} banned ids")

    temperature = np.zeros(rows, np.float32)
    top_k = np.zeros(rows, np.int32)
    top_p = np.ones(rows, np.float32)
    min_p = np.zeros(rows, np.float32)
    seed = np.zeros(rows, np.uint32)
    counter = np.zeros(rows, np.int32)
    banned = np.full((rows, width), -1, np.int32)
    for i, p in enumerate(params_list):
        t = float(_get(p, "temperature", 1.0))
        temperature[i] = 0.0 if t < GREEDY_EPS else t
        k = int(_get(p, "top_k", 0))
        top_k[i] = 0 if k < 0 else k
        top_p[i] = float(_get(p, "top_p", 1.0))
        min_p[i] = float(_get(p, "min_p", 0.0))
        s = seeds[i] if seeds is not None and seeds[i] is not None else _get(p, "seed", None)
        seed[i] = 0 if s is None else int(s) % (1 << 32)
        counter[i] = int(counters[i])
        if banned_lists is not None and banned_lists[i]:
            b = list(banned_lists[i])
            banned[i, :len(b)] = b
    return SamplingTensors(temperature, top_k, top_p, min_p, seed, counter, banned,
                           *_penalty_arrays(penalty_rows, rows, penalty_width))


def _penalty_arrays(penalty_rows, rows: int, width: Optional[int]) -> tuple:
    """The eight ``pen_*`` / penalty fields for ``rows`` rows (all None at W = 0)."""
    live = [(i, r) for i, r in enumerate(penalty_rows or ()) if r is not None]
    longest = max((len(r.ids) for _, r in live), default=0)
    needed = any(len(r.ids) or r.pending for _, r in live)
    if width is None:
        width = _next_pow2(longest) if needed else 0
    width = int(width)
    if width < longest or (needed and width < 1):
        raise ValueError(f"penalty_width={width} cannot hold {longest} penalty entries")
    if width == 0:
        return (None,) * 8
    ids = np.full((rows, width), -1, np.int32)
    count = np.zeros((rows, width), np.int32)
    in_seq = np.zeros((rows, width), np.bool_)
    bias = np.zeros((rows, width), np.float32)
    pending = np.zeros(rows, np.bool_)
    presence = np.zeros(rows, np.float32)
    frequency = np.zeros(rows, np.float32)
    repetition = np.ones(rows, np.float32)
    for i, r in live:
        k = len(r.ids)
        ids[i, :k], count[i, :k], in_seq[i, :k], bias[i, :k] = r.ids, r.count, r.in_seq, r.bias
        pending[i] = r.pending
        presence[i], frequency[i], repetition[i] = r.presence, r.frequency, r.repetition
    return ids, count, in_seq, bias, pending, presence, frequency, repetition


def _order_key(x):
    """uint32 keys ordered like the float32 values x (-inf < finite < +inf)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where((i >> 31) == 1, ~i, i | jnp.uint32(0x80000000))


def _bisect_largest(lo, hi, pred):
    """Per row, the largest t in [lo, hi) with pred(t), for pred nonincreasing
    in t, pred(lo) true and pred(hi) false. 32 steps cover any uint32 range."""
    def body(_, c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        ok = pred(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def _row_gumbel(base_key, seed, counter, vocab: int):
    key = jax.random.fold_in(jax.random.fold_in(base_key, seed), counter)
    return jax.random.gumbel(key, (vocab,), jnp.float32)


def _argmax(x):
    """argmax over the last axis (first index of the maximum), as two plain
    reductions: XLA:CPU runs them ~3x faster than its (value, index) reduce.
    The index reduction is over float32 (exact below 2^24): XLA:CPU's int32
    min over [16, 32000] was measured ~3x slower than the float32 one."""
    v = x.shape[-1]
    assert v < 1 << 24, "float32 indices are exact below 2^24"
    m = jnp.max(x, axis=-1, keepdims=True)
    idx = jax.lax.broadcasted_iota(jnp.float32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == m, idx, jnp.float32(v)), axis=-1)
    return first.astype(jnp.int32).clip(0, v - 1)


def _apply_penalties(logits, st: SamplingTensors, last_tokens):
    """Step 0 of the module docstring on [N, V] float32 logits."""
    n, vocab = logits.shape
    ids = jnp.asarray(st.pen_ids, jnp.int32)
    count = jnp.asarray(st.pen_count, jnp.int32)
    in_seq = jnp.asarray(st.pen_in_seq, jnp.bool_)
    bias = jnp.asarray(st.pen_bias, jnp.float32)
    if last_tokens is not None:
        # The pending output token (overlapped steps: known on the device
        # only) counts once more: in its entry when the row lists it, else in
        # one extra column.
        pend = jnp.where(jnp.asarray(st.pen_pending, jnp.bool_),
                         jnp.asarray(last_tokens, jnp.int32), -1)
        live = pend >= 0
        match = (ids == pend[:, None]) & live[:, None]
        count = count + match.astype(jnp.int32)
        in_seq = in_seq | match
        extra = jnp.where(live & ~jnp.any(match, axis=-1), pend, -1)[:, None]
        ids = jnp.concatenate([ids, extra], axis=1)
        count = jnp.concatenate([count, (extra >= 0).astype(jnp.int32)], axis=1)
        in_seq = jnp.concatenate([in_seq, extra >= 0], axis=1)
        bias = jnp.concatenate([bias, jnp.zeros((n, 1), jnp.float32)], axis=1)
    x = jnp.take_along_axis(logits, jnp.maximum(ids, 0), axis=1) + bias
    rep = jnp.asarray(st.repetition, jnp.float32)[:, None]
    x = jnp.where(in_seq, jnp.where(x > 0, x / rep, x * rep), x)
    cnt = count.astype(jnp.float32)
    x = (x - jnp.asarray(st.frequency, jnp.float32)[:, None] * cnt
         - jnp.asarray(st.presence, jnp.float32)[:, None] * (cnt > 0))
    # ids are unique within a row, so the scatter is deterministic; -1 -> V is dropped.
    return logits.at[jnp.arange(n)[:, None], jnp.where(ids >= 0, ids, vocab)].set(
        x, mode="drop")


def sample(logits, st: SamplingTensors, num_top: int, base_key_seed=0,
           with_logprobs: bool = True, last_tokens=None) -> SampleResult:
    """Sample one token per row of ``logits`` [N, V] (see module docstring).

    ``num_top`` is static (a Python int >= 0): the number of raw top logprobs
    returned per row. ``base_key_seed`` may be a Python int or a traced int.
    ``with_logprobs=False`` (static) skips the raw log-softmax: logprobs and
    ranks come back as zeros (for batches where no row reports them).
    ``last_tokens`` (i32 [N] or None): each row's input token; rows with
    ``st.pen_pending`` count it as one more output token (None: no row does).
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    n, vocab = logits.shape
    neg_inf = jnp.float32(-jnp.inf)

    # 0. Penalties and logit bias (static: only batches that have them).
    penalized = logits
    if st.pen_ids is not None and st.pen_ids.shape[1] > 0:
        penalized = _apply_penalties(logits, st, last_tokens)

    # 1. Banned tokens -> -inf (-1 padding is dropped by the scatter): written
    #    into the logits directly (no [N, V] mask to build and select with).
    banned = jnp.asarray(st.banned, jnp.int32)
    ban_idx = jnp.where(banned >= 0, banned, vocab)
    masked = penalized.at[jnp.arange(n)[:, None], ban_idx].set(neg_inf, mode="drop")

    # 2. Greedy.
    temperature = jnp.asarray(st.temperature, jnp.float32)
    greedy = temperature < GREEDY_EPS
    greedy_tokens = _argmax(masked)

    # Steps 3-6 run only when some row samples (all-greedy batches skip them).
    def draw():
        # 3. Temperature.
        scaled = masked / jnp.where(greedy, 1.0, temperature)[:, None]

        # 4. top-k then top-p, each as one threshold per row, found by bisection
        #    over the float32 values' order-preserving uint32 keys (32 masked
        #    reductions over [N, V]: exact, and ~10x cheaper than a sort on CPU).
        #    Each stage runs only when some row uses it.
        top_k = jnp.asarray(st.top_k, jnp.int32)
        top_p = jnp.asarray(st.top_p, jnp.float32)
        k_on = (top_k > 0) & (top_k < vocab)
        p_off = top_p >= 1.0
        u = _order_key(scaled)
        u_min = jnp.min(u, axis=-1)
        u_max = jnp.max(u, axis=-1)

        def top_k_key():
            # Largest t with #{u >= t} >= k (rows without top-k: k = V -> u_min).
            k_eff = jnp.where(k_on, top_k, vocab)
            return _bisect_largest(
                u_min, u_max + 1, lambda t: jnp.sum(u >= t[:, None], axis=-1) >= k_eff)

        t_k = jax.lax.cond(jnp.any(k_on), top_k_key, lambda: u_min)

        def top_p_key():
            # Largest t >= t_k with mass{u >= t} >= top_p * mass{u >= t_k}: the
            # smallest descending prefix of the top-k set holding top_p of its mass.
            w = jnp.where(u >= t_k[:, None],
                          jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True)), 0.0)
            target = top_p * jnp.sum(w, axis=-1)
            t_p = _bisect_largest(
                t_k, u_max + 1,
                lambda t: jnp.sum(jnp.where(u >= t[:, None], w, 0.0), axis=-1) >= target)
            return jnp.where(p_off, t_k, t_p)

        t_kp = jax.lax.cond(jnp.any(~p_off), top_p_key, lambda: t_k)
        filtered = jnp.where(u >= t_kp[:, None], scaled, neg_inf)

        # 5. min-p: prob >= min_p * max prob  <=>  logit >= max logit + log(min_p).
        min_p = jnp.asarray(st.min_p, jnp.float32)
        row_max = jnp.max(filtered, axis=-1, keepdims=True)
        filtered = jnp.where(filtered >= row_max + jnp.log(min_p)[:, None], filtered, neg_inf)

        # 6. Gumbel-max draw, keyed by (seed, counter) only.
        base_key = jax.random.key(base_key_seed)
        seed = jnp.asarray(st.seed).astype(jnp.uint32)
        counter = jnp.asarray(st.counter).astype(jnp.uint32)
        gumbel = jax.vmap(_row_gumbel, in_axes=(None, 0, 0, None))(
            base_key, seed, counter, vocab)
        return _argmax(filtered + gumbel)

    drawn = jax.lax.cond(jnp.all(greedy), lambda: greedy_tokens, draw)

    tokens = jnp.where(greedy, greedy_tokens, drawn)

    if not with_logprobs:
        zeros = jnp.zeros((n,), jnp.float32)
        return SampleResult(tokens, zeros, jnp.zeros((n, 0), jnp.int32),
                            jnp.zeros((n, 0), jnp.float32), zeros.astype(jnp.int32))
    return report_logprobs(jax.nn.log_softmax(logits, axis=-1), tokens, num_top)


def report_logprobs(raw_logp: jax.Array, tokens: jax.Array, num_top: int) -> SampleResult:
    """The reported values for chosen `tokens` from the raw log-softmax: the
    chosen token's logprob, its 1-based rank, and the `num_top` most likely
    tokens (static)."""
    n = raw_logp.shape[0]
    chosen_lp = jnp.take_along_axis(raw_logp, tokens[:, None], axis=-1)[:, 0]
    ranks = jnp.sum(raw_logp >= chosen_lp[:, None], axis=-1).astype(jnp.int32)
    if num_top > 0:
        top_logprobs, top_ids = jax.lax.top_k(raw_logp, num_top)
        top_ids = top_ids.astype(jnp.int32)
    else:
        top_logprobs = jnp.zeros((n, 0), jnp.float32)
        top_ids = jnp.zeros((n, 0), jnp.int32)
    return SampleResult(tokens, chosen_lp, top_ids, top_logprobs, ranks)
