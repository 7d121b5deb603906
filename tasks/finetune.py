"""Training and evaluation: the tasks that need torch, in the train image."""

import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from flytekit import Deck, current_context, dynamic, task
from flytekit.exceptions.user import FlyteRecoverableException
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from flytekitplugins.kfpytorch import Elastic

from flytetune import artifacts, gate
from flytetune import evaluate as evaluation
from flytetune import train as training
from flytetune.config import FinetuneConfig
from flytetune.pipeline import run_checkpoint_dir
from flytetune.preemption import Preempted
from flytetune.presets import load_preset
from tasks import decks, presets
from tasks.context import on_cluster, run_id, workdir
from tasks.pods import pod_template, step
from tasks.presets import PROCESSES_ENV

# flytekit configures only its own logger; without this the library's progress lines vanish.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger(__name__)

# torch elastic's spawned workers unpickle the training task by module name with the parent's
# sys.path, from which `pyflyte run` removes the project root (its first occurrence) once the
# workflow is loaded: keep a second entry.
sys.path.append(str(Path(__file__).resolve().parents[1]))


class NoGPU(RuntimeError):
    """A GPU preset on a node where torch sees no GPU: paying for it while training on CPU."""


def _check_gpus(preset: str) -> None:
    gpus = load_preset(preset).gpus
    if not gpus or torch.cuda.is_available():
        return
    if on_cluster():
        raise NoGPU(f"preset {preset} asks for {gpus} GPU(s) but torch {torch.__version__} sees none: the node's "
                    f"NVIDIA driver must support CUDA {torch.version.cuda} (see docker/Dockerfile)")
    log.warning("preset %s asks for %d GPU(s) but none is visible: training on CPU", preset, gpus)


def _train(prepared: FlyteDirectory, cfg: FinetuneConfig, resume_from: Optional[str], preset: str,
           init_from: Optional[str]) -> FlyteDirectory:
    _check_gpus(preset)
    out = workdir("model")
    init_dir = artifacts.fetch(init_from, workdir("init")) if init_from else None
    deck = TrainingDeck(preset)
    try:
        result = training.fit(Path(prepared.download()), out, cfg, checkpoint_dir=run_checkpoint_dir(cfg, run_id()),
                              resume_from=resume_from, init_from=init_dir, on_update=deck.publish_live(),
                              update_every_minutes=cfg.train.deck_every_minutes)
    except Preempted as e:
        # Recoverable: Flyte retries it within the task's `retries` (see README, "Preemption").
        raise FlyteRecoverableException(str(e)) from e
    deck.show(result, running=False)
    return FlyteDirectory(str(out))


class TrainingDeck(Deck):
    """The Training deck, also republished while the run goes: flytekit's Deck.publish writes the
    task's deck.html (on a cluster to its output metadata prefix, where the Flyte UI reads it)."""

    def __init__(self, preset: str):
        super().__init__("Training", "<p>Training is starting.</p>")
        self.preset = load_preset(preset)

    def show(self, result: training.TrainResult, running: bool) -> None:
        self._html = decks.training(result, preset=self.preset.name, hourly_usd=self.preset.hourly_usd,
                                    running=running)

    def publish_live(self):
        """The `on_update` callback for training.fit, or None where this process cannot publish: a
        torchrun worker has no task identity, and its decks reach the UI when the task ends."""
        params = current_context()
        if not params.enable_deck or params.task_id is None:
            log.info("the Training deck is written when the task ends (no live publishing in this process)")
            return None

        def update(result: training.TrainResult) -> None:
            self.show(result, running=True)
            Deck.publish()
        return update


# Defaults for a direct call; a preset replaces every one of them (tasks/presets.py).
TRAIN_TASK = dict(
    **step("train"),
    enable_deck=True,
    # Preemptible nodes; a preempted attempt continues from the run's newest checkpoint.
    interruptible=True,
    # The preset sets the retries; 0 here so that a preset's 0 is not replaced by this (tasks/presets.py).
    retries=0,
    timeout=timedelta(hours=12),
    # Checkpoints may live on s3://.
    pod_template=pod_template(),
)


@task(**TRAIN_TASK)
def train(prepared: FlyteDirectory, cfg: FinetuneConfig, resume_from: Optional[str], preset: str,
          init_from: Optional[str]) -> FlyteDirectory:
    """One process: CPU or one GPU."""
    return _train(prepared, cfg, resume_from, preset, init_from)


# With nnodes=1 the Elastic plugin runs torch elastic inside a plain pod (no training operator) and
# serialises no process count: the pod re-imports this module, so the preset's pod template
# carries the count in the environment. A local run (no pod template) uses the variable if set, else 2.
# increase_shared_mem is the plugin's deprecated /dev/shm path; presets set shared_memory instead.
@task(task_config=Elastic(nnodes=1, nproc_per_node=int(os.environ.get(PROCESSES_ENV, "2")), increase_shared_mem=False),
      **TRAIN_TASK)
def train_distributed(prepared: FlyteDirectory, cfg: FinetuneConfig, resume_from: Optional[str],
                      preset: str, init_from: Optional[str]) -> FlyteDirectory:
    """Data-parallel: one process per GPU under torchrun (DDP; NCCL on GPUs, gloo on CPU)."""
    return _train(prepared, cfg, resume_from, preset, init_from)


@dynamic(**step("train_on_preset"))
def train_on_preset(prepared: FlyteDirectory, cfg: FinetuneConfig, resume_from: Optional[str],
                    preset: str, init_from: Optional[str]) -> FlyteDirectory:
    """Apply the hardware preset: the only place resources, accelerator and placement are set."""
    chosen = load_preset(preset)
    training_task = train_distributed if chosen.distributed else train
    return training_task(prepared=prepared, cfg=cfg, resume_from=resume_from, preset=preset,
                         init_from=init_from).with_overrides(
        node_name=f"train-{chosen.name}", **presets.overrides(chosen))


class Evaluated(NamedTuple):
    metrics: dict
    # The full per-class tables of a many-class evaluation (metrics["details_file"]), else None.
    details: Optional[FlyteFile]
    # The evaluation gate's decision: promote or not, why, both models' scores (flytetune/gate.py).
    gate: dict


# Reads production's model from output_uri: the AWS web identity (tasks/pods.py).
@task(enable_deck=True, pod_template=pod_template(), **step("evaluate"))
def evaluate(model: FlyteDirectory, prepared: FlyteDirectory, cfg: FinetuneConfig, output_uri: str) -> Evaluated:
    """Test metrics of the new model, and the gate: the new model against production on the same rows."""
    model_dir, prepared_dir = Path(model.download()), Path(prepared.download())
    predictions = evaluation.predict(model_dir, prepared_dir, batch_size=cfg.train.eval_batch_size)
    metrics = evaluation.score(predictions, model_dir)
    Deck("Test metrics", decks.test_metrics(metrics, evaluation.worst_examples(predictions, prepared_dir)))
    decision = gate.run(model_dir, prepared_dir, cfg, output_uri, workdir("gate"))
    Deck("Gate", decks.gate(decision))
    details = metrics.get("details_file")
    return Evaluated(metrics=metrics, details=FlyteFile(str(model_dir / details)) if details else None,
                     gate=decision)
