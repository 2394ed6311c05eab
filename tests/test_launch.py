"""`python -m distkv_jax.launch` batch jobs, end to end, in subprocesses.

One input file mixes good requests (one needs KV borrowed from another
instance on a 2x4 mesh) with every kind of bad line. The 1x1 run is the
baseline; a 2x4 single-process run, a 2-process 2x4 run (launch/local.py on
127.0.0.1), a crashed-and-resumed run and a run from a converted orbax
checkpoint must reproduce its token ids exactly (greedy).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240
# Programs compile on first use: the engine's warm start compiles every step
# shape up front (over 100 programs, minutes per mesh on a 2-core machine),
# which these tests of the launcher do not need.
NO_WARM_START = ["--warm_start=false"]

GOOD = [
    {"id": "r1", "prompt": "Once upon a time", "max_tokens": 8},
    {"id": 2, "prompt_token_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13] * 2, "max_tokens": 12},
    # 100 + 8 tokens: 7 blocks of 16; a 2x4 instance holds 4, so it borrows.
    {"id": "long", "prompt_token_ids": list(range(3, 103)), "max_tokens": 8},
    {"id": "r4", "prompt_token_ids": [1, 2, 3], "min_tokens": 3, "max_tokens": 5},
]
LAST_GOOD = {"id": "r9", "prompt": "Numbers: 0 1 2 3", "max_tokens": 7}
BAD = {  # line -> (text, words the error must contain)
    5: ("this is not json", ["invalid JSON"]),
    6: (json.dumps({"id": "u", "prompt": "x", "temprature": 0.5}), ["unknown field", "temprature"]),
    7: (json.dumps({"id": "b", "prompt": "x", "top_p": 2}), ["top_p"]),
    8: (json.dumps({"id": "m"}), ["prompt"]),
    9: (json.dumps({"id": "big", "prompt_token_ids": [7] * 300}), ["300 tokens"]),
    11: (json.dumps({"id": "r1", "prompt": "again"}), ["duplicate id", "line 1"]),
}


def _input_lines() -> list[str]:
    lines = [json.dumps(r) for r in GOOD]
    for n in range(5, 12):
        lines.append(BAD[n][0] if n in BAD else "")  # line 10 is blank: skipped
    lines.append(json.dumps(LAST_GOOD))
    return lines


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest's 8 devices: the launcher picks its own count
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run_group(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run in a new process group; on timeout kill the whole group (a job's
    worker processes included) and reap it."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd} timed out after {TIMEOUT} s\nstderr:\n{err[-6000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of a failed multi-process job
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _run(args: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    p = _run_group([sys.executable, *args], _env())
    if p.returncode != expect:
        raise AssertionError(f"{args} exited {p.returncode}, expected {expect}\n"
                             f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}")
    return p


def _launch(inp, out, mesh="1x1", kv_blocks=8, model="tiny", extra=(), expect=0, processes=1):
    flags = [f"--mesh={mesh}", f"--model={model}", f"--input_jsonl={inp}",
             f"--output_jsonl={out}", "--temperature=0", "--block_size=16",
             f"--kv_blocks={kv_blocks}", "--max_num_seqs=4", "--progress=false", *NO_WARM_START,
             *extra]
    if processes == 1:
        return _run(["-m", "distkv_jax.launch", *flags], expect)
    return _run([os.path.join(ROOT, "launch", "local.py"), f"--num_processes={processes}",
                 f"--timeout={TIMEOUT - 20}", "--", *flags], expect)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _key(r: dict):
    return ("id", str(r["id"])) if r["id"] is not None else ("line", r["line"])


def _by_key(records) -> dict:
    out = {}
    for r in records:
        assert _key(r) not in out, f"{_key(r)} written twice"
        out[_key(r)] = r
    return out


def _results(records) -> dict:
    """What must not depend on mesh, process count or interruptions."""
    return {k: (r["token_ids"], r["finish_reason"], r["error"] is None)
            for k, r in _by_key(records).items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from distkv_jax.models.tiny import tiny_model_dir

    tiny_model_dir()  # build it once, before concurrent processes want it
    d = tmp_path_factory.mktemp("launch")
    inp = d / "in.jsonl"
    inp.write_text("\n".join(_input_lines()) + "\n")
    return d, inp


@pytest.fixture(scope="module")
def baseline(work):
    d, inp = work
    out, metrics = d / "base.jsonl", d / "base_metrics.json"
    _launch(inp, out, extra=[f"--metrics_json={metrics}"])
    return _records(out), json.loads(metrics.read_text())


def test_errors_are_records_and_the_rest_completes(baseline):
    records, metrics = baseline
    by = _by_key(records)
    assert len(records) == len(GOOD) + 1 + len(BAD)
    for n, (_, words) in BAD.items():
        rec = next(r for r in records if r["line"] == n)
        assert rec["finish_reason"] == "error" and rec["token_ids"] == []
        assert rec["error"].startswith(f"line {n}:"), rec["error"]
        for w in words:
            assert w in rec["error"], (w, rec["error"])
    for req in GOOD + [LAST_GOOD]:
        rec = by[("id", str(req["id"]))]
        assert rec["id"] == req["id"] and rec["error"] is None
        assert rec["finish_reason"] in ("stop", "length")
        assert 1 <= rec["generation_tokens"] == len(rec["token_ids"]) <= req["max_tokens"]
        assert rec["ttft_s"] > 0 and rec["e2e_latency_s"] >= rec["ttft_s"]
        if rec["finish_reason"] == "length":
            assert len(rec["token_ids"]) == req["max_tokens"]
    assert len(by[("id", "r4")]["token_ids"]) >= 3  # min_tokens
    assert metrics["completed"] == len(GOOD) + 1 and metrics["errors"] == len(BAD)
    for k in ("ttft_s", "tpot_s", "itl_s", "e2e_latency_s"):
        assert metrics[k]["p50"] <= metrics[k]["p90"] <= metrics[k]["p99"]
    assert metrics["request_throughput"] > 0 and metrics["output_token_throughput"] > 0
    assert 0 < metrics["kv_usage"]["peak"] <= 1
    assert metrics["generation_tokens"] == sum(len(r["token_ids"]) for r in records)
    for k in ("preemptions", "borrowed_blocks_peak", "migrated_blocks", "steps"):
        assert k in metrics


def test_2x4_one_process_and_two_processes_match_1x1(work, baseline):
    d, inp = work
    want = _results(baseline[0])
    one = d / "one_2x4.jsonl"
    _launch(inp, one, mesh="2x4", kv_blocks=4)
    assert _results(_records(one)) == want
    two, metrics = d / "two_2x4.jsonl", d / "two_metrics.json"
    _launch(inp, two, mesh="2x4", kv_blocks=4, processes=2, extra=[f"--metrics_json={metrics}"])
    assert _results(_records(two)) == want
    m = json.loads(metrics.read_text())
    assert m["processes"] == 2 and m["borrowed_blocks_peak"] > 0


def test_resume_after_crash_writes_every_id_once(work, baseline):
    d, inp = work
    out = d / "resumed.jsonl"
    crash = ["--max_pending=2", "--stop_after=3"]
    _launch(inp, out, extra=crash, expect=3)  # simulated crash
    first = _records(out)
    assert len(first) == 3
    with open(out, "a") as f:
        f.write('{"id": "r9", "text": "half a rec')  # a crash in the middle of a write
    _launch(inp, out, extra=["--max_pending=2"])
    records = _records(out)
    assert records[:3] == first
    assert _results(records) == _results(baseline[0])  # every key exactly once, same tokens


def test_orbax_checkpoint_gives_the_same_outputs(work, baseline):
    from distkv_jax.models.tiny import tiny_model_dir

    d, inp = work
    ckpt = d / "ckpt"
    _run(["-m", "distkv_jax.convert", f"--model={tiny_model_dir()}", f"--output={ckpt}",
          "--mesh=2x2"])
    assert (ckpt / "params").is_dir() and (ckpt / "config.json").is_file()
    out = d / "from_orbax.jsonl"
    _launch(inp, out, model=str(ckpt))
    assert _results(_records(out)) == _results(baseline[0])


STUB_SRUN = """#!/bin/bash
# stand-in for srun: start $SLURM_NTASKS copies of the command, SLURM_PROCID set
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def test_slurm_script_with_stub_srun(work, baseline, tmp_path):
    """launch/slurm.sbatch run as a 2-task job, srun and scontrol replaced by
    local stand-ins: the script's own wiring (coordinator, process ids, flags)."""
    d, inp = work
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(STUB_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (bin_dir / "python").write_text(f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')
    for f in ("srun", "scontrol", "python"):
        os.chmod(bin_dir / f, 0o755)
    out = d / "slurm.jsonl"
    env = dict(_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NTASKS="2",
               SLURM_JOB_NODELIST="node[0-1]", DISTKV_PORT=str(free_port()))
    p = _run_group(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "--mesh=2x4",
                    "--model=tiny", f"--input_jsonl={inp}", f"--output_jsonl={out}",
                    "--temperature=0", "--block_size=16", "--kv_blocks=4", "--max_num_seqs=4",
                    "--progress=false", *NO_WARM_START], env)
    assert p.returncode == 0, p.stderr[-6000:]
    assert _results(_records(out)) == _results(baseline[0])


def test_kubernetes_manifest_parses():
    """The Kubernetes manifest cannot run here; check its structure."""
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(ROOT, "launch", "k8s-indexed-job.yaml")) as f:
        docs = list(yaml.safe_load_all(f))
    assert [d["kind"] for d in docs] == ["Service", "Job"]
    job = docs[1]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"]


