"""Input processing: a submitted prompt becomes a `Request`, or a clear error
(plain Python, no JAX).

Checks, each with a message that names what is wrong: the prompt's type,
tokenization (text needs a tokenizer), emptiness, token ids inside the
vocabulary (the prompt's and logit_bias's), the KV one request may hold
under the KV policy, the context limit (`max_model_len`; with a
sliding-window model, the window) and the logprobs asked for against
`max_logprobs`. A request whose prompt fits but
whose `max_tokens` would pass the context limit is capped there (finish
reason "length"), as vLLM's offline engine does; one warning says so.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from .request import Request
from .sampling_params import SamplingParams

log = logging.getLogger("distkv_jax")


@dataclasses.dataclass(frozen=True)
class InputLimits:
    vocab_size: int
    kv_tokens: int               # most tokens of KV one request may hold
    kv_policy: str
    max_model_len: int           # most tokens (prompt + output) of one request
    max_logprobs: int
    sliding_window: int | None = None


class InputProcessor:
    def __init__(self, limits: InputLimits, tokenizer=None, base_seed: int = 0):
        self.limits, self.tokenizer, self.base_seed = limits, tokenizer, base_seed
        self._capped_warned = False

    def seed_for(self, params: SamplingParams, arrival: int) -> int:
        """A request without its own seed gets one derived from the base seed
        and its arrival number: reproducible, and distinct across requests."""
        if params.seed is not None:
            return params.seed
        return (self.base_seed * 1_000_003 + arrival) % (2 ** 31)

    def process(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams,
                arrival: int) -> Request:
        """The request record; raises ValueError with the reason it is refused."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        ids = self.prompt_ids(prompt)
        lim = self.limits
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > lim.max_logprobs:
                raise ValueError(f"{name}={k} is more than max_logprobs={lim.max_logprobs} "
                                 "(raise the engine's max_logprobs)")
        if params.logit_bias:
            bad = [t for t in params.logit_bias if t >= lim.vocab_size]
            if bad:
                raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary "
                                 f"[0, {lim.vocab_size})")
        n = len(ids)
        if n > lim.kv_tokens:
            raise ValueError(f"prompt has {n} tokens, more than the {lim.kv_tokens} tokens of KV "
                             f"one request may hold under kv_policy={lim.kv_policy!r}")
        if lim.sliding_window is not None and n > lim.sliding_window:
            raise ValueError(f"prompt has {n} tokens, more than the model's sliding window "
                             f"({lim.sliding_window}), which DistAttention does not implement")
        if n > lim.max_model_len:
            raise ValueError(f"prompt has {n} tokens, more than max_model_len={lim.max_model_len}")
        if (params.max_tokens is not None and n + params.max_tokens > lim.max_model_len
                and not self._capped_warned):
            self._capped_warned = True  # once: a batch of such requests would flood the log
            log.warning("request %s: prompt (%d tokens) + max_tokens (%d) is more than "
                        "max_model_len=%d; generation stops at %d tokens in all (finish reason "
                        "'length'). Further such requests are capped without a warning.",
                        request_id, n, params.max_tokens, lim.max_model_len, lim.max_model_len)
        return Request(request_id, params, list(ids), n, seed=self.seed_for(params, arrival),
                       max_len=lim.max_model_len, prompt=prompt if isinstance(prompt, str) else None)

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a string prompt needs a tokenizer; this model directory has none "
                                 "(pass token ids instead)")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            try:
                ids = [int(x) for x in prompt]
            except (TypeError, ValueError):
                raise ValueError(f"a prompt must be a string or a list of token ids, "
                                 f"got {type(prompt).__name__}") from None
            if any(isinstance(x, bool) or int(x) != x for x in prompt):
                raise ValueError("token ids must be integers")
        if not ids:
            raise ValueError("empty prompt: a request needs at least one prompt token")
        bad = [x for x in ids if not 0 <= x < self.limits.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.limits.vocab_size})")
        return ids
