"""The fine-tuning workflow: dataset URI in, copy, prepare, train, evaluate, publish, artifacts URI out.

    pyflyte run workflows/finetune.py finetune \
        [--dataset_uri URI] [--test_uri URI] [--output_uri URI|auto] [--config my.yaml] [--overrides "k=v ..."]
        [--from_checkpoint latest|URI] [--preset cpu|t4|a100|a100-80gb|a100x4|h100x8]
"""

from datetime import datetime
from pathlib import Path
from typing import Optional

from flytekit import workflow

from flytetune.config import AUTO, DEFAULT_CONFIG_PATH, FinetuneConfig, load_config
from flytetune.data import DEFAULT_DATASET_URI
from flytetune.exports import NO_CUTOFF
from tasks.finetune import evaluate, train_on_preset
from tasks.steps import Published, copy_dataset, prepare, publish, resolve

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
) -> Published:
    """Fine-tune the configured backbone on `dataset_uri` and publish to `output_uri`.

    `config` is a YAML (or JSON) file, read on the machine that starts the run. `overrides`
    changes any config value: "train.epochs=1 train.learning_rate=5e-5" (or bare field names when
    unambiguous: "epochs=1"). `output_uri` and `checkpoint.uri` default to `auto`: local folders
    on this machine, object storage on a cluster. `from_checkpoint` starts training from a
    checkpoint: `latest` (the newest of the most recent run), a run id, a step folder, or a run
    prefix. `preset` names the hardware in configs/presets/ (resources, GPU, spot, retries,
    timeout, processes).
    When `dataset_uri` is a prefix of dated exports (`.../dt=YYYY-MM-DD/` folders, complete with
    `_SUCCESS`), the newest complete one dated at or before `kickoff_time` is used; the weekly
    schedule sets it, by hand it defaults to no cutoff (the newest).
    """
    run = resolve(config=config, overrides=overrides, preset=preset, output_uri=output_uri,
                  from_checkpoint=from_checkpoint)
    dataset = copy_dataset(dataset_uri=dataset_uri, test_uri=test_uri, kickoff_time=kickoff_time)
    # A typo fails in `resolve`, before any data moves (`>>` on one output: a multi-output call ignores it).
    run.cfg >> dataset
    prepared = prepare(raw_uri=dataset, cfg=run.cfg)
    model = train_on_preset(prepared=prepared, cfg=run.cfg, resume_from=run.resume_from, preset=preset)
    evaluated = evaluate(model=model, prepared=prepared, cfg=run.cfg)
    return publish(model=model, prepared=prepared, metrics=evaluated.metrics, details=evaluated.details,
                   cfg=run.cfg, output_uri=run.output_uri)
