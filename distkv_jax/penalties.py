"""Penalties and logit bias, the host half (plain Python + numpy, no JAX).

A request's penalties touch few tokens, so each sampling row carries a
sparse list of (token id, output count, in prompt-or-output, bias) entries;
``sampling.sample`` gathers those logits on the device, transforms them and
scatters them back. The list holds only what the request's settings need:

- the unique prompt tokens when ``repetition_penalty != 1`` (computed once per
  request and cached);
- the output tokens with their counts when any penalty is on (counted
  incrementally: each step adds only the tokens appended since the last);
- the ``logit_bias`` tokens.

Overlapped steps: the token sampled by the step in flight is not in
``req.tokens`` yet, but it is the input token of the row that samples next.
The row says so (``pending``) and the device counts that token once more, so
the penalties see every output token, as vLLM's async scheduling does (it
fills its placeholder from the previous step's sampled ids before sampling).
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = ["PenaltyRow", "penalty_row", "request_row", "has_penalties"]


class PenaltyRow(NamedTuple):
    """One sampling row's penalties: k entries with unique token ids."""

    ids: np.ndarray      # int32 [k], unique token ids
    count: np.ndarray    # int32 [k], occurrences in the output so far
    in_seq: np.ndarray   # bool [k], in the prompt or the output (repetition penalty)
    bias: np.ndarray     # float32 [k], logit bias (0 where none)
    pending: bool        # the row's input token is an output token not counted here
    presence: float
    frequency: float
    repetition: float


def _get(p: Any, name: str, default):
    return p.get(name, default) if isinstance(p, dict) else getattr(p, name, default)


def has_penalties(params) -> bool:
    """Some penalty or logit bias changes the logits (SamplingParams or dict)."""
    return (_get(params, "presence_penalty", 0.0) != 0.0
            or _get(params, "frequency_penalty", 0.0) != 0.0
            or _get(params, "repetition_penalty", 1.0) != 1.0
            or bool(_get(params, "logit_bias", None)))


def _bias_arrays(params) -> tuple[np.ndarray, np.ndarray]:
    bias = _get(params, "logit_bias", None) or {}
    ids = np.fromiter((int(k) for k in bias), np.int64, len(bias))
    vals = np.fromiter((float(v) for v in bias.values()), np.float32, len(bias))
    return ids, vals


def _assemble(params, prompt_unique: np.ndarray, out_ids: np.ndarray, out_counts: np.ndarray,
              bias_ids: np.ndarray, bias_vals: np.ndarray, pending: bool) -> PenaltyRow:
    presence = float(_get(params, "presence_penalty", 0.0))
    frequency = float(_get(params, "frequency_penalty", 0.0))
    repetition = float(_get(params, "repetition_penalty", 1.0))
    rep_on = repetition != 1.0
    out_on = rep_on or presence != 0.0 or frequency != 0.0
    parts = [bias_ids]
    if out_on:
        parts.append(out_ids)
    if rep_on:
        parts.append(prompt_unique)
    ids = np.unique(np.concatenate(parts))
    count = np.zeros(len(ids), np.int32)
    in_seq = np.zeros(len(ids), np.bool_)
    bias = np.zeros(len(ids), np.float32)
    if out_on and len(out_ids):
        at = np.searchsorted(ids, out_ids)
        count[at] = out_counts
        in_seq[at] = True
    if rep_on and len(prompt_unique):
        in_seq[np.searchsorted(ids, prompt_unique)] = True
    if len(bias_ids):
        bias[np.searchsorted(ids, bias_ids)] = bias_vals
    # The pending token only matters when output tokens are penalized.
    return PenaltyRow(ids.astype(np.int32), count, in_seq, bias, bool(pending and out_on),
                      presence, frequency, repetition)


def penalty_row(params, prompt_ids: Sequence[int], output_ids: Sequence[int],
                pending: bool = False) -> PenaltyRow | None:
    """The row for a request with these settings and tokens, built from
    scratch (no cache); None when the settings change nothing."""
    if not has_penalties(params):
        return None
    out_ids, out_counts = np.unique(np.asarray(output_ids, np.int64), return_counts=True)
    return _assemble(params, np.unique(np.asarray(prompt_ids, np.int64)), out_ids, out_counts,
                     *_bias_arrays(params), pending)


class _State:
    """What a request's rows reuse from step to step."""

    __slots__ = ("prompt_unique", "bias_ids", "bias_vals", "counts", "counted")

    def __init__(self, req):
        p = req.params
        self.prompt_unique = (np.unique(np.asarray(req.prompt_token_ids, np.int64))
                              if p.repetition_penalty != 1.0 else np.zeros(0, np.int64))
        self.bias_ids, self.bias_vals = _bias_arrays(p)
        self.counts: dict[int, int] = {}
        self.counted = 0  # output tokens already in `counts`


# Keyed by the request record itself (compared by identity): the state goes
# with the record, so nothing needs evicting when a request ends.
_STATES: "weakref.WeakKeyDictionary[Any, _State]" = weakref.WeakKeyDictionary()


def request_row(req, pending: bool = False) -> PenaltyRow | None:
    """The row for a live request (`Request`): its prompt's unique tokens are
    computed once, its output counts updated with the tokens appended since
    the last call. `pending`: the row's input token is the token sampled by
    the step in flight (not in `req.tokens` yet); the device counts it."""
    p = req.params
    if not has_penalties(p):
        return None
    st = _STATES.get(req)
    if st is None:
        st = _STATES[req] = _State(req)
    start = req.prompt_len + st.counted
    if start > len(req.tokens):  # the stream got shorter (not expected): count afresh
        st.counts.clear()
        st.counted, start = 0, req.prompt_len
    counts = st.counts
    for t in req.tokens[start:]:
        counts[t] = counts.get(t, 0) + 1
    st.counted = len(req.tokens) - req.prompt_len
    out_ids = np.fromiter(counts.keys(), np.int64, len(counts))
    out_counts = np.fromiter(counts.values(), np.int32, len(counts))
    return _assemble(p, st.prompt_unique, out_ids, out_counts, st.bias_ids, st.bias_vals, pending)
