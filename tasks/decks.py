"""HTML for the Flyte UI's Decks: what a person checks while a run is going or after it ended."""

import html


def table(header: list[str], rows: list[list], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f'<table border="1" cellpadding="4" style="border-collapse:collapse">{cap}<tr>{head}</tr>{body}</table>'


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def training_history(history: list[dict]) -> str:
    if not history:
        return "<p>No epoch completed.</p>"
    keys = list(history[0])
    return table(keys, [[record.get(k) for k in keys] for record in history], "Per-epoch training and validation")


def test_metrics(metrics: dict) -> str:
    summary = table(["split", "examples", "accuracy", "macro-F1"],
                    [[metrics["split"], metrics["n_examples"], metrics["accuracy"], metrics["macro_f1"]]])
    if "per_class" not in metrics:  # many classes: summaries only (flytetune/evaluate.py)
        return summary + "<br>" + _many_classes(metrics)
    per_class = table(["label", "precision", "recall", "f1", "support"],
                      [[label, m["precision"], m["recall"], m["f1"], m["support"]]
                       for label, m in metrics["per_class"].items()], "Per class")
    labels = metrics["labels"]
    confusion = table(["true \\ predicted", *labels],
                      [[label, *row] for label, row in zip(labels, metrics["confusion_matrix"], strict=True)],
                      "Confusion matrix (rows: true label)")
    return summary + "<br>" + per_class + "<br>" + confusion


def _many_classes(metrics: dict) -> str:
    s = metrics["per_class_summary"]
    header = ["label", "precision", "recall", "f1", "support"]
    counts = table(["classes", "present in split", "F1 = 0"], [[s["classes"], s["present"], s["f1_zero"]]])
    worst, best = ([[m[key] for key in header] for m in s[side]] for side in ("worst", "best"))
    confusions = table(["true", "predicted", "count"],
                       [[c["true"], c["predicted"], c["count"]] for c in metrics["top_confusions"]],
                       f"Most frequent confusions (all in {metrics.get('details_file', 'the run folder')})")
    return "<br>".join([counts, table(header, worst, "Worst classes by F1"), table(header, best, "Best classes by F1"),
                        confusions])


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
    parts = [head, scores, sets]
    if decision["class_drops"]:
        parts.append(table(["label", "production F1", "this run's F1", "drop", "support"],
                           [[d["label"], d["production_f1"], d["candidate_f1"], d["drop"], d["support"]]
                            for d in decision["class_drops"]], "Classes that regressed beyond gate.max_class_drop"))
    return "<br>".join(parts)
