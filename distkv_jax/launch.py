"""Batch jobs (and a demo) on a mesh: `python -m distkv_jax.launch`.

    python -m distkv_jax.launch --mesh 2x4 --model DIR|tiny \\
        --input_jsonl in.jsonl --output_jsonl out.jsonl --metrics_json m.json

Engine flags (--model, --mesh, --dtype, --block_size, --kv_blocks, ...) are
EngineArgs' fields, generated from it (engine_args.py: one definition, same
names, defaults and help as `LLM(model, **kwargs)`); they are checked before
anything loads, and a bad one is reported as `--name=value: why`.

Input: one JSON object a line: "id" (string or integer, unique), exactly one
of "prompt" (text) or "prompt_token_ids" (list of ints), and optionally any
SamplingParams field ("max_tokens", "temperature", "top_p", "top_k", "min_p",
"seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "logprobs",
"prompt_logprobs", ...) overriding the flag defaults. Lines end at b"\\n"
only (U+2028, U+0085 and the like inside a JSON string are text); each line
must be UTF-8. Blank lines are skipped.

Output: one JSON object per request, appended and flushed as it finishes:
id, line, text, token_ids, finish_reason, stop_reason, error (null unless
finish_reason is "error"), prompt_tokens, generation_tokens, ttft_s, tpot_s,
e2e_latency_s (and cumulative_logprob / logprobs when asked for).

Nothing is lost: a bad line (not UTF-8, bad JSON, no prompt, an unknown
field, a bad sampling value, a duplicate id) or a request the engine refuses
(a prompt over the KV capacity) becomes an error record naming its line, and
the job goes on; rerunning with the same --output_jsonl skips every id
already written (resume after a crash or an interruption). The exit status
is non-zero only when the job itself fails (bad flags, unreadable input,
model that does not load, a crash) or is interrupted.

SIGINT / SIGTERM: the job stops after the step in progress, writes the
metrics of what finished, closes the output and exits with 128 + the signal
number (130 / 143); rerunning the same command resumes it. A second signal
stops it at once.

Metrics (--metrics_json) describe the whole job: on a resume the earlier
metrics file's "parts" are kept and this run is added as a new part; request
counts, tokens and TTFT / TPOT / end-to-end latencies are recomputed from
every record in the output file.

Multi-host: --coordinator_address/--num_processes/--process_id (or
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) join a
jax.distributed job. Every process reads the same input and runs the same
deterministic control plane; process 0 writes the output and the metrics.

Without --input_jsonl it runs a demo on a few built-in prompts and prints the
outputs and the metrics summary.
"""

from __future__ import annotations

import ast
import codecs
import dataclasses
import datetime
import hashlib
import json
import os
import signal
import sys
import time
from collections import deque
from typing import Any, Iterable

from absl import app, flags

from .engine_args import EngineArgs
from .runtime import fail
from .sampling_params import SamplingParams

FLAGS = flags.FLAGS
# engine settings: one flag per EngineArgs field (model, mesh, dtype, block_size,
# kv_blocks, host_kv_blocks, kv_policy, max_num_seqs, max_num_batched_tokens,
# seed, attention_impl, ...)
EngineArgs.define_flags()
_INPUT = flags.DEFINE_string("input_jsonl", None, "requests, one JSON object a line; "
                             "none: demo generation on built-in prompts")
_OUTPUT = flags.DEFINE_string("output_jsonl", None, "results, one JSON object a finished request "
                              "(appended; ids already there are skipped: resume)")
_METRICS = flags.DEFINE_string("metrics_json", None, "write the metrics summary here (JSON; "
                               "on a resume, merged with the earlier runs' metrics)")
