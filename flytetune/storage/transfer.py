"""Copy and sync between any two locations: parallel, verified, incremental, never half-visible.

An object is written under a temporary name (locally) or in one atomic PUT/upload (object
stores), and only after its bytes matched the source's recorded size and digest. A sync that
is interrupted leaves only whole objects behind, and a rerun skips every object that is already
there with the same size and digest, so it resumes where it stopped.
"""

import concurrent.futures
import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from flytetune import scratch
from flytetune.progress import Progress
from flytetune.storage.checksums import Digest, file_digest
from flytetune.storage.gcs import GCSBackend
from flytetune.storage.local import LocalBackend, temp_beside
from flytetune.storage.objects import ObjectInfo, same_content
from flytetune.storage.s3 import S3Backend
from flytetune.storage.uri import Location, StorageError, parse, safe_relative

log = logging.getLogger("flytetune.storage")

DEFAULT_CONCURRENCY = 16
ATTEMPTS = 3
BACKENDS = {"file": LocalBackend(), "s3": S3Backend(), "gs": GCSBackend()}


@dataclass
class TransferStats:
    objects_copied: int = 0
    objects_skipped: int = 0
    bytes_copied: int = 0


class _Mismatch(Exception):
    pass


def backend(loc: Location):
    return BACKENDS[loc.scheme]


def _matches(digest: Digest, recorded: ObjectInfo) -> bool:
    if digest.size != recorded.size:
        return False
    if recorded.crc32c:
        return digest.crc32c == recorded.crc32c
    if recorded.md5:
        return digest.md5_hex == recorded.md5
    return True  # nothing recorded but the size (e.g. multipart objects written by other tools)


class _InFlight:
    """Local files that transfers are writing now: their sizes are the bytes done within large objects.

    Read only when a progress line is written (one stat per object in flight). Uploads are not seen
    (the SDKs read the file themselves): an upload counts when it completes.
    """

    def __init__(self):
        self._paths: set[Path] = set()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def watch(self, path: Path):
        with self._lock:
            self._paths.add(path)
        try:
            yield
        finally:
            with self._lock:
                self._paths.discard(path)

    def bytes(self) -> int:
        with self._lock:
            paths = list(self._paths)
        total = 0
        for path in paths:
            with contextlib.suppress(OSError):  # not created yet, or already renamed into place
                total += path.stat().st_size
        return total


def _transfer_once(src: Location, info: ObjectInfo, dst: Location, in_flight: _InFlight) -> int:
    source = backend(src)
    if dst.scheme == "file":
        target = Path(dst.key)
        tmp = temp_beside(target)
        try:
            with in_flight.watch(tmp):
                digest, recorded = source.get(src, tmp, info)
            if not _matches(digest, recorded):
                raise _Mismatch
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return digest.size
    if src.scheme == "file":
        path = Path(src.key)
        digest = file_digest(path)
        if digest.size != info.size:
            raise _Mismatch  # the file changed while we were copying it
        backend(dst).put(path, dst, digest)
        return digest.size
    # Between clouds the object is staged in a temporary file (not kept): each SDK verifies its own side.
    with scratch.folder("xfer") as tmpdir:
        tmp = Path(tmpdir) / "object"
        with in_flight.watch(tmp):
            digest, recorded = source.get(src, tmp, info)
        if not _matches(digest, recorded):
            raise _Mismatch
        if digest.crc32c is None:
            digest = file_digest(tmp)  # the destination records a CRC32C even if the source did not
        backend(dst).put(tmp, dst, digest)
        return digest.size


def transfer(src: Location, info: ObjectInfo, dst: Location, in_flight: _InFlight | None = None) -> int:
    """Copy one object, retrying a checksum mismatch; returns the bytes copied. Downloads are
    registered in `in_flight` while they are written, for progress within the object."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return _transfer_once(src, info, dst, in_flight or _InFlight())
        except OSError as e:  # local disk: full, permissions, a name the file system refuses
            raise StorageError(f"{e.filename or dst}: {e.strerror or type(e).__name__}") from None
        except _Mismatch:
            log.warning("%s: checksum mismatch (attempt %d of %d)", src, attempt, ATTEMPTS)
    raise StorageError(f"{src}: content does not match its recorded size/checksum after {ATTEMPTS} attempts; "
                       "not copied")


def _already_there(src: Location, info: ObjectInfo, dst: Location, existing: ObjectInfo) -> bool:
    decided = same_content(info, existing)
    if decided is not None:
        return decided
    # Sizes agree but no shared digest was listed: compute the local side, ask the remote side.
    if dst.scheme == "file":
        if src.scheme == "file":
            return file_digest(Path(dst.key)).crc32c == file_digest(Path(src.key)).crc32c
        recorded = backend(src).stat(src) or info
        return _matches(file_digest(Path(dst.key), md5=recorded.crc32c is None), recorded)
    if src.scheme == "file":
        recorded = backend(dst).stat(dst)
        return recorded is not None and _matches(file_digest(Path(src.key), md5=recorded.crc32c is None), recorded)
    recorded_src, recorded_dst = backend(src).stat(src), backend(dst).stat(dst)
    return bool(recorded_src and recorded_dst and same_content(recorded_src, recorded_dst))


def _relative(root: Location, info: ObjectInfo) -> str:
    if root.scheme == "file":
        rel = Path(info.key).relative_to(Path(root.key)).as_posix()
    else:
        prefix = root.key.rstrip("/") + "/" if root.key else ""
        rel = info.key[len(prefix):]
    return safe_relative(rel, f"{root}")


def _name_max(path: Path) -> tuple[int, int]:
    """NAME_MAX and PATH_MAX (bytes) of the file system that `path` would be created on."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def check_local_targets(targets: list[tuple[str, Path]]) -> None:
    """Refuse, before anything is written, a set of local target files that cannot all be created:
    a name too long for the file system, two keys where one needs a file and the other a folder of
    the same name (`a` and `a/b`), or an existing file/folder in the way. `targets` is (key, path)."""
    if not targets:
        return
    name_max, path_max = _name_max(targets[0][1])
    files = {path: key for key, path in targets}
    folders: dict[Path, str] = {}
    for key, path in targets:
        if len(os.fsencode(path)) > path_max:
            raise StorageError(f"{key}: local path too long ({len(os.fsencode(path))} bytes; "
                               f"the limit is {path_max}): {path}")
        for part in path.parts:
            if len(os.fsencode(part)) > name_max:
                raise StorageError(f"{key}: file name too long for the local file system "
                                   f"({len(os.fsencode(part))} bytes; the limit is {name_max}): {part[:40]}...")
        for parent in path.parents:
            if parent in files:
                raise StorageError(f"{key}: clashes with {files[parent]}: one needs {parent} to be a file, "
                                   "the other a folder")
            if parent in folders:
                break  # this folder and its ancestors were checked for another key
            folders[parent] = key
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    raise StorageError(f"{key}: {parent} exists and is not a folder")
                break
        if path.is_dir():
            where = "" if key == str(path) else f" {path}"
            raise StorageError(f"{key}:{where} is an existing folder; give the full target path of the object")


