"""Fast paths chosen from the hardware the process finds itself on, so a user never sets them.

- CPU threads follow the pod's CPU limit (the cgroup quota), not the node's cores: torch's default
  of one thread per visible core makes a 4-CPU pod on a 96-core node run 96 threads throttled.
- On CUDA: TF32 matmuls, bf16 autocast on Ampere and newer, fp16 autocast with a gradient scaler
  before that (T4), pinned host memory for asynchronous copies. On CPU: bf16 autocast where the CPU
  has bf16 instructions (measured 1.5x fp32 on 2 cores of an AMD EPYC, benchmarks/train_throughput.py).
"""

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flytetune.config import ConfigError

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: `autocast` dtype (None: fp32) and whether gradients need scaling."""
    name: str  # fp32 | bf16 | fp16
    autocast: torch.dtype | None
    scaled: bool


PRECISIONS = {"fp32": Precision("fp32", None, False), "bf16": Precision("bf16", torch.bfloat16, False),
              "fp16": Precision("fp16", torch.float16, True)}


# CPU flags (x86 /proc/cpuinfo "flags", aarch64 "Features") of native bf16 matrix arithmetic.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on CPUs with bf16 dot-product instructions (AMD Zen 4, Intel Cooper/Sapphire Lake,
    Graviton 3), where bf16 autocast trains faster than fp32; elsewhere it is emulated and slower."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return False
    flags = {flag for line in lines if line.startswith(("flags", "Features"))
             for flag in line.split(":", 1)[-1].split()}
    return bool(flags & NATIVE_BF16_FLAGS)


def choose_precision(setting: str, device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> Precision:
    """`train.precision`: auto picks bf16 on CUDA compute capability >= 8 (A100, H100), fp16 with a
    scaler below (T4, V100); on CPU bf16 where the CPU computes it natively, else fp32."""
    if setting != "auto":
        if setting == "fp16" and device.type != "cuda":
            raise ConfigError("train.precision: fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
        return PRECISIONS[setting]
    if device.type != "cuda":
        return PRECISIONS["bf16" if cpu_has_native_bf16(cpuinfo) else "fp32"]
    major, _ = torch.cuda.get_device_capability(device)
    return PRECISIONS["bf16" if major >= 8 else "fp16"]


def configure(device: torch.device) -> None:
    """Process-wide settings for `device`: TF32 on CUDA, CPU threads from the pod's limit."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return
    threads = cpu_threads()
    if torch.get_num_threads() != threads:
        log.info("torch CPU threads: %d (the pod's CPU limit), not %d", threads, torch.get_num_threads())
        torch.set_num_threads(threads)
