"""Typed configuration and plan records of the KV control plane.

Plain Python + numpy (no JAX). Everything here is a frozen dataclass so a plan,
once handed to the engine, cannot change under it.

Block ids are *global*: device block ``g`` lives on instance
``g // blocks_per_instance`` at physical index ``g % blocks_per_instance``;
host block ``h`` lives in the host pool of instance ``h // host_blocks_per_instance``.
A token at position ``pos`` of a request is stored in slot
``block_ids[pos // block_size] * block_size + pos % block_size``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Literal

import numpy as np

KVPolicy = Literal["distributed", "local"]
RequestId = Hashable

POLICIES = ("distributed", "local")


@dataclass(frozen=True)
class KVCacheConfig:
    """Shape and policy of the distributed KV cache.

    lend_fraction: the share of an instance's device blocks that may be lent
      to other instances at any time (cap = floor(lend_fraction * blocks)).
      Default 1.0: an instance lends any free block, and takes lent blocks
      back when its own requests need them (reclaim: the borrower's blocks
      move elsewhere, or the borrower is preempted). Ignored (no lending)
      under ``kv_policy="local"``.
    migrate_tokens_per_step: migration budget per step, in tokens of KV. The
      block budget is ``ceil(migrate_tokens_per_step / block_size)`` blocks
      (at least 1 when the token budget is positive). The default of 16
      tokens follows the paper (16 tokens/step of migration cost nothing
      measurable; 32 cost 8.6% throughput); with block_size 16 that is one
      block per step. A defragmentation cycle swap of length k is atomic: it
      may run even when k exceeds the budget, but only as the first (and then
      only) unit of a step's migration plan.
    home_reserve_blocks: return-home migration only moves a block home while
      the home instance keeps more than this many free blocks.
    enable_prefix_caching: full blocks are registered under a hash chained
      over (parent hash, the block's token ids, ``cache_salt``), kept after
      their readers finish (evictable, least recently released first) and
      reused by later requests with the same prefix: on any instance under
      ``distributed``, on the request's own instance under ``local``.
    cache_salt: mixed into every prefix hash (the model and dtype), so KV
      computed by another model can never match.
    host_attention: a running request's full, older blocks may live in the
      host tier and be attended there (host-attended KV). Placement order
      when a request grows: its own instance, borrowed device blocks (after
      reclaiming the home's lent ones), then the oldest full private blocks
      of running requests move to the host tier (offload), then preemption.
      Host blocks come back to their request's home as its free blocks
      allow, within the migration budget. The host pool is one free list
      per instance shared by host-attended blocks and swapped-out requests,
      first come first served: when it is full, preemption recomputes.
      In a block table, host block ``h`` is written ``num_device_blocks + h``.
    """

    num_instances: int
    blocks_per_instance: int
    block_size: int = 16
    host_blocks_per_instance: int = 0
    kv_policy: KVPolicy = "distributed"
    lend_fraction: float = 1.0
    migrate_tokens_per_step: int = 16
    home_reserve_blocks: int = 0
    enable_prefix_caching: bool = False
    cache_salt: str = ""
    host_attention: bool = False

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {self.num_instances}")
        if self.blocks_per_instance < 1:
            raise ValueError(f"blocks_per_instance must be >= 1, got {self.blocks_per_instance}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.host_blocks_per_instance < 0:
            raise ValueError("host_blocks_per_instance must be >= 0")
        if self.kv_policy not in POLICIES:
            raise ValueError(f"kv_policy must be one of {POLICIES}, got {self.kv_policy!r}")
        if not 0.0 <= self.lend_fraction <= 1.0:
            raise ValueError(f"lend_fraction must be in [0, 1], got {self.lend_fraction}")
        if self.migrate_tokens_per_step < 0:
            raise ValueError("migrate_tokens_per_step must be >= 0")
        if self.home_reserve_blocks < 0:
            raise ValueError("home_reserve_blocks must be >= 0")

    @property
    def lend_cap(self) -> int:
        """Most blocks one instance may have lent out at any time."""
        if self.kv_policy == "local" or self.num_instances == 1:
            return 0
        return int(math.floor(self.lend_fraction * self.blocks_per_instance + 1e-9))

    @property
    def migrate_blocks_per_step(self) -> int:
        if self.migrate_tokens_per_step == 0:
            return 0
        return max(1, -(-self.migrate_tokens_per_step // self.block_size))

    @property
    def num_device_blocks(self) -> int:
        return self.num_instances * self.blocks_per_instance

    @property
    def num_host_blocks(self) -> int:
        return self.num_instances * self.host_blocks_per_instance

    def max_request_blocks(self, instance: int) -> int:
        """Most blocks one request homed on ``instance`` can ever hold: device
        blocks, plus host blocks under host_attention (all but the last
        block may be host-attended)."""
        del instance  # every instance has the same shape
        device = self.blocks_per_instance + (self.num_instances - 1) * self.lend_cap
        if not self.host_attention:
            return device
        host = self.host_blocks_per_instance if self.kv_policy == "local" else self.num_host_blocks
        return device + host

    def owner(self, device_block: int) -> int:
        return device_block // self.blocks_per_instance

    def host_owner(self, host_block: int) -> int:
        return host_block // self.host_blocks_per_instance


CopyKind = Literal["move", "swap_out", "swap_in"]


@dataclass(frozen=True)
class CopyPlan:
    """A batch of whole-block copies, executed as one gather then one scatter.

    kind "move": device -> device (``src``, ``dst`` are global device blocks);
    "swap_out": device -> host; "swap_in": host -> device. All sources are read
    before any destination is written, so a batch may swap blocks along a
    cycle. Destinations are distinct.
    """

    kind: CopyKind
    pairs: tuple[tuple[int, int], ...] = ()

    def __len__(self) -> int:
        return len(self.pairs)

    def __bool__(self) -> bool:
        return bool(self.pairs)

    @property
    def src(self) -> np.ndarray:
        return np.asarray([p[0] for p in self.pairs], dtype=np.int32).reshape(-1)

    @property
    def dst(self) -> np.ndarray:
        return np.asarray([p[1] for p in self.pairs], dtype=np.int32).reshape(-1)

    def concat(self, other: "CopyPlan") -> "CopyPlan":
        if other.kind != self.kind:
            raise ValueError(f"cannot concat {self.kind} and {other.kind} plans")
        return CopyPlan(self.kind, self.pairs + other.pairs)


PreemptMode = Literal["swap", "recompute"]


@dataclass(frozen=True)
class Preemption:
    """A request taken off the device.

    mode "swap": its KV was copied to host (``swap_out``) and it keeps its
    tokens; "recompute": its KV was dropped (num_tokens is now 0) and the
    engine must prefill it again from scratch.
    """

    request_id: RequestId
    mode: PreemptMode
    swap_out: CopyPlan = field(default_factory=lambda: CopyPlan("swap_out"))


GrowStatus = Literal["ok", "preempted", "too_long"]


@dataclass(frozen=True)
class GrowResult:
    """Outcome of growing one request by ``num_new`` tokens.

    status "ok": ``slots`` holds the global slot of each new token (int64);
    "preempted": the request itself was preempted (see ``preemptions``) and
    got no slots; "too_long": it can never hold that many tokens under this
    config (nothing changed). ``preemptions`` lists every request preempted to
    make room (newest first), possibly including this one.
    """

    request_id: RequestId
    status: GrowStatus
    start: int
    num_new: int
    slots: np.ndarray
    preemptions: tuple[Preemption, ...] = ()
    # reclaim moves planned for this growth (run with the step's moves, before
    # the preemptions' swap-outs): borrowers' blocks leaving the home instance
    moves: CopyPlan | None = None  # None: no moves (normalized to an empty plan)
    # host-attended KV: full blocks of running requests copied to the host
    # tier to make room (run with the swap-outs); they stay in their tables
    offload: CopyPlan | None = None

    def __post_init__(self) -> None:
        if self.moves is None:
            object.__setattr__(self, "moves", CopyPlan("move"))
        if self.offload is None:
            object.__setattr__(self, "offload", CopyPlan("swap_out"))


@dataclass(frozen=True)
class StepKVPlan:
    """Everything the engine must do to the KV pools before and during a step.

    Execute in this order: ``forks`` (device->device copies), ``moves``
    (device->device), ``swap_out``
    (device->host: preempted requests, and blocks offloaded to be attended
    on the host), ``swap_in`` (host->device: swapped requests, and
    host-attended blocks brought back); then run the step, writing the
    new tokens of ``scheduled`` (their slots: ``KVCacheManager.slots``).

    scheduled: (request_id, start_position, num_new_tokens) in batch order.
    preempted: requests taken off the device this step (not scheduled);
    swapped_in: swapped requests brought back (they are in ``scheduled``);
    too_long: requests that can never grow as asked (not scheduled).
    """

    moves: CopyPlan
    swap_out: CopyPlan
    swap_in: CopyPlan
    scheduled: tuple[tuple[RequestId, int, int], ...]
    preempted: tuple[Preemption, ...]
    swapped_in: tuple[RequestId, ...]
    too_long: tuple[RequestId, ...]
    deferred: tuple[RequestId, ...]
    # fork copies (the partial last block of a forked sequence), run first
    forks: CopyPlan = field(default_factory=lambda: CopyPlan("move"))
