"""The OpenAI-compatible server against a live server on 127.0.0.1, driven
with the official `openai` client and httpx.

References: transformers (PyTorch) for greedy text and logprobs, the
tokenizer's own `apply_chat_template` for chat prompts, and each request's
solo run for the concurrent load.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distkv_jax import AsyncLLM
from distkv_jax.models.tiny import tiny_model_dir
from distkv_jax.serving.api_server import ServerThread
from distkv_jax.serving.state import ServerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "tiny-test"
# 2 instances of 24 blocks x 16 tokens: a 420-token prompt needs more than one
# instance's KV (384 tokens); a host tier takes swapped-out requests.
ENGINE = dict(mesh="2x2", block_size=16, kv_blocks=24, host_kv_blocks=48, max_num_seqs=16,
              max_num_batched_tokens=128, warm_start=False, compile_cache_dir=None, seed=0)
ENGINE_FLAGS = ["--mesh=2x2", "--block_size=16", "--kv_blocks=24", "--host_kv_blocks=48",
                "--max_num_seqs=16", "--max_num_batched_tokens=128", "--warm_start=false",
                "--compile_cache_dir=none", "--seed=0"]
ONE_INSTANCE_TOKENS = 24 * 16


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def llm(model_dir):
    llm = AsyncLLM(model_dir, **ENGINE)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def server(llm):
    s = ServerThread(llm, ServerConfig(NAME))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def hf(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy continuation and the log-softmax at each generated position."""
    import torch

    ids, lps = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1).numpy()
            lps.append(lp)
            ids.append(int(np.argmax(lp)))
    return ids[len(ids) - n:], lps


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# ---------------------------------------------------------------- outputs
PROMPTS = ["The KV cache of a long request", "Once upon a time", "Queries are small"]


def test_greedy_completions_equal_transformers(client, hf):
    model, tok = hf
    r = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    prompt_tokens = 0
    for p, c in zip(PROMPTS, r.choices):
        ids = tok(p)["input_ids"]
        prompt_tokens += len(ids)
        want, _ = hf_greedy(model, ids, 10)
        assert c.text == tok.decode(want, skip_special_tokens=True)
        assert c.finish_reason == "length"
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens == 30
    assert r.usage.total_tokens == prompt_tokens + 30


def test_token_id_prompts_echo_and_logprobs_equal_transformers(client, hf):
    model, tok = hf
    ids = [40, 41, 300, 7, 99]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, echo=True,
                                  logprobs=3, extra_body={"ignore_eos": True})
    c = r.choices[0]
    want, lps = hf_greedy(model, ids, 6)
    prompt_text = tok.decode(ids)
    assert c.text == prompt_text + tok.decode(want)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # prompt positions: log p(ids[i] | ids[:i]) from the full-prompt forward pass
    import torch

    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(full[i - 1, ids[i]], abs=2e-4)
    for j in range(6):
        k = len(ids) + j
        assert lp.token_logprobs[k] == pytest.approx(lps[j][want[j]], abs=2e-4)
        assert lp.tokens[k] == tok.decode([want[j]])
        # OpenAI's form keys the top tokens by their text (two tokens may share
        # one, e.g. partial UTF-8): each entry is one of the 3 most likely or
        # the chosen token, with its logprob
        cands = list(np.argsort(-lps[j])[:3]) + [want[j]]
        for text, v in lp.top_logprobs[k].items():
            assert any(tok.decode([t]) == text and abs(lps[j][t] - v) < 2e-4 for t in cands)
    # text_offset: where each token's string starts
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 6


def test_penalties_and_logit_bias_are_honoured(client, hf):
    """OpenAI's penalties, vLLM's repetition_penalty and logit_bias reach the
    engine: a +100 bias forces its token; a batch mixing penalties is fine."""
    _, tok = hf
    r = client.completions.create(model=NAME, prompt=[40, 41, 7, 40, 41], max_tokens=4,
                                  temperature=0, presence_penalty=0.5, frequency_penalty=-0.5,
                                  logit_bias={"77": 100},
                                  extra_body={"ignore_eos": True, "repetition_penalty": 1.3})
    assert r.choices[0].text == tok.decode([77] * 4)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, temperature=0, logit_bias={"78": 100},
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == tok.decode([78] * 3, skip_special_tokens=True)


