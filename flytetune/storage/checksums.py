"""Digests: CRC32C (what GCS keeps) and MD5 (a single-part S3 ETag) to verify transfers; SHA-256 for
the manifests of datasets, checkpoints and published models."""

import base64
import hashlib
from pathlib import Path

import google_crc32c

CHUNK = 8 << 20


class Digest:
    """CRC32C (and MD5 when asked) of a byte stream, fed as it passes (no second read of the data).

    MD5 runs at a fraction of CRC32C's speed, so it is computed only where an MD5 is all the
    source records (a single-part S3 ETag written by another tool).
    """

    def __init__(self, md5: bool = False):
        self._crc = google_crc32c.Checksum()
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._crc.update(chunk)
        if self._md5 is not None:
            self._md5.update(chunk)
        self.size += len(chunk)

    @property
    def crc32c(self) -> str:
        return base64.b64encode(self._crc.digest()).decode()

    @property
    def md5_hex(self) -> str | None:
        return self._md5.hexdigest() if self._md5 is not None else None


def digest_for(path: Path, recorded) -> Digest:
    """The digest a downloaded file must be checked with: whatever the source recorded, nothing more."""
    if recorded.crc32c:
        return file_digest(path)
    if recorded.md5:
        return file_digest(path, md5=True)
    return SizeOnly(path.stat().st_size)


class SizeOnly(Digest):
    """A file whose source recorded no digest (e.g. a multipart object written by another tool)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    @property
    def crc32c(self) -> str | None:
        return None


def file_digest(path: Path, md5: bool = False) -> Digest:
    digest = Digest(md5)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest


def bytes_digest(data: bytes) -> Digest:
    digest = Digest()
    digest.update(data)
    return digest


def file_sha256(*paths: Path) -> str:
    """SHA-256 of the files' bytes, in the order given (one file: that file's hash)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
