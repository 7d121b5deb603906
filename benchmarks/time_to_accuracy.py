"""Time to a target validation accuracy on the bundled sample: our defaults against the HF Trainer's.

Conditions: this machine's device (CUDA when present, else CPU); the bundled sample
(flytetune/sample/transactions.parquet, the dataset of `make run`) prepared once with
configs/local.yaml (max_length 48, split seed 13), so both contenders train on the identical token
ids of the prepared train split, are validated after every epoch on its validation split and
tested on its test split; same backbone (model.backbone of the config, the packaged MiniLM-L6),
same initial weights (`flytetune.objectives.build_classifier` after the same seed), same batch size, same
number of epochs.

  flytetune  `flytetune.train.fit` with configs/local.yaml as it is (its learning rate, warm-up,
             weight decay, length grouping and precision), checkpoint.uri=null.
  Trainer    `transformers.Trainer` with its defaults (learning rate 5e-5, no warm-up, no weight
             decay, random order, fp32), DataCollatorWithPadding, per_device_train_batch_size =
             train.batch_size, eval_strategy="epoch"; per_device_eval_batch_size =
             train.eval_batch_size so that validating costs both the same; no saving, report_to none.

    python benchmarks/time_to_accuracy.py [--target 0.9] [--epochs N] [--max-rows N] [--config configs/local.yaml]

Time is training wall time from the start of the first epoch, validation after each epoch
included: flytetune's per-epoch `epoch_s` from TrainResult.history summed; the Trainer's from a
callback at the first on_epoch_begin to each on_evaluate. Model loading and data preparation are
not timed. Time to target is the time at the end of the first epoch whose validation accuracy
reaches --target (accuracy is only known at epoch ends). Final test accuracy is the last epoch's
model on the test split, scored by the same code for both (`flytetune.evaluate.predict_logits`).
--max-rows (data.max_rows, a stratified subsample) and --epochs make a quick check.
"""

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    REPO,
    build_classifier,
    conditions,
    free_memory,
    pick_device,
    quiet_transformers,
    require_accelerate,
    sync,
    trainer_rows,
    training_args,
    without_printer,
)


def test_accuracy(model, prepared: Path, cfg, pad_id: int) -> float:
    from flytetune.evaluate import predict_logits
    from flytetune.store import FeatureStore

    store = FeatureStore(prepared / "test")
    logits = predict_logits(model, store, cfg.train.eval_batch_size, pad_id)
    return float((logits.argmax(axis=1) == store.labels()).mean())


def run_flytetune(prepared: Path, cfg, out: Path) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flytetune.train import fit

    result = fit(prepared, out, cfg)
    elapsed, epochs = 0.0, []
    for record in result.history:
        elapsed += record["epoch_s"]
        epochs.append({"epoch": record["epoch"] + 1, "step": record["step"], "seconds": elapsed,
                       "val_accuracy": record["val_accuracy"]})
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).to(pick_device())
    test = test_accuracy(model, prepared, cfg, tokenizer.pad_token_id)
    del model
    free_memory()
    return {"epochs": epochs, "test_accuracy": test}


def run_trainer(prepared: Path, cfg, labels: list[str], device: torch.device, out: Path) -> dict:
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainerCallback

    epochs, started = [], {}

    class Clock(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            if "t" not in started:
                sync(device)
                started["t"] = time.perf_counter()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            sync(device)
            epochs.append({"epoch": round(state.epoch), "step": state.global_step,
                           "seconds": time.perf_counter() - started["t"],
                           "val_accuracy": float(metrics["eval_accuracy"])})

    def accuracy(prediction) -> dict:
        return {"accuracy": float((np.asarray(prediction.predictions).argmax(-1) == prediction.label_ids).mean())}

    tokenizer = AutoTokenizer.from_pretrained(prepared / "tokenizer", local_files_only=True)
    args = training_args(out, per_device_train_batch_size=cfg.train.batch_size,
                         per_device_eval_batch_size=cfg.train.eval_batch_size, num_train_epochs=cfg.train.epochs,
                         eval_strategy="epoch", seed=cfg.train.seed)
    model = build_classifier(cfg, labels, device)
    trainer = Trainer(model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer),
                      train_dataset=trainer_rows(prepared / "train"),
                      eval_dataset=trainer_rows(prepared / "validation"), processing_class=tokenizer,
                      compute_metrics=accuracy, callbacks=[Clock()])
    without_printer(trainer)
    trainer.train()
    test = test_accuracy(trainer.model, prepared, cfg, tokenizer.pad_token_id)
    del trainer, model
    free_memory()
    return {"epochs": epochs, "test_accuracy": test,
            "recipe": f"lr {args.learning_rate:g}, warm-up steps {args.warmup_steps}, weight decay "
                      f"{args.weight_decay:g}, optim {getattr(args.optim, 'value', args.optim)}, "
                      f"{'bf16' if args.bf16 else 'fp32'}"}


