"""What the Decks show: the profile prepare records, the worst test examples, and the HTML built from
them (tasks/decks.py). Rendering in a browser is tests/test_decks_browser.py."""

import json
import re
import shutil

import numpy as np
import polars as pl
import pytest

from flytetune.config import DataConfig, FinetuneConfig
from flytetune.evaluate import Predictions, classification_metrics, worst_examples
from flytetune.prepare import TEST_TEXTS, load_meta
from flytetune.store import FeatureStore
from tasks import decks
from tests.test_data import frame, prepare_csv


def plot_kinds(page: str) -> list[str]:
    return re.findall(r'<svg [^>]*class="flytetune-plot" data-plot="(\w+)"', page)


def svgs(page: str) -> list[str]:
    return re.findall(r"<svg .*?</svg>", page, re.S)


def test_prepare_records_what_the_dataset_profile_shows(tmp_path):
    long_text = "an unusually long description " * 20
    df = pl.concat([frame(n_per_class=10),
                    pl.DataFrame({"text": ["a text 0", "a text 0", "b text 1", long_text],
                                  "label": ["a", "a", "a", "c"]})])  # 2 duplicates, 1 conflict, 1 long text
    meta = prepare_csv(tmp_path, df, FinetuneConfig(data=DataConfig(min_examples_per_class=3, max_length=16)))
    profile = meta["profile"]
    source = str(tmp_path / "d.csv")
    assert profile["duplicates_dropped"] == {"dataset": 2} and profile["conflicting_label_rows"] == {"dataset": 2}
    assert profile["warnings"] == [
        f"{source}: dropped 2 exact duplicate row(s) of (text, label), e.g. row(s) 1, 31, 32",
        f"{source}: 2 row(s) share a text with a different label (ambiguous or mislabelled), e.g. row(s) 12, 33",
    ]
    histogram = profile["token_length_histogram"]
    assert histogram["edges"][-2:] == [16, 17] and len(histogram["counts"]) == len(histogram["edges"]) - 1
    assert sum(histogram["counts"]) == sum(meta["rows"].values())
    assert histogram["counts"][-1] == sum(meta["truncated"].values()) >= 1, "the last bin: cut at max_length"
    assert max(s["max"] for s in profile["token_length"].values()) == 16
    assert profile["subsampled"] is None
    assert json.loads((tmp_path / "prepared" / "meta.json").read_text())["profile"] == profile


def test_a_test_file_gets_its_own_counts_and_the_overlap_warning(tmp_path):
    test = pl.concat([frame(n_per_class=2), frame(n_per_class=1)])  # its first rows are training texts, repeated
    meta = prepare_csv(tmp_path, frame(), FinetuneConfig(data=DataConfig(min_examples_per_class=3, max_rows=20)),
                       test_df=test)
    profile = meta["profile"]
    assert profile["duplicates_dropped"] == {"dataset": 0, "test": 3}
    assert profile["warnings"][-1].endswith("test text(s) also appear in the training data; test metrics are "
                                            "optimistic")
    assert profile["subsampled"] == {"valid_rows": 30, "kept": 20}


def test_test_texts_are_in_the_test_store_order(prepared_tiny):
    """worst_examples pairs row i of test_texts.parquet with example i of the test store."""
    from transformers import AutoTokenizer

    meta = load_meta(prepared_tiny)
    texts = pl.read_parquet(prepared_tiny / TEST_TEXTS)
    store = FeatureStore(prepared_tiny / "test")
    assert [meta["label2id"][label] for label in texts.get_column("label")] == store.labels().tolist()
    tokenizer = AutoTokenizer.from_pretrained(prepared_tiny / "tokenizer")
    encoded = tokenizer(texts.get_column("text").to_list(), truncation=True, max_length=meta["max_length"])
    assert [list(ids) for ids in encoded["input_ids"]] == [store[i]["input_ids"].tolist() for i in range(len(store))]


def predictions_with_mistakes(prepared_dir, wrong: dict[int, float]) -> Predictions:
    """Right on every test row except `wrong` (row -> logit of the wrong class; the right one has 5)."""
    labels = load_meta(prepared_dir)["labels"]
    y_true = FeatureStore(prepared_dir / "test").labels()
    logits = np.zeros((len(y_true), len(labels)), dtype=np.float32)
    logits[np.arange(len(y_true)), y_true] = 5.0
    for row, logit in wrong.items():
        logits[row, (y_true[row] + 1) % len(labels)] = logit
    return Predictions(split="test", labels=labels, y_true=y_true, logits=logits)


def test_worst_examples_are_the_surest_mistakes(prepared_tiny):
    predictions = predictions_with_mistakes(prepared_tiny, {3: 9.0, 7: 7.0, 11: 8.0})
    worst = worst_examples(predictions, prepared_tiny, n=2)
    texts = pl.read_parquet(prepared_tiny / TEST_TEXTS)
    assert [w["row"] for w in worst] == [3, 11]
    first, labels = worst[0], predictions.labels
    assert first["text"] == texts.get_column("text")[3] and first["label"] == texts.get_column("label")[3]
    assert first["predicted"] == labels[(predictions.y_true[3] + 1) % len(labels)]
    # softmax over 9 (wrong), 5 (right) and zeros elsewhere
    denominator = np.exp(9) + np.exp(5) + len(labels) - 2
    assert first["confidence"] == pytest.approx(np.exp(9) / denominator, abs=1e-4)
    assert first["label_probability"] == pytest.approx(np.exp(5) / denominator, abs=1e-4)
    assert worst_examples(predictions_with_mistakes(prepared_tiny, {}), prepared_tiny) == []


