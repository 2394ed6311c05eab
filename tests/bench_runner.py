"""Run `python -m distkv_jax.bench <name> --quick` in a subprocess for the tests."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(name: str, out, *flags: str, own_devices: bool = True) -> dict:
    """Run the benchmark with --quick, writing its JSON to `out`; returns the
    result. own_devices: drop the suite's XLA_FLAGS, so that the benchmark
    asks for its own simulated devices (as a user's run would)."""
    env = dict(os.environ)
    if own_devices:
        env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "distkv_jax.bench", name, "--quick", f"--output_json={out}", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())
