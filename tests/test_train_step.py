"""One optimizer step (flytetune.train.train_step) and the batch sizes around it: micro-batches
with accumulated gradients make the same step as the whole batch, and the global batch follows
train.per_device_batch_size where it is set."""

import copy

import pytest
import torch

from flytetune.batches import collate
from flytetune.config import ConfigError, load_config
from flytetune.objectives import build_classifier
from flytetune.store import FeatureStore
from flytetune.train import build_optimizer, global_batch_size, train_step
from tests.conftest import TINY_CONFIG


def test_micro_batches_make_the_same_step_as_the_whole_batch(prepared_tiny, tiny_backbone):
    store = FeatureStore(prepared_tiny / "train")
    batch = collate([store[i] for i in range(12)], pad_id=0)
    cfg = load_config(TINY_CONFIG, [f"model.backbone={tiny_backbone}"])
    torch.manual_seed(0)
    whole = build_classifier(cfg, [str(i) for i in range(int(store.labels().max()) + 1)]).eval()  # no dropout
    pieces = copy.deepcopy(whole)
    losses = {}
    for name, model, micro in (("whole", whole, 1), ("pieces", pieces, 5)):  # 12 rows: pieces of 3, 3, 2, 2, 2
        optimizer, scheduler = build_optimizer(model, cfg, total_steps=10)
        losses[name] = train_step(model, optimizer, scheduler, batch, torch.device("cpu"), 1.0, micro_batches=micro)
    torch.testing.assert_close(losses["pieces"], losses["whole"], rtol=1e-5, atol=1e-6)
    changed = 0
    for (name, a), (_, b) in zip(whole.named_parameters(), pieces.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        changed += 1
    assert changed > 10


def test_the_global_batch():
    def tcfg(*overrides):
        return load_config(TINY_CONFIG, list(overrides)).train

    assert global_batch_size(tcfg("train.batch_size=32"), 8) == 32, "global: 4 per GPU on 8 GPUs"
    per_device = tcfg("train.per_device_batch_size=32", "train.gradient_accumulation_steps=2")
    assert global_batch_size(per_device, 8) == 512 and global_batch_size(per_device, 1) == 64
    with pytest.raises(ConfigError, match=r"train.batch_size: 8 is smaller than the 4 process\(es\) times "
                                          r"train.gradient_accumulation_steps=4 sharing it"):
        global_batch_size(tcfg("train.batch_size=8", "train.gradient_accumulation_steps=4"), 4)


def test_a_compiled_model_trains_and_its_checkpoint_resumes_uncompiled(tmp_path, prepared_tiny, tiny_backbone):
    """torch.compile (on by default on CUDA only) on CPU: about a minute of compiling on 2 cores. Its
    checkpoints hold the plain module's weights, so a run can resume with compile on or off."""
    from flytetune import checkpoint
    from flytetune.train import fit

    base = [f"model.backbone={tiny_backbone}", "train.best_metric=null", "checkpoint.every_steps=2",
            "checkpoint.every_minutes=null"]
    compiled = fit(prepared_tiny, tmp_path / "a", load_config(TINY_CONFIG, [*base, "train.compile=true",
                                                                           "train.max_steps=2"]),
                   checkpoint_dir=str(tmp_path / "ckpt"))
    assert compiled.global_step == 2 and torch.isfinite(torch.tensor(compiled.history[-1]["val_loss"]))
    saved = checkpoint.load(str(tmp_path / "ckpt/step-000002")).model
    assert not any("_orig_mod" in key for key in saved), "keys of the plain module"
    resumed = fit(prepared_tiny, tmp_path / "b", load_config(TINY_CONFIG, [*base, "train.compile=false",
                                                                          "train.max_steps=4"]),
                  checkpoint_dir=str(tmp_path / "ckpt"))
    assert resumed.resumed_from.endswith("step-000002") and resumed.global_step == 4


def test_the_fp16_path_scales_steps_and_its_scaler_travels_in_the_checkpoint(prepared_tiny, tiny_backbone):
    """T4's path (fp16 autocast, gradient scaler), run on CPU: CI has no GPU."""
    from flytetune import checkpoint
    from flytetune.hardware import PRECISIONS

    store = FeatureStore(prepared_tiny / "train")
    batch = collate([store[i] for i in range(8)], pad_id=0)
    cfg = load_config(TINY_CONFIG, [f"model.backbone={tiny_backbone}"])
    torch.manual_seed(0)
    model = build_classifier(cfg, [str(i) for i in range(int(store.labels().max()) + 1)])
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, scheduler = build_optimizer(model, cfg, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    loss = train_step(model, optimizer, scheduler, batch, torch.device("cpu"), 1.0, PRECISIONS["fp16"], scaler,
                      micro_batches=2)
    assert torch.isfinite(loss) and scaler.get_scale() == 2.0**16, "no overflow: the step was taken"
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    scaler.update(1024.0)  # as after overflows
    snap = checkpoint.capture(model, optimizer, scheduler, scaler, checkpoint.TrainingProgress(global_step=1), {})
    fresh = torch.amp.GradScaler("cpu")
    restored = checkpoint.Restored(uri="mem", model=snap.model, optimizer=snap.optimizer, rng=snap.rng,
                                   state=snap.state)
    checkpoint.restore_into(restored, model, optimizer, scheduler, fresh)
    assert fresh.get_scale() == 1024.0
