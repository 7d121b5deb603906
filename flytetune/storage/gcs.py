"""Google Cloud Storage through google-cloud-storage: the only module that imports it.

Credentials come from Application Default Credentials (Workload Identity on GKE). When
`STORAGE_EMULATOR_HOST` is set, the client library talks to that emulator; it then needs
anonymous credentials and a project name, which is the documented way to use an emulator.
Every object carries a CRC32C, which uploads and downloads verify.

Every call passes `retry=_retry()`: the library's retry (throttling, 5xx, resets, with backoff) except
that an endpoint that cannot be reached at all is tried only CONNECT_ATTEMPTS times, and `timeout=`
with a short connect timeout.
"""

import base64
import hashlib
import os
from pathlib import Path

from flytetune.storage.checksums import Digest, file_digest
from flytetune.storage.clients import PerProcess
from flytetune.storage.network import CONNECT_ATTEMPTS, endpoint_of, find_url, unreachable_cause
from flytetune.storage.objects import ObjectInfo
from flytetune.storage.uri import Location, PreconditionFailed, StorageError


def _make_client():
    from google.cloud import storage

    project = os.environ.get("GOOGLE_CLOUD_PROJECT")
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project or "flytetune", credentials=AnonymousCredentials())
    return storage.Client(project=project)


_client = PerProcess(_make_client)
client, reset = _client.get, _client.reset

TIMEOUT = (5, 60)  # (connect, read) seconds


def _retry():
    """A fresh Retry per call: it counts that call's failed connections."""
    from google.cloud.storage.retry import DEFAULT_RETRY, _should_retry

    failed_connects = 0

    def predicate(exc: Exception) -> bool:
        nonlocal failed_connects
        if unreachable_cause(exc) is not None:
            failed_connects += 1
            return failed_connects < CONNECT_ATTEMPTS
        return _should_retry(exc)

    return DEFAULT_RETRY.with_predicate(predicate)  # its backoff: 1 s doubling, 120 s deadline


def _error(loc: Location, exc: Exception) -> StorageError:
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import DefaultCredentialsError

    if isinstance(exc, gexc.RetryError) and exc.cause is not None:
        exc = exc.cause  # the retry deadline passed: report what kept failing
    cause = unreachable_cause(exc)
    if cause is not None:
        return StorageError(f"{loc}: cannot connect to {endpoint_of(find_url(exc))} ({cause})")
    if isinstance(exc, DefaultCredentialsError):
        return StorageError(f"{loc}: no Google Cloud credentials found (Application Default Credentials)")
    if isinstance(exc, gexc.NotFound):
        text = str(exc).lower()
        if "bucket" in text and loc.key and "object" not in text:
            return StorageError(f"gs://{loc.bucket}: bucket does not exist")
        return StorageError(f"{loc}: no such object" if loc.key else f"gs://{loc.bucket}: bucket does not exist")
    if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized)):
        return StorageError(f"{loc}: access denied")
    if type(exc).__name__ == "DataCorruption":
        return StorageError(f"{loc}: downloaded bytes do not match the object's CRC32C")
    detail = str(exc).strip().splitlines()
    return StorageError(f"{loc}: GCS error {type(exc).__name__}" + (f": {detail[0]}" if detail else ""))


def _md5_hex(b64: str | None) -> str | None:
    return base64.b64decode(b64).hex() if b64 else None


def _info(blob) -> ObjectInfo:
    generation = str(blob.generation) if blob.generation is not None else None
    return ObjectInfo(blob.name, blob.size, crc32c=blob.crc32c, md5=_md5_hex(blob.md5_hash), version=generation)


class _HashingSink:
    """A write-only file object that keeps a SHA-256 and a byte count of what passes, nothing else."""

    def __init__(self):
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, chunk: bytes) -> int:
        self.digest.update(chunk)
        self.size += len(chunk)
        return len(chunk)


