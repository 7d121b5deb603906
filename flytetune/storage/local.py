"""Local disk: every write goes to a temporary name in the destination folder, then a rename."""

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from flytetune.storage.checksums import Digest, file_digest
from flytetune.storage.objects import ObjectInfo
from flytetune.storage.uri import Location, PreconditionFailed, StorageError

# Conditional writes hold an flock on `.<name>.flytetune-lock` beside the file: the kernel drops it when
# the holder dies, so a killed writer never leaves a stale lock. Listings skip these files.
LOCK_SUFFIX = ".flytetune-lock"


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


def _info(path: Path) -> ObjectInfo:
    st = path.stat()
    return ObjectInfo(str(path), st.st_size, version=f"{st.st_mtime_ns}-{st.st_ino}")


class LocalBackend:
    scheme = "file"

    def list(self, loc: Location) -> list[ObjectInfo]:
        root = Path(loc.key)
        if not root.is_dir():
            return []
        return [_info(p) for p in sorted(root.rglob("*"))
                if p.is_file() and not p.name.endswith((".part", LOCK_SUFFIX))]

    def stat(self, loc: Location) -> ObjectInfo | None:
        path = Path(loc.key)
        return _info(path) if path.is_file() else None

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

    def sha256(self, loc: Location) -> tuple[str, int]:
        try:
            with open(loc.key, "rb") as f:
                digest = hashlib.file_digest(f, "sha256")
        except (FileNotFoundError, IsADirectoryError):
            raise StorageError(f"{loc}: no such file or directory") from None
        return digest.hexdigest(), Path(loc.key).stat().st_size

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

    def read_with_token(self, loc: Location) -> tuple[bytes, str] | None:
        try:
            data = Path(loc.key).read_bytes()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise StorageError(f"{loc}: is a directory") from None
        return data, content_token(data)

    def write_bytes_if(self, loc: Location, data: bytes, expected: str | None) -> str:
        """Compare the file's content hash with `expected` and replace the file, under an exclusive lock
        that every replacing writer of this file takes; readers need none (the write is a rename).
        Creating (`expected` None) needs no lock: a hard link cannot replace an existing name."""
        target = Path(loc.key)
        if expected is None and _create_exclusive(target, data):
            return content_token(data)
        with _locked(target):
            current = self.read_with_token(loc)
            if (current[1] if current else None) != expected:
                raise PreconditionFailed(f"{loc}: changed since it was read" if current
                                         else f"{loc}: was removed since it was read" if expected
                                         else f"{loc}: already exists")
            self.write_bytes(loc, data)
        return content_token(data)

    def remove(self, loc: Location) -> None:
        path = Path(loc.key)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def content_token(data: bytes) -> str:
    """A local file's version token: its content hash (equal contents are the same version)."""
    return hashlib.sha256(data).hexdigest()


def _create_exclusive(target: Path, data: bytes) -> bool:
    """Create `target` whole, only if it does not exist: a hard link of a written temporary file
    fails if the name is taken. False where the file system has no hard links (then lock instead)."""
    tmp = temp_beside(target)
    try:
        tmp.write_bytes(data)
        os.link(tmp, target)
    except FileExistsError:
        raise PreconditionFailed(f"{target}: already exists") from None
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            return False
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def _locked(target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent / f".{target.name}{LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks; held for one read, compare and rename (milliseconds)
        yield
    finally:
        os.close(fd)  # releases the lock
