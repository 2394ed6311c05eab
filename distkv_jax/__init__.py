"""distkv-jax: LLM serving whose KV cache spans every device of a JAX mesh.

The package root imports nothing heavy: the control plane modules
(block managers, scheduler) are plain Python + numpy and must stay importable
without JAX.
"""

__version__ = "0.1.0"
