"""OpenAI request shapes and error bodies (pydantic; no JAX).

Requests are parsed strictly: a field of the wrong type, or a field this
server does not know, is a 400 that names it. Fields the engine cannot
honour yet (best_of != n, suffix) are refused with
a message saying so rather than silently ignored. Value checks (ranges,
limits) are SamplingParams' and the engine's own, so the API and the Python
entry points refuse the same things with the same words.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from ..sampling_params import SamplingParams


class APIError(Exception):
    """An error answered as OpenAI's JSON: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type or _ERROR_TYPES.get(status, "InternalServerError")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.status)


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowed", 413: "RequestTooLargeError",
                503: "ServiceUnavailableError"}


def error_body(message: str, type: str, param: str | None, code: int) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def _short(value: Any, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False   # vLLM's: usage so far in every chunk

    def usage_every_chunk(self) -> bool:
        return self.include_usage and self.continuous_usage_stats


class _SamplingFields(_Strict):
    """Fields shared by both endpoints: OpenAI's, then vLLM's extras."""

    model: Optional[str] = None
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[str | list[str]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's extra sampling fields
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    min_tokens: int = 0
    ignore_eos: bool = False
    repetition_penalty: Optional[float] = None
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def unsupported(self) -> None:
        """Refuse what the engine cannot do yet (never silently ignore it)."""
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")

    def sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int],
                        prompt_logprobs: Optional[int] = None) -> SamplingParams:
        try:
            return SamplingParams(
                n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k is None else self.top_k,
                min_p=0.0 if self.min_p is None else self.min_p,
                seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
                stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                presence_penalty=0.0 if self.presence_penalty is None else self.presence_penalty,
                frequency_penalty=0.0 if self.frequency_penalty is None else self.frequency_penalty,
                repetition_penalty=(1.0 if self.repetition_penalty is None
                                    else self.repetition_penalty),
                logit_bias=self.logit_bias)
        except ValueError as e:
            msg = str(e).removeprefix("SamplingParams.")
            raise bad_request(msg, msg.split("=", 1)[0]) from None


class CompletionRequest(_SamplingFields):
    prompt: Any = None
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.best_of is not None and self.best_of != self.n:  # vLLM v1: best_of = n only
            raise bad_request(f"best_of={self.best_of}: only best_of=n (n={self.n}) is supported",
                              "best_of")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")

    def prompts(self) -> list[str | list[int]]:
        """`prompt` as a list of prompts: a string, a list of token ids, or a
        list of either (a batch)."""
        p = self.prompt
        if p is None:
            raise bad_request("prompt is required", "prompt")
        if isinstance(p, str):
            return [p]
        if isinstance(p, list) and p and all(_is_token_id(x) for x in p):
            return [p]
        if isinstance(p, list) and p and all(
                isinstance(x, str) or (isinstance(x, list) and all(_is_token_id(t) for t in x))
                for x in p):
            return list(p)
        if p == []:
            raise bad_request("prompt is empty", "prompt")
        raise bad_request(f"prompt={_short(p)}: must be a string, a list of token ids, or a list "
                          "of strings / token id lists", "prompt")


class ChatCompletionRequest(_SamplingFields):
    messages: Any = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")

    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


def _is_token_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_request(cls: type[_Strict], raw: bytes) -> Any:
    """The request object, or a 400 that names what is wrong."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}")
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise bad_request(f"unknown field {loc!r}: this server does not support it",
                              loc) from None
        raise bad_request(f"{loc}={_short(err.get('input'))}: {err['msg']}", loc) from None


__all__ = ["APIError", "error_body", "bad_request", "StreamOptions", "CompletionRequest",
           "ChatCompletionRequest", "parse_request"]
