"""Tokenised examples in an lmdb key-value store with a read-only, dict-like API.

One store per split: keys are example indices 0..n-1, values hold the label and the token ids.
A FeatureStore opens its lmdb environment lazily in the process that first reads it and opens
it anew after a fork: an environment shared across fork() is a known source of
`ReadersFullError` and corrupt reads, so DataLoader workers each get their own.
"""

import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb
import numpy as np

if TYPE_CHECKING:
    import torch

_KEY = struct.Struct(">Q")  # big-endian so that lmdb's byte order is index order
_LABEL = struct.Struct("<i")
_TOKEN = np.dtype("<i4")


def _encode(label: int, input_ids: Iterable[int]) -> bytes:
    if not isinstance(input_ids, (list, tuple, np.ndarray)):
        input_ids = list(input_ids)
    return _LABEL.pack(label) + np.asarray(input_ids, dtype=_TOKEN).tobytes()


# write_store commits every WRITE_BATCH examples or WRITE_BATCH_BYTES of values, whichever comes
# first: memory stays bounded by one batch however many examples stream through.
WRITE_BATCH = 50_000
WRITE_BATCH_BYTES = 32 << 20
_INITIAL_MAP_SIZE = 64 << 20
# Per-record overhead of lmdb pages and B-tree nodes, on top of key and value (generous).
_RECORD_OVERHEAD = 64


