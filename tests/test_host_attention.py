"""Host-attended KV on a real engine: requests whose KV is mostly in host
memory (the host pool, pinned_host) and attended there by the host CPU.
Outputs equal transformers (greedy ids, logprobs within 1e-4) through
chunked prefill and decode, with blocks offloaded to the host and brought
back to the devices mid-request, on 1x1, 2x4 and 8x1."""

import numpy as np
import pytest

from distkv_jax import LLM, SamplingParams

from hf_models import hf_greedy_logprobs, make_hf_model

BS = 8
NEW = 24


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("host_attn_llama"))
    return path, make_hf_model("llama_gqa", path)


@pytest.mark.parametrize("mesh,kv_blocks", [("1x1", 12), ("2x4", 6), ("8x1", 2)])
def test_mostly_host_attended_requests_match_transformers(llama, mesh, kv_blocks):
    path, model = llama
    rng = np.random.default_rng(7)
    # a long request (two thirds or more of its KV on the host) and a shorter
    # one that finishes early: its device blocks then take the long one's
    # host blocks back, mid-request
    prompts = [rng.integers(3, 256, size=250).tolist(), rng.integers(3, 256, size=60).tolist()]
    max_tokens = [NEW, 12]
    llm = LLM(path, warm_start=False, mesh=mesh, block_size=BS, kv_blocks=kv_blocks,
              host_kv_blocks=48, max_num_batched_tokens=32, migrate_tokens_per_step=16)
    eng = llm.engine
    I = eng.kv.config.num_instances
    device_slots = I * kv_blocks * BS
    assert len(prompts[0]) + NEW > 2 * device_slots  # at least half on the host, by capacity
    ids = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=m, logprobs=0,
                                             ignore_eos=True))
           for p, m in zip(prompts, max_tokens)]
    outs, most_on_host = {}, 0
    while eng.has_unfinished():
        for o in eng.step(only_finished=True):
            outs[o.request_id] = o
        most_on_host = max(most_on_host, sum(eng.metrics_snapshot()["kv_host_attended_blocks"]))
    snap = eng.metrics_snapshot()
    assert sum(snap["kv_offloaded_blocks"]) > 0 and sum(snap["kv_brought_back_blocks"]) > 0, snap
    assert most_on_host * BS >= (len(prompts[0]) + NEW) // 2
    assert eng.stats["preemptions"] == 0   # the host tier made room: nobody was preempted
    for rid, prompt, m in zip(ids, prompts, max_tokens):
        comp = outs[rid].outputs[0]
        assert comp.finish_reason == "length", outs[rid].error
        toks, lps = hf_greedy_logprobs(model, prompt, m)
        assert comp.token_ids == toks, rid
        got = [comp.logprobs[i][t].logprob for i, t in enumerate(toks)]
        np.testing.assert_allclose(got, lps, atol=1e-4, rtol=0)
    # everything returned: device blocks free (or evictable cache), host pool empty
    assert (eng.kv.free_device_blocks() == kv_blocks).all()
    assert (eng.kv.free_host_blocks() == 48).all()
    assert sum(eng.metrics_snapshot()["kv_host_attended_blocks"]) == 0


def test_host_attention_off_preempts_instead(llama):
    """host_attention=False: the same request cannot exceed the devices."""
    path, _ = llama
    llm = LLM(path, warm_start=False, mesh="1x1", block_size=BS, kv_blocks=12,
              host_kv_blocks=48, host_attention=False, max_num_batched_tokens=32)
    assert llm.engine.kv.max_request_tokens() == 12 * BS
    llm2 = LLM(path, warm_start=False, mesh="1x1", block_size=BS, kv_blocks=12,
               host_kv_blocks=48, max_num_batched_tokens=32)
    assert llm2.engine.kv.max_request_tokens() == (12 + 48) * BS


def test_abort_frees_host_attended_blocks(llama):
    """Aborting a request whose older blocks are attended on the host gives
    back every block it held: device, borrowed and host; the other request
    completes unchanged."""
    from prefix_cache_model import check_shared_invariants

    path, model = llama
    rng = np.random.default_rng(9)
    long_prompt = rng.integers(3, 256, size=200).tolist()
    other = rng.integers(3, 256, size=30).tolist()
    llm = LLM(path, warm_start=False, mesh="2x4", block_size=BS, kv_blocks=6, host_kv_blocks=24,
              max_num_batched_tokens=32)
    eng = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=6, logprobs=0, ignore_eos=True)
    eng.add_request(long_prompt, greedy, request_id="long")
    eng.add_request(other, greedy, request_id="other")
    outs = {}
    for _ in range(200):
        if "long" in eng.kv.requests() and eng.kv.state("long") == "running" and \
                (eng.kv.block_ids("long") >= eng.kv.config.num_device_blocks).sum() >= 8:
            break
        for o in eng.step(only_finished=True):
            outs[o.request_id] = o
    else:
        pytest.fail("the long request never had 8 host-attended blocks")
    assert eng.abort("long")
    assert "long" not in eng.kv.requests()
    check_shared_invariants(eng.kv, set())
    while eng.has_unfinished():
        for o in eng.step(only_finished=True):
            outs[o.request_id] = o
    assert outs["long"].outputs[0].finish_reason == "abort"
    comp = outs["other"].outputs[0]
    toks, lps = hf_greedy_logprobs(model, other, 6)
    assert comp.token_ids == toks
    np.testing.assert_allclose([comp.logprobs[i][t].logprob for i, t in enumerate(toks)], lps,
                               atol=1e-4, rtol=0)
    assert (eng.kv.free_host_blocks() == 24).all() and (eng.kv.free_device_blocks() == 6).all()
    assert eng.kv.ledger().sum() == 0
