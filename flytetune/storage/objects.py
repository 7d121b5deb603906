"""What a backend knows about one object, and how two objects are compared."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # full key (or path) of the object
    size: int
    # Base64 CRC32C of the whole object when the store records it (GCS always; S3 when we wrote it).
    crc32c: str | None = None
    # Hex MD5 when known (GCS; S3 single-part ETag).
    md5: str | None = None
    # Changes whenever the content may have: the S3 ETag (multipart too), the GCS generation, a local
    # file's modification time. Equal versions mean unchanged content; different ones may not.
    version: str | None = None


def same_content(a: ObjectInfo, b: ObjectInfo) -> bool | None:
    """True/False when the recorded digests decide it; None when they cannot (sizes equal, no shared digest)."""
    if a.size != b.size:
        return False
    if a.crc32c and b.crc32c:
        return a.crc32c == b.crc32c
    if a.md5 and b.md5:
        return a.md5 == b.md5
    return None
