# Two commands do all set-up on a fresh machine:
#   make demo   - run the main job on the built-in tiny model
#   make test   - run the test suite
#   make serve  - the OpenAI-compatible server on the built-in tiny model (127.0.0.1:8000)
#   make gpu-check - on a machine with an NVIDIA GPU: GPU parity tests and GPU benchmarks
#                    (launch/gpu_check.sh; GPU_PY=python of an env with the gpu extra, GPU_OUT=dir)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
GPU_PY ?=
GPU_OUT ?= bench_results/gpu

.PHONY: demo serve test gpu-check clean

$(VENV)/.stamp-base: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e .
	touch $@

# torch is installed explicitly first: the pinned 2.13.0 is a small CPU build;
# an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.stamp-test: $(VENV)/.stamp-base
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

demo: $(VENV)/.stamp-base
	$(BIN)/python -m distkv_jax.launch --model tiny --mesh 2x2 --temperature 0 --max_tokens 24 --kv_blocks 64 --max_num_batched_tokens 64

serve: $(VENV)/.stamp-base
	$(BIN)/python -m distkv_jax.launch --serve --host 127.0.0.1 --port 8000 --model tiny --mesh 2x2 --kv_blocks 64 --max_num_batched_tokens 64

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

gpu-check:
	GPU_PY=$(GPU_PY) GPU_OUT=$(GPU_OUT) bash launch/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
