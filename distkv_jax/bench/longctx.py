"""One very long request end to end on an Ix1 mesh, half of its KV attended
on the host.

    python -m distkv_jax.bench longctx [--tokens=262144] [--instances=8] [--quick]

One request of --tokens prompt tokens (random ids, fixed seed) plus
--max_tokens generated (greedy, ignore_eos) on the built-in tiny Llama
(hidden 64, 2 layers, 4 query / 2 KV heads x 16 dims, float32) with its
position limit raised to fit. Device KV blocks per instance are sized so the
mesh's devices hold --device_share of the request's KV; the rest lives in
the instances' host pools (host-attended KV: the host CPU attends it in
place), with a margin of host blocks.

Reported: prefill time (submission to the first token, compilation
included, as a user meets it), decode step time (median of the steps after
the first token), the control plane's planning time per step (the
scheduler and KV manager's `schedule`, host Python; median and max, and
medians over prefill and over decode steps), the
request's blocks on the host at the end, blocks offloaded, programs compiled,
and that the request completed with all its tokens.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np
from absl import flags

from distkv_jax.bench.common import cpu_model, long_tiny_model, write_json
from distkv_jax.mesh import simulate_cpu_devices

FLAGS = flags.FLAGS
flags.DEFINE_integer("tokens", 262144, "prompt tokens of the request")
flags.DEFINE_integer("max_tokens", 16, "tokens generated")
flags.DEFINE_integer("instances", 8, "instances (mesh Ix1)")
flags.DEFINE_integer("block_size", 16, "tokens per KV block")
flags.DEFINE_float("device_share", 0.5, "share of the request's KV the devices can hold")
flags.DEFINE_integer("max_num_batched_tokens", 2048, "tokens per step per instance")
flags.DEFINE_bool("quick", False, "tiny sizes (for the test suite)")
flags.DEFINE_string("output_json", "bench_results/longctx.json", "result file")


def main(argv) -> None:
    del argv
    n, M, I, bs = FLAGS.tokens, FLAGS.max_tokens, FLAGS.instances, FLAGS.block_size
    chunk = FLAGS.max_num_batched_tokens
    if FLAGS.quick:
        n, M, I, chunk = 2048, 4, 2, 256
    simulate_cpu_devices(I)
    import jax

    from distkv_jax import LLM, SamplingParams
    from distkv_jax.model_runner import CompileStats

    total_blocks = -(-(n + M) // bs)
    kv_blocks = -(-int(FLAGS.device_share * total_blocks) // I)
    host_blocks = -(-(total_blocks - I * kv_blocks) // I) + 8
    model = long_tiny_model(max(4096, n + M + bs))
    t0 = time.perf_counter()
    llm = LLM(model, mesh=f"{I}x1", block_size=bs, kv_blocks=kv_blocks, host_kv_blocks=host_blocks,
              max_num_batched_tokens=chunk, max_num_seqs=1, warm_start=False,
              enable_prefix_caching=False)
    build_s = time.perf_counter() - t0
    eng = llm.engine
    plan_s: list[float] = []
    schedule = eng.scheduler.schedule

    def timed_schedule():
        t = time.perf_counter()
        out = schedule()
        plan_s.append(time.perf_counter() - t)
        return out

    eng.scheduler.schedule = timed_schedule
    prompt = np.random.default_rng(0).integers(3, 500, size=n).tolist()
    compiled0 = CompileStats.compiled()
    rid = eng.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=M, ignore_eos=True))
    t0 = time.perf_counter()
    first = None
    token_times = []
    final = None
    prefill_steps = 0
    most_on_host = 0
    while eng.has_unfinished():
        outs = eng.step()
        now = time.perf_counter()
        most_on_host = max(most_on_host, int(sum(eng.kv.host_attended_blocks())))
        for o in outs:
            if o.request_id != rid:
                continue
            k = len(o.outputs[0].token_ids)
            if k and first is None:
                first = now - t0
            if k:
                token_times.append(now)
            if o.finished:
                final = o
        if first is None:
            prefill_steps += 1
    steps = np.diff(token_times) if len(token_times) > 1 else np.zeros(0)
    comp = final.outputs[0]
    snap = eng.metrics_snapshot()
    result = {
        "bench": "longctx", "prompt_tokens": n, "max_tokens": M, "mesh": f"{I}x1",
        "block_size": bs, "kv_blocks_per_instance": kv_blocks, "host_kv_blocks_per_instance": host_blocks,
        "device_kv_tokens": I * kv_blocks * bs, "host_kv_tokens": I * host_blocks * bs,
        "completed": comp.finish_reason == "length" and len(comp.token_ids) == M,
        "generated": len(comp.token_ids),
        "engine_build_s": round(build_s, 2),
        "prefill_s": round(first, 2) if first is not None else None,
        "prefill_steps": prefill_steps,
        "prefill_tokens_per_s": round(n / first, 1) if first else None,
        "decode_step_ms_median": round(float(np.median(steps)) * 1e3, 2) if len(steps) else None,
        "decode_step_ms_first_to_last": [round(float(x) * 1e3, 2) for x in steps],
        "planning_ms_median": round(statistics.median(plan_s) * 1e3, 3),
        "planning_ms_max": round(max(plan_s) * 1e3, 3),
        # prefill steps plan chunks of the prompt (work lists of tiles x blocks);
        # decode steps one row each
        "planning_ms_prefill_median": round(statistics.median(plan_s[:prefill_steps]) * 1e3, 3),
        "planning_ms_decode_median": round(statistics.median(plan_s[-(M - 1):]) * 1e3, 3)
        if M > 1 else None,
        "most_blocks_on_host": most_on_host,
        "most_tokens_on_host_share": round(most_on_host * bs / (n + M), 3),
        "offloaded_blocks": int(sum(snap["kv_offloaded_blocks"])),
        "preemptions": eng.stats["preemptions"],
        "programs_compiled": CompileStats.compiled() - compiled0,
        "cpu": cpu_model(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "devices": len(jax.devices()), "quick": FLAGS.quick,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "decode_step_ms_first_to_last"}),
          flush=True)
    write_json(FLAGS.output_json, result)
