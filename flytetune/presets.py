"""Hardware presets: the pod a training run asks for, by name (`cpu`, `t4`, `a100`, `a100x4`, ...).

A preset is a YAML file under `configs/presets/`, loaded and checked here (no Flyte import);
`tasks/presets.py` turns it into the one `with_overrides(...)` call on the training task.
Spot placement is deliberately not a preset field: `interruptible` sends a task to spot nodes
through the platform's propeller settings (see configs/flyte/), so Flyte can still run the last
attempt on demand. A spot node selector in a pod template would pin every attempt to spot.
"""

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from flytetune.config import ConfigError, build

PRESETS_DIR = Path("configs/presets")
# Requests and limits of every task but training (which takes its preset).
STEP_RESOURCES = Path("configs/resources.yaml")

# GKE's names for its GPUs (the `cloud.google.com/gke-accelerator` node label). Where flytekit's
# constants differ (its H100 says `nvidia-h100`), the GKE name is what the node selector must match.
GKE_ACCELERATORS = (
    "nvidia-tesla-t4",
    "nvidia-l4",
    "nvidia-tesla-v100",
    "nvidia-tesla-p100",
    "nvidia-tesla-p4",
    "nvidia-tesla-a100",
    "nvidia-a100-80gb",
    "nvidia-h100-80gb",
    "nvidia-h100-mega-80gb",
    "nvidia-h200-141gb",
)
_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


@dataclass
class ResourceSpec:
    cpu: str = "1"
    mem: str = "4Gi"
    gpu: int = 0
    ephemeral_storage: str = "20Gi"


@dataclass
class Preset:
    name: str = ""
    description: str = ""
    requests: ResourceSpec = field(default_factory=ResourceSpec)
    limits: ResourceSpec = field(default_factory=ResourceSpec)
    # GKE accelerator name; required when GPUs are requested.
    accelerator: Optional[str] = None
    interruptible: bool = True
    retries: int = 3
    timeout_hours: float = 12.0
    # Size of the memory-backed /dev/shm for DataLoader workers and NCCL; counts against `limits.mem`.
    shared_memory: Optional[str] = None
    # Training processes in the pod (torchrun, one per GPU); > 1 means data-parallel training.
    processes_per_node: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    # Estimated price of the whole node in USD per hour, for the cost guard's reminders (flytetune/watchdog.py)
    # and nothing else: an estimate, with its source and date in the preset file. None: unknown.
    hourly_usd: Optional[float] = None
    # The cost guard posts one reminder about an execution of this preset running longer than this.
    remind_after_hours: float = 4.0

    @property
    def gpus(self) -> int:
        return self.limits.gpu

    @property
    def distributed(self) -> bool:
        return self.processes_per_node > 1


def available() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_all(folder: Path = PRESETS_DIR) -> dict[str, Preset]:
    """Every preset in `folder`, by name, each checked as `load_preset` does."""
    return {path.stem: load_preset(str(path)) for path in sorted(folder.glob("*.yaml"))}


def load_preset(name: str) -> Preset:
    """Load `configs/presets/<name>.yaml` (or a YAML path) and check it; ConfigError names the key."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = available()
        hint = difflib.get_close_matches(name, known, n=1)
        suggestion = f" (did you mean {hint[0]}?)" if hint else ""
        raise ConfigError(f"preset {name!r}: not found in {PRESETS_DIR}/{suggestion}; available: {', '.join(known)}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict) or "name" in raw:
        raise ConfigError(f"{path}: expected a mapping of preset fields (the name is the file name)")
    try:
        preset = build(Preset, {**raw, "name": path.stem})
        _validate(preset)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return preset


@dataclass
class StepResources:
    requests: ResourceSpec = field(default_factory=ResourceSpec)
    limits: ResourceSpec = field(default_factory=ResourceSpec)


def load_step_resources(path: Path = STEP_RESOURCES) -> dict[str, StepResources]:
    """Task name -> resources, from configs/resources.yaml, checked like a preset's; ConfigError names the key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot be read: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of task names")
    steps = {}
    for name, values in raw.items():
        try:
            steps[name] = build(StepResources, values)
            _check_quantities(steps[name])
        except ConfigError as e:
            raise ConfigError(f"{path}: {name}.{e}") from None
    return steps


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}")


def _check_quantities(p: Preset | StepResources) -> None:
    for side in ("requests", "limits"):
        spec: ResourceSpec = getattr(p, side)
        for key in ("cpu", "mem", "ephemeral_storage"):
            value = getattr(spec, key)
            _check(bool(_QUANTITY.match(value)), f"{side}.{key}",
                   f"{value!r} is not a Kubernetes quantity (e.g. 8, 500m, 16Gi)")
        _check(spec.gpu >= 0, f"{side}.gpu", "must be >= 0")


