"""`make demo`: greedy generation on the built-in tiny model.

    python -m distkv_jax.demo [--mesh 2x2] [--max_tokens 24]

Creates the tiny model directory on first use (random weights, a locally
trained tokenizer), loads it onto a mesh of simulated CPU devices and runs
the reference generation loop. The later engine issues route this through
`python -m distkv_jax.launch`.
"""

from __future__ import annotations

import time

from absl import app, flags

_MESH = flags.DEFINE_string("mesh", "2x2", "mesh shape IxT")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 24, "new tokens per prompt")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")

PROMPTS = [
    "The KV cache of a long request",
    "Queries are small and travel",
    "Once upon a time",
]


def main(argv):
    del argv
    from distkv_jax.mesh import MeshShape, make_mesh, simulate_cpu_devices

    simulate_cpu_devices(MeshShape.parse(_MESH.value).size)
    import jax

    from distkv_jax.models.loader import load_params, load_tokenizer
    from distkv_jax.models.reference import greedy_generate
    from distkv_jax.models.tiny import tiny_model_dir

    model_dir = tiny_model_dir()
    mesh = make_mesh(_MESH.value)
    print(f"model: {model_dir}\nmesh: {dict(mesh.shape)} on {jax.devices()[0].platform} "
          f"({len(jax.devices())} devices)")
    cfg, params = load_params(model_dir, mesh, _DTYPE.value)
    tok = load_tokenizer(model_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    start = time.perf_counter()
    outs, logprobs = greedy_generate(cfg, params, prompts, _MAX_TOKENS.value)
    elapsed = time.perf_counter() - start
    for text, out, lps in zip(PROMPTS, outs, logprobs):
        print(f"\nprompt: {text!r}\n  token_ids: {out}\n  text: {tok.decode(out)!r}\n"
              f"  mean logprob: {sum(lps) / len(lps):.3f}")
    n = sum(len(o) for o in outs)
    print(f"\n{n} tokens in {elapsed:.2f}s (including compilation)")


if __name__ == "__main__":
    app.run(main)
