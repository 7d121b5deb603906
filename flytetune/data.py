"""Read, validate and split a labelled text dataset with polars.

Inputs are CSV, parquet or JSON lines tables, or plain text lines (`.txt`: one text per line, blank
lines skipped, read as one column named `data.text_column`: unlabelled text, e.g. for pretraining).

Every problem found in the input is reported as a DataError whose message names the file, the
column and example rows (1-based data rows, as a spreadsheet would show them), so that a bad
file fails in the cheap CPU step, long before a GPU is requested.
"""

import json
import logging
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from flytetune import exports, storage
from flytetune.config import DataConfig

log = logging.getLogger(__name__)

# The workflow's default, relative to the project root: valid in a checkout and in the image's working
# directory (a cluster's pod). The CLI, run from anywhere, takes the installed file.
DEFAULT_DATASET_URI = "flytetune/sample/transactions.parquet"
SAMPLE_DATASET = Path(__file__).resolve().parent / "sample" / "transactions.parquet"
READERS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "ndjson",
    ".ndjson": "ndjson",
    ".txt": "lines",
}
# What holds a label column: every kind but plain text lines (the gate's eval_uri must have labels).
LABELLED_READERS = {suffix: kind for suffix, kind in READERS.items() if kind != "lines"}
_KINDS = "CSV, parquet, JSON lines or text lines (.txt)"
# Normalised column names used after validation, whatever the source calls them.
TEXT, LABEL = "text", "label"
_ROW = "__row"
_EXAMPLES = 3


class DataError(ValueError):
    """The dataset cannot be used; the message names the file, column and rows."""


SOURCES = "sources.json"


def locate(dataset_uri: str, test_uri: str | None = None, at: datetime = exports.NO_CUTOFF) -> dict[str, dict]:
    """Which objects a run will copy, without copying them: role ("dataset", "test") -> {"uri": as
    given, "files": [data file URIs], "export": the Export, or None}.

    A URI ending in `/` over `dt=...` folders is a prefix of dated exports: the newest complete one
    dated at or before `at` is used (flytetune/exports.py). Raises DataError naming the URI when
    there is nothing usable there (empty, a folder, an unsupported type, no such file).
    """
    if not (dataset_uri or "").strip():
        raise DataError(f"dataset_uri is empty; give a {_KINDS} file")
    located = {}
    for role, uri in (("dataset", dataset_uri), ("test", test_uri)):
        if not uri:
            continue
        if exports.is_export_prefix(uri):  # lists only when uri ends in "/"
            try:
                export = exports.pick_export(uri, at)
            except exports.ExportError as e:
                raise DataError(str(e)) from None
            suffixes = sorted({Path(f).suffix.lower() for f in export.files})
            if len(suffixes) > 1 or suffixes[0] not in READERS:
                raise DataError(f"{export.uri}: data files must all be one of {', '.join(READERS)}; "
                                f"found {', '.join(suffixes)}")
            located[role] = {"uri": uri, "files": list(export.files), "export": export}
            continue
        suffix = Path(uri.rstrip("/")).suffix.lower()
        # A folder (a partitioned parquet dataset, say) is refused in the user's terms, not storage's.
        if storage.stat(uri) is None and _is_folder(uri):
            raise DataError(f"{uri}: is a directory; {role}_uri must name a {_KINDS} file")
        if suffix not in READERS:
            raise DataError(f"{uri}: unsupported file type {suffix!r}; use one of {', '.join(READERS)}")
        located[role] = {"uri": uri, "files": [uri], "export": None}
    return located


def lineage(located: dict[str, dict]) -> dict:
    """What a run records about where its data came from: the URIs given, and the exports they resolved to."""
    return {"sources": [source["uri"] for source in located.values()],
            "exports": {role: source["export"].lineage() for role, source in located.items() if source["export"]}}


def fingerprint(located: dict[str, dict]) -> str:
    """Changes when any located object changes (storage.fingerprint: one stat per file, no download)."""
    try:
        return storage.fingerprint([uri for source in located.values() for uri in source["files"]])
    except storage.StorageError as e:
        raise DataError(f"{e}; {', '.join(s['uri'] for s in located.values())} cannot be read") from None


def total_bytes(located: dict[str, dict]) -> int:
    """The located objects' bytes as stored (one stat per file, no download): what the prepare size is chosen by."""
    total = 0
    for source in located.values():
        for uri in source["files"]:
            info = storage.stat(uri)
            if info is None:
                raise DataError(f"{uri}: no such file")
            total += info.size
    return total


