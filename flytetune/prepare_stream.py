"""The parts of `flytetune.prepare` that let it handle tens of millions of rows in bounded memory.

Pass 1 (`scan`) reads the table in chunks and keeps per row only fixed-size numbers: a 64-bit hash
of the text and a label code (12 bytes a row). Every check of `flytetune.data.validate` runs on
those, with the same messages and row numbers: exact duplicates and conflicting labels are found
across the whole table by sorting hashes, never by holding texts. `split_rows` assigns rows to
splits from the hashes alone. Pass 2 (`Tokenize` over `iter_table` again) tokenises the rows of one
split at a time in batches, on every core, and hands them on as they come.
"""

import itertools
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

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


@dataclass
class Scanned:
    """What pass 1 keeps of a table: per row (0-based index = row number - 1) the text's hash, the
    label's code (index into `names`, in order of first appearance) and whether the row is kept."""

    hashes: np.ndarray  # uint64
    codes: np.ndarray  # int32
    keep: np.ndarray  # bool: not a repeat of an earlier (text, label) row
    names: list[str]

    @property
    def rows(self) -> int:
        return len(self.codes)


def scan(batches: Iterable[pl.DataFrame], source: str, cfg: DataConfig, *, min_per_class: int | None = None,
         report: dict | None = None) -> Scanned:
    """`flytetune.data.validate` over a table read in chunks: the same checks, errors and warnings."""
    min_per_class = cfg.min_examples_per_class if min_per_class is None else min_per_class
    hashes, codes, index = [], [], {}
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
        hashes.append(chunk.get_column(TEXT).hash(_HASH_SEED).to_numpy())
        codes.append(chunk.get_column(LABEL).replace_strict(index, default=-1, return_dtype=pl.Int32).to_numpy())
        offset += chunk.height
    if bad[TEXT].count:
        raise DataError(f"{source}: column {cfg.text_column!r} has {bad[TEXT].count} null or empty value(s), "
                        f"e.g. row(s) {bad[TEXT]}")
    if bad[LABEL].count:
        raise DataError(f"{source}: column {cfg.label_column!r} has {bad[LABEL].count} null or empty label(s), "
                        f"e.g. row(s) {bad[LABEL]}")
    h = np.concatenate(hashes).astype(np.uint64, copy=False)
    c = np.concatenate(codes).astype(np.int32, copy=False)
    del hashes, codes
    names = list(index)
    keep, duplicate_rows, conflicting_rows = _duplicates(h, c)

    warnings = []
    dropped = int((~keep).sum())
    if dropped:
        warnings.append(f"{source}: dropped {dropped} exact duplicate row(s) of ({cfg.text_column}, "
                        f"{cfg.label_column}), e.g. row(s) {_format(duplicate_rows)}")
    if len(conflicting_rows):
        warnings.append(f"{source}: {len(conflicting_rows)} row(s) share a text with a different label (ambiguous "
                        f"or mislabelled), e.g. row(s) {_format(conflicting_rows)}")
    for message in warnings:
        log.warning("%s", message)
    if report is not None:
        report.update(duplicates_dropped=dropped, conflicting_label_rows=len(conflicting_rows), warnings=warnings)

    counts = np.bincount(c[keep], minlength=len(names))
    short = sorted(name for name, n in zip(names, counts, strict=True) if n < min_per_class)
    if short:
        label = short[0]
        code = names.index(label)
        example = np.flatnonzero(keep & (c == code))[:_EXAMPLES] + 1
        more = f" (and {len(short) - 1} more class(es))" if len(short) > 1 else ""
        raise DataError(
            f"{source}: column {cfg.label_column!r}: class {label!r} has {counts[code]} example(s), fewer than "
            f"data.min_examples_per_class={min_per_class}{more}; e.g. row(s) {_format(example, len(example))}"
        )
    return Scanned(hashes=h, codes=c, keep=keep, names=names)


class _Rows:
    """How many rows were flagged, and the first few of them (1-based)."""

    def __init__(self):
        self.count, self.first = 0, []

    def add(self, rows: np.ndarray) -> None:
        self.count += len(rows)
        self.first.extend((rows[:_EXAMPLES - len(self.first)] + 1).tolist())

    def __str__(self) -> str:
        return _format(np.array(self.first), self.count)


