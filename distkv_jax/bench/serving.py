"""Online serving over HTTP, as vLLM's `vllm bench serve` measures it.

    python -m distkv_jax.bench serving [--rates=2,4,8,16,inf] [--policies=...]
        [--model_shape=13M] [--no_long] [--quick]

For each KV policy (--policies; distributed and local) the benchmark starts
the OpenAI-compatible server as a subprocess

    python -m distkv_jax.launch --serve --host 127.0.0.1 --port PORT
        --model M --mesh IxT --kv_policy P --kv_blocks B --block_size S ...

waits for GET /health to answer 200, sends one unrecorded warm-up request,
then, for each rate, sends the whole request stream with Poisson arrivals
to POST /v1/completions (streaming, token-id prompts, greedy, ignore_eos)
and waits for every answer. Afterwards it sends SIGTERM and checks that the
server exits (with status 0). Its output goes to a log file next to the
result file; the tail is shown when it fails to start.

Stream (fixed seed; the same requests at every rate and for every policy,
only the arrival times scale with the rate):

  short requests (ShareGPT-like): prompt and output lengths each drawn from
    a log-normal with ShareGPT's means (input 161, output 338 tokens; vLLM
    paper) times --short_scale and log-space sigma --short_sigma, clipped to
    [--short_min, --short_max]; every short request fits one instance's KV.
  long requests: prompt = F x one instance's KV capacity (kv_blocks x
    block_size), F log-normal with median --long_factor and sigma 0.25,
    clipped to [1.25 x that capacity, 0.9 x the most one request may hold
    under kv_policy=distributed (its own instance plus what the others may
    lend, at the default lend_fraction)]; --long_output new tokens. Under
    local the server refuses them (HTTP 400); under distributed they borrow
    KV from the other instances and complete: the point of the comparison.

  The requests are shuffled together; request k arrives at u_k / rate
  seconds, u a unit-rate Poisson process starting at 0 (exponential gaps);
  rate "inf" sends them all at once. Prompts are random token ids in
  [3, 500] (safe for the built-in tiny model, vocabulary 512).

Metrics per policy and rate, as vLLM's bench serve computes them:
completed / failed requests (a request fails on an HTTP error status, with
the server's message kept, or a stream that breaks or ends with
finish_reason "error"); request, output and total (prompt + output of the
completed requests) token throughput over the run's duration (first send
to last answer); goodput = completed requests per second that meet both
--ttft_slo_ms and --tpot_slo_ms; and mean / median / p99 of

  TTFT  time from sending to the first chunk with non-empty text,
  TPOT  (end-to-end - TTFT) / (output tokens - 1), requests with > 1 token,
  ITL   gaps between successive chunks with non-empty text (all requests
        pooled),
  E2EL  time from sending to the end of the stream.

The same figures per kind (short / long) are in each run's by_kind: goodput,
TTFT, TPOT and end-to-end latency. With --no_long (the default) every rate
is run a second time with the short requests alone (the same arrivals):
the baseline against which the short requests' latency with the long ones
in flight is judged (the table's "p99 ratio"). The policy name
"distributed-fcfs" serves distributed with the long/short scheduling policy
off (every request short: first come, first served), to state what the
policy costs the long requests.

Output tokens are the server's usage.completion_tokens (the last chunk,
stream_options.include_usage). Writes --output_json and --output_png
(TTFT, TPOT and goodput against the rate, one line per policy) and prints
a table.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from absl import flags

from distkv_jax.bench.common import cpu_model, pyplot, save_figure, write_json

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined when the benchmark runs (not on
    import: their names, e.g. --model, are also the launcher's, and tests
    import both into one process)."""
    # server
    flags.DEFINE_string("model", "tiny", "--model of the server")
    flags.DEFINE_string("mesh", "2x2", "--mesh of the server (instances x tensor-parallel)")
    flags.DEFINE_integer("kv_blocks", 64, "device KV blocks per instance")
    flags.DEFINE_integer("block_size", 16, "tokens per KV block")
    flags.DEFINE_integer("max_num_seqs", 16, "running requests per instance")
    flags.DEFINE_integer("max_num_batched_tokens", 256, "token budget per instance per step")
    flags.DEFINE_bool("warm_start", True, "the server compiles its programs before it is ready")
    flags.DEFINE_integer("server_seed", 0, "--seed of the server")
    flags.DEFINE_bool("prefix_caching", True, "the servers' prefix cache (each pass over the stream "
                      "draws new prompt tokens, so no pass hits another's prefixes)")
    flags.DEFINE_bool("warmup_stream", True, "before the timed rates, send the whole stream once at "
                      "rate inf, unrecorded: programs the stream needs beyond the warm start "
                      "compile there, not in a timed run (each run reports the programs compiled "
                      "during it)")
    flags.DEFINE_multi_string("server_arg", [], "another server flag, e.g. --server_arg=--host_kv_blocks=8 "
                              "(repeatable; the long requests' sizes assume the default lend_fraction)")
    flags.DEFINE_list("policies", ["distributed", "local"], "kv_policy values, one server each; "
                      "'distributed-fcfs' is distributed with the long/short policy off "
                      "(--long_prefill_token_threshold huge: every request short, first come "
                      "first served, as before the policy)")
    flags.DEFINE_string("model_shape", "", "instead of --model: a random-weight Llama of this "
                        "shape with the tiny tokenizer (13M: hidden 512, 4 layers, 8 / 4 KV "
                        "heads, MLP 1,536, vocabulary 512)")
    flags.DEFINE_float("startup_timeout_s", 900.0, "most seconds to wait for /health (a warm start "
                       "compiles every program; minutes on a small CPU)")
    flags.DEFINE_float("request_timeout_s", 600.0, "a request fails after this many seconds without "
                       "a byte from the server")
    flags.DEFINE_float("shutdown_timeout_s", 120.0, "seconds from SIGTERM to the server's exit "
                       "before it is killed")
    flags.DEFINE_string("server_module", "distkv_jax.launch", "python -m module of the server")
    flags.DEFINE_string("server_log_dir", "", "server logs (default: the directory of --output_json)")
    # workload
    flags.DEFINE_list("rates", ["2", "4", "8", "16", "inf"],
                      "request rates (requests per second; inf: all at once)")
    flags.DEFINE_integer("num_short", 100, "short (ShareGPT-like) requests")
    flags.DEFINE_integer("num_long", 4, "long requests (prompt longer than one instance's KV)")
    flags.DEFINE_float("short_scale", 0.25, "multiplier on ShareGPT's mean lengths")
    flags.DEFINE_float("short_sigma", 0.8, "log-space sigma of the short length log-normals")
    flags.DEFINE_integer("short_min", 4, "shortest short prompt / output")
    flags.DEFINE_integer("short_max", 256, "longest short prompt / output")
    flags.DEFINE_float("long_factor", 1.5, "median long prompt, in units of one instance's KV capacity")
    flags.DEFINE_integer("long_output", 16, "new tokens of each long request")
    flags.DEFINE_integer("seed", 0, "workload seed")
    flags.DEFINE_bool("no_long", True, "also run each rate without the long requests (the same "
                      "short arrivals): the baseline of the short requests' latency")
    # objectives and output
    # the tiny model on a 2-core CPU, unloaded: TTFT ~20 ms, TPOT ~3 ms; the objectives
    # leave ~10x of that for queueing and batching
    flags.DEFINE_float("ttft_slo_ms", 500.0, "goodput: most TTFT of a good request (ms)")
    flags.DEFINE_float("tpot_slo_ms", 25.0, "goodput: most TPOT of a good request (ms)")
    flags.DEFINE_bool("quick", False, "tiny sizes, no warm start (for the test suite)")
    flags.DEFINE_string("output_json", "bench_results/serving.json", "result file")
    flags.DEFINE_string("output_png", "bench_results/serving.png", "plot ('' to skip)")

