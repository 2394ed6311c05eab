"""Long-document QA with a prefix cache: the same documents asked many questions.

    python -m distkv_jax.bench prefix [--quick] [--instances 8] [--doc_factors 2.5,0.5]

Stream (fixed seed): D documents (--docs) of L tokens each; per document Q
questions (--questions), each a prompt = the document + --question_len
tokens of its own, answered with --answer_len tokens (greedy, ignore_eos).
The questions on a document arrive as a Poisson process (--rate questions
per engine step per document; every document's first question at step 0).
Token ids are random in [3, 500]. Documents come in two lengths, each its
own stream: L = F x one instance's KV (--kv_blocks x --block_size) for each
F in --doc_factors; F > 1 makes one document's KV span several instances.

Configurations (mesh Ix1, same KV memory):

  mesh:     kv_policy distributed, prefix cache on: a question reuses its
            document's blocks wherever they were computed, in place;
  instance: kv_policy local, prefix cache on: each request, and the cache it
            may reuse, confined to its own instance (vLLM's behaviour on a
            multi-instance deployment); a document longer than one
            instance's KV is refused;
  none:     kv_policy distributed, prefix cache off.

Per stream, the configurations take turns (--slice_steps engine steps each,
round robin) on one step clock, as `bench workload` does: times are
compile-adjusted step wall times (a step that compiled a program counts at
the run's median step time). After an unrecorded warm-up pass, one recorded
pass (the warm-up's wall time and compile steps are reported as the first
call's cost). Reported per configuration: TTFT (median, p99, seconds) of each
document's first question and of the questions after it; token throughput
(prompt + output tokens of completed requests per busy second) and output
tokens per busy second; the hit rate (prompt tokens served from the cache /
prompt tokens) and the ideal one (every full block of a document computed
once while it stays cached: a later question's ideal is its document's full
blocks, but never its prompt's last token); prefix-cache hits on blocks of
another instance; refusals. Targets: the median TTFT of a later question
is >= 5x lower with the mesh-wide cache than with none, and the mesh-wide
hit rate is within 5% of the ideal. Writes --output_json and --output_png.
"""

from __future__ import annotations

import bisect
import json
import os
import platform
import tempfile
import time

import numpy as np
from absl import flags

from distkv_jax.bench.common import cpu_model, pyplot, save_figure, take_turns, write_json

FLAGS = flags.FLAGS
CONFIGS = ("mesh", "instance", "none")


def define_flags() -> None:
    flags.DEFINE_integer("instances", 8, "instances (mesh Ix1)")
    flags.DEFINE_integer("kv_blocks", 64, "KV blocks per instance")
    flags.DEFINE_integer("block_size", 16, "tokens per KV block")
    flags.DEFINE_list("doc_factors", ["3.5", "0.5"], "document lengths, in instances' KV")
    flags.DEFINE_integer("docs", 2, "documents per stream")
    flags.DEFINE_integer("questions", 8, "questions per document")
    flags.DEFINE_integer("question_len", 24, "tokens of a question (after its document)")
    flags.DEFINE_integer("answer_len", 8, "tokens generated per answer")
    flags.DEFINE_float("rate", 0.05, "questions per engine step per document (Poisson)")
    flags.DEFINE_integer("max_num_batched_tokens", 256, "tokens per step per instance")
    flags.DEFINE_integer("slice_steps", 32, "engine steps per turn")
    flags.DEFINE_integer("seed", 0, "stream seed")
    flags.DEFINE_string("model", "tiny", "model directory (default: the built-in tiny model)")
    flags.DEFINE_bool("quick", False, "tiny sizes (for the test suite)")
    flags.DEFINE_string("output_json", "bench_results/prefix.json", "result file")
    flags.DEFINE_string("output_png", "bench_results/prefix.png", "plot ('' to skip)")


