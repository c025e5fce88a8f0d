# Set-up and everyday commands. Each target creates .venv if it is missing, installs torch 2.13.0 first
# (a CPU build that pip takes from this machine's disk; a looser pin would download a CUDA build),
# then the package with the extras the target needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0

.PHONY: venv install-test install-demo demo test lint bench clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[test,bench,data,train,pretrained,vision,deploy]"
	touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[data,train,pretrained]"
	touch $@

venv: $(VENV)/.torch

demo: $(VENV)/.demo
	$(VENV)/bin/qkv demo

test: $(VENV)/.test
	$(PY) -m pytest

lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/mypy

bench: $(VENV)/.test
	$(VENV)/bin/qkv bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
