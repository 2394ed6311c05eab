"""Longest single request that completes, per mesh and KV policy.

    python -m distkv_jax.bench capacity [--instances=1,2,4,8] [--kv_blocks=20] [--quick]

For each mesh Ix1 (I instances, no tensor parallelism) with --kv_blocks KV
blocks per instance, and each configuration

  local:            kv_policy="local" (each request confined to its home
                    instance: per-instance paged serving, vLLM-style)
  distributed:      kv_policy="distributed" (a request borrows blocks from the
                    other instances; the default lends every free block, which
                    the lender takes back when its own requests need it)
  distributed@F:    distributed with lend_fraction F (a fixed lending cap:
                    e.g. distributed@0.9, the default before reclaim)
  distributed+host: distributed with --host_kv_blocks host blocks per instance
                    and host-attended KV (the default): a running request's
                    full, older blocks may live in host memory and are
                    attended there by the host CPU
  local+host:       local with the same host tier
  distributed+swap: the host tier as swap space only (host_attention off):
                    the host holds preempted requests' KV, not a running one's

a binary search on the prompt length finds the longest prompt whose request
completes: one request alone on the engine, greedy, ignore_eos, --max_tokens
new tokens, and it completes when it finishes with finish_reason "length"
after generating all its max_tokens (a prompt the engine refuses at
submission finishes with "error"; one that runs out of KV while generating
finishes with "length" but fewer tokens). One LLM per (mesh, configuration)
serves the whole search: after each generate every block is free again
(checked), so each probe sees a clean engine.

Then the reclaim scenario, on the largest mesh (lending every free block),
with host-attended KV, with the host tier as swap space only, and without a
host tier: a request of 90% of the mesh's KV borrows
from every other instance; once its prompt is in the KV, one short request
arrives per other instance. Reported: every request completed, the long
one's tokens equal to its run alone, blocks reclaimed (moved / by
preempting the long request), and when the shorts finished.

Model: the built-in tiny Llama (hidden 64, 2 layers, 2 KV heads x 16 dims),
float32, random prompt token ids (fixed seed).

The host tier: with host-attended KV (+host) one request may hold every
device block and every host block of the mesh but one block's worth (its
last, partial block is written on device); as swap space only (+swap) it
adds capacity for many requests at once, not for one request.
"""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
from absl import flags

from distkv_jax.bench.common import long_tiny_model, pyplot, save_figure, write_json

from distkv_jax.mesh import simulate_cpu_devices

FLAGS = flags.FLAGS
flags.DEFINE_list("instances", ["1", "2", "4", "8"], "instance counts I (mesh Ix1)")
flags.DEFINE_integer("kv_blocks", 20, "device KV blocks per instance")
flags.DEFINE_integer("host_kv_blocks", 20, "host KV blocks per instance (the +host configurations)")
flags.DEFINE_integer("block_size", 16, "tokens per KV block")
flags.DEFINE_integer("max_tokens", 4, "new tokens each probe request must generate")
flags.DEFINE_integer("max_num_batched_tokens", 256, "token budget per instance per step")
flags.DEFINE_list("configs", ["local", "distributed@0.9", "distributed", "distributed+host",
                               "local+host", "distributed+swap"],
                  "configurations to measure")
flags.DEFINE_bool("quick", False, "tiny sizes (for the test suite)")
flags.DEFINE_string("output_json", "bench_results/capacity.json", "result file")
flags.DEFINE_string("output_png", "bench_results/capacity.png", "plot ('' to skip)")


def _probe(llm, tokens, n, max_tokens) -> tuple[bool, str, int]:
    """Run one request with an n-token prompt; (completed, finish_reason, generated)."""
    from distkv_jax import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    out = llm.generate([tokens[:n]], params)[0]
    comp = out.outputs[0]
    free = llm.engine.kv.free_device_blocks()
    if not (free == llm.engine.layout.blocks_per_instance).all() or llm.engine.has_unfinished():
        raise RuntimeError(f"engine not clean after a probe: free blocks {free.tolist()}")
    done = comp.finish_reason == "length" and len(comp.token_ids) == max_tokens
    return done, comp.finish_reason, len(comp.token_ids)


