"""Checkpoint save and restore times for the default backbone and a BERT-base-sized model.

Conditions: the models train on this machine's device (CUDA when present, else CPU) with AdamW
and a linear schedule, batch 16 x 64 random tokens; each checkpoint holds weights, optimizer
and scheduler state and RNGs, exactly as `flytetune.train` saves it. The destination is a
local folder unless `--uri` names another (e.g. an s3:// prefix). Each figure is the median of
`--repeats` saves.

    python benchmarks/checkpoint.py [--uri s3://bucket/prefix] [--repeats 3]

Save: "blocking" is the copy of the state to host memory, the only part the training loop waits
for; "total" adds writing, checksumming and uploading in the background thread. Restore to first
step: download + verify + load the newest checkpoint into a freshly built model and optimizer,
then run one training step. The ratio total/blocking is how much longer training would stall
per save if checkpoints were written synchronously.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flytetune import checkpoint, storage  # noqa: E402
from flytetune.backbone import resolve_backbone  # noqa: E402
from flytetune.config import FinetuneConfig, ModelConfig  # noqa: E402
from flytetune.train import build_optimizer, train_step  # noqa: E402

LABELS = 17
BATCH, SEQ = 16, 64


def default_backbone():
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new classifier head is reported "missing" by design
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_backbone(ModelConfig().backbone), num_labels=LABELS, local_files_only=True)


def bert_base():
    from transformers import BertConfig, BertForSequenceClassification

    # BertConfig() defaults are BERT-base: 12 layers, hidden 768, 110M parameters (random weights).
    return BertForSequenceClassification(BertConfig(num_labels=LABELS))


def build(factory, device: torch.device):
    """Model, optimizer and scheduler exactly as `flytetune.train` builds them."""
    torch.manual_seed(0)
    model = factory().to(device)
    optimizer, scheduler = build_optimizer(model, FinetuneConfig(), total_steps=1000)
    return model, optimizer, scheduler


def step(model, optimizer, scheduler, device: torch.device) -> None:
    vocab = model.config.vocab_size
    batch = {"input_ids": torch.randint(0, vocab, (BATCH, SEQ)),
             "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
             "labels": torch.randint(0, LABELS, (BATCH,))}
    train_step(model, optimizer, scheduler, batch, device, FinetuneConfig().train.max_grad_norm)
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, factory, uri: str, repeats: int, device: torch.device) -> dict:
    model, optimizer, scheduler = build(factory, device)
    step(model, optimizer, scheduler, device)  # the optimizer state (Adam moments) exists from the first step
    progress = checkpoint.TrainingProgress()
    writer = checkpoint.CheckpointWriter(uri, keep=1)
    blocking, total = [], []
    try:
        for i in range(repeats):
            progress.global_step = i + 1
            started = time.perf_counter()
            snapshot = checkpoint.capture(model, optimizer, scheduler, None, progress, {"benchmark": name})
            captured = time.perf_counter()
            writer.save(snapshot)
            writer.wait()
            blocking.append(captured - started)
            total.append(time.perf_counter() - started)
    finally:
        writer.close()
    manifest = json.loads(storage.read_bytes(f"{checkpoint.latest(uri)}/{checkpoint.MANIFEST}"))
    size = sum(f["bytes"] for f in manifest["files"].values())
    del model, optimizer, scheduler

    started = time.perf_counter()
    model, optimizer, scheduler = build(factory, device)
    built = time.perf_counter()
    restored = checkpoint.load(checkpoint.latest(uri))
    checkpoint.restore_into(restored, model, optimizer, scheduler)
    loaded = time.perf_counter()
    step(model, optimizer, scheduler, device)
    done = time.perf_counter()
    return {"params": sum(p.numel() for p in model.parameters()), "checkpoint_mb": size / 1e6,
            "blocking": statistics.median(blocking), "total": statistics.median(total),
            "build": built - started, "load": loaded - built, "first_step": done - loaded, "restore": done - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uri", help="checkpoint prefix (default: a fresh local folder)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    models = {"all-MiniLM-L6-v2 (default)": default_backbone, "BERT-base-sized (random)": bert_base}
    results = {}
    with tempfile.TemporaryDirectory(prefix="flytetune-ckpt-bench-") as tmp:
        for i, (name, factory) in enumerate(models.items()):
            uri = f"{args.uri.rstrip('/')}/{i}" if args.uri else str(Path(tmp) / str(i))
            results[name] = measure(name, factory, uri, args.repeats, device)

    print(f"Checkpoint save/restore on {where}, destination {args.uri or 'local folder'}, "
          f"median of {args.repeats} saves")
    print(f"{'model':<28} {'params':>7} {'size':>8} {'save: blocking':>15} {'total':>7} {'total/blocking':>15} "
          f"{'restore to 1st step':>20} {'(build':>7} {'load':>6} {'step)':>6}")
    for name, r in results.items():
        print(f"{name:<28} {r['params'] / 1e6:>6.1f}M {r['checkpoint_mb']:>6.0f}MB {r['blocking']:>14.2f}s "
              f"{r['total']:>6.2f}s {r['total'] / r['blocking']:>14.1f}x {r['restore']:>19.2f}s "
              f"{r['build']:>6.2f}s {r['load']:>5.2f}s {r['first_step']:>5.2f}s")
    for name, r in results.items():
        fits = "fits" if r["total"] <= 10 else "does NOT fit"
        print(f"{name}: a full save takes {r['total']:.1f}s, {fits} the default 10 s SIGTERM budget; "
              f"the training loop stalls {r['blocking']:.2f}s per save, where a synchronous save would stall it "
              f"{r['total'] / r['blocking']:.1f}x longer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
