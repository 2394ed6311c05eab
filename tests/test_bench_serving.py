"""`python -m distkv_jax.bench serving --quick` starts the server once per KV
policy, drives it over HTTP and writes a well-formed result: the long
request fails with a 400 under local and completes under distributed (the
latencies themselves are for the benchmark)."""

import json
import os
import subprocess
import sys

import numpy as np

from distkv_jax.bench.serving import (Outcome, Slo, Workload, fresh_tokens, make_requests,
                                      short_ttft_p99_ratio, summarize)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_KEYS = {"mean", "median", "p99"}


def _workload(**kw) -> Workload:
    base = dict(seed=0, num_short=20, num_long=2, short_scale=0.25, short_sigma=0.8, short_min=4,
                short_max=128, long_factor=1.5, long_output=8, instance_kv_tokens=256,
                request_kv_limit=480)
    return Workload(**{**base, **kw})


def test_workload_is_deterministic_and_sized():
    w = _workload()
    reqs = make_requests(w)
    assert reqs == make_requests(w)  # same seed, same stream
    assert reqs != make_requests(_workload(seed=1))
    assert len(reqs) == 22 and reqs[0].u == 0.0
    assert all(a.u <= b.u for a, b in zip(reqs, reqs[1:]))
    lo, hi = w.long_prompt_range()
    for r in reqs:
        assert all(3 <= t <= 500 for t in r.prompt)
        if r.kind == "short":
            assert len(r.prompt) + r.max_tokens <= w.instance_kv_tokens
        else:  # over one instance's KV, within what a request may hold when distributed
            assert w.instance_kv_tokens < lo <= len(r.prompt) <= hi
            assert len(r.prompt) + r.max_tokens <= w.request_kv_limit


def test_each_pass_draws_fresh_prompt_tokens():
    reqs = make_requests(_workload())
    assert fresh_tokens(reqs, 0, 0) == reqs
    a, b = fresh_tokens(reqs, 1, 0), fresh_tokens(reqs, 2, 0)
    assert a == fresh_tokens(reqs, 1, 0)  # deterministic
    for x, y, z in zip(reqs, a, b):
        assert (x.id, x.kind, x.max_tokens, x.u, len(x.prompt)) == (y.id, y.kind, y.max_tokens, y.u, len(y.prompt))
        assert len(y.prompt) == len(z.prompt) and y.prompt != x.prompt and y.prompt != z.prompt
        assert all(3 <= t <= 500 for t in y.prompt)


def _outcome(i, ok=True, ttft=0.1, e2e=1.0, out=10, itl=(0.1,), status=200, kind="short"):
    return Outcome(f"r{i}", kind, 20, out, ok, status, None if ok else "no", "length" if ok else None,
                   0.5 * i, ttft if ok else None, e2e if ok else None, out if ok else 0, itl if ok else ())


def test_summarize_metrics():
    outs = [_outcome(0), _outcome(1, ttft=0.5, e2e=5.0), _outcome(2, ok=False, status=400, kind="long")]
    s = summarize(outs, 10.0, Slo(ttft_ms=200.0, tpot_ms=200.0))
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["request_throughput"] == 0.2 and s["output_throughput"] == 2.0
    assert s["total_token_throughput"] == (40 + 20) / 10.0
    # r1 misses both objectives (TTFT 500 ms, TPOT 500 ms)
    assert s["request_goodput"] == 0.1
    assert np.isclose(s["tpot_ms"]["median"], (100 + 500) / 2)
    assert np.isclose(s["ttft_ms"]["mean"], 300.0)
    none = {"mean": None, "median": None, "p99": None}
    assert s["by_kind"]["long"] == {"requests": 1, "completed": 0, "failed": 1, "truncated": 0,
                                    "failed_status": [400], "request_goodput": 0.0,
                                    "ttft_ms": none, "tpot_ms": none, "e2el_ms": none}
    short = s["by_kind"]["short"]
    assert short["request_goodput"] == 0.1 and np.isclose(short["ttft_ms"]["mean"], 300.0)
    assert np.isclose(short["e2el_ms"]["median"], 3000.0)
    assert s["errors"] == [{"id": "r2", "kind": "long", "status": 400, "message": "no"}]
    assert s["peak_concurrency"] == 2


def test_bench_serving_quick(tmp_path):
    out = tmp_path / "serving.json"
    png = tmp_path / "serving.png"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "distkv_jax.bench", "serving", "--quick",
         f"--output_json={out}", f"--output_png={png}"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["bench"] == "serving" and result["quick"]
    assert result["cpu"] and result["date"]
    n_long = result["workload"]["num_long"]
    assert n_long >= 1
    runs = {r["policy"]: r for r in result["runs"]}
    assert set(runs) == {"distributed", "local"}
    for policy, run in runs.items():
        assert run["server_exit_code"] == 0 and not run["server_killed"], run
        assert f"--kv_policy={policy}" in run["server_command"]
        assert [r["rate"] for r in run["results"]] == result["rates"] and len(result["rates"]) == 2
        for r in run["results"]:
            assert r["completed"] + r["failed"] == len(result["workload"]["requests"])
            assert r["completed"] > 0
            assert r["by_kind"]["short"]["completed"] == r["by_kind"]["short"]["requests"]
            assert r["request_throughput"] > 0 and r["output_throughput"] > 0
            assert r["total_token_throughput"] > r["output_throughput"]
            assert 0 <= r["request_goodput"] <= r["request_throughput"]
            for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
                assert set(r[key]) == DIST_KEYS
                assert 0 < r[key]["median"] <= r[key]["p99"]
            assert r["ttft_ms"]["p99"] <= r["e2el_ms"]["p99"]
            long = r["by_kind"]["long"]
            if policy == "local":  # longer than one instance's KV: refused
                assert long["failed"] == n_long and long["failed_status"] == [400]
                assert all(e["message"] for e in r["errors"])
            else:                  # borrows KV from the other instance
                assert long["completed"] == n_long and r["failed"] == 0
            for q in r["requests"]:
                if q["ok"]:
                    assert q["output_tokens"] == q["max_tokens"]  # ignore_eos: runs to max_tokens
            # the short requests' own figures, and the same short arrivals alone
            short = r["by_kind"]["short"]
            assert 0 < short["request_goodput"] <= r["request_goodput"] + 1e-9
            assert 0 < short["ttft_ms"]["median"] <= short["ttft_ms"]["p99"]
            base = r["no_long"]
            assert base["completed"] == short["requests"] and base["failed"] == 0
            assert set(base["by_kind"]) == {"short"} and 0 < base["ttft_ms"]["p99"]
            assert short_ttft_p99_ratio(r) == short["ttft_ms"]["p99"] / base["ttft_ms"]["p99"]
            if policy == "distributed":
                assert long["ttft_ms"]["median"] > 0 and long["e2el_ms"]["median"] > 0
            assert r["programs_compiled"] >= 0 and base["programs_compiled"] >= 0
        assert "--enable_prefix_caching=true" in run["server_command"]
    assert png.stat().st_size > 0
    assert "p99 ratio" in proc.stdout  # the short / long table
