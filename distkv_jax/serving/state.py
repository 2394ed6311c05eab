"""What every endpoint shares: the engine, the served model's name, the
server's limits, and the checks a request passes before it reaches the
engine (model name, prompt, context length, queue length)."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from dataclasses import dataclass
from typing import Optional

from ..sampling_params import SamplingParams
from .metrics import ServerMetrics
from .protocol import APIError, bad_request


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: Optional[str] = None
    max_request_bytes: int = 16 << 20
    max_queued_requests: int = 1024
    shutdown_timeout: float = 30.0
    chat_template: Optional[str] = None     # overrides the tokenizer's


class ServerState:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.llm = None                      # the AsyncLLM, once the warm start is done
        self.startup_error: str | None = None
        self.draining = False                # SIGTERM: no new requests
        self.active = 0                      # requests being answered
        self.idle = asyncio.Event()
        self.idle.set()
        self.reserved = 0                    # admitted, not yet handed to the engine
        self._ids = itertools.count()
        self._salt = secrets.token_hex(4)
        self.metrics = ServerMetrics(config.model_name, self._snapshot)

    def _snapshot(self):
        return self.llm.stats() if self.llm is not None else None

    @property
    def ready(self) -> bool:
        return self.llm is not None and self.llm.is_running and not self.draining

    def finished_one(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle.set()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{self._salt}{next(self._ids)}"

    # ------------------------------------------------------------- checks
    def require_engine(self):
        if self.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if self.llm is None:
            why = self.startup_error or "the engine is starting (warm start)"
            raise APIError(503, why, headers={"Retry-After": "5"})
        if not self.llm.is_running:
            raise APIError(500, "the engine stopped on an error", type="EngineDeadError")
        return self.llm

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.config.model_name!r}", "model")

    def prompt_ids(self, prompt, params: SamplingParams, param: str) -> list[int]:
        """Token ids of an acceptable prompt; else a 400 saying why (the
        engine's own checks, plus prompt + max_tokens within the context)."""
        llm = self.require_engine()
        try:
            ids = llm.check_request(prompt, params)
        except ValueError as e:
            raise bad_request(str(e), param) from None
        limit = llm.max_model_len
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise bad_request(f"the context limit is {limit} tokens (max_model_len), but this "
                              f"request asks for {len(ids) + params.max_tokens}: {len(ids)} in "
                              f"the prompt plus max_tokens={params.max_tokens}", "max_tokens")
        return ids

    def admit(self, n: int) -> None:
        """Refuse (503, Retry-After) rather than queue past the limit: a
        request that is accepted is never dropped."""
        waiting = self.llm.num_waiting() + self.reserved
        if waiting + n > self.config.max_queued_requests:
            raise APIError(503, f"{waiting} requests are waiting, at most "
                           f"{self.config.max_queued_requests} may (--max_queued_requests); "
                           "retry later", headers={"Retry-After": "1"})
        self.reserved += n

    def submitted(self) -> None:
        """One admitted request is now queued in the engine (counted there)."""
        self.reserved -= 1


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage; with ``cached_tokens``, its prompt_tokens_details too
    (prompt tokens whose KV came from the prefix cache)."""
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return u


def cached_tokens(gens) -> int:
    """Prompt tokens served from the prefix cache, over finished generations."""
    return sum(g.final.num_cached_tokens for g in gens if g.final is not None)
