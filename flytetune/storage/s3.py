"""AWS S3 through boto3: the only module that imports it.

The endpoint, region and credentials come from boto3's standard chains (`AWS_ENDPOINT_URL`,
`AWS_PROFILE`, IRSA, instance profiles, Flyte secrets mounted as env vars); nothing here
overrides them. Throttling (503 SlowDown, 429) and connection resets are retried by botocore's
adaptive retry mode with backoff; an endpoint that cannot be reached at all (connection refused,
DNS, TLS, connect timeout) is tried only CONNECT_ATTEMPTS times, quickly, then reported in words.
"""

import hashlib
import random
from pathlib import Path

from flytetune.storage.checksums import CHUNK, Digest, bytes_digest, digest_for
from flytetune.storage.clients import PerProcess
from flytetune.storage.network import CONNECT_ATTEMPTS, endpoint_of, find_url, unreachable_cause
from flytetune.storage.objects import ObjectInfo
from flytetune.storage.uri import Location, PreconditionFailed, StorageError

# Our own full-object CRC32C, recorded on every upload: S3's ETag is not an MD5 for multipart
# objects, and its native checksums of multipart uploads are composite.
CRC_META = "flytetune-crc32c"
# One GET streams small objects; larger ones are fetched in parallel ranges.
SINGLE_REQUEST_MAX = 16 << 20
# 64 MiB parts: fewer requests per object (s5cmd uses 50 MB); still 160 parts under S3's 10,000 limit at 10 GiB.
PART_SIZE = 64 << 20
IO_CHUNK = 1 << 20
CONNECT_TIMEOUT_S = 5


MAX_ATTEMPTS = 10


def _retry_policy(attempts: int, response=None, caught_exception=None, **_) -> float | bool | None:
    """needs-retry hook, asked before botocore's own retry handler; None leaves the decision to it.

    An endpoint that cannot be reached gets a few quick tries (botocore would back off for 1.5 minutes
    and then say little). A 429 is throttling whatever its error code (S3-compatible stores send
    codes botocore's standard mode does not know): jittered exponential backoff, like botocore's.
    """
    if caught_exception is not None and unreachable_cause(caught_exception) is not None:
        return False if attempts >= CONNECT_ATTEMPTS else 0.25 * attempts
    if response is not None and response[0].status_code == 429:
        return False if attempts >= MAX_ATTEMPTS else random.uniform(0, min(20.0, 2.0 ** (attempts - 1)))
    return None


def _make_client():
    import boto3
    from botocore.config import Config

    config = Config(max_pool_connections=64, retries={"max_attempts": MAX_ATTEMPTS, "mode": "adaptive"},
                    tcp_keepalive=True, connect_timeout=CONNECT_TIMEOUT_S)
    s3 = boto3.session.Session().client("s3", config=config)
    s3.meta.events.register_first("needs-retry.s3", _retry_policy, unique_id="flytetune-unreachable")
    return s3


# boto3 clients are thread-safe: the transfer threads of a process share one.
_client = PerProcess(_make_client)
client, reset = _client.get, _client.reset


def _transfer_config(concurrency: int = 8):
    from boto3.s3.transfer import TransferConfig

    # Large I/O chunks: on few cores, per-chunk Python overhead, not the network, is the bottleneck.
    return TransferConfig(multipart_threshold=SINGLE_REQUEST_MAX, multipart_chunksize=PART_SIZE,
                          max_concurrency=concurrency, use_threads=True,
                          io_chunksize=IO_CHUNK)


def _error(loc: Location, exc: Exception) -> StorageError:
    from botocore.exceptions import ClientError, EndpointConnectionError, InvalidConfigError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{loc}: no AWS credentials found (environment, ~/.aws, or the pod's role)")
    if isinstance(exc, InvalidConfigError):  # e.g. a web identity token file but no AWS_ROLE_ARN; names no secret
        return StorageError(f"{loc}: AWS credentials are misconfigured: {exc}")
    cause = unreachable_cause(exc)
    if cause is not None:
        return StorageError(f"{loc}: cannot connect to {endpoint_of(find_url(exc))} ({cause})")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{loc}: cannot reach the S3 endpoint {endpoint_of(find_url(exc))}")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return StorageError(f"s3://{loc.bucket}: bucket does not exist")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{loc}: no such object")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return StorageError(f"{loc}: access denied")
        # The last three come from STS, exchanging a pod's web identity token for the role.
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidIdentityToken",
                    "IDPRejectedClaim", "ExpiredTokenException"):
            return StorageError(f"{loc}: AWS credentials rejected ({code})")
        return StorageError(f"{loc}: S3 error {code}")
    return StorageError(f"{loc}: {type(exc).__name__}")


def _or_none_if_missing(loc: Location, call):
    """`call()`'s result, None if the object does not exist; any other SDK error as one StorageError line."""
    from botocore.exceptions import ClientError

    try:
        return call()
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise _error(loc, e) from None
    except Exception as e:  # noqa: BLE001 - every SDK error becomes one StorageError line
        raise _error(loc, e) from None


