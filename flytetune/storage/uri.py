"""Parsing and joining storage URIs: local paths, file://, s3:// and gs://."""

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

SCHEMES = ("s3", "gs")


class StorageError(Exception):
    """One line naming the URI and the problem; never carries credentials."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object is no longer the version that was read (or now exists)."""


@dataclass(frozen=True)
class Location:
    scheme: str  # "file", "s3" or "gs"
    bucket: str  # empty for local paths
    key: str  # object key, or the local path for "file"

    def __str__(self) -> str:
        return self.key if self.scheme == "file" else f"{self.scheme}://{self.bucket}/{self.key}"

    def child(self, relative: str) -> "Location":
        if self.scheme == "file":
            return Location("file", "", str(Path(self.key) / relative))
        prefix = self.key.rstrip("/")
        return Location(self.scheme, self.bucket, f"{prefix}/{relative}" if prefix else relative)


def parse(uri: str) -> Location:
    if uri.startswith("file://"):
        return Location("file", "", urlparse(uri).path)
    if "://" not in uri:
        return Location("file", "", uri)
    parsed = urlparse(uri)
    if parsed.scheme not in SCHEMES:
        raise StorageError(f"{uri}: unsupported scheme {parsed.scheme!r}; use s3://, gs://, file:// or a path")
    if not parsed.netloc:
        raise StorageError(f"{uri}: no bucket name")
    return Location(parsed.scheme, parsed.netloc, parsed.path.lstrip("/"))


def is_local(uri: str) -> bool:
    return parse(uri).scheme == "file"


def local_path(uri: str) -> Path:
    location = parse(uri)
    if location.scheme != "file":
        raise StorageError(f"{uri}: not a local path")
    return Path(location.key)


def safe_relative(key: str, source: str) -> str:
    """A key below a prefix, checked before it becomes a path or a destination key.

    Rejects absolute keys, `..` segments and anything else that would land outside the
    destination: a hostile bucket must not be able to write ~/.bashrc.
    """
    # Raw segments, not PurePosixPath.parts: that would quietly drop "." and empty segments.
    segments = key.split("/")
    if not key or "\\" in key or any(seg in ("", ".", "..") for seg in segments):
        raise StorageError(f"{source}: unsafe object key {key!r} (absolute, '.', '..' or empty segments); "
                           "refusing to copy it")
    return key
