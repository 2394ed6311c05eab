"""DistAttention over simulated CPU meshes against float64 dense attention,
for random block placements drawn by hypothesis."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from distkv_jax.attention_plan import PoolGeometry, SeqQuery, build_attention_plan
from distkv_jax.dist_attention import DistAttentionConfig, DistMeta, dist_attention
from distkv_jax.kv_pool import PoolLayout
from distkv_jax.mesh import MeshShape, make_mesh

from attention_reference import dense_attention_f64

ROWS = 16          # query rows per instance
BLOCKS = 12        # blocks per instance
HOST_BLOCKS = 10   # host-pool blocks per instance (host-attended cases)
LAYERS = 2
HEAD_DIM = 8


@functools.lru_cache(maxsize=None)
def _setup(mesh_str, num_heads, num_kv, block_size, impl="reference"):
    mesh = make_mesh(mesh_str)
    shape = MeshShape.parse(mesh_str)
    layout = PoolLayout(LAYERS, shape.inst, BLOCKS, block_size, num_kv, HEAD_DIM, shape.tp)
    cfg = DistAttentionConfig(layout, num_heads, 1 / math.sqrt(HEAD_DIM), impl=impl,
                              interpret=impl == "pallas")
    fn = jax.jit(functools.partial(dist_attention, mesh=mesh, cfg=cfg), donate_argnums=(3, 4))
    return mesh, layout, fn


def run_case(mesh_str, num_heads, num_kv, block_size, seqs, placements, q_tile, seed,
             impl="reference", layer=1, run=None, host=False):
    """seqs: list of (owner instance, context length, new tokens); placements:
    per sequence, the instance of each logical block (cycled if short).
    host=True: a placement p with (p // 8) odd puts a full context block in
    the host pool of instance p % I (host-attended KV)."""
    mesh, layout, fn = _setup(mesh_str, num_heads, num_kv, block_size, impl)
    I, bs = layout.num_instances, block_size
    rng = np.random.default_rng(seed)
    k_pool = rng.standard_normal(layout.shape).astype(np.float32)  # junk outside written slots
    v_pool = rng.standard_normal(layout.shape).astype(np.float32)
    HB = HOST_BLOCKS if host else 0
    host_shape = (LAYERS, I * HB) + layout.shape[2:]
    hk_pool = rng.standard_normal(host_shape).astype(np.float32)
    hv_pool = rng.standard_normal(host_shape).astype(np.float32)
    host_free = [list(range(i * HB, (i + 1) * HB)) for i in range(I)]
    q = rng.standard_normal((I, ROWS, num_heads, HEAD_DIM)).astype(np.float32)
    k_new = rng.standard_normal((I, ROWS, num_kv, HEAD_DIM)).astype(np.float32)
    v_new = rng.standard_normal((I, ROWS, num_kv, HEAD_DIM)).astype(np.float32)

    free = [list(range(i * BLOCKS, (i + 1) * BLOCKS)) for i in range(I)]
    next_row = [0] * I
    queries, expected = [], []
    for (owner, ctx, new), where in zip(seqs, placements):
        owner %= I
        total = ctx + new
        if next_row[owner] + new > ROWS or sum(map(len, free)) < -(-total // bs):
            continue  # no room for this sequence in this small pool
        table = []
        for lb in range(-(-total // bs)):
            p = where[lb % len(where)]
            inst = p % I
            if host and (p // 8) % 2 and lb < ctx // bs and host_free[inst]:
                table.append(I * BLOCKS + host_free[inst].pop(0))
                continue
            if not free[inst]:  # instance full: take the next one with room
                inst = next(j for j in range(I) if free[j])
            table.append(free[inst].pop(0))
        table = np.array(table)
        pos = np.arange(total)
        slots = table[pos // bs] * bs + pos % bs
        keys = np.empty((total, num_kv, HEAD_DIM), np.float32)
        vals = np.empty_like(keys)
        both_k = np.concatenate([k_pool[layer], hk_pool[layer]]).reshape(-1, num_kv, HEAD_DIM)
        both_v = np.concatenate([v_pool[layer], hv_pool[layer]]).reshape(-1, num_kv, HEAD_DIM)
        keys[:ctx] = both_k[slots[:ctx]]
        vals[:ctx] = both_v[slots[:ctx]]
        row = next_row[owner]
        next_row[owner] += new
        keys[ctx:] = k_new[owner, row:row + new]
        vals[ctx:] = v_new[owner, row:row + new]
        ref = dense_attention_f64(q[owner, row:row + new], keys, vals, pos[ctx:], 1 / math.sqrt(HEAD_DIM))
        queries.append(SeqQuery(owner, row, range(ctx, total), table))
        expected.append((owner, row, new, ref, slots[ctx:], keys[ctx:], vals[ctx:]))

    plan = build_attention_plan(queries, PoolGeometry(I, BLOCKS, bs, HB), ROWS, q_tile=q_tile,
                                run=run)
    pool_sh = NamedSharding(mesh, layout.spec)
    host_sh = NamedSharding(mesh, layout.spec, memory_kind="pinned_host")
    row_sh = NamedSharding(mesh, P("inst"))
    host_pools = (jax.device_put(hk_pool, host_sh), jax.device_put(hv_pool, host_sh)) if host \
        else None
    out, k_out, v_out = fn(jax.device_put(q, row_sh), jax.device_put(k_new, row_sh),
                           jax.device_put(v_new, row_sh), jax.device_put(k_pool, pool_sh),
                           jax.device_put(v_pool, pool_sh), layer,
                           DistMeta.from_plan(plan, host_pools))
    out, k_out, v_out = np.asarray(out), np.asarray(k_out), np.asarray(v_out)
    err = 0.0
    for owner, row, new, ref, slots, keys, vals in expected:
        err = max(err, float(np.abs(out[owner, row:row + new] - ref).max()))
        # the new tokens' KV landed in their slots (possibly on another instance)
        np.testing.assert_array_equal(k_out[layer].reshape(-1, num_kv, HEAD_DIM)[slots], keys)
        np.testing.assert_array_equal(v_out[layer].reshape(-1, num_kv, HEAD_DIM)[slots], vals)
    # other layers untouched
    np.testing.assert_array_equal(k_out[1 - layer], k_pool[1 - layer])
    return err, plan


MESHES = ["1x1", "2x4", "4x2", "8x1"]
HEADS = [(4, 2), (4, 4)]  # GQA, MHA

seq_strategy = st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 40), st.integers(1, 6)), min_size=1, max_size=4)


@pytest.mark.parametrize("mesh_str", MESHES)
@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seqs=seq_strategy,
       placements=st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=8), min_size=4, max_size=4),
       heads=st.sampled_from(HEADS), block_size=st.sampled_from([8, 16]),
       decode=st.booleans(), run=st.sampled_from([None, 1, 2, 8]), seed=st.integers(0, 2**16))
def test_dist_attention_matches_dense(mesh_str, seqs, placements, heads, block_size, decode, run,
                                      seed):
    if decode:
        seqs = [(o, c, 1) for o, c, _ in seqs]
    err, _ = run_case(mesh_str, heads[0], heads[1], block_size, seqs, placements,
                      q_tile=1 if decode else 4, seed=seed, run=run)
    assert err <= 1e-5


@pytest.mark.parametrize("mesh_str", ["8x1", "2x4"])
def test_sequences_with_no_blocks_on_most_devices(mesh_str):
    """All of one sequence on instance 0, another wholly remote, a third spread."""
    seqs = [(0, 37, 1), (1, 21, 3), (0, 50, 2)]
    placements = [[0], [0 if mesh_str == "2x4" else 5], [0, 1, 2, 3, 4, 5, 6, 7]]
    err, plan = run_case(mesh_str, 4, 2, 8, seqs, placements, q_tile=2, seed=1)
    assert err <= 1e-5
    assert (plan.items_per_instance() == 0).any() or mesh_str == "2x4"


def test_pallas_inside_dist_attention():
    err, _ = run_case("2x4", 4, 2, 8, [(0, 19, 1), (1, 30, 4)], [[1, 0], [0, 1, 0]],
                      q_tile=4, seed=5, impl="pallas", run=2)
    assert err <= 1e-5


@pytest.mark.parametrize("mesh_str", ["8x1", "2x4"])
def test_native_kernel_inside_dist_attention(mesh_str):
    """The C++ kernel per device under shard_map; on 2x4 the KV heads are
    replicated over tp and each shard picks its head by a traced offset."""
    err, _ = run_case(mesh_str, 4, 2, 8, [(0, 19, 1), (1, 30, 4), (0, 77, 1)],
                      [[1, 0], [0, 1, 0], [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]],
                      q_tile=4, seed=6, impl="native", run=2)
    assert err <= 1e-5


@pytest.mark.parametrize("mesh_str", ["1x1", "2x4", "8x1"])
@pytest.mark.parametrize("impl", ["native", "reference"])
def test_host_attended_blocks(mesh_str, impl):
    """Context blocks in the instances' host pools (pinned_host) are attended
    by the host CPU in place and merged with the device partials: equal to
    dense attention, decode and prefill tiles, at least half of the context
    on the host."""
    seqs = [(0, 70, 1), (1, 45, 3), (0, 33, 4), (1, 60, 1)]
    placements = [[8, 9, 1, 10, 11, 0], [9, 8, 0], [10, 1, 12], [8, 9, 10, 2]]
    for q_tile, seed in ((1, 3), (4, 4)):
        cases = [(o, c, 1 if q_tile == 1 else n) for o, c, n in seqs]
        err, plan = run_case(mesh_str, 4, 2, 8, cases, placements, q_tile=q_tile, seed=seed,
                             impl=impl, host=True)
        assert err <= 1e-5
        assert plan.has_host_work
        assert plan.host_items_per_instance().sum() >= plan.items_per_instance().sum() // 2


def test_host_blocks_are_never_written():
    geom = PoolGeometry(2, 4, 8, 4)
    with pytest.raises(ValueError, match="must go to device blocks"):
        build_attention_plan([SeqQuery(0, 0, [8], [0, 9])], geom, 4)


def test_plan_work_is_proportional_to_blocks():
    """Items per instance count exactly the blocks each instance holds for each
    tile: no [batch, max_blocks] padding."""
    geom = PoolGeometry(4, 100, 16)
    long = SeqQuery(0, 0, [999], list(range(0, 63)))             # 63 blocks, all on instance 0
    short = SeqQuery(1, 0, [5], [150])                            # 1 block on instance 1
    spread = SeqQuery(2, 0, [40], [200, 300, 10])                 # instances 2, 3, 0
    plan = build_attention_plan([long, short, spread], geom, 4, run=1)
    assert plan.items_per_instance().tolist() == [64, 1, 1, 1]
    assert plan.item_tile.shape == (4, 128, 1)  # R: power-of-four buckets 8, 32, 128
    # Automatic run length: runs of 4 (instance 0: 16 runs of the long
    # sequence + 1 padded run of the other; R bucketed to 32).
    plan = build_attention_plan([long, short, spread], geom, 4)
    assert plan.run == 4 and plan.item_tile.shape == (4, 32, 4)
    assert plan.items_per_instance().tolist() == [64, 1, 1, 1]
    # every run holds one tile
    tiles = plan.item_tile
    assert (tiles == tiles[:, :, :1]).all()
    with pytest.raises(ValueError, match="needs 63"):
        build_attention_plan([SeqQuery(0, 0, [999], [0])], geom, 4)
    with pytest.raises(ValueError, match="exceed 4 rows"):
        build_attention_plan([SeqQuery(0, 2, [1, 2, 3], [0])], geom, 4)


def test_decode_plan_equals_the_per_sequence_loop(monkeypatch):
    """Decode steps (one query per sequence) build their rows and items
    vectorized over the sequences: the plan is identical, array for array,
    to the per-sequence loop's (random tables with host blocks, instances,
    rows, run lengths), and invalid sequences get the loop's errors."""
    from distkv_jax import attention_plan as ap

    rng = np.random.default_rng(7)
    geom = PoolGeometry(4, 50, 16, 10)
    for trial in range(40):
        n = int(rng.integers(1, 24))
        slots = rng.permutation(4 * 8)[:n]  # distinct (instance, row) pairs, 8 rows each
        seqs = []
        for k in range(n):
            pos = int(rng.integers(0, 700))
            need = pos // 16 + 1
            table = rng.integers(0, 4 * 60, size=need + int(rng.integers(0, 3))).tolist()
            table[need - 1] = int(rng.integers(0, 200))  # the written block: on a device
            seqs.append(SeqQuery(int(slots[k] // 8), int(slots[k] % 8), range(pos, pos + 1), table))
        assert ap._decode_rows(seqs, 4, 50, 10, 16, 8) is not None  # the vectorized path
        fast = build_attention_plan(seqs, geom, 8, run=None if trial % 2 else 4)
        with monkeypatch.context() as m:
            m.setattr(ap, "_decode_rows", lambda *a: None)
            slow = build_attention_plan(seqs, geom, 8, run=None if trial % 2 else 4)
        for f in dataclasses.fields(slow):
            a, b = getattr(fast, f.name), getattr(slow, f.name)
            if isinstance(b, np.ndarray):
                assert a.dtype == b.dtype and np.array_equal(a, b), f.name
            else:
                assert a == b, f.name
    with pytest.raises(ValueError, match="overlap"):
        build_attention_plan([SeqQuery(0, 1, [3], [0]), SeqQuery(0, 1, [5], [1])], geom, 8)
    with pytest.raises(ValueError, match="needs 2"):
        build_attention_plan([SeqQuery(0, 0, [3], [0]), SeqQuery(1, 0, [20], [1])], geom, 8)
    with pytest.raises(ValueError, match="must go to device blocks"):
        build_attention_plan([SeqQuery(0, 0, [3], [0]), SeqQuery(1, 0, [3], [210])], geom, 8)
    with pytest.raises(ValueError, match="outside"):
        build_attention_plan([SeqQuery(5, 0, [3], [0])], geom, 8)


def test_host_pool_stays_in_host_memory():
    """The step reads the host pools where they are. Lowered for CUDA (where
    host and device memory differ; on a CPU both are the same RAM and XLA
    elides any move), the host pools enter as pinned_host arrays, nothing
    places them in device memory, and the MicroAttention that reads them is
    a host computation."""
    mesh, layout, fn = _setup("2x4", 4, 2, 8)
    I, bs = layout.num_instances, 8
    geom = PoolGeometry(I, BLOCKS, bs, HOST_BLOCKS)
    table = [I * BLOCKS + 0, I * BLOCKS + 1, 2]  # two host blocks, the written one on device
    plan = build_attention_plan([SeqQuery(0, 0, [17], table)], geom, ROWS)
    host_sh = NamedSharding(mesh, layout.spec, memory_kind="pinned_host")
    host_shape = (LAYERS, I * HOST_BLOCKS) + layout.shape[2:]
    host = tuple(jax.device_put(np.zeros(host_shape, np.float32), host_sh) for _ in range(2))
    pool_sh = NamedSharding(mesh, layout.spec)
    row_sh = NamedSharding(mesh, P("inst"))
    q = jax.device_put(np.zeros((I, ROWS, 4, HEAD_DIM), np.float32), row_sh)
    kv = jax.device_put(np.zeros((I, ROWS, 2, HEAD_DIM), np.float32), row_sh)
    pools = [jax.device_put(np.zeros(layout.shape, np.float32), pool_sh) for _ in range(2)]
    text = fn.trace(q, kv, kv, *pools, 1, DistMeta.from_plan(plan, host)).lower(
        lowering_platforms=("cuda",)).as_text()
    main = next(line for line in text.splitlines() if "func.func public @main" in line)
    assert main.count('mhlo.memory_kind = "pinned_host"') >= 2, main  # both host pools
    assert "annotate_device_placement" not in text  # nothing moves them to device memory
    calls = [line for line in text.splitlines() if "distkv_micro_attention" in line]
    assert calls and all('_xla_compute_type = "host"' in line for line in calls), calls
