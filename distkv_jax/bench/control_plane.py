"""Host (control-plane) cost of one decode step, timed on the engine's real path.

Set-up (not timed): ``--requests`` running requests holding ``--total_tokens``
tokens of KV over ``--instances`` instances (lengths drawn log-normal with
sigma ``--sigma``, fixed seed, scaled to the total; homes round-robin, longest
first, so the instances that get the longest requests borrow; under
``--kv_policy=local`` each goes to the instance with the most free blocks).
Every request is put in a ``Scheduler`` already in the decode state (its KV
holds all but its last token), so each step gives every request one row.

Each timed step runs what ``Engine.step`` does on the host, in its order
(overlapped steps, the engine's default):

  schedule   ``Scheduler.schedule()``: demands, ``KVCacheManager.prepare_step``
             (migration / defrag planning, growth, preemption), row placement
             and the step's arrays, including ``build_attention_plan``
  sampling   ``model_runner.sampling_tensors`` of the step's logits rows
  meta       ``DistMeta.from_plan`` (the attention plan's device form)
  advance    ``Scheduler.advance``, then the previous step's results are read
             (``append_token`` per sampled row, token id 5) and this step's
             sampled rows are marked pending (``mark_pending``)

The device work (the jitted step, KV copies, reading tokens back) is not
included. ``--compare_engine`` also runs the built-in tiny model through
``LLM`` on 8 simulated CPU devices (256 requests, 64-token prompts, 32 greedy
tokens each, ``ignore_eos``) and reports the median decode-only step time of
``engine.step_log`` (host path + device step, as one ``step()`` call), to set
the host path against a real decode step.

Prints a JSON line and writes it to ``--output_json``.
"""
from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
from absl import flags

from distkv_jax.bench.common import cpu_model

FLAGS = flags.FLAGS
flags.DEFINE_integer("requests", 256, "running requests")
flags.DEFINE_integer("total_tokens", 1 << 20, "tokens of KV held in total")
flags.DEFINE_integer("instances", 8, "serving instances")
flags.DEFINE_integer("block_size", 16, "tokens per KV block")
flags.DEFINE_float("headroom", 0.10, "spare device blocks, as a fraction of the KV held")
flags.DEFINE_float("sigma", 1.0, "log-normal sigma of request lengths")
flags.DEFINE_integer("steps", 50, "timed decode steps")
flags.DEFINE_integer("warmup", 5, "untimed decode steps")
flags.DEFINE_integer("seed", 0, "seed of the length draw")
flags.DEFINE_enum("kv_policy", "distributed", ["distributed", "local"], "KV policy")
flags.DEFINE_bool("compare_engine", False, "also time real engine decode steps (tiny model, "
                  "8 simulated CPU devices) for comparison")
flags.DEFINE_integer("engine_requests", 256, "--compare_engine: requests")
flags.DEFINE_integer("engine_prompt", 64, "--compare_engine: prompt tokens per request")
flags.DEFINE_integer("engine_new", 32, "--compare_engine: generated tokens per request")
flags.DEFINE_string("output_json", "bench_results/control_plane.json", "where to write the result")
flags.DEFINE_bool("quick", False, "tiny sizes (for the test suite): 32 requests, 32K tokens, "
                  "4 instances, 5 steps; --compare_engine: 16 requests of 16 + 4 tokens")

PARTS = ("schedule", "sampling", "meta", "advance")
TOKEN = 5          # the token every sampled row "reads back"
EOS_IDS = {2}


def draw_lengths(requests: int, total_tokens: int, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=0.0, sigma=sigma, size=requests)
    lengths = np.maximum(1, np.floor(raw / raw.sum() * total_tokens)).astype(np.int64)
    lengths[0] += total_tokens - int(lengths.sum())  # exact total
    return lengths


