"""Prepare in bounded memory (flytetune/prepare_stream.py): the same outputs as tokenising in memory,
the same checks across chunk boundaries and partitions, a stratified and repeatable split, parts under
a folder, and memory that stays flat as rows grow."""

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from flytetune.config import DataConfig, FinetuneConfig
from flytetune.data import DataError, iter_table, read_table, validate
from flytetune.prepare import SPLITS, TEST_TEXTS, prepare
from flytetune.prepare_stream import scan
from flytetune.store import FeatureStore

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("food", "fuel", "rent", "travel", "wages")


def generated(rows: int, seed: int = 0) -> pl.DataFrame:
    """Texts with repeats (exact duplicates), a few relabelled repeats (conflicts), some too long for 16 tokens."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, int(rows * 1.3), rows)
    labels = np.array(CLASSES)[draws % len(CLASSES)]
    labels[rng.random(rows) < 0.01] = "food"
    texts = [f"card payment {d} at shop {d % 97}" + (" and more words" * 6 if d % 11 == 0 else "") for d in draws]
    return pl.DataFrame({"text": texts, "label": labels})


def run(tmp_path: Path, df: pl.DataFrame, name: str = "prepared", max_length: int = 16, **kwargs) -> dict:
    raw = tmp_path / "raw"
    if not raw.exists():
        raw.mkdir(parents=True)
        df.write_parquet(raw / "dataset.parquet")
        (raw / "sources.json").write_text(json.dumps({"dataset": {"uri": "gen.parquet", "file": "dataset.parquet"}}))
    cfg = FinetuneConfig(data=DataConfig(max_length=max_length, min_examples_per_class=3))
    return prepare(raw, tmp_path / name, cfg, **kwargs)


def stored(folder: Path, split: str) -> list[tuple[tuple[int, ...], int]]:
    store = FeatureStore(folder / split)
    return [(tuple(store[i]["input_ids"].tolist()), store[i]["label"]) for i in range(len(store))]


def test_same_token_ids_as_tokenising_in_memory(tmp_path, monkeypatch):
    """100k rows, as the issue asks; in many chunks and spill buckets, through the worker processes."""
    from transformers import AutoTokenizer

    from flytetune import prepare_stream

    monkeypatch.setattr(prepare_stream, "BUCKET_ROWS", 997)  # many spill buckets on the way into split order
    monkeypatch.setattr(prepare_stream, "SELECT_ROWS", 9_973)  # and select buckets that chunks straddle

    df = generated(100_000)
    meta = run(tmp_path, df, chunk_rows=7_000, workers=2)
    kept = df.unique(maintain_order=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "prepared" / "tokenizer")
    # What prepare did before it streamed: one call over every text.
    ids = tokenizer(kept.get_column("text").to_list(), truncation=True, max_length=16)["input_ids"]
    labels = kept.get_column("label")
    expected = Counter((tuple(i), meta["label2id"][label]) for i, label in zip(ids, labels, strict=True))
    splits = {split: stored(tmp_path / "prepared", split) for split in SPLITS}
    got = Counter(row for rows in splits.values() for row in rows)
    assert got == expected
    for split, rows in splits.items():  # the profile, from counts of lengths, is numpy's on the lengths
        lengths = np.array([len(ids) for ids, _ in rows])
        assert meta["profile"]["token_length"][split] == {
            "mean": round(float(lengths.mean()), 2), "p50": int(np.percentile(lengths, 50)),
            "p95": int(np.percentile(lengths, 95)), "max": int(lengths.max())}, split
    assert sum(meta["truncated"].values()) == sum(len(i) == 16 for i in ids) > 0
    texts = pl.read_parquet(tmp_path / "prepared" / TEST_TEXTS)
    encoded = tokenizer(texts.get_column("text").to_list(), truncation=True, max_length=16)["input_ids"]
    pairs = [(tuple(i), meta["label2id"][label]) for i, label in zip(encoded, texts.get_column("label"), strict=True)]
    assert pairs == stored(tmp_path / "prepared", "test"), "test_texts.parquet follows the test store"


def test_split_is_stratified_and_the_same_on_every_run(tmp_path):
    df = generated(4_000, seed=1)
    meta = run(tmp_path, df, chunk_rows=333)
    kept = dict(df.unique().group_by("label").len().iter_rows())
    for label, n in kept.items():
        val, test = max(1, round(n * 0.1)), max(1, round(n * 0.1))
        assert meta["class_counts"]["validation"][label] == val
        assert meta["class_counts"]["test"][label] == test
        assert meta["class_counts"]["train"][label] == n - val - test
    # Again in a fresh process (nothing may hang on per-process state: hash seeds, ids), in other chunks.
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
              "from tests.test_prepare_scale import run; run(Path(sys.argv[2]), None, name='again', chunk_rows=1_000)")
    done = subprocess.run([sys.executable, "-c", script, str(REPO), str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "meta.json").read_text())
    assert again["class_counts"] == meta["class_counts"]
    for split in SPLITS:
        assert stored(tmp_path / "again", split) == stored(tmp_path / "prepared", split), split
        labels = [label for _, label in stored(tmp_path / "prepared", split)]
        assert labels == sorted(labels), "a split holds its classes one after the other, as it always did"
    # The rows in another order: the same examples land in each split.
    run(tmp_path / "shuffled", df.sample(fraction=1.0, shuffle=True, seed=5))
    for split in SPLITS:
        assert Counter(stored(tmp_path / "shuffled" / "prepared", split)) == \
            Counter(stored(tmp_path / "prepared", split)), split


# sha256 of the bundled sample's test texts, in test_texts.parquet's order, under configs/local.yaml.
SAMPLE_TEST_SPLIT = "b701095b668a3b0355c9a58cd7f3be761f3ca1d7347988eebfbc143599fca3de"


def test_the_samples_split_is_the_recorded_one(tmp_path):
    """The split orders rows by polars' text hash, which polars does not promise to keep across versions:
    a lock-file upgrade that changes it would score new models on other test rows than production's."""
    import hashlib

    from flytetune.config import load_config
    from flytetune.data import SAMPLE_DATASET, copy_dataset

    copy_dataset(str(SAMPLE_DATASET), tmp_path / "raw")
    prepare(tmp_path / "raw", tmp_path / "prepared", load_config(REPO / "configs" / "local.yaml"))
    texts = pl.read_parquet(tmp_path / "prepared" / TEST_TEXTS).get_column("text").to_list()
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    assert digest == SAMPLE_TEST_SPLIT, (
        f"the sample's test split changed ({digest}): if a dependency changed the text hash, bump "
        f"tasks/steps.py PREPARE_CACHE_VERSION (cached prepares hold the old split) and record the new digest")


