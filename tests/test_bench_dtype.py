"""`python -m distkv_jax.bench dtype --quick` writes float32 and bfloat16
step times for one shape (the figures themselves are for the benchmark)."""

from bench_runner import run_bench


def test_bench_dtype_quick(tmp_path):
    (row,) = run_bench("dtype", tmp_path / "dtype.json")["rows"]
    for dtype in ("float32", "bfloat16"):
        assert row[dtype]["decode_step_ms"] > 0 and row[dtype]["tok_per_s"] > 0
    assert row["bf16_over_f32_decode_step"] > 0