def build(requests: int, total_tokens: int, instances: int, block_size: int,
          headroom: float, sigma: float, seed: int, kv_policy: str):
    """(scheduler, lengths): every request running, in the decode state."""
    from distkv_jax.kv_cache_manager import KVCacheManager
    from distkv_jax.kv_types import KVCacheConfig
    from distkv_jax.request import Request, RequestStatus
    from distkv_jax.sampling_params import SamplingParams
    from distkv_jax.scheduler import Scheduler, SchedulerConfig

    lengths = draw_lengths(requests, total_tokens, sigma, seed)
    blocks_needed = int(sum(-(-int(n) // block_size) for n in lengths))
    per_inst = int(np.ceil(blocks_needed * (1 + headroom) / instances))
    kv = KVCacheManager(KVCacheConfig(instances, per_inst, block_size=block_size,
                                      kv_policy=kv_policy, lend_fraction=0.9))
    # every request decodes every step: room for all of them on any instance
    sched = Scheduler(SchedulerConfig(max_num_seqs=requests, max_num_batched_tokens=requests), kv)
    params = SamplingParams(temperature=0.0, max_tokens=None)
    reqs = []
    for i, n in enumerate(lengths.tolist()):
        r = Request(request_id=str(i), params=params, tokens=[1] * n, prompt_len=n)
        sched.add(r)
        reqs.append(r)
    # Longest first. "distributed": homes round-robin, so the instances that
    # get the longest requests borrow. "local": each request goes to the
    # instance with the most free blocks (it cannot borrow).
    order = np.argsort(-lengths, kind="stable").tolist()
    for k, i in enumerate(order):
        r = reqs[i]
        r.instance = kv.admit(r.request_id, k % instances if kv_policy == "distributed" else None)
        if kv_policy == "local":
            _grow(kv, r.request_id, int(lengths[i]) - 1)
    if kv_policy == "distributed":
        for i in order:
            _grow(kv, reqs[i].request_id, int(lengths[i]) - 1)
    for r in reqs:
        r.status = RequestStatus.RUNNING
        r.num_computed = len(r.tokens) - 1
    return sched, lengths


def _grow(kv, rid: str, n: int) -> None:
    res = kv.grow(rid, n)
    if res.status != "ok" or res.preemptions:
        raise RuntimeError(f"setup failed for request {rid}: {res.status}")


def _check_decode_plan(plan, requests: int) -> None:
    """One decode row per request, one sampled row each, nothing preempted."""
    if plan is None or plan.kv.preempted or plan.kv.too_long or plan.kv.deferred:
        raise RuntimeError("set-up is wrong: a request could not decode "
                           f"({None if plan is None else plan.kv})")
    ids = [s.request.request_id for s in plan.seqs]
    sampled = [r for r in plan.logits_rows if r is not None and r.target < 0]
    if (len(ids) != requests or len(set(ids)) != requests or any(s.count != 1 for s in plan.seqs)
            or len(sampled) != requests):
        raise RuntimeError(f"set-up is wrong: {len(ids)} rows ({len(set(ids))} requests, "
                           f"{len(sampled)} sampled) for {requests} decoding requests")


def _stats(ms: np.ndarray) -> dict:
    return {"median": float(np.median(ms)), "mean": float(ms.mean()),
            "p90": float(np.percentile(ms, 90))}


def run(sched, steps: int, warmup: int) -> dict:
    from distkv_jax.dist_attention import DistMeta
    from distkv_jax.model_runner import sampling_tensors

    requests = len(sched.requests)
    clock = time.perf_counter
    times = {p: [] for p in PARTS}
    moved = preempted = 0
    prev = None
    for s in range(warmup + steps):
        t0 = clock()
        plan = sched.schedule()
        t1 = clock()
        st = sampling_tensors(plan.logits_rows, EOS_IDS)
        t2 = clock()
        meta = DistMeta.from_plan(plan.attention)
        t3 = clock()
        sched.advance(plan)
        if prev is not None:  # the previous step's tokens are read back
            for row in prev.logits_rows:
                if row is not None and row.target < 0:
                    sched.append_token(row.request, TOKEN)
        for k, row in enumerate(plan.logits_rows):
            if row is not None and row.target < 0:
                sched.mark_pending(row.request, k)
        t4 = clock()
        prev = plan
        _check_decode_plan(plan, requests)
        assert st.temperature.shape[0] == len(plan.logits_rows) and meta.slots.size > 0
        if s >= warmup:
            for p, dt in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[p].append(dt)
            moved += len(plan.kv.moves.pairs)
            preempted += len(plan.kv.preempted)
    ms = {p: np.asarray(v) * 1e3 for p, v in times.items()}
    total = sum(ms.values())
    out = {f"step_ms_{k}": v for k, v in _stats(total).items()}
    for p in PARTS:
        out.update({f"{p}_ms_{k}": v for k, v in _stats(ms[p]).items()})
    out.update(blocks_moved=moved, preempted=preempted,
               rows_per_instance=int(plan.tokens.shape[1]),
               attention_items_shape=list(plan.attention.item_tile.shape))
    return out


def compare_engine(requests: int, prompt: int, new: int) -> dict:
    """Median decode-only step of the real engine (tiny model, 8x1 mesh on
    simulated CPU devices; the devices were requested in main)."""
    from distkv_jax.llm import LLM
    from distkv_jax.sampling_params import SamplingParams

    bs = 16
    per_inst = -(-requests // 8)
    kv_blocks = per_inst * -(-(prompt + new) // bs) + 8
    llm = LLM("tiny", mesh="8x1", kv_blocks=kv_blocks, warm_start=False, max_num_seqs=per_inst,
              block_size=bs)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, size=prompt).tolist() for _ in range(requests)]
    sp = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    wall = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == new for o in outs)
    log = llm.engine.step_log
    dec = [(d, sec) for p, d, sec in log if p == 0 and d > 0]  # decode-only steps
    if not dec:
        raise RuntimeError("the engine ran no decode-only step")
    sec = np.asarray([x for _, x in dec]) * 1e3
    # warm_start=False: a decode step whose program is new compiles it; the
    # median is robust to those few steps
    return {
        "engine_requests": requests, "engine_prompt": prompt, "engine_new": new,
        "engine_kv_blocks": kv_blocks, "engine_max_num_seqs": per_inst,
        "engine_steps": len(log), "engine_decode_steps": len(dec),
        "engine_decode_rows_mean": float(np.mean([d for d, _ in dec])),
        "engine_decode_step_ms_median": float(np.median(sec)),
        "engine_decode_step_ms_p90": float(np.percentile(sec, 90)),
        "engine_generate_s": wall,
    }


def main(argv) -> None:
    del argv
    if FLAGS.quick:
        FLAGS.requests, FLAGS.total_tokens, FLAGS.instances = 32, 1 << 15, 4
        FLAGS.steps, FLAGS.warmup = 5, 1
        FLAGS.engine_requests, FLAGS.engine_prompt, FLAGS.engine_new = 16, 16, 4
    if FLAGS.compare_engine:  # before anything starts JAX's backend
        from distkv_jax.mesh import simulate_cpu_devices

        simulate_cpu_devices(8)
    t0 = time.perf_counter()
    sched, lengths = build(FLAGS.requests, FLAGS.total_tokens, FLAGS.instances,
                           FLAGS.block_size, FLAGS.headroom, FLAGS.sigma, FLAGS.seed,
                           FLAGS.kv_policy)
    setup_s = time.perf_counter() - t0
    kv = sched.kv
    remote0 = int(kv.ledger().sum())
    res = run(sched, FLAGS.steps, FLAGS.warmup)
    out = {
        "bench": "control_plane",
        "requests": FLAGS.requests,
        "total_tokens": int(lengths.sum()),
        "instances": FLAGS.instances,
        "block_size": FLAGS.block_size,
        "blocks_per_instance": kv.config.blocks_per_instance,
        "kv_policy": FLAGS.kv_policy,
        "max_request_tokens": int(lengths.max()),
        "remote_blocks_at_start": remote0,
        "steps": FLAGS.steps,
        "warmup": FLAGS.warmup,
        "quick": FLAGS.quick,
        "setup_s": setup_s,
        **res,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
    }
    if FLAGS.compare_engine:
        out.update(compare_engine(FLAGS.engine_requests, FLAGS.engine_prompt, FLAGS.engine_new))
        out["host_share_of_engine_decode_step"] = (out["step_ms_median"]
                                                   / out["engine_decode_step_ms_median"])
    line = json.dumps(out, sort_keys=True)
    print(line)
    if FLAGS.output_json:
        d = os.path.dirname(FLAGS.output_json)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(FLAGS.output_json, "w") as f:
            f.write(line + "\n")