def test_streamed_deltas_concatenate_to_the_non_streamed_text(client):
    kw = dict(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0.8, seed=7,
              stop=[" the"], extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] == whole.choices[0].finish_reason and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens


def test_continuous_usage_stats_count_tokens_so_far(server):
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "prompt": [5, 6, 7], "max_tokens": 5, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 5
    assert all(e["usage"]["prompt_tokens"] == 3 for e in events)


def test_multi_turn_chat_reuses_its_history_from_the_prefix_cache(server, client):
    """The second turn's prompt starts with the first turn's: its full
    blocks come from the cache, reported in usage.prompt_tokens_details and
    in /metrics."""
    before = httpx.get(server.url + "/metrics").text
    hits0 = sum(metric(before, "distkv:prefix_cache_hits_total", instance=i, scope=s)
                for i in (0, 1) for s in ("local", "remote"))
    history = [{"role": "user", "content": "Tell me about distributed KV caches. " * 6}]
    r1 = client.chat.completions.create(model=NAME, messages=history, max_tokens=8,
                                        temperature=0, extra_body={"ignore_eos": True})
    history += [{"role": "assistant", "content": r1.choices[0].message.content},
                {"role": "user", "content": "And then?"}]
    r2 = client.chat.completions.create(model=NAME, messages=history, max_tokens=4,
                                        temperature=0, extra_body={"ignore_eos": True})
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # the first turn's full blocks (16 tokens) at least
    assert cached >= r1.usage.prompt_tokens // 16 * 16 > 0, (cached, r1.usage)
    assert cached % 16 == 0 and cached < r2.usage.prompt_tokens
    after = httpx.get(server.url + "/metrics").text
    hits = sum(metric(after, "distkv:prefix_cache_hits_total", instance=i, scope=s)
               for i in (0, 1) for s in ("local", "remote"))
    assert hits - hits0 >= cached
    assert sum(metric(after, "distkv:prefix_cache_queries_total", instance=i) for i in (0, 1)) > 0


def test_chat_prompt_is_the_chat_template_and_streams(client, hf):
    model, tok = hf
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hello to the world."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(ids)
    want, lps = hf_greedy(model, ids, 8)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == tok.decode(want, skip_special_tokens=True)
    content = r.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx([lps[j][want[j]] for j in range(8)],
                                                         abs=2e-4)
    assert all(len(e.top_logprobs) == 2 for e in content)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=8,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"


# ------------------------------------------------- parallel sampling (n > 1)
def _chunks_by_choice(chunks, field):
    """{choice index: (concatenated text, finish reasons in order)}."""
    got = {}
    for ch in chunks:
        for c in ch.choices:
            text, reasons = got.get(c.index, ("", []))
            piece = getattr(c, field) if field == "text" else (c.delta.content or "")
            got[c.index] = (text + piece, reasons + [c.finish_reason])
    return got


