"""The online engine: abort in every state, AsyncLLM with many concurrent
consumers, request ids, EngineArgs validation and the context limit."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from distkv_jax import AsyncLLM, EngineArgs, LLM, SamplingParams
from distkv_jax.request import RequestStatus

from control_plane_model import check_all_free
from prefix_cache_model import check_shared_invariants
from distkv_jax.block_manager import SHARED

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
OTHERS = [list(range(10, 39)), [7] * 12, list(range(40, 85)), [9, 8, 7] * 7, list(range(100, 133))]
VICTIM = list(range(200, 226))


@pytest.fixture(scope="module")
def llm():
    # 2 instances x 6 blocks of 8 tokens: requests borrow, and the pool is
    # too small for the batch, so requests are swapped to host and back.
    # (host_attention off: the host tier is swap space, so requests reach SWAPPED;
    # the long/short policy off: first come, first served, so the pool preempts)
    return LLM("tiny", mesh="2x4", block_size=8, kv_blocks=6, host_kv_blocks=16,
               host_attention=False, max_num_batched_tokens=16, warm_start=False,
               long_prefill_token_threshold=1 << 30)


@pytest.fixture(scope="module")
def solo(llm):
    return [o.outputs[0].token_ids for o in llm.generate(OTHERS, GREEDY)]


def _in_flight(eng, req) -> bool:
    return eng._inflight is not None and any(
        row is not None and row.request is req for row in eng._inflight.plan.logits_rows)


def _borrowing(eng, req) -> bool:
    if req.status != RequestStatus.RUNNING or req.request_id not in eng.kv.requests():
        return False
    nb = eng.layout.blocks_per_instance
    return any(int(b) // nb != eng.kv.home(req.request_id) for b in eng.kv.block_ids(req.request_id))


STATES = {
    "waiting": lambda eng, r: r.status == RequestStatus.WAITING,
    "prefilling": lambda eng, r: r.status == RequestStatus.RUNNING and 0 < r.num_computed < r.prompt_len,
    "decoding_row_in_flight": lambda eng, r: (r.status == RequestStatus.RUNNING
                                              and r.num_output_tokens >= 2 and _in_flight(eng, r)),
    "swapped": lambda eng, r: r.status == RequestStatus.SWAPPED,
    "holding_borrowed_blocks": _borrowing,
}


@pytest.mark.parametrize("state", list(STATES))
def test_abort_in_every_state(llm, solo, state):
    """Aborting frees exactly the victim's blocks (own, borrowed, host), the
    control plane's invariants hold right after, the victim ends with
    finish_reason "abort", and every other request's output equals its run
    without the victim."""
    eng = llm.engine
    when = STATES[state]
    # the same prompts ran before: without this their cached prefixes would
    # relieve the memory pressure that swaps the victim out
    assert llm.reset_prefix_cache()
    ids = [eng.add_request(p, GREEDY, request_id=f"{state}-{k}") for k, p in enumerate(OTHERS)]
    eng.add_request(VICTIM, GREEDY, request_id="victim")
    victim = eng._live["victim"]
    finals = {}
    for _ in range(400):
        if when(eng, victim):
            break
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
    else:
        pytest.fail(f"the victim never reached state {state}")
    kv = eng.kv
    shared_now = lambda kv: {m.base + p for m in kv.gm.managers  # noqa: E731
                             for p in np.flatnonzero(m.holder == SHARED).tolist()}
    held_dev = held_host = 0
    if "victim" in kv.requests():
        held_dev = len(kv.block_ids("victim")) if kv.state("victim") == "running" else 0
        held_host = len(kv.host_block_ids("victim"))
    free_dev, free_host = kv.free_device_blocks().sum(), kv.free_host_blocks().sum()
    ledger = kv.ledger().sum()
    assert eng.abort("victim")
    assert not eng.abort("victim") and not eng.abort("no-such-request")  # no-ops
    assert "victim" not in kv.requests()
    check_shared_invariants(kv, shared_now(kv))
    assert kv.free_device_blocks().sum() == free_dev + held_dev
    assert kv.free_host_blocks().sum() == free_host + held_host
    assert kv.ledger().sum() <= ledger
    if state == "swapped":
        assert held_host > 0
    if state == "holding_borrowed_blocks":
        assert kv.ledger().sum() < ledger
    for outs in eng.iterate():
        for out in outs:
            if out.finished:
                finals[out.request_id] = out
    assert finals["victim"].outputs[0].finish_reason == "abort"
    for k, rid in enumerate(ids):
        assert finals[rid].outputs[0].token_ids == solo[k], rid
    check_all_free(kv)
    assert eng.num_live() == 0


def test_duplicate_live_request_id_is_refused_and_bad_input_fails_alone(llm):
    eng = llm.engine
    eng.add_request([5, 6, 7], GREEDY, request_id="dup")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([5, 6, 7], GREEDY, request_id="dup")
    eng.add_request([], GREEDY, request_id="empty")
    finals = {o.request_id: o for outs in eng.iterate() for o in outs if o.finished}
    assert finals["dup"].outputs[0].finish_reason == "length"
    assert finals["empty"].outputs[0].finish_reason == "error" and "empty" in finals["empty"].error
    eng.add_request([5, 6, 7], GREEDY, request_id="dup")  # finished ids may be reused
    assert eng.abort("dup")
    finals = {o.request_id: o for outs in eng.iterate() for o in outs if o.finished}
    assert finals["dup"].outputs[0].finish_reason == "abort"


def test_leaving_a_stream_early_aborts_its_requests(llm):
    stream = llm.generate_stream(OTHERS[:3], GREEDY)
    for _ in stream:
        break
    stream.close()
    # the next call runs only its own request (the abandoned ones are aborted)
    out = llm.generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=2))[0]
    assert out.outputs[0].finish_reason == "length"
    assert llm.engine.num_live() == 0
    check_all_free(llm.engine.kv)


def test_async_llm_concurrent_consumers_with_cancellations():
    """32 concurrent streams, a third of them cancelled at random points (by
    leaving the loop, by cancelling the task, or by abort()): every surviving
    stream's output equals its solo run, and all KV is free at the end."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 500, size=int(n)).tolist() for n in rng.integers(2, 60, size=32)]
    params = [SamplingParams(temperature=0 if k % 2 else 0.8, seed=k, max_tokens=int(m), ignore_eos=True)
              for k, m in enumerate(rng.integers(4, 20, size=32))]
    llm = AsyncLLM("tiny", mesh="2x4", block_size=8, kv_blocks=12, host_kv_blocks=8,
                   max_num_batched_tokens=32, warm_start=False)
    rnd = random.Random(5)
    how = {k: rnd.choice(["break", "cancel", "abort"]) for k in rnd.sample(range(32), 11)}

    async def consume(k):
        last = None
        n = 0
        async for out in llm.generate(prompts[k], params[k], f"req-{k}"):
            last, n = out, n + 1
            if how.get(k) == "break" and n >= 2:
                break
            if how.get(k) == "abort" and n == 2:
                await llm.abort(f"req-{k}")
        return last

    async def main():
        tasks = [asyncio.create_task(consume(k)) for k in range(32)]
        await asyncio.sleep(0)
        for k, h in how.items():
            if h == "cancel":
                await asyncio.sleep(0.05 * rnd.random())
                tasks[k].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(ValueError, match="already in use"):
            async def dup():
                async for _ in llm.generate([5, 6], params[0], "req-dup"):
                    async for _ in llm.generate([5, 6], params[0], "req-dup"):
                        pass
            await dup()
        for _ in range(200):  # the engine settles the last aborts
            if llm.engine.num_live() == 0 and not llm.engine.has_unfinished():
                break
            await asyncio.sleep(0.05)
        return results

    try:
        results = asyncio.run(main())
        eng = llm.engine
        assert eng.num_live() == 0
        check_all_free(eng.kv)
        assert (eng.kv_usage() == 0).all()
        survivors = [k for k in range(32) if k not in how]
        alone = {}
        for k in survivors:  # solo runs, one at a time
            async def solo(k=k):
                return [o async for o in llm.generate(prompts[k], params[k], f"solo-{k}")][-1]
            alone[k] = asyncio.run(solo())
        for k in survivors:
            got = results[k]
            assert got.finished and got.outputs[0].finish_reason == "length", k
            assert got.outputs[0].token_ids == alone[k].outputs[0].token_ids, k
        for k, h in how.items():
            r = results[k]
            if h == "cancel":
                assert isinstance(r, asyncio.CancelledError) or r.finished
            elif h == "abort":
                assert r.outputs[0].finish_reason in ("abort", "length")
        assert eng.stats["aborted"] >= 1
    finally:
        llm.shutdown()