def test_worst_examples_refuse_texts_out_of_step_with_the_store(prepared_tiny, tmp_path):
    texts = pl.read_parquet(prepared_tiny / TEST_TEXTS)
    folder = tmp_path / "prepared"
    shutil.copytree(prepared_tiny, folder)
    # The test split is grouped by label: texts sorted within each label keep every label in place.
    moved = texts.sort("label", "text")
    moved.write_parquet(folder / TEST_TEXTS)
    assert moved.get_column("label").equals(texts.get_column("label"))
    row = int(np.flatnonzero(moved.get_column("text").to_numpy() != texts.get_column("text").to_numpy())[0])
    predictions = predictions_with_mistakes(prepared_tiny, {row: 9.0})
    with pytest.raises(ValueError, match=rf"test_texts.parquet: row {row} is not the test store's example {row} "
                                         r"\(other tokens\); the prepared folder is inconsistent, prepare it again$"):
        worst_examples(predictions, folder)
    texts.head(39).write_parquet(folder / TEST_TEXTS)
    with pytest.raises(ValueError, match=r"test_texts.parquet: labels differ from the test store's \(39 rows, "
                                         r"store 40\); the prepared folder is inconsistent, prepare it again$"):
        worst_examples(predictions, folder)
    with pytest.raises(ValueError, match=r"^worst_examples: texts are kept for the test split only, not 'validation'"):
        worst_examples(predictions._replace(split="validation"), prepared_tiny)


def test_dataset_profile_deck(prepared_tiny):
    meta = load_meta(prepared_tiny)
    page = decks.dataset_profile(meta)
    assert plot_kinds(page) == ["bar", "histogram"]
    assert meta["dataset_sha256"] in page and "Rows per split" in page and "<b>Warnings</b>" in page
    # Prepared by code older than the profile (a cached result, --prepared_uri): counts and labels only.
    older = {k: v for k, v in meta.items() if k != "profile"}
    assert plot_kinds(decks.dataset_profile(older)) == ["bar"]


def test_test_metrics_deck_switches_to_top_confusions_with_many_classes():
    rng = np.random.default_rng(0)
    few = classification_metrics(rng.integers(0, 5, 200), rng.integers(0, 5, 200), list("abcde"))
    worst = [{"row": 4, "text": "<b>ALDI</b>", "label": "a", "predicted": "b", "confidence": 0.9,
              "label_probability": 0.05}]
    page = decks.test_metrics({**few, "split": "test"}, worst)
    assert plot_kinds(page) == ["heatmap", "bar"]
    assert "<td>&lt;b&gt;ALDI&lt;/b&gt;</td>" in page and "Most confident mistakes" in page
    labels = [f"c{i}" for i in range(35)]  # above the heatmap's limit, below metrics' summary limit
    many = classification_metrics(rng.integers(0, 35, 500), rng.integers(0, 35, 500), labels)
    assert plot_kinds(decks.test_metrics({**many, "split": "test"}, [])) == ["bar", "bar"]
    assert "Most frequent confusions" in decks.test_metrics({**many, "split": "test"})
    summary = classification_metrics(rng.integers(0, 60, 500), rng.integers(0, 60, 500), [f"c{i}" for i in range(60)])
    assert plot_kinds(decks.test_metrics({**summary, "split": "test"})) == ["bar", "bar"]


def test_gate_deck_compares_with_production_under_the_decision():
    decision = {"promote": True, "reason": "first model: no production version yet", "metric": "macro_f1",
                "improvement": None, "class_drops": [], "production_version": None,
                "eval_sets": {"test split": {"rows": 40}}, "production": None,
                "candidate": {"n_examples": 40, "accuracy": 0.6, "macro_f1": 0.5}}
    page = decks.gate(decision)
    assert page.startswith("<p><b>promote</b>: first model") and plot_kinds(page) == ["bar"]
    chart = page.split("</svg>")[0]
    assert "accuracy: 0.6" in chart and 'class="legend"' not in chart, "one series: this run's"
    against = {**decision, "promote": False, "reason": "worse", "production_version": "v1",
               "production": {"n_examples": 40, "accuracy": 0.7, "macro_f1": 0.6},
               "class_drops": [{"label": "c", "production_f1": 0.9, "candidate_f1": 0.5, "drop": 0.4, "support": 30}]}
    page = decks.gate(against)
    assert page.startswith("<p><b>not promoted</b>: worse") and plot_kinds(page) == ["bar", "bar"]
    assert "production v1: 0.7" in page and "c, production F1: 0.9" in page


