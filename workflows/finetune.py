"""The fine-tuning workflow: dataset URI in, copy, prepare, train, evaluate, publish, artifacts URI out.

    pyflyte run workflows/finetune.py finetune \
        [--dataset_uri URI] [--test_uri URI] [--output_uri URI|auto] [--config my.yaml] [--overrides "k=v ..."]
        [--from_checkpoint latest|URI] [--preset cpu|t4|a100|a100-80gb|a100x4|h100x8]
        [--prepare_size auto|standard|large]
        [--prepared_uri URI] [--init_from production|VERSION|URI] [--retrain_anyway]
"""

from datetime import datetime
from pathlib import Path
from typing import Optional

from flytekit import conditional, workflow

from flytetune.config import AUTO, DEFAULT_CONFIG_PATH, FinetuneConfig, load_config
from flytetune.data import DEFAULT_DATASET_URI
from flytetune.exports import NO_CUTOFF
from flytetune.presets import AUTO_SIZE
from tasks.finetune import evaluate, train_on_preset
from tasks.steps import Published, copy_and_prepare, prepared_data, publish, resolve

# The config is a typed input, read where `pyflyte run` runs: a YAML edited on a laptop travels with
# the execution (and shows in the UI), whatever the image holds.
DEFAULT_CONFIG = load_config(Path(__file__).resolve().parents[1] / DEFAULT_CONFIG_PATH)


@workflow
def finetune(
    dataset_uri: str = DEFAULT_DATASET_URI,
    test_uri: Optional[str] = None,
    output_uri: str = AUTO,
    config: FinetuneConfig = DEFAULT_CONFIG,
    overrides: str = "",
    from_checkpoint: Optional[str] = None,
    preset: str = "cpu",
    kickoff_time: datetime = NO_CUTOFF,
    retrain_anyway: bool = False,
    # "" rather than None: a None default is not a promise when the workflow is called from Python.
    prepared_uri: str = "",
    init_from: Optional[str] = None,
    prepare_size: str = AUTO_SIZE,
) -> Published:
    """Fine-tune the configured backbone on `dataset_uri` and publish to `output_uri`.

    `config` is a YAML (or JSON) file, read on the machine that starts the run. `overrides`
    changes any config value: "train.epochs=1 train.learning_rate=5e-5" (or bare field names when
    unambiguous: "epochs=1"). `output_uri` and `checkpoint.uri` default to `auto`: local folders
    on this machine, object storage on a cluster. `from_checkpoint` starts training from a
    checkpoint: `latest` (the newest of the most recent run), a run id, a step folder, or a run
    prefix. `preset` names the hardware in configs/presets/ (resources, GPU, spot, retries,
    timeout, processes). `prepare_size` names prepare's pod in configs/prepare_sizes.yaml (CPUs,
    memory, disk): `standard`, `large`, or `auto` (the default), which takes `standard` for up to
    256 MiB of located input (dataset and test files as stored) and `large` above; it is not part of
    prepare's cache key, so a run with another size reuses prepared data.
    When `dataset_uri` is a prefix of dated exports (`.../dt=YYYY-MM-DD/` folders, complete with
    `_SUCCESS`), the newest complete one dated at or before `kickoff_time` is used; the weekly
    schedule sets it, by hand it defaults to no cutoff (the newest). A run fails if that export is not
    newer than the one production was trained on, unless `retrain_anyway`.
    Copy and prepare are cached: unchanged data and data settings go straight to training.
    `prepared_uri` trains on an earlier run's prepared data (its manifest's `data.prepared_uri`);
    `init_from` warm-starts from a published model: `production`, a version, or a run folder URI.
    The new model is published, compared with production on the same rows (`gate` in the config),
    and promoted only if it is better; the output says whether, and why.
    """
    run = resolve(config=config, overrides=overrides, preset=preset, output_uri=output_uri,
                  from_checkpoint=from_checkpoint, dataset_uri=dataset_uri, test_uri=test_uri,
                  kickoff_time=kickoff_time, retrain_anyway=retrain_anyway, prepared_uri=prepared_uri,
                  init_from=init_from, prepare_size=prepare_size, objective="classification")
    prepared = (
        conditional("data")
        .if_(prepared_uri == "")
        .then(copy_and_prepare(dataset_uri=dataset_uri, test_uri=test_uri, kickoff_time=kickoff_time,
                               fingerprint=run.dataset_fingerprint, settings=run.prepare_settings,
                               prepare_size=run.prepare_size))
        .else_()
        .then(prepared_data(prepared_uri=prepared_uri))
    )
    model = train_on_preset(prepared=prepared, cfg=run.cfg, resume_from=run.resume_from, preset=preset,
                            init_from=run.init_from)
    evaluated = evaluate(model=model, prepared=prepared, cfg=run.cfg, output_uri=run.output_uri)
    return publish(model=model, prepared=prepared, metrics=evaluated.metrics, details=evaluated.details,
                   gate_decision=evaluated.gate, cfg=run.cfg, output_uri=run.output_uri, init_from=run.init_from,
                   lineage=run.lineage)