# default sampling (a line's own fields win; --seed is EngineArgs' base seed)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 16, "default max new tokens per request")
_MIN_TOKENS = flags.DEFINE_integer("min_tokens", 0, "default min new tokens before EOS/stop ids")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "default temperature (0: greedy)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "default top-p (1: off)")
_TOP_K = flags.DEFINE_integer("top_k", 0, "default top-k (0 or -1: off)")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "default min-p (0: off)")
_IGNORE_EOS = flags.DEFINE_boolean("ignore_eos", False, "default: keep generating after EOS")
_STOP = flags.DEFINE_multi_string("stop", [], "default stop string (repeatable)")
_LOGPROBS = flags.DEFINE_integer("logprobs", None, "default number of top logprobs per token")
_MAX_PENDING = flags.DEFINE_integer("max_pending", None, "requests held by the engine at once "
                                    "(default: 4 x max_num_seqs x instances); the rest wait in the file")
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

# serving (--serve): an OpenAI-compatible HTTP server instead of a batch job
_SERVE = flags.DEFINE_boolean("serve", False, "run the OpenAI-compatible HTTP server "
                              "(POST /v1/completions, /v1/chat/completions; GET /v1/models, "
                              "/health, /metrics) instead of a batch job")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "--serve: address to listen on")
_PORT = flags.DEFINE_integer("port", 8000, "--serve: port to listen on")
_API_KEY = flags.DEFINE_string("api_key", None, "--serve: require 'Authorization: Bearer KEY' "
                               "on /v1 (default: $DISTKV_API_KEY, else no key)")
_SERVED_NAME = flags.DEFINE_string("served_model_name", None, "--serve: the model name clients "
                                   "send (default: the --model value)")
_CHAT_TEMPLATE = flags.DEFINE_string("chat_template", None, "--serve: a Jinja chat template file "
                                     "(default: the tokenizer's own)")
_MAX_BYTES = flags.DEFINE_integer("max_request_bytes", 16 << 20, "--serve: larger request bodies "
                                  "are refused (413)")
_MAX_QUEUED = flags.DEFINE_integer("max_queued_requests", 1024, "--serve: with more requests "
                                   "waiting, new ones are refused (503 + Retry-After)")
_SHUTDOWN_TIMEOUT = flags.DEFINE_float("shutdown_timeout", 30.0, "--serve: on SIGTERM, seconds "
                                       "running requests may still take before they are aborted")

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


# ---------------------------------------------------------------- flags
class FlagError(ValueError):
    """A bad flag, worded `--name=value: why`."""


def flag_message(err: Exception) -> str | None:
    """EngineArgs' "name=value: why" as "--name=value: why" (the value as
    typed, not its repr); None when the message names no engine setting."""
    msg = str(err)
    for name in EngineArgs.field_names():
        if not msg.startswith(name + "="):
            continue
        value, sep, why = msg[len(name) + 1:].partition(": ")
        if not sep:
            return f"--{msg}"
        try:
            v = ast.literal_eval(value)
            shown = v if isinstance(v, str) else value
        except (ValueError, SyntaxError):
            shown = value
        return f"--{name}={shown}: {why}"
    return None


def engine_args_from_flags(flag_values=None, **overrides: Any) -> EngineArgs:
    """EngineArgs from the parsed flags; FlagError naming the bad flag."""
    try:
        return EngineArgs.from_flags(flag_values, **overrides)
    except (ValueError, TypeError) as e:
        raise FlagError(flag_message(e) or str(e)) from None


def attention_impl_problem(impl: str, platform: str) -> str | None:
    """Why --attention_impl cannot run on this platform (None: it can).
    kernels/micro_attention.py resolve_impl takes "pallas" and "native" as
    given; an unusable one would only fail when the first step compiles."""
    if impl == "pallas" and platform == "cpu":
        return ("--attention_impl=pallas: the Pallas kernel needs a GPU; on CPU Pallas runs only "
                "in interpret mode (micro_attention(..., interpret=True), for tests), which the "
                "engine does not use. On CPU use --attention_impl=auto (the native kernel where it "
                "builds), native or reference")
    if impl == "native" and platform != "cpu":
        return (f"--attention_impl=native: the native kernel is an XLA:CPU kernel; this job runs "
                f"on {platform}: use auto, pallas or reference")
    if impl == "native":
        from .kernels import native

        if not native.available():
            return (f"--attention_impl=native: the native CPU kernel is not available here "
                    f"({native.error()}); use auto or reference")
    return None