# ------------------------------------------------------------ engine arguments
@pytest.mark.parametrize("kwargs, words", [
    (dict(kv_blocks=-5), ["kv_blocks=-5", ">= 1"]),
    (dict(kv_blocks=0), ["kv_blocks=0"]),
    (dict(block_size=0), ["block_size=0", ">= 1"]),
    (dict(mesh="2by4"), ["mesh='2by4'"]),
    (dict(kv_policy="shared"), ["kv_policy='shared'", "distributed"]),
    (dict(dtype="float16"), ["dtype='float16'", "bfloat16"]),
    (dict(max_num_seqs=1.5), ["max_num_seqs=1.5", "integer"]),
    (dict(lend_fraction=2.0), ["lend_fraction=2.0", "[0, 1]"]),
    (dict(attention_impl="fast"), ["attention_impl='fast'"]),
    (dict(max_model_len=0), ["max_model_len=0"]),
])
def test_engine_args_are_validated_with_the_field_named(kwargs, words):
    with pytest.raises(ValueError) as e:
        EngineArgs(**kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_llm_accepts_exactly_the_engine_args():
    with pytest.raises(TypeError, match="unknown argument.*max_tokens_per_step"):
        LLM("tiny", max_tokens_per_step=3)
    with pytest.raises(TypeError, match="unknown argument"):
        AsyncLLM("tiny", impl="native")


def test_flags_are_generated_from_engine_args():
    from absl import flags

    fv = flags.FlagValues()
    EngineArgs.define_flags(fv)
    fv(["prog", "--kv_blocks=7", "--mesh=2x2", "--nooverlap_steps", "--lend_fraction=0.5"])
    args = EngineArgs.from_flags(fv)
    assert (args.kv_blocks, args.mesh, args.overlap_steps, args.lend_fraction) == (7, "2x2", False, 0.5)
    for name in EngineArgs.field_names():
        assert fv[name].help, name


def test_max_model_len_refuses_long_prompts_and_caps_generation(tmp_path):
    import json

    from distkv_jax.models.tiny import tiny_model_dir
    import shutil

    path = tmp_path / "short_context"
    shutil.copytree(tiny_model_dir(), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(path), block_size=8, kv_blocks=32, warm_start=False)
    assert llm.engine.max_model_len == 64
    outs = llm.generate([[5] * 80, [5] * 40, [6] * 10],
                        [SamplingParams(temperature=0, max_tokens=4),
                         SamplingParams(temperature=0, max_tokens=100000000, ignore_eos=True),
                         SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)])
    assert outs[0].outputs[0].finish_reason == "error"
    assert "80 tokens" in outs[0].error and "max_model_len=64" in outs[0].error
    assert outs[1].outputs[0].finish_reason == "length" and len(outs[1].outputs[0].token_ids) == 24
    assert len(outs[2].outputs[0].token_ids) == 54
    with pytest.raises(ValueError, match="max_model_len=1000"):
        LLM.from_engine_args(EngineArgs(model=str(path), block_size=8, kv_blocks=4,
                                        max_model_len=1000, warm_start=False))


