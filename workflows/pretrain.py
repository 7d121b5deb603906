"""Continued masked-language-model pretraining: text URI in, copy, prepare, pretrain, publish, backbone URI out.

    pyflyte run workflows/pretrain.py pretrain \
        [--text_uri URI] [--output_uri URI|auto] [--config configs/pretrain.yaml] [--overrides "k=v ..."]
        [--from_checkpoint latest|URI] [--preset cpu|t4|a100|a100-80gb|a100x4|h100x8]
        [--prepare_size auto|standard|large]

The same tasks as fine-tuning (resolve, the cached copy and prepare, training on a preset with
checkpoints and automatic resume, publish); only `train.objective: mlm` differs. The output is a
published version whose URI fine-tuning takes as its backbone:

    pyflyte run workflows/finetune.py finetune --overrides "model.backbone=<backbone_uri>"
"""

from pathlib import Path
from typing import Optional

from flytekit import workflow

from flytetune.config import AUTO, FinetuneConfig, load_config
from flytetune.data import DEFAULT_DATASET_URI
from flytetune.exports import NO_CUTOFF
from flytetune.presets import AUTO_SIZE
from tasks.finetune import train_on_preset
from tasks.steps import copy_and_prepare, publish_backbone, resolve

# Read where `pyflyte run` runs, like fine-tuning's config (workflows/finetune.py).
PRETRAIN_CONFIG = load_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain.yaml")


@workflow
def pretrain(
    text_uri: str = DEFAULT_DATASET_URI,
    output_uri: str = AUTO,
    config: FinetuneConfig = PRETRAIN_CONFIG,
    overrides: str = "",
    from_checkpoint: Optional[str] = None,
    preset: str = "cpu",
    prepare_size: str = AUTO_SIZE,
) -> str:
    """Continue the MLM pretraining of `model.backbone` on the text column of `text_uri` (CSV, parquet,
    JSON lines, or a folder of parts; labels, if any, are not read) or on its lines (a `.txt` file, one
    text per line), and publish the result under
    `output_uri`/`model.name`/<version>. Returns that version's URI."""
    run = resolve(config=config, overrides=overrides, preset=preset, output_uri=output_uri,
                  from_checkpoint=from_checkpoint, dataset_uri=text_uri, test_uri=None, kickoff_time=NO_CUTOFF,
                  retrain_anyway=True, prepared_uri="", init_from=None, prepare_size=prepare_size, objective="mlm")
    prepared = copy_and_prepare(dataset_uri=text_uri, test_uri=None, kickoff_time=NO_CUTOFF,
                                fingerprint=run.dataset_fingerprint, settings=run.prepare_settings,
                                prepare_size=run.prepare_size)
    model = train_on_preset(prepared=prepared, cfg=run.cfg, resume_from=run.resume_from, preset=preset,
                            init_from=run.init_from)
    return publish_backbone(model=model, prepared=prepared, cfg=run.cfg, output_uri=run.output_uri,
                            lineage=run.lineage)