SHAREGPT_MEAN_IN, SHAREGPT_MEAN_OUT = 161, 338
TOKEN_LO, TOKEN_HI = 3, 501  # prompt token ids drawn from [TOKEN_LO, TOKEN_HI)
# --quick: these values, unless the flag is given on the command line
QUICK = dict(kv_blocks=16, block_size=16, max_num_seqs=8, num_short=6, num_long=1, rates=["4", "inf"],
             short_scale=0.15, short_max=48, long_output=4, warm_start=False, startup_timeout_s=600.0)


# ------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Workload:
    seed: int
    num_short: int
    num_long: int
    short_scale: float
    short_sigma: float
    short_min: int
    short_max: int
    long_factor: float
    long_output: int
    instance_kv_tokens: int  # kv_blocks x block_size: the most a request may hold under local
    request_kv_limit: int    # the most one request may hold under distributed

    def long_prompt_range(self) -> tuple[int, int]:
        # above one instance (local refuses it), with room left under the
        # distributed limit for the output and for the short requests' KV
        lo = int(1.25 * self.instance_kv_tokens)
        hi = int(0.9 * self.request_kv_limit) - self.long_output
        return lo, hi

    def check(self) -> None:
        if 2 * self.short_max > self.instance_kv_tokens:
            raise ValueError(f"short_max={self.short_max}: a short prompt plus its output must fit one "
                             f"instance's {self.instance_kv_tokens} KV tokens")
        lo, hi = self.long_prompt_range()
        if self.num_long and lo > hi:
            raise ValueError(f"no long prompt fits: [{lo}, {hi}] (more instances or fewer long_output)")


