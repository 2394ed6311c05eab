"""distkv-jax: LLM serving whose KV cache spans every device of a JAX mesh.

    from distkv_jax import LLM, SamplingParams

The package root imports nothing heavy: `LLM`, `AsyncLLM` and `generate` load on first
use, so the control plane modules (block managers, scheduler) stay
importable without JAX.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "AsyncLLM", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput",
           "generate"]


def __getattr__(name):
    if name in ("LLM", "generate"):
        from . import llm

        return getattr(llm, name)
    if name == "AsyncLLM":
        from .async_llm import AsyncLLM

        return AsyncLLM
    if name == "EngineArgs":
        from .engine_args import EngineArgs

        return EngineArgs
    if name == "SamplingParams":
        from .sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput", "Logprob"):
        from . import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'distkv_jax' has no attribute {name!r}")