def output_path_problem(flag: str, path: str | None) -> str | None:
    """Why --flag=path cannot be written (None: it can), checked before any work."""
    if not path:
        return None
    if os.path.isdir(path):
        return (f"--{flag}={path} is a directory; give a file path "
                f"(e.g. {os.path.join(path, 'results.jsonl' if 'jsonl' in flag else 'metrics.json')})")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            return f"--{flag}={path}: the file is not writable"
        return None
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # created later (os.makedirs): the first existing one counts
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--{flag}={path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--{flag}={path}: cannot create files in {parent}"
    return None


def _same_file(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


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


def split_lines(raw: bytes) -> list[bytes]:
    """JSONL lines: split at b"\\n" only (str.splitlines would also split at
    U+2028, U+0085, ... inside JSON strings and shift every later line
    number). A final b"\\n" ends the last line; it does not start another."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def decode_line(raw: bytes, line: int) -> tuple[str | None, str | None]:
    """(text, None) or (None, error) for one line's bytes: strict UTF-8 (a
    byte-order mark on the first line is dropped)."""
    if line == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.end]
        return None, (f"line {line}: not valid UTF-8 (byte{'s' if len(bad) > 1 else ''} "
                      f"{bad.hex(' ')} at byte {e.start + 1} of the line: {e.reason}); "
                      "input lines must be UTF-8 JSON")


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


def parse_input(lines: Iterable[str | bytes], defaults: dict, base_seed: int) -> list[Entry]:
    """Every non-blank line as an Entry; a repeated id is an error on its
    later line. Lines given as bytes are decoded here (strict UTF-8: an
    undecodable line is an error entry, the others go on)."""
    entries, first_line = [], {}
    for n, item in enumerate(lines, start=1):
        if isinstance(item, bytes):
            text, err = decode_line(item, n)
            if err is not None:
                entries.append(Entry(n, None, error=err))
                continue
        else:
            text = item
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


def parse_jsonl(raw: bytes, defaults: dict, base_seed: int) -> list[Entry]:
    """The input file's bytes -> entries (see split_lines, decode_line)."""
    return parse_input(split_lines(raw), defaults, base_seed)


# ------------------------------------------------------------ records
def _pcts(xs: list[float]) -> dict | None:
    import numpy as np

    if not xs:
        return None
    a = np.asarray(xs, np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max()), "count": int(a.size)}