@dataclass(frozen=True)
class BenchRequest:
    id: str
    kind: str                # "short" or "long"
    prompt: tuple[int, ...]  # token ids: lengths exactly as drawn
    max_tokens: int
    u: float                 # arrival time at rate 1; at rate r it is u / r seconds


def _lognormal(rng, mean: float, sigma: float, n: int) -> np.ndarray:
    """Log-normal samples with the given mean (mu = ln(mean) - sigma^2 / 2)."""
    return rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, n)


def make_requests(w: Workload) -> list[BenchRequest]:
    """The request stream, deterministic in w.seed, in arrival order."""
    rng = np.random.default_rng(w.seed)
    lo, hi = w.short_min, w.short_max
    mean_in, mean_out = SHAREGPT_MEAN_IN * w.short_scale, SHAREGPT_MEAN_OUT * w.short_scale
    p_in = np.clip(np.rint(_lognormal(rng, mean_in, w.short_sigma, w.num_short)), lo, hi)
    p_out = np.clip(np.rint(_lognormal(rng, mean_out, w.short_sigma, w.num_short)), lo, hi)
    l_lo, l_hi = w.long_prompt_range()
    factor = np.exp(np.log(w.long_factor) + 0.25 * rng.standard_normal(w.num_long))
    l_in = np.clip(np.rint(factor * w.instance_kv_tokens), l_lo, l_hi)
    specs = [("short", f"s{i}", int(p_in[i]), int(p_out[i])) for i in range(w.num_short)]
    specs += [("long", f"l{i}", int(l_in[i]), w.long_output) for i in range(w.num_long)]
    order = rng.permutation(len(specs))
    # a Poisson process: exponential gaps, the first request at time 0
    u = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0, max(len(specs) - 1, 0)))])
    reqs = []
    for k, j in enumerate(order):
        kind, rid, n_in, n_out = specs[j]
        prompt = tuple(int(t) for t in rng.integers(TOKEN_LO, TOKEN_HI, n_in))
        reqs.append(BenchRequest(rid, kind, prompt, n_out, float(u[k])))
    return reqs


def fresh_tokens(reqs: list[BenchRequest], pass_index: int, seed: int) -> list[BenchRequest]:
    """The same requests (lengths, outputs, arrivals) with new random prompt
    tokens for each pass over the stream, so that no pass is served from the
    prefix cache another pass filled (pass 0 keeps the stream's own tokens)."""
    if pass_index == 0:
        return list(reqs)
    rng = np.random.default_rng([seed, pass_index])
    return [dataclasses.replace(r, prompt=tuple(int(t) for t in rng.integers(TOKEN_LO, TOKEN_HI, len(r.prompt))))
            for r in reqs]


# ------------------------------------------------------------------ client
@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it (times in seconds)."""
    id: str
    kind: str
    prompt_tokens: int
    max_tokens: int
    ok: bool
    status: int | None        # HTTP status (None: no answer)
    error: str | None
    finish_reason: str | None
    sent: float               # since the start of the run
    ttft: float | None
    e2e: float | None
    output_tokens: int
    itl: tuple[float, ...]

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def _error_message(body: bytes) -> str:
    """The message of an OpenAI error body, else the body itself."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:500]