def test_completions_n_gives_prompt_major_choices_each_its_own_seed(client):
    prompts = [PROMPTS[1], PROMPTS[2]]
    kw = dict(model=NAME, max_tokens=6, temperature=1.0, seed=21, extra_body={"ignore_eos": True})
    r = client.completions.create(prompt=prompts, n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in r.choices)
    # choice p*n + i is prompt p's sequence i: the n=1 run with seed 21 + i
    prompt_tokens = 0
    for p, prompt in enumerate(prompts):
        for i in range(2):
            one = client.completions.create(prompt=prompt, **dict(kw, seed=21 + i))
            assert r.choices[p * 2 + i].text == one.choices[0].text
        prompt_tokens += one.usage.prompt_tokens
    # the prompts count once each; the completions of every choice
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.completion_tokens == 4 * 6
    stream = list(client.completions.create(prompt=prompts, n=2, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    got = _chunks_by_choice(stream, "text")
    assert sorted(got) == [0, 1, 2, 3]
    for c in r.choices:
        text, reasons = got[c.index]
        assert text == c.text
        assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}
    assert stream[-1].usage.completion_tokens == 24
    assert stream[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_completions_n_with_echo_logprobs_and_stop_strings_stream_like_the_whole(client):
    kw = dict(model=NAME, prompt=[40, 41, 300, 7], n=3, max_tokens=8, temperature=0.9, seed=5,
              echo=True, logprobs=1, stop=[" the", "e"], extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    stream = list(client.completions.create(stream=True, **kw))
    got = _chunks_by_choice(stream, "text")
    for c in whole.choices:
        assert got[c.index][0] == c.text and got[c.index][1][-1] == c.finish_reason
        assert c.logprobs.token_logprobs[0] is None  # the echoed prompt's first token
        assert len(c.logprobs.tokens) >= 4
    toks = {}
    for ch in stream:
        for c in ch.choices:
            if c.logprobs is not None:
                toks.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
    for c in whole.choices:
        assert toks[c.index] == pytest.approx(c.logprobs.token_logprobs, abs=1e-6)


def test_chat_n_streams_every_choice(client):
    messages = [{"role": "user", "content": "Say hello to the world."}]
    kw = dict(model=NAME, messages=messages, n=2, max_tokens=7, temperature=1.0, seed=3,
              extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.usage.completion_tokens == 14
    chunks = list(client.chat.completions.create(stream=True, **kw))
    roles = [c.index for ch in chunks for c in ch.choices if c.delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    got = _chunks_by_choice(chunks, "delta")
    for c in whole.choices:
        text, reasons = got[c.index]
        assert text == c.message.content and reasons[-1] == "length"
        assert reasons.count("length") == 1


# ----------------------------------------------------------------- errors
def _post(url, body, **kw):
    return httpx.post(url + "/v1/completions", content=body if isinstance(body, bytes)
                      else json.dumps(body), timeout=60, **kw)


def _error(r, status):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["code"] == status
    return e


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "hi", "temperature": -1}, "temperature", "temperature=-1"),
    ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens", "max_tokens='ten'"),
    ({"prompt": "hi", "frobnicate": 1}, "frobnicate", "unknown field"),
    ({"prompt": ""}, "prompt", "empty prompt"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [3, 512]}, "prompt", "outside the vocabulary"),
    ({"prompt": "hi", "n": 0}, "n", "n=0"),
    ({"prompt": "hi", "n": 2, "best_of": 3}, "best_of", "best_of=3"),
    ({"prompt": "hi", "frequency_penalty": 2.5}, "frequency_penalty", "in [-2, 2]"),
    ({"prompt": "hi", "presence_penalty": -3}, "presence_penalty", "in [-2, 2]"),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty", "in (0, 2]"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias", "in [-100, 100]"),
    ({"prompt": "hi", "logit_bias": {"five": 1}}, "logit_bias", "token ids"),
    # the engine's own checks answer with the prompt's param, as max_logprobs does
    ({"prompt": "hi", "logit_bias": {"100000": 1}}, "prompt", "logit_bias: token id 100000"),
    ({"prompt": "hi", "logprobs": 999}, "prompt", "max_logprobs"),
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens", "context limit"),
])
def test_invalid_fields_answer_400_naming_them(server, body, param, words):
    e = _error(_post(server.url, body), 400)
    assert e["param"] == param and words in e["message"]


def test_malformed_and_non_object_bodies_answer_400(server):
    assert "not valid JSON" in _error(_post(server.url, b"{nope"), 400)["message"]
    assert "JSON object" in _error(_post(server.url, b"[1, 2]"), 400)["message"]
    assert "not valid JSON" in _error(_post(server.url, b"\xff\xfe"), 400)["message"]


def test_unknown_model_404_and_unknown_route(server, client):
    e = _error(_post(server.url, {"model": "gpt-5", "prompt": "hi"}), 404)
    assert "gpt-5" in e["message"]
    _error(httpx.get(server.url + "/v1/nothing"), 404)
    assert client.models.list().data[0].id == NAME


def test_prompt_over_the_policy_kv_states_both_numbers(llm):
    """kv_policy local: a request may hold one instance's KV only."""
    import dataclasses

    local = AsyncLLM.from_engine_args(dataclasses.replace(llm.engine_args, kv_policy="local",
                                                          host_attention=False))
    s = ServerThread(local, ServerConfig(NAME))
    try:
        e = _error(_post(s.url, {"prompt": [5] * 400}), 400)
        assert "400 tokens" in e["message"] and f"{ONE_INSTANCE_TOKENS} tokens" in e["message"]
    finally:
        s.stop()
        local.shutdown()


