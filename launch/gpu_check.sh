#!/usr/bin/env bash
# `make gpu-check`: one command for a machine with an NVIDIA GPU.
#   1. the GPU parity tests (tests/test_gpu_parity.py: the Triton MicroAttention
#      against float64 dense attention, the engine against transformers), then
#      the CUDA lowering tests (on the host CPU's simulated devices);
#   2. bench attention --preset gpu (the kernel's KV bytes/s against the GPU's
#      measured streaming bandwidth) and bench throughput --preset gpu (a model
#      with Llama-3-8B's attention and MLP shape, 4 layers, bfloat16, long contexts).
# Results (JSON, logs) go to $GPU_OUT (default bench_results/gpu).
# GPU_PY=path/to/python uses an environment that already has the `gpu` extra
# (no installs: for machines without network); otherwise .venv-gpu is made.
set -uo pipefail
OUT=${GPU_OUT:-bench_results/gpu}
PY=${GPU_PY:-}
mkdir -p "$OUT"
if [ -z "$PY" ]; then
  test -x .venv-gpu/bin/python || python3 -m venv .venv-gpu
  # torch is only the transformers reference: its small CPU build where there is one
  .venv-gpu/bin/pip install -q torch==2.13.0 || .venv-gpu/bin/pip install -q torch
  .venv-gpu/bin/pip install -q -e '.[gpu,test,bench]' || exit 1
  PY=.venv-gpu/bin/python
fi
status=0
JAX_PLATFORMS=cuda "$PY" - > "$OUT/device.json" <<'PYEOF' || { echo "no CUDA device visible to JAX"; exit 1; }
import json, jax
d = jax.devices()[0]
print(json.dumps({"device": d.device_kind, "platform": d.platform, "jax": jax.__version__,
                  "memory": (d.memory_stats() or {}).get("bytes_limit")}))
PYEOF
cat "$OUT/device.json"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
JAX_PLATFORMS=cuda,cpu "$PY" -m pytest -q -rs tests/test_gpu_parity.py \
  2>&1 | tee "$OUT/parity.log" || status=1
# the lowering tests build meshes of 8 simulated CPU devices: run them on the host CPU
JAX_PLATFORMS=cpu "$PY" -m pytest -q tests/test_gpu_lowering.py \
  2>&1 | tee "$OUT/lowering.log" || status=1
JAX_PLATFORMS=cuda "$PY" -m distkv_jax.bench attention --preset gpu \
  --output_json "$OUT/attention.json" --output_png '' 2>&1 | tee "$OUT/attention.log" || status=1
JAX_PLATFORMS=cuda "$PY" -m distkv_jax.bench throughput --preset gpu --reference_row=false \
  --second_start=false --output_json "$OUT/throughput.json" --output_png '' \
  2>&1 | tee "$OUT/throughput.log" || status=1
echo "gpu-check: status $status, results in $OUT"
exit $status
