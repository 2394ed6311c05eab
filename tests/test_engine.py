"""The engine and LLM.generate against transformers, on simulated meshes, with
KV pools small enough that requests borrow blocks from other instances and
are swapped to host memory and back."""

import jax.numpy as jnp
import numpy as np
import pytest

from distkv_jax import LLM, SamplingParams

from hf_models import hf_greedy, make_hf_model

MAX_NEW = 16


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama_gqa"))
    return path, make_hf_model("llama_gqa", path)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    return [rng.integers(3, 256, size=n).tolist() for n in (3, 29, 12, 45, 1, 20)]


@pytest.fixture(scope="module")
def reference(llama, prompts):
    """transformers' greedy tokens and, at each generated position, its log-softmax."""
    import torch

    _, model = llama
    out = []
    for p in prompts:
        toks = hf_greedy(model, p, MAX_NEW)
        with torch.no_grad():
            logits = model(torch.tensor([p + toks])).logits[0].double()
        logp = torch.log_softmax(logits, -1).numpy()
        lps = [logp[len(p) - 1 + i, t] for i, t in enumerate(toks)]
        out.append((toks, lps))
    return out


def _check_parity(outs, reference):
    for out, (toks, lps) in zip(outs, reference):
        comp = out.outputs[0]
        assert comp.finish_reason == "length", out.error
        assert comp.token_ids == toks
        got = [comp.logprobs[i][t].logprob for i, t in enumerate(toks)]
        np.testing.assert_allclose(got, lps, atol=1e-4, rtol=0)
        assert comp.cumulative_logprob == pytest.approx(sum(got), abs=1e-4)


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=1)


# kv_blocks per instance with block_size 8: the longest request (45 + 16
# tokens = 8 blocks) does not fit in one instance's 6 blocks, so it borrows.
@pytest.mark.parametrize("mesh", ["1x1", "2x4", "4x2", "8x1"])
def test_greedy_parity_with_borrowing(llama, prompts, reference, mesh):
    path, _ = llama
    kv_blocks = 48 if mesh == "1x1" else 6
    llm = LLM(path, warm_start=False, mesh=mesh, block_size=8, kv_blocks=kv_blocks, max_num_batched_tokens=32)
    outs = llm.generate(prompts, GREEDY)
    _check_parity(outs, reference)
    if mesh != "1x1":
        assert llm.engine.stats["max_remote_blocks"] > 0  # some request held borrowed blocks
    # every block came back
    assert (llm.engine.kv.free_device_blocks() == kv_blocks).all()


@pytest.mark.parametrize("host_kv_blocks,host_attention", [(16, False), (0, False), (16, True)],
                         ids=["swap_to_host", "recompute", "host_attended"])
def test_greedy_parity_under_preemption(llama, prompts, reference, host_kv_blocks, host_attention):
    """A pool too small for the batch: requests are swapped to host and back,
    or, with no host tier, dropped and recomputed; with host-attended KV,
    older blocks go to the host tier and are attended there instead."""
    path, _ = llama
    llm = LLM(path, warm_start=False, mesh="2x4", block_size=8, kv_blocks=6, host_kv_blocks=host_kv_blocks,
              host_attention=host_attention, max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY)
    _check_parity(outs, reference)
    stats = llm.engine.stats
    if host_attention:
        snap = llm.engine.metrics_snapshot()
        assert sum(snap["kv_offloaded_blocks"]) > 0, snap
        assert (llm.engine.kv.free_host_blocks() == host_kv_blocks).all()
        return
    assert stats["preemptions"] > 0, stats
    if host_kv_blocks:
        assert stats["swapped_out_blocks"] > 0 and stats["swapped_in_blocks"] > 0, stats
    else:
        assert stats["swapped_out_blocks"] == 0, stats


@pytest.fixture(scope="module")
def tiny_llm():
    from distkv_jax.models.tiny import tiny_model_dir

    return LLM(tiny_model_dir(), warm_start=False, mesh="2x4", block_size=8, kv_blocks=16, max_num_batched_tokens=32)


def test_outputs_do_not_depend_on_the_batch(tiny_llm):
    rng = np.random.default_rng(5)
    target = rng.integers(3, 500, size=21).tolist()
    others = [rng.integers(3, 500, size=n).tolist() for n in (7, 33, 2, 50)]
    for params in (SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                   SamplingParams(temperature=0.9, top_p=0.9, seed=123, max_tokens=10, ignore_eos=True)):
        alone = tiny_llm.generate([target], params)[0].outputs[0].token_ids
        mixed = tiny_llm.generate(others[:2] + [target] + others[2:], params)[2].outputs[0].token_ids
        assert alone == mixed and len(alone) == 10


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny_llm):
    p = [5, 6, 7, 8]
    a = tiny_llm.generate([p], SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))
    b = tiny_llm.generate([p], SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))
    c = tiny_llm.generate([p], SamplingParams(temperature=1.0, seed=8, max_tokens=12, ignore_eos=True))
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
    assert a[0].outputs[0].token_ids != c[0].outputs[0].token_ids


