"""`python -m distkv_jax.bench pool --quick` writes its rows: step time and
step memory at a small and a 16x larger pool, per mesh."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_pool_quick(tmp_path):
    out = tmp_path / "pool.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "distkv_jax.bench", "pool", "--quick",
                           f"--output_json={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["mesh"] for r in result["rows"]] == ["1x2", "2x2"]
    for r in result["rows"]:
        assert r["large"]["kv_blocks"] == 16 * r["small"]["kv_blocks"]
        assert r["large"]["pool_bytes_per_device"] == 16 * r["small"]["pool_bytes_per_device"]
        # no pool-sized temporary: what a step allocates does not grow with the pool
        assert r["large"]["temp_bytes"] == r["small"]["temp_bytes"]
        assert r["small"]["decode_step_ms"] > 0 and r["large_over_small_step"] > 0
