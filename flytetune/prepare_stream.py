"""The parts of `flytetune.prepare` that let it handle tens of millions of rows in flat memory.

Pass 1 (`scan`) reads the table in chunks and keeps nothing a row in memory: each row's record (a
seeded 64-bit key of its text, its label code, its row number: 20 bytes) goes to one of PARTITIONS
files on disk, by the top bits of the key. Equal texts share a key, so every check of
`flytetune.data.validate` runs one partition at a time, with the same messages and row numbers:
exact duplicates and conflicting labels are found across the whole table by sorting one partition's
keys, never by holding texts or the whole table's keys. Partitions in order are keys in order, and
the key order is a seeded shuffle of the texts: `split` walks the partitions once and gives each
class's first rows in that order to validation and test, the rest (up to data.max_rows' quota) to
train. Pass 2 (`select` over `iter_table` again) reads the rows of one split back, a bucket of row
numbers at a time, and `Tokenize` tokenises them in batches, on every core.

Memory holds a partition (rows / PARTITIONS records) or a bucket of SELECT_ROWS rows at a time, and
per class a few counters; disk holds about 36 bytes a row while prepare runs.
"""

import itertools
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from flytetune.config import DataConfig
from flytetune.cpus import cpu_threads
from flytetune.data import _EXAMPLES, LABEL, TEXT, DataError, check_columns

log = logging.getLogger(__name__)

# Rows read per chunk, and texts per tokenizer call (one task for a worker process).
CHUNK_ROWS = 100_000
BATCH_TEXTS = 10_000
# Fixed seed of the text hash: the same text hashes the same in every run (of one polars version).
_HASH_SEED = 0x5EED
# Partition files of pass 1 (a power of two): 100M rows are ~8 MB of records each.
PARTITIONS = 256
# Rows of the file per bucket of a split's (row, position) records: what `select` holds at once.
SELECT_ROWS = 1_000_000

RECORD = np.dtype([("key", "<u8"), ("code", "<i4"), ("row", "<i8")])
PLACED = np.dtype([("row", "<i8"), ("position", "<i8")])


