"""`python -m distkv_jax.bench dense --quick` times XLA's bfloat16 dot and
the native kernel side by side (the figures themselves are for the
benchmark); both stay within a bfloat16 rounding of float64."""

import pytest
from bench_runner import run_bench

from distkv_jax.kernels import native


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_bench_dense_quick(tmp_path):
    rows = run_bench("dense", tmp_path / "dense.json")["rows"]
    assert len(rows) == 2
    for row in rows:
        assert row["xla_us"] > 0 and row["native_us"] > 0 and row["native_over_xla"] > 0
        assert row["max_abs_err_native"] < 0.1 and row["max_abs_err_xla"] < 0.1
