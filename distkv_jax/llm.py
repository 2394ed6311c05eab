"""The user-facing offline API, shaped like vLLM's:

    llm = LLM("path/to/hf_model_dir", mesh="2x4", block_size=16, kv_blocks=64)
    outs = llm.generate(["a prompt", [1, 2, 3]], SamplingParams(max_tokens=32))
    for out in llm.generate_stream(prompts, params): ...   # incremental outputs

`LLM(model, **kwargs)` takes exactly `EngineArgs`' fields as keyword
arguments. Construction loads the model and, with `warm_start` (the
default), compiles the step programs before it returns.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Sequence

from .engine_args import EngineArgs
from .mesh import make_mesh, simulate_cpu_devices
from .outputs import RequestOutput
from .sampling_params import SamplingParams

TINY_MODEL = "tiny"  # the built-in tiny model (created locally on first use)
log = logging.getLogger("distkv_jax")


def resolve_model_dir(model: str) -> str:
    if model == TINY_MODEL:
        from .models.tiny import tiny_model_dir

        return tiny_model_dir()
    return model


def load_model(model: str, mesh, dtype):
    """(config, params, tokenizer) from a HF directory, an orbax checkpoint
    directory (see models/checkpoint.py) or the name "tiny"."""
    from .models.checkpoint import is_orbax_checkpoint, restore_params
    from .models.loader import load_params, load_tokenizer

    path = resolve_model_dir(model)
    if is_orbax_checkpoint(path):
        cfg, params = restore_params(path, mesh, dtype)
    else:
        cfg, params = load_params(path, mesh, dtype)
    return cfg, params, load_tokenizer(path)


def enable_compile_cache(path: str | None) -> None:
    """JAX's persistent compilation cache: a restarted engine loads its step
    programs instead of compiling them again."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if jax.config.jax_compilation_cache_dir != path:
        # the cache is looked up once per process: a process that compiled
        # before (without a cache, or with another one) must look again
        compilation_cache.reset_cache()
        compilation_cache.set_cache_dir(path)
    if path is None:
        return
    # every program of the engine is worth keeping (the defaults skip ones
    # that compile in under a second)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def build_engine(args: EngineArgs, progress: bool = True):
    """(engine, model config, tokenizer, mesh) for the arguments."""
    shape = args.mesh_shape
    simulate_cpu_devices(shape.size)  # CPU only, and only before JAX starts
    enable_compile_cache(args.resolved_compile_cache_dir())
    from .engine import Engine

    mesh = make_mesh(shape)
    cfg, params, tokenizer = load_model(args.model, mesh, args.dtype)
    return Engine(cfg, params, mesh, tokenizer, args, progress=progress), cfg, tokenizer, mesh


def normalize_batch(prompts, sampling_params) -> tuple[list, list[SamplingParams]]:
    """(prompts, params per prompt) from one prompt or a batch."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # one prompt, not a batch
    prompts = list(prompts)
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        sampling_params = [sampling_params] * len(prompts)
    sampling_params = list(sampling_params)
    if len(sampling_params) != len(prompts):
        raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
    return prompts, sampling_params


class LLM:
    def __init__(self, model: str, **kwargs: Any):
        self._init(EngineArgs.from_kwargs("LLM", model, kwargs))

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLM":
        return cls(**dataclasses.asdict(args))

    def _init(self, args: EngineArgs) -> None:
        self.engine_args = args
        self.engine, self.model_config, self.tokenizer, self.mesh = build_engine(args)
        self._next_id = 0

    def get_tokenizer(self):
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget the cached prefixes no request reads (as vLLM's); True when
        the cache is empty afterwards."""
        return self.engine.kv.reset_prefix_cache()

    def _submit(self, prompts, sampling_params) -> list[str]:
        prompts, params = normalize_batch(prompts, sampling_params)
        ids = []
        for p, sp in zip(prompts, params):
            ids.append(self.engine.add_request(p, sp, request_id=str(self._next_id)))
            self._next_id += 1
        return ids

    def generate_stream(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                        ) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each time one of these requests gains tokens
        or finishes (cumulative: each holds everything generated so far).
        Leaving the loop early aborts the requests still running."""
        ids = self._submit(prompts, sampling_params)
        mine, left = set(ids), set(ids)
        try:
            for outs in self.engine.iterate():
                for out in outs:
                    if out.request_id in mine:
                        if out.finished:
                            left.discard(out.request_id)
                        yield out
                if not left:
                    return
        finally:
            for rid in sorted(left):  # their blocks are free before the next step
                self.engine.abort(rid)

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; results in prompt order. A request
        that cannot run (bad input) has finish_reason "error" and a message in
        `error`; the others complete."""
        ids = self._submit(prompts, sampling_params)
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="requests", unit="req")
        for outs in self.engine.iterate(only_finished=True):
            for out in outs:
                final[out.request_id] = out
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [final[i] for i in ids]


def generate(model: str, prompts, mesh: str = "1x1", **sampling_kwargs: Any) -> list[RequestOutput]:
    """One-call convenience: LLM(model, mesh).generate(prompts, SamplingParams(**kwargs)).
    One call compiles only the programs it runs (no warm start: that pays off
    for an engine that serves many calls)."""
    return LLM(model, mesh=mesh, warm_start=False).generate(prompts, SamplingParams(**sampling_kwargs))
