"""Storage behind URIs: local paths, file://, s3:// and gs://, in every direction.

This package is the only code in flytetune that imports boto3 or google-cloud-storage (lazily:
importing it costs nothing); everything else speaks URIs:

    copy(src, dst)               one object, verified, atomic at the destination
    sync(src_prefix, dst_prefix) every object under a prefix, parallel and incremental
    ls, exists, stat, read_bytes, write_bytes, read_text, write_text, remove
    sha256(uri)                  SHA-256 and size of one object, streamed (no local copy)
    fingerprint(uris)            one hash of objects' sizes and versions: equal means unchanged
    check_writable(prefix)       fail early, in one line, where outputs could not be written
    read_with_token, write_bytes_if   compare-and-swap of one small object (PreconditionFailed)

CLI: python -m flytetune.storage copy|sync SRC DST [--concurrency N]
"""

import hashlib
import json
import os
from pathlib import Path

from flytetune.storage import gcs as _gcs
from flytetune.storage import s3 as _s3
from flytetune.storage.objects import ObjectInfo
from flytetune.storage.transfer import TransferStats, backend, check_local_targets, copy, sync
from flytetune.storage.uri import PreconditionFailed, StorageError, is_local, local_path, parse

__all__ = ["ObjectInfo", "PreconditionFailed", "StorageError", "TransferStats", "check_writable", "copy", "exists",
           "fingerprint", "is_local", "local_path", "ls", "read_bytes", "read_text", "read_with_token", "remove",
           "reset_clients", "sha256", "stat", "sync", "write_bytes", "write_bytes_if", "write_text"]


def _join(uri: str, relative: str) -> str:
    return f"{uri.rstrip('/')}/{relative}"


def ls(uri: str) -> list[str]:
    """Every object under a prefix (recursively), as URIs in the form given; [uri] for one object."""
    loc = parse(uri)
    infos = backend(loc).list(loc)
    if infos:
        root = loc
        out = []
        for info in infos:
            if root.scheme == "file":
                rel = Path(info.key).relative_to(Path(root.key)).as_posix()
            else:
                rel = info.key[len(root.key.rstrip("/") + "/") if root.key else 0:]
            out.append(_join(uri, rel))
        return sorted(out)
    return [uri] if backend(loc).stat(loc) is not None else []


def stat(uri: str) -> ObjectInfo | None:
    """Size, digests and version of one object; None if there is none (a prefix is none)."""
    loc = parse(uri)
    return backend(loc).stat(loc)


def fingerprint(uris: list[str]) -> str:
    """SHA-256 over each object's URI, size, digests and version (one stat each, no download).

    Equal fingerprints mean the same objects, unchanged; a rewrite with the same bytes may still
    change it (a new S3 ETag for another part size, a new local mtime), which costs a re-copy, never
    a stale result. StorageError naming the URI when an object is missing.
    """
    entries = []
    for uri in sorted(uris):
        info = stat(uri)
        if info is None:
            raise StorageError(f"{uri}: no such object")
        entries.append([uri, info.size, info.crc32c, info.md5, info.version])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def exists(uri: str) -> bool:
    loc = parse(uri)
    return backend(loc).stat(loc) is not None or backend(loc).is_prefix(loc)


def sha256(uri: str) -> tuple[str, int]:
    """SHA-256 (hex) and size of one object, read as a stream: nothing is written to disk or held."""
    loc = parse(uri)
    return backend(loc).sha256(loc)


def read_bytes(uri: str) -> bytes:
    loc = parse(uri)
    return backend(loc).read_bytes(loc)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a small object in one atomic step (rename locally, one PUT on object stores)."""
    loc = parse(uri)
    backend(loc).write_bytes(loc, data)


def read_with_token(uri: str) -> tuple[bytes, str] | None:
    """A small object and its version token, or None if there is no object.

    The token is the S3 ETag, the GCS generation, or a local file's SHA-256: pass it to
    `write_bytes_if` to replace exactly the version that was read.
    """
    loc = parse(uri)
    return backend(loc).read_with_token(loc)


def write_bytes_if(uri: str, data: bytes, expected: str | None) -> str:
    """Compare-and-swap: write a small object only if it is still the version `expected` (a token from
    `read_with_token`; None: only if it does not exist). Return the new token.

    Raises PreconditionFailed (a StorageError) when someone else wrote first; nothing is written then.
    Readers see the old or the new object, never a mix (one PUT, one upload, or a rename). Tokens on
    S3 (single-PUT ETags) and local disk are content hashes: writing back earlier bytes makes an earlier
    token valid again, so callers that need a strict history put a counter in the content.
    """
    loc = parse(uri)
    return backend(loc).write_bytes_if(loc, data, expected)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def remove(uri: str) -> None:
    """Delete an object, or every object under a prefix."""
    loc = parse(uri)
    backend(loc).remove(loc)


PROBE_PREFIX = ".flytetune-write-probe-"


def check_writable(uri: str) -> None:
    """Write and delete a small probe object under the prefix `uri`; StorageError (one line naming `uri`
    and the cause) if that fails: a missing bucket, no permission, a local path that is a file...

    Run it before hours of work whose output goes to `uri`. Nothing is left behind on success, not even
    the local folders it had to create.
    """
    loc = parse(uri)  # an unsupported scheme is a StorageError naming the URI
    probe = loc.child(f"{PROBE_PREFIX}{os.urandom(6).hex()}")
    created = None  # the outermost local folder the probe creates: removed again, so nothing looks published
    try:
        if loc.scheme == "file":
            check_local_targets([(uri, Path(probe.key))])
            created = next((p for p in reversed(Path(probe.key).absolute().parents) if not p.exists()), None)
        backend(loc).write_bytes(probe, b"flytetune write probe\n")
        backend(loc).remove(probe)
        if created is not None:
            for folder in [Path(probe.key).absolute().parent, *Path(probe.key).absolute().parent.parents]:
                folder.rmdir()
                if folder == created:
                    break
    except StorageError as e:
        cause = str(e)
        for prefix in (f"{uri}: ", f"{probe}: "):
            cause = cause.removeprefix(prefix)
        raise StorageError(f"{uri}: not writable ({cause})") from None
    except OSError as e:
        raise StorageError(f"{uri}: not writable ({e.strerror or type(e).__name__})") from None


def reset_clients() -> None:
    """Forget the shared SDK clients, e.g. after the endpoint or credentials in the environment changed."""
    _s3.reset()
    _gcs.reset()
