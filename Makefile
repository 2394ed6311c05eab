# Two commands do all set-up on a fresh machine:
#   make demo   - run the main job on the built-in tiny model
#   make test   - run the test suite
#   make serve  - the OpenAI-compatible server on the built-in tiny model (127.0.0.1:8000)
# Both install from the lock (requirements-lock.txt: exact versions, used as pip
# constraints), so a fresh machine gets what CI passed with. pyproject.toml keeps ranges.
#   make lock        - regenerate the lock from the newest versions (in a scratch venv)
#   make test-latest - the test suite against the newest versions (.venv-latest, no lock)
#   make docs        - build the documentation site (mkdocs build --strict, into site/)
#   make gpu-check   - on a machine with an NVIDIA GPU: GPU parity tests and GPU benchmarks
#                      (launch/gpu_check.sh; GPU_PY=python of an env with the gpu extra, GPU_OUT=dir)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements-lock.txt
# extras the test environment holds (and the lock covers)
EXTRAS := test,bench,docs
# torch is installed explicitly first: the pinned 2.13.0 is a small CPU build;
# an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
PYTEST_ARGS ?=
GPU_PY ?=
GPU_OUT ?= bench_results/gpu

.PHONY: demo serve test test-latest lock docs gpu-check clean

$(VENV)/.stamp-base: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) -e .
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-base
	$(BIN)/pip install -q -c $(LOCK) $(TORCH)
	$(BIN)/pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
	touch $@

demo: $(VENV)/.stamp-base
	$(BIN)/python -m distkv_jax.launch --model tiny --mesh 2x2 --temperature 0 --max_tokens 24 --kv_blocks 64 --max_num_batched_tokens 64

serve: $(VENV)/.stamp-base
	$(BIN)/python -m distkv_jax.launch --serve --host 127.0.0.1 --port 8000 --model tiny --mesh 2x2 --kv_blocks 64 --max_num_batched_tokens 64

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

docs: $(VENV)/.stamp-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

# The newest versions pyproject.toml's ranges allow (torch stays the pinned CPU build).
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/pip install -q $(TORCH)
	.venv-latest/bin/pip install -q --upgrade -e '.[$(EXTRAS)]'
	.venv-latest/bin/pip freeze --exclude-editable > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q $(PYTEST_ARGS) tests

# Resolve the newest versions in a scratch venv and write them, exactly, to the lock.
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q $(TORCH)
	.venv-lock/bin/pip install -q -e '.[$(EXTRAS)]'
	{ echo "# Exact versions for make demo / make test (pip constraints). Regenerate: make lock"; \
	  echo "# Resolved with $$(.venv-lock/bin/python --version) on $$(uname -m) Linux from pyproject.toml's ranges."; \
	  .venv-lock/bin/pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

gpu-check:
	GPU_PY=$(GPU_PY) GPU_OUT=$(GPU_OUT) bash launch/gpu_check.sh

clean:
	rm -rf $(VENV) .venv-latest .venv-lock site .pytest_cache .hypothesis