async def _send(client, model: str, req: BenchRequest, start: float) -> Outcome:
    """Stream one completion; TTFT and ITL count chunks with non-empty text
    only (a chunk may carry no text while the detokenizer holds back an
    incomplete character), as vLLM's client does."""
    import httpx

    payload = {"model": model, "prompt": list(req.prompt), "max_tokens": req.max_tokens,
               "temperature": 0.0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, last, itl, chunks = None, t0, [], 0
    usage, finish, done = None, None, False
    status, error = None, None
    try:
        async with client.stream("POST", "/v1/completions", json=payload) as resp:
            status = resp.status_code
            if status != 200:
                error = _error_message(await resp.aread())
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, SSE comments
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        error = str(chunk["error"].get("message", chunk["error"]))
                        break
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or ():
                        finish = choice.get("finish_reason") or finish
                        if choice.get("text"):
                            now = time.perf_counter()
                            if ttft is None:
                                ttft = now - t0
                            else:
                                itl.append(now - last)
                            last = now
                            chunks += 1
    except (httpx.HTTPError, ValueError) as e:  # a broken connection, a timeout, bad JSON
        error = f"{type(e).__name__}: {e}"
    e2e = time.perf_counter() - t0
    if error is None and not done:
        error = "the stream ended without data: [DONE]"
    if error is None and finish in (None, "error"):
        error = f"finish_reason {finish!r}"
    ok = error is None
    # the server's count; without usage, the content chunks (a lower bound)
    out_tokens = int(usage["completion_tokens"]) if usage else chunks
    if ok and ttft is None:  # no text at all: the first content is the end
        ttft = e2e
    return Outcome(req.id, req.kind, len(req.prompt), req.max_tokens, ok, status, error, finish,
                   t0 - start, ttft if ok else None, e2e if ok else None, out_tokens if ok else 0,
                   tuple(itl) if ok else ())


async def run_rate(base_url: str, model: str, reqs: list[BenchRequest], rate: float,
                   timeout_s: float) -> tuple[list[Outcome], float]:
    """Send every request at its arrival time; (outcomes, duration in s)."""
    import httpx

    # no pool limit: a request waiting for a free connection would count
    # client-side queueing as server latency; trust_env=False: no proxies
    async with httpx.AsyncClient(base_url=base_url, trust_env=False,
                                 timeout=httpx.Timeout(timeout_s, connect=30.0),
                                 limits=httpx.Limits(max_connections=None,
                                                     max_keepalive_connections=None)) as client:
        start = time.perf_counter()
        tasks = []
        for r in reqs:
            if math.isfinite(rate):
                # sleep to the absolute arrival time, so that delays do not add up
                delay = start + r.u / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_send(client, model, r, start)))
        outs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return list(outs), duration


# ------------------------------------------------------------------ metrics
@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    tpot_ms: float

    def met(self, o: Outcome) -> bool:
        tpot = o.tpot
        return o.ok and o.ttft * 1e3 <= self.ttft_ms and (tpot is None or tpot * 1e3 <= self.tpot_ms)


def _dist_ms(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "median": None, "p99": None}
    a = np.asarray(xs) * 1e3
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}


def _peak_concurrency(outs: list[Outcome]) -> int:
    """Most completed requests in flight at once (failed ones have no end time)."""
    events = sorted([(o.sent, 1) for o in outs if o.e2e is not None]
                    + [(o.sent + o.e2e, -1) for o in outs if o.e2e is not None])
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def summarize(outs: list[Outcome], duration: float, slo: Slo) -> dict:
    """vLLM bench serve's figures for one run (latencies in ms)."""
    ok = [o for o in outs if o.ok]
    n_in = sum(o.prompt_tokens for o in ok)
    n_out = sum(o.output_tokens for o in ok)
    by_kind = {}
    for kind in sorted({o.kind for o in outs}):
        mine = [o for o in outs if o.kind == kind]
        done = [o for o in mine if o.ok]
        by_kind[kind] = {"requests": len(mine), "completed": len(done),
                         "failed": sum(not o.ok for o in mine),
                         "truncated": sum(o.ok and o.output_tokens < o.max_tokens for o in mine),
                         "failed_status": sorted({o.status for o in mine if not o.ok and o.status}),
                         # this kind's figures over the whole run's duration
                         "request_goodput": sum(slo.met(o) for o in done) / duration,
                         "ttft_ms": _dist_ms([o.ttft for o in done]),
                         "tpot_ms": _dist_ms([o.tpot for o in done if o.tpot is not None]),
                         "e2el_ms": _dist_ms([o.e2e for o in done])}
    return {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(outs) - len(ok),
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": sum(slo.met(o) for o in ok) / duration,
        "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
        "peak_concurrency": _peak_concurrency(outs),
        "ttft_ms": _dist_ms([o.ttft for o in ok]),
        "tpot_ms": _dist_ms([o.tpot for o in ok if o.tpot is not None]),
        "itl_ms": _dist_ms([x for o in ok for x in o.itl]),
        "e2el_ms": _dist_ms([o.e2e for o in ok]),
        "by_kind": by_kind,
        "errors": [{"id": o.id, "kind": o.kind, "status": o.status, "message": o.error}
                   for o in outs if not o.ok],
        "requests": [{k: v for k, v in dataclasses.asdict(o).items() if k != "itl"} for o in outs],
    }