def _chunks(examples: Iterable[tuple[Iterable[int], int]]) -> Iterator[list[bytes]]:
    """Encoded records in lists of at most WRITE_BATCH records / about WRITE_BATCH_BYTES."""
    chunk: list[bytes] = []
    size = 0
    for ids, label in examples:
        record = _encode(label, ids)
        chunk.append(record)
        size += len(record)
        if len(chunk) >= WRITE_BATCH or size >= WRITE_BATCH_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def write_store(path: Path, examples: Iterable[tuple[Iterable[int], int]]) -> int:
    """Write (input_ids, label) pairs to a new store at `path`; returns the number written.

    `examples` is consumed once, lazily (a generator of any length will do): records are
    committed in bounded batches, keys 0..n-1 in order, and lmdb's map grows as needed, so
    memory stays flat. The store is built in a temporary folder beside `path`, synced, and
    renamed into place, so a store that exists is always complete.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: store already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        # No sync per commit: nothing reads the temporary store; one sync before the rename suffices.
        env = lmdb.open(str(tmp), map_size=_INITIAL_MAP_SIZE, subdir=True, sync=False, metasync=False)
        try:
            count = 0
            map_size, used = _INITIAL_MAP_SIZE, 0
            for chunk in _chunks(examples):
                used += sum(len(r) + _KEY.size + _RECORD_OVERHEAD for r in chunk)
                # lmdb needs room for the whole map up front: keep it at twice what is written.
                if 2 * used > map_size:
                    map_size = max(2 * map_size, 2 * used)
                    env.set_mapsize(map_size)
                while True:
                    try:
                        with env.begin(write=True) as txn:
                            for i, record in enumerate(chunk, start=count):
                                txn.put(_KEY.pack(i), record, append=True)
                        break
                    except lmdb.MapFullError:  # the estimate fell short: grow and retry this batch
                        map_size *= 2
                        env.set_mapsize(map_size)
                count += len(chunk)
            env.sync(True)
        finally:
            env.close()
        # Readers open stores without locking (read-only, never written again): the lock file
        # would only travel with every copy of the store.
        (tmp / "lock.mdb").unlink(missing_ok=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count


# One environment per store per process: lmdb refuses a second open of the same files in a
# process, and a forked child must not use the handle it inherited from its parent.
_ENVIRONMENTS: dict[str, tuple[int, tuple[int, int], lmdb.Environment]] = {}


def _identity(path: Path) -> tuple[int, int]:
    st = (path / "data.mdb").stat()
    return st.st_dev, st.st_ino


def _close_stale(pid: int) -> None:
    """Close this process's environments whose store was deleted or replaced since it was opened.

    lmdb tells environments apart by their files' inode numbers; once a store's folder is deleted
    the file system hands those numbers to new files, and a still-open environment of the old store
    would make lmdb refuse an unrelated new one ("already open in this process")."""
    for key, (owner, identity, env) in list(_ENVIRONMENTS.items()):
        if owner != pid:
            continue
        try:
            current = _identity(Path(key))
        except OSError:
            current = None
        if current != identity:
            env.close()
            del _ENVIRONMENTS[key]


def _environment(path: Path) -> lmdb.Environment:
    key, pid, identity = str(path.resolve()), os.getpid(), _identity(path)
    cached = _ENVIRONMENTS.pop(key, None)
    if cached is not None:
        owner, opened, env = cached
        if owner == pid and opened == identity:
            _ENVIRONMENTS[key] = cached
            return env
        # Inherited through fork (close only this process's mapping), or a new store at the same path.
        env.close()
    _close_stale(pid)
    # lock=False: stores are never written after creation, and readers in different processes
    # must not contend for (or exhaust) a shared reader table.
    env = lmdb.open(key, readonly=True, lock=False, readahead=False, subdir=True, max_readers=512)
    _ENVIRONMENTS[key] = (pid, identity, env)
    return env


class FeatureStore:
    """Read-only mapping from example index to {"input_ids": int32 array, "label": int}.

    Holds only a path: the lmdb environment is opened on first read in each process.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"{self.path}: not an lmdb feature store (no data.mdb)")
        self._len: int | None = None

    def __len__(self) -> int:
        if self._len is None:
            self._len = _environment(self.path).stat()["entries"]
        return self._len

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise KeyError(index)
        with _environment(self.path).begin(buffers=False) as txn:
            value = txn.get(_KEY.pack(index))
        if value is None:
            raise KeyError(index)
        (label,) = _LABEL.unpack_from(value)
        return {"input_ids": np.frombuffer(value, dtype=_TOKEN, offset=_LABEL.size), "label": label}

    def batch(self, indices: Sequence[int], pad_id: int) -> "dict[str, torch.Tensor]":
        """The examples at `indices` read in one transaction and padded to the longest of them:
        exactly what `flytetune.batches.collate([self[i] for i in indices], pad_id)` returns
        (int64 input_ids, attention_mask and labels), without per-example tensor work."""
        import torch  # here, not at the top: writing a store (prepare) needs no torch

        if len(indices) == 0:
            raise ValueError("an empty batch")
        if min(indices) < 0 or max(indices) >= len(self):
            raise KeyError(next(i for i in indices if not 0 <= i < len(self)))
        with _environment(self.path).begin(buffers=False) as txn:
            values = list(map(txn.get, map(_KEY.pack, indices)))
        if None in values:
            raise KeyError(indices[values.index(None)])
        # One buffer of int32 words: each example is its label followed by its tokens.
        words = np.fromiter(map(len, values), dtype=np.int64, count=len(values)) // _TOKEN.itemsize
        flat = np.frombuffer(b"".join(values), dtype=_TOKEN)
        starts = np.cumsum(words) - words
        lengths = words - 1
        tokens = np.ones(len(flat), dtype=bool)
        tokens[starts] = False
        # Row-major boolean assignment fills each row's first `length` slots with its tokens, in order.
        mask = np.arange(int(lengths.max())) < lengths[:, None]
        input_ids = np.full(mask.shape, pad_id, dtype=np.int64)
        input_ids[mask] = flat[tokens]
        return {"input_ids": torch.from_numpy(input_ids),
                "attention_mask": torch.from_numpy(mask.astype(np.int64)),
                "labels": torch.from_numpy(flat[starts].astype(np.int64))}

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and 0 <= index < len(self)

    def labels(self) -> np.ndarray:
        """Every example's label, in index order (one pass, one transaction)."""
        with _environment(self.path).begin(buffers=True) as txn:
            return np.array([_LABEL.unpack_from(v)[0] for _, v in txn.cursor()], dtype=np.int64)

    def lengths(self) -> np.ndarray:
        """Every example's token count, in index order, from the sizes of the values (nothing decoded)."""
        with _environment(self.path).begin(buffers=True) as txn:
            return np.array([(len(v) - _LABEL.size) // _TOKEN.itemsize for _, v in txn.cursor()], dtype=np.int64)

    def is_open_here(self) -> bool:
        cached = _ENVIRONMENTS.get(str(self.path.resolve()))
        return cached is not None and cached[0] == os.getpid() and cached[1] == _identity(self.path)