# ------------------------------------------------ flags, input, signals (in-process)
@pytest.fixture
def launch_flags():
    """Parse launcher flags into absl's FLAGS for one in-process main() call."""
    from absl import flags

    from distkv_jax import launch

    def parse(*argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["launch", *argv])
        return launch

    yield parse
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("argv, want", [
    (["--kv_blocks=-5"], "--kv_blocks=-5: must be >= 1"),
    (["--block_size=0"], "--block_size=0: must be >= 1"),
    (["--kv_blocks=0"], "--kv_blocks=0: must be >= 1"),
    (["--mesh=2y3"], "--mesh=2y3: "),
    (["--max_num_seqs=0"], "--max_num_seqs=0: must be >= 1"),
    (["--max_pending=0"], "--max_pending=0: must be >= 1"),
])
def test_bad_engine_flag_is_named_before_loading(launch_flags, capsys, argv, want):
    launch = launch_flags("--model=/no/such/model", *argv)
    assert launch.main(["launch"]) == 1
    err = capsys.readouterr().err
    assert f"error: {want}" in err, err
    assert "model" not in err.replace("--model", ""), err  # the flag is blamed, not the model


def test_engine_args_come_from_the_flags(launch_flags):
    from distkv_jax.engine_args import EngineArgs

    launch = launch_flags("--kv_blocks=7", "--mesh=2x1", "--kv_policy=local")
    args = launch.engine_args_from_flags()
    assert isinstance(args, EngineArgs)
    assert (args.kv_blocks, args.mesh, args.kv_policy) == (7, "2x1", "local")
    assert args.block_size == EngineArgs.block_size  # defaults are EngineArgs'