# ------------------------------------------------------------------ server
@dataclass(frozen=True)
class ServerConfig:
    module: str
    model: str
    mesh: str
    kv_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    warm_start: bool
    seed: int
    extra: tuple[str, ...]
    prefix_caching: bool = False

    def command(self, policy: str, port: int) -> list[str]:
        kv_policy, _, variant = policy.partition("-")
        extra = ("--long_prefill_token_threshold=1073741824",) if variant == "fcfs" else ()
        return [sys.executable, "-m", self.module, "--serve", "--host", "127.0.0.1", "--port", str(port),
                "--model", self.model, "--mesh", self.mesh, f"--kv_policy={kv_policy}", *extra,
                f"--kv_blocks={self.kv_blocks}", f"--block_size={self.block_size}",
                f"--max_num_seqs={self.max_num_seqs}",
                f"--max_num_batched_tokens={self.max_num_batched_tokens}",
                f"--warm_start={str(self.warm_start).lower()}", f"--seed={self.seed}",
                f"--enable_prefix_caching={str(self.prefix_caching).lower()}", *self.extra]


class Server:
    """The server subprocess (a handle, so not frozen): its port, log and exit."""

    def __init__(self, cmd: list[str], port: int, log_path: str):
        self.cmd, self.port, self.log_path = cmd, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.startup_s: float | None = None
        self.exit_code: int | None = None
        self.killed = False
        self.proc: subprocess.Popen | None = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout_s: float) -> None:
        import httpx

        # the server asks XLA for the simulated devices its mesh needs
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["PYTHONUNBUFFERED"] = "1"
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        t0 = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL)
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise RuntimeError(f"the server exited with status {rc} before it was ready; "
                                   f"{self.log_path} ends with:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5.0, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            if time.perf_counter() - t0 > timeout_s:
                self.stop(10.0)
                raise RuntimeError(f"the server was not ready after {timeout_s:.0f} s; "
                                   f"{self.log_path} ends with:\n{self.log_tail()}")
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - t0

    def stop(self, timeout_s: float) -> None:
        """SIGTERM, then SIGKILL if it has not exited after timeout_s."""
        if self.proc is None or self.proc.poll() is not None:
            self.exit_code = None if self.proc is None else self.proc.returncode
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.killed = True
            self.proc.kill()
            self.exit_code = self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(cmd_for_port, log_path: str, startup_s: float, shutdown_s: float) -> Iterator[Server]:
    port = _free_port()
    server = Server(cmd_for_port(port), port, log_path)
    try:
        server.start(startup_s)
        yield server
    finally:
        server.stop(shutdown_s)


def _compiled(server: Server) -> int:
    """The server's distkv:compiled_programs gauge."""
    import httpx

    for line in httpx.get(server.url + "/metrics", timeout=30.0, trust_env=False).text.splitlines():
        if line.startswith("distkv:compiled_programs"):
            return int(float(line.rsplit(" ", 1)[1]))
    raise RuntimeError("the server's /metrics has no distkv:compiled_programs")


def _served_model(server: Server) -> str:
    """The model name the server answers to (GET /v1/models)."""
    import httpx

    return httpx.get(server.url + "/v1/models", timeout=30.0, trust_env=False).json()["data"][0]["id"]


# ------------------------------------------------------------------ main
def _flag(name: str):
    """The flag's value; under --quick, QUICK's value unless the flag was given."""
    if FLAGS.quick and name in QUICK and not FLAGS[name].present:
        return QUICK[name]
    return FLAGS[name].value


SHAPES = {"13M": dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1536, vocab=512)}


