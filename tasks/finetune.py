"""Flyte tasks: thin wrappers that turn Flyte types into paths and call one library function each."""

import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from flytekit import Deck, Resources, current_context, dynamic, task
from flytekit.exceptions.user import FlyteRecoverableException
from flytekit.types.directory import FlyteDirectory
from flytekitplugins.kfpytorch import Elastic

from flytetune import artifacts, data, storage
from flytetune import evaluate as evaluation
from flytetune import prepare as preparation
from flytetune import train as training
from flytetune.config import FinetuneConfig, load_config, parse_overrides
from flytetune.pipeline import resolve_resume, run_checkpoint_dir, summary
from flytetune.preemption import Preempted
from flytetune.presets import load_preset
from tasks import decks, presets
from tasks.presets import PROCESSES_ENV

# flytekit configures only its own logger; without this the library's progress lines vanish.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger(__name__)

# torch elastic's spawned workers unpickle the training task by module name with the parent's
# sys.path, from which `pyflyte run` removes the project root (its first occurrence) once the
# workflow is loaded: keep a second entry.
sys.path.append(str(Path(__file__).resolve().parents[1]))


def _run_id() -> str:
    """The execution id, not the attempt: every retry of a run sees every earlier attempt's checkpoints."""
    # torch elastic's workers get an empty context; the plugin passes the execution id as the rendezvous run id.
    name = current_context().execution_id.name or os.environ.get("TORCHELASTIC_RUN_ID", "")
    if not name:
        raise RuntimeError("no Flyte execution id: cannot name the run's checkpoint prefix")
    # Local executions are all named "local" and are never retried: each is a run of its own.
    return artifacts.new_version() if name == "local" else name


def _workdir(name: str) -> Path:
    path = Path(current_context().working_directory) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@task
def resolve_config(path: str, overrides: str, preset: str) -> FinetuneConfig:
    """Load and validate the config and the preset first: a typo fails here, before any data moves or GPU starts."""
    load_preset(preset)
    return load_config(path, parse_overrides(overrides))


@task
def resolve_checkpoint(cfg: FinetuneConfig, from_checkpoint: Optional[str]) -> Optional[str]:
    """Turn `--from_checkpoint` into a complete step folder URI, or fail before training starts."""
    return resolve_resume(cfg, from_checkpoint)


def _execution_prefix(name: str) -> str:
    """`name` under this execution's raw output prefix: the cluster's own bucket (gs:// on GKE), a temp dir locally."""
    return f"{current_context().raw_output_prefix.rstrip('/')}/{name}"


@task
def copy_dataset(dataset_uri: str, test_uri: Optional[str]) -> str:
    """Bring the dataset into the cluster's own cloud with flytetune.storage (verified, parallel),
    not through Flyte's fsspec transfer; returns the URI of the copy."""
    raw = _workdir("raw")
    data.copy_dataset(dataset_uri, raw, test_uri=test_uri)
    dest = _execution_prefix("dataset")
    storage.sync(str(raw), dest)
    return dest


@task
def prepare(raw_uri: str, cfg: FinetuneConfig) -> FlyteDirectory:
    raw, out = _workdir("raw"), _workdir("prepared")
    storage.sync(raw_uri, str(raw))
    preparation.prepare(raw, out, cfg)
    return FlyteDirectory(str(out))


def _train(prepared: FlyteDirectory, cfg: FinetuneConfig, resume_from: Optional[str], preset: str) -> FlyteDirectory:
    gpus = load_preset(preset).gpus
    if gpus and not torch.cuda.is_available():
        log.warning("preset %s asks for %d GPU(s) but none is visible: training on CPU", preset, gpus)
    out = _workdir("model")
    checkpoint_dir = run_checkpoint_dir(cfg, _run_id())
    try:
        result = training.fit(Path(prepared.download()), out, cfg, checkpoint_dir=checkpoint_dir,
                              resume_from=resume_from)
    except Preempted as e:
        # Recoverable: Flyte retries it within the task's `retries` (see README, "Preemption").
        raise FlyteRecoverableException(str(e)) from e
    Deck("Training", decks.training_history(result.history))
    return FlyteDirectory(str(out))


# Defaults for a direct call; a preset replaces every one of them (tasks/presets.py).
TRAIN_TASK = dict(
    requests=Resources(cpu="2", mem="8Gi"),
    enable_deck=True,
    # Preemptible nodes; a preempted attempt continues from the run's newest checkpoint.
    interruptible=True,
    retries=3,
    timeout=timedelta(hours=12),
)


@task(**TRAIN_TASK)
def train(prepared: FlyteDirectory, cfg: FinetuneConfig, resume_from: Optional[str], preset: str) -> FlyteDirectory:
    """One process: CPU or one GPU."""
    return _train(prepared, cfg, resume_from, preset)


# With nnodes=1 the Elastic plugin runs torch elastic inside a plain pod (no training operator) and
# serialises no process count: the pod re-imports this module, so the preset's pod template
# carries the count in the environment. A local run (no pod template) uses the variable if set, else 2.
# increase_shared_mem is the plugin's deprecated /dev/shm path; presets set shared_memory instead.
@task(task_config=Elastic(nnodes=1, nproc_per_node=int(os.environ.get(PROCESSES_ENV, "2")), increase_shared_mem=False),
      **TRAIN_TASK)
def train_distributed(prepared: FlyteDirectory, cfg: FinetuneConfig, resume_from: Optional[str],
                      preset: str) -> FlyteDirectory:
    """Data-parallel: one process per GPU under torchrun (DDP; NCCL on GPUs, gloo on CPU)."""
    return _train(prepared, cfg, resume_from, preset)


@dynamic
def train_on_preset(prepared: FlyteDirectory, cfg: FinetuneConfig, resume_from: Optional[str],
                    preset: str) -> FlyteDirectory:
    """Apply the hardware preset: the only place resources, accelerator and placement are set."""
    chosen = load_preset(preset)
    training_task = train_distributed if chosen.distributed else train
    return training_task(prepared=prepared, cfg=cfg, resume_from=resume_from, preset=preset).with_overrides(
        node_name=f"train-{chosen.name}", **presets.overrides(chosen))


@task(enable_deck=True)
def evaluate(model: FlyteDirectory, prepared: FlyteDirectory, cfg: FinetuneConfig) -> dict:
    metrics = evaluation.evaluate(Path(model.download()), Path(prepared.download()),
                                  batch_size=cfg.train.eval_batch_size)
    Deck("Test metrics", decks.test_metrics(metrics))
    return metrics


class Published(NamedTuple):
    artifacts_uri: str
    test_metrics: dict


@task
def publish(model: FlyteDirectory, prepared: FlyteDirectory, metrics: dict, cfg: FinetuneConfig,
            output_uri: str) -> Published:
    meta = preparation.load_meta(Path(prepared.download()))
    run_uri = artifacts.publish(Path(model.download()), output_uri, cfg.model.name, metrics=metrics,
                                config=cfg.to_dict(), data_meta=meta)
    return Published(artifacts_uri=run_uri, test_metrics=summary(metrics))