HOSTILE = {
    "duplicates far apart": lambda df: pl.concat([df, df.head(3), df.slice(40, 2)]),
    "conflicting labels far apart": lambda df: pl.concat([df, df.head(2).with_columns(pl.lit("other").alias("label")),
                                                          pl.DataFrame({"text": ["x", "y", "z"],
                                                                        "label": ["other"] * 3})]),
    "empty text in a late chunk": lambda df: df.with_columns(
        pl.when(pl.int_range(pl.len()).is_in([45, 52])).then(pl.lit(" ")).otherwise(pl.col("text")).alias("text")),
    "null label in a late chunk": lambda df: df.with_columns(
        pl.when(pl.int_range(pl.len()) == 58).then(None).otherwise(pl.col("label")).alias("label")),
    "a class too small after duplicates": lambda df: pl.concat(
        [df, pl.DataFrame({"text": ["lone", "lone", "pair", "lone"], "label": ["z", "z", "z", "z"]})]),
    "many examples of each warning": lambda df: pl.concat([df, df, df.with_columns(pl.lit("food").alias("label"))]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_checks_see_across_chunks(tmp_path, case):
    base = pl.DataFrame({"text": [f"t {i}" for i in range(60)], "label": [CLASSES[i % 3] for i in range(60)]})
    df = HOSTILE[case](base)
    path = tmp_path / "d.parquet"
    df.write_parquet(path)
    cfg = DataConfig(min_examples_per_class=3)
    whole, chunked = {}, {}
    try:
        expected = validate(read_table(path), "src", cfg, report=whole)
    except DataError as e:
        with pytest.raises(DataError) as raised:
            scan(iter_table(path, "src", chunk_rows=7), "src", cfg, tmp_path / "scan")
        assert str(raised.value) == str(e)
        return
    scanned = scan(iter_table(path, "src", chunk_rows=7), "src", cfg, tmp_path / "scan", report=chunked)
    assert chunked == whole and whole["warnings"]
    kept = np.sort(np.concatenate([scanned.records[p]["row"] for p in range(scanned.records.count)]))
    assert (kept + 1).tolist() == expected.get_column("__row").to_list()


def test_parts_under_a_folder_are_one_table(tmp_path):
    df = generated(3_000, seed=2)
    one = run(tmp_path / "one", df)
    raw = tmp_path / "parts" / "raw"
    (raw / "dataset").mkdir(parents=True)
    for i, start in enumerate(range(0, df.height, 1_000)):
        df.slice(start, 1_000).write_parquet(raw / "dataset" / f"part-{i:05d}.parquet")
    (raw / "sources.json").write_text(json.dumps({"dataset": {"uri": "s3://b/export/", "file": "dataset"}}))
    parts = run(tmp_path / "parts", df)
    assert parts["profile"]["warnings"] == [w.replace("gen.parquet", "s3://b/export/")
                                            for w in one["profile"]["warnings"]], "row numbers run across parts"
    assert parts["class_counts"] == one["class_counts"]
    for split in SPLITS:
        assert stored(tmp_path / "parts" / "prepared", split) == stored(tmp_path / "one" / "prepared", split)


PEAK = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from flytetune.config import DataConfig, FinetuneConfig
    from flytetune import prepare_stream, store
    from flytetune.prepare import prepare
    # Buffers bounded by rows (spill and select buckets, write batches) full at the smaller size:
    # what grows is per row.
    prepare_stream.BUCKET_ROWS = prepare_stream.SELECT_ROWS = store.WRITE_BATCH = 10_000
    raw = Path(sys.argv[1])
    prepare(raw, Path(sys.argv[2]), FinetuneConfig(data=DataConfig(max_length=16)), chunk_rows=20_000, workers=0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


def test_memory_stays_flat_as_rows_grow(tmp_path):
    peaks = {}
    for rows in (50_000, 500_000):
        raw = tmp_path / f"raw-{rows}"
        raw.mkdir()
        rng = np.random.default_rng(rows)
        draws = rng.integers(0, 10**9, rows)
        pl.DataFrame({"text": [f"pay {d} ref {d % 1009} " + "x" * int(d % 40) for d in draws],
                      "label": np.array(CLASSES)[draws % len(CLASSES)]}).write_parquet(raw / "dataset.parquet",
                                                                                     row_group_size=10_000)
        (raw / "sources.json").write_text(json.dumps({"dataset": {"uri": "g", "file": "dataset.parquet"}}))
        done = subprocess.run([sys.executable, "-c", PEAK, str(raw), str(tmp_path / f"out-{rows}"), str(REPO)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[rows] = int(done.stdout.split()[-1])
    # Measured here: 616 MB at both sizes (0 bytes a row). Before partitioning, prepare kept 12 bytes a row
    # (~46 at the duplicate sort) and measured ~105 between these sizes; holding each text as a Python
    # string adds ~95, and prepare in memory took ~2,600 (2.6 GB at 1M rows): texts and token lists.
    per_row = (peaks[500_000] - peaks[50_000]) * 2**20 / 450_000
    assert per_row < 16, (peaks, f"{per_row:.0f} bytes a row")