def _shape_model(name: str) -> str:
    """A random-weight Llama of a named shape with the tiny model's tokenizer,
    built once under the cache root."""
    import shutil

    from distkv_jax.bench.common import make_llama_dir
    from distkv_jax.models.tiny import cache_root, tiny_model_dir

    if name not in SHAPES:
        raise ValueError(f"--model_shape={name!r}: one of {', '.join(SHAPES)}")
    dst = os.path.join(cache_root(), f"serving-{name}")
    if not os.path.exists(os.path.join(dst, "config.json")):
        tmp = f"{dst}.tmp-{os.getpid()}"
        make_llama_dir(tmp, SHAPES[name])
        src = tiny_model_dir()
        for f in sorted(os.listdir(src)):
            if "token" in f:  # tokenizer.json, tokenizer_config.json, special_tokens_map.json
                shutil.copy(os.path.join(src, f), tmp)
        os.rename(tmp, dst)
    return dst


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _print_head(head: str) -> None:
    print(head)
    print("-" * len(head))


def _short_long_table(runs: list[dict]) -> None:
    """The short requests' figures with the long ones in flight, beside the
    same short arrivals alone (--no_long), and the long requests' latency."""
    head = (f"{'policy':<17} {'rate':>5} {'short good/s':>12} {'TTFT p50/p99':>13} "
            f"{'alone good/s':>12} {'alone p50/p99':>13} {'p99 ratio':>9} {'long TTFT p50':>13} "
            f"{'long E2E p50':>12} {'compiled':>8}")
    _print_head(head)
    f = _ms
    for run in runs:
        for r in run["results"]:
            sh = r["by_kind"].get("short", {})
            lg = r["by_kind"].get("long", {})
            base = r.get("no_long", {})
            ratio = short_ttft_p99_ratio(r)
            alone = f"{base['request_goodput']:.2f}" if base else "-"
            alone_ttft = f(base["ttft_ms"]["median"]) + "/" + f(base["ttft_ms"]["p99"]) if base else "-"
            print(f"{run['policy']:<17} {r['rate']:>5} {sh.get('request_goodput', 0):>12.2f} "
                  f"{f(sh['ttft_ms']['median']) + '/' + f(sh['ttft_ms']['p99']):>13} {alone:>12} "
                  f"{alone_ttft:>13} {'-' if ratio is None else f'{ratio:.2f}':>9} "
                  f"{f(lg['ttft_ms']['median']) if lg.get('completed') else '-':>13} "
                  f"{f(lg['e2el_ms']['median']) if lg.get('completed') else '-':>12} "
                  f"{r.get('programs_compiled', 0) + base.get('programs_compiled', 0):>8}")


def short_ttft_p99_ratio(r: dict) -> float | None:
    """Short requests' TTFT p99 with the long ones in flight over the p99 of
    the same short arrivals alone."""
    base = r.get("no_long")
    sh = r["by_kind"].get("short")
    if not base or not sh or sh["ttft_ms"]["p99"] is None or not base["ttft_ms"]["p99"]:
        return None
    return sh["ttft_ms"]["p99"] / base["ttft_ms"]["p99"]


def _print_table(runs: list[dict]) -> None:
    head = (f"{'policy':<12} {'rate':>5} {'ok':>4} {'fail':>4} {'req/s':>6} {'good/s':>6} {'out tok/s':>9} "
            f"{'tot tok/s':>9} {'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>17} {'ITL p50':>8} {'E2E p50':>8}")
    _print_head(head)
    f = _ms
    for run in runs:
        for r in run["results"]:
            print(f"{run['policy']:<12} {r['rate']:>5} {r['completed']:>4} {r['failed']:>4} "
                  f"{r['request_throughput']:>6.2f} {r['request_goodput']:>6.2f} "
                  f"{r['output_throughput']:>9.1f} {r['total_token_throughput']:>9.1f} "
                  f"{f(r['ttft_ms']['median']) + '/' + f(r['ttft_ms']['p99']):>17} "
                  f"{f(r['tpot_ms']['median']) + '/' + f(r['tpot_ms']['p99']):>17} "
                  f"{f(r['itl_ms']['median']):>8} {f(r['e2el_ms']['median']):>8}")


