"""The commands the README and the docs show run as a user runs them: from the
repository root (where Python puts the working directory first on
`sys.path`) and from elsewhere.

- Every `python -m distkv_jax.bench <sub>` the pages name is a real
  subcommand, and a test named `test_bench_<sub>_quick...` runs it with
  `--quick` from the repository root (the heavy ones in their own
  test_bench_*.py; the two that had none here).
- `make serve`'s command from the repository root answers `/health` 200 and
  serves a completion.
- The documentation site builds with `mkdocs build --strict` (no broken
  internal link or anchor) and the README stays short.
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from bench_runner import ROOT, run_bench
from distkv_jax.bench.__main__ import SUBCOMMANDS

# needs a virtual environment with vLLM (../shared/PEERS.md); its method is
# `throughput --peer vllm`'s, whose side-by-side mode has a quick test
NEEDS_PEER = {"vllm_cpu"}


def _pages() -> dict[str, str]:
    paths = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    out = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            out[os.path.relpath(path, ROOT)] = f.read()
    return out


def _named_benches() -> dict[str, list[str]]:
    named: dict[str, list[str]] = {}
    for page, text in _pages().items():
        for sub in re.findall(r"python -m distkv_jax\.bench (\w+)", text):
            named.setdefault(sub, []).append(page)
    return named


def _tests_source() -> str:
    texts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "*.py"))):
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n".join(texts)


def test_every_bench_the_pages_name_exists_and_runs_quick_in_a_test():
    named = _named_benches()
    assert len(named) >= 8, named  # the pages do name them
    unknown = {sub: pages for sub, pages in named.items() if sub not in SUBCOMMANDS}
    assert not unknown, f"pages name bench subcommands that do not exist: {unknown}"
    src = _tests_source()
    # the convention: test_bench_<sub>_quick... runs `<sub> --quick` from the root
    uncovered = [sub for sub in sorted(named) if sub not in NEEDS_PEER
                 and re.search(rf"^def test_bench_{sub}_quick", src, re.M) is None]
    assert not uncovered, f"no test runs these with --quick: {uncovered}"


def _run_quick(sub: str, out, cwd: str) -> dict:
    """`python -m distkv_jax.bench <sub> --quick` in a subprocess from `cwd`,
    with the benchmark's own simulated devices (as a user's run)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "distkv_jax.bench", sub, "--quick",
                           f"--output_json={out}"],
                          cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_control_plane_quick_from_the_root_and_from_elsewhere(tmp_path):
    for cwd in (ROOT, str(tmp_path)):
        r = _run_quick("control_plane", tmp_path / "cp.json", cwd)
        assert r["bench"] == "control_plane" and r["quick"] is True
        assert r["requests"] == 32 and r["instances"] == 4 and r["steps"] == 5
        assert r["step_ms_median"] > 0 and r["schedule_ms_median"] > 0


def test_bench_longctx_quick_from_the_root_and_from_elsewhere(tmp_path):
    # from the repository root: run_bench; from elsewhere: _run_quick
    r = run_bench("longctx", tmp_path / "root.json")
    assert r["completed"] is True and r["generated"] == 4 and r["preemptions"] == 0
    # part of the request's KV was attended on the host, as the page says
    assert r["most_blocks_on_host"] > 0 and 0 < r["most_tokens_on_host_share"] < 1
    r2 = _run_quick("longctx", tmp_path / "elsewhere.json", str(tmp_path))
    assert r2["completed"] is True and r2["generated"] == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_target_command(target: str) -> list[str]:
    """The command line of a Makefile target's recipe (its python -m ...)."""
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    i = lines.index(next(line for line in lines if line.startswith(f"{target}:")))
    recipe = lines[i + 1].strip()
    assert recipe.startswith("$(BIN)/python -m "), recipe
    return recipe.removeprefix("$(BIN)/python ").split()


def test_make_serve_command_from_the_repo_root_answers_health_and_serves():
    cmd = _make_target_command("serve")
    port = _free_port()
    cmd[cmd.index("--port") + 1] = str(port)
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        status = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}): {proc.stdout.read()[-3000:]}")
            try:
                status = httpx.get(url + "/health", timeout=5).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            time.sleep(1.0)
        assert status == 200, "no /health 200 within 420 s"
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


def test_docs_site_builds_strict_and_readme_is_short(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
                           str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert len(readme.splitlines()) < 250
    # the README's relative links (outside the site) point at files that exist
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        assert os.path.exists(os.path.join(ROOT, target)), target
