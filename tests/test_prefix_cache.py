"""The prefix cache end to end: requests sharing prefixes of many lengths
(inside a block, at a block boundary, the whole prompt, a multi-turn history
with generated tokens) give the same greedy tokens and logprobs with the
cache on and off, equal to transformers, on 1x1, 2x4 and 8x1, with prefixes
held on the request's own instance or on others, under preemption (swap and
recompute), migration and eviction."""

import numpy as np
import pytest

from distkv_jax import LLM, SamplingParams

from hf_models import hf_greedy, make_hf_model

MAX_NEW = 8
BS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama_prefix"))
    return path, make_hf_model("llama_gqa", path)


@pytest.fixture(scope="module")
def waves():
    """Wave 1 computes a 50-token document; wave 2 shares its prefix at
    5 (inside the first block), 16 (a block boundary), 37 tokens, the
    block-aligned 48 and the whole 50 (nothing left but the last token)."""
    rng = np.random.default_rng(3)
    doc = rng.integers(3, 256, size=50).tolist()
    tail = lambda n: rng.integers(3, 256, size=n).tolist()  # noqa: E731
    wave2 = [doc[:5] + tail(7), doc[:16] + tail(9), doc[:37] + tail(4), doc[:48], list(doc)]
    return [doc], wave2, tail(6)


@pytest.fixture(scope="module")
def reference(llama, waves):
    """transformers' greedy tokens and their log-softmax, per prompt (the
    multi-turn prompt is built from wave 1's output, then referenced too)."""
    import torch

    _, model = llama
    memo = {}

    def ref(prompt):
        key = tuple(prompt)
        if key not in memo:
            toks = hf_greedy(model, prompt, MAX_NEW)
            with torch.no_grad():
                logits = model(torch.tensor([prompt + toks])).logits[0].double()
            logp = torch.log_softmax(logits, -1).numpy()
            memo[key] = (toks, [logp[len(prompt) - 1 + i, t] for i, t in enumerate(toks)])
        return memo[key]
    return ref


def _run(llm, waves):
    """Both waves, then a multi-turn follow-up on wave 1's conversation."""
    wave1, wave2, follow = waves
    out1 = llm.generate(wave1, GREEDY)
    out2 = llm.generate(wave2, GREEDY)
    turn = wave1[0] + out1[0].outputs[0].token_ids + follow
    out3 = llm.generate([turn], GREEDY)
    return out1 + out2 + out3, wave1 + wave2 + [turn]


def _tokens_and_logprobs(out):
    c = out.outputs[0]
    assert c.finish_reason == "length", out.error
    return c.token_ids, [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]


CASES = {
    # mesh, kv_blocks per instance, host blocks: roomy pools (hits on own and
    # other instances) and tight ones (borrowing, eviction, preemption)
    "1x1": ("1x1", 64, 0),
    "2x4": ("2x4", 24, 0),
    "8x1": ("8x1", 4, 0),
    "2x4-swap": ("2x4", 6, 16),
    "2x4-recompute": ("2x4", 6, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cache_on_equals_cache_off_equals_transformers(llama, waves, reference, case):
    path, _ = llama
    mesh, kv_blocks, host = CASES[case]
    runs = {}
    for caching in (True, False):
        # the long/short policy off (first come, first served): the tight
        # pools preempt, which these cases exercise
        llm = LLM(path, warm_start=False, mesh=mesh, block_size=BS, kv_blocks=kv_blocks,
                  host_kv_blocks=host, max_num_batched_tokens=32, enable_prefix_caching=caching,
                  long_prefill_token_threshold=1 << 30)
        outs, prompts = _run(llm, waves)
        runs[caching] = [_tokens_and_logprobs(o) for o in outs]
        eng = llm.engine
        cached = [o.num_cached_tokens for o in outs]
        if caching:
            # wave 2: 0 (inside a block), 16, 32, 40 (the last block is
            # computed again), 48; the follow-up reuses the document and the
            # generated tokens' full blocks. Under tight pools, eviction may
            # have dropped some: never more than these.
            ideal = [0, 0, 16, 32, 40, 48, (len(prompts[-1]) - 1) // BS * BS]
            assert all(0 <= c <= i for c, i in zip(cached, ideal)), cached
            if case in ("1x1", "2x4", "8x1"):
                assert cached == ideal, cached
            snap = eng.metrics_snapshot()
            # (a request recomputed after preemption looks the cache up again)
            assert sum(snap["prefix_cache_hits"]) >= sum(cached) > 0
            assert sum(snap["prefix_cache_queries"]) >= sum(len(p) for p in prompts[1:])
            if mesh != "1x1":
                assert sum(snap["prefix_cache_hits_remote"]) > 0, snap  # read in place elsewhere
            if kv_blocks == 6:                  # tight pools: cached prefixes were evicted
                assert sum(snap["prefix_cache_evictions"]) > 0, snap
            if case == "2x4-recompute":         # ... and lent blocks came back (migrated
                back = (eng.stats["migrated_blocks"] + sum(snap["kv_reclaimed_moved"])
                        + sum(snap["kv_reclaimed_preempted"]))   # home, or reclaimed)
                assert back > 0, (eng.stats, snap["kv_reclaimed_preempted"])
            if case == "8x1":                   # a request's KV spans instances
                assert eng.stats["max_remote_blocks"] > 0, eng.stats
        else:
            assert cached == [0] * len(cached)
        if case.endswith("swap"):
            assert eng.stats["swapped_out_blocks"] > 0, eng.stats
        if case.endswith("recompute"):
            assert eng.stats["preemptions"] > 0 and eng.stats["swapped_out_blocks"] == 0, eng.stats
        # every block is free or cached (evictable) at the end
        assert (eng.kv.free_device_blocks() == kv_blocks).all()
        assert not eng.kv.ledger().any()
    for (t_on, lp_on), (t_off, lp_off), p in zip(runs[True], runs[False], prompts):
        assert t_on == t_off
        np.testing.assert_allclose(lp_on, lp_off, atol=1e-5, rtol=0)
        toks, lps = reference(p)
        assert t_on == toks
        np.testing.assert_allclose(lp_on, lps, atol=1e-4, rtol=0)


def test_prompt_logprobs_compute_the_whole_prompt(llama, waves):
    path, _ = llama
    llm = LLM(path, warm_start=False, mesh="2x4", block_size=BS, kv_blocks=24,
              max_num_batched_tokens=32)
    doc = waves[0][0]
    llm.generate([doc], GREEDY)
    plain, with_lp = llm.generate([doc, doc], [GREEDY, SamplingParams(
        temperature=0.0, max_tokens=MAX_NEW, prompt_logprobs=1)])
    assert plain.num_cached_tokens == 48
    assert with_lp.num_cached_tokens == 0
    assert len(with_lp.prompt_logprobs) == len(doc)
    assert plain.outputs[0].token_ids == with_lp.outputs[0].token_ids
