"""HTML for the Flyte UI's Decks: what a person checks while a run is going or after it ended.

Plots are inline SVG from flytetune.plots: a Deck renders offline, with nothing fetched from a CDN.
"""

import html

from flytetune import plots

# Classes shown in a bar chart before "N more not shown"; the table below a chart lists them all.
CHART_MAX_CLASSES = 40


def table(header: list[str], rows: list[list], caption: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table border="1" cellpadding="4" style="border-collapse:collapse">{cap}{head}{body}</table>'


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def dataset_profile(meta: dict) -> str:
    """What prepare made of the data (its meta.json): where it came from, rows per split, labels,
    token lengths and truncation, and what validation dropped or warned about."""
    splits = list(meta["rows"])
    exports = meta.get("exports") or {}
    facts = [*(["source", uri] for uri in meta["sources"]),
             *([f"{role} export", f"{e['uri']} ({len(e['files'])} file(s))"] for role, e in exports.items()),
             ["dataset SHA-256", meta["dataset_sha256"]], ["test rows from", meta["test_source"]],
             ["tokenizer", meta["tokenizer"]], ["max_length (tokens)", meta["max_length"]]]
    source = table(["", ""], facts, "Data")
    profile = meta.get("profile")  # prepared by older code: counts only
    lengths = (profile or {}).get("token_length", {})
    per_split = table(["split", "rows", "truncated", "truncated share", "mean tokens", "median", "p95", "max"],
                      [[name, meta["rows"][name], meta["truncated"][name],
                        f"{meta['truncated'][name] / max(1, meta['rows'][name]):.1%}",
                        *(lengths[name][k] if name in lengths else "-" for k in ("mean", "p50", "p95", "max"))]
                       for name in splits], "Rows per split")
    labels = sorted(meta["labels"], key=lambda label: (-meta["class_counts"]["train"].get(label, 0), label))
    distribution = plots.bar_chart(labels, {name: [meta["class_counts"][name].get(label, 0) for label in labels]
                                            for name in splits},
                                   title=f"Rows per label and split ({len(labels)} labels, largest first)",
                                   value_label="rows", max_categories=CHART_MAX_CLASSES)
    parts = [source, per_split, distribution]
    if profile:
        histogram = profile["token_length_histogram"]
        parts.append(plots.histogram(histogram["edges"], histogram["counts"],
                                     title="Text length in tokens, all splits (after truncation)",
                                     x_label="tokens per text, special tokens included",
                                     highlight_last=f"= max_length {meta['max_length']}: cut (or exactly full)"))
        checks = table(["file", "exact duplicates dropped", "rows sharing a text with another label"],
                       [[role, profile["duplicates_dropped"][role], profile["conflicting_label_rows"][role]]
                        for role in profile["duplicates_dropped"]], "Validation")
        warnings = list(profile["warnings"])
        if profile.get("subsampled"):
            kept = profile["subsampled"]
            warnings.append(f"data.max_rows: kept {kept['kept']} of {kept['valid_rows']} valid rows")
        listed = "".join(f"<li>{html.escape(w)}</li>" for w in warnings) or "<li>none</li>"
        parts += [checks, f"<p><b>Warnings</b></p><ul>{listed}</ul>"]
    return "<br>".join(parts)


def training_history(history: list[dict]) -> str:
    if not history:
        return "<p>No epoch completed.</p>"
    keys = list(history[0])
    return table(keys, [[record.get(k) for k in keys] for record in history], "Per-epoch training and validation")


def test_metrics(metrics: dict, worst: list[dict] | None = None) -> str:
    """Scores, the confusion matrix as a heatmap (most frequent confusions when there are many classes),
    precision/recall/F1 per class as a chart and a table, and the `worst` examples (evaluate.worst_examples)."""
    summary = table(["split", "examples", "accuracy", "macro-F1"],
                    [[metrics["split"], metrics["n_examples"], metrics["accuracy"], metrics["macro_f1"]]])
    if "per_class" not in metrics:  # many classes: summaries only (flytetune/evaluate.py)
        return "<br>".join([summary, _many_classes(metrics), _worst_examples(worst)])
    labels = metrics["labels"]
    confusion = plots.confusion_matrix(metrics["confusion_matrix"], labels)
    rows = metrics["per_class"]
    ranked = sorted(labels, key=lambda label: (rows[label]["f1"], label))  # worst first
    scores = {key: [rows[label][key] for label in ranked] for key in ("precision", "recall", "f1")}
    chart = plots.bar_chart(ranked, scores, title="Precision, recall and F1 per class, worst F1 first",
                            value_max=1.0, max_categories=CHART_MAX_CLASSES)
    per_class = table(["label", "precision", "recall", "f1", "support"],
                      [[label, m["precision"], m["recall"], m["f1"], m["support"]] for label, m in rows.items()],
                      "Per class")
    return "<br>".join([summary, confusion, chart, per_class, _worst_examples(worst)])


def _worst_examples(worst: list[dict] | None) -> str:
    if worst is None:
        return ""
    if not worst:
        return "<p>No test row is misclassified.</p>"
    return table(["row", "text", "label", "predicted", "confidence", "p(label)"],
                 [[w["row"], _clip(w["text"]), w["label"], w["predicted"], w["confidence"], w["label_probability"]]
                  for w in worst],
                 "Most confident mistakes: misclassified test rows, surest first")


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _many_classes(metrics: dict) -> str:
    s = metrics["per_class_summary"]
    header = ["label", "precision", "recall", "f1", "support"]
    counts = table(["classes", "present in split", "F1 = 0"], [[s["classes"], s["present"], s["f1_zero"]]])
    worst, best = ([[m[key] for key in header] for m in s[side]] for side in ("worst", "best"))
    confusions = table(["true", "predicted", "count"],
                       [[c["true"], c["predicted"], c["count"]] for c in metrics["top_confusions"]],
                       f"Most frequent confusions (all in {metrics.get('details_file', 'the run folder')})")
    confusion_chart = plots.top_confusions([(c["true"], c["predicted"], c["count"]) for c in metrics["top_confusions"]],
                                           classes=s["classes"])
    worst_chart = plots.bar_chart([m["label"] for m in s["worst"]],
                                  {key: [m[key] for m in s["worst"]] for key in ("precision", "recall", "f1")},
                                  title="Precision, recall and F1 of the worst classes by F1", value_max=1.0)
    return "<br>".join([counts, confusion_chart, worst_chart, table(header, worst, "Worst classes by F1"),
                        table(header, best, "Best classes by F1"), confusions])


def gate(decision: dict) -> str:
    """The new model against production: the decision first, then the numbers behind it."""
    verdict = "promote" if decision["promote"] else "not promoted"
    head = f"<p><b>{html.escape(verdict)}</b>: {html.escape(decision['reason'])}</p>"
    ours, theirs = decision["candidate"], decision["production"] or {}
    metric = decision["metric"]
    scores = table(["model", "examples", "accuracy", "macro-F1"],
                   [["this run", ours["n_examples"], ours["accuracy"], ours["macro_f1"]],
                    [f"production {decision['production_version'] or '(none)'}", theirs.get("n_examples", "-"),
                     theirs.get("accuracy", "-"), theirs.get("macro_f1", "-")]],
                   f"Both on the same rows; deciding metric: {metric}")
    sets = table(["evaluation set", "rows"], [[name, s["rows"]] for name, s in decision["eval_sets"].items()])
    models, title = {"this run": ours}, f"This run on {ours['n_examples']} rows (no production model to compare with)"
    if decision["production"]:
        models[f"production {decision['production_version']}"] = theirs
        title = f"This run against production on the same {ours['n_examples']} rows"
    chart = plots.bar_chart(["accuracy", "macro-F1"],
                            {name: [m["accuracy"], m["macro_f1"]] for name, m in models.items()}, title=title,
                            value_max=1.0)
    parts = [head, chart, scores, sets]
    if decision["class_drops"]:
        drops = decision["class_drops"]
        parts.append(plots.bar_chart([d["label"] for d in drops],
                                     {"production F1": [d["production_f1"] for d in drops],
                                      "this run's F1": [d["candidate_f1"] for d in drops]},
                                     title="Classes that regressed beyond gate.max_class_drop", value_max=1.0,
                                     max_categories=CHART_MAX_CLASSES))
        parts.append(table(["label", "production F1", "this run's F1", "drop", "support"],
                           [[d["label"], d["production_f1"], d["candidate_f1"], d["drop"], d["support"]]
                            for d in drops], "Classes that regressed beyond gate.max_class_drop"))
    return "<br>".join(parts)
