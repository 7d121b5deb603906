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
from collections.abc import Iterable, Iterator
from pathlib import Path

import lmdb
import numpy as np

_KEY = struct.Struct(">Q")  # big-endian so that lmdb's byte order is index order
_LABEL = struct.Struct("<i")
_TOKEN = np.dtype("<i4")


def _encode(label: int, input_ids: Iterable[int]) -> bytes:
    return _LABEL.pack(label) + np.asarray(list(input_ids), dtype=_TOKEN).tobytes()


def write_store(path: Path, examples: Iterable[tuple[Iterable[int], int]]) -> int:
    """Write (input_ids, label) pairs to a new store at `path`; returns the number written.

    The store is built in a temporary folder beside `path` and renamed into place, so a store
    that exists is always complete.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: store already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        records = [_encode(label, ids) for ids, label in examples]
        # lmdb needs its maximum size up front; pages and B-tree overhead stay well under 2x.
        map_size = max(1 << 20, 2 * sum(len(r) + 64 for r in records))
        env = lmdb.open(str(tmp), map_size=map_size, subdir=True, sync=True, metasync=True)
        try:
            with env.begin(write=True) as txn:
                for i, record in enumerate(records):
                    txn.put(_KEY.pack(i), record, append=True)
        finally:
            env.close()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(records)


# One environment per store per process: lmdb refuses a second open of the same path in a
# process, and a forked child must not use the handle it inherited from its parent.
_ENVIRONMENTS: dict[str, tuple[int, lmdb.Environment]] = {}


def _environment(path: Path) -> lmdb.Environment:
    key, pid = str(path.resolve()), os.getpid()
    cached = _ENVIRONMENTS.get(key)
    if cached is not None and cached[0] == pid:
        return cached[1]
    if cached is not None:
        # Inherited through fork: close this process's copy (it unmaps only the child's mapping).
        cached[1].close()
    # lock=False: stores are never written after creation, and readers in different processes
    # must not contend for (or exhaust) a shared reader table.
    env = lmdb.open(key, readonly=True, lock=False, readahead=False, subdir=True, max_readers=512)
    _ENVIRONMENTS[key] = (pid, env)
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
        return cached is not None and cached[0] == os.getpid()
