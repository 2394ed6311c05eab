"""`python -m distkv_jax.bench dtype --quick` writes float32 and bfloat16
step times for one shape (the figures themselves are for the benchmark)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_dtype_quick(tmp_path):
    out = tmp_path / "dtype.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "distkv_jax.bench", "dtype", "--quick",
                           f"--output_json={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    for dtype in ("float32", "bfloat16"):
        assert row[dtype]["decode_step_ms"] > 0 and row[dtype]["tok_per_s"] > 0
    assert row["bf16_over_f32_decode_step"] > 0