def copy(src: str, dst: str, *, concurrency: int | None = None,
         progress_interval_s: float | None = None) -> TransferStats:
    """Copy one object or file to `dst` (the full target URI).

    A copy that outlasts the progress interval (progress.LOG_INTERVAL_S in logs) reports its bytes,
    rate and ETA as it goes, and a summary; a quick one says nothing.
    """
    s, d = parse(src), parse(dst)
    info = backend(s).stat(s)
    if info is None:
        if backend(s).is_prefix(s):
            raise StorageError(f"{src}: is a prefix (folder); use sync to copy everything under it")
        raise StorageError(f"{src}: no such object" if s.scheme != "file" else f"{src}: no such file or directory")
    if d.scheme == "file":
        check_local_targets([(dst, Path(d.key))])
    in_flight = _InFlight()
    with Progress(f"copy {src} -> {dst}:", 1, unit="objects", total_bytes=info.size, logger=log,
                  interval_s=progress_interval_s, quiet_if_quick=True, partial_bytes=in_flight.bytes,
                  ticking=True) as progress:
        nbytes = transfer(s, info, d, in_flight)
        progress.advance(nbytes=nbytes)
    return TransferStats(objects_copied=1, bytes_copied=nbytes)


def sync(src_prefix: str, dst_prefix: str, *, concurrency: int | None = None,
         progress_interval_s: float | None = None) -> TransferStats:
    """Copy every object under `src_prefix` to the same relative key under `dst_prefix`.

    Objects already at the destination with the same size and digest are skipped, so a second
    sync of an unchanged prefix moves 0 bytes and an interrupted one resumes. Progress (objects,
    bytes including those within large downloads, rate, ETA) is a live line on a terminal, else a
    log line every `progress_interval_s` (progress.LOG_INTERVAL_S), and a summary line.
    """
    s, d = parse(src_prefix), parse(dst_prefix)
    sources = backend(s).list(s)
    if not sources:
        raise StorageError(f"{src_prefix}: no objects under this prefix")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    # The whole plan is checked before any object is written: unsafe keys, and locally, names that
    # cannot be created (too long, or `a` and `a/b` in one sync).
    plan = [(s_info, _relative(s, s_info)) for s_info in sources]
    if d.scheme == "file":
        check_local_targets([(str(Location(s.scheme, s.bucket, info.key)), Path(d.child(rel).key))
                             for info, rel in plan])
    existing = {_relative(d, info): info for info in backend(d).list(d)}
    stats = TransferStats()
    in_flight = _InFlight()
    progress = Progress(f"sync {src_prefix} -> {dst_prefix}:", len(plan), unit="objects",
                        total_bytes=sum(i.size for i, _ in plan), logger=log, interval_s=progress_interval_s,
                        partial_bytes=in_flight.bytes, ticking=True)
    lock = threading.Lock()

    def work(item: tuple[ObjectInfo, str]) -> None:
        info, rel = item
        src_loc = Location(s.scheme, s.bucket, info.key)
        dst_loc = d.child(rel)
        if rel in existing and _already_there(src_loc, info, dst_loc, existing[rel]):
            with lock:
                stats.objects_skipped += 1
            progress.advance(skipped_bytes=info.size)  # nothing to move: out of the bytes left, and of the ETA
            return
        nbytes = transfer(src_loc, info, dst_loc, in_flight)
        with lock:
            stats.objects_copied += 1
            stats.bytes_copied += nbytes
        progress.advance(nbytes=nbytes)

    workers = DEFAULT_CONCURRENCY if concurrency is None else concurrency
    with progress, concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sync") as pool:
        futures = [pool.submit(work, item) for item in plan]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return stats
