"""Request results, shaped like vLLM's ``RequestOutput`` (plain Python, no JAX).

Meanings follow vLLM:

- ``CompletionOutput.logprobs``: ``None`` unless the request asked for
  ``logprobs=k``; then a list with one entry per generated token, each a dict
  ``token_id -> Logprob`` holding the chosen token and the top ``k`` tokens
  (so ``k`` or ``k + 1`` entries). Logprobs are those of the raw model
  distribution (log-softmax of the unmodified logits).
- ``RequestOutput.prompt_logprobs``: likewise for prompt positions, with
  ``None`` for the first prompt token (nothing predicts it).
- ``cumulative_logprob``: sum of the chosen tokens' logprobs (``None`` when
  logprobs were not requested, as in vLLM).
- ``finish_reason``: ``"stop"`` (EOS, a stop string or a stop token id),
  ``"length"`` (max_tokens or capacity), ``"error"`` (bad input; see
  ``RequestOutput.error``), or ``None`` while unfinished.
- ``stop_reason``: the matched stop string or stop token id; ``None`` for EOS,
  length, or unfinished.

Outputs are mutable: the engine fills them incrementally while streaming.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

__all__ = [
    "Logprob",
    "SampleLogprobs",
    "PromptLogprobs",
    "CompletionOutput",
    "RequestMetrics",
    "RequestOutput",
    "FINISH_REASONS",
]

FINISH_REASONS = ("stop", "length", "error", None)


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None           # 1-based rank in the vocabulary
    decoded_token: Optional[str] = None


# One dict per generated token.
SampleLogprobs = List[Dict[int, Logprob]]
# One entry per prompt position; the first is None.
PromptLogprobs = List[Optional[Dict[int, Logprob]]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: List[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[SampleLogprobs]
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: Optional[float] = None
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    request_class: Optional[str] = None   # "short" or "long" at arrival (policy.py)


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    prompt_logprobs: Optional[PromptLogprobs]
    outputs: List[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    error: Optional[str] = None
    num_cached_tokens: int = 0           # prompt tokens whose KV came from the prefix cache
