"""Fast paths chosen from the hardware the process finds itself on, so a user never sets them.

- CPU threads follow the pod's CPU limit (the cgroup quota), not the node's cores: torch's default
  of one thread per visible core makes a 4-CPU pod on a 96-core node run 96 threads throttled.
- On CUDA: TF32 matmuls, bf16 autocast on Ampere and newer, fp16 autocast with a gradient scaler
  before that (T4), pinned host memory for asynchronous copies. On CPU: bf16 autocast where the CPU
  has bf16 instructions (measured 1.5x fp32 on 2 cores of an AMD EPYC, benchmarks/train_throughput.py).
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from flytetune.config import ConfigError
from flytetune.cpus import cpu_threads

log = logging.getLogger(__name__)

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
