"""Per-request sampling parameters, shaped like vLLM's ``SamplingParams``.

Plain Python (no JAX): the scheduler and the API build and validate these on
the host. Validation happens on construction; every error is a ``ValueError``
whose message names the field and the offending value.

Meanings follow vLLM:

- ``n``: the number of sequences generated for the prompt (an int >= 1).
- ``temperature``: 0 (anything below ``_GREEDY_EPS`` = 1e-5) means greedy.
- ``top_k``: 0 or -1 disable (-1 is normalized to 0).
- ``top_p``: in (0, 1]; 1 disables.
- ``min_p``: in [0, 1]; 0 disables. Keeps tokens whose probability is at least
  ``min_p`` times the most likely token's (after temperature).
- ``seed``: per-request seed; ``None`` lets the engine assign one.
- ``max_tokens``: >= 1, or ``None`` (generate until the context / capacity
  limit, as in vLLM).
- ``min_tokens``: EOS and ``stop_token_ids`` cannot be generated before this
  many tokens.
- ``stop``: strings that end generation (checked on the detokenized text; not
  included in the output unless ``include_stop_str_in_output``). Normalized to
  a tuple.
- ``stop_token_ids``: token ids that end generation. Normalized to a tuple.
- ``ignore_eos``: keep generating after EOS.
- ``logprobs`` / ``prompt_logprobs``: number of top logprobs to return per
  generated / prompt position (the chosen token is always included), or
  ``None`` for none.
- ``presence_penalty`` / ``frequency_penalty``: in [-2, 2] (vLLM's and
  OpenAI's range); subtracted from the logit of every token that appears in
  the output so far, once / once per occurrence. 0 disables.
- ``repetition_penalty``: in (0, 2]; 1 disables. Tokens of the prompt or the
  output so far get logit / p where the logit is > 0, logit * p otherwise
  (transformers' and vLLM's rule). vLLM only asks for > 0; the upper bound 2
  is this engine's (larger values are never useful and keep the float32
  arithmetic far from overflow).
- ``logit_bias``: {token id: bias} added to those tokens' logits, bias in
  [-100, 100] (OpenAI's range; vLLM clamps to it, this engine refuses values
  outside it). Keys may be ints or strings of ints (as OpenAI's JSON sends
  them); they are normalized to ints, an empty mapping to ``None``. Token ids
  are checked against the vocabulary when the engine takes the request.

Order on the device (vLLM v1's): logit bias, then the repetition penalty,
then frequency and presence penalties, then banned tokens and temperature.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

__all__ = ["SamplingParams", "GREEDY_EPS"]

# vLLM treats temperatures below this as greedy.
GREEDY_EPS = 1e-5


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _bad(field: str, value, why: str) -> ValueError:
    return ValueError(f"SamplingParams.{field}={value!r}: {why}")


_INT_STR = re.compile(r"\s*-?[0-9]+\s*")  # not int()'s "1_0" or non-ASCII digits


def _logit_bias(bias) -> Optional[Dict[int, float]]:
    """logit_bias normalized to {int token id: float bias}, or None when empty."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise _bad("logit_bias", bias, "must be a dict of token id -> bias, or None")
    out: Dict[int, float] = {}
    for k, v in bias.items():
        if _is_int(k):
            tid = int(k)
        elif isinstance(k, str) and _INT_STR.fullmatch(k):  # OpenAI's JSON keys are strings
            tid = int(k)
        else:
            raise _bad("logit_bias", bias,
                       f"keys must be token ids (ints or strings of ints), got {k!r}")
        if tid < 0:
            raise _bad("logit_bias", bias, f"token ids must be >= 0, got {tid}")
        if tid in out:
            raise _bad("logit_bias", bias, f"token id {tid} appears more than once")
        if not _is_real(v):
            raise _bad("logit_bias", bias,
                       f"bias of token {tid} must be a number, got {type(v).__name__}")
        if not -100.0 <= v <= 100.0:  # also refuses nan
            raise _bad("logit_bias", bias, f"bias of token {tid} must be in [-100, 100], got {v!r}")
        out[tid] = float(v)
    return out or None


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Union[None, str, Sequence[str], Tuple[str, ...]] = None
    stop_token_ids: Union[None, Sequence[int], Tuple[int, ...]] = None
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[Dict[int, float]] = None

    def __post_init__(self):
        # n
        if not _is_int(self.n):
            raise _bad("n", self.n, f"must be an int, got {type(self.n).__name__}")
        if self.n < 1:
            raise _bad("n", self.n, "must be >= 1")
        self.n = int(self.n)

        # float fields
        for name in ("temperature", "top_p", "min_p"):
            v = getattr(self, name)
            if not _is_real(v):
                raise _bad(name, v, f"must be a number, got {type(v).__name__}")
            setattr(self, name, float(v))
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise _bad("temperature", self.temperature,
                       "must be a finite number >= 0 (0 means greedy)")
        if not (0.0 < self.top_p <= 1.0):
            raise _bad("top_p", self.top_p, "must be in (0, 1]")
        if not (0.0 <= self.min_p <= 1.0):
            raise _bad("min_p", self.min_p, "must be in [0, 1]")

        # top_k
        if not _is_int(self.top_k):
            raise _bad("top_k", self.top_k, f"must be an int, got {type(self.top_k).__name__}")
        if self.top_k < -1:
            raise _bad("top_k", self.top_k, "must be -1 or 0 (disabled) or a positive int")
        self.top_k = 0 if self.top_k == -1 else int(self.top_k)

        # seed
        if self.seed is not None:
            if not _is_int(self.seed):
                raise _bad("seed", self.seed, f"must be an int or None, got {type(self.seed).__name__}")
            self.seed = int(self.seed)

        # max_tokens / min_tokens
        if self.max_tokens is not None:
            if not _is_int(self.max_tokens):
                raise _bad("max_tokens", self.max_tokens,
                           f"must be an int or None, got {type(self.max_tokens).__name__}")
            if self.max_tokens < 1:
                raise _bad("max_tokens", self.max_tokens, "must be >= 1")
            self.max_tokens = int(self.max_tokens)
        if not _is_int(self.min_tokens):
            raise _bad("min_tokens", self.min_tokens,
                       f"must be an int, got {type(self.min_tokens).__name__}")
        if self.min_tokens < 0:
            raise _bad("min_tokens", self.min_tokens, "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", self.min_tokens,
                       f"must be <= max_tokens={self.max_tokens}")
        self.min_tokens = int(self.min_tokens)

        # logprobs / prompt_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is None:
                continue
            if not _is_int(v):
                raise _bad(name, v, f"must be an int >= 0 or None, got {type(v).__name__}")
            if v < 0:
                raise _bad(name, v, "must be >= 0")
            setattr(self, name, int(v))

        # stop strings
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        else:
            raise _bad("stop", self.stop, "must be a str, a list of str, or None")
        for s in stop:
            if not isinstance(s, str):
                raise _bad("stop", self.stop, f"every stop string must be a str, got {s!r}")
            if s == "":
                raise _bad("stop", self.stop, "stop strings must be non-empty")
        self.stop = stop

        # stop token ids
        ids = self.stop_token_ids
        if ids is None:
            ids = ()
        elif isinstance(ids, (list, tuple)):
            ids = tuple(ids)
        else:
            raise _bad("stop_token_ids", self.stop_token_ids, "must be a list of int or None")
        for t in ids:
            if not _is_int(t):
                raise _bad("stop_token_ids", self.stop_token_ids,
                           f"every stop token id must be an int, got {t!r}")
            if t < 0:
                raise _bad("stop_token_ids", self.stop_token_ids,
                           f"stop token ids must be >= 0, got {t}")
        self.stop_token_ids = tuple(int(t) for t in ids)

        # booleans
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise _bad(name, v, f"must be a bool, got {type(v).__name__}")

        # penalties
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            v = getattr(self, name)
            if not _is_real(v):
                raise _bad(name, v, f"must be a number, got {type(v).__name__}")
            setattr(self, name, float(v))
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:  # also refuses nan
                raise _bad(name, v, "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise _bad("repetition_penalty", self.repetition_penalty,
                       "must be in (0, 2] (1 disables it)")
        self.logit_bias = _logit_bias(self.logit_bias)

    @property
    def has_penalties(self) -> bool:
        """True when some penalty or logit bias changes the logits."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0 or bool(self.logit_bias))

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature < 1e-5, as in vLLM)."""
        return self.temperature < GREEDY_EPS