def make_stream(seed: int, docs: int, doc_len: int, questions: int, question_len: int,
                answer_len: int, rate: float) -> list[dict]:
    rng = np.random.default_rng(seed)
    reqs = []
    for d in range(docs):
        doc = rng.integers(3, 500, size=doc_len).tolist()
        arrivals = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate, questions - 1))])
        for q in range(questions):
            prompt = doc + rng.integers(3, 500, size=question_len).tolist()
            reqs.append(dict(id=f"d{d}q{q}", doc=d, kind="first" if q == 0 else "later",
                             prompt=prompt, prompt_len=len(prompt), max_tokens=answer_len,
                             step=int(arrivals[q])))
    reqs.sort(key=lambda r: (r["step"], r["id"]))
    return reqs


def ideal_cached(r: dict, doc_len: int, bs: int) -> int:
    """Every full block of the document computed once: a later question finds
    them all (but never its own last prompt token)."""
    if r["kind"] == "first":
        return 0
    return min(doc_len // bs * bs, (r["prompt_len"] - 1) // bs * bs)


class Run:
    """One configuration serving a stream on its step clock, in slices."""

    def __init__(self, llm, reqs):
        self.eng, self.reqs = llm.engine, reqs
        self.recs = {r["id"]: dict(kind=r["kind"], prompt_len=r["prompt_len"],
                                   max_tokens=r["max_tokens"]) for r in reqs}
        self.steps, self.ends = [], []
        self.clock = self.k = 0
        self.loop = None
        self.snap0 = self.eng.metrics_snapshot()

    def done(self) -> bool:
        return self.k >= len(self.reqs) and not self.eng.has_unfinished()

    def _admit(self) -> bool:
        from distkv_jax import SamplingParams

        eng = self.eng
        if not eng.has_unfinished() and self.k < len(self.reqs) and self.reqs[self.k]["step"] > self.clock:
            self.clock = self.reqs[self.k]["step"]
        while self.k < len(self.reqs) and self.reqs[self.k]["step"] <= self.clock:
            r = self.reqs[self.k]
            eng.add_request(r["prompt"], SamplingParams(temperature=0.0, max_tokens=r["max_tokens"],
                                                        ignore_eos=True), request_id=r["id"])
            self.recs[r["id"]]["arrival_step"] = len(self.steps)
            self.k += 1
        self._c0 = eng.compiled_programs()
        self._t0 = time.perf_counter()
        return self.k < len(self.reqs)

    def advance(self, max_steps: int) -> None:
        eng = self.eng
        if self.loop is None:
            self.loop = eng.iterate(self._admit, only_finished=True)
        ran = 0
        while ran < max_steps and not self.done():
            outs = next(self.loop, None)
            if outs is None:
                break
            self.ends.append(time.time())
            self.steps.append(dict(seconds=time.perf_counter() - self._t0,
                                   compiled=eng.compiled_programs() > self._c0))
            for out in outs:
                c, m = out.outputs[0], out.metrics
                rec = self.recs[out.request_id]
                rec.update(finish_reason=c.finish_reason, generated=len(c.token_ids),
                           cached=out.num_cached_tokens, finish_step=len(self.steps) - 1,
                           error=out.error)
                if m.first_token_time is not None:
                    rec["first_token_step"] = bisect.bisect_left(self.ends, m.first_token_time)
            self.clock += 1
            ran += 1
        if self.steps:
            t0 = time.perf_counter()
            eng.sync()
            self.steps[-1]["seconds"] += time.perf_counter() - t0


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else None


def summarize(run: Run, doc_len: int, bs: int) -> dict:
    secs = np.asarray([s["seconds"] for s in run.steps])
    compiled = np.asarray([s["compiled"] for s in run.steps], bool)
    typical = float(np.median(secs[~compiled])) if (~compiled).any() else float(np.median(secs))
    adj = np.where(compiled, typical, secs)
    end = np.concatenate([[0.0], np.cumsum(adj)])
    recs = run.recs
    done = {k: r for k, r in recs.items() if r.get("finish_reason") == "length"
            and r["generated"] == r["max_tokens"]}
    out = {"steps": len(run.steps), "busy_seconds": float(adj.sum()),
           "wall_seconds": float(secs.sum()),  # unadjusted: compilation included
           "compile_steps": int(compiled.sum()), "median_step_ms": typical * 1e3,
           "requests": len(recs), "completed": len(done),
           "refused": sum(1 for r in recs.values() if r.get("finish_reason") == "error"),
           "errors": sorted({r["error"] for r in recs.values() if r.get("error")})}
    for kind in ("first", "later"):
        ttft = [end[r["first_token_step"] + 1] - end[r["arrival_step"]]
                for r in done.values() if r["kind"] == kind]
        out[f"ttft_{kind}_s"] = {"median": _pct(ttft, 50), "p99": _pct(ttft, 99), "n": len(ttft)}
    prompt = sum(r["prompt_len"] for r in done.values())
    gen = sum(r["generated"] for r in done.values())
    cached = sum(r["cached"] for r in done.values())
    ideal = sum(ideal_cached(dict(r, prompt_len=r["prompt_len"]), doc_len, bs) for r in done.values())
    busy = float(adj.sum()) or 1.0
    out.update(total_tok_per_s=(prompt + gen) / busy, output_tok_per_s=gen / busy,
               prompt_tokens=prompt, cached_tokens=cached,
               hit_rate=cached / prompt if prompt else 0.0,
               ideal_hit_rate=ideal / prompt if prompt else 0.0,
               hit_over_ideal=cached / ideal if ideal else None)
    s0, s1 = run.snap0, run.eng.metrics_snapshot()
    for key in ("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_hits_remote",
                "prefix_cache_evictions"):
        out[key] = int(sum(s1[key]) - sum(s0[key]))
    out["preemptions"] = s1["stats"]["preemptions"] - s0["stats"]["preemptions"]
    return out


def _pass(specs, reqs, slice_steps):
    runs = [(spec, Run(spec["llm"], reqs)) for spec in specs]
    take_turns([r for _, r in runs], slice_steps)
    return runs


def main(argv) -> None:
    del argv
    I, B, bs = FLAGS.instances, FLAGS.kv_blocks, FLAGS.block_size
    factors = [float(f) for f in FLAGS.doc_factors]
    docs, qs, qlen, alen, rate = FLAGS.docs, FLAGS.questions, FLAGS.question_len, FLAGS.answer_len, FLAGS.rate
    budget, slice_steps = FLAGS.max_num_batched_tokens, FLAGS.slice_steps
    if FLAGS.quick:
        I, B, docs, qs, qlen, alen, rate, budget = 4, 16, 1, 4, 8, 2, 0.2, 128
        factors = [1.5]
    from distkv_jax.mesh import simulate_cpu_devices

    simulate_cpu_devices(I)
    import jax

    from distkv_jax import LLM

    inst_tokens = B * bs
    setups = {
        "mesh": dict(kv_policy="distributed", enable_prefix_caching=True),
        "instance": dict(kv_policy="local", enable_prefix_caching=True),
        "none": dict(kv_policy="distributed", enable_prefix_caching=False),
    }
    streams, rows = [], []
    with tempfile.TemporaryDirectory():
        specs = [dict(name=n, setup=setups[n],
                      llm=LLM(FLAGS.model, mesh=f"{I}x1", block_size=bs, kv_blocks=B,
                              max_num_batched_tokens=budget, max_num_seqs=64, warm_start=False,
                              **setups[n])) for n in CONFIGS]
        for f in factors:
            doc_len = int(round(f * inst_tokens))
            reqs = make_stream(FLAGS.seed, docs, doc_len, qs, qlen, alen, rate)
            streams.append(dict(doc_factor=f, doc_len=doc_len, requests=[
                {k: r[k] for k in ("id", "doc", "kind", "prompt_len", "max_tokens", "step")} for r in reqs]))
            for spec in specs:  # a fresh cache for each stream
                spec["llm"].engine.kv.reset_prefix_cache()
            # warm-up: compiles, first touch (its first-call cost is reported)
            first = {spec["name"]: summarize(run, doc_len, bs)
                     for spec, run in _pass(specs, reqs, slice_steps)}
            for spec in specs:
                spec["llm"].engine.kv.reset_prefix_cache()
            for spec, run in _pass(specs[::-1], reqs, slice_steps):
                row = dict(config=spec["name"], doc_factor=f, doc_len=doc_len,
                           doc_instances=-(-doc_len // inst_tokens), **spec["setup"],
                           **summarize(run, doc_len, bs))
                fp = first[spec["name"]]
                row["first_pass"] = {k: fp[k] for k in ("wall_seconds", "compile_steps", "steps",
                                                         "ttft_first_s", "ttft_later_s")}
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("config", "doc_len", "completed", "refused",
                                                      "ttft_later_s", "hit_rate", "ideal_hit_rate",
                                                      "total_tok_per_s")}), flush=True)
        del specs
    comparison = {}
    for f in factors:
        by = {r["config"]: r for r in rows if r["doc_factor"] == f}
        mesh, none = by["mesh"], by["none"]
        ml, nl = mesh["ttft_later_s"]["median"], none["ttft_later_s"]["median"]
        comparison[str(f)] = {
            "later_ttft_median_none_over_mesh": (nl / ml) if ml and nl else None,
            "mesh_hit_over_ideal": mesh["hit_over_ideal"],
            "throughput_mesh_over_none": mesh["total_tok_per_s"] / none["total_tok_per_s"]
            if none["total_tok_per_s"] else None,
            "instance_refused": by["instance"]["refused"],
            "instance_hit_rate": by["instance"]["hit_rate"],
        }
    print(json.dumps(comparison), flush=True)
    result = {"bench": "prefix", "instances": I, "block_size": bs, "kv_blocks_per_instance": B,
              "instance_kv_tokens": inst_tokens, "docs": docs, "questions": qs,
              "question_len": qlen, "answer_len": alen, "rate_per_doc_per_step": rate,
              "max_num_batched_tokens": budget, "model": FLAGS.model, "streams": streams,
              "rows": rows, "comparison": comparison, "cpu": cpu_model(), "cpus": os.cpu_count(),
              "machine": platform.machine(), "devices": len(jax.devices()), "quick": FLAGS.quick,
              "clock": "engine steps; seconds = compile-adjusted step wall time"}
    write_json(FLAGS.output_json, result)
    if FLAGS.output_png:
        _plot(rows, FLAGS.output_png)


def _plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    factors = sorted({r["doc_factor"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / len(CONFIGS)
    for j, name in enumerate(CONFIGS):
        rs = [next(r for r in rows if r["config"] == name and r["doc_factor"] == f) for f in factors]
        x = np.arange(len(factors)) + j * width
        axes[0].bar(x, [r["ttft_later_s"]["median"] or 0 for r in rs], width, label=name)
        axes[1].bar(x, [r["hit_rate"] for r in rs], width, label=name)
        axes[2].bar(x, [r["total_tok_per_s"] for r in rs], width, label=name)
    for ax, title in zip(axes, ("median TTFT of later questions (s)", "prefix-cache hit rate",
                                "tokens / busy second")):
        ax.set_xticks(np.arange(len(factors)) + width)
        ax.set_xticklabels([f"doc {f:g} x instance KV" for f in factors])
        ax.set_title(title)
    axes[1].scatter(np.arange(len(factors)) + width,
                    [next(r for r in rows if r["config"] == "mesh" and r["doc_factor"] == f)["ideal_hit_rate"]
                     for f in factors], marker="_", s=400, color="k", label="ideal", zorder=3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    save_figure(fig, path)
