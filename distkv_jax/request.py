"""One record per request (plain Python, no JAX), as vLLM v1's `Request`.

The record is shared by the engine's parts, each writing only its own fields:

- input processing creates it (ids, params, seed, token limit);
- the scheduler owns its scheduling state (status while live, instance,
  computed tokens, the pending token of an overlapped step) and appends the
  sampled tokens;
- the KV cache manager keys its block allocation by `request_id`;
- the output processor keeps text and logprobs in its own per-request state.

Tokens are stored once: `tokens` is the prompt followed by the generated
tokens; `output_token_ids` is a view of its tail.
"""

from __future__ import annotations

import dataclasses
import enum

from .outputs import RequestMetrics
from .sampling_params import SamplingParams


class RequestStatus(str, enum.Enum):
    """Where a request is. A str enum: it compares equal to its value, so the
    KV manager's brute-force tests can keep plain strings."""

    WAITING = "waiting"        # not admitted: no instance, no blocks
    RUNNING = "running"        # admitted; KV on devices (or to be recomputed)
    SWAPPED = "swapped"        # KV in host memory
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASON

    @property
    def finish_reason(self) -> str | None:
        """vLLM's finish_reason string ("stop", "length", "abort", "error")."""
        return _FINISH_REASON.get(self)


_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    params: SamplingParams
    tokens: list[int]               # prompt + generated so far: the one copy
    prompt_len: int
    seed: int = 0                   # sampling seed (params.seed or one the engine assigned)
    max_len: int | None = None      # most tokens (prompt + generated) it may reach
    prompt: str | None = None       # the text, when given as text
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    error: str | None = None
    metrics: RequestMetrics = dataclasses.field(default_factory=RequestMetrics)
    # ---- parallel sampling (n > 1): one record per sequence
    parent_id: str | None = None    # the id the user submitted, for a sequence of an n > 1 request
    index: int = 0                  # the sequence's CompletionOutput.index
    # A sibling sequence forks from this one's blocks once its prompt is
    # computed (the scheduler shares the full blocks and copies the partial one).
    fork_of: "Request | None" = None
    # ---- scheduling state: written by the scheduler only
    instance: int = -1
    num_computed: int = 0           # tokens whose KV is cached
    prompt_logprobs_done: int = 1   # prompt positions whose logprob is recorded (first has none)
    block_hashes: list = dataclasses.field(default_factory=list)  # prefix-hash chain (KV manager's)
    num_cached_tokens: int = -1     # prompt tokens found in the prefix cache at first admission (-1: not admitted yet)
    preemptions: int = 0
    passed_steps: int = 0           # steps in which later requests were admitted while it waited for KV
    stalled_steps: int = 0          # steps in which it, a long prefill, got no rows (the reserve)
    # Overlapped steps: a token sampled by the step in flight is not in
    # `tokens` yet; its position can already be scheduled, and the step then
    # reads the token from that step's output row `pending_row`.
    pending: int = 0
    pending_row: int = -1
    hold: bool = False              # the pending token is its last: schedule nothing more

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def num_output_tokens(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.tokens[:self.prompt_len]

    @property
    def length(self) -> int:
        """Stream length, counting a pending token."""
        return len(self.tokens) + self.pending

    @property
    def remaining(self) -> int:
        return self.length - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def reached_limit(self, num_tokens: int) -> bool:
        """True when a stream of `num_tokens` tokens may grow no further
        (max_tokens, the context limit or the sliding window)."""
        p = self.params
        if p.max_tokens is not None and num_tokens - self.prompt_len >= p.max_tokens:
            return True
        return self.max_len is not None and num_tokens >= self.max_len