def _format(rows: np.ndarray, count: int | None = None) -> str:
    """As `flytetune.data._rows`: the first few 1-based rows, and "..." when there are more."""
    count = len(rows) if count is None else count
    return ", ".join(str(int(r)) for r in rows[:_EXAMPLES]) + (", ..." if count > _EXAMPLES else "")


def _duplicates(h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keep: not a repeat of an earlier row with the same text and label; the 1-based rows of every
    duplicated (text, label), first occurrences included; the 1-based kept rows whose text has more
    than one label), each in row order."""
    n = len(h)
    order = np.lexsort((c, h))  # by hash, then label; stable, so the first occurrence leads each group
    hs, cs = h[order], c[order]
    same = (hs[1:] == hs[:-1]) & (cs[1:] == cs[:-1])
    keep = np.ones(n, dtype=bool)
    keep[order[1:][same]] = False
    member = np.zeros(n, dtype=bool)
    member[1:] |= same
    member[:-1] |= same
    duplicate_rows = np.sort(order[member]) + 1
    del member, same, cs
    kept = order[keep[order]]  # kept rows, still by (hash, label)
    del order, hs
    hk, ck = h[kept], c[kept]
    starts = np.flatnonzero(np.r_[True, hk[1:] != hk[:-1]])
    ends = np.r_[starts[1:], len(kept)]
    mixed = ck[starts] != ck[ends - 1]  # sorted by label inside a text: first != last means two labels
    conflicting_rows = np.sort(kept[np.repeat(mixed, ends - starts)]) + 1
    return keep, duplicate_rows, conflicting_rows


def class_rows(scanned: Scanned, selected: np.ndarray) -> list[np.ndarray]:
    """The selected rows (0-based) of each class, classes in order of first appearance, rows in file order."""
    rows = np.flatnonzero(selected)
    codes = scanned.codes[rows]
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(scanned.names) + 1))
    return [rows[order[bounds[i]:bounds[i + 1]]] for i in range(len(scanned.names))]


def split_rows(scanned: Scanned, selected: np.ndarray, fractions: Sequence[float],
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of the selected rows into len(fractions) + 1 parts: per row, its part (the first
    part gets the remainder; -1 when not selected) and its position in that part.

    As `flytetune.data.stratified_split`: class by class in label order, each class's rows are ordered by
    the hash of their text (independent of row order), shuffled from `seed`, and cut at
    max(1, round(n * fraction)) rows per fraction; a part holds its classes one after the other.
    """
    rng = np.random.default_rng(seed)
    part = np.full(scanned.rows, -1, dtype=np.int8)
    position = np.full(scanned.rows, -1, dtype=np.int64)
    filled = [0] * (len(fractions) + 1)
    groups = class_rows(scanned, selected)
    for code in sorted(range(len(scanned.names)), key=scanned.names.__getitem__):
        rows = groups[code]
        rows = rows[np.argsort(scanned.hashes[rows], kind="stable")]
        rows = rows[rng.permutation(len(rows))]
        start, cuts = 0, []
        for fraction in fractions:
            n = max(1, round(len(rows) * fraction)) if fraction > 0 else 0
            cuts.append(rows[start:start + n])
            start += n
        for i, chosen in enumerate([rows[start:], *cuts]):
            part[chosen] = i
            position[chosen] = filled[i] + np.arange(len(chosen))
            filled[i] += len(chosen)
    return part, position


POSITION = "__position"


def select(batches: Iterable[pl.DataFrame], chosen: np.ndarray, position: np.ndarray,
           cfg: DataConfig) -> Iterator[pl.DataFrame]:
    """The rows of the table (read again, chunk by chunk) where `chosen` is True: frames of (text, label,
    POSITION: the row's `position`)."""
    offset = 0
    for chunk in batches:
        mask = chosen[offset:offset + chunk.height]
        where = position[offset:offset + chunk.height][mask]
        offset += chunk.height
        if mask.any():
            yield chunk.filter(pl.Series(mask)).select(pl.col(cfg.text_column).cast(pl.String).alias(TEXT),
                                                       pl.col(cfg.label_column).cast(pl.String).alias(LABEL),
                                                       pl.Series(POSITION, where))
    if offset != len(chosen):
        raise DataError(f"the data changed while it was prepared: {offset} rows now, {len(chosen)} before")


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
