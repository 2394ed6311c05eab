#!/usr/bin/env python3
"""Start an N-process `python -m distkv_jax.launch` job on this machine (127.0.0.1).

    python launch/local.py --num_processes 2 [--port P] [--timeout S] -- \\
        --mesh 2x4 --model tiny --input_jsonl in.jsonl --output_jsonl out.jsonl

Everything after `--` goes to every process unchanged; this script adds
--coordinator_address=127.0.0.1:PORT (a free port unless --port is given),
--num_processes and --process_id. On CPU each process simulates
mesh_size / N devices and the processes talk over gloo, so a 2x4 mesh runs as
2 processes x 4 devices. Process output is prefixed with [pK]. If one process
fails, the others are stopped; the exit status is the first non-zero one
(124 on --timeout), else 0. Processes are always reaped.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, sink) -> None:
    for line in iter(stream.readline, b""):
        sink.buffer.write(prefix.encode() + line)
        sink.flush()
    stream.close()


def _stop(procs, grace: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(num_processes: int, launch_args: list[str], port: int | None = None,
        timeout: float | None = None, python: str = sys.executable) -> int:
    port = port or free_port()
    procs, pumps = [], []
    try:
        for i in range(num_processes):
            cmd = [python, "-m", "distkv_jax.launch", *launch_args,
                   f"--coordinator_address=127.0.0.1:{port}",
                   f"--num_processes={num_processes}", f"--process_id={i}"]
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=dict(os.environ))
            procs.append(p)
            _PROCS.append(p)
            for stream, sink in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                t = threading.Thread(target=_pump, args=(stream, f"[p{i}] ", sink), daemon=True)
                t.start()
                pumps.append(t)
        deadline = None if timeout is None else time.monotonic() + timeout
        status = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                status = failed[0]
                break
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"[local] timeout after {timeout} s: stopping the job", file=sys.stderr)
                status = 124
                break
            time.sleep(0.1)
        return status
    finally:
        _stop(procs)
        for t in pumps:
            t.join(timeout=5)


def main() -> int:
    argv = sys.argv[1:]
    if "--" in argv:
        k = argv.index("--")
        ours, launch_args = argv[:k], argv[k + 1:]
    else:
        ours, launch_args = argv, []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--num_processes", type=int, default=2)
    ap.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before the job is stopped")
    args = ap.parse_args(ours)
    if args.num_processes < 1:
        ap.error("--num_processes must be >= 1")
    if "--serve" in launch_args or "--serve=true" in launch_args:
        # A server drains on SIGTERM: only process 0 hears it; the others
        # follow its shutdown (see distkv_jax/serving/api_server.py).
        signal.signal(signal.SIGTERM, lambda *_: _signal_leader(signal.SIGTERM))
        signal.signal(signal.SIGINT, lambda *_: _signal_leader(signal.SIGINT))
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run's finally reaps the children
    return run(args.num_processes, launch_args, args.port, args.timeout)


_PROCS: list = []


def _signal_leader(sig: int) -> None:
    if _PROCS and _PROCS[0].poll() is None:
        _PROCS[0].send_signal(sig)


if __name__ == "__main__":
    sys.exit(main())
