"""`python -m distkv_jax.bench attention --quick` runs all three strategies
and writes a well-formed result (structure only; speed is for the benchmark)."""

import json
import os
import subprocess
import sys

from bench_runner import run_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_attention_quick(tmp_path):
    out = tmp_path / "attention.json"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the bench requests its own simulated devices
    proc = subprocess.run(
        [sys.executable, "-m", "distkv_jax.bench", "attention", "--quick",
         f"--output_json={out}", f"--output_png={tmp_path / 'attention.png'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["devices"] == 8 and len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["local_ms"] > 0 and row["spread_ms"] > 0 and row["kv_moving_ms"] > 0
        # (a) keeps every block on its owner; (b) spreads them over all 8 instances
        assert all(n > 0 for n in row["items_per_instance_spread"])
        # (b) and (c) attend the same blocks: same result
        assert row["max_abs_diff_spread_vs_kv_moving"] <= 1e-5
        assert row["kv_moving_bytes_per_step"] > row["dist_bytes_per_step"] > 0
    assert result["bandwidth"]["kv_read_GBps"] > 0
    # tensor parallelism (4x2 against 4x1): the same attention output
    tp = result["tp"]
    assert tp["tp1_ms"] > 0 and tp["tp2_ms"] > 0 and tp["max_abs_diff"] <= 1e-5
    # host-attended KV: half of every sequence on the host, the same output;
    # queries and partials cross the device-host boundary, not the KV
    host = result["host"]
    assert host["half_host_ms"] > 0 and host["all_device_ms"] > 0 and host["swap_in_each_step_ms"] > 0
    assert all(n > 0 for n in host["host_items_per_instance"])
    assert host["max_abs_diff_half_host_vs_all_device"] <= 1e-5
    assert host["max_abs_diff_swap_in_vs_all_device"] <= 1e-5
    assert host["swap_in_bytes_per_step"] > host["host_path_bytes_per_step"] > 0
    pre = result["prefill"]
    for q_tile in (8, 16):
        assert pre[f"native_q_tile{q_tile}_ms"] > 0 and pre[f"reference_q_tile{q_tile}_ms"] > 0
        assert pre[f"max_abs_diff_q_tile{q_tile}"] <= 1e-5
    assert (tmp_path / "attention.png").stat().st_size > 0


def test_bench_attention_gpu_preset_quick(tmp_path):
    """The preset `make gpu-check` runs, in its --quick form on this CPU (the
    "auto" kernel here is the native one): rows per context, both
    implementations agreeing, bandwidth fractions present."""
    result = run_bench("attention", tmp_path / "attention_gpu.json", "--preset=gpu",
                       own_devices=False)
    assert result["preset"] == "gpu" and result["dtype"] == "bfloat16"
    assert result["attention_impl"] == "native" and len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["reference_ms"] > 0 and row["native_ms"] > 0
        assert 0 < row["native_fraction_of_stream_bw"] and row["max_abs_diff"] <= 1e-5
