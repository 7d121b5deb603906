"""Read, validate and split a labelled text dataset with polars.

Every problem found in the input is reported as a DataError whose message names the file, the
column and example rows (1-based data rows, as a spreadsheet would show them), so that a bad
file fails in the cheap CPU step, long before a GPU is requested.
"""

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from flytetune import storage
from flytetune.config import DataConfig

log = logging.getLogger(__name__)

# Relative to the project root: valid in a checkout and in the image's working directory.
DEFAULT_DATASET_URI = "flytetune/sample/transactions.parquet"
READERS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "ndjson",
    ".ndjson": "ndjson",
}
# Normalised column names used after validation, whatever the source calls them.
TEXT, LABEL = "text", "label"
_ROW = "__row"
_EXAMPLES = 3


class DataError(ValueError):
    """The dataset cannot be used; the message names the file, column and rows."""


SOURCES = "sources.json"


def copy_dataset(dataset_uri: str, dest_dir: Path, test_uri: str | None = None) -> dict[str, dict]:
    """Bring the dataset (and test) file from any storage URI to `dest_dir`.

    Writes `dest_dir/sources.json` mapping each role to its URI and local file name, so later
    steps report problems against the URI the user gave, not a temporary copy.
    """
    dest_dir = Path(dest_dir)
    sources = {}
    for role, uri in (("dataset", dataset_uri), ("test", test_uri)):
        if not uri:
            continue
        suffix = Path(uri.rstrip("/")).suffix.lower()
        if suffix not in READERS:
            raise DataError(f"{uri}: unsupported file type {suffix!r}; use one of {', '.join(READERS)}")
        storage.copy(uri, str(dest_dir / f"{role}{suffix}"))
        sources[role] = {"uri": uri, "file": f"{role}{suffix}"}
    (dest_dir / SOURCES).write_text(json.dumps(sources, indent=2) + "\n")
    return sources


def load_sources(raw_dir: Path) -> dict[str, dict]:
    path = Path(raw_dir) / SOURCES
    if not path.is_file():
        raise FileNotFoundError(f"{raw_dir}: no {SOURCES}; copy the dataset with copy_dataset first")
    return json.loads(path.read_text())