def _search(llm, tokens, hi, max_tokens) -> tuple[int, list]:
    """Largest n in [0, hi) whose probe completes (0: none), by binary search.
    Completion is monotone in n: a longer prompt needs at least as much KV."""
    probes = []

    def ok(n):
        t0 = time.perf_counter()
        done, reason, gen = _probe(llm, tokens, n, max_tokens)
        probes.append({"prompt_tokens": n, "completed": done, "finish_reason": reason,
                       "generated": gen, "seconds": round(time.perf_counter() - t0, 3)})
        return done

    if not ok(1):
        return 0, probes
    lo = 1                      # completes
    if ok(hi):
        raise RuntimeError(f"a {hi}-token prompt completed: raise the search bound")
    while hi - lo > 1:          # invariant: ok(lo), not ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


def _reclaim_scenario(model, I, B, H, bs, M, tokens, host_attention: bool = True) -> dict:
    """A long request borrowing most of the mesh, then one short request per
    other instance, arriving once the long one's prompt is in the KV: every
    request must complete (the creditors reclaim), and the long one's tokens
    equal its run alone."""
    from distkv_jax import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=M, ignore_eos=True)
    long_n = int(0.9 * I * B * bs) - M
    shorts = [tokens[k * 7:k * 7 + 3 * bs] for k in range(1, I)]
    out = {"instances": I, "host_kv_blocks": H, "host_attention": host_attention and H > 0,
           "long_prompt": long_n, "short_prompts": [len(p) for p in shorts]}
    llm = LLM(model, mesh=f"{I}x1", block_size=bs, kv_blocks=B, host_kv_blocks=H,
              host_attention=host_attention, warm_start=False, max_num_seqs=I, max_num_batched_tokens=FLAGS.max_num_batched_tokens)
    alone = llm.generate([tokens[:long_n]], params)[0].outputs[0].token_ids
    llm.reset_prefix_cache()  # the long request computes its prompt again, as a new one would
    eng = llm.engine
    t0 = time.perf_counter()
    long_id = eng.add_request(tokens[:long_n], params)
    done = {}
    while eng.scheduler.get(long_id).num_computed < long_n:
        for o in eng.step(only_finished=True):
            done[o.request_id] = (o, time.perf_counter() - t0)
    out["long_borrowed_blocks"] = int(eng.kv.ledger()[eng.kv.home(long_id)].sum())
    t1 = time.perf_counter()
    ids = [eng.add_request(p, params) for p in shorts]
    while eng.has_unfinished():
        for o in eng.step(only_finished=True):
            done[o.request_id] = (o, time.perf_counter() - t0)
    snap = eng.metrics_snapshot()
    out.update({
        "all_completed": all(done[r][0].outputs[0].finish_reason == "length" for r in [long_id] + ids),
        "long_equals_alone": done[long_id][0].outputs[0].token_ids == alone,
        "reclaimed_moved": int(sum(snap["kv_reclaimed_moved"])),
        "reclaimed_preempted": int(sum(snap["kv_reclaimed_preempted"])),
        "reclaimed_offloaded": int(sum(snap["kv_reclaimed_offloaded"])),
        "preemptions": eng.stats["preemptions"],
        "offloaded_to_host": int(sum(snap["kv_offloaded_blocks"])),
        "brought_back": int(sum(snap["kv_brought_back_blocks"])),
        "shorts_done_s_after_arrival": round(max(done[r][1] for r in ids) - (t1 - t0), 3),
        "long_done_s": round(done[long_id][1], 3),
    })
    return out