class RecordStats:
    """Request counts, tokens and per-request latencies of a set of output records."""

    LATENCIES = ("ttft_s", "tpot_s", "e2e_latency_s")

    def __init__(self) -> None:
        self.requests = self.errors = self.prompt_tokens = self.generation_tokens = 0
        self.lat: dict[str, list[float]] = {k: [] for k in self.LATENCIES}

    def add(self, rec: dict) -> None:
        self.requests += 1
        if rec.get("finish_reason") == "error":
            self.errors += 1
            return
        self.prompt_tokens += int(rec.get("prompt_tokens") or 0)
        self.generation_tokens += int(rec.get("generation_tokens") or 0)
        for k, xs in self.lat.items():
            v = rec.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                xs.append(float(v))

    @property
    def completed(self) -> int:
        return self.requests - self.errors

    def as_dict(self) -> dict:
        d = {"requests": self.requests, "completed": self.completed, "errors": self.errors,
             "prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens}
        d.update({k: _pcts(xs) for k, xs in self.lat.items()})
        return d


def scan_output(path: str | None) -> tuple[set[str], set[int], RecordStats]:
    """(ids, id-less lines, stats of every record) already in an output file.
    A partial last line (a crash mid-write) is cut off so that appending
    stays valid JSONL."""
    ids: set[str] = set()
    lines: set[int] = set()
    stats = RecordStats()
    if not path or not os.path.exists(path):
        return ids, lines, stats
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            _log(f"{path}: dropping a partial last line ({len(data) - cut} bytes)")
            f.truncate(cut)
            data = data[:cut]
    for raw in split_lines(data):
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(rec, dict):
            continue
        stats.add(rec)
        if rec.get("id") is not None:
            ids.add(str(rec["id"]))
        elif isinstance(rec.get("line"), int):
            lines.add(rec["line"])
    return ids, lines, stats


def read_done(path: str) -> tuple[set[str], set[int]]:
    """(ids, lines) already in an output file (see scan_output)."""
    ids, lines, _ = scan_output(path)
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
    rec["num_cached_tokens"] = out.num_cached_tokens
    if len(out.outputs) > 1:
        # n > 1: every sequence; the top-level fields are sequence 0's
        rec["generation_tokens"] = sum(len(c.token_ids) for c in out.outputs)
        rec["choices"] = [{"index": c.index, "text": c.text, "token_ids": list(c.token_ids),
                           "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                          for c in out.outputs]
    return rec


# -------------------------------------------------------------- signals
class Interrupted(BaseException):
    """SIGINT / SIGTERM (a BaseException: no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Signals:
    """SIGINT and SIGTERM handlers. Before the job loop (loading, compiling)
    a signal stops at once (Interrupted). Once `graceful` is set, the first
    signal only records itself: the loop stops after the step in progress,
    so finished records and the metrics are written whole. A second signal
    stops at once."""

    HANDLED = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.graceful = False
        self.holding = False   # writing the metrics: signals are noted, nothing more
        self._previous: dict = {}

    def install(self) -> "Signals":
        """Take SIGINT and SIGTERM (again: jax.distributed.initialize puts its
        own SIGTERM handler, the preemption notifier, in place of ours)."""
        for s in self.HANDLED:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self.holding or (self.graceful and first):
            return
        raise Interrupted(signum)

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name


# ------------------------------------------------------------------ job
class Job:
    """Feeds entries to the engine (through engine.iterate), writes records
    as requests finish."""

    def __init__(self, llm, entries: list[Entry], out_file, main: bool, max_pending: int,
                 stop_after: int | None, on_record=None, num_processes: int = 1,
                 signals: Signals | None = None, totals: RecordStats | None = None,
                 progress: bool = False):
        self.llm, self.engine = llm, llm.engine
        self.num_processes = num_processes
        self.todo = deque(entries)
        self.total = len(entries)
        self.out_file, self.main = out_file, main
        self.max_pending, self.stop_after = max_pending, stop_after
        self.on_record = on_record
        self.signals = signals
        self.progress = progress
        self.by_id: dict[str, Entry] = {}
        self.part = RecordStats()                    # the records of this run
        self.totals = totals if totals is not None else RecordStats()  # + those already there
        self.itl: list[float] = []
        self.kv_peak = 0.0
        self.kv_sum = 0.0
        self.kv_samples = 0
        self.elapsed = 0.0
        self.interrupted: str | None = None          # the signal's name
        self._last_tok: dict[str, tuple[int, float]] = {}
        self._usage = None
        self.bar = None

    @property
    def written(self) -> int:
        return self.part.requests

    @property
    def errors(self) -> int:
        return self.part.errors

    def _stopping(self) -> bool:
        return self.signals is not None and self.signals.signum is not None

    def _write(self, rec: dict) -> None:
        self.part.add(rec)
        self.totals.add(rec)
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

    def admit(self) -> bool:
        """engine.iterate's callback: hand over entries up to max_pending
        (bad lines become records here); whether more are still to come."""
        if self._stopping():
            return False
        while self.todo and len(self.by_id) < self.max_pending:
            e = self.todo.popleft()
            if e.error is not None:
                self._write(_error_record(e))
                continue
            self.by_id[e.key] = e
            self.engine.add_request(e.prompt, e.params, request_id=e.key)
        return bool(self.todo)

    def _observe(self, outs, now: float) -> None:
        usage = self.engine.kv_usage()
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
        self._usage = usage

    def _post(self, now: float, start: float) -> None:
        eng = self.engine
        secs = max(now - start, 1e-9)
        usage = self._usage
        self.bar.set_postfix_str(
            f"prompt {eng.stats.get('prompt_tokens', 0) / secs:.0f} tok/s, "
            f"output {eng.stats.get('generation_tokens', 0) / secs:.1f} tok/s, "
            f"KV {100 * float(usage.mean()):.0f}% (max {100 * float(usage.max()):.0f}%), "
            f"borrowed {int(eng.kv.ledger().sum())} blocks", refresh=False)

    def run(self) -> float:
        """Run until every entry has a record, or a signal stops it (then
        `interrupted` names the signal). Returns the elapsed seconds."""
        if self.main and self.progress and self.on_record is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="requests", unit="req", file=sys.stderr,
                            mininterval=0.5, dynamic_ncols=True)
        start = time.perf_counter()
        last_post = 0.0
        steps = self.engine.iterate(self.admit)
        try:
            for outs in steps:
                now = time.perf_counter()
                self._observe(outs, now)
                if self._stopping():
                    break
                if self.bar is not None and now - last_post > 0.5:
                    last_post = now
                    self._post(now, start)
        finally:
            steps.close()
            self.elapsed = time.perf_counter() - start
            if self._stopping():
                self.interrupted = self.signals.name
            if self.bar is not None:
                self.bar.close()
        return self.elapsed

    # ------------------------------------------------------------ metrics
    def part_summary(self, elapsed: float, skipped: int, mesh: str, model: str) -> dict:
        """This run's metrics: one entry of the job's "parts"."""
        eng = self.engine
        st = eng.stats
        p = self.part
        per_s = (lambda x: x / elapsed) if elapsed > 0 else (lambda x: None)
        d = {"part": None, "started_at": None, "mesh": mesh, "model": model,
             "processes": self.num_processes, "interrupted": self.interrupted,
             "skipped_already_done": skipped, "elapsed_s": elapsed}
        d.update(p.as_dict())
        d.update({
            "request_throughput": per_s(p.completed),
            "output_token_throughput": per_s(p.generation_tokens),
            "total_token_throughput": per_s(p.generation_tokens + p.prompt_tokens),
            "itl_s": _pcts(self.itl),
            "kv_usage": {"peak": self.kv_peak,
                         "mean": self.kv_sum / self.kv_samples if self.kv_samples else 0.0,
                         "samples": self.kv_samples,
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
        })
        return d

    def summary(self, elapsed: float, skipped: int, mesh: str = "", model: str = "",
                earlier_parts: list[dict] | None = None, output_jsonl: str | None = None,
                started_at: str | None = None) -> dict:
        part = self.part_summary(elapsed, skipped, mesh, model)
        part["started_at"] = started_at
        return job_summary((earlier_parts or []) + [part], self.totals, output_jsonl)


def _merge_pcts(ps: list[dict | None]) -> dict | None:
    """Percentile summaries of several parts as one: count, mean and max
    exact; p50/p90/p99 the count-weighted means of the parts' (the samples
    themselves are not kept)."""
    ps = [p for p in ps if p]
    if len(ps) <= 1:
        return dict(ps[0]) if ps else None
    n = sum(p["count"] for p in ps)
    out = {k: sum(p[k] * p["count"] for p in ps) / n for k in ("mean", "p50", "p90", "p99")}
    out.update(max=max(p["max"] for p in ps), count=n,
               note="p50/p90/p99: count-weighted means of the parts' percentiles")
    return out


def job_summary(parts: list[dict], totals: RecordStats, output_jsonl: str | None) -> dict:
    """The whole job's metrics: the last part's settings; request counts,
    tokens and TTFT / TPOT / end-to-end latencies from every record in the
    output (`totals`); throughputs over the parts' own records and time;
    engine counters summed (peaks: the max) over the parts."""
    for i, p in enumerate(parts, start=1):
        p["part"] = i
    last = parts[-1]
    elapsed = sum(p["elapsed_s"] for p in parts)
    completed = sum(p["completed"] for p in parts)
    gen = sum(p["generation_tokens"] for p in parts)
    prompt = sum(p["prompt_tokens"] for p in parts)
    kv_samples = sum(p["kv_usage"].get("samples", 0) for p in parts)
    summary = {"mesh": last["mesh"], "model": last["model"], "processes": last["processes"],
               "output_jsonl": output_jsonl}
    summary.update(totals.as_dict())
    summary.update({
        "records_without_metrics": max(0, totals.requests - sum(p["requests"] for p in parts)),
        "skipped_already_done": last["skipped_already_done"],
        "interrupted": last["interrupted"],
        "elapsed_s": elapsed,
        "request_throughput": completed / elapsed if elapsed > 0 else None,
        "output_token_throughput": gen / elapsed if elapsed > 0 else None,
        "total_token_throughput": (gen + prompt) / elapsed if elapsed > 0 else None,
        "itl_s": _merge_pcts([p["itl_s"] for p in parts]),
        "kv_usage": dict(last["kv_usage"],
                         peak=max(p["kv_usage"]["peak"] for p in parts),
                         mean=(sum(p["kv_usage"]["mean"] * p["kv_usage"].get("samples", 0)
                                   for p in parts) / kv_samples) if kv_samples else 0.0,
                         samples=kv_samples),
        "preemptions": sum(p["preemptions"] for p in parts),
        "borrowed_blocks_peak": max(p["borrowed_blocks_peak"] for p in parts),
        "borrowed_blocks_final": last["borrowed_blocks_final"],
        "migrated_blocks": sum(p["migrated_blocks"] for p in parts),
        "swapped_out_blocks": sum(p["swapped_out_blocks"] for p in parts),
        "swapped_in_blocks": sum(p["swapped_in_blocks"] for p in parts),
        "steps": sum(p["steps"] for p in parts),
        "compiled_programs": last["compiled_programs"],
        "parts": parts,
    })
    return summary


def earlier_parts(metrics_path: str | None, output_jsonl: str | None, resuming: bool) -> list[dict]:
    """The "parts" of an earlier metrics file of this job (same output file),
    when this run resumes it; [] otherwise."""
    if not (resuming and metrics_path and output_jsonl and os.path.isfile(metrics_path)):
        return []
    try:
        with open(metrics_path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        _log(f"{metrics_path}: earlier metrics unreadable ({e}); this run's metrics start anew")
        return []
    parts = old.get("parts") if isinstance(old, dict) else None
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        _log(f"{metrics_path}: earlier metrics have no 'parts'; this run's metrics start anew")
        return []
    if old.get("output_jsonl") != output_jsonl:
        _log(f"{metrics_path}: earlier metrics are of another output file "
             f"({old.get('output_jsonl')}); not merged")
        return []
    return parts


def write_json_atomic(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _default_sampling() -> dict:
    return dict(max_tokens=_MAX_TOKENS.value, min_tokens=_MIN_TOKENS.value,
                temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
                min_p=_MIN_P.value, ignore_eos=_IGNORE_EOS.value, stop=list(_STOP.value) or None,
                logprobs=_LOGPROBS.value)


def _print_summary(summary: dict) -> None:
    def f(x, scale=1000.0, unit="ms"):
        return "-" if x is None else f"{x * scale:.1f} {unit}"

    parts = summary["parts"]
    print("\nmetrics summary")
    if len(parts) > 1:
        print(f"  covers the whole job: parts 1-{len(parts)} (this run is part {len(parts)}, "
              f"resuming {len(parts) - 1} earlier run(s))")
    for p in parts if len(parts) > 1 else ():
        print(f"    part {p['part']}: {p['requests']} records in {p['elapsed_s']:.2f} s on "
              f"{p['mesh']}" + (f", interrupted by {p['interrupted']}" if p["interrupted"] else ""))
    if summary["records_without_metrics"]:
        print(f"  {summary['records_without_metrics']} records in the output come from runs "
              "that left no metrics (a crash): counted in requests and latencies, not in "
              "throughput")
    if summary["interrupted"]:
        print(f"  this run was interrupted by {summary['interrupted']}")
    print(f"  requests: {summary['completed']} completed, {summary['errors']} errors"
          + (f" ({summary['skipped_already_done']} already done when this run started)"
             if summary["skipped_already_done"] else "")
          + f"; {summary['elapsed_s']:.2f} s (including compilation)")
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

    # Every flag is checked before anything loads.
    try:
        args = engine_args_from_flags()
    except FlagError as e:
        return fail(str(e))
    if _SERVE.value:
        return _serve(args)
    if (_LOGPROBS.value or 0) > args.max_logprobs:  # the default logprobs must be allowed
        args = dataclasses.replace(args, max_logprobs=_LOGPROBS.value)
    for name, flag in (("max_pending", _MAX_PENDING), ("stop_after", _STOP_AFTER)):
        if flag.value is not None and flag.value < 1:
            return fail(f"--{name}={flag.value}: must be >= 1")
    defaults = _default_sampling()
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        return fail(f"default sampling flags: {e}")
    out_path, metrics_path = _OUTPUT.value, _METRICS.value
    for flag, path in (("output_jsonl", out_path), ("metrics_json", metrics_path)):
        problem = output_path_problem(flag, path)
        if problem:
            return fail(problem)
    for (fa, a), (fb, b) in ((("input_jsonl", _INPUT.value), ("output_jsonl", out_path)),
                             (("input_jsonl", _INPUT.value), ("metrics_json", metrics_path)),
                             (("output_jsonl", out_path), ("metrics_json", metrics_path))):
        if _same_file(a, b):
            return fail(f"--{fa} and --{fb} name the same file {a}")

    demo = _INPUT.value is None
    if demo:
        entries = [Entry(n, f"demo-{n}", p, SamplingParams(**dict(defaults, seed=derived_seed(args.seed, n))))
                   for n, p in enumerate(DEMO_PROMPTS, start=1)]
        digest = hashlib.sha256(b"demo").digest()
    else:
        try:
            with open(_INPUT.value, "rb") as f:
                raw = f.read()
        except OSError as e:
            return fail(f"cannot read --input_jsonl: {e}")
        digest = hashlib.sha256(raw).digest()
        entries = parse_jsonl(raw, defaults, args.seed)

    signals = Signals().install()
    try:
        return _run(args, entries, digest, demo, signals)
    except Interrupted as e:  # before the job started: nothing written
        print(f"interrupted ({signal.Signals(e.signum).name}): 0 records written; rerun the "
              "same command to resume", file=sys.stderr, flush=True)
        return 128 + e.signum
    finally:
        signals.restore()


def _join_job(args: EngineArgs):
    """(runtime info, None), or (info or None, why the job cannot start):
    join the (multi-process) job, then check the attention implementation
    against the platform and that the model directory is there."""
    from . import runtime

    try:
        info = runtime.setup(args.mesh_shape.size, _COORD.value, _NUM_PROC.value, _PROC_ID.value,
                             log=lambda m: _log(m.removeprefix("[distkv] ")))
    except ValueError as e:
        return None, str(e)
    problem = attention_impl_problem(args.attention_impl, info.platform)
    if problem:
        return info, problem
    if args.model != "tiny":
        from .models.loader import describe_missing_model

        problem = describe_missing_model(args.model)
        if problem:
            return info, f"--model={args.model}: {problem}"
    return info, None


def _serve(args: EngineArgs) -> int:
    """--serve: check the server's flags, join the job, run the server."""
    from .chat_template import load_chat_template

    if _INPUT.value or _OUTPUT.value or _METRICS.value:
        return fail("--serve takes requests over HTTP: drop --input_jsonl / --output_jsonl / "
                    "--metrics_json")
    if not 0 <= _PORT.value <= 65535:
        return fail(f"--port={_PORT.value}: must be in [0, 65535]")
    for name, flag in (("max_request_bytes", _MAX_BYTES), ("max_queued_requests", _MAX_QUEUED)):
        if flag.value < 1:
            return fail(f"--{name}={flag.value}: must be >= 1")
    if not _SHUTDOWN_TIMEOUT.value >= 0:
        return fail(f"--shutdown_timeout={_SHUTDOWN_TIMEOUT.value}: must be >= 0")
    try:
        template = load_chat_template(_CHAT_TEMPLATE.value)
    except ValueError as e:
        return fail(str(e))
    from .serving.state import ServerConfig

    config = ServerConfig(
        model_name=_SERVED_NAME.value or args.model,
        api_key=_API_KEY.value or os.environ.get("DISTKV_API_KEY") or None,
        max_request_bytes=_MAX_BYTES.value, max_queued_requests=_MAX_QUEUED.value,
        shutdown_timeout=_SHUTDOWN_TIMEOUT.value, chat_template=template)
    info, problem = _join_job(args)
    if problem:
        return fail(problem)
    from .serving.api_server import serve

    if info.is_main:
        _log(f"serving {args.model} on mesh {args.mesh} ({info.num_processes} process(es)) at "
             f"http://{_HOST.value}:{_PORT.value}; /health answers 503 until the warm start "
             "is done")
    return serve(args, config, _HOST.value, _PORT.value)


def _run(args: EngineArgs, entries: list[Entry], digest: bytes, demo: bool,
         signals: Signals) -> int:
    shape = args.mesh_shape
    info, problem = _join_job(args)
    if info is not None:
        signals.install()  # after jax.distributed.initialize, which takes SIGTERM
    if problem:
        return fail(problem)
    import numpy as np

    if info.num_processes > 1:
        from jax.experimental import multihost_utils

        # Every process must see the same requests, or their plans diverge.
        digests = multihost_utils.process_allgather(np.frombuffer(digest, np.uint8).astype(np.int32))
        if not (np.asarray(digests) == np.asarray(digests)[0]).all():
            return fail("the processes read different inputs (--input_jsonl must be the same file)")

    out_path, metrics_path = _OUTPUT.value, _METRICS.value
    out_abs = os.path.abspath(out_path) if out_path else None
    done = np.zeros(len(entries), np.int32)
    totals, parts_before = RecordStats(), []
    if info.is_main and out_path:
        ids, lines, totals = scan_output(out_path)
        done[:] = [is_done(e, ids, lines) for e in entries]
        parts_before = earlier_parts(metrics_path, out_abs, resuming=totals.requests > 0)
    if info.num_processes > 1:
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    todo = [e for e, d in zip(entries, done) if not d]
    skipped = len(entries) - len(todo)
    if info.is_main and not demo:
        _log(f"{len(entries)} requests in {_INPUT.value}"
             + (f"; {skipped} already in {out_path}, skipped" if skipped else "")
             + (f"; metrics continue part(s) 1-{len(parts_before)} of {metrics_path}"
                if parts_before else ""))

    from .llm import LLM

    t0 = time.perf_counter()
    try:
        llm = LLM.from_engine_args(args)
    except OSError as e:  # FileNotFoundError included
        return fail(f"cannot load model {args.model!r}: {e}")
    except (ValueError, TypeError) as e:
        msg = flag_message(e)
        return fail(msg if msg else f"cannot start the engine (--model={args.model} "
                    f"--mesh={args.mesh}): {e}")
    if info.is_main:
        _log(f"model {args.model} on mesh {args.mesh} ({info.num_processes} process(es)), "
             f"{llm.engine.layout.blocks_per_instance} KV blocks x {args.block_size} tokens per "
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

    max_pending = _MAX_PENDING.value or 4 * args.max_num_seqs * shape.inst
    job = Job(llm, todo, out_file, info.is_main, max_pending, _STOP_AFTER.value,
              on_record=show if demo else None, num_processes=info.num_processes,
              signals=signals, totals=totals, progress=_PROGRESS.value)
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    signals.graceful = True  # from here a signal ends the job after its current step
    try:
        job.run()
    except Interrupted:  # a second signal: stop now; what is written stays
        pass
    finally:
        signals.holding = True
        if out_file is not None:
            out_file.close()
    if info.is_main:
        summary = job.summary(job.elapsed, skipped, args.mesh, args.model, parts_before,
                              out_abs, started_at)
        if metrics_path:
            write_json_atomic(metrics_path, summary)
        _print_summary(summary)
        if out_path:
            _log(f"{job.written} records appended to {out_path} "
                 f"({summary['requests']} in all)")
    if signals.signum is not None:
        if info.is_main:
            print(f"interrupted: {job.written} records written; rerun the same command to resume",
                  file=sys.stderr, flush=True)
        return 128 + signals.signum
    return 0


if __name__ == "__main__":
    app.run(main)
