"""Scheduled retraining end to end on the loopback S3 server: real tiny trainings, the evaluation gate,
the registry's pointer and log, warm starts and prepared data reused from the bucket."""

import json

import numpy as np
import polars as pl

from flytetune import artifacts, registry, storage
from flytetune.config import load_config
from flytetune.data import copy_dataset
from flytetune.pipeline import run
from flytetune.prepare import prepare
from tests.conftest import SAMPLE, TINY_CONFIG

EVAL_PER_CLASS = 20


def cfg(**train):
    # No checkpoints (each run is short); the gate's fixed set is the eval file on S3.
    return load_config(TINY_CONFIG, [f"train.{k}={v}" for k, v in train.items()] + ["checkpoint.uri=null"])


def put_parquet(frame: pl.DataFrame, uri: str, tmp_path) -> str:
    local = tmp_path / uri.rpartition("/")[2]
    frame.write_parquet(local)
    storage.copy(str(local), uri)
    return uri


def manifest(run_uri: str) -> dict:
    return json.loads(storage.read_bytes(artifacts.join(run_uri, artifacts.MANIFEST)))


def test_a_better_model_is_promoted_a_worse_one_refused_and_rollback_restores(s3_bucket, tmp_path):
    bucket = f"s3://{s3_bucket}"
    sample = pl.read_parquet(SAMPLE)
    # A fixed evaluation set, the same for every run: the last EVAL_PER_CLASS rows of each class.
    eval_uri = put_parquet(sample.group_by("label", maintain_order=True).tail(EVAL_PER_CLASS),
                           f"{bucket}/eval/fixed.parquet", tmp_path)
    gate = [f"gate.eval_uri={eval_uri}"]
    models = f"{bucket}/models"
    name = cfg().model.name

    # Prepared once, kept in the bucket, and reused by the first two runs (`prepared_uri`).
    copy_dataset(str(SAMPLE), tmp_path / "raw")
    prepare(tmp_path / "raw", tmp_path / "prepared", cfg())
    prepared_uri = f"{bucket}/prepared/sample-tiny"
    storage.sync(str(tmp_path / "prepared"), prepared_uri)

    # 1. A weak first model: nothing serves yet, so it promotes itself.
    weak = run(load_config(cfg(max_steps=3).to_dict(), gate), output_uri=models, prepared_uri=prepared_uri)
    assert weak.release == {"promoted": True, "reason": "first model: no production version yet"}
    assert manifest(weak.run_uri)["data"]["prepared_uri"] == prepared_uri
    assert registry.production(models, name)["run_uri"] == weak.run_uri

    # 2. Warm-started from production and trained longer: better on the same rows, so promoted.
    better = run(load_config(cfg(epochs=6, max_steps=120).to_dict(), gate), output_uri=models,
                 prepared_uri=prepared_uri, init_from="production")
    decision = manifest(better.run_uri)["gate"]
    assert better.release["promoted"], better.release
    weak_version = weak.run_uri.rpartition("/")[2]
    assert decision["promote"] and decision["production_version"] == weak_version
    # The fixed set has one exact duplicate row, dropped as in any dataset.
    assert decision["eval_sets"] == {"test split": {"rows": 40}, eval_uri: {"rows": 17 * EVAL_PER_CLASS - 1}}
    assert decision["candidate"]["macro_f1"] > decision["production"]["macro_f1"]
    assert registry.production(models, name)["run_uri"] == better.run_uri
    assert manifest(better.run_uri)["init_from"] == weak.run_uri  # the warm start is on record

    # 3. Trained on shuffled labels: refused, with the reason in its manifest; production stays.
    shuffled = sample.with_columns(pl.Series("label", np.random.default_rng(0).permutation(sample["label"].to_numpy())))
    shuffled_uri = put_parquet(shuffled, f"{bucket}/data/shuffled.parquet", tmp_path)
    worse = run(load_config(cfg(max_steps=20).to_dict(), gate), dataset_uri=shuffled_uri, output_uri=models)
    refused = manifest(worse.run_uri)["gate"]
    assert not worse.release["promoted"] and not refused["promote"]
    assert refused["reason"] == worse.release["reason"]
    assert f"vs production {better.run_uri.rpartition('/')[2]}" in refused["reason"]
    assert "below gate.min_improvement=0" in refused["reason"]
    assert registry.production(models, name)["run_uri"] == better.run_uri

    # 4. Rollback points production back at the weak model, and the log tells the whole story.
    registry.rollback(models, name, reason="test")
    assert registry.production(models, name)["run_uri"] == weak.run_uri
    events = registry.history(models, name)
    assert [(e["event"], e["to"]) for e in events] == [
        ("promote", weak_version), ("promote", better.run_uri.rpartition("/")[2]), ("rollback", weak_version)]