def main(argv) -> None:
    del argv
    if FLAGS.quick:
        instances, B, H, M, configs = [2], 8, 8, 2, ["local", "distributed@0.5", "distributed",
                                                     "distributed+host", "distributed+swap"]
    else:
        instances = [int(i) for i in FLAGS.instances]
        B, H, M, configs = FLAGS.kv_blocks, FLAGS.host_kv_blocks, FLAGS.max_tokens, list(FLAGS.configs)
    bs = FLAGS.block_size
    simulate_cpu_devices(max(instances))   # before JAX starts
    import jax

    from distkv_jax import LLM

    rng = np.random.default_rng(0)
    longest = max(instances) * (B + H) * bs + bs
    # the tiny model with a position limit past the search bound (the KV, not
    # the model, must be what stops a request)
    model = long_tiny_model(max(4096, longest + M + bs))
    tokens = rng.integers(3, 512, size=longest).tolist()
    rows = []
    for I in instances:
        for name in configs:
            policy, _, frac = name.split("+")[0].partition("@")
            lend = float(frac) if frac else 1.0
            host = H if name.endswith(("+host", "+swap")) else 0
            attend = not name.endswith("+swap")
            t0 = time.perf_counter()
            llm = LLM(model, mesh=f"{I}x1", block_size=bs, kv_blocks=B, host_kv_blocks=host, warm_start=False,
                      kv_policy=policy, lend_fraction=lend, max_num_seqs=4,
                      host_attention=attend,
                      max_num_batched_tokens=FLAGS.max_num_batched_tokens)
            limit = llm.engine.kv.max_request_tokens(0)
            # Bound: every device and host block of the mesh, plus one block.
            n, probes = _search(llm, tokens, I * (B + host) * bs + bs, M)
            row = {"instances": I, "config": name, "kv_policy": policy, "lend_fraction": lend,
                   "kv_blocks": B,
                   "host_kv_blocks": host, "longest_prompt": n, "longest_request_tokens": n + M,
                   # tokens whose KV is cached when the last token is sampled
                   "kv_tokens_used": n + M - 1, "kv_tokens_device": I * B * bs,
                   "fraction_of_device_kv": (n + M - 1) / (I * B * bs),
                   "host_attention": attend and host > 0,
                   "kv_tokens_device_and_host": I * (B + host) * bs,
                   "fraction_of_device_and_host_kv": (n + M - 1) / (I * (B + host) * bs),
                   "control_plane_limit_tokens": limit, "probes": probes,
                   "seconds": round(time.perf_counter() - t0, 2),
                   "compiled_programs": llm.engine.compiled_programs(),
                   "stats": dict(llm.engine.stats)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("probes", "stats")}), flush=True)
            del llm
            jax.clear_caches()
    scenarios = []
    for host, attend in ((H, True), (H, False), (0, False)):
        scenarios.append(_reclaim_scenario(model, max(instances), B, host, bs, M, tokens, attend))
        print(json.dumps(scenarios[-1]), flush=True)
        jax.clear_caches()
    local = {r["instances"]: r["longest_prompt"] for r in rows if r["config"] == "local"}
    for r in rows:
        if r["instances"] in local and local[r["instances"]]:
            base = local[r["instances"]]
            r["over_local"] = r["longest_prompt"] / base
            r["over_local_times_I"] = r["longest_prompt"] / (base * r["instances"])
    result = {"bench": "capacity", "model": "tiny (hidden 64, 2 layers, 2 KV heads x 16)",
              "block_size": bs, "kv_blocks_per_instance": B, "host_kv_blocks_per_instance": H,
              "max_tokens": M, "dtype": "float32", "rows": rows, "reclaim": scenarios,
              "devices": len(jax.devices()),
              "machine": platform.machine(), "cpus": os.cpu_count(), "quick": FLAGS.quick}
    write_json(FLAGS.output_json, result)
    if FLAGS.output_png:
        _plot(rows, instances, FLAGS.output_png)


def _plot(rows, instances, path):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"local": "o-", "distributed": "s-", "distributed+host": "x--", "local+host": "+--",
              "distributed+swap": "x:",
              "distributed@0.9": "s:"}
    for name in dict.fromkeys(r["config"] for r in rows):
        pts = [(r["instances"], r["longest_request_tokens"]) for r in rows if r["config"] == name]
        ax.plot(*zip(*pts), styles.get(name, ".-"), label=name)
    local = {r["instances"]: r["longest_request_tokens"] for r in rows if r["config"] == "local"}
    if 1 in local:
        ax.plot(instances, [local[1] * i for i in instances], ":", color="gray", label="I x local(I=1)")
    ax.set(xlabel="instances I (mesh Ix1)", ylabel="longest completed request (tokens)",
           xticks=instances, title="Longest single request")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
