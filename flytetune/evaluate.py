"""Predictions and classification metrics on a prepared split."""

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import torch

from flytetune.store import FeatureStore

log = logging.getLogger(__name__)

# Above this many classes metrics.json keeps summaries and the full tables go to DETAILS_FILE.
FULL_METRICS_MAX_CLASSES = 50
# Worst and best classes, and most frequent confusions, kept in a summary.
TOP_N = 20
# Written next to the model files, so that publishing the model folder publishes it too.
DETAILS_FILE = "confusion_matrix.npz"


@torch.no_grad()
def predict_logits(model: torch.nn.Module, store: FeatureStore, batch_size: int, pad_id: int,
                   indices: np.ndarray | None = None, autocast: torch.dtype | None = None) -> np.ndarray:
    """Logits for the examples `indices` of `store` (all, by default), in that order (float32, shape
    [n, num_labels]); the forward pass under `autocast` when given (bf16/fp16 on a GPU)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    indices = np.arange(len(store)) if indices is None else np.asarray(indices)
    # Sorting by length keeps padding (wasted compute) small; results are put back in order.
    order = np.argsort(store.lengths()[indices], kind="stable")
    out = np.empty((len(indices), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = store.batch(indices[rows].tolist(), pad_id)  # one transaction, padded with numpy
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
        out[rows] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], *,
                           max_full_classes: int = FULL_METRICS_MAX_CLASSES, top_n: int = TOP_N) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    Up to `max_full_classes` classes: `per_class` for every label, and `confusion_matrix` with rows
    for true labels and columns for predicted labels, both in `labels` order. Above that both grow
    too large to read or ship (5,000 classes: 226 MB of JSON), so they are replaced by
    `per_class_summary` (counts, and the `top_n` worst and best classes by F1) and `top_confusions`
    (the `top_n` most frequent mistakes); `write_details` stores the full tables.
    """
    k = len(labels)
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    precision, recall, f1, support = per_class_scores(y_true, y_pred, k)
    present = support > 0  # classes absent from this split would drag macro-F1 down for no reason
    metrics = {
        "n_examples": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }
    rows = {
        label: {"precision": round(float(precision[i]), 6), "recall": round(float(recall[i]), 6),
                "f1": round(float(f1[i]), 6), "support": int(support[i])}
        for i, label in enumerate(labels)
    }
    if k <= max_full_classes:
        confusion = np.zeros((k, k), dtype=np.int64)
        np.add.at(confusion, (y_true, y_pred), 1)
        return {**metrics, "per_class": rows, "labels": list(labels), "confusion_matrix": confusion.tolist()}

    # Worst first; ties by label so that the lists do not depend on dict order.
    ranked = sorted((label for i, label in enumerate(labels) if present[i]),
                    key=lambda label: (rows[label]["f1"], label))
    true, predicted, count = _confusion_cells(y_true, y_pred, k)
    mistakes = np.flatnonzero(true != predicted)
    worst = mistakes[np.lexsort((true[mistakes], -count[mistakes]))][:top_n]
    return {
        **metrics,
        "n_classes": k,
        "per_class_summary": {
            "classes": k,
            "present": int(present.sum()),
            "f1_zero": int((f1[present] == 0).sum()),
            "worst": [{"label": label, **rows[label]} for label in ranked[:top_n]],
            "best": [{"label": label, **rows[label]} for label in ranked[::-1][:top_n]],
        },
        "top_confusions": [
            {"true": labels[true[i]], "predicted": labels[predicted[i]], "count": int(count[i])} for i in worst
        ],
    }


