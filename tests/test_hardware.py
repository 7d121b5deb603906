"""Fast paths chosen from the hardware (flytetune/hardware.py), and that they change speed, not results:
CPU threads from cgroup files as a container runtime writes them, the precision each device gets,
losses and gradients that do not depend on how much padding a batch carries, and bf16 autocast
training on CPU to the accuracy of fp32."""

import pytest
import torch

from flytetune import cpus, hardware
from flytetune.batches import collate
from flytetune.config import ConfigError, load_config
from flytetune.objectives import build_classifier
from flytetune.store import FeatureStore
from flytetune.train import fit
from tests.conftest import TINY_CONFIG


def cgroup(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "250000 100000\n"}, 2.5),  # cgroup v2, `resources.limits.cpu: 2500m`
    ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.5),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
    ({}, None),  # no cgroup files at all (macOS, a bare machine)
])
def test_cpu_quota_from_cgroup_files(tmp_path, files, quota):
    assert cpus.cpu_quota(cgroup(tmp_path, files)) == quota


def test_cpu_threads_follow_the_pods_limit_not_the_nodes_cores(tmp_path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(96)))  # a 96-core node
    assert cpus.cpu_threads(cgroup(tmp_path / "a", {"cpu.max": "400000 100000"})) == 4
    assert cpus.cpu_threads(cgroup(tmp_path / "b", {"cpu.max": "250000 100000"})) == 2, "rounded down"
    assert cpus.cpu_threads(cgroup(tmp_path / "c", {"cpu.max": "50000 100000"})) == 1, "at least one"
    assert cpus.cpu_threads(cgroup(tmp_path / "d", {"cpu.max": "max 100000"})) == 96
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})  # pinned to 2 cores, limit 4
    assert cpus.cpu_threads(cgroup(tmp_path / "a", {})) == 2


def test_precision_per_device(tmp_path):
    cpu = torch.device("cpu")
    zen4, older, graviton3 = (tmp_path / "zen4", tmp_path / "older", tmp_path / "graviton3")
    zen4.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    older.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    graviton3.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert hardware.choose_precision("auto", cpu, zen4).name == "bf16"
    assert hardware.choose_precision("auto", cpu, graviton3).name == "bf16"
    assert hardware.choose_precision("auto", cpu, older).name == "fp32"
    assert hardware.choose_precision("auto", cpu, tmp_path / "missing").name == "fp32"
    assert hardware.choose_precision("bf16", cpu) == hardware.Precision("bf16", torch.bfloat16, False)
    with pytest.raises(ConfigError, match="train.precision: fp16 needs a CUDA device"):
        hardware.choose_precision("fp16", cpu)
    with pytest.raises(ConfigError, match="train.precision: must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        load_config(TINY_CONFIG, ["train.precision=fp8"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device tool runs it)")
def test_precision_on_this_gpu():
    device = torch.device("cuda")
    expected = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    assert hardware.choose_precision("auto", device).name == expected


def per_example(model, examples: list[dict], width: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-example losses and the gradient of their sum, with the batch padded to `width` (None: its longest)."""
    batch = collate(examples, pad_id=0)
    if width is not None:
        extra = width - batch["input_ids"].shape[1]
        batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra))
        batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra))
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    losses.sum().backward()
    return losses.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_losses_and_gradients_do_not_depend_on_padding(prepared_tiny, tiny_backbone):
    """Length grouping changes how much padding a batch carries, never what an example contributes."""
    store = FeatureStore(prepared_tiny / "train")
    cfg = load_config(TINY_CONFIG, [f"model.backbone={tiny_backbone}"])
    torch.manual_seed(0)
    model = build_classifier(cfg, [str(i) for i in range(int(store.labels().max()) + 1)]).eval()  # no dropout
    order = sorted(range(len(store)), key=lambda i: len(store[i]["input_ids"]))
    short = [store[i] for i in order[:8]]  # grouped: the batch pads to its own longest, a few tokens
    assert max(len(e["input_ids"]) for e in short) < 20
    grouped_losses, grouped_grads = per_example(model, short, None)
    padded_losses, padded_grads = per_example(model, short, 64)  # as if batched with a 64-token text
    torch.testing.assert_close(grouped_losses, padded_losses, rtol=1e-5, atol=1e-6)
    for grouped, padded in zip(grouped_grads, padded_grads, strict=True):
        torch.testing.assert_close(grouped, padded, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN: no bf16 autocast on this CPU")
def test_bf16_autocast_trains_to_the_accuracy_of_fp32_on_cpu(tmp_path, tiny_backbone):
    """A 2-layer BERT from scratch, 300 steps each: about 30 s on 2 cores even where bf16 is emulated
    (no bf16 instructions: MiniLM took 100 s there). 398 validation rows of the sample, so 0.05 is 20
    rows; measured: fp32 0.523, bf16 0.560 (on the tiny split's 40 rows one split's fp32 beat bf16 by 4
    rows, another's bf16 beat fp32 by 5: too few to compare)."""
    from flytetune.data import SAMPLE_DATASET, copy_dataset
    from flytetune.prepare import prepare

    overrides = ["data.max_rows=1600", "data.validation_fraction=0.25", "checkpoint.uri=null",
                 f"model.backbone={tiny_backbone}", "train.max_steps=300", "train.epochs=30",
                 "train.learning_rate=2e-3"]
    copy_dataset(str(SAMPLE_DATASET), tmp_path / "raw")
    prepare(tmp_path / "raw", tmp_path / "prepared", load_config(TINY_CONFIG, overrides))
    scores = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(TINY_CONFIG, [*overrides, f"train.precision={precision}"])
        history = fit(tmp_path / "prepared", tmp_path / precision, cfg).history
        scores[precision] = history[-1]
    assert scores["fp32"]["val_accuracy"] >= 0.3, scores  # it learnt something: the comparison means something
    assert scores["bf16"]["val_accuracy"] >= scores["fp32"]["val_accuracy"] - 0.05, scores
    assert scores["bf16"]["train_loss"] == pytest.approx(scores["fp32"]["train_loss"], rel=0.2), scores
    assert scores["bf16"]["train_loss"] != scores["fp32"]["train_loss"], "bf16 rounding shows: autocast ran"