def test_bad_input_fails_alone(llama):
    """Each bad request finishes with finish_reason "error" and a message;
    the good ones in the same call complete."""
    path, _ = llama  # a model directory without a tokenizer
    llm = LLM(path, warm_start=False, mesh="2x4", block_size=8, kv_blocks=4, max_num_batched_tokens=32)
    capacity = llm.engine.kv.max_request_tokens(0)
    good = [4, 5, 6, 7]
    batch = [good, [], [1, 2, 999999], "text needs a tokenizer", list(range(3, 3 + capacity + 1)), good]
    outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=5))
    reasons = [o.outputs[0].finish_reason for o in outs]
    assert reasons == ["length", "error", "error", "error", "error", "length"]
    assert "empty prompt" in outs[1].error
    assert "outside the vocabulary" in outs[2].error and "999999" in outs[2].error
    assert "tokenizer" in outs[3].error
    assert f"more than the {capacity} tokens" in outs[4].error
    assert outs[0].outputs[0].token_ids == outs[5].outputs[0].token_ids
    assert all(len(o.outputs[0].token_ids) == 5 for o in (outs[0], outs[5]))


def test_request_reaching_capacity_finishes_with_length(llama):
    path, _ = llama
    llm = LLM(path, warm_start=False, mesh="1x1", block_size=8, kv_blocks=4, kv_policy="local",
              max_num_batched_tokens=32)
    out = llm.generate([[3] * 20], SamplingParams(temperature=0, max_tokens=100))[0]
    comp = out.outputs[0]
    # 4 blocks of 8 = 32 tokens of KV: 20 prompt tokens + 12 generated fill it
    # (the 13th token is sampled from the last cached position).
    assert comp.finish_reason == "length" and len(comp.token_ids) == 13


def test_stop_conditions(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    prompt = "The quick brown fox"
    base = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    ids = base.outputs[0].token_ids
    # stop_token_ids: stop at the 5th generated token, which is kept in token_ids
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                     stop_token_ids=[ids[4]]))[0].outputs[0]
    first = ids.index(ids[4])
    assert out.token_ids == ids[:first + 1] and out.finish_reason == "stop"
    assert out.stop_reason == ids[4]
    # stop strings are searched in the detokenized text and cut from it
    text = base.outputs[0].text
    stop = text[6:9]
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                     stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.find(stop)] and stop not in out.text
    # min_tokens bans EOS (and stop ids) until reached
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, min_tokens=6,
                                                     stop_token_ids=[ids[0]]))[0].outputs[0]
    assert len(out.token_ids) >= 6 and ids[0] not in out.token_ids[:6]
    assert tok is not None


def test_prompt_logprobs_match_transformers(llama):
    import torch

    path, model = llama
    llm = LLM(path, warm_start=False, mesh="2x4", block_size=8, kv_blocks=8, max_num_batched_tokens=8)
    prompt = list(range(10, 40))  # 30 tokens: several prefill chunks of 8
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), -1).numpy()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        entry = out.prompt_logprobs[j]
        assert entry[prompt[j]].logprob == pytest.approx(logp[j - 1, prompt[j]], abs=1e-4)
        top = sorted(((lp.rank, t) for t, lp in entry.items() if lp.rank <= 2))
        assert [t for _, t in top][:2] == list(np.argsort(-logp[j - 1])[:2])


def test_streaming_yields_incremental_outputs(tiny_llm):
    seen = {}
    for out in tiny_llm.generate_stream([[4, 5, 6], [7, 8]], SamplingParams(
            temperature=0, max_tokens=5, ignore_eos=True)):
        n = len(out.outputs[0].token_ids)
        assert n >= seen.get(out.request_id, 0)
        seen[out.request_id] = n
    assert sorted(seen.values()) == [5, 5]


