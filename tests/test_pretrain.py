"""Continued MLM pretraining: the masking, the shared training loop (resume after SIGKILL), the workflow
on its embedded defaults, and a fine-tuning run that names the published backbone."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from flytetune import artifacts
from flytetune.config import ConfigError, load_config
from flytetune.objectives import MaskedLM
from tests.conftest import REPO, TINY_CONFIG
from tests.test_preemption import Training, assert_same_weights, complete_steps, resumed_step

MLM = ("--set", "train.objective=mlm", "--set", "data.label_column=null", "--set", "train.best_metric=val_loss",
       "--set", "model.name=tiny-backbone")


@pytest.fixture(scope="module")
def tokenizer(tiny_backbone):
    return AutoTokenizer.from_pretrained(tiny_backbone, local_files_only=True)


def batch_of(tokenizer, texts):
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": torch.zeros(len(texts), dtype=torch.long)}


def test_masking_follows_bert_and_depends_only_on_seed_and_step(tokenizer):
    objective = MaskedLM(tokenizer, probability=0.15, seed=7)
    texts = ["card payment to tesco stores 3417 london"] * 200 + ["x"]
    batch = batch_of(tokenizer, texts)
    masked = objective.inputs(batch, step=3, rank=0)
    ids, labels = batch["input_ids"], masked["labels"]
    chosen = labels != -100
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids)) | (batch["attention_mask"] == 0)
    assert not (chosen & special).any(), "special and padding tokens are never predicted"
    assert torch.equal(labels[chosen], ids[chosen]), "labels are the original ids"
    share = chosen.sum() / (~special).sum()
    assert 0.13 < share < 0.17, share
    replaced = masked["input_ids"][chosen]
    to_mask = (replaced == tokenizer.mask_token_id).float().mean()
    unchanged = (replaced == ids[chosen]).float().mean()
    assert 0.75 < to_mask < 0.85 and 0.07 < unchanged < 0.14, (to_mask, unchanged)
    assert torch.equal(masked["input_ids"][~chosen], ids[~chosen]), "nothing else changes"

    again = objective.inputs(batch, step=3, rank=0)
    assert torch.equal(again["input_ids"], masked["input_ids"]) and torch.equal(again["labels"], labels)
    torch.manual_seed(123)  # the global RNG plays no part: a resumed run masks as the first one did
    assert torch.equal(objective.inputs(batch, step=3, rank=0)["labels"], labels)
    assert not torch.equal(objective.inputs(batch, step=4, rank=0)["labels"], labels)
    assert not torch.equal(objective.inputs(batch, step=3, rank=1)["labels"], labels)


def test_a_batch_predicts_at_least_one_token(tokenizer):
    objective = MaskedLM(tokenizer, probability=0.01, seed=0)
    batch = batch_of(tokenizer, ["tesco"])
    for step in range(20):
        assert (objective.inputs(batch, step=step, rank=0)["labels"] != -100).sum() >= 1


def test_config_refuses_unlabelled_classification_and_f1_for_mlm():
    with pytest.raises(ConfigError, match=r"data.label_column: is null .* only train.objective mlm"):
        load_config(None, ["data.label_column=null"])
    with pytest.raises(ConfigError, match=r"train.best_metric: val_macro_f1 is a classification metric"):
        load_config(None, ["train.objective=mlm", "data.label_column=null"])
    with pytest.raises(ConfigError, match=r"train.objective: must be one of classification, mlm, got 'clm'"):
        load_config(None, ["train.objective=clm"])
    pretrain = load_config(REPO / "configs" / "pretrain.yaml")
    assert pretrain.train.objective == "mlm" and pretrain.data.label_column is None


def test_each_workflow_refuses_the_other_ones_config(in_repo):
    from flytetune.exports import NO_CUTOFF
    from tasks.steps import resolve

    inputs = dict(overrides="", preset="cpu", output_uri="auto", from_checkpoint=None, dataset_uri="unused",
                  test_uri=None, kickoff_time=NO_CUTOFF, retrain_anyway=True, prepared_uri="", init_from=None,
                  prepare_size="auto")
    with pytest.raises(ConfigError, match=r"train.objective: is 'classification' but this workflow trains 'mlm'"):
        resolve(config=load_config(REPO / "configs" / "local.yaml"), objective="mlm", **inputs)
    with pytest.raises(ConfigError, match=r"train.objective: is 'mlm' but this workflow trains 'classification'"):
        resolve(config=load_config(REPO / "configs" / "pretrain.yaml"), objective="classification", **inputs)


def published(output: str) -> dict[str, torch.Tensor]:
    return load_file(Path(re.search(r'"artifacts": "([^"]+)"', output).group(1)) / "model.safetensors")


def test_pretraining_resumes_after_sigkill_and_ends_bit_identical(tmp_path, tiny_backbone):
    """The fine-tuning loop's checkpoints and resume, with the MLM objective (masks included)."""
    code, output = Training(tmp_path / "reference", tiny_backbone, None, checkpoints=False, extra=MLM).finish()
    assert code == 0, output
    reference = published(output)
    assert any(key.startswith("cls.predictions") for key in reference), "a masked-LM model was published"

    run = Training(tmp_path, tiny_backbone, extra=MLM)
    run.wait_for_save(8)
    run.kill(signal.SIGKILL)
    assert run.finish()[0] == -signal.SIGKILL
    newest = complete_steps(tmp_path)[-1]
    code, output = Training(tmp_path, tiny_backbone, extra=MLM).finish()
    assert code == 0, output
    assert resumed_step(output) == newest
    assert_same_weights(published(output), reference)


