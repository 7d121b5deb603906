"""Digests used to verify transfers: CRC32C (what GCS keeps) and MD5 (a single-part S3 ETag)."""

import base64
import hashlib
from pathlib import Path

import google_crc32c

CHUNK = 8 << 20


class Digest:
    """CRC32C and MD5 of a byte stream, fed as it passes (no second read of the data)."""

    def __init__(self):
        self._crc = google_crc32c.Checksum()
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._crc.update(chunk)
        self._md5.update(chunk)
        self.size += len(chunk)

    @property
    def crc32c(self) -> str:
        return base64.b64encode(self._crc.digest()).decode()

    @property
    def md5_hex(self) -> str:
        return self._md5.hexdigest()


def file_digest(path: Path) -> Digest:
    digest = Digest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest


def bytes_digest(data: bytes) -> Digest:
    digest = Digest()
    digest.update(data)
    return digest
