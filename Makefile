# Crucible: `make demo` runs the whole pipeline on this machine; `make test` runs the tests.
# Both create .venv and install into it first (torch pinned by constraints.txt).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/pip install --quiet -c constraints.txt

export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DVC_NO_ANALYTICS ?= 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test test-fast repro clean bench-sft prompt-tuning

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PIP_CONSTRAINT=$(abspath constraints.txt) $(PIP_INSTALL) -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install  ## the whole pipeline as a Prefect flow on the embedded default
	$(BIN)/crucible run pipeline
	$(BIN)/crucible lineage artifacts/report

test: install  ## the whole suite, slow tests included
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

repro: install  ## the same chain through DVC
	$(BIN)/dvc repro

clean:
	rm -rf artifacts

prompt-tuning: install  ## the prompt-tuning initialisation study (text vs random vs vocab, 3 seeds)
	$(BIN)/crucible run prompt_tuning
	cat artifacts/prompt_tuning/report.md

bench-sft: install  ## our SFT loop vs TRL's SFTTrainer (installs the `bench` extra: trl)
	PIP_CONSTRAINT=$(abspath constraints.txt) $(PIP_INSTALL) -e '.[dev,bench]'
	$(BIN)/python benchmarks/sft_throughput.py