def test_output_paths_that_are_directories_fail_first(launch_flags, capsys, tmp_path):
    for flag in ("output_jsonl", "metrics_json"):
        launch = launch_flags(f"--{flag}={tmp_path}", "--model=/no/such/model")
        assert launch.main(["launch"]) == 1
        err = capsys.readouterr().err
        assert f"--{flag}={tmp_path} is a directory" in err, err
    launch = launch_flags(f"--input_jsonl={tmp_path / 'x.jsonl'}",
                          f"--output_jsonl={tmp_path / 'x.jsonl'}")
    assert launch.main(["launch"]) == 1
    assert "name the same file" in capsys.readouterr().err


def test_pallas_on_cpu_and_model_paths_are_explained(launch_flags, capsys, tmp_path):
    from distkv_jax import launch
    from distkv_jax.models.loader import describe_missing_model

    msg = launch.attention_impl_problem("pallas", "cpu")
    assert msg.startswith("--attention_impl=pallas:") and "needs a GPU" in msg
    assert launch.attention_impl_problem("pallas", "gpu") is None
    assert launch.attention_impl_problem("reference", "cpu") is None
    launch_flags("--attention_impl=pallas")
    assert launch.main(["launch"]) == 1
    assert "needs a GPU" in capsys.readouterr().err

    missing = str(tmp_path / "nowhere")
    assert describe_missing_model(missing) == f"model directory {missing} does not exist"
    hub = describe_missing_model("meta-llama/Llama-3.1-8B")
    assert "Hugging Face hub id" in hub and "nothing is downloaded" in hub and "local directory" in hub
    assert "no config.json" in describe_missing_model(str(tmp_path))
    launch_flags("--model=Qwen/Qwen2-0.5B")
    assert launch.main(["launch"]) == 1
    assert "Hugging Face hub id" in capsys.readouterr().err