class GCSBackend:
    scheme = "gs"

    def _bucket(self, loc: Location):
        return client().bucket(loc.bucket)

    def list(self, loc: Location) -> list[ObjectInfo]:
        prefix = loc.key.rstrip("/") + "/" if loc.key else ""
        try:
            blobs = client().list_blobs(loc.bucket, prefix=prefix, timeout=TIMEOUT, retry=_retry())
            return [_info(b) for b in blobs if not b.name.endswith("/")]
        except Exception as e:  # noqa: BLE001 - every SDK error becomes one StorageError line
            raise _error(loc, e) from None

    def stat(self, loc: Location) -> ObjectInfo | None:
        try:
            blob = self._bucket(loc).get_blob(loc.key, timeout=TIMEOUT, retry=_retry())
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None
        return None if blob is None else _info(blob)

    def is_prefix(self, loc: Location) -> bool:
        try:
            return any(True for _ in client().list_blobs(loc.bucket, prefix=loc.key.rstrip("/") + "/",
                                                           max_results=1, timeout=TIMEOUT, retry=_retry()))
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None

    def get(self, loc: Location, dest: Path, expected: ObjectInfo) -> tuple[Digest, ObjectInfo]:
        try:
            self._bucket(loc).blob(loc.key).download_to_filename(str(dest), checksum="crc32c", timeout=TIMEOUT,
                                                               retry=_retry())
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None
        return file_digest(dest), expected  # GCS always records a CRC32C

    def put(self, path: Path, loc: Location, digest: Digest) -> None:
        try:
            blob = self._bucket(loc).blob(loc.key)
            blob.crc32c = digest.crc32c  # the server rejects the upload if the bytes do not match
            blob.upload_from_filename(str(path), checksum="crc32c", timeout=TIMEOUT, retry=_retry())
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None

    def sha256(self, loc: Location) -> tuple[str, int]:
        sink = _HashingSink()
        try:
            # Looked up first: a download's 404 does not say whether the bucket or the object is missing.
            blob = self._bucket(loc).get_blob(loc.key, timeout=TIMEOUT, retry=_retry())
            if blob is None:
                raise StorageError(f"{loc}: no such object")
            blob.download_to_file(sink, checksum="crc32c", timeout=TIMEOUT, retry=_retry())
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None
        return sink.digest.hexdigest(), sink.size

    def read_bytes(self, loc: Location) -> bytes:
        try:
            return self._bucket(loc).blob(loc.key).download_as_bytes(checksum="crc32c", timeout=TIMEOUT,
                                                                   retry=_retry())
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None

    def write_bytes(self, loc: Location, data: bytes) -> None:
        try:
            self._bucket(loc).blob(loc.key).upload_from_string(data, checksum="crc32c", timeout=TIMEOUT,
                                                             retry=_retry())
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None

    def read_with_token(self, loc: Location) -> tuple[bytes, str] | None:
        """The object and its generation; the download is pinned to the generation that was looked up."""
        from google.api_core import exceptions as gexc

        for _ in range(5):  # the object may be replaced between the lookup and the download
            try:
                blob = self._bucket(loc).get_blob(loc.key, timeout=TIMEOUT, retry=_retry())
                if blob is None:
                    return None
                generation = blob.generation  # read first: the download resets it from its response headers
                data = blob.download_as_bytes(checksum="crc32c", if_generation_match=generation,
                                              timeout=TIMEOUT, retry=_retry())
                return data, str(generation)
            except (gexc.PreconditionFailed, gexc.NotFound):
                continue
            except Exception as e:  # noqa: BLE001
                raise _error(loc, e) from None
        raise StorageError(f"{loc}: replaced on every read; try again")

    def write_bytes_if(self, loc: Location, data: bytes, expected: str | None) -> str:
        """One upload with `ifGenerationMatch` (0: the object must not exist); GCS answers 412 otherwise."""
        from google.api_core import exceptions as gexc

        blob = self._bucket(loc).blob(loc.key)
        try:
            blob.upload_from_string(data, checksum="crc32c", if_generation_match=int(expected or 0),
                                    timeout=TIMEOUT, retry=_retry())
        except gexc.PreconditionFailed:
            raise PreconditionFailed(f"{loc}: changed since it was read (412)") from None
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None
        return str(blob.generation)

    def remove(self, loc: Location) -> None:
        try:
            names = [o.key for o in self.list(loc)] or [loc.key]
            bucket = self._bucket(loc)
            for name in names:
                bucket.blob(name).delete(timeout=TIMEOUT, retry=_retry())
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None
