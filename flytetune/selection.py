"""Which weights a run publishes: the best by a validation metric, not merely the last, and when to
stop early (`train.best_metric`, `train.early_stopping_patience`).

The best weights must survive a preemption like everything else: with a checkpoint prefix, a new
best is saved as a checkpoint (kept out of pruning) and read back at the end if later steps did
worse; without one they are held in host memory.
"""

import logging

import torch

from flytetune import checkpoint

log = logging.getLogger(__name__)

# Validation metrics a run can select by, and whether higher is better.
METRICS = {"val_accuracy": True, "val_macro_f1": True, "val_loss": False}


class BestModel:
    """Tracks the best evaluation in `progress` (it travels with checkpoints) and its weights."""

    def __init__(self, metric: str | None, patience: int | None, progress: checkpoint.TrainingProgress,
                 writer: checkpoint.CheckpointWriter | None, keep_weights: bool = True):
        """`keep_weights`: False on the processes that do not save the model (torchrun ranks above 0):
        they only track the metric, to stop early together."""
        self.metric, self.patience, self.progress, self.writer = metric, patience, progress, writer
        self.keep_weights = keep_weights
        self._in_memory: dict[str, torch.Tensor] | None = None
        if writer is not None:
            writer.protected_step = progress.best_step

    def update(self, record: dict, model: torch.nn.Module, save) -> bool:
        """Note an evaluation `record` (with `self.metric`); on a new best keep its weights (`save()`
        queues a checkpoint of the current state). True when it is a new best."""
        if self.metric is None:
            return False
        value, best = record[self.metric], self.progress.best_value
        better = best is None or (value > best if METRICS[self.metric] else value < best)
        if not better:
            self.progress.evals_since_best += 1
            return False
        self.progress.best_value, self.progress.best_step, self.progress.evals_since_best = value, record["step"], 0
        if self.writer is not None:
            self.writer.protected_step = record["step"]
            if self.writer.queued_step != record["step"]:
                save()
        elif self.keep_weights:
            self._in_memory = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    def should_stop(self) -> bool:
        return self.patience is not None and self.progress.evals_since_best >= self.patience

    def restore(self, model: torch.nn.Module, checkpoint_dir: str | None) -> int:
        """Load the best weights into `model` if they are not its current ones; return their step."""
        step, now = self.progress.best_step, self.progress.global_step
        if self.metric is None or step is None or step == now:
            return now
        if self._in_memory is not None:
            model.load_state_dict(self._in_memory)
        elif checkpoint_dir:
            # From an earlier attempt, or from this one: either way the durable copy.
            model.load_state_dict(checkpoint.load(f"{checkpoint_dir.rstrip('/')}/{checkpoint.step_name(step)}").model)
        else:
            log.warning("best %s was at step %d, but its weights are gone (no checkpoint prefix, and it was "
                        "before a restart): keeping the last weights", self.metric, step)
            return now
        log.info("keeping the weights of step %d: best %s %.4f (the last step, %d, did worse)", step, self.metric,
                 self.progress.best_value, now)
        return step
