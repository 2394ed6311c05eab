"""The KV pool is updated in place on every mesh: the compiled step holds no
copy of the pool and its temporary memory does not grow with the pool.

Checked on the compiled program rather than by timing: XLA copied the whole
pool twice per step when a device held one KV head (kv_heads == tp: the tiny
model on 1x2 and 2x2), because the pool came back through a reshape of a
reshape that XLA laid out anew; step time then grew with kv_blocks (`bench
pool`: 14.6x at a 16x pool on 1x2 before the fix, 1.17x after)."""

import re

import pytest

from distkv_jax import LLM, SamplingParams
from distkv_jax.model_runner import StepShape


def _pool_copies(text: str, dims: str) -> list[str]:
    """Instructions that produce a whole pool-shaped array by copying."""
    shape = re.escape(f"f32[{dims}]")
    return [line.strip()[:160] for line in text.splitlines()
            if re.search(r"= " + shape + r"\{[^}]*\} (copy\(|fusion\(.*calls=%wrapped_copy)", line)]


@pytest.mark.parametrize("mesh", ["1x2", "2x2", "2x4", "2x1"])
def test_step_updates_the_pool_in_place(mesh):
    temps = {}
    for kv_blocks in (64, 1024):
        llm = LLM("tiny", mesh=mesh, kv_blocks=kv_blocks, block_size=16, warm_start=False,
                  max_num_batched_tokens=16)
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2))[0]
        assert len(out.outputs[0].token_ids) == 2
        runner = llm.engine.runner
        for shape in sorted(runner.shapes_run, key=str):
            compiled = runner.lower_step(shape).compile()
            local = runner.pools.k.addressable_shards[0].data.shape
            dims = ",".join(map(str, local))
            assert not _pool_copies(compiled.as_text(), dims), (mesh, shape)
            mem = compiled.memory_analysis()
            if mem is not None:
                temps.setdefault(shape, []).append(mem.temp_size_in_bytes)
    pool_bytes_small = 2 * 64 * 16 * 16 * 4  # one device's k (or v) pool at 64 blocks, ~order
    for shape, (small, big) in temps.items():
        # 16x more blocks: the temporaries (activations, work lists) stay put
        assert big <= small + pool_bytes_small, (mesh, shape, small, big)