def _info(key: str, size: int, etag: str | None, metadata: dict | None) -> ObjectInfo:
    etag = (etag or "").strip('"')
    md5 = etag if etag and "-" not in etag else None
    return ObjectInfo(key, size, crc32c=(metadata or {}).get(CRC_META), md5=md5, version=etag or None)


class S3Backend:
    scheme = "s3"

    def list(self, loc: Location) -> list[ObjectInfo]:
        prefix = loc.key.rstrip("/") + "/" if loc.key else ""
        try:
            pages = client().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
            return [_info(o["Key"], o["Size"], o.get("ETag"), None)
                    for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        except Exception as e:  # noqa: BLE001 - every SDK error becomes one StorageError line
            raise _error(loc, e) from None

    def stat(self, loc: Location) -> ObjectInfo | None:
        head = _or_none_if_missing(loc, lambda: client().head_object(Bucket=loc.bucket, Key=loc.key))
        return None if head is None else _info(loc.key, head["ContentLength"], head.get("ETag"), head.get("Metadata"))

    def is_prefix(self, loc: Location) -> bool:
        prefix = loc.key.rstrip("/") + "/"
        try:
            response = client().list_objects_v2(Bucket=loc.bucket, Prefix=prefix, MaxKeys=1)
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None
        return response.get("KeyCount", 0) > 0

    def get(self, loc: Location, dest: Path, expected: ObjectInfo) -> tuple[Digest, ObjectInfo]:
        """Download to `dest`; return the digest of what was written and the object's recorded digests."""
        try:
            if expected.size <= SINGLE_REQUEST_MAX:
                response = client().get_object(Bucket=loc.bucket, Key=loc.key)
                # The GET carries the object's own metadata: verify against what was read, not the listing.
                recorded = _info(loc.key, response["ContentLength"], response.get("ETag"), response.get("Metadata"))
                digest = Digest(md5=recorded.crc32c is None)
                with open(dest, "wb") as f:
                    for chunk in response["Body"].iter_chunks(CHUNK):
                        digest.update(chunk)
                        f.write(chunk)
                return digest, recorded
            recorded = self.stat(loc) or expected
            client().download_file(loc.bucket, loc.key, str(dest), Config=_transfer_config())
            return digest_for(dest, recorded), recorded
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None

    def put(self, path: Path, loc: Location, digest: Digest) -> None:
        metadata = {CRC_META: digest.crc32c}
        try:
            if digest.size <= SINGLE_REQUEST_MAX:
                client().put_object(Bucket=loc.bucket, Key=loc.key, Body=path.read_bytes(), Metadata=metadata)
            else:
                client().upload_file(str(path), loc.bucket, loc.key, ExtraArgs={"Metadata": metadata},
                                     Config=_transfer_config())
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None

    def sha256(self, loc: Location) -> tuple[str, int]:
        try:
            digest, size = hashlib.sha256(), 0
            for chunk in client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].iter_chunks(CHUNK):
                digest.update(chunk)
                size += len(chunk)
            return digest.hexdigest(), size
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None

    def read_bytes(self, loc: Location) -> bytes:
        try:
            return client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None

    def write_bytes(self, loc: Location, data: bytes) -> None:
        try:
            client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data,
                                Metadata={CRC_META: bytes_digest(data).crc32c})
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None

    def read_with_token(self, loc: Location) -> tuple[bytes, str] | None:
        """The object and its ETag, from one GET (so they belong together); None if there is none."""
        def get():
            response = client().get_object(Bucket=loc.bucket, Key=loc.key)
            return response["Body"].read(), response["ETag"]

        return _or_none_if_missing(loc, get)

    def write_bytes_if(self, loc: Location, data: bytes, expected: str | None) -> str:
        """One PUT with `If-Match: <ETag>` (or `If-None-Match: *`); S3 checks and writes atomically.

        S3 answers 412 when the ETag differs or the object exists, 404 NoSuchKey under If-Match when
        the object was deleted, and 409 ConditionalRequestConflict while a competing conditional write
        is in flight: all three mean "someone else wrote first". A store that ignores these headers
        (S3-compatible servers older than AWS's 2024 support) would make this an unconditional PUT.
        """
        from botocore.exceptions import ClientError

        condition = {"IfMatch": expected} if expected is not None else {"IfNoneMatch": "*"}
        try:
            response = client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data,
                                            Metadata={CRC_META: bytes_digest(data).crc32c}, **condition)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            lost = code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
            if lost or (expected is not None and code in ("NoSuchKey", "404")):
                raise PreconditionFailed(f"{loc}: changed since it was read ({code})") from None
            raise _error(loc, e) from None
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None
        return response["ETag"]

    def remove(self, loc: Location) -> None:
        keys = [o.key for o in self.list(loc)] or [loc.key]
        try:
            for start in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[start:start + 1000]]
                response = client().delete_objects(Bucket=loc.bucket, Delete={"Objects": batch, "Quiet": True})
                failed = response.get("Errors") or []  # a Quiet batch reports per-key failures, not raises
                if failed:
                    raise StorageError(f"s3://{loc.bucket}/{failed[0].get('Key')}: not deleted "
                                       f"({failed[0].get('Code')}; {len(failed)} of {len(batch)} in the batch)")
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _error(loc, e) from None
