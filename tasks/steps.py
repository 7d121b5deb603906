"""The CPU steps around training: check the inputs, copy, prepare, publish.

No torch is imported here or below: these tasks run in the light image (tasks/pods.py), so their
pods start without pulling the CUDA build of torch.
"""

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, NamedTuple, Optional

from flytekit import Deck, HashMethod, dynamic, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from flytetune import artifacts, data, gate, locations, run_inputs, storage
from flytetune import prepare as preparation
from flytetune.backbone import check_backbone, tokenizer_fingerprint
from flytetune.checkpoint_paths import resolve_resume
from flytetune.config import ConfigError, DataConfig, FinetuneConfig, ModelConfig, load_config, parse_overrides
from flytetune.presets import AUTO_SIZE, check_prepare_size, choose_prepare_size, load_preset
from flytetune.storage.checksums import file_sha256
from tasks import decks
from tasks.context import durable_root, execution_prefix, workdir
from tasks.pods import LIGHT_IMAGE, PREPARE_SIZES, pod_template, prepare_resources, step

# flytekit configures only its own logger; without this the library's progress lines vanish.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger(__name__)


# Bump when copy_dataset's or prepare's output changes for the same inputs (a new file in the prepared
# folder, another tokenisation): cached results of older code are then not reused.
COPY_CACHE_VERSION = "2"  # 2: an export is copied as a folder of its parts, hashed part by part
PREPARE_CACHE_VERSION = "3"  # 3: the split follows seeded text keys (partitioned prepare)


@dataclass
class PrepareSettings:
    """Everything that changes prepared data besides the dataset: prepare's cache key, with the dataset's hash."""

    data: DataConfig
    backbone: str
    # Of the backbone's tokenizer files: a model package upgraded in the image invalidates cached data.
    tokenizer_sha256: str


class Resolved(NamedTuple):
    cfg: FinetuneConfig
    output_uri: str
    resume_from: Optional[str]
    # What copy_dataset will copy (storage.fingerprint of the located files): copy's cache key; "" with prepared_uri.
    dataset_fingerprint: str
    prepare_settings: PrepareSettings
    # The published run folder to warm-start from, or None.
    init_from: Optional[str]
    # Where this run's data came from (sources, exports). Not read from prepared data: a cache hit may
    # have been prepared from the same bytes under another URI.
    lineage: dict
    # The prepare pod's size (configs/prepare_sizes.yaml): the one asked for, or what `auto` chose.
    prepare_size: str


# Tasks that may read or write s3:// carry the AWS web identity (tasks/pods.py).
@task(container_image=LIGHT_IMAGE, pod_template=pod_template(), **step("resolve"))
def resolve(config: FinetuneConfig, overrides: str, preset: str, output_uri: str, from_checkpoint: Optional[str],
            dataset_uri: str, test_uri: Optional[str], kickoff_time: datetime, retrain_anyway: bool,
            prepared_uri: str, init_from: Optional[str], prepare_size: str, objective: str) -> Resolved:
    """Check everything a user typed before data moves or a GPU starts: config, overrides, preset,
    prepare size, backbone, where checkpoints and models go (object storage on a cluster, writable),
    `--from_checkpoint`, the data (an export newer than production's), `--prepared_uri`, `--init_from`
    and `gate.eval_uri`; choose the prepare size for `auto` from the located data's bytes. `objective`
    is what the calling workflow trains (train.objective must say the same)."""
    load_preset(preset)
    check_prepare_size(prepare_size, PREPARE_SIZES)
    cfg = load_config(config.to_dict(), parse_overrides(overrides))
    if cfg.train.objective != objective:
        raise ConfigError(f"train.objective: is {cfg.train.objective!r} but this workflow trains {objective!r}; "
                          f"use a config for it (configs/{'pretrain' if objective == 'mlm' else 'local'}.yaml)")
    check_backbone(cfg.model.backbone)
    cfg, output_uri = locations.resolve(cfg, output_uri, durable_root())
    locations.check_writable(cfg, output_uri)
    run_inputs.check_eval_uri(cfg)
    fingerprint, input_bytes = "", None
    if prepared_uri:
        meta = run_inputs.check_prepared(prepared_uri, cfg)
        lineage = {"sources": meta["sources"], "exports": meta.get("exports") or {}}
    else:
        located = data.locate(dataset_uri, test_uri, kickoff_time)
        run_inputs.check_new_data(located, output_uri, cfg.model.name, retrain_anyway)
        fingerprint, lineage = data.fingerprint(located), data.lineage(located)
        if prepare_size == AUTO_SIZE:
            input_bytes = data.total_bytes(located)
    size = choose_prepare_size(prepare_size, input_bytes, PREPARE_SIZES)
    if prepare_size == AUTO_SIZE and input_bytes is not None:
        log.info("prepare size %s: chosen for %d bytes of input (prepare_size auto)", size, input_bytes)
    init_uri = run_inputs.resolve_init_from(init_from, output_uri, cfg.model.name) if init_from else None
    settings = PrepareSettings(data=cfg.data, backbone=cfg.model.backbone,
                               tokenizer_sha256=tokenizer_fingerprint(cfg.model.backbone))
    return Resolved(cfg=cfg, output_uri=output_uri, resume_from=resolve_resume(cfg, from_checkpoint),
                    dataset_fingerprint=fingerprint, prepare_settings=settings, init_from=init_uri, lineage=lineage,
                    prepare_size=size)


@dataclass
class Dataset:
    """The run's copy of its data files, and their SHA-256 (prepare's cache key, via HashMethod)."""

    uri: str
    sha256: str