def per_class_scores(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    # Counts per class without a k x k matrix (200 MB at 5,000 classes).
    tp = np.bincount(y_true[y_true == y_pred], minlength=k).astype(np.float64)
    predicted = np.bincount(y_pred, minlength=k).astype(np.float64)
    support = np.bincount(y_true, minlength=k).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    return precision, recall, f1, support


def _confusion_cells(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """The non-zero cells of the confusion matrix: (true index, predicted index, count), row-major."""
    cells, count = np.unique(y_true * k + y_pred, return_counts=True)
    return cells // k, cells % k, count


def write_details(path: Path, y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> Path:
    """Write the full per-class table and the confusion matrix as its non-zero cells (COO) to `path`.

    Read back with `np.load(path)`: `labels`; per class `precision`, `recall`, `f1`, `support`;
    and `true`, `predicted`, `count` (label indices and counts of every non-zero cell).
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = len(labels)
    precision, recall, f1, support = per_class_scores(y_true, y_pred, k)
    true, predicted, count = _confusion_cells(y_true, y_pred, k)
    np.savez_compressed(path, labels=np.array(labels, dtype=str), precision=precision, recall=recall, f1=f1,
                        support=support.astype(np.int64), true=true, predicted=predicted, count=count)
    return Path(path)


class Predictions(NamedTuple):
    """A model's logits on a prepared split, in the split's store order."""

    split: str
    labels: list[str]  # class names by index
    y_true: np.ndarray  # int64, [n]
    logits: np.ndarray  # float32, [n, len(labels)]


def predict(model_dir: Path, prepared_dir: Path, split: str = "test", batch_size: int = 128) -> Predictions:
    """Load the trained model from `model_dir` and predict every example of a prepared split."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    store = FeatureStore(Path(prepared_dir) / split)
    logits = predict_logits(model, store, batch_size, tokenizer.pad_token_id)
    return Predictions(split=split, labels=labels, y_true=store.labels(), logits=logits)


def score(predictions: Predictions, model_dir: Path) -> dict:
    """The metrics of `evaluate` from predictions (the details file, if any, is written to `model_dir`)."""
    y_true, y_pred, labels = predictions.y_true, predictions.logits.argmax(axis=1), predictions.labels
    metrics = classification_metrics(y_true, y_pred, labels)
    metrics["split"] = predictions.split
    if "confusion_matrix" not in metrics:
        metrics["details_file"] = write_details(Path(model_dir) / DETAILS_FILE, y_true, y_pred, labels).name
    log.info("%s: accuracy %.4f, macro-F1 %.4f on %d examples",
             predictions.split, metrics["accuracy"], metrics["macro_f1"], metrics["n_examples"])
    return metrics


def evaluate(model_dir: Path, prepared_dir: Path, split: str = "test", batch_size: int = 128) -> dict:
    """Load the trained model from `model_dir` and score it on a prepared split.

    Above FULL_METRICS_MAX_CLASSES classes the full per-class table and confusion matrix are written
    to `model_dir/confusion_matrix.npz` (named by the metrics' `details_file`), not returned.
    """
    return score(predict(model_dir, prepared_dir, split, batch_size), model_dir)


def worst_examples(predictions: Predictions, prepared_dir: Path, n: int = 20) -> list[dict]:
    """The `n` misclassified test rows the model was surest of, surest first: {"row" (0-based, in the
    test split), "text", "label", "predicted", "confidence" (probability of the prediction),
    "label_probability"}.

    Texts come from the prepared `test_texts.parquet`, written in the test store's order. That is
    checked, so that a folder out of step fails here instead of showing texts next to another row's
    prediction: all labels against the store's, and the tokens of each row returned against its stored tokens.
    """
    from transformers import AutoTokenizer

    from flytetune.data import LABEL, TEXT  # data and prepare import storage (boto3): only when asked
    from flytetune.prepare import TEST_TEXTS, load_meta

    if predictions.split != "test":
        raise ValueError(f"worst_examples: texts are kept for the test split only, not {predictions.split!r}")
    prepared_dir = Path(prepared_dir)
    path = prepared_dir / TEST_TEXTS
    table = pl.read_parquet(path)
    truth = [predictions.labels[i] for i in predictions.y_true]
    if table.get_column(LABEL).to_list() != truth:
        raise ValueError(f"{path}: labels differ from the test store's ({table.height} rows, store "
                         f"{len(truth)}); the prepared folder is inconsistent, prepare it again")
    logits = predictions.logits.astype(np.float64)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(predicted)), predicted]
    wrong = np.flatnonzero(predicted != predictions.y_true)
    # Surest first; ties by row so that the list does not depend on sort stability.
    chosen = [int(i) for i in wrong[np.lexsort((wrong, -confidence[wrong]))][:n]]
    texts = [table.get_column(TEXT)[i] for i in chosen]
    if chosen:
        tokenizer = AutoTokenizer.from_pretrained(prepared_dir / "tokenizer", local_files_only=True)
        encoded = tokenizer(texts, truncation=True, max_length=load_meta(prepared_dir)["max_length"])["input_ids"]
        store = FeatureStore(prepared_dir / predictions.split)
        for i, ids in zip(chosen, encoded, strict=True):
            if list(ids) != store[i]["input_ids"].tolist():
                raise ValueError(f"{path}: row {i} is not the test store's example {i} (other tokens); the prepared "
                                 "folder is inconsistent, prepare it again")
    return [{"row": i, "text": text, "label": truth[i], "predicted": predictions.labels[predicted[i]],
             "confidence": round(float(confidence[i]), 4),
             "label_probability": round(float(probabilities[i, predictions.y_true[i]]), 4)}
            for i, text in zip(chosen, texts, strict=True)]
