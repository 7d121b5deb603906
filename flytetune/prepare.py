"""Prepare a dataset once: validate, split, tokenise, and write lmdb stores plus meta.json.

The output folder is self-describing: `train/`, `validation/`, `test/` (lmdb stores),
`tokenizer/`, `test_texts.parquet`, and `meta.json`, which is written last and marks the folder complete.

Memory holds no text, and nothing a row (flytetune/prepare_stream.py): the table is read in chunks.
The first pass validates and writes each row's record (a seeded key of its text, a label code, its
row number) to partition files in a scratch folder, then finds duplicates and conflicting labels one
partition at a time and splits class by class in key order; the second reads the rows of each split
again, tokenises them in batches in one process per core, and streams them into that split's store.
Inside a store, a split holds its classes one after the other, each in key order (training draws
its own order each epoch, flytetune/batches.py); a held-out test file keeps its own order, and
`test_texts.parquet` follows the test store.
"""

import dataclasses
import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl

from flytetune import scratch
from flytetune.backbone import resolve_backbone
from flytetune.config import ConfigError, FinetuneConfig
from flytetune.data import (
    LABEL,
    TEXT,
    DataError,
    iter_table,
    load_sources,
    require_labels,
    subsample_quota,
    table_files,
)
from flytetune.prepare_stream import (
    CHUNK_ROWS,
    POSITION,
    Reorder,
    Scanned,
    Split,
    Tokenize,
    in_file_order,
    scan,
    select,
    split,
    text_batches,
)
from flytetune.storage.checksums import file_sha256
from flytetune.store import write_store

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
META = "meta.json"
# The test split as text (text, label), for the evaluation gate (flytetune/gate.py).
TEST_TEXTS = "test_texts.parquet"
# The one label of unlabelled text (data.label_column null), in a column of this name.
UNLABELLED = "unlabelled"
UNLABELLED_COLUMN = "(no label column)"
# Fewer rows than this are tokenised in this process: worker processes take longer to start.
POOL_MIN_ROWS = 50_000


def prepare(raw_dir: Path, out_dir: Path, cfg: FinetuneConfig, *, chunk_rows: int = CHUNK_ROWS,
            workers: int | None = None) -> dict:
    """Validate and split the dataset copied to `raw_dir` (and its test file, if any), tokenise once,
    and write `out_dir`. Returns the metadata that is also written to `out_dir/meta.json`.

    A source's file may be a folder of data files (parquet parts, say): they are read as one table,
    in name order. `chunk_rows`: rows read at a time. `workers`: tokenizer processes (default: one per
    core for large inputs, none for small ones; 0 tokenises in this process).
    """
    out_dir, raw_dir = Path(out_dir), Path(raw_dir)
    if (out_dir / META).exists():
        raise FileExistsError(f"{out_dir}: already prepared ({META} exists)")
    data_cfg = cfg.data
    unlabelled = data_cfg.label_column is None
    if unlabelled:
        # Text for MLM pretraining: one class, so duplicates are repeated texts and the split is a plain one.
        data_cfg = dataclasses.replace(data_cfg, label_column=UNLABELLED_COLUMN)
    sources = load_sources(raw_dir)
    if "test" not in sources and data_cfg.test_fraction == 0:
        # Checked here, not in the config: only this step knows whether a test file was given.
        raise ConfigError("data.test_fraction: is 0 but no test file was given; set it above 0 or give test_uri")

    def read(role: str) -> Iterator[pl.DataFrame]:
        chunks = iter_table(raw_dir / sources[role]["file"], sources[role]["uri"], chunk_rows,
                            text_column=data_cfg.text_column)
        if unlabelled:
            return (chunk.with_columns(pl.lit(UNLABELLED).alias(UNLABELLED_COLUMN)) for chunk in chunks)
        return chunks

    dataset_name = sources["dataset"]["uri"]
    checks = {"dataset": {}}
    with scratch.folder("prepare") as work:
        data = scan(read("dataset"), dataset_name, data_cfg, work / "dataset", report=checks["dataset"])
        valid_rows = int(data.counts.sum())
        quota = None
        if data_cfg.max_rows is not None and valid_rows > data_cfg.max_rows:
            quota = subsample_quota(data.counts, data_cfg, dataset_name)
        kept = data.counts if quota is None else quota
        labels = sorted(name for name, n in zip(data.names, kept.tolist(), strict=True) if n)
        if not unlabelled:
            require_labels(labels, dataset_name, data_cfg)

        # Per split: the table its rows come from, and which rows of it.
        chosen: dict[str, tuple[str, Scanned, Split]] = {}
        if "test" in sources:
            test_name = sources["test"]["uri"]
            # A held-out test file may legitimately hold few examples of a class.
            checks["test"] = {}
            test = scan(read("test"), test_name, data_cfg, work / "test", min_per_class=1, report=checks["test"])
            unknown = sorted(set(_counts(test, test.counts)) - set(labels))
            if unknown:
                raise DataError(
                    f"{test_name}: column {data_cfg.label_column!r} has label(s) not in the training data "
                    f"{dataset_name}: {', '.join(map(repr, unknown[:5]))}"
                )
            (train, validation), overlap = split(data, [data_cfg.validation_fraction], work / "split", quota,
                                                 against=test)
            chosen["test"] = ("test", test, in_file_order(test, work / "split" / "test"))
            if overlap:
                checks["test"]["warnings"].append(_warn_overlap(overlap, test_name))
        else:
            (train, validation, held_out), _ = split(
                data, [data_cfg.validation_fraction, data_cfg.test_fraction], work / "split", quota)
            chosen["test"] = ("dataset", data, held_out)
        chosen["train"] = ("dataset", data, train)
        chosen["validation"] = ("dataset", data, validation)
        chosen = {name: chosen[name] for name in SPLITS}
        for name, (_, _, rows) in chosen.items():
            if not rows.size:
                raise DataError(f"{dataset_name}: the {name} split is empty; check data.test_fraction and "
                                "data.validation_fraction")
        meta = _write(out_dir, cfg, data_cfg, read, chosen, labels, workers)
    meta.update({
        "sources": [source["uri"] for source in sources.values()],
        # Which dated export a prefix resolved to (flytetune/exports.py).
        "exports": {role: source["export"] for role, source in sources.items() if "export" in source},
        "dataset_sha256": file_sha256(*(file for source in sources.values()
                                        for file in table_files(raw_dir / source["file"]))),
        "test_source": "test_uri" if "test" in sources else "split",
    })
    meta["profile"] = _profile(meta.pop("lengths"), data_cfg.max_length, checks, valid_rows, int(kept.sum()))
    _write_json_atomic(out_dir / META, meta)
    log.info("prepared %s: %s rows, %d classes", out_dir, meta["rows"], len(labels))
    return meta


