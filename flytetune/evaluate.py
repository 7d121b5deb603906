"""Predictions and classification metrics on a prepared split."""

import logging
from pathlib import Path

import numpy as np
import torch

from flytetune.batches import collate
from flytetune.store import FeatureStore

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, store: FeatureStore, batch_size: int, pad_id: int) -> np.ndarray:
    """Logits for every example of `store`, in index order (float32, shape [n, num_labels])."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Sorting by length keeps padding (wasted compute) small; results are put back in order.
    lengths = np.array([len(store[i]["input_ids"]) for i in range(len(store))])
    order = np.argsort(lengths, kind="stable")
    out = np.empty((len(store), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([store[int(i)] for i in idx], pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        out[idx] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    Confusion matrix rows are true labels and columns predicted labels, both in `labels` order.
    """
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    present = support > 0  # classes absent from this split would drag macro-F1 down for no reason
    return {
        "n_examples": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {
                "precision": round(float(precision[i]), 6),
                "recall": round(float(recall[i]), 6),
                "f1": round(float(f1[i]), 6),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "labels": list(labels),
        "confusion_matrix": confusion.tolist(),
    }


def evaluate(model_dir: Path, prepared_dir: Path, split: str = "test", batch_size: int = 128) -> dict:
    """Load the trained model from `model_dir` and score it on a prepared split."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    store = FeatureStore(Path(prepared_dir) / split)
    logits = predict_logits(model, store, batch_size, tokenizer.pad_token_id)
    metrics = classification_metrics(store.labels(), logits.argmax(axis=1), labels)
    metrics["split"] = split
    log.info("%s: accuracy %.4f, macro-F1 %.4f on %d examples",
             split, metrics["accuracy"], metrics["macro_f1"], metrics["n_examples"])
    return metrics
