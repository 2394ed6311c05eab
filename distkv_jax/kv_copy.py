"""Device-side execution of the control plane's copy plans (uses JAX).

KV pools follow DESIGN.md section 3: per layer ``[N, block_size, kv_heads,
head_dim]`` sharded ``P("inst", None, "tp", None)``, or stacked over layers
``[L, N, block_size, kv_heads, head_dim]`` sharded ``P(None, "inst", None,
"tp", None)``, with ``N = I * blocks_per_instance`` (global block ids). Any
pytree of such arrays (e.g. ``(k, v)``) is copied block-wise in one call. The
host tier has the same layout with ``N = I * host_blocks_per_instance`` and
memory kind ``pinned_host``.

How a batch of copies runs (``shard_map`` over the mesh): every instance
gathers the source blocks it owns, the gathered blocks are all-gathered over
``inst`` (traffic proportional to the moved blocks, not the pool), and every
instance scatters the blocks whose destination it owns. All sources are read
before any write, so one batch may rotate blocks along a cycle. No arithmetic
touches the data: bytes are copied exactly (also -0.0 and NaN payloads).

Batch sizes are padded to powers of two (each size compiles once per pool
structure); padding entries read block 0 and write nowhere (destination -1,
dropped). Move batches are never split (that would break read-before-write);
swap batches are split into chunks of at most ``max_swap_batch``.

Host pools: on CPU, a scatter straight into a ``pinned_host`` array is not
reliable across JAX versions, so swap functions bring the host pool into
device memory inside the jit (``jax.device_put(..., memory_kind="device")``),
update or read it there, and return host pools with ``pinned_host`` output
shardings. This round-trips the whole host pool per swap batch: correct and
simple, but costly for large host pools on accelerators (a future version can
use compute_on host or per-block DMA).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

INST = "inst"


def bucket_size(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def pad_pairs(src: Sequence[int], dst: Sequence[int], size: int | None = None):
    """Pad a copy batch to a bucket: padding reads block 0, writes to -1 (dropped)."""
    n = len(src)
    size = bucket_size(n) if size is None else size
    s = np.zeros(size, dtype=np.int32)
    d = np.full(size, -1, dtype=np.int32)
    s[:n] = np.asarray(src, dtype=np.int32)
    d[:n] = np.asarray(dst, dtype=np.int32)
    return s, d


def pool_spec(ndim: int) -> P:
    """Default pool sharding: stacked (5-D) or per-layer (4-D)."""
    if ndim == 5:
        return P(None, INST, None, "tp", None)
    if ndim == 4:
        return P(INST, None, "tp", None)
    raise ValueError(f"KV pool must be 4-D or 5-D, got {ndim}-D")


def _block_axis(ndim: int) -> int:
    return 1 if ndim == 5 else 0


def _copy_leaf(src_pool, dst_pool, src, dst):
    """Per-shard body: copy global blocks src[k] (in src_pool) -> dst[k]."""
    ax = _block_axis(src_pool.ndim)
    i = jax.lax.axis_index(INST)
    n_src = src_pool.shape[ax]
    n_dst = dst_pool.shape[ax]
    local_src = jnp.clip(src - i * n_src, 0, n_src - 1)
    vals = jnp.moveaxis(jnp.take(src_pool, local_src, axis=ax), ax, 0)  # [n, ...]
    everyone = jax.lax.all_gather(vals, INST, axis=0)  # [I, n, ...]
    owner = jnp.clip(src // n_src, 0, everyone.shape[0] - 1)
    picked = everyone[owner, jnp.arange(src.shape[0])]  # [n, ...]
    local_dst = dst - i * n_dst
    local_dst = jnp.where((dst >= 0) & (local_dst >= 0) & (local_dst < n_dst), local_dst, n_dst)
    idx = (slice(None),) * ax + (local_dst,)
    return dst_pool.at[idx].set(jnp.moveaxis(picked, 0, ax), mode="drop")


def _specs(leaves) -> tuple:
    out = []
    for x in leaves:
        sh = getattr(x, "sharding", None)
        out.append(sh.spec if isinstance(sh, NamedSharding) else pool_spec(x.ndim))
    return tuple(out)


class KVCopier:
    """Jitted block copies over KV pools on a mesh with axes ("inst", "tp").

    move(pools, pairs) -> pools           device -> device, pools donated
    swap_out(dev, host, pairs) -> host    device -> host, host pools donated
    swap_in(host, dev, pairs) -> dev      host -> device, device pools donated

    ``pools`` is any pytree of KV pool arrays (stacked 5-D or per-layer 4-D).
    ``pairs`` is a ``CopyPlan`` (its ``src``/``dst``) or a sequence of
    (src, dst) global block ids. Shardings are read from the arrays (a
    ``NamedSharding`` on this mesh; default ``pool_spec`` otherwise).
    ``compiles()`` counts compiled programs: one per (direction, pool
    structure, bucket size).
    """

    def __init__(self, mesh: Mesh, max_swap_batch: int = 64) -> None:
        if INST not in mesh.axis_names:
            raise ValueError(f"mesh needs an {INST!r} axis, has {mesh.axis_names}")
        self.mesh = mesh
        self.max_swap_batch = bucket_size(max_swap_batch)
        self._fns: dict = {}
        self.batches_run: set[tuple[str, int]] = set()  # (direction, padded batch size)

    def _shard_copy(self, src_leaves, dst_leaves, src, dst, src_specs, dst_specs):
        fn = jax.shard_map(
            lambda a, b, s, d: tuple(_copy_leaf(x, y, s, d) for x, y in zip(a, b)),
            mesh=self.mesh,
            in_specs=(src_specs, dst_specs, P(), P()),
            out_specs=dst_specs,
            check_vma=False,
        )
        return fn(tuple(src_leaves), tuple(dst_leaves), src, dst)

    def _get(self, direction: str, a_leaves, b_leaves):
        a_specs, b_specs = _specs(a_leaves), _specs(b_leaves)
        shapes = tuple((x.shape, str(x.dtype)) for x in (*a_leaves, *b_leaves))
        key = (direction, a_specs, b_specs, shapes)
        if key in self._fns:
            return self._fns[key]
        mesh = self.mesh
        if direction == "move":
            def impl(pools, src, dst):
                return self._shard_copy(pools, pools, src, dst, a_specs, a_specs)

            fn = jax.jit(impl, donate_argnums=0)
        elif direction == "out":  # a: device pools, b: host pools
            on_dev = tuple(NamedSharding(mesh, s, memory_kind="device") for s in b_specs)
            host_sh = tuple(NamedSharding(mesh, s, memory_kind="pinned_host") for s in b_specs)

            def impl(dev, host, src, dst):
                host = tuple(jax.device_put(h, sh) for h, sh in zip(host, on_dev))
                return self._shard_copy(dev, host, src, dst, a_specs, b_specs)

            fn = jax.jit(impl, out_shardings=host_sh, donate_argnums=1)
        else:  # "in"; a: host pools, b: device pools
            on_dev = tuple(NamedSharding(mesh, s, memory_kind="device") for s in a_specs)
            dev_sh = tuple(NamedSharding(mesh, s) for s in b_specs)

            def impl(host, dev, src, dst):
                host = tuple(jax.device_put(h, sh) for h, sh in zip(host, on_dev))
                return self._shard_copy(host, dev, src, dst, a_specs, b_specs)

            fn = jax.jit(impl, out_shardings=dev_sh, donate_argnums=1)
        self._fns[key] = fn
        return fn

    @staticmethod
    def _pairs(pairs):
        if hasattr(pairs, "src") and hasattr(pairs, "dst"):
            return list(pairs.src), list(pairs.dst)
        pairs = list(pairs)
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def move(self, pools: Any, pairs) -> Any:
        """Execute device -> device block moves as one batch (never split)."""
        src, dst = self._pairs(pairs)
        if not src:
            return pools
        leaves, tree = jax.tree_util.tree_flatten(pools)
        fn = self._get("move", leaves, leaves)
        s, d = pad_pairs(src, dst)
        self.batches_run.add(("move", len(s)))
        out = fn(tuple(leaves), jnp.asarray(s), jnp.asarray(d))
        return jax.tree_util.tree_unflatten(tree, list(out))

    def swap_out(self, dev_pools: Any, host_pools: Any, pairs) -> Any:
        """Copy device blocks into the host pools; returns the new host pools."""
        return self._swap("out", dev_pools, host_pools, pairs)

    def swap_in(self, host_pools: Any, dev_pools: Any, pairs) -> Any:
        """Copy host blocks into the device pools; returns the new device pools."""
        return self._swap("in", host_pools, dev_pools, pairs)

    def _swap(self, direction, a_pools, b_pools, pairs):
        src, dst = self._pairs(pairs)
        if not src:
            return b_pools
        a_leaves = tuple(jax.tree_util.tree_leaves(a_pools))
        b_leaves, b_tree = jax.tree_util.tree_flatten(b_pools)
        fn = self._get(direction, a_leaves, b_leaves)
        out = tuple(b_leaves)
        step = self.max_swap_batch
        for k in range(0, len(src), step):
            s, d = pad_pairs(src[k : k + step], dst[k : k + step])
            self.batches_run.add((direction, len(s)))
            out = fn(a_leaves, out, jnp.asarray(s), jnp.asarray(d))
        return jax.tree_util.tree_unflatten(b_tree, list(out))

    def compiles(self) -> int:
        return sum(f._cache_size() for f in self._fns.values())

    def lower(self, direction: str, a_pools: Any, b_pools: Any, size: int,
              platform: str | None = None):
        """The copy program of `direction` ("move", "out", "in") for batches
        of `size`, lowered (for `platform`, e.g. "cuda", when given): what the
        copies compile to, inspectable without running them. For "move",
        b_pools is ignored."""
        a_leaves = tuple(jax.tree_util.tree_leaves(a_pools))
        b_leaves = a_leaves if direction == "move" else tuple(jax.tree_util.tree_leaves(b_pools))
        fn = self._get(direction, a_leaves, b_leaves)
        s, d = pad_pairs([], [], size)
        args = (a_leaves, jnp.asarray(s), jnp.asarray(d)) if direction == "move" else (
            a_leaves, b_leaves, jnp.asarray(s), jnp.asarray(d))
        traced = fn.trace(*args)
        return traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()


def make_pool(mesh: Mesh, shape, dtype=jnp.float32, host: bool = False, fill=None):
    """A zero (or ``fill``) KV pool with the standard sharding (tests, demos)."""
    spec = pool_spec(len(shape))
    sh = NamedSharding(mesh, spec, memory_kind="pinned_host" if host else None)
    x = jnp.zeros(shape, dtype) if fill is None else jnp.asarray(fill, dtype)
    return jax.device_put(x, sh)
