"""Local disk: every write goes to a temporary name in the destination folder, then a rename."""

import os
import shutil
import tempfile
from pathlib import Path

from flytetune.storage.checksums import Digest, file_digest
from flytetune.storage.objects import ObjectInfo
from flytetune.storage.uri import Location, StorageError


def temp_beside(path: Path) -> Path:
    """A new empty file next to `path`, for writing it and renaming it into place.

    The name is cut short so that a target name near the file system's limit still fits; the file
    gets the mode a plain `open()` would (mkstemp makes it 0600, which the rename would publish).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(tmp)


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread, for a moment)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (macOS): the only other way
    os.umask(mask)
    return mask


class LocalBackend:
    scheme = "file"

    def list(self, loc: Location) -> list[ObjectInfo]:
        root = Path(loc.key)
        if not root.is_dir():
            return []
        return [ObjectInfo(str(p), p.stat().st_size) for p in sorted(root.rglob("*"))
                if p.is_file() and not p.name.endswith(".part")]

    def stat(self, loc: Location) -> ObjectInfo | None:
        path = Path(loc.key)
        return ObjectInfo(str(path), path.stat().st_size) if path.is_file() else None

    def is_prefix(self, loc: Location) -> bool:
        return Path(loc.key).is_dir()

    def get(self, loc: Location, dest: Path, expected: ObjectInfo) -> tuple[Digest, ObjectInfo]:
        shutil.copyfile(loc.key, dest)
        return file_digest(dest), expected

    def put(self, path: Path, loc: Location, digest: Digest) -> None:
        target = Path(loc.key)
        tmp = temp_beside(target)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def read_bytes(self, loc: Location) -> bytes:
        try:
            return Path(loc.key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise StorageError(f"{loc}: no such file or directory") from None

    def write_bytes(self, loc: Location, data: bytes) -> None:
        target = Path(loc.key)
        tmp = temp_beside(target)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def remove(self, loc: Location) -> None:
        path = Path(loc.key)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
