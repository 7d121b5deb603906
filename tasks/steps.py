"""The CPU steps around training: check the inputs, copy, prepare, publish.

No torch is imported here or below: these tasks run in the light image (tasks/pods.py), so their
pods start without pulling the CUDA build of torch.
"""

import logging
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, Optional

from flytekit import task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from flytetune import artifacts, data, locations, storage
from flytetune import prepare as preparation
from flytetune.backbone import resolve_backbone
from flytetune.checkpoint_paths import resolve_resume
from flytetune.config import FinetuneConfig, load_config, parse_overrides
from flytetune.presets import load_preset
from tasks.context import durable_root, execution_prefix, workdir
from tasks.pods import LIGHT_IMAGE, pod_template, step

# flytekit configures only its own logger; without this the library's progress lines vanish.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class Resolved(NamedTuple):
    cfg: FinetuneConfig
    output_uri: str
    resume_from: Optional[str]


# Tasks that may read or write s3:// carry the AWS web identity (tasks/pods.py).
@task(container_image=LIGHT_IMAGE, pod_template=pod_template(), **step("resolve"))
def resolve(config: FinetuneConfig, overrides: str, preset: str, output_uri: str,
            from_checkpoint: Optional[str]) -> Resolved:
    """Check everything a user typed before data moves or a GPU starts: config, overrides, preset,
    backbone, where checkpoints and models go (object storage on a cluster, writable), and `--from_checkpoint`."""
    load_preset(preset)
    cfg = load_config(config.to_dict(), parse_overrides(overrides))
    resolve_backbone(cfg.model.backbone)
    cfg, output_uri = locations.resolve(cfg, output_uri, durable_root())
    locations.check_writable(cfg, output_uri)
    return Resolved(cfg=cfg, output_uri=output_uri, resume_from=resolve_resume(cfg, from_checkpoint))


@task(container_image=LIGHT_IMAGE, pod_template=pod_template(), **step("copy_dataset"))
def copy_dataset(dataset_uri: str, test_uri: Optional[str], kickoff_time: datetime) -> str:
    """Bring the dataset into the cluster's own cloud with flytetune.storage (verified, parallel),
    not through Flyte's fsspec transfer; returns the URI of the copy. A prefix of dated exports
    resolves to the newest complete one at or before `kickoff_time` (uncached on purpose)."""
    raw = workdir("raw")
    data.copy_dataset(dataset_uri, raw, test_uri=test_uri, at=kickoff_time)
    dest = execution_prefix("dataset")
    storage.sync(str(raw), dest)
    return dest


@task(container_image=LIGHT_IMAGE, **step("prepare"))
def prepare(raw_uri: str, cfg: FinetuneConfig) -> FlyteDirectory:
    raw, out = workdir("raw"), workdir("prepared")
    storage.sync(raw_uri, str(raw))
    preparation.prepare(raw, out, cfg)
    return FlyteDirectory(str(out))


class Published(NamedTuple):
    artifacts_uri: str
    test_metrics: dict


@task(container_image=LIGHT_IMAGE, pod_template=pod_template(), **step("publish"))
def publish(model: FlyteDirectory, prepared: FlyteDirectory, metrics: dict, details: Optional[FlyteFile],
            cfg: FinetuneConfig, output_uri: str) -> Published:
    meta = preparation.load_meta(Path(prepared.download()))
    extra = {metrics["details_file"]: Path(details.download())} if details is not None else None
    run_uri = artifacts.publish(Path(model.download()), output_uri, cfg.model.name, metrics=metrics,
                                config=cfg.to_dict(), data_meta=meta, extra_files=extra)
    return Published(artifacts_uri=run_uri, test_metrics=artifacts.summary(metrics))
