"""Process set-up shared by `python -m distkv_jax.launch` and `.convert`:
simulated CPU devices and `jax.distributed`, both before JAX starts.

Multi-process jobs take the coordinator address, process count and process
id from arguments (the launcher's flags) or, where those are unset, from the
environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
Every process of a job runs this with the same mesh.

On CPU, the mesh's devices are simulated: each process asks XLA for
mesh_size / num_processes host devices (`--xla_force_host_platform_device_count`)
and cross-process collectives use gloo. On GPU/TPU those two settings only
touch the (unused) CPU client, so the same call serves every platform.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
_COUNT_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    process_id: int
    num_processes: int
    coordinator_address: str | None
    platform: str
    local_devices: int
    simulated: bool          # CPU devices simulated by XLA

    @property
    def is_main(self) -> bool:
        return self.process_id == 0


def fail(msg: str) -> int:
    """Report a job-level error on stderr; the exit status for it."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 1


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} must be an integer") from None


def _set_cpu_device_count(count: int, exact: bool) -> None:
    """Request `count` host devices (replacing a smaller request, or any other
    request when `exact`: a multi-process mesh needs the same count everywhere)."""
    flags = os.environ.get("XLA_FLAGS", "")
    m = re.search(_COUNT_FLAG + r"=(\d+)", flags)
    if m is not None:
        have = int(m.group(1))
        if have == count or (have > count and not exact):
            return
        flags = (flags[:m.start()] + flags[m.end():]).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {_COUNT_FLAG}={count}".strip()


def setup(mesh_size: int, coordinator_address: str | None = None,
          num_processes: int | None = None, process_id: int | None = None,
          log=None) -> ProcessInfo:
    """Prepare JAX for a job over `mesh_size` devices; call before any JAX use.

    Single process unless a process count > 1 is given (argument or
    JAX_NUM_PROCESSES). Raises ValueError with a clear message on
    inconsistent settings."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    n = num_processes or 1
    if n < 1:
        raise ValueError(f"num_processes must be >= 1, got {n}")
    if n > 1:
        if coordinator_address is None:
            raise ValueError(f"a {n}-process job needs --coordinator_address (or ${ENV_COORDINATOR})")
        if process_id is None:
            raise ValueError(f"a {n}-process job needs --process_id (or ${ENV_PROCESS_ID})")
        if not 0 <= process_id < n:
            raise ValueError(f"process_id {process_id} must be in [0, {n})")
        if mesh_size % n:
            raise ValueError(f"the mesh's {mesh_size} devices do not split evenly over {n} processes")
    _set_cpu_device_count(mesh_size // n, exact=n > 1)

    import jax

    if n > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, n, process_id)
    platform = jax.devices()[0].platform
    local = len(jax.local_devices())
    simulated = platform == "cpu" and mesh_size > 1
    info = ProcessInfo(jax.process_index(), jax.process_count(), coordinator_address, platform,
                       local, simulated)
    if info.is_main:
        where = f"{n} processes x {local}" if n > 1 else f"{local}"
        if simulated:
            log(f"[distkv] no accelerator: simulating {where} CPU devices for the mesh "
                f"(XLA host platform device count)")
        else:
            log(f"[distkv] {where} {platform} devices")
    return info
