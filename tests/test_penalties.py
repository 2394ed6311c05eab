"""Presence / frequency / repetition penalties and logit bias: validation,
the host's sparse rows, the device transform against a dense numpy
reference and transformers' RepetitionPenaltyLogitsProcessor, and end to end
through the engine against transformers (greedy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distkv_jax import LLM, SamplingParams
from distkv_jax.penalties import penalty_row, request_row
from distkv_jax.request import Request
from distkv_jax.sampling import _apply_penalties, make_sampling_tensors, sample

from hf_models import hf_greedy, hf_logits, make_hf_model

_sample = jax.jit(sample, static_argnames=("num_top",))
_penalize = jax.jit(_apply_penalties)


def ref_penalize(logits, prompt, output, p) -> np.ndarray:
    """Dense float32 reference over the whole vocabulary, vLLM v1's order:
    logit bias, repetition (prompt or output), frequency, presence."""
    x = np.array(logits, np.float32)
    v = x.shape[-1]
    for t, b in (p.get("logit_bias") or {}).items():
        x[int(t)] += np.float32(b)
    rep = np.float32(p.get("repetition_penalty", 1.0))
    seen = np.zeros(v, bool)
    seen[list(prompt) + list(output)] = True
    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x).astype(np.float32)
    cnt = np.bincount(np.asarray(output, np.int64), minlength=v).astype(np.float32)
    x = x - np.float32(p.get("frequency_penalty", 0.0)) * cnt
    x = x - np.float32(p.get("presence_penalty", 0.0)) * (cnt > 0)
    return x.astype(np.float32)


# ------------------------------------------------------------ validation

def test_params_defaults_and_normalization():
    p = SamplingParams()
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.logit_bias is None and not p.has_penalties
    p = SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=2,
                       logit_bias={"5": 1, 7: -100.0, " 9 ": 100})
    assert p.logit_bias == {5: 1.0, 7: -100.0, 9: 100.0}
    assert all(type(k) is int and type(v) is float for k, v in p.logit_bias.items())
    assert isinstance(p.presence_penalty, float) and p.has_penalties
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert SamplingParams(repetition_penalty=0.01).has_penalties
    assert SamplingParams(n=3).n == 3  # n > 1 is valid


@pytest.mark.parametrize("field,kw", [
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("presence_penalty", dict(presence_penalty=float("nan"))),
    ("presence_penalty", dict(presence_penalty="1")),
    ("presence_penalty", dict(presence_penalty=None)),
    ("frequency_penalty", dict(frequency_penalty=-2.01)),
    ("frequency_penalty", dict(frequency_penalty=float("inf"))),
    ("frequency_penalty", dict(frequency_penalty=True)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("repetition_penalty", dict(repetition_penalty=2.5)),
    ("repetition_penalty", dict(repetition_penalty=float("nan"))),
    ("logit_bias", dict(logit_bias=[1, 2])),
    ("logit_bias", dict(logit_bias={"x": 1.0})),
    ("logit_bias", dict(logit_bias={"1_0": 1.0})),
    ("logit_bias", dict(logit_bias={1.5: 1.0})),
    ("logit_bias", dict(logit_bias={True: 1.0})),
    ("logit_bias", dict(logit_bias={-1: 1.0})),
    ("logit_bias", dict(logit_bias={"-3": 1.0})),
    ("logit_bias", dict(logit_bias={"5": 1.0, 5: 2.0})),
    ("logit_bias", dict(logit_bias={5: 100.5})),
    ("logit_bias", dict(logit_bias={5: float("nan")})),
    ("logit_bias", dict(logit_bias={5: "1"})),
    ("n", dict(n=0)),
    ("n", dict(n=1.0)),
])
def test_params_errors_name_the_field(field, kw):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field}="):
        SamplingParams(**kw)


# ------------------------------------------------------------ host rows

def test_request_row_is_incremental_and_matches_a_fresh_build():
    p = SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5, logit_bias={200: 3.0})
    prompt = [5, 9, 5, 11]
    req = Request("r", p, list(prompt), len(prompt))
    rng = np.random.default_rng(0)
    for step in range(12):
        pending = step % 3 == 1
        got, want = request_row(req, pending=pending), penalty_row(p, prompt, req.output_token_ids,
                                                                   pending)
        assert got.pending == want.pending == pending
        for a, b in zip(got[:4], want[:4]):
            np.testing.assert_array_equal(a, b)
        assert len(set(got.ids.tolist())) == len(got.ids)
        req.tokens.append(int(rng.integers(0, 16)))
    ids = got.ids.tolist()
    assert set(ids) == set(prompt) | set(req.output_token_ids[:-1]) | {200}
    i = ids.index(200)
    assert got.bias[i] == 3.0 and got.count[i] == 0 and not got.in_seq[i]


def test_rows_hold_only_what_the_settings_need():
    prompt, out = [1, 2, 3], [3, 4, 4]
    assert penalty_row(SamplingParams(), prompt, out) is None
    r = penalty_row(SamplingParams(presence_penalty=0.5), prompt, out, pending=True)
    assert r.ids.tolist() == [3, 4] and r.count.tolist() == [1, 2] and r.pending  # no prompt
    r = penalty_row(SamplingParams(logit_bias={9: 1.0}), prompt, out, pending=True)
    assert r.ids.tolist() == [9] and not r.pending  # bias only: the history does not matter
    r = penalty_row(SamplingParams(repetition_penalty=1.1), prompt, out)
    assert r.ids.tolist() == [1, 2, 3, 4] and r.in_seq.all() and r.count.tolist() == [0, 0, 1, 2]


def test_tensors_without_penalties_are_none_and_widths_pad():
    ps = [dict(temperature=0.0)] * 3
    st = make_sampling_tensors(ps, [0] * 3, None)
    assert st.pen_ids is None and st.repetition is None
    assert make_sampling_tensors(ps, [0] * 3, None, penalty_rows=[None] * 3).pen_ids is None
    row = penalty_row(SamplingParams(frequency_penalty=1.0), [1], [4, 4, 6])
    st = make_sampling_tensors(ps, [0] * 3, None, num_rows_padded=4, penalty_rows=[None, row, None])
    assert st.pen_ids.shape == (4, 2) and st.pen_ids[1].tolist() == [4, 6]
    assert (st.pen_ids[[0, 2, 3]] == -1).all() and st.repetition.tolist() == [1, 1, 1, 1]
    st = make_sampling_tensors(ps, [0] * 3, None, penalty_rows=[None, row, None], penalty_width=64)
    assert st.pen_ids.shape == (3, 64) and st.frequency.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="penalty_width"):
        make_sampling_tensors(ps, [0] * 3, None, penalty_rows=[None, row, None], penalty_width=1)
    # Only a pending token (presence, nothing generated yet on the host): width 1.
    pend = penalty_row(SamplingParams(presence_penalty=1.0), [1], [], pending=True)
    assert make_sampling_tensors(ps[:1], [0], None, penalty_rows=[pend]).pen_ids.shape == (1, 1)


# ------------------------------------------------- device vs numpy reference

def _random_case(seed, n=24, v=64):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, v)) * 3).astype(np.float32)
    logits[rng.random((n, v)) < 0.05] = 0.0  # exact zeros: the repetition rule's boundary
    rows, params, prompts, outputs, last = [], [], [], [], []
    for i in range(n):
        kind = i % 6
        p = dict(temperature=0.0 if i % 2 == 0 else 0.8, seed=i, top_p=0.9 if i % 4 == 1 else 1.0)
        if kind in (0, 4):
            p["repetition_penalty"] = float(rng.choice([0.5, 1.3, 2.0]))
        if kind in (1, 4):
            p["frequency_penalty"] = float(rng.uniform(-2, 2))
        if kind in (2, 4):
            p["presence_penalty"] = float(rng.uniform(-2, 2))
        if kind in (3, 4):
            p["logit_bias"] = {int(t): float(rng.uniform(-100, 100))
                               for t in rng.choice(v, size=3, replace=False)}
        prompt = rng.integers(0, v, size=int(rng.integers(1, 20))).tolist()
        output = rng.integers(0, v // 2, size=int(rng.integers(0, 30))).tolist()
        pending = bool(rng.random() < 0.5)
        # the pending token: sometimes already in the output, sometimes new
        tok = int(rng.choice(output)) if (output and rng.random() < 0.5) else int(rng.integers(0, v))
        params.append(p)
        prompts.append(prompt)
        outputs.append(output)
        last.append(tok)
        rows.append(penalty_row(p, prompt, output, pending))
    # the dense reference sees the pending token as part of the output
    full = [o + [t] if r is not None and r.pending else o
            for o, t, r in zip(outputs, last, rows)]
    ref = np.stack([ref_penalize(logits[i], prompts[i], full[i], params[i]) for i in range(n)])
    return logits, params, rows, np.asarray(last, np.int32), ref


@pytest.mark.parametrize("seed", [0, 1])
def test_device_penalties_match_dense_numpy(seed):
    logits, params, rows, last, ref = _random_case(seed)
    n = len(params)
    st = make_sampling_tensors(params, list(range(n)), None, penalty_rows=rows)
    got = np.asarray(_penalize(jnp.asarray(logits), st, jnp.asarray(last)))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)
    # Greedy rows: the argmax of the penalized logits, exactly.
    res = _sample(jnp.asarray(logits), st, num_top=3, last_tokens=jnp.asarray(last))
    tok = np.asarray(res.tokens)
    greedy = np.arange(n) % 2 == 0
    np.testing.assert_array_equal(tok[greedy], ref.argmax(-1)[greedy])
    # Sampled rows: the same draws as sampling the reference logits without penalties.
    plain = make_sampling_tensors(params, list(range(n)), None)
    tok_ref = np.asarray(_sample(jnp.asarray(ref), plain, num_top=3).tokens)
    np.testing.assert_array_equal(tok, tok_ref)
    # Reported logprobs are the raw model's, not the penalized ones.
    raw = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    np.testing.assert_allclose(np.asarray(res.logprobs), raw[np.arange(n), tok], atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.top_logprobs), -np.sort(-raw, -1)[:, :3], atol=1e-5)


def test_padding_and_banned_tokens_next_to_penalties():
    logits, params, rows, last, ref = _random_case(2, n=12)
    n = len(params)
    wide = make_sampling_tensors(params, [0] * n, None, num_rows_padded=16, penalty_rows=rows,
                                 penalty_width=128)
    padded = np.concatenate([logits, logits[:4]])
    got = np.asarray(_penalize(jnp.asarray(padded), wide, jnp.asarray(np.r_[last, last[:4]])))
    np.testing.assert_allclose(got[:n], ref, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got[n:], logits[:4])  # padding rows: untouched
    # A banned token stays banned whatever its bias.
    p = dict(temperature=0.0, logit_bias={5: 100.0})
    st = make_sampling_tensors([p], [0], [[5]], penalty_rows=[penalty_row(p, [1], [])])
    assert int(_sample(jnp.asarray(logits[:1]), st, num_top=0).tokens[0]) != 5


def test_repetition_matches_transformers_processor():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(3)
    n, v = 16, 100
    logits = (rng.normal(size=(n, v)) * 4).astype(np.float32)
    logits[:, :5] = 0.0
    pens = rng.choice([0.3, 0.8, 1.1, 1.5, 2.0], size=n)
    rows, want, params = [], [], []
    for i in range(n):
        ids = rng.integers(0, v, size=40)
        k = int(rng.integers(1, 40))  # prompt / output split: both count
        p = dict(temperature=0.0, repetition_penalty=float(pens[i]))
        params.append(p)
        rows.append(penalty_row(p, ids[:k].tolist(), ids[k:].tolist()))
        proc = RepetitionPenaltyLogitsProcessor(float(pens[i]))
        want.append(proc(torch.as_tensor(ids[None]), torch.as_tensor(logits[i:i + 1]))[0].numpy())
    st = make_sampling_tensors(params, [0] * n, None, penalty_rows=rows)
    got = np.asarray(_penalize(jnp.asarray(logits), st, None))
    np.testing.assert_allclose(got, np.stack(want), rtol=3e-7, atol=0)  # within an ulp or two


# ------------------------------------------------------------ end to end

MAX_NEW = 12


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama_pen"))
    return path, make_hf_model("llama_gqa", path)


@pytest.fixture(scope="module")
def llm(llama):
    # overlap_steps is on (the default): every decode step's input token is
    # the pending one, counted on the device.
    return LLM(llama[0], warm_start=False, mesh="2x2", block_size=8, kv_blocks=16,
               max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    # repetitive prompts, so that repetition and frequency penalties bite
    return [(rng.integers(3, 40, size=n).tolist() * 2) for n in (5, 11, 3)]


def _hf_penalized_greedy(model, prompt, p: dict, n: int = MAX_NEW):
    out = []
    for _ in range(n):
        x = hf_logits(model, np.asarray([prompt + out]))[0, -1]
        out.append(int(np.argmax(ref_penalize(x, prompt, out, p))))
    return out


def test_repetition_penalty_matches_transformers_generate(llm, llama, prompts):
    import torch

    _, model = llama
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW,
                                                repetition_penalty=1.8, ignore_eos=True))
    plain = [hf_greedy(model, p, MAX_NEW) for p in prompts]
    changed = 0
    for p, o, base in zip(prompts, outs, plain):
        with torch.no_grad():
            ref = model.generate(torch.as_tensor([p]), do_sample=False, max_new_tokens=MAX_NEW,
                                 repetition_penalty=1.8)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref
        changed += ref != base
    assert changed  # the penalty changed some generation


def test_frequency_presence_and_bias_match_numpy_over_transformers(llm, llama, prompts):
    _, model = llama
    settings = [dict(frequency_penalty=1.5),
                dict(presence_penalty=2.0, logit_bias={17: 4.0, 30: -3.0}),
                dict(frequency_penalty=-0.5, presence_penalty=1.0, repetition_penalty=1.3,
                     logit_bias={"50": 2.5})]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, **s)
              for s in settings]
    plain = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    # one batch: penalized rows next to a plain one, which must stay plain
    outs = llm.generate(prompts + prompts[:1], params + [plain])
    changed = 0
    for p, s, o in zip(prompts, settings, outs):
        ref = _hf_penalized_greedy(model, p, s)
        assert o.outputs[0].token_ids == ref, s
        changed += ref != hf_greedy(model, p, MAX_NEW)
    assert changed >= 2
    assert outs[-1].outputs[0].token_ids == hf_greedy(model, prompts[0], MAX_NEW)


def test_logit_bias_forces_and_forbids_tokens_and_logprobs_stay_raw(llm, llama, prompts):
    import torch

    _, model = llama
    forced = llm.generate(prompts[:1], SamplingParams(temperature=0.7, seed=3, max_tokens=6,
                                                      logit_bias={77: 100.0}, logprobs=0,
                                                      ignore_eos=True))[0].outputs[0]
    assert forced.token_ids == [77] * 6
    # the reported logprobs are the model's own (transformers' log-softmax)
    seq = prompts[0] + forced.token_ids
    logp = torch.log_softmax(torch.as_tensor(hf_logits(model, np.asarray([seq]))[0]).double(),
                             -1).numpy()
    want = [logp[len(prompts[0]) - 1 + i, 77] for i in range(6)]
    got = [forced.logprobs[i][77].logprob for i in range(6)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert max(got) < -1.0  # 77 is not what the model itself prefers
    base = hf_greedy(model, prompts[1], MAX_NEW)
    banned = {t: -100.0 for t in set(base)}
    out = llm.generate(prompts[1:2], SamplingParams(temperature=0.0, max_tokens=MAX_NEW,
                                                     logit_bias=banned, ignore_eos=True))
    assert not set(out[0].outputs[0].token_ids) & set(base)


def test_out_of_vocab_logit_bias_is_refused_naming_the_field(llm):
    params = SamplingParams(logit_bias={255: 1.0, 256: 1.0})
    with pytest.raises(ValueError, match="logit_bias: token id 256 is outside the vocabulary"):
        llm.engine.inputs.process("x", [5, 6], params, 0)
    out = llm.generate([[5, 6]], params)[0]
    assert out.outputs[0].finish_reason == "error" and "logit_bias" in out.error
