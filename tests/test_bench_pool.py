"""`python -m distkv_jax.bench pool --quick` writes its rows: step time and
step memory at a small and a 16x larger pool, per mesh."""

from bench_runner import run_bench


def test_bench_pool_quick(tmp_path):
    result = run_bench("pool", tmp_path / "pool.json")
    assert [r["mesh"] for r in result["rows"]] == ["1x2", "2x2"]
    for r in result["rows"]:
        assert r["large"]["kv_blocks"] == 16 * r["small"]["kv_blocks"]
        assert r["large"]["pool_bytes_per_device"] == 16 * r["small"]["pool_bytes_per_device"]
        # no pool-sized temporary: what a step allocates does not grow with the pool
        assert r["large"]["temp_bytes"] == r["small"]["temp_bytes"]
        assert r["small"]["decode_step_ms"] > 0 and r["large_over_small_step"] > 0