def _plot(runs: list[dict], slo: Slo, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for run in runs:
        labels = [r["rate"] for r in run["results"]]
        x = np.arange(len(labels))
        for ax, key in ((axes[0], "ttft_ms"), (axes[1], "tpot_ms")):
            p50 = [r[key]["median"] if r[key]["median"] is not None else np.nan for r in run["results"]]
            p99 = [r[key]["p99"] if r[key]["p99"] is not None else np.nan for r in run["results"]]
            line, = ax.plot(x, p50, "o-", label=f"{run['policy']} p50")
            ax.plot(x, p99, "s--", color=line.get_color(), label=f"{run['policy']} p99")
        line, = axes[2].plot(x, [r["request_goodput"] for r in run["results"]], "o-",
                             label=f"{run['policy']} goodput")
        axes[2].plot(x, [r["request_throughput"] for r in run["results"]], "s:", color=line.get_color(),
                     label=f"{run['policy']} completed/s")
        for ax in axes:
            ax.set_xticks(x, labels)
    axes[0].axhline(slo.ttft_ms, color="gray", lw=0.8, ls=":")
    axes[1].axhline(slo.tpot_ms, color="gray", lw=0.8, ls=":")
    axes[0].set(title=f"TTFT (objective {slo.ttft_ms:g} ms, dotted)", ylabel="ms", yscale="log")
    axes[1].set(title=f"TPOT (objective {slo.tpot_ms:g} ms, dotted)", ylabel="ms", yscale="log")
    axes[2].set(title="goodput and completed requests", ylabel="requests / s")
    for ax in axes:
        ax.set_xlabel("request rate (requests / s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv) -> None:
    del argv
    from distkv_jax.engine_args import EngineArgs

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request

    if FLAGS.model_shape:
        FLAGS.model = _shape_model(FLAGS.model_shape)
    rates = [float(r) for r in _flag("rates")]
    kv_blocks, block_size = _flag("kv_blocks"), _flag("block_size")
    # the most one request may hold under distributed, from the engine's own rule
    limit = EngineArgs(model=FLAGS.model, mesh=FLAGS.mesh, kv_blocks=kv_blocks, block_size=block_size,
                       kv_policy="distributed").kv_cache_config(kv_blocks).max_request_blocks(0) * block_size
    workload = Workload(FLAGS.seed, _flag("num_short"), _flag("num_long"), _flag("short_scale"),
                        FLAGS.short_sigma, FLAGS.short_min, _flag("short_max"), FLAGS.long_factor,
                        _flag("long_output"), kv_blocks * block_size, limit)
    workload.check()
    reqs = make_requests(workload)
    server_cfg = ServerConfig(FLAGS.server_module, FLAGS.model, FLAGS.mesh, kv_blocks, block_size,
                              _flag("max_num_seqs"), FLAGS.max_num_batched_tokens, _flag("warm_start"),
                              FLAGS.server_seed, tuple(FLAGS.server_arg), FLAGS.prefix_caching)
    slo = Slo(FLAGS.ttft_slo_ms, FLAGS.tpot_slo_ms)
    log_dir = FLAGS.server_log_dir or os.path.dirname(os.path.abspath(FLAGS.output_json or "serving.json"))
    # the warm-up request: not recorded (first-use costs, e.g. compiles
    # without a warm start, and a check that the server answers at all)
    warm = BenchRequest("warmup", "warmup", tuple(range(TOKEN_LO, TOKEN_LO + 16)), 4, 0.0)

    runs = []
    for policy in FLAGS.policies:
        log_path = os.path.join(log_dir, f"serving.{policy}.server.log")
        with serving(lambda port: server_cfg.command(policy, port), log_path, _flag("startup_timeout_s"),
                     FLAGS.shutdown_timeout_s) as server:
            print(f"[{policy}] server ready after {server.startup_s:.1f} s: {' '.join(server.cmd)}", flush=True)
            model = _served_model(server)
            (w,), _ = asyncio.run(run_rate(server.url, model, [warm], math.inf, FLAGS.request_timeout_s))
            if not w.ok:
                raise RuntimeError(f"the warm-up request failed ({w.status}): {w.error}; "
                                   f"{log_path} ends with:\n{server.log_tail()}")
            print(f"[{policy}] first request: TTFT {w.ttft * 1e3:.0f} ms, end to end {w.e2e * 1e3:.0f} ms",
                  flush=True)
            results = []
            passes = iter(range(1, 1 << 20))   # a fresh prompt draw per pass (pass 0: the stream's)
            warm_compiled = None
            if FLAGS.warmup_stream and not FLAGS.quick:
                c0 = _compiled(server)
                asyncio.run(run_rate(server.url, model, fresh_tokens(reqs, next(passes), FLAGS.seed),
                                     math.inf, FLAGS.request_timeout_s))
                warm_compiled = _compiled(server) - c0
                print(f"[{policy}] warm-up stream: {warm_compiled} programs compiled", flush=True)
            for rate in rates:
                c0 = _compiled(server)
                stream = fresh_tokens(reqs, next(passes), FLAGS.seed)
                outs, duration = asyncio.run(run_rate(server.url, model, stream, rate, FLAGS.request_timeout_s))
                res = {"rate": _rate_label(rate), **summarize(outs, duration, slo),
                       "programs_compiled": _compiled(server) - c0}
                print(f"[{policy}] rate {res['rate']}: {res['completed']} completed, {res['failed']} failed, "
                      f"{res['duration_s']:.1f} s", flush=True)
                if FLAGS.no_long and any(r.kind == "long" for r in reqs):
                    # the same short arrivals (their u) without the long requests
                    shorts = [r for r in fresh_tokens(reqs, next(passes), FLAGS.seed) if r.kind == "short"]
                    outs, duration = asyncio.run(run_rate(server.url, model, shorts, rate,
                                                          FLAGS.request_timeout_s))
                    c0 = _compiled(server)
                    base = summarize(outs, duration, slo)
                    base.pop("requests")
                    base["programs_compiled"] = _compiled(server) - c0
                    res["no_long"] = base
                    print(f"[{policy}] rate {res['rate']} without the long requests: "
                          f"{base['completed']} completed, {base['duration_s']:.1f} s", flush=True)
                results.append(res)
        if server.exit_code != 0 or server.killed:
            print(f"[{policy}] warning: the server exited with {server.exit_code}"
                  f"{' (killed after SIGTERM timed out)' if server.killed else ''}", file=sys.stderr)
        runs.append({"policy": policy, "server_command": server.cmd, "server_log": log_path,
                     "server_startup_s": server.startup_s, "server_exit_code": server.exit_code,
                     "server_killed": server.killed, "served_model": model,
                     # a user meets the first request too: after the server's
                     # start-up (its warm start), 16 prompt + 4 output tokens
                     "first_request_ms": {"ttft": w.ttft * 1e3, "e2e": w.e2e * 1e3},
                     "warmup_stream_programs_compiled": warm_compiled,
                     "results": results})

    l_lo, l_hi = workload.long_prompt_range()
    result = {
        "bench": "serving", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cpus": os.cpu_count(), "quick": FLAGS.quick,
        "server": dataclasses.asdict(server_cfg), "slo": dataclasses.asdict(slo),
        "rates": [_rate_label(r) for r in rates],
        "workload": {
            **dataclasses.asdict(workload),
            "short": f"lognormal mean {SHAREGPT_MEAN_IN} in / {SHAREGPT_MEAN_OUT} out x {workload.short_scale}, "
                     f"sigma {workload.short_sigma}, clipped [{workload.short_min}, {workload.short_max}]",
            "long": f"prompt lognormal median {workload.long_factor} x {workload.instance_kv_tokens} tokens, "
                    f"sigma 0.25, clipped [{l_lo}, {l_hi}]; output {workload.long_output}",
            "arrivals": "Poisson: request k at u_k / rate s (u: unit-rate, u_0 = 0); inf: all at once",
            "requests": [{"id": r.id, "kind": r.kind, "prompt_tokens": len(r.prompt), "max_tokens": r.max_tokens,
                          "u": r.u} for r in reqs]},
        "runs": runs,
    }
    write_json(FLAGS.output_json, result)
    if FLAGS.output_png:
        _plot(runs, slo, FLAGS.output_png)
    _print_table(runs)
    print()
    _short_long_table(runs)
