import json

import numpy as np
import pytest

from flytetune.evaluate import DETAILS_FILE, TOP_N, classification_metrics, write_details
from tasks import decks


def test_metrics_on_known_predictions():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 1])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3, abs=1e-6),
                                   "f1": pytest.approx(0.8), "support": 3}
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0.0) / 3)


def test_absent_classes_do_not_count_in_macro_f1():
    m = classification_metrics(np.array([0, 1]), np.array([0, 1]), ["a", "b", "c"])
    assert m["macro_f1"] == 1.0 and m["per_class"]["c"]["support"] == 0


def many_classes(k=5000, n=20_000, seed=0):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k, n)
    # Right 80% of the time; the mistakes pile up on class 0 for a known top confusion.
    y_pred = np.where(rng.random(n) < 0.8, y_true, 0)
    return y_true, y_pred, [f"class-{i:04d}" for i in range(k)]


def test_many_classes_keep_metrics_small(tmp_path):
    y_true, y_pred, labels = many_classes()
    m = classification_metrics(y_true, y_pred, labels)
    assert "per_class" not in m and "confusion_matrix" not in m and "labels" not in m
    assert len(json.dumps(m)) < 20_000, "a summary, not k x k numbers"
    assert m["accuracy"] == pytest.approx((y_true == y_pred).mean())
    summary = m["per_class_summary"]
    assert summary["classes"] == 5000 and summary["present"] == len(np.unique(y_true))
    assert len(summary["worst"]) == len(summary["best"]) == TOP_N
    f1 = [row["f1"] for row in summary["worst"]]
    assert f1 == sorted(f1) and summary["best"][0]["f1"] >= summary["worst"][-1]["f1"]
    assert len(m["top_confusions"]) == TOP_N
    top = m["top_confusions"][0]
    assert top["predicted"] == "class-0000" and top["true"] != top["predicted"]
    assert top["count"] == max(np.sum((y_true == t) & (y_pred == 0)) for t in range(1, 5000))
    assert (tmp_path / "x.html").write_text(decks.test_metrics({**m, "split": "test"}))


def test_full_tables_are_written_to_a_compact_file(tmp_path):
    y_true, y_pred, labels = many_classes()
    path = write_details(tmp_path / DETAILS_FILE, y_true, y_pred, labels)
    assert path.stat().st_size < 1_000_000
    with np.load(path) as details:
        assert details["labels"].tolist() == labels
        dense = np.zeros((5000, 5000), dtype=np.int64)
        dense[details["true"], details["predicted"]] = details["count"]
        expected = np.zeros_like(dense)
        np.add.at(expected, (y_true, y_pred), 1)
        assert np.array_equal(dense, expected)
        assert details["support"].tolist() == expected.sum(axis=1).tolist()


def test_few_classes_keep_the_full_output():
    m = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), ["a", "b"])
    assert m["confusion_matrix"] == [[1, 0], [1, 1]] and set(m["per_class"]) == {"a", "b"}
    assert "Confusion matrix" in decks.test_metrics({**m, "split": "test"})
