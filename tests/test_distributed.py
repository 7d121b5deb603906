"""Data-parallel training on CPU: `torchrun --nproc_per_node 2` (gloo) on the tiny config.

Tolerance: DDP averages the two per-rank mean losses where one process averages over the whole
global batch; with equal halves that is the same gradient up to float32 summation order, and
dynamic padding differs per rank. Dropout masks are drawn per process, so the comparison uses a
backbone without dropout. After 12 AdamW steps every weight agrees within 1e-5 (absolute; 3e-7 seen) with
the single-process run of the same global batch.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TINY_CONFIG

pytestmark = pytest.mark.e2e

STEPS = 12
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def no_dropout_backbone(tiny_backbone, tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    config = BertConfig.from_pretrained(tiny_backbone, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel.from_pretrained(tiny_backbone, config=config).save_pretrained(folder)
    for f in tiny_backbone.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def train(tmp: Path, backbone: Path, name: str, nproc: int, *extra: str) -> tuple[dict, str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*(launcher if nproc > 1 else [sys.executable]), "-m", "flytetune.train",
               "--config", str(TINY_CONFIG), "--run_id", name, "--output_uri", str(tmp / "out" / name),
               "--set", f"model.backbone={backbone}", "--set", "train.deterministic=true",
               # fp32: bf16 autocast (auto on CPUs with bf16 instructions) rounds the two ways of summing gradients
               # differently, by about 1e-3.
               "--set", "train.precision=fp32",
               "--set", f"train.max_steps={STEPS}", "--set", f"checkpoint.uri={tmp / 'ckpt'}",
               "--set", "checkpoint.every_steps=6", "--set", "checkpoint.every_minutes=null",
               "--set", "checkpoint.keep=5", *extra]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    report = json.loads(done.stdout[done.stdout.index("{"):])
    return load_file(Path(report["artifacts"]) / "model.safetensors"), output


def test_torchrun_two_processes_checkpoint_resume_and_match_single_process(tmp_path, no_dropout_backbone):
    tiny_backbone = no_dropout_backbone
    single, single_output = train(tmp_path, tiny_backbone, "single", 1)
    ddp, output = train(tmp_path, tiny_backbone, "ddp", 2)
    # Each process validates half of the rows; gathered, they score the whole validation split.
    pattern = r"val_loss (\S+) val_accuracy (\S+) val_macro_f1 (\S+)"
    scores = [[tuple(map(float, line)) for line in re.findall(pattern, o)] for o in (single_output, output)]
    assert len(scores[0]) == 1 and len(scores[1]) == 2, "one line per process"
    assert scores[1][0] == scores[1][1] and scores[1][0] == pytest.approx(scores[0][0], abs=1e-4), scores

    # Only rank 0 writes: each checkpoint is saved once, and one run folder is published.
    saves = [line for line in output.splitlines() if "flytetune.checkpoint: checkpoint" in line]
    assert len(saves) == 2, saves  # steps 6 and 12
    assert sorted(p.name for p in (tmp_path / "ckpt" / "ddp").iterdir()) == ["step-000006", "step-000012"]
    assert output.count('"artifacts"') == 1

    assert single.keys() == ddp.keys()
    worst = max((single[k].float() - ddp[k].float()).abs().max().item() for k in single)
    assert worst < TOLERANCE, f"largest weight difference to the single-process run: {worst:.2e}"

    # Resume the 2-process run from its step-6 checkpoint: it ends where the uninterrupted one did.
    resumed, output = train(tmp_path, tiny_backbone, "ddp-resumed", 2,
                            "--from_checkpoint", str(tmp_path / "ckpt" / "ddp" / "step-000006"))
    assert "resuming from checkpoint" in output and "at step 6" in output
    assert all(torch.equal(ddp[k], resumed[k]) for k in ddp)

    # A world-size change: the single-process run continues the 2-process checkpoint.
    switched, output = train(tmp_path, tiny_backbone, "switched", 1,
                             "--from_checkpoint", str(tmp_path / "ckpt" / "ddp" / "step-000006"))
    worst = max((switched[k].float() - ddp[k].float()).abs().max().item() for k in ddp)
    assert worst < TOLERANCE, f"after resuming on 1 process: {worst:.2e}"
