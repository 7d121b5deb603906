"""Prepare a dataset once: validate, split, tokenise, and write lmdb stores plus meta.json.

The output folder is self-describing: `train/`, `validation/`, `test/` (lmdb stores),
`tokenizer/`, `test_texts.parquet`, and `meta.json`, which is written last and marks the folder complete.
"""

import json
import logging
import os
from pathlib import Path

import numpy as np
import polars as pl

from flytetune.backbone import resolve_backbone
from flytetune.config import ConfigError, FinetuneConfig
from flytetune.data import (
    LABEL,
    TEXT,
    DataError,
    load_sources,
    read_table,
    require_classes,
    stratified_split,
    subsample,
    validate,
)
from flytetune.storage.checksums import file_sha256
from flytetune.store import write_store

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
META = "meta.json"
# The test split as text (text, label), for the evaluation gate (flytetune/gate.py).
TEST_TEXTS = "test_texts.parquet"


def prepare(raw_dir: Path, out_dir: Path, cfg: FinetuneConfig) -> dict:
    """Validate and split the dataset copied to `raw_dir` (and its test file, if any), tokenise once,
    and write `out_dir`. Returns the metadata that is also written to `out_dir/meta.json`.
    """
    out_dir, raw_dir = Path(out_dir), Path(raw_dir)
    if (out_dir / META).exists():
        raise FileExistsError(f"{out_dir}: already prepared ({META} exists)")
    data_cfg = cfg.data
    sources = load_sources(raw_dir)
    if "test" not in sources and data_cfg.test_fraction == 0:
        # Checked here, not in the config: only this step knows whether a test file was given.
        raise ConfigError("data.test_fraction: is 0 but no test file was given; set it above 0 or give test_uri")
    dataset_path, dataset_name = raw_dir / sources["dataset"]["file"], sources["dataset"]["uri"]
    checks = {"dataset": {}}
    frame = validate(read_table(dataset_path, dataset_name), dataset_name, data_cfg, report=checks["dataset"])
    valid_rows = frame.height
    frame = subsample(frame, data_cfg, dataset_name)
    require_classes(frame, dataset_name, data_cfg)
    labels = sorted(frame.get_column(LABEL).unique().to_list())

    if "test" in sources:
        test_path, test_name = raw_dir / sources["test"]["file"], sources["test"]["uri"]
        # A held-out test file may legitimately hold few examples of a class.
        checks["test"] = {}
        test = validate(read_table(test_path, test_name), test_name, data_cfg, min_per_class=1, report=checks["test"])
        unknown = sorted(set(test.get_column(LABEL).unique().to_list()) - set(labels))
        if unknown:
            raise DataError(
                f"{test_name}: column {data_cfg.label_column!r} has label(s) not in the training data "
                f"{dataset_name}: {', '.join(map(repr, unknown[:5]))}"
            )
        train, validation = stratified_split(frame, [data_cfg.validation_fraction], data_cfg.split_seed)
        overlap = _warn_overlap(train, test, test_name)
        if overlap:
            checks["test"]["warnings"].append(overlap)
    else:
        train, validation, test = stratified_split(
            frame, [data_cfg.validation_fraction, data_cfg.test_fraction], data_cfg.split_seed
        )

    splits = dict(zip(SPLITS, (train, validation, test), strict=True))
    for name, split in splits.items():
        if split.height == 0:
            raise DataError(f"{dataset_name}: the {name} split is empty; check data.test_fraction and "
                            "data.validation_fraction")

    from transformers import AutoTokenizer

    backbone = resolve_backbone(cfg.model.backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone, local_files_only=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir / "tokenizer")

    label2id = {label: i for i, label in enumerate(labels)}
    rows, truncated, lengths = {}, {}, {}
    for name, split in splits.items():
        texts = split.get_column(TEXT).to_list()
        encoded = tokenizer(texts, truncation=True, max_length=data_cfg.max_length)["input_ids"]
        truncated[name] = sum(len(ids) >= data_cfg.max_length for ids in encoded)
        lengths[name] = np.array([len(ids) for ids in encoded], dtype=np.int64)
        ids = [label2id[label] for label in split.get_column(LABEL).to_list()]
        rows[name] = write_store(out_dir / name, zip(encoded, ids, strict=True))
    # Raw texts of the test split: the gate scores production's model on them with its own tokenizer.
    splits["test"].select(TEXT, LABEL).write_parquet(out_dir / TEST_TEXTS)

    meta = {
        "rows": rows,
        "labels": labels,
        "label2id": label2id,
        "class_counts": {name: _class_counts(split) for name, split in splits.items()},
        "text_column": data_cfg.text_column,
        "label_column": data_cfg.label_column,
        "tokenizer": cfg.model.backbone,
        "max_length": data_cfg.max_length,
        "truncated": truncated,
        "split_seed": data_cfg.split_seed,
        "sources": [source["uri"] for source in sources.values()],
        # Which dated export a prefix resolved to (flytetune/exports.py).
        "exports": {role: source["export"] for role, source in sources.items() if "export" in source},
        "dataset_sha256": file_sha256(*(raw_dir / source["file"] for source in sources.values())),
        "test_source": "test_uri" if "test" in sources else "split",
        # What the Dataset profile Deck shows; not read by training.
        "profile": _profile(lengths, data_cfg.max_length, checks, valid_rows, frame.height),
    }
    _write_json_atomic(out_dir / META, meta)
    log.info("prepared %s: %s rows, %d classes", out_dir, rows, len(labels))
    return meta


