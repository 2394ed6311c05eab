"""One engine request seen from the HTTP side: its outputs as deltas (new
text, token ids and logprobs since the last one), with its latency metrics
recorded as it goes. Shared by the completion and chat endpoints.

Text is streamed as it is detokenized, except that while a request has stop
strings the last (longest stop string - 1) characters are held back: they
may be the start of a stop string, which the final text will not contain
(vLLM does the same). So the streamed deltas always concatenate to the final
text.

With n > 1 (parallel sampling) the engine request carries n sequences, and
each is a choice of its own: its own deltas, holdback and finish reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Optional

from ..async_llm import AsyncLLM, EngineDeadError
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .metrics import ServerMetrics
from .protocol import APIError


@dataclass(frozen=True)
class Delta:
    index: int                        # the choice's index: prompt index * n + sequence index
    text: str
    token_ids: list[int]
    logprobs: Optional[list]          # new per-token logprob dicts (when asked for)
    finish_reason: Optional[str]
    stop_reason: Optional[int | str]
    output: RequestOutput             # the latest cumulative output (every sequence)
    prompt_index: int = 0             # the prompt's index in a batch request


class _Choice:
    """What one sequence (one choice) has streamed so far."""

    __slots__ = ("text", "num_tokens", "num_logprobs", "last", "done")

    def __init__(self):
        self.text, self.num_tokens, self.num_logprobs = "", 0, 0
        self.last: float | None = None   # when its last tokens came
        self.done = False                # its finish_reason was sent


class Generation:
    """One engine request. With n > 1 (parallel sampling) its outputs hold n
    sequences; each is a choice with its own deltas (index = the prompt's
    index * n + the sequence's index, as OpenAI and vLLM number them) and
    its own final delta (with its finish_reason)."""

    def __init__(self, llm: AsyncLLM, metrics: ServerMetrics, index: int, prompt_ids: list[int],
                 params: SamplingParams, request_id: str, on_submit=None):
        self.llm, self.metrics, self.index, self.on_submit = llm, metrics, index, on_submit
        self.prompt_ids, self.params, self.request_id = prompt_ids, params, request_id
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.choices = [_Choice() for _ in range(params.n)]
        self.final: RequestOutput | None = None
        # n > 1 with prompt logprobs: sequence 0 computes them, and another
        # sequence may gain tokens first; hold every delta until they are
        # all there, so that each delta's output carries them complete
        self._await_prompt_lps = params.n > 1 and params.prompt_logprobs is not None

    @property
    def num_tokens(self) -> int:
        """Tokens generated so far, every choice together."""
        return sum(c.num_tokens for c in self.choices)

    async def deltas(self) -> AsyncIterator[Delta]:
        """The request's deltas, choice by choice; each choice's last has
        its finish_reason. An engine refusal before any output raises
        APIError(400)."""
        t0 = time.monotonic()
        first = True
        gen = self.llm.generate(self.prompt_ids, self.params, self.request_id)
        if self.on_submit is not None:
            # generate() queues the request before its first await, so nothing
            # runs between this and the engine counting it as waiting
            self.on_submit()
            self.on_submit = None
        try:
            async for out in gen:
                now = time.monotonic()
                if self.num_tokens == 0 and any(c.finish_reason == "error" for c in out.outputs):
                    self.final = out
                    self.metrics.finished("error", out)
                    raise APIError(400, out.error or "the request was refused", None)
                if self._await_prompt_lps and not out.finished:
                    pl = out.prompt_logprobs
                    if pl is None or len(pl) < len(self.prompt_ids):
                        continue
                    self._await_prompt_lps = False
                deltas = []
                for c in out.outputs:
                    ch = self.choices[c.index]
                    if ch.done:
                        continue
                    new_ids = c.token_ids[ch.num_tokens:]
                    if new_ids:
                        if first:
                            self.metrics.observe_ttft(now - t0, out)
                            first = False
                        elif ch.last is not None:
                            for _ in new_ids:
                                self.metrics.itl.observe((now - ch.last) / len(new_ids))
                        ch.last = now
                    done = c.finish_reason is not None
                    full = c.text
                    visible = full if done or not self.holdback else \
                        full[:max(len(ch.text), len(full) - self.holdback)]
                    delta = visible[len(ch.text):] if visible.startswith(ch.text) else ""
                    ch.text += delta
                    lps = None
                    if c.logprobs is not None:
                        lps = c.logprobs[ch.num_logprobs:]
                        ch.num_logprobs = len(c.logprobs)
                    ch.num_tokens = len(c.token_ids)
                    if done:  # counted per sequence (vLLM counts each child request)
                        queued = not any(x.done for x in self.choices)  # once per request
                        ch.done = True
                        self.metrics.finished(c.finish_reason, out if queued else None)
                    if delta or new_ids or done:
                        deltas.append(Delta(self.index * len(self.choices) + c.index, delta,
                                            list(new_ids), lps, c.finish_reason, c.stop_reason,
                                            out, self.index))
                if out.finished:
                    self.final = out
                    self.metrics.e2e.observe(now - t0)
                for d in deltas:
                    yield d
                if out.finished:
                    return
        except EngineDeadError as e:
            raise APIError(500, str(e), type="EngineDeadError") from None
        finally:
            await gen.aclose()  # an early exit (disconnect) aborts the request now
            if self.final is None:  # cancelled (the client went away): aborted
                for ch in self.choices:
                    if not ch.done:
                        self.metrics.finished("abort", None)

    def release(self) -> None:
        """A generation that never started still gives back its admission."""
        if self.on_submit is not None:
            self.on_submit()
            self.on_submit = None

    async def run(self) -> RequestOutput:
        """Consume to the end; the final output."""
        async for _ in self.deltas():
            pass
        assert self.final is not None
        return self.final


async def merged(gens: list[Generation]) -> AsyncIterator[Delta]:
    """The deltas of several generations as they come (a batch request)."""
    try:
        if len(gens) == 1:
            async for d in gens[0].deltas():
                yield d
        else:
            async for d in _merge(gens):
                yield d
    finally:
        for g in gens:
            g.release()


async def _merge(gens: list[Generation]) -> AsyncIterator[Delta]:
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(g: Generation) -> None:
        try:
            async for d in g.deltas():
                await queue.put(d)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put(e)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(g)) for g in gens]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
