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
             f"--kv_blocks={kv_blocks}", "--max_num_seqs=4", "--progress=false", *extra]
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
                    "--progress=false"], env)
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
