"""The published weights are the best validated ones (flytetune/selection.py): tracked across
evaluations, kept in a checkpoint that pruning leaves alone (so a restart still has them), and
early stopping after `train.early_stopping_patience` evaluations without a new best."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flytetune import checkpoint
from flytetune.config import ConfigError, load_config
from flytetune.selection import BestModel
from flytetune.train import fit
from tests.conftest import TINY_CONFIG


def small_model(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, value)
    return model


def snapshot_of(model, progress) -> checkpoint.Snapshot:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return checkpoint.capture(model, optimizer, scheduler, None, progress, {})


@pytest.mark.parametrize("durable", [False, True], ids=["in memory", "in a checkpoint"])
def test_the_best_weights_come_back_after_worse_steps(tmp_path, durable):
    progress = checkpoint.TrainingProgress()
    writer = checkpoint.CheckpointWriter(str(tmp_path / "ckpt"), keep=1) if durable else None
    best = BestModel("val_macro_f1", 2, progress, writer)
    model = small_model(0.0)
    scores = {2: 0.50, 4: 0.70, 6: 0.60, 8: 0.65}  # step: validation macro-F1
    for step, score in scores.items():
        progress.global_step = step
        torch.nn.init.constant_(model.weight, float(step))  # weights that say which step they are from
        improved = best.update({"step": step, "val_macro_f1": score}, model,
                               lambda: writer.save(snapshot_of(model, progress)))
        assert improved == (step in (2, 4))
        if writer and step % 4 == 0:  # periodic saves: with keep=1 the best must survive them
            writer.save(snapshot_of(model, progress))
    assert (progress.best_step, progress.best_value, progress.evals_since_best) == (4, 0.70, 2)
    assert best.should_stop(), "two evaluations without a new best: patience 2"
    if writer:
        writer.close()
        assert sorted(checkpoint.complete_checkpoints(str(tmp_path / "ckpt"))) == [4, 8], "best kept, newest kept"
        best = BestModel("val_macro_f1", 2, progress, None)  # a new process: nothing in memory
    assert best.restore(model, str(tmp_path / "ckpt")) == 4
    assert torch.equal(model.weight, torch.full((2, 2), 4.0))


def test_lower_is_better_for_the_loss_and_none_keeps_the_last():
    progress = checkpoint.TrainingProgress()
    best = BestModel("val_loss", None, progress, None)
    for step, loss in ((1, 2.0), (2, 1.5), (3, 1.7)):
        progress.global_step = step
        best.update({"step": step, "val_loss": loss}, small_model(step), lambda: None)
    assert progress.best_step == 2 and not best.should_stop()
    last = BestModel(None, None, checkpoint.TrainingProgress(global_step=3), None)
    assert not last.update({"step": 3, "val_loss": 9.9}, small_model(3), lambda: None)
    assert last.restore(small_model(3), None) == 3


def test_fit_stops_early_and_publishes_the_best_checkpoint(tmp_path, prepared_tiny, tiny_backbone):
    """A learning rate so small that predictions never change: the first evaluation stays the best,
    the second is no better, and patience 1 stops the run there."""
    cfg = load_config(TINY_CONFIG, [f"model.backbone={tiny_backbone}", "train.learning_rate=1e-12",
                                    "train.eval_every_steps=1", "train.best_metric=val_accuracy",
                                    "train.early_stopping_patience=1", "checkpoint.every_steps=100",
                                    "checkpoint.every_minutes=null", "checkpoint.keep=1"])
    result = fit(prepared_tiny, tmp_path / "model", cfg, checkpoint_dir=str(tmp_path / "ckpt"))
    assert result.global_step == 2 and [r["step"] for r in result.history] == [1, 2]
    assert [r["epoch_end"] for r in result.history] == [False, False] and result.epochs_completed == 0
    assert result.best_step == 1
    saved = json.loads((tmp_path / "model/train_history.json").read_text())
    assert saved["best_step"] == 1 and saved["best_metric"] == "val_accuracy"
    # The best step's checkpoint survived keep=1, and its weights are the published ones.
    assert sorted(checkpoint.complete_checkpoints(str(tmp_path / "ckpt"))) == [1, 2]
    best = checkpoint.load(str(tmp_path / "ckpt/step-000001")).model
    published = load_file(str(tmp_path / "model/model.safetensors"))
    assert all(torch.equal(published[k], best[k]) for k in published)
    final = checkpoint.load(str(tmp_path / "ckpt/step-000002")).model
    assert any(not torch.equal(final[k], best[k]) for k in published), "the last step's weights differ"


def test_selection_options_are_checked():
    with pytest.raises(ConfigError, match="train.best_metric: must be val_accuracy, val_macro_f1, val_loss or null"):
        load_config(TINY_CONFIG, ["train.best_metric=accuracy"])
    with pytest.raises(ConfigError, match="train.early_stopping_patience: needs train.best_metric"):
        load_config(TINY_CONFIG, ["train.best_metric=null", "train.early_stopping_patience=2"])
