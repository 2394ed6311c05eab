"""Batch jobs (and a demo) on a mesh: `python -m distkv_jax.launch`.

    python -m distkv_jax.launch --mesh 2x4 --model DIR|tiny \\
        --input_jsonl in.jsonl --output_jsonl out.jsonl --metrics_json m.json

Input: one JSON object a line: "id" (string or integer, unique), exactly one
of "prompt" (text) or "prompt_token_ids" (list of ints), and optionally any
SamplingParams field ("max_tokens", "temperature", "top_p", "top_k", "min_p",
"seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "logprobs",
"prompt_logprobs", ...) overriding the flag defaults. Blank lines are skipped.

Output: one JSON object per request, appended and flushed as it finishes:
id, line, text, token_ids, finish_reason, stop_reason, error (null unless
finish_reason is "error"), prompt_tokens, generation_tokens, ttft_s, tpot_s,
e2e_latency_s (and cumulative_logprob / logprobs when asked for).

Nothing is lost: a bad line (bad JSON, no prompt, an unknown field, a bad
sampling value, a duplicate id) or a request the engine refuses (a prompt over
the KV capacity) becomes an error record naming its line, and the job goes
on; rerunning with the same --output_jsonl skips every id already written
(resume after a crash). The exit status is non-zero only when the job itself
fails (bad flags, unreadable input, model that does not load, a crash).

Multi-host: --coordinator_address/--num_processes/--process_id (or
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) join a
jax.distributed job. Every process reads the same input and runs the same
deterministic control plane; process 0 writes the output and the metrics.

Without --input_jsonl it runs a demo on a few built-in prompts and prints the
outputs and the metrics summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import deque
from typing import Any, Iterable

from absl import app, flags

from .runtime import fail

from .sampling_params import SamplingParams

_MESH = flags.DEFINE_string("mesh", "1x1", "device mesh IxT (instances x tensor-parallel)")
_MODEL = flags.DEFINE_string("model", "tiny", "Hugging Face model directory, orbax checkpoint "
                             "directory (python -m distkv_jax.convert), or 'tiny' (built-in model)")
_INPUT = flags.DEFINE_string("input_jsonl", None, "requests, one JSON object a line; "
                             "none: demo generation on built-in prompts")
_OUTPUT = flags.DEFINE_string("output_jsonl", None, "results, one JSON object a finished request "
                              "(appended; ids already there are skipped: resume)")
_METRICS = flags.DEFINE_string("metrics_json", None, "write the metrics summary here (JSON)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
# default sampling (a line's own fields win)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 16, "default max new tokens per request")
_MIN_TOKENS = flags.DEFINE_integer("min_tokens", 0, "default min new tokens before EOS/stop ids")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "default temperature (0: greedy)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "default top-p (1: off)")
_TOP_K = flags.DEFINE_integer("top_k", 0, "default top-k (0 or -1: off)")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "default min-p (0: off)")
_SEED = flags.DEFINE_integer("seed", 0, "base seed: a request without its own seed samples with "
                             "a seed derived from (seed, its line number), so reruns and resumes "
                             "reproduce it")
_IGNORE_EOS = flags.DEFINE_boolean("ignore_eos", False, "default: keep generating after EOS")
_STOP = flags.DEFINE_multi_string("stop", [], "default stop string (repeatable)")
_LOGPROBS = flags.DEFINE_integer("logprobs", None, "default number of top logprobs per token")
# cache / scheduler
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 16, "tokens per KV block")
_KV_BLOCKS = flags.DEFINE_integer("kv_blocks", None, "KV blocks per instance (default: from free memory)")
_HOST_KV_BLOCKS = flags.DEFINE_integer("host_kv_blocks", 0, "host-memory KV blocks per instance")
_KV_POLICY = flags.DEFINE_enum("kv_policy", "distributed", ["distributed", "local"],
                               "distributed: requests may borrow KV blocks of other instances")
_MAX_NUM_SEQS = flags.DEFINE_integer("max_num_seqs", 64, "running sequences per instance")
_MAX_BATCHED = flags.DEFINE_integer("max_num_batched_tokens", 256, "tokens per step per instance")
_MAX_PENDING = flags.DEFINE_integer("max_pending", None, "requests held by the engine at once "
                                    "(default: 4 x max_num_seqs x instances); the rest wait in the file")
_ATTENTION = flags.DEFINE_enum("attention_impl", "auto", ["auto", "native", "reference", "pallas"],
                               "MicroAttention implementation (auto: the native C++ kernel on "
                               "CPU where it builds, else the jnp reference)")
_PROGRESS = flags.DEFINE_boolean("progress", True, "show a progress bar (stderr)")
# multi-host
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 "
                             "(default: $JAX_COORDINATOR_ADDRESS)")
_NUM_PROC = flags.DEFINE_integer("num_processes", None, "processes in the job (default: "
                                 "$JAX_NUM_PROCESSES, else 1)")
_PROC_ID = flags.DEFINE_integer("process_id", None, "this process (default: $JAX_PROCESS_ID)")
# testing
_STOP_AFTER = flags.DEFINE_integer("stop_after", None, "testing: simulate a crash (exit status "
                                   f"{3}) after writing this many records")

CRASH_EXIT = 3
DEMO_PROMPTS = [
    "The KV cache of a long request",
    "Queries are small and travel",
    "Once upon a time",
    "An instance that runs out of memory",
]
REQUEST_FIELDS = ("id", "prompt", "prompt_token_ids")
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _log(msg: str) -> None:
    print(f"[distkv launch] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- input
@dataclasses.dataclass
class Entry:
    """One input line: a request, or an error (then `params` is None)."""

    line: int                  # 1-based line number in the input file
    id: Any                    # the JSON id as given (str or int); None when unreadable
    prompt: Any = None         # str or list of token ids
    params: SamplingParams | None = None
    error: str | None = None

    @property
    def key(self) -> str:
        return str(self.id)


def derived_seed(base_seed: int, line: int) -> int:
    return (base_seed * 1_000_003 + line) % (2 ** 31)


def parse_line(text: str, line: int, defaults: dict, base_seed: int) -> Entry | None:
    """One input line -> Entry (None for a blank line). Never raises on bad input."""
    if not text.strip():
        return None

    def bad(msg, rid=None):
        return Entry(line, rid, error=f"line {line}: {msg}")

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return bad(f"invalid JSON ({e})")
    if not isinstance(obj, dict):
        return bad(f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if rid is None:
        return bad("missing 'id'")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return bad(f"'id' must be a string or an integer, got {rid!r}")
    unknown = sorted(set(obj) - set(REQUEST_FIELDS) - set(SAMPLING_FIELDS))
    if unknown:
        return bad(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: "
                   f"{', '.join(REQUEST_FIELDS + SAMPLING_FIELDS)}", rid)
    has_text, has_ids = "prompt" in obj, "prompt_token_ids" in obj
    if has_text == has_ids:
        return bad("needs exactly one of 'prompt' or 'prompt_token_ids'", rid)
    if has_text:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            return bad(f"'prompt' must be a string, got {type(prompt).__name__}", rid)
    else:
        prompt = obj["prompt_token_ids"]
        if not isinstance(prompt, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return bad("'prompt_token_ids' must be a list of integers", rid)
    fields = {k: v for k, v in obj.items() if k in SAMPLING_FIELDS}
    kw = dict(defaults, **fields)
    if kw.get("seed") is None:
        kw["seed"] = derived_seed(base_seed, line)
    try:
        params = SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        return bad(str(e), rid)
    return Entry(line, rid, prompt, params)


def parse_input(lines: Iterable[str], defaults: dict, base_seed: int) -> list[Entry]:
    """Every non-blank line as an Entry; a repeated id is an error on its later line."""
    entries, first_line = [], {}
    for n, text in enumerate(lines, start=1):
        e = parse_line(text, n, defaults, base_seed)
        if e is None:
            continue
        if e.error is None:
            if e.key in first_line:
                e = Entry(n, None, error=f"line {n}: duplicate id {e.id!r} "
                                         f"(first on line {first_line[e.key]})")
            else:
                first_line[e.key] = n
        entries.append(e)
    return entries


def read_done(path: str) -> tuple[set[str], set[int]]:
    """(ids, lines) already in an output file. A partial last line (a crash
    mid-write) is cut off so that appending stays valid JSONL."""
    ids: set[str] = set()
    lines: set[int] = set()
    if not path or not os.path.exists(path):
        return ids, lines
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            _log(f"{path}: dropping a partial last line ({len(data) - cut} bytes)")
            f.truncate(cut)
            data = data[:cut]
    for raw in data.splitlines():
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("id") is not None:
            ids.add(str(rec["id"]))
        elif isinstance(rec.get("line"), int):
            lines.add(rec["line"])
    return ids, lines


def is_done(e: Entry, ids: set[str], lines: set[int]) -> bool:
    return (e.id is not None and e.key in ids) or (e.id is None and e.line in lines)


# --------------------------------------------------------------- output
def _error_record(e: Entry) -> dict:
    return {"id": e.id, "line": e.line, "text": "", "token_ids": [], "finish_reason": "error",
            "stop_reason": None, "error": e.error, "prompt_tokens": 0, "generation_tokens": 0,
            "ttft_s": None, "tpot_s": None, "e2e_latency_s": None}


def request_record(e: Entry, out) -> dict:
    comp = out.outputs[0]
    m = out.metrics
    n = len(comp.token_ids)

    def dt(a, b):
        return None if a is None or b is None else b - a

    tpot = None
    if n > 1 and m.first_token_time is not None and m.last_token_time is not None:
        tpot = (m.last_token_time - m.first_token_time) / (n - 1)
    rec = {"id": e.id, "line": e.line, "text": comp.text, "token_ids": list(comp.token_ids),
           "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason,
           "error": f"line {e.line}: {out.error}" if out.error else None,
           "prompt_tokens": len(out.prompt_token_ids), "generation_tokens": n,
           "ttft_s": dt(m.arrival_time, m.first_token_time), "tpot_s": tpot,
           "e2e_latency_s": dt(m.arrival_time, m.finished_time)}
    if comp.logprobs is not None:
        rec["cumulative_logprob"] = comp.cumulative_logprob
        rec["logprobs"] = [{str(t): lp.logprob for t, lp in d.items()} for d in comp.logprobs]
    return rec


def _pcts(xs: list[float]) -> dict | None:
    import numpy as np

    if not xs:
        return None
    a = np.asarray(xs, np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max()), "count": int(a.size)}


class Job:
    """Feeds entries to the engine, writes records as requests finish."""

    def __init__(self, llm, entries: list[Entry], out_file, main: bool, max_pending: int,
                 stop_after: int | None, on_record=None, num_processes: int = 1):
        self.llm, self.engine = llm, llm.engine
        self.num_processes = num_processes
        self.todo = deque(entries)
        self.total = len(entries)
        self.out_file, self.main = out_file, main
        self.max_pending, self.stop_after = max_pending, stop_after
        self.on_record = on_record
        self.by_id: dict[str, Entry] = {}
        self.written = 0
        self.errors = 0
        self.ttft, self.tpot, self.itl, self.e2e = [], [], [], []
        self.prompt_tokens = self.gen_tokens = 0
        self.kv_peak = 0.0
        self.kv_sum = 0.0
        self.kv_samples = 0
        self._last_tok: dict[str, tuple[int, float]] = {}
        self.bar = None

    def _write(self, rec: dict) -> None:
        self.written += 1
        if rec["finish_reason"] == "error":
            self.errors += 1
        else:
            self.prompt_tokens += rec["prompt_tokens"]
            self.gen_tokens += rec["generation_tokens"]
            for k, xs in (("ttft_s", self.ttft), ("tpot_s", self.tpot), ("e2e_latency_s", self.e2e)):
                if rec[k] is not None:
                    xs.append(rec[k])
        if self.main:
            if self.out_file is not None:
                self.out_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
                self.out_file.flush()
            if self.on_record is not None:
                self.on_record(rec)
        if self.bar is not None:
            self.bar.update(1)
        if self.stop_after is not None and self.written >= self.stop_after:
            if self.main:
                _log(f"--stop_after={self.stop_after}: simulated crash after {self.written} records")
            if self.bar is not None:
                self.bar.close()
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(CRASH_EXIT)

    def _finished(self, out) -> None:
        e = self.by_id.pop(out.request_id)
        self._last_tok.pop(out.request_id, None)
        self._write(request_record(e, out))

    def run(self) -> float:
        eng = self.engine
        if self.main and _PROGRESS.value and self.on_record is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="requests", unit="req", file=sys.stderr,
                            mininterval=0.5, dynamic_ncols=True)
        start = time.perf_counter()
        last_post = 0.0
        while self.todo or eng.has_unfinished():
            while self.todo and len(self.by_id) < self.max_pending:
                e = self.todo.popleft()
                if e.error is not None:
                    self._write(_error_record(e))
                    continue
                self.by_id[e.key] = e
                eng.add_request(e.prompt, e.params, request_id=e.key)
            for out in eng.take_finished_errors():
                self._finished(out)
            if not eng.has_unfinished():
                continue
            outs = eng.step()
            now = time.perf_counter()
            usage = eng.kv_usage()
            self.kv_peak = max(self.kv_peak, float(usage.max()))
            self.kv_sum += float(usage.mean())
            self.kv_samples += 1
            for out in outs:
                n = len(out.outputs[0].token_ids)
                prev = self._last_tok.get(out.request_id)
                if prev is not None and n > prev[0]:
                    self.itl.append((now - prev[1]) / (n - prev[0]))
                if n and (prev is None or n > prev[0]):
                    self._last_tok[out.request_id] = (n, now)
                if out.finished:
                    self._finished(out)
            if self.bar is not None and now - last_post > 0.5:
                last_post = now
                self.bar.set_postfix_str(f"{eng.stats['generation_tokens'] / (now - start):.1f} tok/s, "
                                         f"KV {100 * float(usage.mean()):.0f}%", refresh=False)
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - start

    def summary(self, elapsed: float, skipped: int) -> dict:
        eng = self.engine
        completed = self.written - self.errors
        st = eng.stats
        return {
            "mesh": _MESH.value, "model": _MODEL.value, "processes": self.num_processes,
            "requests": self.written, "completed": completed, "errors": self.errors,
            "skipped_already_done": skipped,
            "elapsed_s": elapsed,
            "request_throughput": completed / elapsed if elapsed > 0 else None,
            "output_token_throughput": self.gen_tokens / elapsed if elapsed > 0 else None,
            "total_token_throughput": (self.gen_tokens + self.prompt_tokens) / elapsed if elapsed > 0 else None,
            "prompt_tokens": self.prompt_tokens, "generation_tokens": self.gen_tokens,
            "ttft_s": _pcts(self.ttft), "tpot_s": _pcts(self.tpot), "itl_s": _pcts(self.itl),
            "e2e_latency_s": _pcts(self.e2e),
            "kv_usage": {"peak": self.kv_peak,
                         "mean": self.kv_sum / self.kv_samples if self.kv_samples else 0.0,
                         "final_per_instance": [float(x) for x in eng.kv_usage()],
                         "blocks_per_instance": eng.layout.blocks_per_instance,
                         "block_size": eng.layout.block_size},
            "preemptions": st["preemptions"],
            "borrowed_blocks_peak": st["max_remote_blocks"],
            "borrowed_blocks_final": int(eng.kv.ledger().sum()),
            "migrated_blocks": st["migrated_blocks"],
            "swapped_out_blocks": st["swapped_out_blocks"],
            "swapped_in_blocks": st["swapped_in_blocks"],
            "steps": st["steps"],
            "compiled_programs": eng.compiled_programs(),
        }


def _default_sampling() -> dict:
    return dict(max_tokens=_MAX_TOKENS.value, min_tokens=_MIN_TOKENS.value,
                temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
                min_p=_MIN_P.value, ignore_eos=_IGNORE_EOS.value, stop=list(_STOP.value) or None,
                logprobs=_LOGPROBS.value)


def _print_summary(summary: dict) -> None:
    def f(x, scale=1000.0, unit="ms"):
        return "-" if x is None else f"{x * scale:.1f} {unit}"

    print("\nmetrics summary")
    print(f"  requests: {summary['completed']} completed, {summary['errors']} errors, "
          f"{summary['skipped_already_done']} already done; {summary['elapsed_s']:.2f} s "
          "(including compilation)")
    thr = summary["request_throughput"]
    if thr is not None:
        print(f"  throughput: {thr:.2f} req/s, {summary['output_token_throughput']:.1f} output tok/s, "
              f"{summary['total_token_throughput']:.1f} total tok/s")
    for k in ("ttft_s", "tpot_s", "itl_s", "e2e_latency_s"):
        p = summary[k]
        if p is not None:
            print(f"  {k[:-2]:>11}: p50 {f(p['p50'])}  p90 {f(p['p90'])}  p99 {f(p['p99'])}")
    kv = summary["kv_usage"]
    print(f"  KV usage: peak {100 * kv['peak']:.0f}%, mean {100 * kv['mean']:.0f}% of "
          f"{kv['blocks_per_instance']} blocks x {kv['block_size']} tokens per instance")
    print(f"  preemptions {summary['preemptions']}, borrowed blocks peak "
          f"{summary['borrowed_blocks_peak']}, migrated {summary['migrated_blocks']}, "
          f"swapped out/in {summary['swapped_out_blocks']}/{summary['swapped_in_blocks']}, "
          f"steps {summary['steps']}, compiled programs {summary['compiled_programs']}")


def main(argv) -> int:
    if len(argv) > 1:
        return fail(f"unexpected arguments {argv[1:]} (flags look like --name=value)")
    import logging

    logging.getLogger("jax").setLevel(logging.WARNING)  # not the backend probing at INFO
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax reports every read at INFO
    from .mesh import MeshShape
    from . import runtime

    try:
        shape = MeshShape.parse(_MESH.value)
    except ValueError as e:
        return fail(str(e))
    defaults = _default_sampling()
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        return fail(f"default sampling flags: {e}")

    demo = _INPUT.value is None
    if demo:
        entries = [Entry(n, f"demo-{n}", p, SamplingParams(**dict(defaults, seed=derived_seed(_SEED.value, n))))
                   for n, p in enumerate(DEMO_PROMPTS, start=1)]
        digest = hashlib.sha256(b"demo").digest()
    else:
        try:
            with open(_INPUT.value, "rb") as f:
                raw = f.read()
        except OSError as e:
            return fail(f"cannot read --input_jsonl: {e}")
        digest = hashlib.sha256(raw).digest()
        text = raw.decode("utf-8", errors="replace")
        entries = parse_input(text.splitlines(), defaults, _SEED.value)

    try:
        info = runtime.setup(shape.size, _COORD.value, _NUM_PROC.value, _PROC_ID.value,
                             log=lambda m: _log(m.removeprefix("[distkv] ")))
    except ValueError as e:
        return fail(str(e))
    import numpy as np

    if info.num_processes > 1:
        from jax.experimental import multihost_utils

        # Every process must see the same requests, or their plans diverge.
        digests = multihost_utils.process_allgather(np.frombuffer(digest, np.uint8).astype(np.int32))
        if not (np.asarray(digests) == np.asarray(digests)[0]).all():
            return fail("the processes read different inputs (--input_jsonl must be the same file)")

    out_path = _OUTPUT.value
    done = np.zeros(len(entries), np.int32)
    if info.is_main and out_path:
        ids, lines = read_done(out_path)
        done[:] = [is_done(e, ids, lines) for e in entries]
    if info.num_processes > 1:
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    todo = [e for e, d in zip(entries, done) if not d]
    skipped = len(entries) - len(todo)
    if info.is_main and not demo:
        _log(f"{len(entries)} requests in {_INPUT.value}"
             + (f"; {skipped} already in {out_path}, skipped" if skipped else ""))

    from .llm import LLM

    t0 = time.perf_counter()
    try:
        llm = LLM(_MODEL.value, mesh=_MESH.value, block_size=_BLOCK_SIZE.value,
                  kv_blocks=_KV_BLOCKS.value, host_kv_blocks=_HOST_KV_BLOCKS.value,
                  kv_policy=_KV_POLICY.value, max_num_seqs=_MAX_NUM_SEQS.value,
                  max_num_batched_tokens=_MAX_BATCHED.value, dtype=_DTYPE.value,
                  seed=_SEED.value, max_logprobs=max(20, _LOGPROBS.value or 0),
                  attention_impl=_ATTENTION.value)
    except (ValueError, OSError, FileNotFoundError) as e:
        return fail(f"cannot load model {_MODEL.value!r}: {e}")
    if info.is_main:
        _log(f"model {_MODEL.value} on mesh {_MESH.value} ({info.num_processes} process(es)), "
             f"{llm.engine.layout.blocks_per_instance} KV blocks x {_BLOCK_SIZE.value} tokens per "
             f"instance; loaded in {time.perf_counter() - t0:.1f} s")

    out_file = None
    if info.is_main and out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        out_file = open(out_path, "a", encoding="utf-8")

    def show(rec):
        if demo:
            print(f"\n[{rec['id']}] prompt: {DEMO_PROMPTS[rec['line'] - 1]!r}\n"
                  f"  token_ids: {rec['token_ids']}\n  text: {rec['text']!r}\n"
                  f"  finish_reason: {rec['finish_reason']}", flush=True)

    max_pending = _MAX_PENDING.value or 4 * _MAX_NUM_SEQS.value * shape.inst
    job = Job(llm, todo, out_file, info.is_main, max_pending, _STOP_AFTER.value,
              on_record=show if demo else None,
              num_processes=info.num_processes)
    try:
        elapsed = job.run()
    finally:
        if out_file is not None:
            out_file.close()
    if info.is_main:
        summary = job.summary(elapsed, skipped)
        _print_summary(summary)
        if _METRICS.value:
            os.makedirs(os.path.dirname(os.path.abspath(_METRICS.value)), exist_ok=True)
            with open(_METRICS.value, "w") as f:
                json.dump(summary, f, indent=2)
        if out_path:
            _log(f"{job.written} records appended to {out_path}")
    return 0


if __name__ == "__main__":
    app.run(main)
