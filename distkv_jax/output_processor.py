"""Output processing: stop checks, logprobs, detokenization and vLLM-shaped
`RequestOutput`s (plain Python + numpy, no JAX).

The output processor owns each live request's text and logprobs; the tokens
themselves live once, in the request record. `on_token` is called after the
scheduler appended a sampled token and returns the final status when that
token ends the request.

Parallel sampling (n > 1): each sequence is a request record of its own here;
`make_group_output` gathers the n of them into the one RequestOutput of the
submitted request (CompletionOutput.index = the sequence's index).
"""

from __future__ import annotations

import dataclasses
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .request import Request, RequestStatus


@dataclasses.dataclass
class _OutputState:
    logprobs: list[dict] | None = None
    prompt_logprobs: list | None = None
    cumulative_logprob: float = 0.0
    text: str = ""
    text_tokens: int = 0            # `text` decodes the first text_tokens outputs
    text_exact: bool = True         # ... by a full decode (else incrementally)
    text_final: bool = False        # cut at a stop string: never re-decoded
    text_prefix: int = 0            # incremental: context tokens re-decoded with new ones


class OutputProcessor:
    def __init__(self, tokenizer, eos_ids: set[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self._state: dict[str, _OutputState] = {}

    def add(self, req: Request) -> None:
        p = req.params
        self._state[req.request_id] = _OutputState(
            logprobs=[] if p.logprobs is not None else None,
            prompt_logprobs=[None] if p.prompt_logprobs is not None else None)

    # ------------------------------------------------------------- results
    def on_prompt_logprob(self, req: Request, position: int, target: int, target_lp: float,
                          target_rank: int, top_ids, top_lps) -> bool:
        """Record the logprob of prompt token position+1; False if it was
        recorded already (a recompute after preemption)."""
        st = self._state[req.request_id]
        if st.prompt_logprobs is None or len(st.prompt_logprobs) != position + 1:
            return False
        st.prompt_logprobs.append(self._logprob_dict(target, target_lp, target_rank, top_ids,
                                                     top_lps, req.params.prompt_logprobs))
        return True

    def on_token(self, req: Request, token: int, logprob: float, rank: int, top_ids,
                 top_lps) -> RequestStatus | None:
        """Record the token just appended to req.tokens; the final status if
        it ends the request (req.stop_reason is set then)."""
        st = self._state[req.request_id]
        p = req.params
        st.cumulative_logprob += logprob
        if st.logprobs is not None:
            st.logprobs.append(self._logprob_dict(token, logprob, rank, top_ids, top_lps, p.logprobs))
        if p.stop:  # stop strings are matched on the text: keep it current
            self._refresh_text(req, st, exact=True)
        if req.num_output_tokens >= p.min_tokens:
            if token in self.eos_ids and not p.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if p.stop_token_ids and token in p.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            for s in p.stop or ():
                at = st.text.find(s)
                if at >= 0:
                    st.text = st.text[:at + len(s)] if p.include_stop_str_in_output else st.text[:at]
                    st.text_final = True
                    req.stop_reason = s
                    return RequestStatus.FINISHED_STOPPED
        if req.reached_limit(len(req.tokens)):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _logprob_dict(self, chosen: int, chosen_lp: float, chosen_rank: int, top_ids, top_lps,
                      k: int) -> dict:
        d = {int(chosen): Logprob(float(chosen_lp), int(chosen_rank), self._decode_one(chosen))}
        for j in range(k):
            tid = int(top_ids[j])
            if tid not in d:
                d[tid] = Logprob(float(top_lps[j]), j + 1, self._decode_one(tid))
        return d

    def _decode_one(self, tid: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([tid])

    # --------------------------------------------------------------- text
    def _refresh_text(self, req: Request, st: _OutputState, exact: bool) -> None:
        """Bring the text up to date with the request's outputs. A finished
        request, or one with stop strings (matched on the text), gets a full
        decode: exactly the tokenizer's decode of its tokens. A running
        request's streamed text is decoded incrementally, as vLLM does: only
        the new tokens plus a few tokens of context, so a streamed request
        costs O(tokens), not O(tokens^2), in decoding. The new text is taken
        once it no longer ends in an incomplete UTF-8 character (U+FFFD)."""
        if self.tokenizer is None or st.text_final:
            return
        ids, skip = req.output_token_ids, req.params.skip_special_tokens
        if st.text_tokens == len(ids) and (st.text_exact or not exact):
            return
        if exact:
            st.text = self.tokenizer.decode(ids, skip_special_tokens=skip)
            st.text_tokens = st.text_prefix = len(ids)
            st.text_exact = True
            return
        before = self.tokenizer.decode(ids[st.text_prefix:st.text_tokens], skip_special_tokens=skip)
        after = self.tokenizer.decode(ids[st.text_prefix:], skip_special_tokens=skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            st.text += after[len(before):]
            st.text_prefix, st.text_tokens = st.text_tokens, len(ids)
            st.text_exact = False

    # ------------------------------------------------------------ outputs
    def _completion(self, req: Request, release: bool) -> tuple[CompletionOutput, _OutputState]:
        """The sequence's CompletionOutput so far; its state is released
        with `release` (the request's final output)."""
        finished = req.is_finished
        st = self._state.pop(req.request_id, None) if release else self._state.get(req.request_id)
        if st is None:  # refused at submission: it never had output state
            st = _OutputState()
        self._refresh_text(req, st, exact=finished or bool(req.params.stop))
        comp = CompletionOutput(
            index=req.index, text=st.text, token_ids=req.output_token_ids,
            cumulative_logprob=st.cumulative_logprob if st.logprobs is not None else None,
            logprobs=list(st.logprobs) if st.logprobs is not None else None,
            finish_reason=req.status.finish_reason, stop_reason=req.stop_reason)
        return comp, st

    def make_output(self, req: Request) -> RequestOutput:
        """The request's output so far (final once it finished; its state is
        released then)."""
        finished = req.is_finished
        comp, st = self._completion(req, finished)
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            prompt_logprobs=list(st.prompt_logprobs) if st.prompt_logprobs is not None else None,
            outputs=[comp], finished=finished, metrics=req.metrics, error=req.error,
            num_cached_tokens=max(req.num_cached_tokens, 0))

    def make_group_output(self, request_id: str, seqs: list[Request], finished: bool
                          ) -> RequestOutput:
        """An n > 1 request's output so far: one CompletionOutput per
        sequence (`seqs`, by index), cumulative; final (and every sequence's
        state released) once all of them finished. Prompt logprobs and the
        prefix-cache hit are sequence 0's (the prompt is shared); metrics
        span the sequences (first scheduled / first token: the earliest;
        last token / finished: the latest)."""
        comps, first_st = [], None
        for req in seqs:
            comp, st = self._completion(req, finished)
            comps.append(comp)
            if first_st is None:
                first_st = st
        s0 = seqs[0]
        return RequestOutput(
            request_id=request_id, prompt=s0.prompt, prompt_token_ids=s0.prompt_token_ids,
            prompt_logprobs=(list(first_st.prompt_logprobs)
                             if first_st.prompt_logprobs is not None else None),
            outputs=comps, finished=finished, metrics=_group_metrics(seqs, finished),
            error=next((r.error for r in seqs if r.error is not None), None),
            num_cached_tokens=max(s0.num_cached_tokens, 0))


def _group_metrics(seqs: list[Request], finished: bool) -> RequestMetrics:
    def pick(name: str, f):
        vals = [getattr(r.metrics, name) for r in seqs]
        vals = [v for v in vals if v is not None]
        return f(vals) if vals else None

    return RequestMetrics(
        arrival_time=seqs[0].metrics.arrival_time,
        first_scheduled_time=pick("first_scheduled_time", min),
        first_token_time=pick("first_token_time", min),
        last_token_time=pick("last_token_time", max),
        finished_time=pick("finished_time", max) if finished else None,
        request_class=seqs[0].metrics.request_class)