def time_to(result: dict, target: float) -> dict | None:
    return next((e for e in result["epochs"] if e["val_accuracy"] >= target), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=0.9, help="validation accuracy to reach (default 0.9)")
    parser.add_argument("--epochs", type=int, help="epochs for both (default: the config's train.epochs)")
    parser.add_argument("--max-rows", type=int, help="a stratified subsample of the sample (data.max_rows)")
    parser.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    args = parser.parse_args()
    require_accelerate()
    quiet_transformers()
    warnings.filterwarnings("ignore", message=".*pin_memory.*")

    from flytetune.config import load_config
    from flytetune.data import SAMPLE_DATASET, copy_dataset
    from flytetune.prepare import prepare

    overrides = ["checkpoint.uri=null"]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_rows is not None:
        overrides.append(f"data.max_rows={args.max_rows}")
    cfg = load_config(args.config, overrides)
    device = pick_device()
    where = conditions(device)  # before fit, which sets the CPU thread count for the rest of the process
    with tempfile.TemporaryDirectory(prefix="flytetune-tta-") as name:
        tmp = Path(name)
        copy_dataset(str(SAMPLE_DATASET), tmp / "raw")
        meta = prepare(tmp / "raw", tmp / "prepared", cfg)
        # The Trainer first: fit sets process-wide switches (TF32 on CUDA, CPU threads from the cgroup quota).
        results = {"HF Trainer defaults": run_trainer(tmp / "prepared", cfg, meta["labels"], device, tmp / "hf"),
                   "flytetune (local.yaml)": run_flytetune(tmp / "prepared", cfg, tmp / "ours")}

    t = cfg.train
    print(f"Time to validation accuracy {args.target:.2f} on {where}")
    rows = "/".join(str(meta["rows"][split]) for split in ("train", "validation", "test"))
    print(f"bundled sample: {rows} rows (train/validation/test), {len(meta['labels'])} classes, max_length "
          f"{cfg.data.max_length}; backbone {cfg.model.backbone}, batch {t.batch_size}, {t.epochs} epoch(s)")
    print(f"flytetune: lr {t.learning_rate:g}, warm-up fraction {t.warmup_fraction:g}, weight decay "
          f"{t.weight_decay:g}, length grouping {getattr(t, 'group_by_length', 'n/a')}, "
          f"precision {getattr(t, 'precision', 'fp32')}; "
          f"Trainer: {results['HF Trainer defaults']['recipe']}")
    print(f"{'contender':<24} {'epoch':>5} {'step':>6} {'seconds':>8} {'val accuracy':>13}")
    for name, r in results.items():
        for e in r["epochs"]:
            print(f"{name:<24} {e['epoch']:>5} {e['step']:>6} {e['seconds']:>8.1f} {e['val_accuracy']:>13.4f}")
    print(f"{'contender':<24} {'time to target':>15} {'final val acc':>14} {'test accuracy':>14} {'total s':>8}")
    for name, r in results.items():
        hit = time_to(r, args.target)
        reached = f"{hit['seconds']:.1f}s (ep {hit['epoch']})" if hit else "not reached"
        final = r["epochs"][-1]
        print(f"{name:<24} {reached:>15} {final['val_accuracy']:>14.4f} {r['test_accuracy']:>14.4f} "
              f"{final['seconds']:>8.1f}")
    ours, theirs = results["flytetune (local.yaml)"], results["HF Trainer defaults"]
    ours_hit, theirs_hit = time_to(ours, args.target), time_to(theirs, args.target)
    if ours_hit and theirs_hit:
        print(f"time to {args.target:.2f}: the Trainer with its defaults takes "
              f"{theirs_hit['seconds'] / ours_hit['seconds']:.2f}x flytetune's time")
    elif ours_hit:
        print(f"time to {args.target:.2f}: the Trainer with its defaults did not reach it in "
              f"{theirs['epochs'][-1]['seconds']:.1f}s ({t.epochs} epochs), over "
              f"{theirs['epochs'][-1]['seconds'] / ours_hit['seconds']:.2f}x flytetune's {ours_hit['seconds']:.1f}s")
    elif theirs_hit:
        print(f"time to {args.target:.2f}: flytetune did not reach it in {ours['epochs'][-1]['seconds']:.1f}s; "
              f"the Trainer with its defaults did in {theirs_hit['seconds']:.1f}s")
    else:
        print(f"time to {args.target:.2f}: neither reached it in {t.epochs} epoch(s)")
    print(f"test accuracy: flytetune {ours['test_accuracy']:.4f}, Trainer defaults {theirs['test_accuracy']:.4f} "
          f"({ours['test_accuracy'] - theirs['test_accuracy']:+.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