def test_api_key_body_limit_queue_limit_and_missing_template(llm):
    s = ServerThread(llm, ServerConfig(NAME, api_key="sekret", max_request_bytes=2000,
                                       max_queued_requests=2))
    try:
        auth = {"Authorization": "Bearer sekret"}
        _error(_post(s.url, {"prompt": "hi"}), 401)
        _error(_post(s.url, {"prompt": "hi"}, headers={"Authorization": "Bearer wrong"}), 401)
        assert _post(s.url, {"prompt": "hi", "max_tokens": 2}, headers=auth).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200  # no key needed
        e = _error(_post(s.url, {"prompt": "x" * 5000}, headers=auth), 413)
        assert "2000" in e["message"]

        # more than 2 waiting: 503 with Retry-After; every accepted one completes
        async def burst():
            async with httpx.AsyncClient(timeout=120, headers=auth) as c:
                rs = await asyncio.gather(*[c.post(s.url + "/v1/completions", json={
                    "prompt": [7 + k] * 200, "max_tokens": 4, "ignore_eos": True})
                    for k in range(24)])
            return rs

        rs = asyncio.run(burst())
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
        for r in rs:
            if r.status_code == 503:
                assert r.headers["Retry-After"] and "waiting" in _error(r, 503)["message"]
            else:
                assert r.json()["choices"][0]["finish_reason"] == "length"

        tok = llm.get_tokenizer()
        saved, tok.chat_template = tok.chat_template, None
        try:
            r = httpx.post(s.url + "/v1/chat/completions", headers=auth, timeout=60,
                           json={"messages": [{"role": "user", "content": "hi"}]})
            assert "no chat template" in _error(r, 400)["message"]
        finally:
            tok.chat_template = saved
    finally:
        s.stop()


_field_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 40),
                          st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                          st.lists(st.integers(-2, 600), max_size=5),
                          st.lists(st.text(max_size=3), max_size=3),
                          st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
_fields = st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p",
                           "seed", "stop", "n", "logprobs", "echo", "stream", "min_tokens",
                           "stop_token_ids", "ignore_eos", "stream_options", "model", "user",
                           "logit_bias", "messages", "best_of", "bogus", "presence_penalty",
                           "frequency_penalty", "repetition_penalty"])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.dictionaries(_fields, _field_values, max_size=6),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_random_bodies_never_5xx(server, body, path):
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 8)
    raw = json.dumps(body, allow_nan=True)
    r = httpx.post(server.url + path, content=raw, timeout=120)
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        _error(r, r.status_code)
    assert httpx.get(server.url + "/health").status_code == 200


# ------------------------------------------------------ load and lifecycle
def test_disconnect_mid_stream_frees_the_request_within_a_second(server):
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", json={
                "prompt": [9] * 300, "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data:")
                if got == 3:
                    m = c.get(server.url + "/metrics").text
                    assert metric(m, "distkv:num_requests_running") == 1
                    assert metric(m, "distkv:kv_cache_usage_perc", instance=0) > 0
                    break  # closes the connection
        left = time.monotonic()
    while True:
        m = httpx.get(server.url + "/metrics").text
        idle = (metric(m, "distkv:num_requests_running") == 0 and all(
            metric(m, "distkv:kv_cache_usage_perc", instance=i) == 0 for i in (0, 1)))
        if idle:
            break
        assert time.monotonic() - left < 1.0, m
        time.sleep(0.05)
    assert metric(m, "distkv:request_success_total", finished_reason="abort") >= 1


def _mixed_requests():
    rng = np.random.default_rng(0)
    reqs = []
    for k in range(64):
        n = 420 if k % 16 == 5 else int(rng.integers(3, 120))  # 4 longer than one instance's KV
        body = {"prompt": rng.integers(3, 500, n).tolist(), "max_tokens": int(rng.integers(2, 14)),
                "ignore_eos": True, "temperature": 0.0 if k % 2 else 0.9, "seed": k}
        reqs.append(body)
    return reqs


async def _stream_text(c, url, body) -> tuple[str, list]:
    text, finish = "", None
    async with c.stream("POST", url + "/v1/completions", json=dict(body, stream=True)) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ch = json.loads(line[6:])["choices"][0]
                text += ch["text"]
                finish = ch["finish_reason"] or finish
    return text, finish


