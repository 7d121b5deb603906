"""End to end on the real backbone and a slice of the bundled sample (configs/tiny.yaml)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flytetune import artifacts
from tests.conftest import REPO, SAMPLE, TINY_CONFIG

pytestmark = pytest.mark.e2e


def test_workflow_reads_from_s3_and_publishes_to_s3(tmp_path, in_repo, s3_bucket):
    """The whole workflow through flytekit's local execution, with the data on the loopback S3 server."""
    from flytetune import storage
    from flytetune.config import load_config
    from workflows.finetune import finetune

    storage.copy(str(SAMPLE), f"s3://{s3_bucket}/datasets/transactions.parquet")
    out = finetune(dataset_uri=f"s3://{s3_bucket}/datasets/transactions.parquet",
                   output_uri=f"s3://{s3_bucket}/models", config=load_config(TINY_CONFIG),
                   overrides=f"train.max_steps=15 checkpoint.uri={tmp_path / 'ckpt'}")
    run_uri, summary = out.artifacts_uri, out.test_metrics
    assert run_uri.startswith(f"s3://{s3_bucket}/models/txn-categoriser/")
    manifest = artifacts.verify(run_uri)  # every file is present and matches its checksum
    files = set(manifest["files"])
    assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.json", "label_map.json",
            "finetune_config.yaml", "train_history.json", "data_meta.json"} <= files
    assert manifest["dataset_sha256"] and manifest["code_version"]
    assert manifest["config"]["train"]["max_steps"] == 15
    n_classes = len(manifest["data"]["labels"])
    assert summary["accuracy"] > 2.0 / n_classes, "well above chance after a few steps"
    assert manifest["metrics"]["accuracy"] == summary["accuracy"]
    assert manifest["data"]["sources"] == [f"s3://{s3_bucket}/datasets/transactions.parquet"]
    history = json.loads(storage.read_text(f"{run_uri}/train_history.json"))
    assert history["global_step"] == 15


