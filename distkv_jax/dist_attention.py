"""DistAttention: attention computed where the KV lives.

One `jax.shard_map` over ("inst", "tp"). Every instance brings the q, k, v of
its own batch rows ([I, T, ...], sharded over inst; heads over tp). Per layer:

 (a) KV write. The new tokens' k, v are all-gathered over `inst` (T rows per
     instance: small) and each device scatters the rows whose slot lies in a
     block it holds, so a token can land in a block borrowed from another
     instance.
 (b) Query exchange. q is all-gathered over `inst`: queries are small, KV
     never moves.
 (c) MicroAttention. Each device runs its own work list (query tile x local
     block items, from the control plane's plan) and gets a partial (o, lse)
     per query row (lse = -inf where it holds none of that row's KV).
 (c') Host-attended KV. Blocks in an instance's host pool (pinned_host
     memory) are attended by the host CPU in place (`compute_on("device_host")`
     around the native MicroAttention over the host work list): the queries go
     to the host and one (o, lse) per tile comes back, bytes independent of
     the context. It is merged with the device partial by the same formula.
 (d) ScaleReduce. One all_to_all over `inst` sends each row's partials to the
     row's owner, which merges them exactly (logsumexp weights, -inf guarded).
     Why all_to_all: each device sends (I-1)/I of its [I*T, H, D+1]
     partials once. An all_gather of (o, lse) would send I times that, and
     pmax + psum_scatter needs two collectives for the same bytes.

Bytes between instances per layer and step (per tp shard, 4-byte floats):
  (a) I * (I-1) * T * Hkv * D * 2 * itemsize   (b) I * (I-1) * T * Hq * D * itemsize
  (d) (I-1) * I * T * Hq * (D + 1) * 4
independent of the context length; moving the KV instead costs the remote
blocks' bytes, which grow with the context (see `bench attention`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on
from jax.sharding import Mesh, PartitionSpec as P

from .attention_plan import AttentionPlan
from .kernels.micro_attention import merge_axis, micro_attention, resolve_impl
from .kv_pool import PagedKVCache, PoolLayout
from .mesh import INST, TP
from .models.attention import AttentionFn, LayerCache


class DistMeta(NamedTuple):
    """The device form of an AttentionPlan (same fields, jax arrays), plus
    the host pools when the plan has host work (None otherwise: a step
    without host-attended KV is a program without the host part)."""

    slots: jax.Array
    positions: jax.Array
    tile_rows: jax.Array
    item_tile: jax.Array
    item_block: jax.Array
    item_kstart: jax.Array
    host_item_tile: Any = None
    host_item_block: Any = None
    host_item_kstart: Any = None
    host_k: Any = None           # [L, I * host_blocks, ...] pinned_host, read only
    host_v: Any = None

    @classmethod
    def from_plan(cls, plan: AttentionPlan, host_pools=None) -> "DistMeta":
        # numpy leaves: jit transfers them in its C++ argument path, far cheaper
        # per step than one jnp.asarray (a dispatched device_put) per field
        arrays = [getattr(plan, f.name) for f in dataclasses.fields(plan)]
        meta = cls(*(None if a is None else np.asarray(a) for a in arrays))
        if plan.has_host_work:
            if host_pools is None:
                raise ValueError("the plan attends host blocks but no host pools were given")
            meta = meta._replace(host_k=host_pools[0], host_v=host_pools[1])
        return meta

    @property
    def has_host_work(self) -> bool:
        return self.host_item_tile is not None


@dataclasses.dataclass(frozen=True)
class DistAttentionConfig:
    layout: PoolLayout
    num_heads: int
    scale: float
    impl: str = "auto"            # MicroAttention: auto | native | reference | pallas
    interpret: bool = False       # Pallas interpret mode (CPU)
    # MicroAttention over host-attended blocks, run by the host CPU
    host_impl: str = "auto"       # resolved for the "cpu" platform


def _host_partials(cfg: DistAttentionConfig, q_tiles, q_pos, hk_pool, hv_pool, item_tile,
                   item_block, item_kstart, layer, kv_offset, run):
    """(o, lse) per tile over this instance's host-pool blocks, computed on
    the host over host memory: the pool is never copied to the device."""
    impl = resolve_impl(cfg.host_impl, "cpu")

    def host_fn(q_tiles, q_pos, hk_pool, hv_pool, item_tile, item_block, item_kstart, layer,
                kv_offset):
        num_layers, nb, bs, heads, head_dim = hk_pool.shape
        k_pages = hk_pool.reshape(num_layers * nb, bs, heads, head_dim)
        v_pages = hv_pool.reshape(num_layers * nb, bs, heads, head_dim)
        return micro_attention(q_tiles, q_pos, k_pages, v_pages, item_tile, item_block + layer * nb,
                               item_kstart, scale=cfg.scale, run=run, kv_head_offset=kv_offset,
                               impl=impl)

    fn = compute_on("device_host")(jax.jit(host_fn))
    return fn(q_tiles, q_pos, hk_pool, hv_pool, item_tile, item_block, item_kstart,
              jnp.asarray(layer, jnp.int32), jnp.asarray(kv_offset, jnp.int32))


def _write(pool, index, values):
    """pool.at[index].set(values), dropping out-of-range indices. A pool of
    bfloat16 bits (uint16, see kv_pool.storage_dtype) gets the values' bits;
    a 16-bit float pool is written through its bits too: XLA:CPU has no
    bfloat16 scatter and otherwise converts the whole pool to float32 and
    back around it, every layer of every step."""
    if pool.dtype == jnp.uint16:
        bits = jax.lax.bitcast_convert_type(values.astype(jnp.bfloat16), jnp.uint16)
        return pool.at[index].set(bits, mode="drop")
    values = values.astype(pool.dtype)
    if pool.dtype.itemsize != 2 or not jnp.issubdtype(pool.dtype, jnp.floating):
        return pool.at[index].set(values, mode="drop")
    bits = jax.lax.bitcast_convert_type(pool, jnp.uint16)
    bits = bits.at[index].set(jax.lax.bitcast_convert_type(values, jnp.uint16), mode="drop")
    return jax.lax.bitcast_convert_type(bits, pool.dtype)


def _local_body(cfg: DistAttentionConfig):
    lay = cfg.layout
    heads_local = cfg.num_heads // lay.tp
    groups = cfg.num_heads // lay.num_kv_heads

    def body(q, k, v, k_pool, v_pool, layer, slots, positions, tile_rows,
             item_tile, item_block, item_kstart, *host):
        inst = jax.lax.axis_index(INST)
        num_layers, nb, bs, stored_heads, head_dim = k_pool.shape
        pages = num_layers * nb

        # (a) write every instance's new tokens into the blocks this device
        # holds. The scatter goes into the pool as stored ([L, N, ...]) and the
        # kernel reads a flattened view of the result: had the write gone
        # through the flat view, the pool returned would be a reshape of a
        # reshape, which XLA lays out anew when a dimension is 1 (one KV head
        # per device: kv_heads == tp) and then copies the whole pool, twice,
        # every step.
        k_new = jax.lax.all_gather(k[0], INST, tiled=True)        # [I*T, stored_heads, D]
        v_new = jax.lax.all_gather(v[0], INST, tiled=True)
        local = slots - inst * (nb * bs)
        mine = (slots >= 0) & (local >= 0) & (local < nb * bs)
        block = jnp.where(mine, local // bs, nb)                   # out of range: dropped
        k_pool = _write(k_pool, (layer, block, local % bs), k_new)
        v_pool = _write(v_pool, (layer, block, local % bs), v_new)
        k_pages = k_pool.reshape(pages, bs, stored_heads, head_dim)
        v_pages = v_pool.reshape(pages, bs, stored_heads, head_dim)

        # (b) every instance's queries
        q_all = jax.lax.all_gather(q[0], INST, tiled=True)        # [I*T, heads_local, D]
        rows = q_all.shape[0]

        # (c) MicroAttention over the local work list
        if lay.kv_sharded:
            kv_local, g_local, kv_offset = stored_heads, groups, 0
        else:  # KV replicated over tp: this shard's query heads share one KV head
            kv_local, g_local = 1, heads_local
            kv_offset = (jax.lax.axis_index(TP) * heads_local) // groups
        safe_rows = jnp.maximum(tile_rows, 0)
        n_tiles, q_tile = tile_rows.shape
        q_tiles = q_all[safe_rows].reshape(n_tiles, q_tile, kv_local, g_local, head_dim)
        q_pos = jnp.where(tile_rows >= 0, positions[safe_rows], -1)
        run = item_tile.shape[-1]
        o_t, lse_t = micro_attention(
            q_tiles, q_pos, k_pages, v_pages, item_tile[0].reshape(-1),
            item_block[0].reshape(-1) + layer * nb, item_kstart[0].reshape(-1), scale=cfg.scale,
            run=run, kv_head_offset=kv_offset, impl=cfg.impl, interpret=cfg.interpret)
        if host:  # (c') the host's partial over its host-attended blocks, merged exactly
            h_tile, h_block, h_kstart, hk_pool, hv_pool = host
            o_h, lse_h = _host_partials(cfg, q_tiles, q_pos, hk_pool, hv_pool,
                                        h_tile[0].reshape(-1), h_block[0].reshape(-1),
                                        h_kstart[0].reshape(-1), layer, kv_offset,
                                        h_tile.shape[-1])
            o_t, lse_t = merge_axis(jnp.stack([o_t.astype(jnp.float32), o_h.astype(jnp.float32)]),
                                    jnp.stack([lse_t, lse_h]), axis=0)
        dest = jnp.where(tile_rows >= 0, tile_rows, rows).reshape(-1)
        # Tile results to rows by a gather through the inverse map (row -> its
        # slot in the tiles; a row in no tile gets o = 0, lse = -inf): one
        # pass. Scattering into zero-filled rows made XLA:CPU first copy a
        # broadcast of zeros (~10% of a 55M bfloat16 prefill pass).
        src = jnp.full(rows + 1, -1, jnp.int32).at[dest].set(
            jnp.arange(dest.shape[0], dtype=jnp.int32))[:rows]
        hit = src >= 0
        safe = jnp.maximum(src, 0)
        o_rows = jnp.where(hit[:, None, None], o_t.reshape(-1, heads_local, head_dim)[safe], 0.0)
        lse_rows = jnp.where(hit[:, None], lse_t.reshape(-1, heads_local)[safe], -jnp.inf)

        # (d) ScaleReduce: partials to the rows' owners, one all_to_all, exact merge
        num_inst = rows // q.shape[1]
        packed = jnp.concatenate([o_rows, lse_rows[..., None]], axis=-1)
        packed = packed.reshape(num_inst, q.shape[1], heads_local, head_dim + 1)
        recv = jax.lax.all_to_all(packed, INST, split_axis=0, concat_axis=0, tiled=True)
        out, _ = merge_axis(recv[..., :head_dim], recv[..., head_dim], axis=0)
        return out[None].astype(q.dtype), k_pool, v_pool

    return body


def dist_attention(q, k, v, k_pool, v_pool, layer, meta: DistMeta, *, mesh: Mesh,
                   cfg: DistAttentionConfig):
    """q [I, T, Hq, D], k/v [I, T, Hkv, D] -> (out [I, T, Hq, D], k_pool, v_pool)."""
    kv_spec = TP if cfg.layout.kv_sharded else None
    rows_spec = P(INST, None, TP, None)
    kv_rows_spec = P(INST, None, kv_spec, None)
    pool_spec = cfg.layout.spec
    rep = P()
    work = P(INST, None, None)
    body = _local_body(cfg)
    if isinstance(layer, int):  # unrolled layers: a static layer index (static slices)
        layer_args, layer_specs = (), ()

        def local(q, k, v, k_pool, v_pool, *rest):
            return body(q, k, v, k_pool, v_pool, layer, *rest)
    else:
        layer_args, layer_specs = (jnp.asarray(layer, jnp.int32),), (rep,)
        local = body

    host_args, host_specs = (), ()
    if meta.has_host_work:
        host_args = (meta.host_item_tile, meta.host_item_block, meta.host_item_kstart,
                     meta.host_k, meta.host_v)
        host_specs = (work, work, work, pool_spec, pool_spec)
    fn = jax.shard_map(
        local, mesh=mesh,
        in_specs=(rows_spec, kv_rows_spec, kv_rows_spec, pool_spec, pool_spec) + layer_specs
        + (rep, rep, rep, work, work, work) + host_specs,
        out_specs=(rows_spec, pool_spec, pool_spec),
        check_vma=False,
    )
    return fn(q, k, v, k_pool, v_pool, *layer_args, meta.slots, meta.positions,
              meta.tile_rows, meta.item_tile, meta.item_block, meta.item_kstart, *host_args)


def make_dist_attention(mesh: Mesh, cfg: DistAttentionConfig) -> AttentionFn:
    """The model's attention boundary backed by the paged, distributed pool."""

    def attention_fn(q, k, v, handle: LayerCache, meta: DistMeta):
        pools, layer = handle
        out, k_pool, v_pool = dist_attention(q, k, v, pools.k, pools.v, layer, meta,
                                             mesh=mesh, cfg=cfg)
        return out, PagedKVCache(k_pool, v_pool)

    return attention_fn


def step_traffic_bytes(cfg: DistAttentionConfig, rows_per_instance: int, itemsize: int) -> dict:
    """Bytes sent between instances by one layer of one step, from the
    collectives' payload shapes (summed over tp shards; a device's send to
    itself is not counted)."""
    lay = cfg.layout
    pairs = lay.num_instances * (lay.num_instances - 1)
    kv_heads_sent = lay.num_kv_heads if lay.kv_sharded else lay.num_kv_heads * lay.tp
    rows = pairs * rows_per_instance
    return {
        "kv_write_all_gather": rows * kv_heads_sent * lay.head_dim * 2 * itemsize,
        "query_all_gather": rows * cfg.num_heads * lay.head_dim * itemsize,
        "partials_all_to_all": rows * cfg.num_heads * (lay.head_dim + 1) * 4,
    }