def test_streamed_text_is_decoded_incrementally(tiny_llm, monkeypatch):
    """Streamed outputs carry the text of the tokens so far (up to a trailing
    incomplete UTF-8 character) decoded incrementally: the tokens decoded over
    a whole stream grow linearly with its length, not quadratically; the
    finished output's text is the tokenizer's full decode."""
    tok = tiny_llm.engine.tokenizer
    decode = tok.decode
    decoded = []

    def counting(ids, **kw):
        decoded.append(len(ids))
        return decode(ids, **kw)

    monkeypatch.setattr(tok, "decode", counting)
    n = 64
    prompts = ["the quick brown fox", [7, 8, 9], "jumps over the lazy dog"]
    params = [SamplingParams(temperature=0.9, seed=k, max_tokens=n, ignore_eos=True) for k in range(3)]
    last = {}
    for out in tiny_llm.generate_stream(prompts, params):
        ids, text = out.outputs[0].token_ids, out.outputs[0].text
        full = decode(ids, skip_special_tokens=True)
        if out.finished:
            assert text == full
        else:
            # behind the full decode at most by an incomplete last character
            assert full.startswith(text) and full[len(text):].strip("\ufffd") == ""
        last[out.request_id] = len(ids)
    assert sorted(last.values()) == [n] * 3
    # 3 streams of 64 tokens: about 2 x 2 tokens per step plus one full decode
    # each at the end (a full decode per step would be 3 x 64 x 65 / 2 = 6,240)
    print(f"tokens decoded for 3 streams of {n}: {sum(decoded)}")
    assert sum(decoded) <= 3 * (8 * n + n)


def test_compilations_are_bounded(tiny_llm):
    """A mixed workload of 64 requests (prompt lengths 1..120, 1..24 new
    tokens) compiles a bounded number of XLA programs."""
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, 500, size=int(n)).tolist() for n in rng.integers(1, 120, size=64)]
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.8])), max_tokens=int(m),
                             ignore_eos=True, seed=k) for k, m in enumerate(rng.integers(1, 24, size=64))]
    before = tiny_llm.engine.compiled_programs()
    outs = tiny_llm.generate(prompts, params)
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    total = tiny_llm.engine.compiled_programs()
    print(f"compiled programs: {total} ({total - before} new for this workload)")
    assert total <= 40


def test_kv_blocks_sized_from_memory_and_module_generate():
    import distkv_jax
    from distkv_jax.models.tiny import tiny_model_dir

    llm = LLM(tiny_model_dir(), warm_start=False, mesh="1x1", kv_blocks=None, max_num_seqs=2)
    cfg = llm.model_config
    # CPU: a quarter of available host memory, capped at max_num_seqs full-length sequences
    assert llm.engine.layout.blocks_per_instance == 2 * cfg.max_position_embeddings // 16
    outs = distkv_jax.generate(tiny_model_dir(), [[5, 6, 7], "Once upon"], max_tokens=3,
                               temperature=0.0, ignore_eos=True)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 3]
    assert outs[1].prompt == "Once upon" and outs[1].outputs[0].text


def test_sliding_window_models_stop_at_the_window(tmp_path):
    """DistAttention attends to the whole context, so a Mistral model with a
    sliding window generates exactly until the window is full, then stops
    with "length"; a longer prompt is refused."""
    path = str(tmp_path / "mistral_window")
    make_hf_model("mistral", path)
    import json

    cfg = json.load(open(f"{path}/config.json"))
    cfg["sliding_window"] = 24
    json.dump(cfg, open(f"{path}/config.json", "w"))
    llm = LLM(path, warm_start=False, mesh="1x1", block_size=8, kv_blocks=16)
    outs = llm.generate([[5] * 20, [6] * 30], SamplingParams(temperature=0, max_tokens=50))
    assert outs[0].outputs[0].finish_reason == "length"
    assert len(outs[0].outputs[0].token_ids) == 24 + 1 - 20
    assert outs[1].outputs[0].finish_reason == "error" and "sliding window" in outs[1].error


@pytest.mark.parametrize("mesh,dense_impl", [("2x4", "auto"), ("2x1", "auto"), ("1x1", "reference")])
def test_bfloat16_engine_runs_on_a_mesh(llama, prompts, reference, mesh, dense_impl):
    """bfloat16 params, pools and compute: the greedy continuation stays close
    to float32 transformers (first tokens equal, logprobs within 0.1). Dense
    layers: XLA's dot with tp > 1; with tp = 1 the native kernel over packed
    weights (where it builds with AVX512_BF16) on each instance's rows, or
    the packed weights' jnp reference."""
    from distkv_jax.kernels import native

    path, _ = llama
    llm = LLM(path, warm_start=False, mesh=mesh, block_size=8, kv_blocks=8, dtype="bfloat16",
              max_num_batched_tokens=32, dense_impl=dense_impl)
    expected = {"2x4": "xla", "2x1": "native" if native.dense_vectorized() else "xla",
                "1x1": "reference"}[mesh]
    assert llm.engine.dense_impl == expected
    packed = llm.engine.runner.params.get("packed", {})
    assert bool(packed) == (expected != "xla")
    # bfloat16 KV is stored as its bits (kv_pool.storage_dtype)
    assert llm.engine.pools.k.dtype == np.dtype("uint16")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, logprobs=0))
    # the KV written is bfloat16: its bits decode to the values the model computed
    import jax
    kv = np.asarray(jax.lax.bitcast_convert_type(llm.engine.pools.k, jnp.bfloat16), np.float32)
    assert np.isfinite(kv).all() and np.abs(kv).max() > 0
    for out, (toks, lps) in zip(outs, reference):
        comp = out.outputs[0]
        assert comp.finish_reason == "length" and comp.token_ids[0] == toks[0]
        assert abs(comp.logprobs[0][toks[0]].logprob - lps[0]) < 0.1