def copy_dataset(dataset_uri: str, dest_dir: Path, test_uri: str | None = None,
                 at: datetime = exports.NO_CUTOFF, expect_fingerprint: str | None = None) -> dict[str, dict]:
    """Bring the dataset (and test) file from any storage URI to `dest_dir` (see `locate`).

    Writes `dest_dir/sources.json` mapping each role to its URI and local file name (and the export
    used), so later steps report problems against the URI the user gave, not a temporary copy.
    `expect_fingerprint` (from `fingerprint(locate(...))` earlier in the run) makes the copy refuse
    data that changed since: what was checked, and what a cache entry is keyed by, is what is copied.
    """
    located = locate(dataset_uri, test_uri, at)
    if expect_fingerprint is not None and fingerprint(located) != expect_fingerprint:
        raise DataError(f"{dataset_uri}: changed since this run located it (a new export or a rewritten file); "
                        "run again")
    dest_dir = Path(dest_dir)
    sources = {}
    for role, source in located.items():
        if source["export"] is not None:
            sources[role] = _copy_export(source["uri"], source["export"], role, dest_dir)
            continue
        uri = source["uri"]
        suffix = Path(uri.rstrip("/")).suffix.lower()
        storage.copy(uri, str(dest_dir / f"{role}{suffix}"))
        sources[role] = {"uri": uri, "file": f"{role}{suffix}"}
    (dest_dir / SOURCES).write_text(json.dumps(sources, indent=2) + "\n")
    return sources


def _copy_export(prefix_uri: str, export: exports.Export, role: str, dest_dir: Path) -> dict:
    """The export's data files copied as they are into the folder `<role>-parts/`, which prepare reads
    as one table in name order (`iter_table`): never concatenated, so memory stays flat however many
    rows the export holds. Their schemas are compared here, so that a part which does not fit is
    refused naming its URI before prepare reads a row. The record says which export."""
    folder = f"{role}-parts"
    record = exports.copy_export(export, dest_dir / folder)
    check_parts([(dest_dir / folder / f["file"], f["uri"]) for f in record["files"]], export.uri)
    return {"uri": prefix_uri, "file": folder, "export": record}


def check_parts(parts: Sequence[tuple[Path, str]], name: str) -> None:
    """The (local file, URI) `parts` of one table share columns and types: DataError naming the first
    part that does not, or that is empty, not UTF-8 or unreadable. Reads schemas (a parquet footer, the
    rows CSV and JSON lines infer types from), never the whole data."""
    first_schema, first_uri = None, None
    for path, uri in parts:
        schema = _schema(path, uri)
        if first_schema is None:
            first_schema, first_uri = schema, uri
            continue
        if set(schema) != set(first_schema):
            raise DataError(f"{uri}: columns ({', '.join(schema)}) differ from those of {first_uri} "
                            f"({', '.join(first_schema)}); the data files of {name} must share columns and types")
        for column, dtype in schema.items():
            if not _same_kind(dtype, first_schema[column]):
                raise DataError(f"{uri}: column {column!r} has type {dtype}, but {first_schema[column]} in "
                                f"{first_uri}; the data files of {name} must share columns and types")


