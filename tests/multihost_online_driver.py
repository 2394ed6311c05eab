"""One process of the multi-host online test (tests/test_online_engine.py):
every process builds the same AsyncLLM (a pool small enough that older
blocks go to the host tier: host-attended KV); process 0 adds requests while
the job runs and aborts some; it writes the outputs as JSON."""

import asyncio
import json
import sys

from distkv_jax import runtime


def main(num_processes: int, process_id: int, address: str, out_path: str) -> None:
    info = runtime.setup(8, address if num_processes > 1 else None, num_processes, process_id)
    from distkv_jax import AsyncLLM, SamplingParams

    llm = AsyncLLM("tiny", mesh="2x4", block_size=8, kv_blocks=8, host_kv_blocks=8,
                   max_num_batched_tokens=32, warm_start=False, compile_cache_dir=None)
    if not info.is_main:
        llm.wait()
        return
    prompts = [[5 + k] * (3 + 7 * k) for k in range(10)]
    aborted = {2, 7}

    async def one(k):
        await asyncio.sleep(0.15 * k)  # arrivals while earlier requests run
        params = SamplingParams(temperature=0 if k % 2 else 0.7, seed=k, max_tokens=10 + k,
                                ignore_eos=True)
        last = None
        async for out in llm.generate(prompts[k], params, f"req-{k}"):
            last = out
            if k in aborted and len(out.outputs[0].token_ids) >= 2:
                await llm.abort(f"req-{k}")
        return k, last.outputs[0].token_ids, last.outputs[0].finish_reason

    async def run():
        return await asyncio.gather(*[one(k) for k in range(10)])

    results = asyncio.run(run())
    stats = llm.stats() or {}
    llm.shutdown()
    with open(out_path, "w") as f:
        json.dump({"results": results, "aborted": sorted(aborted),
                   "offloaded": sum(stats.get("kv_offloaded_blocks", [0]))}, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
