"""Train on a prepared dataset: fine-tune a sequence classifier, or continue a backbone's MLM pretraining.

`fit` is the whole training run: setup, the epoch loop with validation each epoch, and saving a
model folder that `from_pretrained` loads. What differs between the two (`train.objective`) is in
flytetune/objectives.py; the loop, checkpoints and preemption handling are the same. Run as a module it
is the same pipeline the Flyte workflow runs, without Flyte:

    python -m flytetune.train --config configs/local.yaml [--dataset_uri URI] [--set train.epochs=1]
"""

import contextlib
import datetime as dt
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flytetune import checkpoint, distributed, hardware, objectives
from flytetune.artifacts import code_version
from flytetune.batches import EpochBatchSampler
from flytetune.config import ConfigError, FinetuneConfig
from flytetune.loader import batch_loader
from flytetune.preemption import GracefulStop, Preempted
from flytetune.prepare import load_meta
from flytetune.progress import Progress, count
from flytetune.selection import BestModel
from flytetune.storage import StorageError
from flytetune.store import FeatureStore

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    global_step: int
    epochs_completed: int
    history: list[dict] = field(default_factory=list)
    resumed_from: str | None = None
    initialised_from: str | None = None
    # The metrics stream, one record every `train.log_every_steps` steps and at the last step:
    # step, epoch, loss (mean over the steps since the previous record), lr, padding_share (of the
    # token slots fed), samples_per_s and tokens_per_s (non-pad tokens) over those steps, elapsed_s
    # (training seconds summed over attempts); on CUDA also gpu_max_mem_gib and, where NVML
    # answers, gpu_util_pct.
    steps: list[dict] = field(default_factory=list)
    # The timeline, each with "event", "step" and "time" (UTC, ISO 8601): start (total_steps), resume
    # (checkpoint), checkpoint (uri, seconds), preempted (signal), end.
    events: list[dict] = field(default_factory=list)
    total_steps: int = 0
    # The step whose weights were saved: the best by train.best_metric, else the last.
    best_step: int | None = None


STOP_CHECK_STEPS = 10


def _event(kind: str, step: int, **fields) -> dict:
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"event": kind, "step": step, "time": now, **fields}


