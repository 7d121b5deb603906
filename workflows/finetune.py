"""The fine-tuning workflow: dataset URI in, copy, prepare, train, evaluate, publish, artifacts URI out.

    pyflyte run workflows/finetune.py finetune \
        [--dataset_uri URI] [--test_uri URI] [--output_uri URI] [--config PATH] [--overrides "k=v ..."]
        [--from_checkpoint latest|URI] [--preset cpu|t4|a100|a100-80gb|a100x4|h100x8]
"""

from typing import Optional

from flytekit import workflow

from flytetune.config import DEFAULT_CONFIG_PATH
from flytetune.pipeline import DEFAULT_DATASET_URI, DEFAULT_OUTPUT_URI
from tasks.finetune import (
    Published,
    copy_dataset,
    evaluate,
    prepare,
    publish,
    resolve_checkpoint,
    resolve_config,
    train_on_preset,
)


@workflow
def finetune(
    dataset_uri: str = DEFAULT_DATASET_URI,
    test_uri: Optional[str] = None,
    output_uri: str = DEFAULT_OUTPUT_URI,
    config: str = DEFAULT_CONFIG_PATH,
    overrides: str = "",
    from_checkpoint: Optional[str] = None,
    preset: str = "cpu",
) -> Published:
    """Fine-tune the configured backbone on `dataset_uri` and publish to `output_uri`.

    `overrides` changes any config value: "train.epochs=1 train.learning_rate=5e-5" (or bare
    field names when unambiguous: "epochs=1"). `from_checkpoint` starts training from a
    checkpoint: `latest` under checkpoint.uri, a step folder, or a run prefix. `preset` names the
    hardware in configs/presets/ (resources, GPU, spot, retries, timeout, processes).
    """
    cfg = resolve_config(path=config, overrides=overrides, preset=preset)
    resume_from = resolve_checkpoint(cfg=cfg, from_checkpoint=from_checkpoint)
    dataset = copy_dataset(dataset_uri=dataset_uri, test_uri=test_uri)
    prepared = prepare(raw_uri=dataset, cfg=cfg)
    model = train_on_preset(prepared=prepared, cfg=cfg, resume_from=resume_from, preset=preset)
    metrics = evaluate(model=model, prepared=prepared, cfg=cfg)
    return publish(model=model, prepared=prepared, metrics=metrics, cfg=cfg, output_uri=output_uri)
