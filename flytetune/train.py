"""Fine-tune a sequence classifier on a prepared dataset.

`fit` is the whole training run: setup, the epoch loop with validation each epoch, and saving a
model folder that `AutoModelForSequenceClassification.from_pretrained` loads. Run as a module it
is the same pipeline the Flyte workflow runs, without Flyte:

    python -m flytetune.train --config configs/local.yaml [--dataset_uri URI] [--set train.epochs=1]
"""

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from flytetune.backbone import resolve_backbone
from flytetune.batches import EpochBatchSampler, collate
from flytetune.config import FinetuneConfig
from flytetune.evaluate import classification_metrics, predict_logits
from flytetune.prepare import load_meta
from flytetune.store import FeatureStore

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    global_step: int
    epochs_completed: int
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible GEMMs; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def build_model(cfg: FinetuneConfig, labels: list[str]) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # The load report lists the new classifier head as "missing", which is the point of fine-tuning.
    hf_logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_backbone(cfg.model.backbone),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        local_files_only=True,
    )


def build_optimizer(model: torch.nn.Module, cfg: FinetuneConfig, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    # Biases and LayerNorm weights are not decayed (standard BERT fine-tuning recipe).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.train.learning_rate,
    )
    warmup_steps = int(cfg.train.warmup_fraction * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    return optimizer, scheduler


def fit(prepared_dir: Path, output_dir: Path, cfg: FinetuneConfig) -> TrainResult:
    """Train on `prepared_dir` and write the model folder to `output_dir`."""
    from transformers import AutoTokenizer

    prepared_dir, output_dir = Path(prepared_dir), Path(output_dir)
    meta = load_meta(prepared_dir)
    tcfg = cfg.train
    seed_everything(tcfg.seed, tcfg.deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(prepared_dir / "tokenizer", local_files_only=True)
    model = build_model(cfg, meta["labels"]).to(device)
    train_store = FeatureStore(prepared_dir / "train")
    val_store = FeatureStore(prepared_dir / "validation")

    steps_per_epoch = math.ceil(len(train_store) / tcfg.batch_size)
    total_steps = tcfg.epochs * steps_per_epoch
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    log.info("training %s on %s: %d examples, %d steps (%d per epoch), device %s",
             cfg.model.backbone, prepared_dir, len(train_store), total_steps, steps_per_epoch, device)

    result = TrainResult(global_step=0, epochs_completed=0)
    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id)
    epochs_needed = math.ceil(total_steps / steps_per_epoch)
    for epoch in range(epochs_needed):
        sampler = EpochBatchSampler(len(train_store), tcfg.batch_size, tcfg.seed, epoch)
        loader = torch.utils.data.DataLoader(
            train_store, batch_sampler=sampler, collate_fn=collate_fn, num_workers=tcfg.num_workers
        )
        model.train()
        started, running_loss, seen = time.monotonic(), 0.0, 0
        for batch in loader:
            loss = train_step(model, optimizer, scheduler, batch, device, tcfg.max_grad_norm)
            result.global_step += 1
            running_loss, seen = running_loss + loss, seen + 1
            if result.global_step % tcfg.log_every_steps == 0:
                log.info("epoch %d step %d/%d loss %.4f lr %.2e", epoch, result.global_step, total_steps,
                         running_loss / seen, scheduler.get_last_lr()[0])
            if result.global_step >= total_steps:
                break
        val = validate(model, val_store, tcfg.eval_batch_size, tokenizer.pad_token_id, meta["labels"])
        record = {"epoch": epoch, "step": result.global_step, "train_loss": running_loss / max(seen, 1),
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
                  "epoch_s": round(time.monotonic() - started, 2)}
        result.history.append(record)
        result.epochs_completed = epoch + 1
        log.info("epoch %d done: train_loss %.4f val_loss %.4f val_accuracy %.4f val_macro_f1 %.4f (%.1fs)",
                 epoch, record["train_loss"], val["loss"], val["accuracy"], val["macro_f1"], record["epoch_s"])

    save_model(model, tokenizer, output_dir, cfg, result)
    return result


def train_step(model, optimizer, scheduler, batch: dict, device: torch.device, max_grad_norm: float) -> float:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def validate(model, store: FeatureStore, batch_size: int, pad_id: int, labels: list[str]) -> dict:
    logits = predict_logits(model, store, batch_size, pad_id)
    y_true = store.labels()
    log_probs = torch.log_softmax(torch.from_numpy(logits), dim=-1)
    loss = float(torch.nn.functional.nll_loss(log_probs, torch.from_numpy(y_true)))
    metrics = classification_metrics(y_true, logits.argmax(axis=1), labels)
    return {"loss": loss, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def save_model(model, tokenizer, output_dir: Path, cfg: FinetuneConfig, result: TrainResult) -> None:
    """Write weights (safetensors), tokenizer, label map, config and training history."""
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    (output_dir / "label_map.json").write_text(json.dumps({"labels": labels}, indent=2) + "\n")
    (output_dir / "finetune_config.yaml").write_text(cfg.to_yaml())
    history = {"global_step": result.global_step, "epochs_completed": result.epochs_completed,
               "history": result.history}
    (output_dir / "train_history.json").write_text(json.dumps(history, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    from flytetune.pipeline import main as pipeline_main

    return pipeline_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
