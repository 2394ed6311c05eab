"""Scheduling policy for long and short requests together (plain Python, no JAX).

The step is one SPMD program for the whole mesh, so a long prefill that takes
every instance's rows, or the KV every short request needs, takes every other
user's latency with it. The rules, all deterministic (step counts, never a
clock), so every host of a multi-host job decides the same:

- Classes. A request whose remaining prefill (tokens of its stream not yet
  computed) is over ``long_prefill_token_threshold`` is *long*, else *short*
  (vLLM's name and meaning). Its class at arrival (prompt length) labels its
  metrics.
- Rows per step: decodes first; then one floor of ``long_prefill_min_tokens``
  rows for each long prefill that runs this step (the ones furthest along),
  so it always progresses;
  then short prefill chunks, oldest first; then the long prefills take what
  is left, oldest first, but while any other request is live a long chunk is
  capped at ``long_prefill_token_threshold`` rows (vLLM caps every long
  chunk so; alone, a long request takes every free row).
- Concurrency (vLLM's meanings): at most ``max_num_partial_prefills``
  requests prefill at once, at most ``max_long_partial_prefills`` of them
  long. A new request over either limit stays waiting; others may pass it.
- Overtaking with aging: a request that cannot be admitted for want of KV
  blocks does not hold up the requests behind it, unless it has been passed
  over in ``admission_aging_steps`` steps: from then on nobody behind it is
  admitted (FCFS again) until it is. Its wait is bounded by that many steps
  plus the time the requests ahead of it take to free their blocks.
- Room for short requests: a long request's growth leaves
  ``short_reserve_blocks`` blocks free on every instance: its chunk is cut to
  what fits above that reserve, and it never preempts a running request for
  its own growth while short ones run. A long request that made no progress
  for ``admission_aging_steps`` steps ignores the reserve (it may then
  preempt newer requests, as before), so the reserve never starves it.

`SchedulingPolicy` holds the resolved settings and answers the questions the
scheduler asks; the scheduler keeps the per-request counters.
"""

from __future__ import annotations

import dataclasses

SHORT, LONG = "short", "long"
CLASSES = (SHORT, LONG)


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Resolved policy settings (EngineArgs.policy_config derives them)."""

    long_prefill_token_threshold: int = 256
    long_prefill_min_tokens: int = 64
    max_num_partial_prefills: int = 64
    max_long_partial_prefills: int = 1
    admission_aging_steps: int = 64
    short_reserve_blocks: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            low = 0 if f.name == "short_reserve_blocks" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{f.name}={v!r}: must be an integer >= {low}")
        if self.max_long_partial_prefills > self.max_num_partial_prefills:
            raise ValueError(f"max_long_partial_prefills={self.max_long_partial_prefills} is more "
                             f"than max_num_partial_prefills={self.max_num_partial_prefills}")

    @classmethod
    def resolve(cls, *, max_num_batched_tokens: int, block_size: int, blocks_per_instance: int,
                long_prefill_token_threshold: int = 0, long_prefill_min_tokens: int = 0,
                max_num_partial_prefills: int = 0, max_long_partial_prefills: int = 1,
                admission_aging_steps: int = 64, short_reserve_blocks: int = -1,
                max_num_seqs: int = 64) -> "PolicyConfig":
        """Defaults (0 or -1: derived): long means more than one instance's
        step of rows (``max_num_batched_tokens``); the floor is a quarter of
        the threshold (at least a block); any number of short prefills (up to
        ``max_num_seqs``); a reserve of one threshold's worth of blocks, at
        most a quarter of an instance's blocks."""
        threshold = long_prefill_token_threshold or max_num_batched_tokens
        floor = long_prefill_min_tokens or max(block_size, threshold // 4)
        partial = max_num_partial_prefills or max(max_num_seqs, max_long_partial_prefills)
        reserve = short_reserve_blocks if short_reserve_blocks >= 0 else \
            min(-(-threshold // block_size), blocks_per_instance // 4)
        return cls(threshold, min(floor, threshold), partial, max_long_partial_prefills,
                   admission_aging_steps, reserve)


class SchedulingPolicy:
    """The policy's answers; every decision of who runs first, who waits and
    who gives way is made here (the scheduler executes, the KV manager says
    whether blocks can be had)."""

    def __init__(self, config: PolicyConfig, num_instances: int) -> None:
        self.config = config
        self.num_instances = num_instances

    # ------------------------------------------------------------- classes
    def is_long(self, remaining_prefill: int) -> bool:
        return remaining_prefill > self.config.long_prefill_token_threshold

    def arrival_class(self, prompt_len: int) -> str:
        return LONG if self.is_long(prompt_len) else SHORT

    # ---------------------------------------------------------------- rows
    def split_prefills(self, prefills: list) -> tuple[list, list, list]:
        """Running prefills (arrival order, each with ``.remaining`` and
        ``.num_computed``) -> (short ones, long ones that run this step, long
        ones that wait: over ``max_long_partial_prefills``). The long ones
        furthest along run first (ties: arrival order): one preempted back to
        the start does not hold the slot of one that can finish and free its
        blocks (two long requests would otherwise take turns preempting)."""
        short = [r for r in prefills if not self.is_long(r.remaining)]
        long_ = sorted((r for r in prefills if self.is_long(r.remaining)),
                       key=lambda r: -r.num_computed)
        k = self.config.max_long_partial_prefills
        return short, long_[:k], long_[k:]

    def long_floor(self, remaining: int) -> int:
        return min(remaining, self.config.long_prefill_min_tokens)

    def long_chunk_cap(self, others_live: bool) -> int | None:
        """The most rows a long prefill takes in one step: the threshold while
        other requests are live, else no cap."""
        return self.config.long_prefill_token_threshold if others_live else None

    # ----------------------------------------------------------- admission
    def may_start_prefill(self, long: bool, partial: int, long_partial: int) -> bool:
        """A new request may begin its prefill beside `partial` running
        prefills, `long_partial` of them long."""
        c = self.config
        if partial >= c.max_num_partial_prefills:
            return False
        return not long or long_partial < c.max_long_partial_prefills

    def blocks_queue(self, passed_steps: int) -> bool:
        """A waiting request passed over in this many steps stops all
        overtaking: nobody behind it is admitted until it is."""
        return passed_steps >= self.config.admission_aging_steps

    # ------------------------------------------------------------- reserve
    def reserve_total(self) -> int:
        """Blocks a long request's growth leaves free over the whole mesh."""
        return self.config.short_reserve_blocks * self.num_instances

    def long_ignores_reserve(self, stalled_steps: int) -> bool:
        return stalled_steps >= self.config.admission_aging_steps