def load_meta(prepared_dir: Path) -> dict:
    path = Path(prepared_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"{prepared_dir}: not a prepared dataset (no {META}); run prepare first")
    return json.loads(path.read_text())


def _class_counts(split: pl.DataFrame) -> dict[str, int]:
    return dict(sorted(split.group_by(LABEL).len().iter_rows()))


def _warn_overlap(train: pl.DataFrame, test: pl.DataFrame, source: str) -> str | None:
    """The warning logged when test texts also appear in the training data, or None."""
    overlap = test.join(train.select(TEXT), on=TEXT, how="semi").height
    if not overlap:
        return None
    message = f"{source}: {overlap} test text(s) also appear in the training data; test metrics are optimistic"
    log.warning("%s", message)
    return message


# Bins of the token length histogram: about this many, each a whole number of tokens wide.
LENGTH_BINS = 32


def _profile(lengths: dict[str, np.ndarray], max_length: int, checks: dict[str, dict], valid_rows: int,
             kept_rows: int) -> dict:
    """Token lengths (a histogram over all splits, and quantiles per split), what validation dropped or
    warned about, and the subsample. Lengths are of the stored, truncated tokens: the last bin holds
    exactly `max_length`, i.e. the rows that were cut (or fit exactly)."""
    width = max(1, -(-max_length // LENGTH_BINS))
    edges = [*range(0, max_length, width), max_length, max_length + 1]
    counts, _ = np.histogram(np.concatenate(list(lengths.values())), bins=edges)
    return {
        "token_length_histogram": {"edges": edges, "counts": counts.tolist()},
        "token_length": {name: {"mean": round(float(v.mean()), 2), "p50": int(np.percentile(v, 50)),
                                "p95": int(np.percentile(v, 95)), "max": int(v.max())}
                         for name, v in lengths.items()},
        "duplicates_dropped": {role: c["duplicates_dropped"] for role, c in checks.items()},
        "conflicting_label_rows": {role: c["conflicting_label_rows"] for role, c in checks.items()},
        "warnings": [message for c in checks.values() for message in c["warnings"]],
        # data.max_rows: rows kept of the valid rows of the dataset file (the test file is never subsampled).
        "subsampled": {"valid_rows": valid_rows, "kept": kept_rows} if kept_rows < valid_rows else None,
    }


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
