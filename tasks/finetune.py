"""Flyte tasks: thin wrappers that turn Flyte types into paths and call one library function each."""

import logging
from pathlib import Path
from typing import NamedTuple, Optional

from flytekit import Resources, current_context, task
from flytekit.types.directory import FlyteDirectory

from flytetune import artifacts, data
from flytetune import evaluate as evaluation
from flytetune import prepare as preparation
from flytetune import train as training
from flytetune.config import FinetuneConfig, load_config, parse_overrides
from flytetune.pipeline import summary

# flytekit configures only its own logger; without this the library's progress lines vanish.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _workdir(name: str) -> Path:
    path = Path(current_context().working_directory) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@task
def resolve_config(path: str, overrides: str) -> FinetuneConfig:
    """Load and validate the config first: a typo fails here, before any data moves or GPU starts."""
    return load_config(path, parse_overrides(overrides))


@task
def copy_dataset(dataset_uri: str, test_uri: Optional[str]) -> FlyteDirectory:
    raw = _workdir("raw")
    data.copy_dataset(dataset_uri, raw, name="dataset")
    if test_uri:
        data.copy_dataset(test_uri, raw, name="test")
    return FlyteDirectory(str(raw))


@task
def prepare(raw: FlyteDirectory, cfg: FinetuneConfig) -> FlyteDirectory:
    raw_dir = Path(raw.download())
    dataset = next(raw_dir.glob("dataset.*"))
    test = next(raw_dir.glob("test.*"), None)
    out = _workdir("prepared")
    preparation.prepare(dataset, out, cfg, test_path=test)
    return FlyteDirectory(str(out))


@task(requests=Resources(cpu="2", mem="8Gi"))
def train(prepared: FlyteDirectory, cfg: FinetuneConfig) -> FlyteDirectory:
    out = _workdir("model")
    training.fit(Path(prepared.download()), out, cfg)
    return FlyteDirectory(str(out))


@task
def evaluate(model: FlyteDirectory, prepared: FlyteDirectory, cfg: FinetuneConfig) -> dict:
    return evaluation.evaluate(Path(model.download()), Path(prepared.download()),
                               batch_size=cfg.train.eval_batch_size)


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
