"""What a task learns from Flyte's execution context: run id, working folders, where durable files go."""

import os
from pathlib import Path
from typing import Optional

from flytekit import current_context

from flytetune import artifacts, locations


def run_id() -> str:
    """The execution id, not the attempt: every retry of a run sees every earlier attempt's checkpoints."""
    # torch elastic's workers get an empty context; the plugin passes the execution id as the rendezvous run id.
    name = current_context().execution_id.name or os.environ.get("TORCHELASTIC_RUN_ID", "")
    if not name:
        raise RuntimeError("no Flyte execution id: cannot name the run's checkpoint prefix")
    # Local executions are all named "local" and are never retried: each is a run of its own.
    return artifacts.new_version() if name == "local" else name


def on_cluster() -> bool:
    """True in a task pod. Propeller sets the execution's variables in every pod it starts
    (flyteplugins' flytek8s/k8s_resource_adds.go), and torch elastic's workers, whose Flyte context
    is empty, inherit them; `pyflyte run` without --remote sets none."""
    return bool(os.environ.get("FLYTE_INTERNAL_EXECUTION_ID"))


def durable_root() -> Optional[str]:
    """Where `auto` locations go: None on this machine; object storage in a cluster pod."""
    return locations.cluster_root(current_context().raw_output_prefix) if on_cluster() else None


def workdir(name: str) -> Path:
    path = Path(current_context().working_directory) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def execution_prefix(name: str) -> str:
    """`name` under this execution's raw output prefix: the cluster's own bucket (gs:// on GKE), a temp dir locally."""
    return f"{current_context().raw_output_prefix.rstrip('/')}/{name}"
