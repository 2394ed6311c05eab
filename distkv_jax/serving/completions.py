"""POST /v1/completions: OpenAI's legacy completion API (vLLM's shapes).

A batch request (a list of prompts) becomes one engine request per prompt;
with n > 1 each engine request samples n sequences, and choice `index` is
prompt index * n + sequence index (OpenAI's and vLLM's numbering).
`logprobs=k` answers OpenAI's form (tokens, token_logprobs, top_logprobs,
text_offset); with `echo` the prompt comes first in each choice's text and,
with logprobs, in those lists too (its first token has no logprob: nothing
predicts it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Optional

from .generation import Delta, Generation, merged
from .protocol import CompletionRequest
from .state import SSE_DONE, ServerState, cached_tokens, now_s, sse, usage


class _Offsets:
    """text_offset: where each token's text starts in the choice's text."""

    def __init__(self):
        self.at = 0

    def logprobs(self, token_ids: list[int], entries: list[Optional[dict]], decode) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, d in zip(token_ids, entries):
            if d is None:  # the first prompt token
                tok, lp, top = decode(tid), None, None
            else:
                tok = d[tid].decoded_token or ""
                lp = d[tid].logprob
                top = {(v.decoded_token or ""): v.logprob
                       for _, v in sorted(d.items(), key=lambda kv: kv[1].rank or 0)}
            out["tokens"].append(tok)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.at)
            self.at += len(tok)
        return out


def _merge_logprobs(a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
    if a is None:
        return b
    if b is None:
        return a
    return {k: a[k] + b[k] for k in a}


async def create_completion(state: ServerState, req: CompletionRequest):
    """The response body (non-streaming) or an async iterator of SSE events."""
    req.unsupported()
    state.check_model(req.model)
    llm = state.require_engine()
    prompts = req.prompts()
    echo_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
    params = req.sampling_params(req.max_tokens, req.logprobs, echo_lp)
    ids = [state.prompt_ids(p, params, "prompt") for p in prompts]
    state.admit(len(ids))
    rid = state.new_id("cmpl")
    gens = [Generation(llm, state.metrics, i, p, params, f"{rid}-{i}", state.submitted)
            for i, p in enumerate(ids)]
    tok = llm.get_tokenizer()

    def decode(x) -> str:
        return tok.decode(x) if tok is not None else ""

    def prompt_text(i: int) -> str:
        return prompts[i] if isinstance(prompts[i], str) else decode(ids[i])

    head = {"id": rid, "object": "text_completion", "created": now_s(), "model": state.config.model_name}
    n = params.n
    offsets = [_Offsets() for _ in range(len(gens) * n)]   # per choice

    def echo_part(choice: int, prompt_lps) -> tuple[str, Optional[dict]]:
        i = choice // n
        lp = None
        if req.logprobs is not None:
            lp = offsets[choice].logprobs(ids[i], prompt_lps or [None] * len(ids[i]),
                                          lambda t: decode([t]))
        return prompt_text(i), lp

    def delta_logprobs(d: Delta) -> Optional[dict]:
        if d.logprobs is None or req.logprobs is None:
            return None
        return offsets[d.index].logprobs(d.token_ids, d.logprobs, lambda t: decode([t]))

    if req.stream:
        return _stream(req, gens, head, echo_part, delta_logprobs)

    finals = {}
    async for d in merged(gens):
        if d.output.finished:
            finals[d.prompt_index] = d.output
    choices = []
    for i in range(len(gens)):
        out = finals[i]
        for c in out.outputs:
            k = i * n + c.index
            text, lp = "", None
            if req.echo:
                text, lp = echo_part(k, out.prompt_logprobs)
            if req.logprobs is not None:
                lp = _merge_logprobs(lp, offsets[k].logprobs(
                    c.token_ids, c.logprobs or [], lambda t: decode([t])))
            choices.append({"index": k, "text": text + c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return dict(head, choices=choices, usage=usage(
        sum(len(x) for x in ids),
        sum(len(c.token_ids) for out in finals.values() for c in out.outputs),
        sum(out.num_cached_tokens for out in finals.values())))


async def _stream(req: CompletionRequest, gens, head, echo_part, delta_logprobs
                  ) -> AsyncIterator[str]:
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    echoed: set[int] = set()
    completion_tokens = 0
    async for d in merged(gens):
        etext, elp = "", None
        if req.echo and d.index not in echoed:  # the prompt first (its offsets too)
            echoed.add(d.index)
            etext, elp = echo_part(d.index, d.output.prompt_logprobs)
        text, lp = etext + d.text, _merge_logprobs(elp, delta_logprobs(d))
        completion_tokens += len(d.token_ids)
        choice = {"index": d.index, "text": text, "logprobs": lp,
                  "finish_reason": d.finish_reason, "stop_reason": d.stop_reason}
        if not include_usage:
            yield sse(dict(head, choices=[choice]))
        else:
            so_far = usage(sum(len(g.prompt_ids) for g in gens), completion_tokens) \
                if req.stream_options.usage_every_chunk() else None
            yield sse(dict(head, choices=[choice], usage=so_far))
    if include_usage:
        yield sse(dict(head, choices=[], usage=usage(sum(len(g.prompt_ids) for g in gens),
                                                    completion_tokens, cached_tokens(gens))))
    yield SSE_DONE