def test_bad_flag_exit_status_in_a_subprocess():
    p = _run(["-m", "distkv_jax.launch", "--kv_blocks", "-5"], expect=1)
    assert "error: --kv_blocks=-5: must be >= 1" in p.stderr


def test_jsonl_lines_split_at_newline_only_and_decode_strictly():
    from distkv_jax.launch import parse_jsonl

    raw = b"\n".join([
        json.dumps({"id": "a", "prompt": "one\u2028two"}, ensure_ascii=False).encode(),   # 1
        json.dumps({"id": "b", "prompt": "x\x85y"}, ensure_ascii=False).encode(),        # 2
        b'{"id": "c", "prompt": "caf\xe9"}',                                             # 3: latin-1
        b"",                                                                             # 4: blank
        json.dumps({"id": "d", "prompt_token_ids": [1, 2]}).encode() + b"\r",            # 5: CRLF
        b'{"id": "e", "prompt": "\xff\xfe"}',                                            # 6
        json.dumps({"id": "f", "prompt": "\u2029 \u0085 \u000b"}, ensure_ascii=False).encode(),  # 7
    ]) + b"\n"
    assert len(raw.decode("utf-8", "replace").splitlines()) > 7  # what str.splitlines would do
    entries = parse_jsonl(raw, {"max_tokens": 4}, base_seed=0)
    by_line = {e.line: e for e in entries}
    assert sorted(by_line) == [1, 2, 3, 5, 6, 7]
    assert by_line[1].prompt == "one\u2028two" and by_line[1].id == "a"
    assert by_line[2].prompt == "x\x85y" and by_line[2].id == "b"
    assert by_line[5].prompt == [1, 2] and by_line[5].error is None
    assert by_line[7].id == "f" and by_line[7].error is None
    for n in (3, 6):
        e = by_line[n]
        assert e.id is None and e.params is None
        assert e.error.startswith(f"line {n}: not valid UTF-8"), e.error
    assert all(by_line[n].error is None for n in (1, 2, 5, 7))
    # a byte-order mark on the first line is not an error
    bom = parse_jsonl(b"\xef\xbb\xbf" + json.dumps({"id": 1, "prompt": "x"}).encode(), {}, 0)
    assert bom[0].error is None and bom[0].id == 1


def test_signals_stop_gracefully_inside_the_job_and_at_once_before():
    from distkv_jax.launch import Interrupted, Signals

    s = Signals().install()
    try:
        with pytest.raises(Interrupted) as e:
            signal.raise_signal(signal.SIGINT)
        assert e.value.signum == signal.SIGINT
        s.restore()
        s = Signals().install()
        s.graceful = True
        signal.raise_signal(signal.SIGTERM)  # noted: the loop stops after its step
        assert s.signum == signal.SIGTERM and s.name == "SIGTERM"
        with pytest.raises(Interrupted):
            signal.raise_signal(signal.SIGTERM)  # a second one stops at once
    finally:
        s.restore()


