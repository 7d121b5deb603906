"""The evaluation gate: does a newly trained model replace the production one?

Both models predict the same rows: the run's own test split and, when `gate.eval_uri` is set, a
fixed labelled file that does not change between runs (so this week's model and last week's meet
on common ground even when the data moved). Each model tokenises the raw texts with its own
tokenizer and `max_length`, and predictions are compared as label names, so a class that only one
of them knows counts as a miss for the other.

The new model is promoted when its `gate.metric` is at least production's plus `gate.min_improvement`
and no class with at least `gate.min_class_support` rows loses more than `gate.max_class_drop` F1.
With no production model yet, the first one promotes itself. The decision and its reason, in
one line, go into the run's manifest, the task output and the evaluate Deck.
"""

import logging
from pathlib import Path

import numpy as np
import polars as pl

from flytetune import artifacts, registry, storage
from flytetune.config import DataConfig, FinetuneConfig, GateConfig
from flytetune.data import LABEL, TEXT, read_table, validate
from flytetune.prepare import TEST_TEXTS

log = logging.getLogger(__name__)

# How many regressed classes a reason names before "and N more".
_NAMED = 3


def load_eval_file(uri: str, data_cfg: DataConfig, work: Path) -> pl.DataFrame:
    """The fixed evaluation file (`gate.eval_uri`), validated like a test file: `text`, `label` columns."""
    local = Path(work) / f"gate-eval{Path(uri).suffix.lower()}"
    storage.copy(uri, str(local))
    return validate(read_table(local, uri), uri, data_cfg, min_per_class=1).select(TEXT, LABEL)