def test_published_model_loads_back_with_same_predictions(tmp_path, prepared_tiny, trained_tiny, tiny_cfg):
    import polars as pl
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flytetune.data import LABEL, TEXT, read_table, validate
    from flytetune.evaluate import evaluate, predict_logits
    from flytetune.prepare import TEST_TEXTS, load_meta
    from flytetune.store import FeatureStore

    metrics = evaluate(trained_tiny, prepared_tiny)
    meta = load_meta(prepared_tiny)
    run_uri = artifacts.publish(trained_tiny, str(tmp_path), "m", metrics=metrics, config=tiny_cfg.to_dict(),
                                data_meta=meta)
    model = AutoModelForSequenceClassification.from_pretrained(run_uri)
    tokenizer = AutoTokenizer.from_pretrained(run_uri)
    store = FeatureStore(prepared_tiny / "test")
    logits = predict_logits(model, store, 64, tokenizer.pad_token_id)
    predictions = logits.argmax(axis=1)
    assert float((predictions == store.labels()).mean()) == pytest.approx(metrics["accuracy"])
    assert json.loads(Path(run_uri, "label_map.json").read_text())["labels"] == meta["labels"]

    # Raw text through the published tokenizer gives the stored tokens and the same labels: the test
    # split's texts as prepare kept them (test_texts.parquet, in store order), each a row of the sample.
    test = pl.read_parquet(prepared_tiny / TEST_TEXTS)
    sample = validate(read_table(SAMPLE), "sample", tiny_cfg.data)
    assert test.join(sample, on=[TEXT, LABEL], how="anti").height == 0
    texts = test.get_column(TEXT).to_list()
    assert [meta["label2id"][label] for label in test.get_column(LABEL)] == store.labels().tolist()
    encoded = tokenizer(texts, truncation=True, max_length=meta["max_length"])["input_ids"]
    assert all(list(ids) == store[i]["input_ids"].tolist() for i, ids in enumerate(encoded))
    with torch.no_grad():
        raw_logits = model(**tokenizer(texts, truncation=True, max_length=meta["max_length"], padding=True,
                                       return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(raw_logits, logits, atol=1e-4)
    raw_labels = [model.config.id2label[int(i)] for i in raw_logits.argmax(axis=1)]
    assert raw_labels == [meta["labels"][i] for i in predictions]


def test_separate_test_file_is_used_for_metrics(tmp_path, tiny_cfg):
    import polars as pl

    from flytetune.pipeline import run

    df = pl.read_parquet(SAMPLE)
    train_path, test_path = tmp_path / "train.csv", tmp_path / "test.jsonl"
    df.slice(0, 3000).write_csv(train_path)
    df.slice(3000, 120).write_ndjson(test_path)
    cfg = tiny_cfg
    run_uri, metrics, _ = run(cfg, str(train_path), str(tmp_path / "bucket"), test_uri=str(test_path))
    meta = json.loads(Path(run_uri, "data_meta.json").read_text())
    assert meta["test_source"] == "test_uri" and meta["rows"]["test"] == 120 == metrics["n_examples"]
    # The test rows are not carved out of the dataset: its max_rows rows all go to train and validation.
    assert meta["rows"]["train"] + meta["rows"]["validation"] == cfg.data.max_rows == 400


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "flytetune.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


BAD_INPUTS = {
    "missing column": ("bad.csv", b"description,label\nfoo,a\n", "bad.csv: text column 'text' not found"),
    "empty file": ("bad.csv", b"", "bad.csv: file is empty"),
    "non-UTF-8 bytes": ("bad.csv", "text,label\ncaf\u00e9,a\n".encode("latin-1"), "not valid UTF-8 at byte"),
    "single example": ("bad.csv", b"text,label\n" + b"".join(b"t%d,a\n" % i for i in range(9)) + b"solo,b\n",
                       "class 'b' has 1 example(s)"),
    "single class": ("bad.csv", b"text,label\n" + b"".join(b"t%d,a\n" % i for i in range(20)),
                     "bad.csv: label column 'label' has only class 'a'; a classifier needs at least two classes"),
    "float labels": ("bad.csv", b"text,label\n" + b"".join(b"t%d,0.%d\n" % (i, i % 3) for i in range(30)),
                     "bad.csv: label column 'label' has type Float64"),
    "list labels": ("bad.jsonl", b"".join(b'{"text": "t%d", "label": ["x%d"]}\n' % (i, i % 3) for i in range(30)),
                    "bad.jsonl: label column 'label' has type List(String)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_dataset_fails_with_one_clear_line(tmp_path, case):
    name, content, message = BAD_INPUTS[case]
    (tmp_path / name).write_bytes(content)
    result = cli("--config", str(TINY_CONFIG), "--dataset_uri", str(tmp_path / name),
                 "--output_uri", str(tmp_path / "bucket"))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bucket").exists(), "nothing is published"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.epoch=2"], "train.epoch: unknown key (did you mean train.epochs?)"),
        (["--set", "train.epochs=two"], "train.epochs: expected int, got 'two'"),
        (["--dataset_uri", "no/such/file.csv"], "no/such/file.csv"),
        (["--dataset_uri", ""],
         "error: dataset_uri is empty; give a CSV, parquet, JSON lines or text lines (.txt) file"),
        (["--dataset_uri", "flytetune"], "flytetune: is a directory; dataset_uri must name a CSV, parquet, JSON"),
        (["--set", "data.test_fraction=0"], "error: data.test_fraction: is 0 but no test file was given"),
        (["--set", "data.max_rows=40"], "data.max_rows=40 is too small for 17 classes with "
                                        "data.min_examples_per_class=5 (needs at least 85)"),
        (["--set", "model.backbone=this"], "model.backbone: 'this' is an installed module but not a model package"),
    ],
    ids=["unknown key", "wrong type", "missing path", "empty dataset", "directory", "test_fraction 0",
         "max_rows too small", "backbone not a model"],
)
def test_bad_config_or_path_fails_before_training(tmp_path, args, message):
    result = cli("--config", str(TINY_CONFIG), "--output_uri", str(tmp_path / "bucket"), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Zen of Python" not in result.stdout
    assert "training" not in result.stderr, "fails before any training starts"
    assert not (tmp_path / "bucket").exists()


def test_pyflyte_run_reports_bad_config_key_and_publishes_nothing(tmp_path):
    pyflyte = Path(sys.executable).parent / "pyflyte"
    result = subprocess.run(
        [str(pyflyte), "run", "workflows/finetune.py", "finetune", "--config", str(TINY_CONFIG),
         "--overrides", "train.epoch=2", "--output_uri", str(tmp_path / "bucket")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert "train.epoch: unknown key (did you mean train.epochs?)" in output
    assert not (tmp_path / "bucket").exists()