def test_gate_deck_shows_f1_per_class_against_production():
    from flytetune.gate import per_class, score

    truth = ["a"] * 30 + ["b"] * 30
    ours = score(truth, ["a"] * 30 + ["b"] * 10 + ["a"] * 20)
    theirs = score(truth, ["a"] * 30 + ["b"] * 30)
    rows = per_class(ours, theirs)
    assert [r["label"] for r in rows] == ["b", "a"], "the largest loss first"
    assert rows[0] == {"label": "b", "support": 30, "candidate_f1": 0.5, "production_f1": 1.0, "change": -0.5}
    decision = {"promote": False, "reason": "worse", "metric": "macro_f1", "improvement": -0.3, "class_drops": [],
                "production_version": "v1", "eval_sets": {"test split": {"rows": 60}},
                "production": {"n_examples": 60, "accuracy": 1.0, "macro_f1": 1.0},
                "candidate": {"n_examples": 60, "accuracy": 0.67, "macro_f1": 0.64}, "per_class": rows}
    chart = svgs(decks.gate(decision))[1]
    assert "F1 per class on the same rows, largest loss against production first" in chart
    assert "b, production v1: 1" in chart and "b, this run: 0.5" in chart
    first = per_class(ours, None)
    assert first[0] == {"label": "b", "support": 30, "candidate_f1": 0.5, "production_f1": None, "change": None}
    alone = decks.gate({**decision, "production": None, "production_version": None, "per_class": first})
    chart = svgs(alone)[1]
    assert "<title>b: 0.5</title>" in chart and "production" not in chart


def recorded_result(events, steps, history, global_step, total_steps=300):
    from flytetune.train import TrainResult

    return TrainResult(global_step=global_step, epochs_completed=len(history), history=history, steps=steps,
                       events=events, total_steps=total_steps)


STEPS = [{"step": s, "epoch": 0, "loss": 2.0 - s / 200, "lr": 1e-4, "samples_per_s": 900.0, "tokens_per_s": 21000.0,
          "elapsed_s": s * 3.0, "gpu_max_mem_gib": 3.2, "gpu_util_pct": 87} for s in range(25, 301, 25)]
HISTORY = [{"epoch": 0, "step": 150, "train_loss": 1.6, "val_loss": 1.2, "val_accuracy": 0.71, "val_macro_f1": 0.66},
           {"epoch": 1, "step": 300, "train_loss": 0.9, "val_loss": 0.8, "val_accuracy": 0.83, "val_macro_f1": 0.8}]


def test_training_deck_of_a_run_preempted_once():
    from tests.test_timeline import PREEMPTED_ONCE

    page = decks.training(recorded_result(PREEMPTED_ONCE, STEPS, HISTORY, 300), preset="a100", hourly_usd=3.6,
                          running=False)
    assert plot_kinds(page) == ["line", "line", "line", "line", "timeline"]  # loss, speed, GPU, validation, attempts
    assert "Finished: 300 steps, 2 epoch(s), 30m12s of training over 2 attempt(s)." in page
    assert "<td>1</td><td>2026-11-25 08:00:00</td><td>13m06s</td><td>0-130</td><td>preempted</td>" in page
    assert "<td>finished</td><td>s3://b/ckpt/run/step-000130</td><td>2</td><td>$1.03</td>" in page
    assert "Estimated cost: $1.81, 0.50 h of training at preset a100&#x27;s hourly_usd $3.60" in page
    assert "peak memory allocated (GiB) at 300: 3.2" in page and "utilisation (%) at 25: 87" in page
    assert "checkpoint at step 130: s3://b/ckpt/run/step-000130 (1.5 s to save)" in page


def test_training_deck_while_the_run_goes():
    import datetime as dt

    from tests.test_timeline import PREEMPTED_ONCE, T0

    live = PREEMPTED_ONCE[:5]  # resumed at step 130, 33 minutes in
    now = T0 + dt.timedelta(minutes=43)  # 10 minutes later, at step 190: 0.1 steps/s
    page = decks.training(recorded_result(live, STEPS[:7], HISTORY[:1], 190), preset="cpu", hourly_usd=None,
                          running=True, now=now)
    assert ('data-running="true"><b>Running: step 190 of 300 (63%), 0.10 steps/s, ETA 18m20s. '
            "Updated 2026-11-25 08:43:00 UTC") in page
    assert "<td>running</td>" in page and "No cost estimate: preset cpu has no hourly_usd." in page
    preempted = [*live, {"event": "preempted", "step": 190, "time": at_minute(43)}]
    page = decks.training(recorded_result(preempted, STEPS[:7], HISTORY[:1], 190), preset="cpu", hourly_usd=None,
                          running=True, now=now)
    assert "Preempted at step 190 of 300: the next attempt resumes from the newest checkpoint (attempt 2" in page
    starting = decks.training(recorded_result(PREEMPTED_ONCE[:1], [], [], 0), preset="cpu", hourly_usd=0.27,
                              running=True, now=T0)
    assert plot_kinds(starting) == ["timeline"], "no empty charts before the first record"
    assert "No metrics recorded yet" in starting and "No validation yet" in starting


def at_minute(minutes: float) -> str:
    from tests.test_timeline import at

    return at(minutes)
