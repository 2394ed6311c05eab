"""Multi-host online serving: process 0 decides each step's adds and aborts,
and every process applies the same ones before that step.

The commands of one engine-loop turn travel through `jax.distributed`'s
key-value store (the coordination service every process of the job is
already connected to): process 0 writes them under the turn's number; the
other processes block on that key. All processes then apply them in the same
order, so their control planes make identical decisions. Keys older than
`_KEEP` turns are deleted by process 0: every process has read a turn's key
before it dispatches that turn's step, and the steps are collective, so when
process 0 publishes turn n every process is past turn n - 2.
"""

from __future__ import annotations

import dataclasses
import json

from .sampling_params import SamplingParams

_PREFIX = "distkv/online/turn/"
_KEEP = 8
_WAIT_MS = 60_000


def _client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("multi-process serving needs jax.distributed to be initialized")
    return client


def encode(commands: list[tuple], stopping: bool) -> str:
    out = []
    for cmd in commands:
        if cmd[0] == "add":
            _, rid, prompt, params = cmd
            out.append(["add", rid, prompt, dataclasses.asdict(params)])
        else:
            out.append(list(cmd))
    return json.dumps({"commands": out, "stopping": stopping})


def decode(text: str) -> tuple[list[tuple], bool]:
    msg = json.loads(text)
    cmds = []
    for c in msg["commands"]:
        if c[0] == "add":
            cmds.append(("add", c[1], c[2], SamplingParams(**c[3])))
        else:
            cmds.append(tuple(c))
    return cmds, msg["stopping"]


class CommandChannel:
    def __init__(self, process_index: int):
        self.leader = process_index == 0
        self.turn = 0

    def publish(self, commands: list[tuple], stopping: bool) -> None:
        """Process 0: this turn's commands."""
        client = _client()
        client.key_value_set(_PREFIX + str(self.turn), encode(commands, stopping))
        if self.turn >= _KEEP:
            try:
                client.key_value_delete(_PREFIX + str(self.turn - _KEEP))
            except Exception:  # noqa: BLE001 - a missing old key is harmless
                pass
        self.turn += 1

    def receive(self) -> tuple[list[tuple], bool]:
        """Other processes: wait for this turn's commands (indefinitely: an
        idle server sends nothing until a request comes)."""
        client = _client()
        key = _PREFIX + str(self.turn)
        while True:
            try:
                text = client.blocking_key_value_get(key, _WAIT_MS)
                break
            except Exception as e:  # noqa: BLE001 - a timeout: keep waiting
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise
        self.turn += 1
        return decode(text)
