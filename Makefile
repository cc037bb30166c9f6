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

.PHONY: install run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(UV) pip install -q --python $(PY) $(FIND_LINKS) "$(TORCH_PIN)"
	$(UV) pip install -q --python $(PY) $(FIND_LINKS) "$(TORCH_PIN)" -e ".[dev]"
	touch $@

run: install
	$(VENV)/bin/lmforge pretrain

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/shakespeare_char.py
	$(PY) benchmarks/pretrain_throughput.py

clean:
	rm -rf $(VENV) runs .cache
