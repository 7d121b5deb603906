"""Telling an unreachable endpoint (nothing to retry) from a slow or throttling one (retry with backoff).

Connection refused, a failed DNS lookup, a TLS failure or a connect timeout mean the endpoint is wrong
or down: both SDKs would retry them for one to two minutes and then say little. Each backend retries
them only a few times, quickly, and reports the cause in words.
"""

import errno
import socket
import ssl
from urllib.parse import urlsplit

# Attempts (the first included) for a request that could not connect; quick, to ride out a blip.
CONNECT_ATTEMPTS = 3
_ERRNO_CAUSES = {errno.ECONNREFUSED: "connection refused", errno.ENETUNREACH: "network unreachable",
                 errno.EHOSTUNREACH: "host unreachable"}


def _chain(exc: BaseException):
    """The exception, what it wraps (botocore keeps the urllib3 error in kwargs), and their causes."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        wrapped = getattr(e, "kwargs", None)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None),
                 wrapped.get("error") if isinstance(wrapped, dict) else None,
                 *(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))]


def unreachable_cause(exc: BaseException) -> str | None:
    """'connection refused', 'DNS lookup failed', 'TLS error: ...' or 'connect timed out'; None otherwise."""
    names = {type(e).__name__ for e in _chain(exc)}
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _ERRNO_CAUSES:
            return _ERRNO_CAUSES[e.errno]
        if isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError":
            return "DNS lookup failed"
        if isinstance(e, ssl.SSLError):
            return f"TLS error: {getattr(e, 'reason', None) or type(e).__name__}"
    if names & {"ConnectTimeoutError", "ConnectTimeout"} and "NewConnectionError" not in names:
        return "connect timed out"
    return None


def endpoint_of(url: str | None) -> str:
    """scheme://host:port of a request URL (no path, query or credentials)."""
    if not url:
        return "the endpoint"
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{parts.port}" if parts.port else f"{parts.scheme}://{host}"


def find_url(exc: BaseException) -> str | None:
    """The URL the failed request went to, where the exception records it."""
    for e in _chain(exc):
        kwargs = getattr(e, "kwargs", None)
        if isinstance(kwargs, dict) and kwargs.get("endpoint_url"):
            return kwargs["endpoint_url"]
        request = getattr(e, "request", None)
        if getattr(request, "url", None):
            return request.url
        pool = getattr(e, "pool", None) or getattr(e, "conn", None)
        if getattr(pool, "host", None):
            scheme = getattr(pool, "scheme", None) or ("https" if getattr(pool, "port", None) == 443 else "http")
            return f"{scheme}://{pool.host}:{pool.port}"
    return None
