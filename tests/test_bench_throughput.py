"""`python -m distkv_jax.bench throughput --quick` runs both sides and writes a
well-formed result (structure only; the speed is for the benchmark)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_throughput_quick(tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run(
        [sys.executable, "-m", "distkv_jax.bench", "throughput", "--quick",
         f"--output_json={out}", f"--output_png={tmp_path / 'tp.png'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["workload"] for r in result["rows"]] == ["decode-heavy", "prefill-heavy"]
    for row in result["rows"]:
        assert row["distkv_tok_per_s"] > 0 and row["transformers_tok_per_s"] > 0
        # greedy on the same model: both sides generate the same tokens
        n = row["requests"]
        assert row["identical_outputs"] == f"{n}/{n}"
    assert result["rows"][0]["decode_floor_ms"] > 0
    # the tensor-parallel row (1x2): the same tokens as 1x1
    tp = result["tp"]
    assert tp["mesh"] == "1x2" and tp["tok_per_s"] > 0
    n = result["rows"][0]["requests"]
    assert tp["identical_to_1x1"] == f"{n}/{n}"
    # warm start: the first call compiles nothing new; a second process
    # start takes its programs from the persistent compilation cache
    st = result["startup"]
    first, second = st["first_start"], st["second_start"]["warm_start"]
    assert first["compiled"] == first["programs"] > first["step_shapes"] > 0
    assert first["warmed_step_shapes"] == first["step_shapes"]
    assert all(row["first_call_compiled_programs"] == 0 for row in result["rows"]), result["rows"]
    assert second["programs"] == first["programs"] and second["compiled"] == 0
    assert second["from_cache"] == first["programs"]


def test_bench_throughput_side_by_side_quick(tmp_path):
    """The side-by-side mode (--models; --peer vllm adds vLLM, not run here):
    ours in float32 and bfloat16 and transformers take turns on the same
    prompts; float32 tokens equal; decode figures against the bandwidth
    floor; versions and CPU model recorded."""
    out = tmp_path / "side.json"
    proc = subprocess.run(
        [sys.executable, "-m", "distkv_jax.bench", "throughput", "--quick", "--models=quick",
         "--repeats=2", f"--output_json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "side_by_side" and result["cpu"] and result["versions"]["jax"]
    assert [r["workload"] for r in result["rows"]] == ["decode", "prefill"]
    for row in result["rows"]:
        for side in ("ours_float32", "ours_bfloat16", "ours-xla-dense_bfloat16",
                     "transformers_float32"):
            assert row[f"{side}_tok_per_s"] > 0, row
            # the first call (ours: with compilation) beside the warm calls
            assert row[f"{side}_first_call_s"] > 0 and row[f"{side}_warm_call_s"] > 0
            assert row[f"{side}_start_s"] >= 0
        assert row["ours_float32_first_call_s"] > row["ours_float32_warm_call_s"]
        # our bfloat16 beside itself with XLA's dot for the dense layers
        assert row["dense_impl"]["ours-xla-dense_bfloat16"] == "xla"
        assert row["dense_impl"]["ours_float32"] == "xla"
        assert row["bf16_native_dense_over_xla_dense"] > 0
        assert row["float32_tokens_equal"] is True
        assert row["ours_best_over_transformers_best"] > 0
    assert 0 < result["rows"][0]["ours_float32_fraction_of_floor"]