def _validate(p: Preset) -> None:
    _check_quantities(p)
    # Kubernetes accepts extended resources only with requests equal to limits.
    _check(p.requests.gpu == p.limits.gpu, "requests.gpu", f"must equal limits.gpu ({p.limits.gpu})")
    if p.gpus:
        _check(p.accelerator is not None, "accelerator",
               f"required with {p.gpus} GPU(s); one of {', '.join(GKE_ACCELERATORS)}")
    else:
        _check(p.accelerator is None, "accelerator", "set, but no GPU is requested (limits.gpu is 0)")
    if p.accelerator is not None and p.accelerator not in GKE_ACCELERATORS:
        hint = difflib.get_close_matches(p.accelerator, GKE_ACCELERATORS, n=1)
        suggestion = f" (did you mean {hint[0]}?)" if hint else ""
        raise ConfigError(f"accelerator: {p.accelerator!r} is not a GKE accelerator name{suggestion}")
    _check(p.processes_per_node >= 1, "processes_per_node", "must be >= 1")
    if p.gpus:
        _check(p.processes_per_node <= p.gpus, "processes_per_node", f"must not exceed the {p.gpus} GPU(s) requested")
    _check(0 <= p.retries <= 10, "retries", "must be between 0 and 10")
    _check(p.timeout_hours > 0, "timeout_hours", "must be positive")
    _check(p.hourly_usd is None or p.hourly_usd >= 0, "hourly_usd", "must be >= 0 (USD per hour of the node), or null")
    _check(p.remind_after_hours > 0, "remind_after_hours", "must be positive")
    if p.shared_memory is not None:
        _check(bool(_QUANTITY.match(p.shared_memory)), "shared_memory",
               f"{p.shared_memory!r} is not a size (e.g. 16Gi)")


# The prepare pod by name, per run (`--prepare_size`): configs/prepare_sizes.yaml.
PREPARE_SIZES = Path("configs/prepare_sizes.yaml")
# The workflow's default: a size chosen from the located input's bytes (`choose_prepare_size`).
AUTO_SIZE = "auto"
_BYTES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


@dataclass
class PrepareSize:
    name: str = ""
    description: str = ""
    # `auto` takes the first size (file order) whose auto_up_to (bytes, a quantity: 1Gi) covers the
    # located input; None on the last size only: everything larger.
    auto_up_to: Optional[str] = None
    requests: ResourceSpec = field(default_factory=ResourceSpec)
    limits: ResourceSpec = field(default_factory=ResourceSpec)


def quantity_bytes(value: str) -> int:
    """A Kubernetes quantity of bytes (1Gi, 500M, 1024) as a number; ConfigError if it is none."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(k|M|G|T|Ki|Mi|Gi|Ti)?", str(value))
    if not match:
        raise ConfigError(f"{value!r} is not a size in bytes (e.g. 1Gi, 500M)")
    return int(float(match.group(1)) * _BYTES[match.group(2) or ""])


def load_prepare_sizes(path: Path = PREPARE_SIZES) -> dict[str, PrepareSize]:
    """Size name -> PrepareSize, in file order, each checked like a preset; ConfigError names the key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot be read: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of prepare size names")
    if AUTO_SIZE in raw:
        raise ConfigError(f"{path}: {AUTO_SIZE!r} is not a size name: it means choosing one by the input's bytes")
    sizes, bound = {}, -1
    for i, (name, values) in enumerate(raw.items()):
        last = i == len(raw) - 1
        try:
            if not isinstance(values, dict) or "name" in values:
                raise ConfigError("expected a mapping of size fields (the name is the key)")
            size = build(PrepareSize, {**values, "name": name})
            _check_quantities(size)
            # Prepare runs on CPU: a GPU here would be paid for and idle.
            _check(size.limits.gpu == 0 and size.requests.gpu == 0, "limits.gpu", "prepare uses no GPU; must be 0")
            _check(size.requests.mem == size.limits.mem, "requests.mem",
                   f"must equal limits.mem ({size.limits.mem}): a pod using what it asked for is then never evicted")
            if last:
                _check(size.auto_up_to is None, "auto_up_to", "must be null on the last size (it takes the rest)")
            else:
                _check(size.auto_up_to is not None, "auto_up_to", "required but on the last size")
                try:
                    up_to = quantity_bytes(size.auto_up_to)
                except ConfigError as e:
                    raise ConfigError(f"auto_up_to: {e}") from None
                _check(up_to > bound, "auto_up_to", "must grow from one size to the next")
                bound = up_to
        except ConfigError as e:
            raise ConfigError(f"{path}: {name}.{e}") from None
        sizes[name] = size
    return sizes


def check_prepare_size(name: str, path: Path = PREPARE_SIZES) -> None:
    """`auto` or a size in `path`; ConfigError naming the option and listing the sizes otherwise."""
    sizes = load_prepare_sizes(path)
    if name == AUTO_SIZE or name in sizes:
        return
    names = [AUTO_SIZE, *sizes]
    hint = difflib.get_close_matches(name, names, n=1)
    suggestion = f" (did you mean {hint[0]}?)" if hint else ""
    raise ConfigError(f"prepare_size: {name!r} is not a prepare size{suggestion}; one of {', '.join(names)} "
                      f"(sizes in {path})")


def choose_prepare_size(name: str, input_bytes: Optional[int], path: Path = PREPARE_SIZES) -> str:
    """The size prepare runs with: `name` itself, or for `auto` the first size whose `auto_up_to` covers
    `input_bytes` (None: unknown, as with --prepared_uri where prepare does not run: the first size)."""
    check_prepare_size(name, path)
    if name != AUTO_SIZE:
        return name
    sizes = load_prepare_sizes(path)
    for size in sizes.values():
        if input_bytes is None or size.auto_up_to is None or input_bytes <= quantity_bytes(size.auto_up_to):
            return size.name
    raise AssertionError("the last size has no auto_up_to (load_prepare_sizes)")