def _readable_kind(path: Path, name: str) -> str:
    """The reader kind of a data file by its suffix, once it is known non-empty (and UTF-8 where text)."""
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{name}: unsupported file type {path.suffix!r}; use one of {', '.join(READERS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{name}: file is empty")
    if kind in ("csv", "ndjson", "lines"):
        _check_utf8(path, name)
    return kind


def _schema(path: Path, name: str) -> pl.Schema:
    kind = _readable_kind(path, name)
    try:
        if kind == "parquet":
            return pl.read_parquet_schema(path)
        if kind == "csv":
            return pl.scan_csv(path, infer_schema_length=10_000).collect_schema()
        if kind == "ndjson":
            return pl.scan_ndjson(path).collect_schema()
        return pl.Schema({TEXT: pl.String})  # one column of lines, named when read
    except (pl.exceptions.PolarsError, OSError) as e:
        raise DataError(f"{name}: cannot be read as {kind}: {_first_line(e)}") from None


def _same_kind(a: pl.DataType, b: pl.DataType) -> bool:
    """Whether two parts' types of a column give the same values once prepare casts them to strings:
    integers of any width, strings however stored; an all-null column (Null) fits anything. Integer
    against float is refused: a label 1 would read "1" in one part and "1.0" in the other."""
    def kind(t: pl.DataType) -> str:
        if t == pl.Null:
            return "null"
        if t.is_integer():
            return "integer"
        if any(t == s for s in (pl.String, pl.Categorical, pl.Enum)):
            return "string"
        return str(t)
    return "null" in (kind(a), kind(b)) or kind(a) == kind(b)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _is_folder(uri: str) -> bool:
    location = storage.parse(uri)
    return storage.backend(location).is_prefix(location)


def load_sources(raw_dir: Path) -> dict[str, dict]:
    path = Path(raw_dir) / SOURCES
    if not path.is_file():
        raise FileNotFoundError(f"{raw_dir}: no {SOURCES}; copy the dataset with copy_dataset first")
    return json.loads(path.read_text())


def read_table(path: Path, name: str | None = None, text_column: str = TEXT) -> pl.DataFrame:
    """Read CSV, parquet, JSON lines or text lines (into the column `text_column`), chosen by the file
    suffix; errors say `name` (default: the path). Reads the whole file: `iter_table` streams."""
    path = Path(path)
    name = name or str(path)
    if not path.exists():
        raise DataError(f"{name}: no such file")
    if path.is_dir():
        raise DataError(f"{name}: is a directory; give one {_KINDS} file")
    kind = _readable_kind(path, name)
    try:
        if kind == "csv":
            df = pl.read_csv(path, infer_schema_length=10_000)
        elif kind == "ndjson":
            df = pl.read_ndjson(path)
        elif kind == "lines":
            df = pl.concat([pl.DataFrame(schema={text_column: pl.String}),
                            *_iter_lines(path, text_column, 1 << 20)])
        else:
            df = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise DataError(f"{name}: cannot be read as {kind}: {_first_line(e)}") from None
    if df.height == 0:
        raise DataError(_no_rows(name, kind))
    return df


def _no_rows(name: str, kind: str) -> str:
    return f"{name}: has only blank lines" if kind == "lines" else f"{name}: has a header but no rows"


def _iter_lines(path: Path, column: str, chunk_rows: int) -> Iterator[pl.DataFrame]:
    """A text file's non-blank lines, one text each (without the line break), as frames of the one
    column `column`, at most `chunk_rows` rows each. Checked as UTF-8 beforehand (`_check_utf8`)."""
    texts = []
    # utf-8-sig: a byte-order mark some editors write is not part of the first text.
    # newline=None: \n, \r\n and \r all end a line.
    with open(path, encoding="utf-8-sig", newline=None) as f:
        for line in f:
            text = line.rstrip("\n")
            if text.strip():
                texts.append(text)
                if len(texts) == chunk_rows:
                    yield pl.DataFrame({column: texts}, schema={column: pl.String})
                    texts = []
    if texts:
        yield pl.DataFrame({column: texts}, schema={column: pl.String})


def _check_utf8(path: Path, name: str) -> None:
    # polars would either fail with a byte offset deep in its parser or, with lossy decoding,
    # silently train on replacement characters; a line number is what a person can act on.
    # Read in blocks: a file of tens of millions of rows is never held whole.
    start, lines, tail = 0, 0, b""  # start: the file offset of data[0]
    with open(path, "rb") as f:
        while True:
            block = f.read(_UTF8_BLOCK)
            data = tail + block
            if not data:
                return
            try:
                data.decode("utf-8")
                good, tail = data, b""
            except UnicodeDecodeError as e:
                if not (block and e.reason == "unexpected end of data"):
                    bad = data[e.start:e.start + 4]
                    bad += f.read(4 - len(bad)) if len(bad) < 4 else b""
                    line = lines + data.count(b"\n", 0, e.start) + 1
                    raise DataError(
                        f"{name}: not valid UTF-8 at byte {start + e.start} (line {line}): {bad!r}; "
                        "re-encode the file as UTF-8"
                    ) from None
                # A character cut at the end of the block: decoded with the next one.
                good, tail = data[:e.start], data[e.start:]
            lines += good.count(b"\n")
            start += len(good)


_UTF8_BLOCK = 16 << 20


def table_files(path: Path) -> list[Path]:
    """The data files of `path`: itself, or for a folder its data files (parquet parts, say), sorted by name."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in READERS)


def source_files(raw_dir: Path, sources: dict[str, dict]) -> list[Path]:
    """Every data file of a copy (`copy_dataset`'s sources), role by role, a folder's in name order: what
    the dataset's SHA-256 covers (the copy task's cache hash; prepare's meta computes the same)."""
    return [file for source in sources.values() for file in table_files(Path(raw_dir) / source["file"])]


def iter_table(path: Path, name: str | None = None, chunk_rows: int = 100_000,
               text_column: str = TEXT) -> Iterator[pl.DataFrame]:
    """The rows of a CSV, parquet, JSON lines or text lines file, or of a folder of such files (its
    parts, read in name order), as frames of at most `chunk_rows` rows, read lazily: memory does not
    grow with the file. Text lines are read into the one column `text_column` (data.text_column).

    Raises the DataErrors of `read_table`, naming `name` (default: the path)."""
    path = Path(path)
    name = name or str(path)
    if not path.exists():
        raise DataError(f"{name}: no such file")
    files = table_files(path)
    if path.is_dir() and not files:
        raise DataError(f"{name}: is a directory with no {_KINDS} files")
    kinds = set()
    for file in files:
        kind = READERS.get(file.suffix.lower())
        if kind is None:
            raise DataError(f"{name}: unsupported file type {file.suffix!r}; use one of {', '.join(READERS)}")
        if file.stat().st_size == 0:
            raise DataError(f"{name}: file is empty" if file == path else f"{name}: {file.name} is empty")
        kinds.add(kind)
    if len(kinds) > 1:
        raise DataError(f"{name}: data files must all be of one type; found {', '.join(sorted(kinds))}")
    (kind,) = kinds
    if kind in ("csv", "ndjson", "lines"):
        for file in files:
            _check_utf8(file, name)
    rows = 0
    try:
        for file in files:
            if kind == "lines":
                for piece in _iter_lines(file, text_column, chunk_rows):
                    rows += piece.height
                    yield piece
                continue
            if kind == "csv":
                frame = pl.scan_csv(file, infer_schema_length=10_000)
            elif kind == "ndjson":
                frame = pl.scan_ndjson(file)
            else:
                frame = pl.scan_parquet(file)
            for batch in frame.collect_batches(chunk_size=chunk_rows, maintain_order=True):
                for piece in batch.iter_slices(chunk_rows):
                    if piece.height:
                        rows += piece.height
                        yield piece
    except (pl.exceptions.PolarsError, OSError) as e:
        raise DataError(f"{name}: cannot be read as {kind}: {_first_line(e)}") from None
    if rows == 0:
        raise DataError(_no_rows(name, kind))


def validate(df: pl.DataFrame, source: str, cfg: DataConfig, *, min_per_class: int | None = None,
             report: dict | None = None) -> pl.DataFrame:
    """Check columns and values; return a frame with `text`, `label` (str) and the source row number.

    Exact duplicate rows are dropped with a warning; everything else that is wrong is an error.
    `report`, if given, receives what the warnings say, for the dataset profile: `duplicates_dropped`,
    `conflicting_label_rows` (counts) and `warnings` (the logged messages).
    """
    min_per_class = cfg.min_examples_per_class if min_per_class is None else min_per_class
    check_columns(df, source, cfg)

    df = df.select(
        pl.col(cfg.text_column).cast(pl.String).alias(TEXT),
        # Booleans become "true"/"false", integers their decimal digits: the class names a person reads.
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

    warnings = []
    duplicated = df.filter(pl.struct(TEXT, LABEL).is_duplicated())
    dropped = duplicated.height - duplicated.select(TEXT, LABEL).n_unique() if duplicated.height else 0
    if duplicated.height:
        df = df.unique(subset=[TEXT, LABEL], keep="first", maintain_order=True)
        warnings.append(f"{source}: dropped {dropped} exact duplicate row(s) of ({cfg.text_column}, "
                        f"{cfg.label_column}), e.g. row(s) {_rows(duplicated)}")
    conflicting = df.filter(pl.col(LABEL).n_unique().over(TEXT) > 1)
    if conflicting.height:
        warnings.append(f"{source}: {conflicting.height} row(s) share a text with a different label (ambiguous or "
                        f"mislabelled), e.g. row(s) {_rows(conflicting)}")
    for message in warnings:
        log.warning("%s", message)
    if report is not None:
        report.update(duplicates_dropped=dropped, conflicting_label_rows=conflicting.height, warnings=warnings)

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


# Anything else would be turned into class names silently ("0.1", "{'clothing'}") or fail deep in polars.
# Null is the type of an all-empty column: let the null check below name its rows.
_TEXT_TYPES = (pl.String, pl.Categorical, pl.Enum, pl.Null)
_LABEL_TYPES = (*_TEXT_TYPES, pl.Boolean, pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.Int128,
                pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)


def check_columns(df: pl.DataFrame, source: str, cfg: DataConfig) -> None:
    """The text and label columns exist and hold usable types (DataError naming the column)."""
    for role, column in (("text", cfg.text_column), ("label", cfg.label_column)):
        if column not in df.columns:
            raise DataError(
                f"{source}: {role} column {column!r} not found (columns: {', '.join(df.columns)}); "
                f"set data.{role}_column in the config"
            )
    _check_type(df, source, "text", cfg.text_column, _TEXT_TYPES, "text (strings)")
    _check_type(df, source, "label", cfg.label_column, _LABEL_TYPES, "strings, integers or booleans")


def _check_type(df: pl.DataFrame, source: str, role: str, column: str, allowed: tuple, wanted: str) -> None:
    dtype = df.schema[column]
    # `==` matches a parametrised type (Categorical, Enum with its categories) against its class.
    if not any(dtype == kind for kind in allowed):
        raise DataError(
            f"{source}: {role} column {column!r} has type {dtype}; it must hold {wanted} "
            f"(set data.{role}_column or convert the column)"
        )


def require_classes(df: pl.DataFrame, source: str, cfg: DataConfig) -> None:
    """A classifier needs at least two classes; one would train a regression head with accuracy 1.0."""
    require_labels(df.get_column(LABEL).unique().to_list(), source, cfg)


def require_labels(labels: Sequence[str], source: str, cfg: DataConfig) -> None:
    """`require_classes` given the distinct labels."""
    labels = sorted(labels)
    if len(labels) < 2:
        found = f"only class {labels[0]!r}" if labels else "no class"
        raise DataError(
            f"{source}: label column {cfg.label_column!r} has {found}; a classifier needs at least two classes"
        )


def _rows(df: pl.DataFrame) -> str:
    rows = df.get_column(_ROW).head(_EXAMPLES).to_list()
    return ", ".join(str(r) for r in rows) + (", ..." if df.height > _EXAMPLES else "")


def subsample(df: pl.DataFrame, cfg: DataConfig, source: str) -> pl.DataFrame:
    """Deterministic stratified subsample of at most `cfg.max_rows` rows.

    Every class keeps its share of the rows, but at least `cfg.min_examples_per_class` (what
    `validate` demands of the full data, so that every split still gets each class). Raises
    DataError when the classes alone need more than `max_rows`.
    """
    max_rows = cfg.max_rows
    if max_rows is None or df.height <= max_rows:
        return df
    groups = [group.get_column(_ROW).to_numpy() for _, group in df.group_by(LABEL, maintain_order=True)]
    keep = subsample_rows(groups, cfg, source)
    return df.filter(pl.col(_ROW).is_in(np.concatenate(keep).tolist()))


def subsample_rows(groups: list[np.ndarray], cfg: DataConfig, source: str) -> list[np.ndarray]:
    """`subsample` on row numbers: `groups` holds each class's rows (classes in order of first appearance,
    rows in file order) and there are more than `cfg.max_rows` rows; returns the rows kept of each class."""
    quota = subsample_quota(np.array([len(group) for group in groups]), cfg, source)
    rng = np.random.default_rng(cfg.split_seed)
    return [rng.choice(group, size=int(n), replace=False) for group, n in zip(groups, quota, strict=True)]


def subsample_quota(sizes: np.ndarray, cfg: DataConfig, source: str) -> np.ndarray:
    """How many rows `subsample` keeps of each class, given its rows per class (`sizes`, more than
    `cfg.max_rows` in all)."""
    max_rows, min_per_class = cfg.max_rows, cfg.min_examples_per_class
    floor_rows = len(sizes) * min_per_class
    if floor_rows > max_rows:
        raise DataError(
            f"{source}: data.max_rows={max_rows} is too small for {len(sizes)} classes with "
            f"data.min_examples_per_class={min_per_class} (needs at least {floor_rows}); "
            "raise data.max_rows or set it to null"
        )
    sizes = np.asarray(sizes, dtype=np.float64)
    # Each class gets its share of max_rows, but never fewer than min_per_class rows (validate() made
    # sure it has them): pin the classes whose share falls short and share the rest among the others.
    pinned = np.zeros(len(sizes), dtype=bool)
    while True:
        rest = sizes[~pinned].sum()
        fraction = (max_rows - min_per_class * pinned.sum()) / rest if rest else 0.0
        short = ~pinned & (sizes * fraction < min_per_class)
        if not short.any():
            break
        pinned |= short
    share = np.where(pinned, min_per_class, sizes * fraction)
    quota = np.floor(share).astype(np.int64)
    # Largest remainders get the rows left over (stable: ties keep the order of first appearance).
    leftover = max_rows - int(quota.sum())
    quota[np.argsort(-(share - quota), kind="stable")[:leftover]] += 1
    log.info("%s: kept %d of %d rows (data.max_rows)", source, max_rows, int(sizes.sum()))
    return quota


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
