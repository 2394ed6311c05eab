"""A model forward on the distributed paged pool equals the dense model forward,
for chunked prefill followed by decode steps, with blocks scattered over
instances."""

import numpy as np
import pytest

from distkv_jax.attention_plan import PoolGeometry, SeqQuery, build_attention_plan
from distkv_jax.dist_attention import DistMeta
from distkv_jax.kv_pool import create_kv_pool
from distkv_jax.mesh import make_mesh
from distkv_jax.models.loader import load_params
from distkv_jax.models.reference import forward_logits
from distkv_jax.models.tiny import make_tiny_model
from distkv_jax.paged_model import make_paged_forward, pool_layout

BLOCK = 8
BLOCKS_PER_INSTANCE = 16
ROWS = 24   # rows per instance per step
CHUNK = 8   # prefill chunk per sequence per step


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("mesh_str", ["1x1", "2x4", "4x2"])
def test_paged_forward_matches_dense(tiny, mesh_str):
    mesh = make_mesh(mesh_str)
    cfg, params = load_params(tiny, mesh)
    num_inst = mesh.shape["inst"]
    layout = pool_layout(cfg, mesh, BLOCKS_PER_INSTANCE, BLOCK)
    forward = make_paged_forward(cfg, mesh, layout)
    pools = create_kv_pool(mesh, layout)

    rng = np.random.default_rng(0)
    # (owner instance, prompt length, decode steps); full token streams are
    # fixed in advance (teacher forcing) so every position has a dense reference.
    specs = [(0, 21, 4), (1 % num_inst, 13, 5), (0, 30, 3)]
    streams = [rng.integers(3, cfg.vocab_size, size=p + d) for _, p, d in specs]
    # Blocks scattered round-robin over instances, starting away from the owner.
    free = [list(range(i * BLOCKS_PER_INSTANCE, (i + 1) * BLOCKS_PER_INSTANCE)) for i in range(num_inst)]
    tables = []
    for n, ((owner, p, d), s) in enumerate(zip(specs, streams)):
        nblocks = -(-len(s) // BLOCK)
        tables.append([free[(owner + 1 + n + b) % num_inst].pop(0) for b in range(nblocks)])
    dense = [np.asarray(forward_logits(cfg, params, s[None]))[0] for s in streams]

    done = [0] * len(specs)      # tokens already in the cache
    geom = PoolGeometry(num_inst, BLOCKS_PER_INSTANCE, BLOCK)
    worst, steps = 0.0, 0
    while any(done[n] < len(s) for n, s in enumerate(streams)):
        tokens = np.zeros((num_inst, ROWS), np.int32)
        queries, next_row, rows_of = [], [0] * num_inst, []
        prefill = any(done[n] < p for n, (_, p, _) in enumerate(specs))
        for n, ((owner, p, _), s) in enumerate(zip(specs, streams)):
            if done[n] >= len(s):
                continue
            count = min(CHUNK, p - done[n]) if done[n] < p else 1
            row = next_row[owner]
            next_row[owner] += count
            tokens[owner, row:row + count] = s[done[n]:done[n] + count]
            queries.append(SeqQuery(owner, row, range(done[n], done[n] + count), tables[n]))
            rows_of.append((n, owner, row, count, done[n]))
            done[n] += count
        plan = build_attention_plan(queries, geom, ROWS, q_tile=4 if prefill else 1)
        positions = np.maximum(plan.positions, 0).reshape(num_inst, ROWS)
        logits, pools = forward(params, tokens, positions, pools, DistMeta.from_plan(plan))
        logits = np.asarray(logits)
        for n, owner, row, count, start in rows_of:
            ref = dense[n][start:start + count]
            worst = max(worst, float(np.abs(logits[owner, row:row + count] - ref).max()))
        steps += 1
    assert steps >= 7  # 4 prefill chunks of the longest prompt, then decode steps
    assert worst <= 1e-4, worst