def test_64_concurrent_streams_of_mixed_lengths_equal_their_solo_runs(server):
    reqs = _mixed_requests()
    solo = []
    for body in reqs:
        r = _post(server.url, body)
        assert r.status_code == 200, r.text
        solo.append(r.json()["choices"][0]["text"])

    async def run():
        async with httpx.AsyncClient(timeout=600) as c:
            return await asyncio.gather(*[_stream_text(c, server.url, b) for b in reqs])

    before = httpx.get(server.url + "/metrics").text
    got = asyncio.run(run())
    for k, ((text, finish), want) in enumerate(zip(got, solo)):
        assert finish == "length" and text == want, k
    # the long prompts held KV borrowed from the other instance
    assert server.llm.engine.stats["max_remote_blocks"] > 0
    m = httpx.get(server.url + "/metrics").text
    # long and short requests together: TTFT and queue time by class at
    # arrival (4 prompts over long_prefill_token_threshold = 128), the steps
    # that ran a long prefill chunk, the reserve (8 blocks' worth, at most a
    # quarter of 24), nobody waiting now
    for name in ("distkv:time_to_first_token_seconds_count", "distkv:request_queue_time_seconds_count"):
        assert metric(m, name, request_class="long") - metric(before, name, request_class="long") == 4
        assert metric(m, name, request_class="short") - metric(before, name, request_class="short") == 60
    assert metric(m, "distkv:long_prefill_steps_total") > metric(before, "distkv:long_prefill_steps_total")
    assert metric(m, "distkv:kv_blocks_reserved") == 6
    assert metric(m, "distkv:num_requests_waiting_by_class", request_class="long") == 0
    assert metric(m, "distkv:max_request_instances") == 0  # all done: nothing held
    assert metric(m, "distkv:num_requests_running") == 0
    # host-attended KV's counters are exported per instance (nothing held now)
    for i in (0, 1):
        assert metric(m, "distkv:kv_host_attended_blocks", instance=i) == 0
        for d in ("offloaded", "brought_back"):
            assert metric(m, "distkv:kv_host_offloaded_blocks_total", instance=i, direction=d) >= 0
        assert metric(m, "distkv:kv_reclaimed_blocks_total", instance=i, how="offloaded") >= 0


# ----------------------------------------------- a real process, two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd, log_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # the launcher sizes the simulated devices itself
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(url, proc, log_path, timeout=300) -> list[int]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, open(log_path).read()[-3000:]
        try:
            code = httpx.get(url + "/health", timeout=2).status_code
        except httpx.TransportError:
            code = None
        if code is not None:
            seen.append(code)
        if code == 200:
            return seen
        time.sleep(0.2)
    raise AssertionError("server not ready: " + open(log_path).read()[-3000:])


def _requests_for_processes():
    return [{"prompt": [11 + k] * (5 + 60 * k), "max_tokens": 6, "ignore_eos": True,
             "temperature": 0.0 if k % 2 else 0.7, "seed": k} for k in range(8)]


def test_two_process_server_equals_one_process_and_drains_on_sigterm(server, tmp_path):
    bodies = _requests_for_processes()
    want = []
    for b in bodies:
        r = _post(server.url, b)  # the module's one-process server
        assert r.status_code == 200, r.text
        want.append(r.json()["choices"][0]["text"])
    port = _free_port()
    log_path = tmp_path / "server.log"
    proc = _start([sys.executable, os.path.join("launch", "local.py"), "-n", "2", "--",
                   "--serve", f"--port={port}", "--model=tiny", *ENGINE_FLAGS], log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        seen = _wait_ready(url, proc, log_path)
        assert 503 in seen or seen == [200]

        async def run():
            async with httpx.AsyncClient(timeout=300) as c:
                return await asyncio.gather(*[c.post(url + "/v1/completions", json=b)
                                              for b in bodies])

        got = [r.json()["choices"][0]["text"] for r in asyncio.run(run())]
        assert got == want

        # SIGTERM while a stream runs: it finishes, then every process exits 0
        async def long_stream():
            async with httpx.AsyncClient(timeout=300) as c:
                task = asyncio.create_task(_stream_text(c, url, {
                    "prompt": [5] * 20, "max_tokens": 120, "ignore_eos": True}))
                await asyncio.sleep(1.0)
                proc.send_signal(signal.SIGTERM)
                return await task

        text, finish = asyncio.run(long_stream())
        assert finish == "length"
        assert proc.wait(120) == 0, open(log_path).read()[-3000:]
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
