"""The online API: many concurrent callers, one engine (as vLLM's AsyncLLM).

    llm = AsyncLLM("path/to/model", mesh="2x4", kv_blocks=64)
    async for out in llm.generate(prompt, SamplingParams(max_tokens=32), "req-1"):
        ...                                    # this request's outputs only
    await llm.abort("req-1")
    llm.shutdown()

One background thread owns the engine and runs its loop (`Engine.iterate`)
while there is work. Callers never touch the engine: `generate` and `abort`
queue commands that the engine thread applies between steps, and each
request's outputs are handed to its caller's event loop. Cancelling the
task that consumes a stream (or leaving its `async for` early) aborts the
request; its blocks are free before the next step.

Multi-host: every process of a `jax.distributed` job builds the same
AsyncLLM. Process 0 takes the requests; before each step its engine thread
publishes the adds and aborts it applies (command_channel.py) and the other
processes' engine threads apply the same ones, so every process plans the
same step. `wait()` on the other processes returns when process 0 shuts down.
"""

from __future__ import annotations

import dataclasses
import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .engine_args import EngineArgs
from .outputs import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger("distkv_jax")


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an error; no request can be served."""


class _Stream:
    __slots__ = ("loop", "queue", "finished")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue, self.finished = loop, asyncio.Queue(), False

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody listens
            pass


class _StatsWaiter:
    __slots__ = ("event", "value")

    def __init__(self):
        self.event, self.value = threading.Event(), None


class AsyncLLM:
    def __init__(self, model: str, **kwargs: Any):
        self._init(EngineArgs.from_kwargs("AsyncLLM", model, kwargs))

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLM":
        return cls(**dataclasses.asdict(args))

    def _init(self, args: EngineArgs) -> None:
        from .llm import build_engine

        self.engine_args = args
        self.engine, self.model_config, self.tokenizer, self.mesh = build_engine(args)
        self._cv = threading.Condition()
        self._commands: list[tuple] = []
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._error: BaseException | None = None
        self._stat_waiters: list[_StatsWaiter] = []
        self._last_stats: dict | None = None
        self._engine_waiting = 0   # the engine's waiting requests after its last step
        import jax

        from .command_channel import CommandChannel

        self.is_leader = jax.process_index() == 0
        self._channel = CommandChannel(jax.process_index()) if jax.process_count() > 1 else None
        self._thread = threading.Thread(target=self._run, name="distkv-engine", daemon=True)
        self._thread.start()

    def get_tokenizer(self):
        return self.tokenizer

    def check_request(self, prompt: str | Sequence[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids if the engine would accept the request; else
        ValueError saying why (the same checks the engine applies when it
        adds it). Lets a server refuse bad input before it streams anything."""
        return self.engine.inputs.process("check", prompt, params, 0).prompt_token_ids

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def num_waiting(self) -> int:
        """Requests not yet running: queued for the engine thread, plus those
        the engine held waiting after its last step."""
        with self._cv:
            return self._engine_waiting + sum(1 for c in self._commands if c[0] == "add")

    def stats(self, timeout: float = 2.0) -> dict | None:
        """The engine's metrics snapshot (Engine.metrics_snapshot), taken by
        the engine thread at its next step boundary; the previous one if that
        takes longer than `timeout` (a long step), None if there is none."""
        waiter = _StatsWaiter()
        with self._cv:
            if self._error is None and self._thread.is_alive():
                self._stat_waiters.append(waiter)
                self._cv.notify()
        if waiter.event.wait(timeout):
            return waiter.value
        return self._last_stats

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._error is None

    # ---------------------------------------------------------------- callers
    async def generate(self, prompt: str | Sequence[int], sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """This request's outputs: incremental (cumulative) ones while it
        runs, then the final one (finished=True). A refused request yields
        one final output with finish_reason "error". A request_id that is
        still live raises ValueError."""
        if not self.is_leader:
            raise RuntimeError("only process 0 of a multi-process job takes requests")
        stream = _Stream(asyncio.get_running_loop())
        with self._cv:
            self._check_alive()
            request_id = f"async-{next(self._ids)}" if request_id is None else str(request_id)
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use by a live request")
            self._streams[request_id] = stream
            self._commands.append(("add", request_id, prompt, sampling_params or SamplingParams()))
            self._cv.notify()
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            with self._cv:
                if self._streams.get(request_id) is stream:
                    del self._streams[request_id]
                if not stream.finished:  # cancelled or left early: free its KV
                    self._commands.append(("abort", request_id))
                    self._cv.notify()

    async def abort(self, request_id: str) -> None:
        """Abort a request (a no-op for unknown or finished ids). Its stream
        ends with an output whose finish_reason is "abort"."""
        with self._cv:
            self._commands.append(("abort", str(request_id)))
            self._cv.notify()

    def abort_all(self) -> None:
        """Abort every request a caller is still waiting on."""
        with self._cv:
            for rid in self._streams:
                self._commands.append(("abort", rid))
            self._cv.notify()

    def shutdown(self, timeout: float | None = 60.0) -> None:
        """Stop the engine thread; requests still running are aborted."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the engine thread ends (processes other than 0: when
        process 0 shuts down)."""
        self._thread.join(timeout)

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped on an error: {self._error!r}") from self._error
        if self._stopping:
            raise EngineDeadError("the engine is shut down")

    # ---------------------------------------------------------- engine thread
    def _admit(self) -> bool:
        """Between steps: apply the queued commands (waiting for one while the
        engine is idle). False once shutting down."""
        eng = self.engine
        if not self.is_leader:
            commands, stopping = self._channel.receive()
        else:
            with self._cv:
                while True:
                    self._answer_stats()
                    if self._commands or self._stopping or eng.has_unfinished():
                        break
                    self._cv.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            if self._channel is not None:
                self._channel.publish(commands, stopping)
        for cmd in commands:
            if cmd[0] == "add":
                _, rid, prompt, params = cmd
                try:
                    eng.add_request(prompt, params, request_id=rid)
                except ValueError as e:  # a live id (aborted, not yet settled)
                    self._deliver_error(rid, e)
            else:
                eng.abort(cmd[1])
        if stopping:
            eng.abort_all()
        waiting = sum(1 for r in eng.scheduler.requests.values() if r.status == "waiting")
        with self._cv:
            self._engine_waiting = waiting
        return not stopping

    def _answer_stats(self) -> None:
        """Engine thread, holding the lock: answer /metrics-style callers."""
        if not self._stat_waiters:
            return
        self._last_stats = self.engine.metrics_snapshot()
        for w in self._stat_waiters:
            w.value = self._last_stats
            w.event.set()
        self._stat_waiters = []

    def _deliver_error(self, request_id: str, err: BaseException) -> None:
        with self._cv:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.finished = True
            stream.put(err)

    def _run(self) -> None:
        try:
            for outs in self.engine.iterate(self._admit):
                with self._cv:
                    targets = [(self._streams.get(o.request_id), o) for o in outs]
                for stream, out in targets:
                    if stream is None:
                        continue
                    if out.finished:
                        stream.finished = True
                    stream.put(out)
        except BaseException as e:  # noqa: BLE001 - every waiting caller must hear of it
            log.exception("engine thread stopped")
            with self._cv:
                self._error = e
                streams = list(self._streams.values())
            for s in streams:
                s.finished = True
                s.put(EngineDeadError(f"the engine stopped on an error: {e!r}"))