def predict(model_dir: Path, texts: list[str], max_length: int, batch_size: int = 128) -> list[str]:
    """Label names predicted by the model folder for raw texts, tokenised with its own tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    # Sorted by length so that batches carry little padding; put back in order at the end.
    order = np.argsort([len(t) for t in texts], kind="stable")
    predicted = np.empty(len(texts), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt")
            predicted[idx] = model(**batch).logits.argmax(dim=-1).numpy()
    return [model.config.id2label[int(i)] for i in predicted]


def score(truth: list[str], predicted: list[str]) -> dict:
    """Accuracy, macro-F1 (over classes present in `truth`) and per-class F1 and support, by label name."""
    from flytetune.evaluate import per_class_scores  # imports torch; publish (light image) needs only promotion

    names = sorted(set(truth) | set(predicted))
    index = {name: i for i, name in enumerate(names)}
    y_true = np.array([index[n] for n in truth], dtype=np.int64)
    y_pred = np.array([index[n] for n in predicted], dtype=np.int64)
    _, _, f1, support = per_class_scores(y_true, y_pred, len(names))
    present = support > 0
    return {
        "n_examples": len(truth),
        "accuracy": float((y_true == y_pred).mean()) if len(truth) else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {name: {"f1": round(float(f1[i]), 6), "support": int(support[i])}
                      for i, name in enumerate(names) if present[i]},
    }


def compare(candidate: dict, production: dict | None, gate: GateConfig, production_version: str | None) -> dict:
    """The decision: {"promote", "reason", "metric", "improvement", "class_drops"} from two `score` results."""
    metric = gate.metric
    if production is None:
        return {"promote": True, "reason": "first model: no production version yet", "metric": metric,
                "improvement": None, "class_drops": []}
    improvement = candidate[metric] - production[metric]
    drops = []
    for name, theirs in production["per_class"].items():
        ours = candidate["per_class"].get(name, {"f1": 0.0})
        drop = theirs["f1"] - ours["f1"]
        if theirs["support"] >= gate.min_class_support and drop > gate.max_class_drop:
            drops.append({"label": name, "candidate_f1": ours["f1"], "production_f1": theirs["f1"],
                          "drop": round(drop, 6), "support": theirs["support"]})
    drops.sort(key=lambda d: (-d["drop"], d["label"]))
    versus = (f"{metric} {candidate[metric]:.4f} vs production {production_version} {production[metric]:.4f} "
              f"({improvement:+.4f})")
    problems = []
    if improvement < gate.min_improvement:
        problems.append(f"{versus}, below gate.min_improvement={gate.min_improvement:g}")
    if drops:
        named = ", ".join(f"{d['label']!r} {d['production_f1']:.2f}->{d['candidate_f1']:.2f}" for d in drops[:_NAMED])
        more = f" and {len(drops) - _NAMED} more" if len(drops) > _NAMED else ""
        problems.append(f"class F1 dropped beyond gate.max_class_drop={gate.max_class_drop:g}: {named}{more}")
    reason = ("; ".join(problems) if problems else
              f"{versus} >= gate.min_improvement={gate.min_improvement:g}; no class dropped more than "
              f"{gate.max_class_drop:g} F1")
    return {"promote": not problems, "reason": reason, "metric": metric, "improvement": round(improvement, 6),
            "class_drops": drops}


def _eval_rows(prepared_dir: Path, cfg: FinetuneConfig, work: Path) -> tuple[pl.DataFrame, dict]:
    """The rows both models predict, and what each part is (for the manifest)."""
    parts = {"test split": pl.read_parquet(Path(prepared_dir) / TEST_TEXTS).select(TEXT, LABEL)}
    if cfg.gate.eval_uri:
        parts[cfg.gate.eval_uri] = load_eval_file(cfg.gate.eval_uri, cfg.data, work)
    sets = {name: {"rows": frame.height} for name, frame in parts.items()}
    return pl.concat(list(parts.values())), sets


def run(model_dir: Path, prepared_dir: Path, cfg: FinetuneConfig, output_uri: str, work: Path) -> dict:
    """Score the new model in `model_dir` and the current production model of `cfg.model.name` under
    `output_uri` on the same rows; return the decision with both scores (JSON-ready)."""
    rows, sets = _eval_rows(prepared_dir, cfg, work)
    texts, truth = rows.get_column(TEXT).to_list(), rows.get_column(LABEL).to_list()
    candidate = score(truth, predict(model_dir, texts, cfg.data.max_length, cfg.train.eval_batch_size))
    pointer = registry.production(output_uri, cfg.model.name)
    production, version = None, None
    if pointer is not None:
        version = pointer["version"]
        production_dir = artifacts.fetch(pointer["run_uri"], Path(work) / "production")
        max_length = artifacts.read_manifest(str(production_dir))["config"]["data"]["max_length"]
        production = score(truth, predict(production_dir, texts, max_length, cfg.train.eval_batch_size))
    decision = compare(candidate, production, cfg.gate, version)
    log.info("gate: %s: %s", "promote" if decision["promote"] else "not promoted", decision["reason"])
    return {**decision, "production_version": version, "eval_sets": sets,
            "candidate": _headline(candidate), "production": _headline(production) if production else None,
            "per_class": per_class(candidate, production)}


def per_class(candidate: dict, production: dict | None) -> list[dict]:
    """Both models' F1 for each class of the evaluation rows, the largest loss first (production_f1
    and change are None without a production model)."""
    rows = []
    for name, ours in candidate["per_class"].items():
        theirs = production["per_class"][name]["f1"] if production else None
        rows.append({"label": name, "support": ours["support"], "candidate_f1": ours["f1"], "production_f1": theirs,
                     "change": None if theirs is None else round(ours["f1"] - theirs, 6)})
    rows.sort(key=lambda r: (r["change"] if r["change"] is not None else r["candidate_f1"], r["label"]))
    return rows


def _headline(scores: dict) -> dict:
    return {k: scores[k] for k in ("n_examples", "accuracy", "macro_f1")}


def promote_if_passed(output_uri: str, cfg: FinetuneConfig, run_uri: str, decision: dict) -> dict:
    """Move the production pointer to the published `run_uri` when the gate said so; return
    {"promoted", "reason"}: the reason is the gate's, or why the pointer was left alone."""
    if not decision["promote"]:
        return {"promoted": False, "reason": decision["reason"]}
    if not cfg.gate.promote:
        return {"promoted": False, "reason": f"gate.promote is false (the gate passed: {decision['reason']})"}
    version = run_uri.rstrip("/").rpartition("/")[2]
    try:
        registry.promote(output_uri, cfg.model.name, version, reason=f"gate: {decision['reason']}",
                         replaces=decision["production_version"])
    except registry.ProductionMoved as e:
        log.warning("%s", e)
        return {"promoted": False, "reason": str(e)}
    log.info("promoted %s to production", run_uri)
    return {"promoted": True, "reason": decision["reason"]}
