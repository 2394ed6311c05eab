"""SamplingParams validation, output types, and on-device sampling statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from distkv_jax.outputs import (CompletionOutput, Logprob, RequestMetrics,
                                RequestOutput)
from distkv_jax.sampling import (SampleResult, SamplingTensors,
                                 make_sampling_tensors, sample)
from distkv_jax.sampling_params import SamplingParams

_sample = jax.jit(sample, static_argnames=("num_top",))


# ---------------------------------------------------------------- SamplingParams

def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert p.seed is None and p.max_tokens == 16 and p.min_tokens == 0
    assert p.stop == () and p.stop_token_ids == ()
    assert p.ignore_eos is False and p.logprobs is None and p.prompt_logprobs is None
    assert p.skip_special_tokens is True and p.include_stop_str_in_output is False
    assert not p.is_greedy


def test_normalization():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=[5, 7], temperature=0,
                       logprobs=0, seed=123, max_tokens=None)
    assert p.top_k == 0
    assert p.stop == ("###",)
    assert p.stop_token_ids == (5, 7)
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.is_greedy
    assert p.max_tokens is None
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4
    assert SamplingParams(top_p=1, min_p=1).top_p == 1.0


BAD = [
    ("n", dict(n=1.5)),
    ("n", dict(n=0)),
    ("temperature", dict(temperature=-0.1)),
    ("temperature", dict(temperature="0.5")),
    ("temperature", dict(temperature=float("nan"))),
    ("temperature", dict(temperature=float("inf"))),
    ("temperature", dict(temperature=None)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_p", dict(top_p=-0.2)),
    ("top_p", dict(top_p=float("nan"))),
    ("top_p", dict(top_p="1")),
    ("top_k", dict(top_k=-2)),
    ("top_k", dict(top_k=2.5)),
    ("top_k", dict(top_k="5")),
    ("min_p", dict(min_p=-0.01)),
    ("min_p", dict(min_p=1.01)),
    ("min_p", dict(min_p=[0.1])),
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=-3)),
    ("max_tokens", dict(max_tokens=3.0)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=17)),           # > default max_tokens 16
    ("min_tokens", dict(min_tokens=5, max_tokens=4)),
    ("min_tokens", dict(min_tokens=1.0)),
    ("logprobs", dict(logprobs=-1)),
    ("logprobs", dict(logprobs=1.5)),
    ("prompt_logprobs", dict(prompt_logprobs=-2)),
    ("prompt_logprobs", dict(prompt_logprobs="3")),
    ("seed", dict(seed=1.5)),
    ("seed", dict(seed="42")),
    ("seed", dict(seed=True)),
    ("stop", dict(stop="")),
    ("stop", dict(stop=["ok", ""])),
    ("stop", dict(stop=[1, 2])),
    ("stop", dict(stop=5)),
    ("stop_token_ids", dict(stop_token_ids=[-1])),
    ("stop_token_ids", dict(stop_token_ids=[1, 2.0])),
    ("stop_token_ids", dict(stop_token_ids=3)),
    ("ignore_eos", dict(ignore_eos="yes")),
    ("skip_special_tokens", dict(skip_special_tokens=0)),
    ("include_stop_str_in_output", dict(include_stop_str_in_output=None)),
]


@pytest.mark.parametrize("field,kwargs", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_params_raise(field, kwargs):
    with pytest.raises(ValueError) as ei:
        SamplingParams(**kwargs)
    msg = str(ei.value)
    assert field in msg
    # The message shows the offending value of the field.
    bad_value = kwargs.get(field)
    assert repr(bad_value) in msg, msg


def test_n_is_an_int_at_least_one():
    assert SamplingParams(n=3).n == 3
    with pytest.raises(ValueError, match=r"n=0: must be >= 1"):
        SamplingParams(n=0)


# ---------------------------------------------------------------- outputs

def test_output_types():
    lp = {5: Logprob(-0.1, 1, "a"), 9: Logprob(-2.5, 2, None)}
    c = CompletionOutput(0, "a", [5], -0.1, [lp], None, None)
    assert not c.finished()
    c.finish_reason, c.stop_reason = "stop", 9
    assert c.finished()
    m = RequestMetrics(arrival_time=1.0)
    r = RequestOutput("0", "hi", [1, 2], [None, {2: Logprob(-1.0, 3, "x")}], [c], True, m)
    assert r.error is None and r.outputs[0].token_ids == [5] and r.metrics.finished_time is None
    assert RequestOutput("1", None, [], None, [], True, RequestMetrics(), error="bad").error == "bad"


# ---------------------------------------------------------------- tensors

def test_make_sampling_tensors_padding():
    ps = [SamplingParams(temperature=0.7, top_k=-1, top_p=0.9, min_p=0.1, seed=2**32 + 5),
          dict(temperature=0.0, top_k=3),
          SamplingParams(temperature=1e-7, seed=1)]
    st = make_sampling_tensors(ps, [0, 4, 9], [[1, 2, 3], None, []], num_rows_padded=8,
                               seeds=[None, 77, None])
    assert isinstance(st, SamplingTensors)
    assert st.temperature.shape == (8,) and st.banned.shape == (8, 4)
    np.testing.assert_allclose(st.temperature[:3], [0.7, 0.0, 0.0], rtol=1e-6)
    assert (st.temperature[3:] == 0).all() and (st.top_p[3:] == 1).all()
    assert list(st.top_k[:3]) == [0, 3, 0]
    assert list(st.seed[:3]) == [5, 77, 1]
    assert list(st.counter[:3]) == [0, 4, 9]
    assert list(st.banned[0]) == [1, 2, 3, -1] and (st.banned[1:] == -1).all()
    st2 = SamplingTensors.from_rows(ps, [0, 0, 0], banned_width=16)
    assert st2.banned.shape == (3, 16) and st2.temperature.shape == (3,)
    with pytest.raises(ValueError):
        make_sampling_tensors(ps, [0, 0, 0], num_rows_padded=2)


# ---------------------------------------------------------------- reference

def _ref_dist(logits, t, k, p, min_p, banned=()):
    """Exact filtered distribution, float64, independent of the JAX code."""
    l = np.asarray(logits, np.float64).copy()
    v = l.size
    l[list(banned)] = -np.inf
    if t < 1e-5:
        out = np.zeros(v)
        out[np.argmax(l)] = 1.0
        return out
    s = l / t
    order = np.argsort(-s, kind="stable")
    keep = np.zeros(v, bool)
    keep[order[: (k if k > 0 else v)]] = True
    keep &= np.isfinite(s)
    if p < 1.0:
        w = np.where(keep, np.exp(s - s[keep].max()), 0.0)
        w /= w.sum()
        cum = 0.0
        newkeep = np.zeros(v, bool)
        for idx in order:
            if not keep[idx]:
                continue
            newkeep[idx] = True
            cum += w[idx]
            if cum >= p:
                break
        keep = newkeep
    w = np.where(keep, np.exp(s - s[keep].max()), 0.0)
    w /= w.sum()
    if min_p > 0:
        keep &= w >= min_p * w.max()
        w = np.where(keep, w, 0.0)
        w /= w.sum()
    return w


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ---------------------------------------------------------------- statistics

V_STAT = 16
DRAWS = 20000
_rng = np.random.default_rng(1234)
LOGITS_STAT = (_rng.normal(size=V_STAT) * 0.8).astype(np.float32)
_top = int(np.argmax(LOGITS_STAT))
STAT_CONFIGS = [
    # (temperature, top_k, top_p, min_p, banned)
    (1.0, 0, 1.0, 0.0, ()),
    (0.5, 0, 1.0, 0.0, ()),
    (1.3, 4, 1.0, 0.0, ()),
    (1.0, 0, 0.7, 0.0, ()),
    (1.0, 0, 1.0, 0.15, ()),
    (0.8, 8, 0.9, 0.41, (_top, 3)),
    (2.0, 0, 1.0, 0.0, (_top, 0, 15)),
    (1.5, 6, 0.6, 0.0, ()),
]


@pytest.fixture(scope="module")
def stat_draws():
    rows, counters, banned = [], [], []
    for ci, (t, k, p, mp, b) in enumerate(STAT_CONFIGS):
        for j in range(DRAWS):
            rows.append(dict(temperature=t, top_k=k, top_p=p, min_p=mp, seed=1000 + ci))
            counters.append(j)
            banned.append(b)
    st = make_sampling_tensors(rows, counters, banned, banned_width=4)
    logits = np.tile(LOGITS_STAT, (len(rows), 1))
    res = _sample(jnp.asarray(logits), st, num_top=2)
    return np.asarray(res.tokens).reshape(len(STAT_CONFIGS), DRAWS)


def _margins(t, k, p, min_p, banned):
    """Distances of top_p / min_p from the values they are compared with, so that
    float32 (JAX) and float64 (reference) cannot disagree on the kept set."""
    s = LOGITS_STAT.astype(np.float64) / t
    s[list(banned)] = -np.inf
    order = np.argsort(-s)[: (k if k > 0 else V_STAT)]
    order = order[np.isfinite(s[order])]
    w = np.exp(s[order] - s[order].max())
    w /= w.sum()
    p_margin = np.min(np.abs(np.cumsum(w) - p)) if p < 1.0 else 1.0
    ratio = np.exp(s[np.isfinite(s)] - s.max())
    mp_margin = np.min(np.abs(ratio - min_p)) if min_p > 0 else 1.0
    return p_margin, mp_margin


@pytest.mark.parametrize("ci", range(len(STAT_CONFIGS)))
def test_sampling_distribution(stat_draws, ci):
    t, k, p, mp, banned = STAT_CONFIGS[ci]
    assert min(_margins(t, k, p, mp, banned)) > 1e-3  # the logits keep clear of ties
    expected = _ref_dist(LOGITS_STAT, t, k, p, mp, banned)
    counts = np.bincount(stat_draws[ci], minlength=V_STAT)
    kept = expected > 0
    # Tokens outside the kept set (filtered or banned) never appear.
    assert counts[~kept].sum() == 0, (counts, expected)
    assert kept.sum() >= 2  # the configuration really samples
    # Chi-square on the kept tokens, merging bins with expected count < 5.
    exp_c = expected[kept] * DRAWS
    obs_c = counts[kept].astype(np.float64)
    small = exp_c < 5
    if small.any():
        exp_c = np.append(exp_c[~small], exp_c[small].sum())
        obs_c = np.append(obs_c[~small], obs_c[small].sum())
    if len(exp_c) >= 2:
        pval = stats.chisquare(obs_c, exp_c).pvalue
        assert pval > 1e-4, (ci, pval, obs_c, exp_c)
    # And every frequency within 5 standard errors.
    freq = counts / DRAWS
    se = np.sqrt(expected * (1 - expected) / DRAWS) + 1e-12
    assert np.all(np.abs(freq - expected) <= 5 * se + 1e-9), (freq, expected)


# ---------------------------------------------------------------- greedy / banned

def test_greedy_is_argmax_and_banned_respected():
    rng = np.random.default_rng(7)
    n, v = 32, 100
    logits = rng.normal(size=(n, v)).astype(np.float32) * 3
    amax = logits.argmax(-1)
    second = np.argsort(-logits, axis=-1)[:, 1]
    rows, banned = [], []
    for i in range(n):
        t = [0.0, 1e-6, 0.9, 5.0][i % 4]
        rows.append(dict(temperature=t, top_k=(3 if i % 3 == 0 else 0), seed=i))
        # Rows 16..31 ban their argmax.
        banned.append([int(amax[i])] if i >= 16 else [])
    st = make_sampling_tensors(rows, list(range(n)), banned, banned_width=4)
    tok = np.asarray(_sample(jnp.asarray(logits), st, num_top=4).tokens)
    for i in range(n):
        if rows[i]["temperature"] < 1e-5:
            assert tok[i] == (amax[i] if i < 16 else second[i]), i
        if i >= 16:
            assert tok[i] != amax[i]


def test_banned_never_drawn():
    rng = np.random.default_rng(3)
    n, v = 4096, V_STAT
    base = rng.normal(size=v).astype(np.float32)
    logits = np.tile(base, (n, 1))
    top3 = list(np.argsort(-base)[:3])
    rows = [dict(temperature=5.0, seed=9)] * n
    banned = [top3 if i % 2 == 0 else [int(top3[0]), -1] for i in range(n)]
    st = make_sampling_tensors(rows, list(range(n)), banned, banned_width=4)
    tok = np.asarray(_sample(jnp.asarray(logits), st, num_top=2).tokens)
    assert not np.isin(tok[0::2], top3).any()
    assert not (tok[1::2] == top3[0]).any()
    assert len(np.unique(tok)) >= v - 3


# ---------------------------------------------------------------- reproducibility

def _repro_batch(specs, logits_for, v, num_rows_padded):
    rows = [dict(temperature=t, top_k=k, top_p=p, min_p=mp, seed=s) for (s, c, t, k, p, mp) in specs]
    st = make_sampling_tensors(rows, [c for (_, c, *_) in specs], None, num_rows_padded,
                               banned_width=4)
    logits = np.zeros((num_rows_padded, v), np.float32)
    for i, spec in enumerate(specs):
        logits[i] = logits_for(spec)
    return np.asarray(_sample(jnp.asarray(logits), st, num_top=2).tokens)[: len(specs)]


def test_reproducible_across_rows_and_batches():
    v = 64
    rng = np.random.default_rng(11)
    table = rng.normal(size=(8, v)).astype(np.float32) * 0.5

    def logits_for(spec):
        return table[spec[0] % 8]

    ours = [(s, c, t, k, p, mp) for s, c, t, k, p, mp in [
        (1, 0, 1.0, 0, 1.0, 0.0), (2, 5, 0.8, 10, 1.0, 0.0), (3, 17, 1.2, 0, 0.9, 0.0),
        (4, 2, 1.0, 0, 1.0, 0.02), (5, 100, 1.0, 20, 0.95, 0.01), (6, 3, 2.0, 0, 1.0, 0.0)]]
    others_a = [(100 + i, i, 1.0, 0, 1.0, 0.0) for i in range(4)]
    others_b = [(200 + i, 3 * i, 0.5, 5, 0.8, 0.0) for i in range(9)]
    a = _repro_batch(ours + others_a, logits_for, v, 16)
    b_specs = others_b[:4] + ours[::-1] + others_b[4:]
    b = _repro_batch(b_specs, logits_for, v, 16)
    b_ours = b[4:4 + len(ours)][::-1]
    np.testing.assert_array_equal(a[: len(ours)], b_ours)
    # A different batch size (another compiled shape) gives the same tokens too.
    c = _repro_batch(ours[2:] + ours[:2], logits_for, v, 32)
    np.testing.assert_array_equal(a[: len(ours)], np.concatenate([c[-2:], c[:-2]]))


def test_reproducible_when_sharded_over_devices():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    devs = jax.devices()
    n, v = 16, 64
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(n, v)).astype(np.float32)
    rows = [dict(temperature=1.0, top_p=0.9, seed=i) for i in range(n)]
    st = make_sampling_tensors(rows, [7] * n, None, banned_width=4)
    ref = np.asarray(_sample(jnp.asarray(logits), st, num_top=2).tokens)
    mesh = Mesh(np.array(devs), ("x",))
    sh = NamedSharding(mesh, P("x"))
    st_sh = SamplingTensors(*[jax.device_put(a, sh) for a in st])
    got = np.asarray(_sample(jax.device_put(logits, sh), st_sh, num_top=2).tokens)
    np.testing.assert_array_equal(ref, got)
    # Vocabulary sharded over the devices (as with tensor-parallel logits).
    got_v = _sample(jax.device_put(logits, NamedSharding(mesh, P(None, "x"))), st, num_top=2)
    np.testing.assert_array_equal(ref, np.asarray(got_v.tokens))


def test_different_counters_and_seeds_differ():
    n, v = 256, 64
    logits = np.zeros((n, v), np.float32)  # uniform: every draw is pure noise
    same_seed = make_sampling_tensors([dict(seed=42)] * n, list(range(n)), None, banned_width=4)
    t1 = np.asarray(_sample(jnp.asarray(logits), same_seed, num_top=2).tokens)
    assert len(np.unique(t1)) > 40
    same_counter = make_sampling_tensors([dict(seed=s) for s in range(n)], [0] * n, None,
                                         banned_width=4)
    t2 = np.asarray(_sample(jnp.asarray(logits), same_counter, num_top=2).tokens)
    assert len(np.unique(t2)) > 40
    # Identical (seed, counter) in every row: identical draws.
    same_all = make_sampling_tensors([dict(seed=42)] * n, [3] * n, None, banned_width=4)
    t3 = np.asarray(_sample(jnp.asarray(logits), same_all, num_top=2).tokens)
    assert (t3 == t3[0]).all() and t3[0] == t1[3]
    # base_key_seed changes the stream.
    t4 = np.asarray(_sample(jnp.asarray(logits), same_seed, num_top=2, base_key_seed=1).tokens)
    assert (t4 != t1).mean() > 0.5


# ---------------------------------------------------------------- logprobs

def test_logprobs_top_ids_and_ranks():
    rng = np.random.default_rng(21)
    n, v, num_top = 32, 100, 5
    logits = (rng.normal(size=(n, v)) * 4).astype(np.float32)
    rows = [dict(temperature=[0.0, 0.7, 1.5, 3.0][i % 4], top_k=(10 if i % 5 == 0 else 0),
                 seed=i) for i in range(n)]
    banned = [[int(np.argmax(logits[i]))] if i % 3 == 0 else [] for i in range(n)]
    st = make_sampling_tensors(rows, list(range(n)), banned, banned_width=4)
    res = _sample(jnp.asarray(logits), st, num_top=num_top)
    assert isinstance(res, SampleResult)
    tok = np.asarray(res.tokens)
    assert res.tokens.dtype == jnp.int32 and res.top_ids.dtype == jnp.int32
    assert res.ranks.dtype == jnp.int32 and res.logprobs.dtype == jnp.float32
    ref = _log_softmax64(logits)
    np.testing.assert_allclose(np.asarray(res.logprobs), ref[np.arange(n), tok], atol=1e-5)
    top_ids = np.asarray(res.top_ids)
    top_lp = np.asarray(res.top_logprobs)
    np.testing.assert_array_equal(top_ids, np.argsort(-ref, axis=-1)[:, :num_top])
    np.testing.assert_allclose(top_lp, np.take_along_axis(ref, top_ids, -1), atol=1e-5)
    assert (np.diff(top_lp, axis=-1) <= 0).all()
    ranks = np.asarray(res.ranks)
    np.testing.assert_array_equal(ranks, 1 + (ref > ref[np.arange(n), tok][:, None]).sum(-1))
    # Where the chosen token is among the top ids, its rank is its position + 1.
    for i in range(n):
        hits = np.nonzero(top_ids[i] == tok[i])[0]
        if hits.size:
            assert ranks[i] == hits[0] + 1
    # Banned argmax rows never report rank 1.
    for i in range(0, n, 3):
        assert ranks[i] >= 2
    # num_top = 0 and bf16 logits work.
    res0 = _sample(jnp.asarray(logits, jnp.bfloat16), st, num_top=0)
    assert res0.top_ids.shape == (n, 0) and res0.top_logprobs.shape == (n, 0)
    assert res0.logprobs.dtype == jnp.float32


def test_all_greedy_batch_and_disabled_filters():
    rng = np.random.default_rng(8)
    n, v = 16, 64
    logits = rng.normal(size=(n, v)).astype(np.float32)
    # Every row greedy: the draw is skipped at run time; still argmax.
    st = make_sampling_tensors([dict(temperature=0.0)] * 10, [0] * 10, None, n, banned_width=4)
    tok = np.asarray(_sample(jnp.asarray(logits), st, num_top=2).tokens)
    np.testing.assert_array_equal(tok, logits.argmax(-1))
    # Disabled filters (top_k >= V, top_p = 1, min_p = 0) change nothing,
    # also next to rows that do filter.
    base = [dict(temperature=1.0, seed=i) for i in range(n)]
    variants = [dict(d, top_k=v) for d in base[:4]] + [dict(d, top_k=v + 7) for d in base[4:8]]
    variants += [dict(d, top_p=1.0, min_p=0.0) for d in base[8:12]] + base[12:]
    st_a = make_sampling_tensors(base, list(range(n)), None, banned_width=4)
    st_b = make_sampling_tensors(variants, list(range(n)), None, banned_width=4)
    a = np.asarray(_sample(jnp.asarray(logits), st_a, num_top=2).tokens)
    b = np.asarray(_sample(jnp.asarray(logits), st_b, num_top=2).tokens)
    np.testing.assert_array_equal(a, b)
    # Same rows 0..7 next to filtering rows 8..15.
    mixed = variants[:8] + [dict(temperature=1.0, top_k=3, top_p=0.5, min_p=0.2, seed=i)
                            for i in range(8, n)]
    st_c = make_sampling_tensors(mixed, list(range(n)), None, banned_width=4)
    c = np.asarray(_sample(jnp.asarray(logits), st_c, num_top=2).tokens)
    np.testing.assert_array_equal(a[:8], c[:8])
    top3 = np.argsort(-logits, axis=-1)[:, :3]
    assert all(c[i] in top3[i] for i in range(8, n))
