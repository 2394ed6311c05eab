"""POST /v1/chat/completions: OpenAI's chat API (vLLM's shapes).

The prompt is the model's chat template (or --chat_template) applied to
`messages` with the generation prompt added. A streamed answer sends the
assistant role first, then content deltas, then the finish reason; with
n > 1, each choice (index 0..n-1) gets its own role chunk, deltas and
finish reason, as vLLM sends them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Optional

from ..chat_template import chat_prompt_ids, validate_messages
from .generation import Delta, Generation, merged
from .protocol import ChatCompletionRequest, bad_request
from .state import SSE_DONE, ServerState, cached_tokens, now_s, sse, usage


def _token_entry(tok: str, lp: float) -> dict:
    return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], entries: list[dict], k: int) -> list[dict]:
    """OpenAI's `logprobs.content`: each token with its `k` most likely."""
    content = []
    for tid, d in zip(token_ids, entries):
        chosen = d[tid]
        top = sorted((v for v in d.values() if v.rank is not None and v.rank <= k),
                     key=lambda v: v.rank)[:k]
        e = _token_entry(chosen.decoded_token or "", chosen.logprob)
        e["top_logprobs"] = [_token_entry(v.decoded_token or "", v.logprob) for v in top]
        content.append(e)
    return content


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest):
    """The response body (non-streaming) or an async iterator of SSE events."""
    req.unsupported()
    state.check_model(req.model)
    llm = state.require_engine()
    try:
        messages = validate_messages(req.messages)
    except ValueError as e:
        raise bad_request(str(e), "messages") from None
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = req.sampling_params(req.max_new_tokens(), k)
    tok = llm.get_tokenizer()
    if tok is None:
        raise bad_request("this model has no tokenizer, so it cannot chat", "messages")
    try:
        ids = chat_prompt_ids(tok, messages, state.config.chat_template)
    except ValueError as e:
        raise bad_request(str(e), "messages") from None
    ids = state.prompt_ids(ids, params, "messages")
    state.admit(1)
    rid = state.new_id("chatcmpl")
    gen = Generation(llm, state.metrics, 0, ids, params, rid, state.submitted)
    head = {"id": rid, "object": "chat.completion", "created": now_s(),
            "model": state.config.model_name}

    def lp_part(d: Delta) -> Optional[dict]:
        if k is None or d.logprobs is None:
            return None
        return {"content": chat_logprobs(d.token_ids, d.logprobs, k)}

    if req.stream:
        return _stream(req, gen, dict(head, object="chat.completion.chunk"), lp_part)

    out = None
    async for d in merged([gen]):
        out = d.output
    choices = []
    for c in out.outputs:
        logprobs = None
        if k is not None:
            logprobs = {"content": chat_logprobs(c.token_ids, c.logprobs or [], k)}
        choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": logprobs, "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason})
    return dict(head, choices=choices,
                usage=usage(len(ids), sum(len(c.token_ids) for c in out.outputs),
                            out.num_cached_tokens))


async def _stream(req: ChatCompletionRequest, gen: Generation, head: dict, lp_part
                  ) -> AsyncIterator[str]:
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    extra = {"usage": None} if include_usage else {}
    for i in range(gen.params.n):
        yield sse(dict(head, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}], **extra))
    tokens = 0
    every = include_usage and req.stream_options.usage_every_chunk()
    async for d in merged([gen]):
        tokens += len(d.token_ids)
        delta = {"content": d.text} if d.text or d.finish_reason is None else {}
        if every:
            extra = {"usage": usage(len(gen.prompt_ids), tokens)}
        yield sse(dict(head, choices=[{"index": d.index, "delta": delta, "logprobs": lp_part(d),
                                       "finish_reason": d.finish_reason,
                                       "stop_reason": d.stop_reason}], **extra))
    if include_usage:
        yield sse(dict(head, choices=[], usage=usage(len(gen.prompt_ids), tokens,
                                                     cached_tokens([gen]))))
    yield SSE_DONE
