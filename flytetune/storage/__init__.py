"""Storage behind URIs: local paths, file://, s3:// and gs://, in every direction.

This package is the only code in flytetune that imports boto3 or google-cloud-storage (lazily:
importing it costs nothing); everything else speaks URIs:

    copy(src, dst)               one object, verified, atomic at the destination
    sync(src_prefix, dst_prefix) every object under a prefix, parallel and incremental
    ls, exists, read_bytes, write_bytes, read_text, write_text, remove

CLI: python -m flytetune.storage copy|sync SRC DST [--concurrency N]
"""

from pathlib import Path

from flytetune.storage import gcs as _gcs
from flytetune.storage import s3 as _s3
from flytetune.storage.transfer import TransferStats, backend, copy, sync
from flytetune.storage.uri import StorageError, is_local, local_path, parse

__all__ = ["StorageError", "TransferStats", "copy", "exists", "is_local", "local_path", "ls", "read_bytes",
           "read_text", "remove", "reset_clients", "sync", "write_bytes", "write_text"]


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


def exists(uri: str) -> bool:
    loc = parse(uri)
    return backend(loc).stat(loc) is not None or backend(loc).is_prefix(loc)


def read_bytes(uri: str) -> bytes:
    loc = parse(uri)
    return backend(loc).read_bytes(loc)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a small object in one atomic step (rename locally, one PUT on object stores)."""
    loc = parse(uri)
    backend(loc).write_bytes(loc, data)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def remove(uri: str) -> None:
    """Delete an object, or every object under a prefix."""
    loc = parse(uri)
    backend(loc).remove(loc)


def reset_clients() -> None:
    """Forget the shared SDK clients, e.g. after the endpoint or credentials in the environment changed."""
    _s3.reset()
    _gcs.reset()
