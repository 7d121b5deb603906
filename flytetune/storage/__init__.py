"""Storage behind URIs: local paths and file:// (S3 and GCS arrive with the storage issue).

The only module that talks to storage systems; the rest of flytetune speaks URIs.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


class StorageError(Exception):
    """One line naming the URI and the problem."""


@dataclass
class TransferStats:
    objects_copied: int = 0
    objects_skipped: int = 0
    bytes_copied: int = 0


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(urlparse(uri).path)
    if "://" in uri:
        raise StorageError(f"{uri}: scheme not supported yet (local paths and file:// only)")
    return Path(uri)


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy(src: str, dst: str, *, concurrency: int | None = None) -> TransferStats:
    s, d = local_path(src), local_path(dst)
    if s.is_dir():
        raise StorageError(f"{src}: is a directory; use sync to copy a prefix")
    if not s.is_file():
        raise StorageError(f"{src}: no such file or directory")
    try:
        _atomic_copy(s, d)
    except OSError as e:
        raise StorageError(f"{dst}: {e.strerror or e}") from None
    return TransferStats(objects_copied=1, bytes_copied=s.stat().st_size)


def sync(src_prefix: str, dst_prefix: str, *, concurrency: int | None = None) -> TransferStats:
    s, d = local_path(src_prefix), local_path(dst_prefix)
    if not s.is_dir():
        raise StorageError(f"{src_prefix}: no such directory")
    stats = TransferStats()
    for path in sorted(p for p in s.rglob("*") if p.is_file()):
        target = d / path.relative_to(s)
        if target.is_file() and target.stat().st_size == path.stat().st_size and \
                target.read_bytes() == path.read_bytes():
            stats.objects_skipped += 1
            continue
        try:
            _atomic_copy(path, target)
        except OSError as e:
            raise StorageError(f"{target}: {e.strerror or e}") from None
        stats.objects_copied += 1
        stats.bytes_copied += path.stat().st_size
    return stats


def ls(uri: str) -> list[str]:
    p = local_path(uri)
    if p.is_file():
        return [uri]
    if not p.is_dir():
        return []
    return sorted(f"{uri.rstrip('/')}/{f.relative_to(p).as_posix()}" for f in p.rglob("*") if f.is_file())


def exists(uri: str) -> bool:
    return local_path(uri).exists()


def read_bytes(uri: str) -> bytes:
    try:
        return local_path(uri).read_bytes()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file or directory") from None


def write_bytes(uri: str, data: bytes) -> None:
    p = local_path(uri)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def remove(uri: str) -> None:
    p = local_path(uri)
    if p.is_dir():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)
