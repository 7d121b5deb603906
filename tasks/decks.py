"""HTML for the Flyte UI's Decks: what a person checks while a run is going or after it ended.

Plots are inline SVG from flytetune.plots: a Deck renders offline, with nothing fetched from a CDN.
"""

import datetime as dt
import html

from flytetune import plots, timeline
from flytetune.progress import duration

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


def training(result, *, preset: str, hourly_usd: float | None, running: bool,
             now: dt.datetime | None = None) -> str:
    """The Training deck from a flytetune.train.TrainResult (also a snapshot taken while it runs):
    status, loss and learning rate per step, throughput, validation per epoch, GPU memory and
    utilisation, the attempts (checkpoints, preemptions, resumes) and the cost at the preset's price."""
    now = now or dt.datetime.now(dt.timezone.utc)
    runs = timeline.attempts(result.events, live_step=result.global_step if running else None, now=now)
    steps = result.steps
    parts = [_training_status(result, runs, running, now)]
    if not steps:
        parts.append("<p>No metrics recorded yet: one every train.log_every_steps steps.</p>")
    else:
        parts += _step_charts(steps)
    history = result.history
    if not history:
        parts.append("<p>No validation yet: it runs at the end of each epoch.</p>")
    else:
        # Masked-LM pretraining validates accuracy (of the masked tokens) and loss, but has no macro-F1.
        def series(names: tuple[tuple[str, str], ...]) -> dict:
            return {name: [(r["step"], r[key]) for r in history] for name, key in names if key in history[-1]}

        parts.append(plots.line_chart(series((("validation accuracy", "val_accuracy"),
                                              ("validation macro-F1", "val_macro_f1"))),
                                      secondary=series((("validation loss", "val_loss"),
                                                        ("training loss (epoch mean)", "train_loss"))),
                                      secondary_label="loss", title="Validation after each epoch",
                                      x_label="optimizer step", y_label="score"))
    parts += [_attempts(runs, hourly_usd, preset), training_history(history)]
    return "<br>".join(parts)


def _step_charts(steps: list[dict]) -> list[str]:
    """Loss and learning rate, throughput, and GPU memory and utilisation per metrics record."""
    parts = [plots.line_chart({"loss (mean since the previous point)": [(r["step"], r["loss"]) for r in steps]},
                              secondary={"learning rate": [(r["step"], r["lr"]) for r in steps]},
                              secondary_label="learning rate", title="Training loss and learning rate",
                              x_label="optimizer step", y_label="loss"),
             plots.line_chart({"samples/s": [(r["step"], r["samples_per_s"]) for r in steps]},
                              secondary={"tokens/s (non-pad)": [(r["step"], r["tokens_per_s"]) for r in steps]},
                              secondary_label="tokens/s", title="Throughput (all processes)",
                              x_label="optimizer step", y_label="samples/s")]
    gpu = [r for r in steps if "gpu_max_mem_gib" in r]
    if gpu:
        parts.append(plots.line_chart({"peak memory allocated (GiB)": [(r["step"], r["gpu_max_mem_gib"]) for r in gpu]},
                                      secondary={"utilisation (%)": [(r["step"], r["gpu_util_pct"])
                                                                     for r in gpu if "gpu_util_pct" in r]},
                                      secondary_label="utilisation %", title="GPU (rank 0)",
                                      x_label="optimizer step", y_label="GiB"))
    else:
        parts.append("<p>No GPU in this run: no GPU memory or utilisation to show.</p>")
    return parts


def _training_status(result, runs: list[timeline.Attempt], running: bool, now: dt.datetime) -> str:
    done, total = result.global_step, result.total_steps
    share = f" ({done / total:.0%})" if total else ""
    current = runs[-1] if runs else None
    if current is not None and current.outcome == "preempted":
        text = (f"Preempted at step {done} of {total}: the next attempt resumes from the newest checkpoint "
                f"(attempt {current.number} of this run).")
    elif running:
        text = f"Running: step {done} of {total}{share}"
        if current is not None and current.to_step > current.from_step and current.seconds > 0:
            rate = (current.to_step - current.from_step) / current.seconds
            text += f", {rate:.2f} steps/s, ETA {duration((total - done) / rate)}"
        text += f". Updated {now:%Y-%m-%d %H:%M:%S} UTC; the page is republished while the run goes."
    else:
        text = (f"Finished: {done} steps, {len(result.history)} epoch(s), "
                f"{duration(sum(a.seconds for a in runs))} of training over {len(runs)} attempt(s).")
    return f'<p class="flytetune-status" data-running="{str(running).lower()}"><b>{html.escape(text)}</b></p>'


def _attempts(runs: list[timeline.Attempt], hourly_usd: float | None, preset: str) -> str:
    if not runs:
        return "<p>No attempt recorded.</p>"
    origin = runs[0].started

    def minutes(t: dt.datetime) -> float:
        return (t - origin).total_seconds() / 60

    spans = [plots.Span(f"attempt {a.number} (steps {a.from_step}-{a.to_step})", minutes(a.started),
                        minutes(a.last_seen), a.outcome,
                        f"attempt {a.number}: {a.outcome}, steps {a.from_step}-{a.to_step}, {duration(a.seconds)}"
                        + (f", resumed from {a.resumed_from}" if a.resumed_from else ""),
                        [(minutes(timeline.parse_time(c["time"])), f"checkpoint at step {c['step']}: {c['uri']} "
                          f"({c['seconds']:.1f} s to save)") for c in a.checkpoints])
             for a in runs]
    chart = plots.timeline(spans, title="Attempts: checkpoints, preemptions and resumes",
                           x_label="minutes since the first attempt started", mark_label="checkpoint saved")
    rows = table(["attempt", "started (UTC)", "training time", "steps", "outcome", "resumed from", "checkpoints",
                  "cost"],
                 [[a.number, f"{a.started:%Y-%m-%d %H:%M:%S}", duration(a.seconds), f"{a.from_step}-{a.to_step}",
                   a.outcome, a.resumed_from or "-", len(a.checkpoints),
                   "-" if hourly_usd is None else _usd(timeline.cost_usd([a], hourly_usd))] for a in runs], "Attempts")
    cost = timeline.cost_usd(runs, hourly_usd)
    if cost is None:
        estimate = f"No cost estimate: preset {preset} has no hourly_usd."
    else:
        hours = sum(a.seconds for a in runs) / 3600
        estimate = (f"Estimated cost: {_usd(cost)}, {hours:.2f} h of training at preset {preset}'s hourly_usd "
                    f"${hourly_usd:.2f} (a list price: spot nodes cost less; time before training, such as "
                    f"scheduling and the data download, is not counted).")
    return "<br>".join([chart, rows, f"<p><b>{html.escape(estimate)}</b></p>"])


def _usd(amount: float) -> str:
    return f"${amount:.2f}" if amount >= 0.01 else "under $0.01"


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
    classes = decision.get("per_class") or []  # decided by older code: headline scores only
    if classes:
        series = {"this run": [c["candidate_f1"] for c in classes]}
        title = "F1 per class on the same rows"
        if decision["production"]:
            series[f"production {decision['production_version']}"] = [c["production_f1"] for c in classes]
            title += ", largest loss against production first"
        parts.append(plots.bar_chart([c["label"] for c in classes], series, title=title, value_max=1.0,
                                     max_categories=CHART_MAX_CLASSES))
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
