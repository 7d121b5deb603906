# Two commands on a fresh machine: `make run` (the main job on the bundled sample) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the declared dependencies change.
STAMP := $(VENV)/.installed
# The backbone ships in a package; nothing may be fetched from a model hub at run time.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test lint package clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

run: $(STAMP)
	$(BIN)/pyflyte run workflows/finetune.py finetune

test: $(STAMP)
	$(BIN)/python -m pytest

# Serialise every task, workflow and launch plan for a cluster: make package IMAGE=<registry>/flytetune:<tag>
IMAGE ?= flytetune:dev
package: $(STAMP)
	$(BIN)/pyflyte --pkgs workflows package --image $(IMAGE) -o flyte-package.tgz --force

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) artifacts checkpoints flyte-package.tgz .pytest_cache .ruff_cache