def test_the_workflow_publishes_a_backbone_that_fine_tuning_names(tmp_path, tiny_backbone, in_repo):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pyflyte = str(Path(sys.executable).parent / "pyflyte")
    overrides = (f"model.backbone={tiny_backbone} train.max_steps=6 train.eval_every_steps=3 data.max_rows=400 "
                 f"checkpoint.uri={tmp_path / 'ckpt'}")
    done = subprocess.run([pyflyte, "run", "workflows/pretrain.py", "pretrain", "--output_uri", str(tmp_path / "out"),
                           "--overrides", overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    backbone_uri = done.stdout.strip().splitlines()[-1]
    manifest = artifacts.verify(backbone_uri)
    assert backbone_uri.startswith(str(tmp_path / "out" / "txn-backbone") + "/")
    assert manifest["config"]["train"]["objective"] == "mlm" and manifest["metrics"]["split"] == "validation"
    history = json.loads((Path(backbone_uri) / "train_history.json").read_text())
    assert [r["step"] for r in history["history"]] == [3, 6] and "val_macro_f1" not in history["history"][0]

    from flytetune.pipeline import run

    cfg = load_config(TINY_CONFIG, [f"model.backbone={backbone_uri}", "train.max_steps=2", "checkpoint.uri=null"])
    result = run(cfg, output_uri=str(tmp_path / "models"))
    tuned = artifacts.verify(result.run_uri)
    assert tuned["config"]["model"]["backbone"] == backbone_uri
    assert tuned["metrics"]["macro_f1"] is not None


def test_the_head_on_masked_positions_only_gives_the_full_models_loss_and_gradients(tiny_backbone, tokenizer):
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(tiny_backbone, local_files_only=True).eval()
    objective = MaskedLM(tokenizer, probability=0.15, seed=1)
    batch = objective.inputs(batch_of(tokenizer, ["card payment to tesco", "salary acme ltd", "atm"]), 0, 0)
    full = model(**batch).loss
    full.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fast = objective.for_training(model)
    assert fast is not model, "BERT's head runs on the masked positions only"
    loss = fast(**batch).loss
    loss.backward()
    torch.testing.assert_close(loss, full)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


def test_the_backbone_keeps_its_pooler(tmp_path, tiny_backbone, prepared_unlabelled):
    """A masked-LM model has no pooler; the published backbone carries the original one, so that a
    classifier fine-tuned from it does not start from a random pooler."""
    from transformers import AutoModelForSequenceClassification

    from flytetune.train import fit

    cfg = load_config(TINY_CONFIG, [*[v for v in MLM if v != "--set"], f"model.backbone={tiny_backbone}",
                                    "train.max_steps=2", "checkpoint.uri=null"])
    fit(prepared_unlabelled, tmp_path / "backbone", cfg)
    stock = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=2, local_files_only=True)
    ours = AutoModelForSequenceClassification.from_pretrained(tmp_path / "backbone", num_labels=2,
                                                              local_files_only=True)
    torch.testing.assert_close(ours.bert.pooler.state_dict(), stock.bert.pooler.state_dict())
    assert not torch.equal(ours.bert.encoder.layer[0].attention.self.query.weight,
                           stock.bert.encoder.layer[0].attention.self.query.weight), "the encoder was trained"


@pytest.fixture(scope="module")
def prepared_unlabelled(tmp_path_factory, tiny_backbone) -> Path:
    from flytetune.data import copy_dataset
    from flytetune.prepare import prepare
    from tests.conftest import SAMPLE

    raw, out = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("prepared") / "unlabelled"
    copy_dataset(str(SAMPLE), raw)
    prepare(raw, out, load_config(TINY_CONFIG, [*[v for v in MLM if v != "--set"], f"model.backbone={tiny_backbone}"]))
    return out


def test_plain_text_lines_prepare_as_unlabelled_text(tmp_path, tiny_backbone):
    from flytetune.data import copy_dataset
    from flytetune.prepare import prepare

    lines = [f"card payment to shop {i % 250}" for i in range(300)] + ["", "salary acme ltd"]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    copy_dataset(str(tmp_path / "corpus.txt"), tmp_path / "raw")
    cfg = load_config(TINY_CONFIG, [*[v for v in MLM if v != "--set"], f"model.backbone={tiny_backbone}",
                                    "data.max_rows=null"])
    meta = prepare(tmp_path / "raw", tmp_path / "prepared", cfg)
    assert sum(meta["rows"].values()) == 251, "blank lines skipped, repeated texts dropped"
    assert meta["labels"] == ["unlabelled"] and meta["label_column"] is None
