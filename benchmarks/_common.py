"""Helpers shared by benchmarks/train_throughput.py and benchmarks/time_to_accuracy.py (not a benchmark).

Importing this module puts the repository root on sys.path and sets the offline switches of `make run`.
"""

import gc
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# As `make run`: the backbone ships in a package, nothing may be fetched from a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from flytetune.store import FeatureStore  # noqa: E402


def require_accelerate() -> None:
    """The HF Trainer needs accelerate; say how to get it instead of a traceback from deep inside transformers."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise SystemExit("the HF Trainer needs accelerate: .venv/bin/python -m pip install -r requirements/bench.txt "
                         "-c requirements/lock-dev.txt (`make bench` does this)") from None


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def conditions(device: torch.device) -> str:
    """Device, threads and library versions, for the printed header."""
    import transformers

    try:
        import accelerate
        acc = accelerate.__version__
    except ImportError:
        acc = "missing"
    where = (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})" if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} torch threads on {os.cpu_count()} cores")
    return (f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, accelerate {acc}, "
            f"Python {sys.version.split()[0]}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trainer_rows(store_dir: Path) -> list[dict]:
    """A prepared lmdb store as the list of feature dicts the HF Trainer and DataCollatorWithPadding take:
    the very token ids flytetune trains on (same tokenizer, same truncation, same rows)."""
    store = FeatureStore(store_dir)
    rows = []
    for i in range(len(store)):
        example = store[i]
        ids = example["input_ids"].tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": int(example["label"])})
    return rows


def build_classifier(cfg, labels: list[str], device: torch.device) -> torch.nn.Module:
    """The model exactly as `flytetune.train.fit` builds it (same function, same seed before it), so every
    contender starts from identical weights, the new classification head included."""
    from flytetune.objectives import build_classifier

    torch.manual_seed(cfg.train.seed)
    return build_classifier(cfg, labels).to(device)


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def without_printer(trainer) -> None:
    """disable_tqdm=True swaps the progress bar for a callback printing every log dict; drop that too."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def training_args(output_dir: Path, **overrides):
    """TrainingArguments with the library defaults except what a benchmark must switch off: saving,
    reporting and the progress bar (a print per step is not what is measured)."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(output_dir), save_strategy="no", report_to="none", disable_tqdm=True,
                             **overrides)


def length_grouping() -> dict:
    """The TrainingArguments switch for length-grouped batches: `train_sampling_strategy` in recent
    transformers 5.x, `group_by_length` before it."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}