def _write(out_dir: Path, cfg: FinetuneConfig, data_cfg, read, chosen: dict, labels: list[str],
           workers: int | None) -> dict:
    """Tokenise each split's rows and write its store, the tokenizer and the test texts; returns the
    metadata of what was written (with each split's token length counts under "lengths")."""
    from transformers import AutoTokenizer

    backbone = resolve_backbone(cfg.model.backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone, local_files_only=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir / "tokenizer")

    label2id = {label: i for i, label in enumerate(labels)}
    total = sum(rows.size for _, _, rows in chosen.values())
    workers = (None if total >= POOL_MIN_ROWS else 0) if workers is None else workers
    rows, truncated, lengths = {}, {}, {}
    spill = out_dir / ".spill"  # tokenised rows on their way into split order
    texts_dir = spill / TEST_TEXTS
    with Tokenize(tokenizer, data_cfg.max_length, workers) as tokenize:
        for name, (role, _, which) in chosen.items():
            frames = text_batches(select(read(role), which, data_cfg))
            reorder = Reorder(spill / name, which.size)
            try:
                counts = _tokenise(frames, tokenize, label2id, reorder, texts_dir if name == "test" else None)
                rows[name] = write_store(out_dir / name, reorder.rows())
            finally:
                reorder.close()
            lengths[name] = counts
            truncated[name] = int(counts[data_cfg.max_length:].sum())
    # Raw texts of the test split: the gate scores production's model on them with its own tokenizer.
    _write_in_order(sorted(texts_dir.glob("*.parquet")), reorder.bucket_rows, out_dir / TEST_TEXTS)
    shutil.rmtree(spill)
    return {
        "rows": rows,
        "labels": labels,
        "label2id": label2id,
        "class_counts": {name: _counts(table, which.counts) for name, (_, table, which) in chosen.items()},
        "text_column": data_cfg.text_column,
        "label_column": cfg.data.label_column,
        "tokenizer": cfg.model.backbone,
        "max_length": data_cfg.max_length,
        "truncated": truncated,
        "split_seed": data_cfg.split_seed,
        "lengths": lengths,
    }


