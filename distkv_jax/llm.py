"""The user-facing API, shaped like vLLM's:

    llm = LLM("path/to/hf_model_dir", mesh="2x4", block_size=16, kv_blocks=64)
    outs = llm.generate(["a prompt", [1, 2, 3]], SamplingParams(max_tokens=32))
    for out in llm.generate_stream(prompts, params): ...   # incremental outputs
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from .mesh import MeshShape, make_mesh, simulate_cpu_devices
from .outputs import RequestOutput
from .sampling_params import SamplingParams

TINY_MODEL = "tiny"  # the built-in tiny model (created locally on first use)


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


class LLM:
    def __init__(self, model: str, mesh: str = "1x1", block_size: int = 16,
                 kv_blocks: int | None = None, host_kv_blocks: int = 0,
                 kv_policy: str = "distributed", max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 256, dtype: str = "float32", seed: int = 0,
                 max_logprobs: int = 20, attention_impl: str = "auto"):
        if kv_policy not in ("distributed", "local"):
            raise ValueError(f"kv_policy must be 'distributed' or 'local', got {kv_policy!r}")
        shape = MeshShape.parse(mesh)
        simulate_cpu_devices(shape.size)  # CPU only, and only before JAX starts
        from .engine import Engine, EngineConfig

        self.mesh = make_mesh(shape)
        self.model_config, params, self.tokenizer = load_model(model, self.mesh, dtype)
        self.engine = Engine(self.model_config, params, self.mesh, self.tokenizer, EngineConfig(
            block_size=block_size, kv_blocks=kv_blocks, host_kv_blocks=host_kv_blocks,
            kv_policy=kv_policy, max_num_seqs=max_num_seqs,
            max_tokens_per_step=max_num_batched_tokens, max_logprobs=max_logprobs, seed=seed,
            impl=attention_impl), dtype=dtype)

    def get_tokenizer(self):
        return self.tokenizer

    def _submit(self, prompts, sampling_params) -> list[str]:
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
        return [self.engine.add_request(p, sp) for p, sp in zip(prompts, sampling_params)]

    def generate_stream(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                        ) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each time a request gains tokens or finishes
        (cumulative: each holds everything generated so far)."""
        self._submit(prompts, sampling_params)
        yield from self.engine.take_finished_errors()
        while self.engine.has_unfinished():
            yield from self.engine.step()

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; results in prompt order. A request
        that cannot run (bad input) has finish_reason "error" and a message in
        `error`; the others complete."""
        ids = self._submit(prompts, sampling_params)
        final: dict[str, RequestOutput] = {o.request_id: o for o in self.engine.take_finished_errors()}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="requests", unit="req")
            bar.update(len(final))
        while self.engine.has_unfinished():
            for out in self.engine.step(only_finished=True):
                if out.finished:
                    final[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [final[i] for i in ids]


def generate(model: str, prompts, mesh: str = "1x1", **sampling_kwargs: Any) -> list[RequestOutput]:
    """One-call convenience: LLM(model, mesh).generate(prompts, SamplingParams(**kwargs))."""
    return LLM(model, mesh=mesh).generate(prompts, SamplingParams(**sampling_kwargs))
