"""Reclaimable lending on a real engine: a long request borrows most of an
8x1 mesh, then short requests arrive on its creditors. The creditors take
their blocks back (moving the long request's blocks, then preempting it),
every short request completes, and the long one completes with the same
tokens and logprobs as transformers. With host-attended KV the long
request's oldest blocks go to the host tier instead, and nobody is
preempted."""

import numpy as np
import pytest

from distkv_jax import LLM, SamplingParams

from hf_models import hf_greedy_logprobs, make_hf_model

BS, KV_BLOCKS = 8, 6  # 8 instances x 6 blocks x 8 tokens = 384 slots


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("reclaim_llama"))
    return path, make_hf_model("llama_gqa", path)


@pytest.mark.parametrize("host_kv_blocks,host_attention", [(48, False), (0, True), (48, True)],
                         ids=["swap", "recompute", "host"])
def test_creditors_reclaim_from_a_long_request(llama, host_kv_blocks, host_attention):
    path, model = llama
    rng = np.random.default_rng(4)
    long_prompt = rng.integers(3, 256, size=330).tolist()     # 42 of the 48 blocks with its output
    shorts = [rng.integers(3, 256, size=n).tolist() for n in (20, 9, 30, 14, 25, 6, 17)]
    llm = LLM(path, warm_start=False, mesh="8x1", block_size=BS, kv_blocks=KV_BLOCKS,
              host_kv_blocks=host_kv_blocks, host_attention=host_attention,
              max_num_batched_tokens=32)
    # one request may hold the whole mesh: the default lends every free block
    host = 8 * host_kv_blocks if host_attention else 0
    assert llm.engine.kv.max_request_tokens() == (8 * KV_BLOCKS + host) * BS
    eng = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=8, logprobs=0, ignore_eos=True)
    long_id = eng.add_request(long_prompt, greedy)
    outs = {}
    while eng.scheduler.get(long_id).num_computed < len(long_prompt):   # its prompt is in the KV
        for o in eng.step(only_finished=True):
            outs[o.request_id] = o
    home = eng.kv.home(long_id)
    borrowed = eng.kv.ledger()[home].sum()
    assert borrowed >= 30, eng.kv.ledger()                    # most of the mesh is lent to it
    short_ids = [eng.add_request(p, greedy) for p in shorts]
    while eng.has_unfinished():
        for o in eng.step(only_finished=True):
            outs[o.request_id] = o
    snap = eng.metrics_snapshot()
    reclaimed = sum(snap["kv_reclaimed_moved"]) + sum(snap["kv_reclaimed_preempted"]) \
        + sum(snap["kv_reclaimed_offloaded"])
    assert reclaimed > 0, snap
    if host_kv_blocks and host_attention:  # the mesh was full: old blocks went to the host
        assert sum(snap["kv_offloaded_blocks"]) > 0 and eng.stats["preemptions"] == 0, snap
        assert sum(snap["kv_reclaimed_offloaded"]) > 0, snap  # the borrower's blocks went to host
    else:                                  # the mesh was full: preempted
        assert sum(snap["kv_reclaimed_preempted"]) > 0
    for rid, prompt in zip([long_id] + short_ids, [long_prompt] + shorts):
        comp = outs[rid].outputs[0]
        assert comp.finish_reason == "length", outs[rid].error
        toks, lps = hf_greedy_logprobs(model, prompt, 8)
        assert comp.token_ids == toks, rid
        got = [comp.logprobs[i][t].logprob for i, t in enumerate(toks)]
        np.testing.assert_allclose(got, lps, atol=1e-4, rtol=0)
    assert eng.stats["preemptions"] > 0 or host_attention
    assert (eng.kv.free_device_blocks() == KV_BLOCKS).all()  # free or evictable cache
    assert eng.kv.ledger().sum() == 0