class StepMetrics:
    """Loss and throughput over the steps since the last record; GPU memory and utilisation.

    Throughput is this process's samples and non-pad tokens (attention mask sums of the batches on
    the host, so no device synchronisation) times the world size: exact for samples, an estimate
    for tokens under torchrun.
    """

    def __init__(self, device: torch.device, world_size: int, elapsed_before_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.device, self.world_size, self.clock = device, world_size, clock
        self.started = self._window_start = clock()
        self.elapsed_before_s = elapsed_before_s
        self._steps = self._samples = self._tokens = self._slots = 0
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._ask_utilisation = device.type == "cuda"

    def add(self, batch: dict, loss: torch.Tensor) -> None:
        """`batch` as the loader gave it (on the host); `loss` stays on the device until `record`."""
        self._steps += 1
        self._samples += len(batch["labels"])
        self._tokens += int(batch["attention_mask"].sum())
        self._slots += batch["attention_mask"].numel()
        self._loss_sum += loss

    def skip(self, seconds: float) -> None:
        """Leave `seconds` (validation) out of the current window's rates."""
        self._window_start += seconds

    def elapsed_s(self) -> float:
        return self.elapsed_before_s + self.clock() - self.started

    def record(self, step: int, epoch: int, lr: float) -> dict:
        loss = float(self._loss_sum)  # waits for the device: the clock then covers the window's work
        now = self.clock()
        window_s = max(now - self._window_start, 1e-9)
        record = {"step": step, "epoch": epoch, "loss": round(loss / max(self._steps, 1), 6), "lr": lr,
                  "padding_share": round(1 - self._tokens / max(self._slots, 1), 4),
                  "samples_per_s": round(self._samples * self.world_size / window_s, 2),
                  "tokens_per_s": round(self._tokens * self.world_size / window_s, 1),
                  "elapsed_s": round(self.elapsed_before_s + now - self.started, 3), **self._gpu()}
        self._window_start, self._steps, self._samples, self._tokens, self._slots = now, 0, 0, 0, 0
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        return record

    def _gpu(self) -> dict:
        if self.device.type != "cuda":
            return {}
        # The caching allocator's counter: a host-side read, no synchronisation.
        out = {"gpu_max_mem_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)}
        if self._ask_utilisation:
            try:
                out["gpu_util_pct"] = int(torch.cuda.utilization(self.device))
            except Exception:  # noqa: BLE001 - no pynvml, no driver access: leave it out from now on
                self._ask_utilisation = False
        return out


def describe(record: dict) -> str:
    """A metrics record as the tail of the progress line."""
    text = (f"loss {record['loss']:.4f}, lr {record['lr']:.2e}, {count(record['samples_per_s'])} samples/s, "
            f"{count(record['tokens_per_s'])} tokens/s")
    if "gpu_max_mem_gib" in record:
        text += f", GPU mem {record['gpu_max_mem_gib']:.1f} GiB"
    if "gpu_util_pct" in record:
        text += f", GPU {record['gpu_util_pct']}%"
    return text


class Updates:
    """Calls `callback` with a snapshot of the result at most every `every_s` seconds (`due`) and when
    told (`now`). A failing callback is logged (the traceback once) and training goes on."""

    def __init__(self, callback: Callable[[TrainResult], None] | None, snapshot: Callable[[], TrainResult],
                 every_s: float, clock: Callable[[], float] = time.monotonic):
        self.callback, self.snapshot, self.every_s, self.clock = callback, snapshot, every_s, clock
        self._last = clock()
        self._failed = False

    def due(self) -> None:
        if self.callback is not None and self.clock() - self._last >= self.every_s:
            self.now()

    def now(self) -> None:
        if self.callback is None:
            return
        self._last = self.clock()
        try:
            self.callback(self.snapshot())
        except Exception as e:  # noqa: BLE001 - a live report must never stop training
            log.warning("on_update failed, training goes on: %s: %s", type(e).__name__, e, exc_info=not self._failed)
            self._failed = True


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible GEMMs; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def check_init_from(init_from: Path, tokenizer, backbone: str) -> None:
    """Fail unless `init_from` is a model folder whose tokenizer has the vocabulary of `tokenizer`,
    the one `backbone` prepared the data with: other token ids would silently mean other words."""
    from transformers import AutoTokenizer

    if not (init_from / "config.json").is_file():
        raise ConfigError(f"init_from: {init_from} has no config.json; not a model folder")
    theirs, ours = AutoTokenizer.from_pretrained(init_from, local_files_only=True).get_vocab(), tokenizer.get_vocab()
    if theirs != ours:
        raise ConfigError(
            f"init_from: {init_from} uses a different tokenizer (vocabulary of {len(theirs)} tokens) than "
            f"model.backbone {backbone!r} ({len(ours)} tokens) that prepared the data; prepare the data with "
            f"model.backbone={init_from} or train from the backbone"
        )


def build_optimizer(model: torch.nn.Module, cfg: FinetuneConfig, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    # Biases and LayerNorm weights are not decayed (standard BERT fine-tuning recipe).
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.train.learning_rate,
        # One kernel for all parameters instead of several per tensor (CPU too: 15% more samples/s on
        # 2 cores for MiniLM-L6, benchmarks/train_throughput.py).
        fused=True,
    )
    warmup_steps = int(cfg.train.warmup_fraction * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    return optimizer, scheduler


def compat_fields(cfg: FinetuneConfig, meta: dict, objective) -> dict:
    """What a checkpoint must agree with to be resumed into this run."""
    return {"model.backbone": cfg.model.backbone, "labels": meta["labels"], "data.max_length": cfg.data.max_length,
            **objective.compat()}


def fit(prepared_dir: Path, output_dir: Path, cfg: FinetuneConfig, *, checkpoint_dir: str | None = None,
        resume_from: str | None = None, init_from: Path | None = None,
        on_update: Callable[[TrainResult], None] | None = None, update_every_minutes: float = 5.0) -> TrainResult:
    """Train on `prepared_dir` and write the model folder to `output_dir`.

    Progress (steps, steps/s, ETA, loss, learning rate, samples/s, tokens/s) is a live line on a
    terminal; in logs it is a line every `train.log_every_steps` steps but at most one per
    `train.log_min_gap_s` seconds, at least one per progress.LOG_INTERVAL_S seconds, then a
    summary. The result carries the metrics stream and the timeline (`TrainResult.steps`,
    `.events`), also while the run goes: `on_update`, if given, gets a snapshot of the result on rank 0 every
    `update_every_minutes` minutes of wall time, at each epoch end and when preempted; its errors
    are logged, never raised.

    `init_from` (a local folder of a published model) replaces the backbone's weights as the
    starting point (warm start); its tokenizer must have the vocabulary the data was prepared with
    (ConfigError), and where its labels differ its head rows are kept by label name (`objectives.build_classifier`).
    A checkpoint to resume from, as below, still overrides those weights.

    `checkpoint_dir` is this run's durable checkpoint prefix, shared by all its attempts: if it
    holds a complete checkpoint, training continues from the newest one that loads (automatic
    resume; see `choose_start`), even when `resume_from` is given. Otherwise `resume_from` (a step
    folder URI) is the starting point, if given. On SIGTERM the
    loop stops after the current step, saves if the save fits the budget, and raises Preempted.
    """
    from transformers import AutoTokenizer

    prepared_dir, output_dir = Path(prepared_dir), Path(output_dir)
    meta = load_meta(prepared_dir)
    tcfg, ccfg = cfg.train, cfg.checkpoint
    world = distributed.init()
    global_batch = global_batch_size(tcfg, world.size)
    seed_everything(tcfg.seed, tcfg.deterministic)
    device = distributed.device(world)
    hardware.configure(device)
    precision = hardware.choose_precision(tcfg.precision, device)
    # fp16 gradients underflow without loss scaling; its state is part of a checkpoint.
    scaler = torch.amp.GradScaler(device.type) if precision.scaled else None
    tokenizer = AutoTokenizer.from_pretrained(prepared_dir / "tokenizer", local_files_only=True)
    if init_from is not None:
        init_from = Path(init_from)
        check_init_from(init_from, tokenizer, meta["tokenizer"])
        log.info("warm start from %s", init_from)
    objective = objectives.for_run(cfg, tokenizer, meta["labels"])
    model = objective.build_model(cfg, init_from).to(device)
    train_store = FeatureStore(prepared_dir / "train")
    val_store = FeatureStore(prepared_dir / "validation")

    steps_per_epoch = EpochBatchSampler(len(train_store), global_batch, 0, 0,
                                        world_size=world.size).batches_per_epoch()
    total_steps = tcfg.epochs * steps_per_epoch
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    progress = checkpoint.TrainingProgress(sampler_seed=tcfg.seed)

    # Rank 0 decides (loading it); every rank then loads the same checkpoint, or raises rank 0's error.
    source, restored, error = None, None, None
    if world.is_main:
        try:
            source, restored = choose_start(checkpoint_dir, resume_from)
        except (checkpoint.CheckpointError, StorageError) as e:
            error = e
    source, message = distributed.from_main(world, (source, str(error) if error else None))
    if error is not None:
        raise error
    if message is not None:
        raise checkpoint.CheckpointError(message)
    if source:
        restored = restored or checkpoint.load(source)
        checkpoint.check_compatible(restored, compat_fields(cfg, meta, objective))
        progress = checkpoint.restore_into(restored, model, optimizer, scheduler, scaler)
        log.info("resuming from checkpoint %s at step %d (epoch %d, batch %d)",
                 source, progress.global_step, progress.epoch, progress.batch_in_epoch)
        progress.events.append(_event("resume", progress.global_step, checkpoint=source))
    else:
        progress.events.append(_event("start", 0, total_steps=total_steps))
    log.info("training %s on %s: %d examples, %d steps (%d per epoch) of %d examples (%d per process in %d "
             "micro-batch(es)), device %s, %s, %d CPU threads", cfg.model.backbone, prepared_dir, len(train_store),
             total_steps, steps_per_epoch, global_batch, global_batch // world.size, tcfg.gradient_accumulation_steps,
             device, precision.name, torch.get_num_threads())

    def saved(step: int, uri: str, seconds: float) -> None:  # in the writer's thread
        progress.events.append(_event("checkpoint", step, uri=uri, seconds=round(seconds, 2)))

    writer = (checkpoint.CheckpointWriter(checkpoint_dir, keep=ccfg.keep, on_saved=saved)
              if checkpoint_dir and world.is_main else None)
    train_model = distributed.wrap(objective.for_training(model), world)
    if tcfg.compile if tcfg.compile is not None else device.type == "cuda":
        # dynamic: batches are padded to their own longest example, so shapes vary from step to step.
        train_model = torch.compile(train_model, dynamic=True)
    extra = {"compat": compat_fields(cfg, meta, objective), "config": cfg.to_dict(), "code_version": code_version()}
    metrics = StepMetrics(device, world.size, progress.elapsed_s)

    def snapshot() -> checkpoint.Snapshot:
        if writer:
            # The save waits for the previous one anyway; waiting first puts its event in this checkpoint.
            writer.wait()
        progress.elapsed_s = metrics.elapsed_s()
        settle_loss()
        return checkpoint.capture(model, optimizer, scheduler, scaler, progress, extra)

    def result() -> TrainResult:
        return TrainResult(global_step=progress.global_step,
                           epochs_completed=sum(1 for r in progress.history if r.get("epoch_end", True)),
                           history=list(progress.history), resumed_from=source,
                           initialised_from=str(init_from) if init_from else None,
                           steps=list(progress.steps), events=list(progress.events), total_steps=total_steps)

    updates = Updates(on_update if world.is_main else None, result, update_every_minutes * 60)
    reporter = Progress(f"epoch {progress.epoch}", total_steps, unit="steps", count_format="step {done}/{total}",
                        done=progress.global_step, logger=log, show=world.is_main,
                        min_report_gap_s=tcfg.log_min_gap_s)
    lengths = train_store.lengths() if tcfg.group_by_length else None
    # The epoch's loss is summed on the device and read (a host synchronisation) only when needed:
    # at a metrics record, a checkpoint and the epoch's end. float64: exact sums of float32 losses.
    pending_loss = torch.zeros((), dtype=torch.float64, device=device)

    def settle_loss() -> None:
        nonlocal pending_loss
        progress.epoch_loss_sum += float(pending_loss)
        pending_loss = torch.zeros((), dtype=torch.float64, device=device)

    best = BestModel(tcfg.best_metric, tcfg.early_stopping_patience, progress, writer, keep_weights=world.is_main)

    def evaluate(epoch_end: bool, started: float) -> None:
        """Validate, record it in the history, and keep the weights if they are the best so far."""
        settle_loss()
        validation_started = time.monotonic()
        val = objective.validate(model, val_store, tcfg.eval_batch_size, tokenizer.pad_token_id, world,
                                 precision.autocast)
        metrics.skip(time.monotonic() - validation_started)
        record = {"epoch": progress.epoch, "step": progress.global_step, "epoch_end": epoch_end,
                  "train_loss": progress.epoch_loss_sum / max(progress.epoch_batches, 1),
                  **{f"val_{name}": value for name, value in val.items()},
                  "epoch_s": round(time.monotonic() - started, 2)}
        progress.history.append(record)
        if progress.best_val_accuracy is None or val["accuracy"] > progress.best_val_accuracy:
            progress.best_val_accuracy = val["accuracy"]
        new_best = best.update(record, model, lambda: writer.save(snapshot()))
        reporter.clear()
        log.info("epoch %d %s: train_loss %.4f %s%s", progress.epoch,
                 "done" if epoch_end else f"step {progress.global_step}", record["train_loss"],
                 " ".join(f"val_{name} {value:.4f}" for name, value in val.items()),
                 f" (best {tcfg.best_metric} so far)" if new_best else "")

    last_save = time.monotonic()
    try:
        with GracefulStop() as stop:
            while progress.global_step < total_steps:
                reporter.label = f"epoch {progress.epoch}"
                sampler = EpochBatchSampler(len(train_store), global_batch, progress.sampler_seed,
                                            progress.epoch, start_batch=progress.batch_in_epoch,
                                            rank=world.rank, world_size=world.size, lengths=lengths)
                # Whole batches read in bulk (one lmdb transaction each), by workers when configured.
                loader = batch_loader(
                    train_store, sampler, tokenizer.pad_token_id, num_workers=tcfg.num_workers,
                    # Page-locked batches: the copy to the GPU (non_blocking) overlaps the previous step.
                    pin_memory=device.type == "cuda",
                    # Its own generator: the loader's base seed must not draw from the global RNG,
                    # or a resumed run's dropout masks would differ from the uninterrupted run's.
                    generator=torch.Generator().manual_seed(progress.sampler_seed + progress.epoch),
                )
                model.train()
                epoch_started = time.monotonic()
                for batch in loader:
                    batch = objective.inputs(batch, progress.global_step, world.rank)
                    loss = train_step(train_model, optimizer, scheduler, batch, device, tcfg.max_grad_norm,
                                      precision, scaler, tcfg.gradient_accumulation_steps)
                    progress.global_step += 1
                    progress.batch_in_epoch += 1
                    pending_loss += loss
                    progress.epoch_batches += 1
                    metrics.add(batch, loss)
                    # A record is also a progress line in logs (`epoch 0 step 40/264 (15%), ...`).
                    record_due = (progress.global_step % tcfg.log_every_steps == 0
                                  or progress.global_step >= total_steps)
                    if record_due:
                        step_record = metrics.record(progress.global_step, progress.epoch, scheduler.get_last_lr()[0])
                        progress.steps.append(step_record)
                        reporter.detail = describe(step_record)
                    reporter.advance(report=record_due)
                    updates.due()
                    # Under torchrun agreeing on a stop is an all-reduce and a host synchronisation:
                    # every STOP_CHECK_STEPS steps (a fraction of a second of a grace period).
                    if ((not world.enabled or progress.global_step % STOP_CHECK_STEPS == 0)
                            and distributed.any_rank(world, stop.requested)):
                        progress.events.append(_event("preempted", progress.global_step, signal="SIGTERM"))
                        preempted = stop_gracefully(writer, snapshot, progress.global_step, ccfg.sigterm_budget_s)
                        updates.now()  # after the save: the checkpoint comes first within the grace period
                        raise preempted
                    if progress.global_step >= total_steps:
                        break
                    if (tcfg.eval_every_steps and progress.global_step % tcfg.eval_every_steps == 0
                            and progress.batch_in_epoch < steps_per_epoch):  # the epoch's end validates anyway
                        evaluate(epoch_end=False, started=epoch_started)
                        if best.should_stop():
                            break
                    if (writer and writer.queued_step != progress.global_step
                            and _save_due(ccfg, progress.global_step, time.monotonic() - last_save)):
                        writer.save(snapshot())
                        last_save = time.monotonic()
                if best.should_stop():
                    break
                evaluate(epoch_end=True, started=epoch_started)
                progress.epoch += 1
                progress.batch_in_epoch = 0
                progress.epoch_loss_sum, progress.epoch_batches = 0.0, 0
                updates.now()
                if best.should_stop():
                    break
            if best.should_stop():
                log.info("early stop at step %d: no better %s in %d evaluations (best %.4f at step %d)",
                         progress.global_step, tcfg.best_metric, progress.evals_since_best, progress.best_value,
                         progress.best_step)
        if writer:
            # The end state too: a finished run can be continued by hand with more steps.
            if writer.queued_step != progress.global_step:
                writer.save(snapshot())
            writer.wait()
        progress.elapsed_s = metrics.elapsed_s()
        progress.events.append(_event("end", progress.global_step))
    finally:
        reporter.close()
        if writer:
            writer.close()

    trained = result()
    if world.is_main:
        trained.best_step = best.restore(model, checkpoint_dir)
        objective.save(model, tokenizer, output_dir, cfg, {
            "global_step": trained.global_step, "epochs_completed": trained.epochs_completed,
            "history": trained.history, "init_from": trained.initialised_from, "steps": trained.steps,
            "events": trained.events, "best_step": trained.best_step, "best_metric": cfg.train.best_metric,
            "objective": objective.name})
    return trained


def choose_start(checkpoint_dir: str | None, resume_from: str | None
                 ) -> tuple[str | None, "checkpoint.Restored | None"]:
    """Where training starts: the newest of the run's own checkpoints that loads, else `resume_from`.

    The run's own progress wins over `resume_from`, so a retry continues rather than restarts (logged).
    A checkpoint of the run that fails to load (checksum, size, unreadable file, storage error) is
    skipped with a warning naming it and the reason, and the next older one is tried: under Flyte
    every retry would otherwise hit the same broken folder. If none loads, CheckpointError. A failing
    `resume_from` fails (one line): it was named explicitly.
    """
    own = checkpoint.complete_checkpoints(checkpoint_dir) if checkpoint_dir else {}
    failed = []
    for step in sorted(own, reverse=True):
        try:
            restored = checkpoint.load(own[step])
        except (checkpoint.CheckpointError, StorageError) as e:
            log.warning("skipping checkpoint %s, it does not load: %s", own[step], e)
            failed.append(checkpoint.step_name(step))
            continue
        if failed:
            log.warning("resuming from %s, the newest checkpoint that loads (skipped %s)", own[step], ", ".join(failed))
        if resume_from and resume_from.rstrip("/") != own[step]:
            log.info("run %s has its own checkpoint %s; continuing it instead of --from_checkpoint %s",
                     checkpoint_dir.rstrip("/").rpartition("/")[2], checkpoint.step_name(step), resume_from)
        return own[step], restored
    if failed and not resume_from:
        raise checkpoint.CheckpointError(f"{checkpoint_dir}: none of the run's checkpoints loads ({', '.join(failed)});"
                                         " see the warnings above")
    return (resume_from, checkpoint.load(resume_from)) if resume_from else (None, None)


def _save_due(ccfg, step: int, since_last_s: float) -> bool:
    by_steps = ccfg.every_steps is not None and step % ccfg.every_steps == 0
    by_time = ccfg.every_minutes is not None and since_last_s >= ccfg.every_minutes * 60
    return by_steps or by_time


def stop_gracefully(writer, snapshot, step: int, budget_s: float) -> Preempted:
    """Save a final checkpoint if it fits the SIGTERM budget; return the exception that ends the attempt."""
    if writer is None:
        return Preempted(step, None)
    writer.wait()  # an in-flight periodic save is the fallback; let it land first
    estimate = writer.last_save_s
    if writer.last_step == step:
        return Preempted(step, writer.last_uri)
    if estimate is not None and estimate > budget_s:
        log.warning("not saving on SIGTERM: the last save took %.1fs, over the %.1fs budget", estimate, budget_s)
        return Preempted(step, writer.last_uri)
    # With no measurement yet, try: the alternative is losing everything since the start.
    return Preempted(step, writer.save_now(snapshot()))


def global_batch_size(tcfg, world_size: int) -> int:
    """Examples per optimizer step over all processes (train.batch_size, or per_device_batch_size x
    processes x gradient_accumulation_steps); each process must get at least one per micro-batch."""
    if tcfg.per_device_batch_size is not None:
        return tcfg.per_device_batch_size * world_size * tcfg.gradient_accumulation_steps
    if tcfg.batch_size < world_size * tcfg.gradient_accumulation_steps:
        raise ConfigError(f"train.batch_size: {tcfg.batch_size} is smaller than the {world_size} process(es) times "
                          f"train.gradient_accumulation_steps={tcfg.gradient_accumulation_steps} sharing it")
    return tcfg.batch_size


def train_step(model, optimizer, scheduler, batch: dict, device: torch.device, max_grad_norm: float,
               precision: hardware.Precision = hardware.PRECISIONS["fp32"], scaler=None,
               micro_batches: int = 1) -> torch.Tensor:
    """One optimizer step on `batch`, run in `micro_batches` pieces whose gradients add up to the whole
    batch's (each loss weighted by its share of the examples). Returns the batch's mean loss as a
    detached tensor on the device: reading it waits for the step."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    total = len(batch["labels"])
    split = {k: torch.tensor_split(v, min(micro_batches, total)) for k, v in batch.items()}
    pieces = [{k: parts[i] for k, parts in split.items()} for i in range(min(micro_batches, total))]
    loss = torch.zeros((), device=device)
    for i, piece in enumerate(pieces):
        # DDP reduces gradients on the last piece only.
        quiet = model.no_sync() if i < len(pieces) - 1 and hasattr(model, "no_sync") else contextlib.nullcontext()
        with quiet:
            with torch.autocast(device.type, dtype=precision.autocast, enabled=precision.autocast is not None):
                piece_loss = model(**piece).loss * (len(piece["labels"]) / total)
            (scaler.scale(piece_loss) if scaler is not None else piece_loss).backward()
        loss += piece_loss.detach().float()
    if scaler is None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    else:
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def main(argv: list[str] | None = None) -> int:
    from flytetune.pipeline import main as pipeline_main

    return pipeline_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
