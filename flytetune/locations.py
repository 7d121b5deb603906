"""Where a run keeps what must outlive its pod: checkpoints and published models.

On this machine `auto` means the folders `checkpoints/` and `artifacts/`. On a cluster a pod's
disk is gone after a preemption, so `auto` means object storage: `$FLYTETUNE_DURABLE_URI` when the
platform sets it, else the bucket of the execution's raw output prefix, under `flytetune/`. A local
path there is refused before anything runs, naming the key.
"""

import dataclasses
import os
from typing import Optional

from flytetune import storage
from flytetune.config import AUTO, ConfigError, FinetuneConfig
from flytetune.storage import StorageError
from flytetune.storage.uri import is_local, parse

# Set platform-wide (propeller's default-env-vars, configs/flyte/): a bucket without an expiry rule.
DURABLE_ENV = "FLYTETUNE_DURABLE_URI"
LOCAL = {"checkpoint.uri": "checkpoints", "output_uri": "artifacts"}
ON_CLUSTER = {"checkpoint.uri": "checkpoints", "output_uri": "models"}


def cluster_root(raw_output_prefix: str) -> str:
    """The durable prefix of a cluster run: the configured one, or the raw output bucket's `flytetune/`."""
    configured = os.environ.get(DURABLE_ENV)
    if configured:
        if _is_local(configured):
            raise ConfigError(f"{DURABLE_ENV}={configured!r}: must be s3:// or gs://, not a path inside the pod")
        return configured.rstrip("/")
    if _is_local(raw_output_prefix):
        raise ConfigError(f"the execution's raw output prefix {raw_output_prefix!r} is inside the pod: "
                          f"set {DURABLE_ENV} or the cluster's rawoutput-prefix to an s3:// or gs:// bucket")
    location = parse(raw_output_prefix)
    return f"{location.scheme}://{location.bucket}/flytetune"


def resolve(cfg: FinetuneConfig, output_uri: str, durable_root: Optional[str]) -> tuple[FinetuneConfig, str]:
    """Replace `auto` in checkpoint.uri and output_uri; on a cluster (`durable_root` set), refuse local paths."""
    checkpoints = dataclasses.replace(cfg.checkpoint, uri=_place("checkpoint.uri", cfg.checkpoint.uri, durable_root))
    return dataclasses.replace(cfg, checkpoint=checkpoints), _place("output_uri", output_uri, durable_root)


def check_writable(cfg: FinetuneConfig, output_uri: str) -> None:
    """Write and delete a probe where the model and the checkpoints will go, before anything runs:
    a typo in a bucket name fails now, naming the key, not after hours of training."""
    for key, uri in (("output_uri", output_uri), ("checkpoint.uri", cfg.checkpoint.uri)):
        if uri is None:
            continue
        try:
            storage.check_writable(uri)
        except StorageError as e:
            raise StorageError(f"{key}: {e}") from None


def _place(key: str, value: Optional[str], durable_root: Optional[str]) -> Optional[str]:
    if value is None:  # checkpoints switched off
        return None
    if durable_root is None:
        return LOCAL[key] if value == AUTO else value
    if value == AUTO:
        return f"{durable_root}/{ON_CLUSTER[key]}"
    if _is_local(value):
        raise ConfigError(f"{key}: {value!r} is a path inside the pod, lost when the pod ends; "
                          f"use s3://, gs:// or `auto` ({durable_root}/{ON_CLUSTER[key]})")
    return value


def _is_local(uri: str) -> bool:
    try:
        return is_local(uri)
    except StorageError as e:
        raise ConfigError(str(e)) from None