# ------------------------------------------------------------------ multi-host
def _run_driver(tmp_path, processes: int) -> dict:
    import os
    import signal
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # each process asks for its own device count
    out = tmp_path / f"online_{processes}.json"
    procs = [subprocess.Popen([sys.executable, os.path.join(root, "tests", "multihost_online_driver.py"),
                               str(processes), str(pid), address, str(out)],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for pid in range(processes)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-4000:]
    import json

    return json.loads(out.read_text())


def test_two_process_online_engine_matches_one_process(tmp_path):
    """Process 0 of a 2-process job takes requests arriving while the job
    runs and aborts two; the other process applies the same adds and aborts
    before each step (jax.distributed's key-value store). Every request that
    was not aborted ends with the same tokens as on one process, also with
    blocks attended on the host."""
    one = _run_driver(tmp_path, 1)
    two = _run_driver(tmp_path, 2)
    # both ran steps that attend host-held blocks (host-attended KV)
    assert one["offloaded"] > 0 and two["offloaded"] > 0, (one, two)
    aborted = set(one["aborted"])
    for (k, toks1, reason1), (k2, toks2, reason2) in zip(one["results"], two["results"]):
        assert k == k2
        if k in aborted:
            assert reason1 == reason2 == "abort"
        else:
            assert reason1 == reason2 == "length" and toks1 == toks2, k


# ------------------------------------------------------------------ warm start
def test_warm_start_builds_every_program_a_workload_uses():
    """After warm start, a mixed workload (prefill chunks, decodes, sampling
    with and without logprobs, prompt logprobs, preemption with swaps,
    borrowing) compiles no XLA program: every step it runs has a shape in
    the warm-start set."""
    from distkv_jax.model_runner import CompileStats

    # host_attention off: steps attending host blocks compile on first use
    # (one program per host work-list bucket), outside the warm-start set
    llm = LLM("tiny", mesh="2x1", block_size=8, kv_blocks=10, host_kv_blocks=8,
              host_attention=False, max_num_batched_tokens=16, max_num_seqs=4,
              compile_cache_dir=None)
    eng = llm.engine
    info = eng.warm_start_info
    assert info["programs"] >= info["step_shapes"] > 0
    print(f"warm start: {info}")
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 500, size=int(n)).tolist() for n in rng.integers(1, 60, size=12)]
    params = [SamplingParams(temperature=float(k % 3) * 0.4, seed=k, max_tokens=int(m), ignore_eos=True,
                             logprobs=2 if k % 4 == 0 else None,
                             prompt_logprobs=1 if k == 5 else None)
              for k, m in enumerate(rng.integers(1, 30, size=12))]
    before = CompileStats.compiled()
    outs = llm.generate(prompts, params)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert eng.stats["preemptions"] > 0 and eng.stats["max_remote_blocks"] > 0
    assert CompileStats.compiled() == before
    cfg = eng.scheduler.config
    assert eng.runner.shapes_run <= set(eng.runner.step_shapes(eng.max_model_len, cfg.run_choices,
                                                               cfg.min_rows))
