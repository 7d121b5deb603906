"""CPUs this process may use: the pod's CPU limit (the cgroup quota), not the node's cores.

A 4-CPU pod on a 96-core node that starts one thread or process per visible core runs 96 of them,
throttled. No torch import: the light image (prepare) uses this too.
"""

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs the cgroup may use (e.g. 2.5), or None without a limit. cgroup v2 `cpu.max`
    ("200000 100000" or "max 100000"), else v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cpu_threads(root: Path = CGROUP) -> int:
    """Threads for torch's CPU kernels: the CPUs this process may run on, capped by the quota
    (rounded down: a 2.5-CPU limit runs 2 threads rather than 3 throttled ones)."""
    visible = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota(root)
    return max(1, min(visible, math.floor(quota) if quota is not None else visible))