def _tokenise(frames: Iterator[pl.DataFrame], tokenize: Tokenize, label2id: dict[str, int], reorder: Reorder,
              texts_dir: Path | None) -> np.ndarray:
    """Tokenise every row of `frames` into `reorder`; with `texts_dir`, each batch's (text, label, position)
    goes to a parquet part there. Returns how many rows have each token count (index: the count)."""
    held: deque[pl.DataFrame] = deque()  # batches handed to the tokenizer, not yet back
    lengths = np.zeros(1, dtype=np.int64)

    def texts() -> Iterator[list[str]]:
        for frame in frames:
            held.append(frame)
            yield frame.get_column(TEXT).to_list()

    if texts_dir is not None:
        texts_dir.mkdir(parents=True, exist_ok=True)
    for i, (flat, counts) in enumerate(tokenize.map(texts())):
        frame = held.popleft()
        batch = np.bincount(counts)
        lengths = np.pad(lengths, (0, max(0, len(batch) - len(lengths))))
        lengths[:len(batch)] += batch
        if texts_dir is not None:
            frame.write_parquet(texts_dir / f"{i:08d}.parquet")
        labels = frame.get_column(LABEL).replace_strict(label2id, return_dtype=pl.Int32).to_numpy()
        reorder.add(frame.get_column(POSITION).to_numpy(), flat, counts, labels)
    return lengths


def _write_in_order(parts: list[Path], bucket_rows: int, path: Path) -> None:
    """(text, label) of the parquet `parts`, in POSITION order, to `path`; a bucket of positions at a time."""
    scanned = pl.scan_parquet(parts)
    total = scanned.select(pl.len()).collect().item()
    ordered = []
    for b, start in enumerate(range(0, total, bucket_rows)):
        ordered.append(path.with_name(f".{path.name}.{b:06d}"))
        (scanned.filter(pl.col(POSITION).is_between(start, start + bucket_rows, closed="left"))
         .collect().sort(POSITION).select(TEXT, LABEL).write_parquet(ordered[-1]))
    pl.scan_parquet(ordered).sink_parquet(path)
    for part in ordered:
        part.unlink()


def load_meta(prepared_dir: Path) -> dict:
    path = Path(prepared_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"{prepared_dir}: not a prepared dataset (no {META}); run prepare first")
    return json.loads(path.read_text())


def _counts(table: Scanned, counts: np.ndarray) -> dict[str, int]:
    """Rows per label, from rows per code of `table`, by label; labels without rows left out."""
    return dict(sorted((name, int(n)) for name, n in zip(table.names, counts, strict=True) if n))


def _warn_overlap(overlap: int, source: str) -> str:
    """The warning logged when `overlap` test texts also appear in the training data."""
    message = f"{source}: {overlap} test text(s) also appear in the training data; test metrics are optimistic"
    log.warning("%s", message)
    return message


# Bins of the token length histogram: about this many, each a whole number of tokens wide.
LENGTH_BINS = 32


def _profile(lengths: dict[str, np.ndarray], max_length: int, checks: dict[str, dict], valid_rows: int,
             kept_rows: int) -> dict:
    """Token lengths (a histogram over all splits, and quantiles per split, from how many rows have each
    length), what validation dropped or warned about, and the subsample. Lengths are of the stored,
    truncated tokens: the last bin holds exactly `max_length`, i.e. the rows that were cut (or fit exactly)."""
    width = max(1, -(-max_length // LENGTH_BINS))
    edges = [*range(0, max_length, width), max_length, max_length + 1]
    every = np.zeros(max_length + 1, dtype=np.int64)
    for counts in lengths.values():
        every[:len(counts)] += counts[:max_length + 1]
    binned = np.add.reduceat(every, edges[:-1])
    return {
        "token_length_histogram": {"edges": edges, "counts": binned.tolist()},
        "token_length": {name: _quantiles(counts) for name, counts in lengths.items()},
        "duplicates_dropped": {role: c["duplicates_dropped"] for role, c in checks.items()},
        "conflicting_label_rows": {role: c["conflicting_label_rows"] for role, c in checks.items()},
        "warnings": [message for c in checks.values() for message in c["warnings"]],
        # data.max_rows: rows kept of the valid rows of the dataset file (the test file is never subsampled).
        "subsampled": {"valid_rows": valid_rows, "kept": kept_rows} if kept_rows < valid_rows else None,
    }


def _quantiles(counts: np.ndarray) -> dict:
    """Mean, p50, p95 (as numpy's linear percentile, truncated) and max of the lengths with these counts."""
    values = np.arange(len(counts))
    n = int(counts.sum())
    ends = np.cumsum(counts)

    def at(i: int) -> int:  # the i-th smallest length
        return int(np.searchsorted(ends, i, side="right"))

    def percentile(q: float) -> int:
        where = q / 100 * (n - 1)
        low = int(np.floor(where))
        return int(at(low) + (at(min(low + 1, n - 1)) - at(low)) * (where - low))

    return {"mean": round(float((values * counts).sum() / n), 2), "p50": percentile(50), "p95": percentile(95),
            "max": int(values[counts > 0].max())}


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