# Cached by what is copied (the located objects' fingerprint), not by when: the weekly kickoff time
# changes every week, the data may not. A re-run with unchanged data skips the copy.
@task(container_image=LIGHT_IMAGE, pod_template=pod_template(), cache=True, cache_version=COPY_CACHE_VERSION,
      cache_ignore_input_vars=("kickoff_time",), **step("copy_dataset"))
def copy_dataset(dataset_uri: str, test_uri: Optional[str], kickoff_time: datetime,
                 fingerprint: str) -> Annotated[Dataset, HashMethod(lambda d: d.sha256)]:
    """Bring the dataset into the cluster's own cloud with flytetune.storage (verified, parallel),
    not through Flyte's fsspec transfer. A prefix of dated exports resolves to the newest complete
    one at or before `kickoff_time`; the copy refuses data that changed since `resolve` saw it."""
    raw = workdir("raw")
    sources = data.copy_dataset(dataset_uri, raw, test_uri=test_uri, at=kickoff_time, expect_fingerprint=fingerprint)
    dest = execution_prefix("dataset")
    storage.sync(str(raw), dest)
    # The bytes of every data file, a folder's parts in name order: prepared meta's dataset_sha256 too.
    return Dataset(uri=dest, sha256=file_sha256(*data.source_files(raw, sources)))


# Keyed by the dataset's content (its HashMethod) and the data settings, not the whole config: a
# change of epochs or learning rate reuses the prepared data, a change of max_length does not.
# A cache hit runs nothing, so it shows no Deck: the execution that prepared the data has it.
# Resources: the smallest prepare size; in the workflow, copy_and_prepare applies the run's size.
@task(container_image=LIGHT_IMAGE, cache=True, cache_version=PREPARE_CACHE_VERSION, enable_deck=True,
      **prepare_resources())
def prepare(dataset: Dataset, settings: PrepareSettings) -> FlyteDirectory:
    raw, out = workdir("raw"), workdir("prepared")
    storage.sync(dataset.uri, str(raw))
    meta = preparation.prepare(raw, out, FinetuneConfig(data=settings.data,
                                                        model=ModelConfig(backbone=settings.backbone)))
    Deck("Dataset profile", decks.dataset_profile(meta))
    return FlyteDirectory(str(out))


# A dynamic, so that the size is chosen per run and is not part of prepare's cache key: with_overrides
# on prepare's node, as train_on_preset applies a preset. The copy is inside it too: prepare's dataset
# input is then a promise of the copy's output, which carries the HashMethod hash prepare is keyed by.
# A dynamic's own inputs reach its nodes as plain values (a BindingData scalar has no hash), so a
# dynamic around prepare alone would key prepare by this execution's copy URI: never a hit.
@dynamic(container_image=LIGHT_IMAGE, **step("copy_and_prepare"))
def copy_and_prepare(dataset_uri: str, test_uri: Optional[str], kickoff_time: datetime, fingerprint: str,
                     settings: PrepareSettings, prepare_size: str) -> FlyteDirectory:
    """Copy the located data into the cluster's cloud, then validate, split and tokenise it (both cached)
    on the pod of `prepare_size` (configs/prepare_sizes.yaml; chosen in resolve)."""
    dataset = copy_dataset(dataset_uri=dataset_uri, test_uri=test_uri, kickoff_time=kickoff_time,
                           fingerprint=fingerprint).with_overrides(node_name="copy-dataset")
    return prepare(dataset=dataset, settings=settings).with_overrides(node_name=f"prepare-{prepare_size}",
                                                                      **prepare_resources(prepare_size))


@task(container_image=LIGHT_IMAGE, pod_template=pod_template(), **step("resolve"))
def prepared_data(prepared_uri: str) -> FlyteDirectory:
    """`--prepared_uri`: an earlier run's prepared data (checked in resolve), used as it is."""
    return FlyteDirectory(prepared_uri)


class Published(NamedTuple):
    artifacts_uri: str
    test_metrics: dict
    # Whether this version now serves as production, and why (the gate's reason, or why not).
    promoted: bool
    reason: str


@task(container_image=LIGHT_IMAGE, pod_template=pod_template(), **step("publish"))
def publish(model: FlyteDirectory, prepared: FlyteDirectory, metrics: dict, details: Optional[FlyteFile],
            gate_decision: dict, cfg: FinetuneConfig, output_uri: str, init_from: Optional[str],
            lineage: dict) -> Published:
    """Publish the version (the gate's decision in its manifest), then move production to it if the gate passed."""
    meta = {**preparation.load_meta(Path(prepared.download())), **lineage, "prepared_uri": prepared.remote_source}
    extra = {metrics["details_file"]: Path(details.download())} if details is not None else None
    run_uri = artifacts.publish(Path(model.download()), output_uri, cfg.model.name, metrics=metrics,
                                config=cfg.to_dict(), data_meta=meta, extra_files=extra, gate=gate_decision,
                                init_from=init_from)
    outcome = gate.promote_if_passed(output_uri, cfg, run_uri, gate_decision)
    return Published(artifacts_uri=run_uri, test_metrics=artifacts.summary(metrics), **outcome)


@task(container_image=LIGHT_IMAGE, pod_template=pod_template(), **step("publish"))
def publish_backbone(model: FlyteDirectory, prepared: FlyteDirectory, cfg: FinetuneConfig, output_uri: str,
                     lineage: dict) -> str:
    """Publish the pretrained backbone as a version; its URI is what fine-tuning names as model.backbone."""
    meta = {**preparation.load_meta(Path(prepared.download())), **lineage, "prepared_uri": prepared.remote_source}
    return artifacts.publish_backbone(Path(model.download()), output_uri, cfg.model.name, config=cfg.to_dict(),
                                      data_meta=meta)
