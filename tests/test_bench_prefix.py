"""`python -m distkv_jax.bench prefix --quick`: the three configurations run
over one stream whose document spans several instances, and the result file
carries the comparison (the figures themselves are for the benchmark)."""

from bench_runner import run_bench


def test_bench_prefix_quick(tmp_path):
    out, png = tmp_path / "prefix.json", tmp_path / "prefix.png"
    result = run_bench("prefix", out, f"--output_png={png}")
    assert result["bench"] == "prefix" and result["quick"]
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"mesh", "instance", "none"}
    mesh, inst, none = rows["mesh"], rows["instance"], rows["none"]
    assert mesh["doc_instances"] > 1                      # one document spans instances
    assert mesh["completed"] == none["completed"] == mesh["requests"]
    assert inst["refused"] == inst["requests"]            # too long for one instance
    assert none["hit_rate"] == 0 and none["prefix_cache_queries"] == 0
    # every later question found its document's full blocks, some on other instances
    assert mesh["hit_over_ideal"] == 1.0 and mesh["prefix_cache_hits_remote"] > 0
    assert mesh["ttft_later_s"]["n"] == mesh["requests"] - result["docs"]
    assert png.exists()