# ------------------------------------------------ SIGTERM and resume (subprocess)
SIGNAL_N = 40


def _sig_lines() -> list[str]:
    reqs = [{"id": f"s{i}", "prompt_token_ids": [1 + i, 2, 3], "max_tokens": 12,
             "ignore_eos": True} for i in range(SIGNAL_N)]
    return [json.dumps(r) for r in reqs]


def test_sigterm_writes_metrics_and_resume_covers_both_parts(tmp_path):
    import time

    from distkv_jax.models.tiny import tiny_model_dir

    tiny_model_dir()
    inp, out, metrics = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "m.json"
    inp.write_text("\n".join(_sig_lines()) + "\n")
    # one request at a time: slow enough to be stopped in the middle
    args = ["-m", "distkv_jax.launch", "--model=tiny", f"--input_jsonl={inp}",
            f"--output_jsonl={out}", f"--metrics_json={metrics}", "--temperature=0",
            "--kv_blocks=16", "--max_num_seqs=4", "--max_pending=1", "--progress=false",
            *NO_WARM_START]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be interrupted"
        os.kill(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 143, stderr[-4000:]
    first = _records(out)  # every line whole
    n = len(first)
    assert 2 <= n < SIGNAL_N
    assert f"interrupted: {n} records written; rerun the same command to resume" in stderr
    m1 = json.loads(metrics.read_text())
    assert m1["interrupted"] == "SIGTERM" and len(m1["parts"]) == 1
    assert m1["requests"] == m1["completed"] == n == m1["parts"][0]["requests"]
    assert m1["generation_tokens"] == 12 * n

    p = _run(args)  # the same command resumes
    records = _records(out)
    assert records[:n] == first
    assert sorted(r["id"] for r in records) == sorted(f"s{i}" for i in range(SIGNAL_N))
    m = json.loads(metrics.read_text())
    parts = m["parts"]
    assert [q["part"] for q in parts] == [1, 2]
    assert parts[0] == dict(m1["parts"][0], part=1)
    assert parts[0]["interrupted"] == "SIGTERM" and parts[1]["interrupted"] is None
    assert parts[1]["skipped_already_done"] == n and parts[1]["requests"] == SIGNAL_N - n
    assert m["requests"] == m["completed"] == SIGNAL_N and m["records_without_metrics"] == 0
    assert m["generation_tokens"] == sum(len(r["token_ids"]) for r in records) == 12 * SIGNAL_N
    assert m["ttft_s"]["count"] == SIGNAL_N and m["e2e_latency_s"]["count"] == SIGNAL_N
    assert m["steps"] == parts[0]["steps"] + parts[1]["steps"]
    assert m["elapsed_s"] == pytest.approx(parts[0]["elapsed_s"] + parts[1]["elapsed_s"])
    assert m["itl_s"]["count"] == parts[0]["itl_s"]["count"] + parts[1]["itl_s"]["count"]
    assert m["interrupted"] is None
    assert "parts 1-2" in p.stdout


def test_batch_record_of_an_n_gt_1_request_holds_every_sequence():
    from distkv_jax.launch import Entry, request_record
    from distkv_jax.outputs import CompletionOutput, RequestOutput

    outs = [CompletionOutput(i, f"t{i}", [i, i + 1], None, None, "length") for i in range(3)]
    out = RequestOutput("r", None, [5, 6, 7], None, outs, True, num_cached_tokens=2)
    rec = request_record(Entry(4, "r", [5, 6, 7], None), out)
    assert rec["text"] == "t0" and rec["token_ids"] == [0, 1]       # sequence 0 at top level
    assert rec["generation_tokens"] == 6 and rec["num_cached_tokens"] == 2
    assert [c["index"] for c in rec["choices"]] == [0, 1, 2]
    assert rec["choices"][2]["token_ids"] == [2, 3]
    json.dumps(rec)