def read_table(path: Path, name: str | None = None) -> pl.DataFrame:
    """Read CSV, parquet or JSON lines, chosen by the file suffix; errors say `name` (default: the path)."""
    path = Path(path)
    name = name or str(path)
    if not path.exists():
        raise DataError(f"{name}: no such file")
    if path.is_dir():
        raise DataError(f"{name}: is a directory; give one CSV, parquet or JSON lines file")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{name}: unsupported file type {path.suffix!r}; use one of {', '.join(READERS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{name}: file is empty")
    if kind in ("csv", "ndjson"):
        _check_utf8(path, name)
    try:
        if kind == "csv":
            df = pl.read_csv(path, infer_schema_length=10_000)
        elif kind == "ndjson":
            df = pl.read_ndjson(path)
        else:
            df = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{name}: cannot be read as {kind}: {first_line}") from None
    if df.height == 0:
        raise DataError(f"{name}: has a header but no rows")
    return df


def _check_utf8(path: Path, name: str) -> None:
    # polars would either fail with a byte offset deep in its parser or, with lossy decoding,
    # silently train on replacement characters; a line number is what a person can act on.
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{name}: not valid UTF-8 at byte {e.start} (line {line}): {raw[e.start:e.start + 4]!r}; "
            "re-encode the file as UTF-8"
        ) from None


def validate(df: pl.DataFrame, source: str, cfg: DataConfig, *, min_per_class: int | None = None) -> pl.DataFrame:
    """Check columns and values; return a frame with `text`, `label` (str) and the source row number.

    Exact duplicate rows are dropped with a warning; everything else that is wrong is an error.
    """
    min_per_class = cfg.min_examples_per_class if min_per_class is None else min_per_class
    for role, column in (("text", cfg.text_column), ("label", cfg.label_column)):
        if column not in df.columns:
            raise DataError(
                f"{source}: {role} column {column!r} not found (columns: {', '.join(df.columns)}); "
                f"set data.{role}_column in the config"
            )
    text_dtype = df.schema[cfg.text_column]
    if text_dtype not in (pl.String, pl.Categorical):
        raise DataError(f"{source}: column {cfg.text_column!r} must hold text, found {text_dtype}")

    df = df.select(
        pl.col(cfg.text_column).cast(pl.String).alias(TEXT),
        pl.col(cfg.label_column).cast(pl.String).alias(LABEL),
    ).with_row_index(_ROW, offset=1)

    bad_text = df.filter(pl.col(TEXT).is_null() | (pl.col(TEXT).str.strip_chars() == ""))
    if bad_text.height:
        raise DataError(
            f"{source}: column {cfg.text_column!r} has {bad_text.height} null or empty value(s), "
            f"e.g. row(s) {_rows(bad_text)}"
        )
    bad_label = df.filter(pl.col(LABEL).is_null() | (pl.col(LABEL).str.strip_chars() == ""))
    if bad_label.height:
        raise DataError(
            f"{source}: column {cfg.label_column!r} has {bad_label.height} null or empty label(s), "
            f"e.g. row(s) {_rows(bad_label)}"
        )

    duplicated = df.filter(pl.struct(TEXT, LABEL).is_duplicated())
    if duplicated.height:
        df = df.unique(subset=[TEXT, LABEL], keep="first", maintain_order=True)
        log.warning(
            "%s: dropped %d exact duplicate row(s) of (%s, %s), e.g. row(s) %s",
            source, duplicated.height - duplicated.select(TEXT, LABEL).n_unique(),
            cfg.text_column, cfg.label_column, _rows(duplicated),
        )
    conflicting = df.filter(pl.col(LABEL).n_unique().over(TEXT) > 1)
    if conflicting.height:
        log.warning(
            "%s: %d row(s) share a text with a different label (ambiguous or mislabelled), e.g. row(s) %s",
            source, conflicting.height, _rows(conflicting),
        )

    counts = df.group_by(LABEL).len().filter(pl.col("len") < min_per_class).sort(LABEL)
    if counts.height:
        label, n = counts.row(0)
        example = df.filter(pl.col(LABEL) == label).head(_EXAMPLES)
        more = f" (and {counts.height - 1} more class(es))" if counts.height > 1 else ""
        raise DataError(
            f"{source}: column {cfg.label_column!r}: class {label!r} has {n} example(s), fewer than "
            f"data.min_examples_per_class={min_per_class}{more}; e.g. row(s) {_rows(example)}"
        )
    return df


def _rows(df: pl.DataFrame) -> str:
    rows = df.get_column(_ROW).head(_EXAMPLES).to_list()
    return ", ".join(str(r) for r in rows) + (", ..." if df.height > _EXAMPLES else "")


def subsample(df: pl.DataFrame, max_rows: int, seed: int) -> pl.DataFrame:
    """Deterministic stratified subsample: every class keeps its share, at least 3 rows each."""
    if df.height <= max_rows:
        return df
    fraction = max_rows / df.height
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for _, group in df.group_by(LABEL, maintain_order=True):
        n = max(3, round(group.height * fraction))
        keep.append(rng.choice(group.get_column(_ROW).to_numpy(), size=min(n, group.height), replace=False))
    return df.filter(pl.col(_ROW).is_in(np.concatenate(keep).tolist()))


def stratified_split(df: pl.DataFrame, fractions: Sequence[float], seed: int) -> list[pl.DataFrame]:
    """Split into len(fractions) + 1 parts (the first part gets the remainder), class by class.

    Deterministic for a seed and independent of row order: rows are ordered by (label, text,
    source row) before shuffling. Every class with enough rows has at least one row in each part.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    ordered = df.sort([LABEL, TEXT, _ROW])
    for label in sorted(ordered.get_column(LABEL).unique().to_list()):
        rows = ordered.filter(pl.col(LABEL) == label).get_column(_ROW).to_numpy()
        rows = rows[rng.permutation(len(rows))]
        start = 0
        for i, fraction in enumerate(fractions, start=1):
            n = max(1, round(len(rows) * fraction)) if fraction > 0 else 0
            parts[i].append(rows[start:start + n])
            start += n
        parts[0].append(rows[start:])
    out = []
    for chosen in parts:
        ids = np.concatenate(chosen) if chosen else np.array([], dtype=np.int64)
        # Keep the shuffled order inside each part: no accidental sort by label.
        order = pl.DataFrame({_ROW: ids.astype(np.uint32), "__pos": np.arange(len(ids))})
        out.append(df.join(order, on=_ROW, how="inner").sort("__pos").drop("__pos"))
    return out
