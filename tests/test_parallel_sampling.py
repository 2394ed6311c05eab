"""Parallel sampling (SamplingParams.n > 1, as vLLM's): one submitted request,
n sequences, one RequestOutput with n CompletionOutputs (index 0..n-1).
Sequence i samples with seed (request seed) + i, so it equals the
single-sequence run with that seed token for token."""

from __future__ import annotations

import numpy as np
import pytest

from distkv_jax import LLM, SamplingParams

from control_plane_model import check_all_free

PROMPT = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
OTHERS = [list(range(30, 52)), [7, 8, 9]]


@pytest.fixture(scope="module")
def llm():
    # 2 instances x 8 blocks of 8 tokens: a few requests at once share the pool
    return LLM("tiny", mesh="2x1", block_size=8, kv_blocks=8, host_kv_blocks=8,
               max_num_batched_tokens=32, warm_start=False)


def sp(**kw) -> SamplingParams:
    base = dict(temperature=1.0, max_tokens=10, ignore_eos=True)
    return SamplingParams(**(base | kw))


def _same_logprobs(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        np.testing.assert_allclose([v.logprob for v in x.values()],
                                   [y[k].logprob for k in x], atol=1e-5, rtol=0)


def test_sequence_i_equals_the_single_run_with_seed_plus_i(llm):
    out = llm.generate([PROMPT], sp(n=3, seed=100, logprobs=2))[0]
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
    singles = llm.generate([PROMPT] * 3, [sp(seed=100 + i, logprobs=2) for i in range(3)])
    for c, single in zip(out.outputs, singles):
        s = single.outputs[0]
        assert c.token_ids == s.token_ids and len(c.token_ids) == 10
        assert c.text == s.text and c.finish_reason == "length"
        _same_logprobs(c.logprobs, s.logprobs)   # logprobs per sequence
        assert c.cumulative_logprob == pytest.approx(s.cumulative_logprob, abs=1e-4)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3  # the seeds differ
    assert out.prompt_token_ids == PROMPT and out.prompt_logprobs is None


def test_engine_assigned_seeds_are_consecutive_and_stats_count_the_prompt_once(llm):
    eng = llm.engine
    before = dict(eng.stats)
    rid = eng.add_request(PROMPT, sp(n=3, max_tokens=4), request_id="noseed")
    seqs = eng._groups[rid]
    assert [s.seed - seqs[0].seed for s in seqs] == [0, 1, 2]
    assert [s.index for s in seqs] == [0, 1, 2] and {s.parent_id for s in seqs} == {rid}
    assert seqs[1].fork_of is seqs[0] and seqs[2].fork_of is seqs[0] and seqs[0].fork_of is None
    assert len({s.request_id for s in seqs}) == 3 and rid not in eng.scheduler.requests
    assert eng.num_live() == 1
    finals = [o for outs in eng.iterate(only_finished=True) for o in outs]
    assert [o.request_id for o in finals] == [rid]     # one output, only once, when all done
    assert len(finals[0].outputs) == 3
    assert eng.stats["prompt_tokens"] - before["prompt_tokens"] == len(PROMPT)
    assert eng.stats["generation_tokens"] - before["generation_tokens"] == 3 * 4
    assert eng.num_live() == 0 and not eng._groups
    check_all_free(eng.kv)


def test_greedy_sequences_are_identical(llm):
    out = llm.generate([PROMPT], sp(n=2, temperature=0))[0]
    single = llm.generate([PROMPT], sp(temperature=0))[0].outputs[0]
    assert [c.index for c in out.outputs] == [0, 1]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == single.token_ids


def test_n_request_mixed_in_a_batch_with_single_requests(llm):
    params = [sp(seed=1), sp(n=3, seed=50), sp(temperature=0), sp(n=2, seed=9, max_tokens=6)]
    prompts = [OTHERS[0], PROMPT, OTHERS[1], OTHERS[1]]
    outs = llm.generate(prompts, params)
    assert [len(o.outputs) for o in outs] == [1, 3, 1, 2]
    solo = llm.generate([OTHERS[0], PROMPT, PROMPT, PROMPT, OTHERS[1], OTHERS[1], OTHERS[1]],
                        [sp(seed=1), sp(seed=50), sp(seed=51), sp(seed=52), sp(temperature=0),
                         sp(seed=9, max_tokens=6), sp(seed=10, max_tokens=6)])
    got = [c.token_ids for o in outs for c in o.outputs]
    assert got == [o.outputs[0].token_ids for o in solo]
    check_all_free(llm.engine.kv)


def test_streamed_outputs_are_cumulative_per_sequence(llm):
    seen = []
    for out in llm.generate_stream([PROMPT], sp(n=2, seed=3, max_tokens=6)):
        assert [c.index for c in out.outputs] == [0, 1]
        seen.append(out)
    assert [o.finished for o in seen] == [False] * (len(seen) - 1) + [True]
    for j in range(2):
        counts = [len(o.outputs[j].token_ids) for o in seen]
        assert counts == sorted(counts) and counts[-1] == 6
        assert seen[-2].outputs[j].token_ids == seen[-1].outputs[j].token_ids[:counts[-2]]


def test_abort_of_the_parent_id_ends_every_sequence(llm):
    eng = llm.engine
    rid = eng.add_request(PROMPT, sp(n=3, max_tokens=200, seed=4), request_id="victim")
    other = eng.add_request(OTHERS[1], sp(max_tokens=5, seed=4), request_id="bystander")
    outs = []
    for step_outs in eng.iterate():
        outs += step_outs
        mine = [o for o in step_outs if o.request_id == rid]
        if mine and all(len(c.token_ids) >= 3 for c in mine[-1].outputs):
            break
    assert eng.abort(rid) and not eng.abort("victim-unknown")
    finals = {o.request_id: o for outs in eng.iterate() for o in outs if o.finished}
    assert [c.finish_reason for c in finals[rid].outputs] == ["abort"] * 3
    assert all(3 <= len(c.token_ids) < 200 for c in finals[rid].outputs)
    assert finals[other].outputs[0].finish_reason == "length"
    assert not eng.abort(rid) and eng.num_live() == 0
    check_all_free(eng.kv)
    # the id may be reused once its final output went out
    eng.add_request(PROMPT, sp(n=2, max_tokens=2), request_id=rid)
    assert eng.abort_all() == 1
    finals = [o for outs in eng.iterate() for o in outs if o.finished]
    assert [o.request_id for o in finals] == [rid]
    check_all_free(eng.kv)


def test_prompt_logprobs_are_computed_once(llm):
    eng = llm.engine
    rid = eng.add_request(PROMPT, sp(n=3, seed=5, max_tokens=3, prompt_logprobs=2),
                          request_id="plp")
    seqs = eng._groups[rid]
    assert seqs[0].params.prompt_logprobs == 2
    assert seqs[1].params.prompt_logprobs is None and seqs[2].params.prompt_logprobs is None
    final = [o for outs in eng.iterate() for o in outs if o.finished and o.request_id == rid][0]
    single = llm.generate([PROMPT], sp(seed=5, max_tokens=3, prompt_logprobs=2))[0]
    assert final.prompt_logprobs[0] is None and len(final.prompt_logprobs) == len(PROMPT)
    _same_logprobs(final.prompt_logprobs[1:], single.prompt_logprobs[1:])
    assert final.outputs[0].token_ids == single.outputs[0].token_ids
    assert final.num_cached_tokens >= 0


def test_refused_n_request_gives_one_error_output(llm):
    outs = llm.generate([[1, 2, 10 ** 6], PROMPT], [sp(n=3), sp(n=2, max_tokens=2)])
    assert len(outs[0].outputs) == 1 and outs[0].outputs[0].finish_reason == "error"
    assert "outside the vocabulary" in outs[0].error
    assert [c.finish_reason for c in outs[1].outputs] == ["length", "length"]


def test_sequences_fork_from_sequence_0_without_the_cache(monkeypatch):
    """With the prefix cache off, sequences 1..n-1 still share sequence 0's
    prompt blocks: a fork shares the full blocks and copies the partial one,
    and the outputs equal the single runs."""
    llm = LLM("tiny", mesh="2x1", block_size=4, kv_blocks=16, max_num_batched_tokens=32,
              warm_start=False, enable_prefix_caching=False)
    eng = llm.engine
    forks, copies = [], []
    real_fork, real_copy = eng.kv.fork, eng.runner.copy_kv

    def fork(child, parent, n):
        ok = real_fork(child, parent, n)
        forks.append((ok, n, len(eng.kv.block_ids(child))))
        return ok

    def copy_kv(kvp):
        copies.extend(kvp.forks.pairs)
        return real_copy(kvp)

    monkeypatch.setattr(eng.kv, "fork", fork)
    monkeypatch.setattr(eng.runner, "copy_kv", copy_kv)
    out = llm.generate([PROMPT], sp(n=3, seed=5))[0]
    # 11 prompt tokens: 10 forked (2 full blocks of 4 shared, 2 tokens copied)
    assert forks == [(True, 10, 3), (True, 10, 3)]
    assert len(copies) == 2
    singles = llm.generate([PROMPT] * 3, [sp(seed=5 + i) for i in range(3)])
    assert [c.token_ids for c in out.outputs] == [s.outputs[0].token_ids for s in singles]
    assert all(o.num_cached_tokens == 0 for o in singles)
    check_all_free(eng.kv)