def test_bfloat16_head_dim_64_prefill_matches_transformers(tmp_path):
    """head_dim 64 and 16-key blocks in bfloat16: prefill tiles take the
    native kernel's bfloat16 pair products (probabilities rounded to
    bfloat16). Long prompts in chunks of 32 tokens; the greedy continuation
    stays close to float32 transformers (first tokens equal, logprobs
    within 0.1, the bfloat16 tolerance above)."""
    from hf_models import hf_greedy_logprobs

    path = str(tmp_path / "llama_hd64")
    model = make_hf_model("llama_hd64", path)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (150, 37, 64, 90)]
    llm = LLM(path, warm_start=False, mesh="1x1", block_size=16, kv_blocks=64, dtype="bfloat16",
              max_num_batched_tokens=32)
    assert llm.engine.attention_impl == "native"
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3, logprobs=0))
    for out, p in zip(outs, prompts):
        toks, lps = hf_greedy_logprobs(model, p, 3)
        comp = out.outputs[0]
        assert comp.finish_reason == "length" and comp.token_ids[0] == toks[0], out.error
        assert abs(comp.logprobs[0][toks[0]].logprob - lps[0]) < 0.1


def test_overlapped_steps_match_sequential_steps(llama):
    """Planning step n+1 while step n runs (tokens handed over on the device,
    one row computed past a stop) gives exactly the outputs of sequential
    steps: stop ids, min_tokens, seeded sampling, logprobs, prompt logprobs,
    and a pool small enough that requests are preempted and recomputed."""
    path, _ = llama
    rng = np.random.default_rng(21)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (5, 30, 17, 44, 2, 23, 9)]
    greedy = LLM(path, warm_start=False, mesh="1x1", block_size=8, kv_blocks=64).generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stop_ids = [o.outputs[0].token_ids[3] for o in greedy]  # each greedy request stops early
    params = [
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_ids[0]], logprobs=2),
        SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, min_tokens=6, stop_token_ids=[stop_ids[2]]),
        SamplingParams(temperature=1.0, top_p=0.9, seed=4, max_tokens=14, ignore_eos=True,
                       prompt_logprobs=1),
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_ids[5]]),
        SamplingParams(temperature=0.7, min_p=0.05, seed=5, max_tokens=7, logprobs=0),
    ]
    results = {}
    for overlap in (True, False):
        # every request short (the long/short policy off): first come, first
        # served, so that this small pool preempts
        llm = LLM(path, warm_start=False, mesh="2x4", block_size=8, kv_blocks=6, max_num_batched_tokens=32,
                  overlap_steps=overlap, long_prefill_token_threshold=1 << 30)
        outs = llm.generate(prompts, params)
        assert llm.engine.stats["preemptions"] > 0
        assert (llm.engine.kv.free_device_blocks() == 6).all()  # every block came back
        results[overlap] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason,
                             o.outputs[0].stop_reason, _flat_logprobs(o)) for o in outs]
    for a, b in zip(results[True], results[False]):
        assert a[:3] == b[:3]
        assert [k for k, _ in a[3]] == [k for k, _ in b[3]]
        np.testing.assert_allclose([v for _, v in a[3]], [v for _, v in b[3]], atol=1e-5)
    reasons = [r[1] for r in results[True]]
    assert reasons[0] == reasons[5] == "stop" and reasons[1] == reasons[3] == "length"
    assert len(results[True][2][0]) >= 6


def _flat_logprobs(out):
    """[(position kind, token, rank), logprob] of every reported logprob."""
    flat = []
    for kind, seq in (("gen", out.outputs[0].logprobs), ("prompt", out.prompt_logprobs)):
        for i, d in enumerate(seq or ()):
            for tok, lp in sorted((d or {}).items()):
                flat.append(((kind, i, tok, lp.rank), lp.logprob))
    return flat