def row_keys(hashes: np.ndarray, seed: int) -> np.ndarray:
    """Text hashes mixed with `seed` (splitmix64's finaliser, a bijection): equal keys are equal hashes,
    and sorting by key is a shuffle that only the seed and the texts decide."""
    z = hashes.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (seed + 1)) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Partitions:
    """Records of one table, in `count` files by the top bits of their keys (every row of a text in one
    file; the files in order hold ascending keys)."""

    def __init__(self, folder: Path, count: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = count or PARTITIONS
        if self.count < 2 or self.count & (self.count - 1):
            raise ValueError(f"partitions: {self.count} is not a power of two above 1")
        self._shift = np.uint64(64 - self.count.bit_length() + 1)
        self._files = {}

    def _path(self, p: int) -> Path:
        return self.folder / f"{p:05d}.rec"

    def add(self, records: np.ndarray) -> None:
        for p, group in _grouped(records, (records["key"] >> self._shift).astype(np.intp), self.count):
            if p not in self._files:
                self._files[p] = open(self._path(p), "ab")  # noqa: SIM115
            group.tofile(self._files[p])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getitem__(self, p: int) -> np.ndarray:
        return _read(self._path(p), RECORD)

    def __setitem__(self, p: int, records: np.ndarray) -> None:
        tmp = self._path(p).with_suffix(".tmp")
        records.tofile(tmp)
        os.replace(tmp, self._path(p))


def _grouped(records: np.ndarray, bucket: np.ndarray, count: int) -> Iterator[tuple[int, np.ndarray]]:
    """(b, the records whose bucket is b, in their order) for each of `count` buckets that has any."""
    order = np.argsort(bucket, kind="stable")
    records, bounds = records[order], np.searchsorted(bucket[order], np.arange(count + 1))
    for b in np.flatnonzero(np.diff(bounds)).tolist():
        yield b, records[bounds[b]:bounds[b + 1]]


def _read(path: Path, dtype: np.dtype) -> np.ndarray:
    """The records in `path`; none when it was never written (a bucket no row fell in)."""
    return np.fromfile(path, dtype=dtype) if path.exists() else np.empty(0, dtype)


@dataclass
class Scanned:
    """What pass 1 keeps of a table: the records of its kept rows (the first row of each distinct
    (text, label)) in partitions sorted by key, the labels (a record's code indexes `names`, in order of
    first appearance), the kept rows per code, and the rows read."""

    records: Partitions
    names: list[str]
    counts: np.ndarray  # int64, per code
    rows: int


def scan(batches: Iterable[pl.DataFrame], source: str, cfg: DataConfig, folder: Path, *,
         min_per_class: int | None = None, report: dict | None = None) -> Scanned:
    """`flytetune.data.validate` over a table read in chunks: the same checks, errors and warnings.
    Its records go to `folder`, keyed by `cfg.split_seed`."""
    min_per_class = cfg.min_examples_per_class if min_per_class is None else min_per_class
    records, index = Partitions(folder), {}
    bad = {TEXT: _Rows(), LABEL: _Rows()}
    offset = 0
    for chunk in batches:
        check_columns(chunk, source, cfg)
        chunk = chunk.select(pl.col(cfg.text_column).cast(pl.String).alias(TEXT),
                             pl.col(cfg.label_column).cast(pl.String).alias(LABEL))
        flags = chunk.select(*(((pl.col(c).is_null() | (pl.col(c).str.strip_chars() == "")).alias(c))
                               for c in (TEXT, LABEL)))
        for column in (TEXT, LABEL):
            bad[column].add(offset + np.flatnonzero(flags.get_column(column).to_numpy()))
        for label in chunk.get_column(LABEL).unique(maintain_order=True).to_list():
            if label is not None and label not in index:
                index[label] = len(index)
        batch = np.empty(chunk.height, RECORD)
        batch["key"] = row_keys(chunk.get_column(TEXT).hash(_HASH_SEED).to_numpy(), cfg.split_seed)
        batch["code"] = chunk.get_column(LABEL).replace_strict(index, default=-1, return_dtype=pl.Int32).to_numpy()
        batch["row"] = np.arange(offset, offset + chunk.height)
        records.add(batch)
        offset += chunk.height
    records.close()
    if bad[TEXT].count:
        raise DataError(f"{source}: column {cfg.text_column!r} has {bad[TEXT].count} null or empty value(s), "
                        f"e.g. row(s) {bad[TEXT]}")
    if bad[LABEL].count:
        raise DataError(f"{source}: column {cfg.label_column!r} has {bad[LABEL].count} null or empty label(s), "
                        f"e.g. row(s) {bad[LABEL]}")
    names = list(index)
    counts = np.zeros(len(names), dtype=np.int64)
    duplicate_rows, conflicting_rows = _Rows(), _Rows()
    for p in range(records.count):
        kept, duplicated, conflicting = _duplicates(records[p])
        records[p] = kept
        counts += np.bincount(kept["code"], minlength=len(names))
        duplicate_rows.add(duplicated)
        conflicting_rows.add(conflicting)

    warnings = []
    dropped = offset - int(counts.sum())
    if dropped:
        warnings.append(f"{source}: dropped {dropped} exact duplicate row(s) of ({cfg.text_column}, "
                        f"{cfg.label_column}), e.g. row(s) {duplicate_rows}")
    if conflicting_rows.count:
        warnings.append(f"{source}: {conflicting_rows.count} row(s) share a text with a different label (ambiguous "
                        f"or mislabelled), e.g. row(s) {conflicting_rows}")
    for message in warnings:
        log.warning("%s", message)
    if report is not None:
        report.update(duplicates_dropped=dropped, conflicting_label_rows=conflicting_rows.count, warnings=warnings)

    short = sorted(name for name, n in zip(names, counts, strict=True) if n < min_per_class)
    if short:
        label = short[0]
        code = names.index(label)
        example = _Rows()
        for p in range(records.count):
            kept = records[p]
            example.add(kept["row"][kept["code"] == code])
        more = f" (and {len(short) - 1} more class(es))" if len(short) > 1 else ""
        raise DataError(
            f"{source}: column {cfg.label_column!r}: class {label!r} has {counts[code]} example(s), fewer than "
            f"data.min_examples_per_class={min_per_class}{more}; e.g. row(s) {example}"
        )
    return Scanned(records=records, names=names, counts=counts, rows=offset)


class _Rows:
    """How many rows were flagged, and the first few of them, from 0-based rows added in any order."""

    def __init__(self):
        self.count, self.first = 0, np.empty(0, dtype=np.int64)

    def add(self, rows: np.ndarray) -> None:
        self.count += len(rows)
        self.first = np.sort(np.concatenate([self.first, rows]))[:_EXAMPLES]

    def __str__(self) -> str:
        """As `flytetune.data._rows`: the first few 1-based rows, and "..." when there are more."""
        return ", ".join(str(int(r) + 1) for r in self.first) + (", ..." if self.count > _EXAMPLES else "")


def _duplicates(records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of one partition's records: (the kept ones: the first row of each (text, label), sorted by key
    then label; the rows of every duplicated (text, label), first occurrences included; the kept rows
    whose text has more than one label)."""
    if not len(records):
        return records, np.empty(0, np.int64), np.empty(0, np.int64)
    records = records[np.lexsort((records["row"], records["code"], records["key"]))]
    key, code = records["key"], records["code"]
    same = (key[1:] == key[:-1]) & (code[1:] == code[:-1])
    member = np.zeros(len(records), dtype=bool)
    member[1:] |= same
    member[:-1] |= same
    kept = records[np.r_[True, ~same]]
    key, code = kept["key"], kept["code"]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(kept)]
    mixed = code[starts] != code[ends - 1]  # sorted by label inside a text: first != last means two labels
    return kept, records["row"][member], kept["row"][np.repeat(mixed, ends - starts)]


class Split:
    """One split's rows of a table: each one's (row, position in the split) in files of SELECT_ROWS rows
    of the table, and the split's rows per code."""

    def __init__(self, folder: Path, table_rows: int, counts: np.ndarray):
        self.folder, self.table_rows, self.counts = Path(folder), table_rows, counts
        self.folder.mkdir(parents=True, exist_ok=True)
        self._held = {}

    @property
    def size(self) -> int:
        return int(self.counts.sum())

    def _path(self, b: int) -> Path:
        return self.folder / f"{b:06d}.placed"

    def add(self, rows: np.ndarray, positions: np.ndarray) -> None:
        placed = np.empty(len(rows), PLACED)
        placed["row"], placed["position"] = rows, positions
        for b, group in _grouped(placed, rows // SELECT_ROWS, -(-self.table_rows // SELECT_ROWS)):
            # Opened per write: a billion rows are a thousand buckets per split, past a process's files.
            with open(self._path(b), "ab") as f:
                group.tofile(f)

    def bucket(self, b: int) -> np.ndarray:
        """The placed rows of rows [b * SELECT_ROWS, (b + 1) * SELECT_ROWS), sorted by row."""
        placed = _read(self._path(b), PLACED)
        return placed[np.argsort(placed["row"], kind="stable")]

    def between(self, start: int, stop: int) -> np.ndarray:
        """The placed rows of rows [start, stop), sorted by row; holds the buckets they span only."""
        wanted = range(start // SELECT_ROWS, (max(start, stop - 1)) // SELECT_ROWS + 1)
        self._held = {b: self._held.get(b) if b in self._held else self.bucket(b) for b in wanted}
        placed = np.concatenate([self._held[b] for b in wanted])
        return placed[(placed["row"] >= start) & (placed["row"] < stop)]


def split(scanned: Scanned, fractions: Sequence[float], folder: Path, quota: np.ndarray | None = None,
          against: Scanned | None = None) -> tuple[list[Split], int]:
    """Stratified split of the kept rows into len(fractions) + 1 parts (the first part gets the remainder),
    and how many kept rows of `against` (a held-out test table, keyed alike) share a text with part 0.

    Class by class, in key order (a shuffle decided by data.split_seed and the texts, not by the rows'
    order), the first max(1, round(n * fraction)) rows go to each fraction's part in turn, the rest to
    part 0; with `quota` (rows to keep per code, data.max_rows), only a class's first `quota` rows.
    A part holds its classes one after the other, in label order.
    """
    sizes = scanned.counts if quota is None else np.minimum(quota, scanned.counts)
    classes, parts = len(scanned.names), len(fractions) + 1
    low = np.zeros((parts, classes), dtype=np.int64)  # each part's ranks in its class: [low, high)
    high = np.zeros((parts, classes), dtype=np.int64)
    for code, n in enumerate(sizes.tolist()):
        start = 0
        for i, fraction in enumerate(fractions, start=1):
            take = min(n - start, max(1, round(n * fraction)) if fraction > 0 else 0)
            low[i, code], high[i, code] = start, start + take
            start += take
        low[0, code], high[0, code] = start, n
    counts = high - low
    in_label_order = sorted(range(classes), key=scanned.names.__getitem__)
    offset = np.zeros((parts, classes), dtype=np.int64)
    offset[:, in_label_order] = np.cumsum(counts[:, in_label_order], axis=1) - counts[:, in_label_order]
    out = [Split(Path(folder) / str(i), scanned.rows, counts[i]) for i in range(parts)]
    seen = np.zeros(classes, dtype=np.int64)
    overlap = 0
    for p in range(scanned.records.count):
        records = scanned.records[p]  # by key
        code = records["code"]
        by_code = np.argsort(code, kind="stable")
        rank = np.empty(len(code), dtype=np.int64)
        rank[by_code] = np.arange(len(code)) - np.searchsorted(code[by_code], code[by_code])
        rank += seen[code]
        seen += np.bincount(code, minlength=classes)
        for i, part in enumerate(out):
            mine = (rank >= low[i, code]) & (rank < high[i, code])
            part.add(records["row"][mine], offset[i, code[mine]] + rank[mine] - low[i, code[mine]])
            if i == 0 and against is not None:
                overlap += int(np.isin(against.records[p]["key"], records["key"][mine]).sum())
    return out, overlap


def in_file_order(scanned: Scanned, folder: Path) -> Split:
    """Every kept row of a table as one split, in the order of the file (a held-out test file)."""
    out = Split(folder, scanned.rows, scanned.counts)
    for p in range(scanned.records.count):
        records = scanned.records[p]
        out.add(records["row"], np.zeros(len(records), dtype=np.int64))
    filled = 0
    for b in range(-(-scanned.rows // SELECT_ROWS)):
        placed = out.bucket(b)
        placed["position"] = filled + np.arange(len(placed))
        filled += len(placed)
        placed.tofile(out._path(b))
    return out


POSITION = "__position"


def select(batches: Iterable[pl.DataFrame], rows: Split, cfg: DataConfig) -> Iterator[pl.DataFrame]:
    """The rows of `rows` from the table (read again, chunk by chunk): frames of (text, label, POSITION:
    the row's position in its split)."""
    offset = 0
    for chunk in batches:
        placed = rows.between(offset, offset + chunk.height)
        if len(placed):
            mask = np.zeros(chunk.height, dtype=bool)
            mask[placed["row"] - offset] = True
            yield chunk.filter(pl.Series(mask)).select(pl.col(cfg.text_column).cast(pl.String).alias(TEXT),
                                                       pl.col(cfg.label_column).cast(pl.String).alias(LABEL),
                                                       pl.Series(POSITION, placed["position"]))
        offset += chunk.height
    if offset != rows.table_rows:
        raise DataError(f"the data changed while it was prepared: {offset} rows now, {rows.table_rows} before")


# --- tokenisation -------------------------------------------------------------------------------------

_TOKENIZER = None


def _load(tokenizer_json: str, max_length: int):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    # What `tokenizer(texts, truncation=True, max_length=max_length)` of transformers asks of its backend.
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    return tokenizer


def _init_worker(tokenizer_json: str, max_length: int) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _TOKENIZER = _load(tokenizer_json, max_length)


def _encode(texts: list[str], tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """(token ids of all texts back to back as int32, each text's token count)."""
    tokenizer = tokenizer or _TOKENIZER
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: faster
    ids = [e.ids for e in encode(texts)]
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def cores() -> int:
    """Worker processes for tokenising: the pod's CPU limit, not the node's cores."""
    return cpu_threads()


class Tokenize:
    """Token ids of batches of texts, exactly as `tokenizer(texts, truncation=True, max_length=...)`
    returns them, computed in `workers` processes (one per core by default; 0: in this process).

    Results come back in order; at most two batches per worker are in flight, so memory stays bounded.
    """

    def __init__(self, tokenizer, max_length: int, workers: int | None = None):
        self._json = tokenizer.backend_tokenizer.to_str()
        self._max_length = max_length
        self.workers = cores() if workers is None else workers
        self._pool = None
        self._local = None

    def __enter__(self) -> "Tokenize":
        if self.workers > 0:
            # spawn: the parent runs polars' threads, which a fork would copy mid-flight.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self._json, self._max_length))
        else:
            self._local = _load(self._json, self._max_length)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, batches: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(flat ids, lengths) per batch of texts, in order."""
        if self._pool is None:
            for texts in batches:
                yield _encode(texts, self._local)
            return
        pending = deque()
        for texts in batches:
            pending.append(self._pool.submit(_encode, texts))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def text_batches(frames: Iterable[pl.DataFrame], size: int = BATCH_TEXTS) -> Iterator[pl.DataFrame]:
    """The same rows regrouped into frames of `size` rows (the last may be shorter)."""
    buffer, held = [], 0
    for frame in frames:
        while frame.height:
            take = frame.head(size - held)
            frame = frame.slice(take.height)
            buffer.append(take)
            held += take.height
            if held == size:
                yield pl.concat(buffer)
                buffer, held = [], 0
    if held:
        yield pl.concat(buffer)


# --- back into split order ----------------------------------------------------------------------------

# Rows per bucket of positions: what is held in memory at once to put one bucket in order.
BUCKET_ROWS = 500_000


class Reorder:
    """Tokenised rows that arrive in file order, handed back in the order of their positions in a split.

    Each batch is cut by position into buckets of BUCKET_ROWS consecutive positions, appended to one
    spill file per bucket; `rows()` then loads one bucket at a time, puts it in order and yields it.
    """

    def __init__(self, folder, total: int, bucket_rows: int | None = None):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.bucket_rows = bucket_rows or BUCKET_ROWS
        self.buckets = max(1, -(-total // self.bucket_rows))
        self._files = [open(self.folder / f"{b:06d}.npy", "wb") for b in range(self.buckets)]  # noqa: SIM115

    def add(self, position: np.ndarray, flat: np.ndarray, lengths: np.ndarray, labels: np.ndarray) -> None:
        bucket = position // self.bucket_rows
        token_bucket = np.repeat(bucket, lengths)
        for b in np.unique(bucket):
            rows = np.flatnonzero(bucket == b)
            tokens = flat[token_bucket == b]
            f = self._files[int(b)]
            for array in (position[rows], lengths[rows], labels[rows], tokens):
                np.save(f, array, allow_pickle=False)

    def rows(self) -> Iterator[tuple[np.ndarray, int]]:
        """(input_ids, label) in position order."""
        for f in self._files:
            f.close()
        for b in range(self.buckets):
            pieces = []
            with open(self.folder / f"{b:06d}.npy", "rb") as f:
                while f.peek(1):
                    pieces.append([np.load(f, allow_pickle=False) for _ in range(4)])
            (self.folder / f"{b:06d}.npy").unlink()
            if not pieces:
                continue
            position, lengths, labels, flat = (np.concatenate(column) for column in zip(*pieces, strict=True))
            del pieces
            ends = np.cumsum(lengths)
            starts = ends - lengths
            for i in np.argsort(position, kind="stable").tolist():
                yield flat[starts[i]:ends[i]], int(labels[i])

    def close(self) -> None:
        for f in self._files:
            f.close()
