"""`python -m distkv_jax.bench capacity --quick` and `workload --quick` run
their comparisons and write well-formed results (structure and the
comparison having run; the figures themselves are for the benchmarks)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(name, tmp_path):
    out = tmp_path / f"{name}.json"
    png = tmp_path / f"{name}.png"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the bench asks for its devices
    proc = subprocess.run(
        [sys.executable, "-m", "distkv_jax.bench", name, "--quick",
         f"--output_json={out}", f"--output_png={png}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), png


def test_bench_capacity_quick(tmp_path):
    result, png = _bench("capacity", tmp_path)
    assert result["bench"] == "capacity" and result["quick"]
    rows = {(r["instances"], r["config"]): r for r in result["rows"]}
    I = max(i for i, _ in rows)
    assert I >= 2
    local, dist = rows[(I, "local")], rows[(I, "distributed")]
    host = rows[(I, "distributed+host")]
    for r in (local, dist, host):
        assert r["probes"] and r["longest_prompt"] > 0
        # the search brackets the boundary: a completed probe at the answer,
        # a failed one just above it
        by_len = {p["prompt_tokens"]: p for p in r["probes"]}
        assert by_len[r["longest_prompt"]]["completed"]
        assert not by_len[r["longest_prompt"] + 1]["completed"]
        assert r["kv_tokens_used"] <= r["control_plane_limit_tokens"]
    # borrowing lets one request hold more than one instance's memory
    assert dist["longest_prompt"] > local["longest_prompt"]
    assert local["kv_tokens_used"] <= result["kv_blocks_per_instance"] * result["block_size"]
    assert dist["over_local"] > 1
    # lending every free block: one request uses the whole mesh's device KV
    # (the last block may be partly empty); a fixed cap strands memory
    capped = rows[(I, "distributed@0.5")]
    assert dist["fraction_of_device_kv"] >= 0.99 > capped["fraction_of_device_kv"]
    assert capped["longest_prompt"] < dist["longest_prompt"]
    # host-attended KV: one request holds every device and host block (the
    # last one may be partly empty); as swap space only, the host tier holds
    # preempted requests, not a running one's KV
    assert host["host_attention"] and host["fraction_of_device_and_host_kv"] >= 0.99, host
    swap = rows[(I, "distributed+swap")]
    assert not swap["host_attention"] and swap["longest_prompt"] == dist["longest_prompt"]
    # creditors take their blocks back: every request completes, the long
    # one unchanged
    for sc in result["reclaim"]:
        assert sc["all_completed"] and sc["long_equals_alone"], sc
        assert sc["reclaimed_moved"] + sc["reclaimed_preempted"] + sc["offloaded_to_host"] > 0, sc
        if sc["host_attention"]:
            assert sc["offloaded_to_host"] > 0 and sc["preemptions"] == 0, sc
    assert png.exists()


def test_bench_workload_quick(tmp_path):
    result, png = _bench("workload", tmp_path)
    assert result["bench"] == "workload" and result["quick"]
    runs = {r["config"]: r for r in result["runs"] if r["stream"] == "mixed"}
    assert set(runs) == {"distributed", "local", "single"}
    # the short-only stream ran too, on its own LLM, taking turns with the others
    (short_only,) = [r for r in result["runs"] if r["stream"] == "short_only"]
    assert short_only["long"]["requests"] == 0 and short_only["slice_steps"] >= 1
    assert runs["single"]["setup"]["mesh"] == f"1x{result['instances']}"
    for run in runs.values():
        for kind in ("short", "long", "all"):
            s = run[kind]
            assert s["completed"] + s["rejected"] + s["truncated"] == s["requests"]
            assert set(s["ttft_s"]) == {"p50", "p90", "p99"}
        assert run["short"]["completed"] == run["short"]["requests"]
        assert len(run["kv_usage"]) == run["steps"] > 0
        assert all(0.0 <= x <= 1.0 for row in run["kv_usage"] for x in row)
    # the long request exceeds one instance: local refuses it, distributed serves it
    assert runs["local"]["long"]["rejected"] == runs["local"]["long"]["requests"] >= 1
    assert runs["distributed"]["long"]["completed"] == runs["distributed"]["long"]["requests"]
    assert runs["distributed"]["engine_stats"]["max_remote_blocks"] > 0
    cmp = result["comparison"][0]
    assert cmp["all_served"] and cmp["local_failed"]
    assert cmp["short_throughput_distributed_over_local"] > 0
    assert png.exists()
