"""The evaluation gate's decision, promotion after it, and the checks on where a run starts from.

Decisions are checked on scores built by `gate.score` from label lists; the whole gate with real
models runs in tests/test_retraining.py.
"""

import pytest

from flytetune import artifacts, gate, registry, run_inputs, storage
from flytetune.config import ConfigError, FinetuneConfig, GateConfig, load_config
from flytetune.data import DataError, locate
from tests.test_exports import export

NAME = "txn"


def scores(correct: dict[str, int], support: int = 30) -> dict:
    """Scores of a model that gets `correct[label]` of `support` rows of each label right (misses go to 'other')."""
    truth, predicted = [], []
    for label, right in correct.items():
        truth += [label] * support
        predicted += [label] * right + ["other"] * (support - right)
    return gate.score(truth, predicted)


def test_the_first_model_promotes_itself():
    decision = gate.compare(scores({"a": 10, "b": 10}), None, GateConfig(), None)
    assert decision["promote"] and decision["reason"] == "first model: no production version yet"


def test_a_better_model_is_promoted_with_the_numbers_in_the_reason():
    decision = gate.compare(scores({"a": 29, "b": 28}), scores({"a": 27, "b": 27}), GateConfig(metric="accuracy"), "v1")
    assert decision["promote"], decision
    assert decision["reason"].startswith("accuracy 0.9500 vs production v1 0.9000 (+0.0500) >= gate.min_improvement=0")
    assert decision["improvement"] == pytest.approx(0.05)


def test_a_worse_model_is_refused_naming_metric_and_threshold():
    decision = gate.compare(scores({"a": 20, "b": 20}), scores({"a": 27, "b": 27}), GateConfig(), "v1")
    assert not decision["promote"]
    assert "below gate.min_improvement=0" in decision["reason"] and "vs production v1" in decision["reason"]


def test_min_improvement_is_required_not_just_any_gain():
    better_by_a_little = (scores({"a": 28, "b": 27}), scores({"a": 27, "b": 27}))
    assert gate.compare(*better_by_a_little, GateConfig(metric="accuracy"), "v1")["promote"]
    refused = gate.compare(*better_by_a_little, GateConfig(metric="accuracy", min_improvement=0.05), "v1")
    assert not refused["promote"] and "below gate.min_improvement=0.05" in refused["reason"]


def test_a_regressed_class_with_support_blocks_promotion_despite_a_better_average():
    production = scores({"a": 27, "b": 27, "c": 27})
    candidate = scores({"a": 30, "b": 30, "c": 24})  # better overall, class c loses F1
    decision = gate.compare(candidate, production, GateConfig(metric="accuracy", max_class_drop=0.05), "v1")
    assert not decision["promote"]
    assert "class F1 dropped beyond gate.max_class_drop=0.05: 'c'" in decision["reason"]
    assert [d["label"] for d in decision["class_drops"]] == ["c"]
    # Too few rows of c to judge it: the drop is allowed.
    allowed = gate.compare(candidate, production, GateConfig(metric="accuracy", min_class_support=31), "v1")
    assert allowed["promote"], allowed["reason"]


def test_a_class_the_new_model_no_longer_predicts_is_a_drop():
    production = scores({"a": 27, "b": 27})
    candidate = gate.score(["a"] * 30 + ["b"] * 30, ["a"] * 60)
    decision = gate.compare(candidate, production, GateConfig(min_class_support=10), "v1")
    assert not decision["promote"] and "'b'" in decision["reason"]


# --- promotion after the gate -----------------------------------------------------------------------

@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "models")


def publish(tmp_path, out, version, exports=None):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    cfg = load_config(None)
    return artifacts.publish(model, out, NAME, version=version, config=cfg.to_dict(),
                             data_meta={"rows": {}, "exports": exports or {}},
                             metrics={"accuracy": 0.9, "macro_f1": 0.9, "split": "test", "n_examples": 10})


def cfg_named(**gate_values) -> FinetuneConfig:
    return load_config({"model": {"name": NAME}, "gate": gate_values})


def decision(promote: bool, production_version: str | None) -> dict:
    return {"promote": promote, "reason": "because", "production_version": production_version}


def test_promote_if_passed_moves_the_pointer_only_when_the_gate_passed(tmp_path, out):
    v1, v2 = publish(tmp_path, out, "v1"), publish(tmp_path, out, "v2")
    assert gate.promote_if_passed(out, cfg_named(), v1, decision(True, None)) == {"promoted": True, "reason": "because"}
    assert gate.promote_if_passed(out, cfg_named(), v2, decision(False, "v1")) == {"promoted": False,
                                                                                  "reason": "because"}
    assert registry.production(out, NAME)["version"] == "v1"
    off = gate.promote_if_passed(out, cfg_named(promote=False), v2, decision(True, "v1"))
    assert off == {"promoted": False, "reason": "gate.promote is false (the gate passed: because)"}
    assert registry.production(out, NAME)["version"] == "v1"
    assert registry.history(out, NAME)[-1]["why"] == "gate: because"


def test_a_decision_against_an_older_production_does_not_replace_a_newer_one(tmp_path, out):
    v1, v2, v3 = (publish(tmp_path, out, v) for v in ("v1", "v2", "v3"))
    registry.promote(out, NAME, "v1", reason="first")
    # v3 was compared with v1, but v2 was promoted meanwhile by another run.
    registry.promote(out, NAME, "v2", reason="other run")
    outcome = gate.promote_if_passed(out, cfg_named(), v3, decision(True, "v1"))
    assert not outcome["promoted"] and "production moved to v2 after this run was compared with v1" in outcome["reason"]
    assert registry.production(out, NAME)["version"] == "v2"


# --- where a run starts from ------------------------------------------------------------------------

def test_an_export_not_newer_than_productions_is_refused_unless_retrain_anyway(tmp_path, out):
    prefix = f"{tmp_path}/exports/"
    export(prefix, "2026-11-16")
    located = locate(prefix)
    publish(tmp_path, out, "v1", exports={"dataset": located["dataset"]["export"].lineage()})
    registry.promote(out, NAME, "v1", reason="first")
    with pytest.raises(DataError, match=r"exports/: no export newer than production v1's \(.*dt=2026-11-16/\)"):
        run_inputs.check_new_data(locate(prefix), out, NAME, retrain_anyway=False)
    run_inputs.check_new_data(locate(prefix), out, NAME, retrain_anyway=True)
    export(prefix, "2026-11-23")
    run_inputs.check_new_data(locate(prefix), out, NAME, retrain_anyway=False)  # a newer one: fine


def test_prepared_uri_must_be_complete_and_match_backbone_and_max_length(tmp_path, prepared_tiny, tiny_cfg):
    assert run_inputs.check_prepared(str(prepared_tiny), tiny_cfg)["labels"]
    with pytest.raises(ConfigError, match="prepared_uri: .* is not prepared data"):
        run_inputs.check_prepared(str(tmp_path), tiny_cfg)
    other = load_config({**tiny_cfg.to_dict(), "data": {**tiny_cfg.to_dict()["data"], "max_length": 40}})
    with pytest.raises(ConfigError, match=r"prepared with data.max_length=32, this run has 40; set data.max_length=32"):
        run_inputs.check_prepared(str(prepared_tiny), other)


def test_init_from_names_production_a_version_or_a_uri(tmp_path, out):
    with pytest.raises(ConfigError, match=f"init_from: no production version of {NAME} under"):
        run_inputs.resolve_init_from("production", out, NAME)
    v1 = publish(tmp_path, out, "v1")
    registry.promote(out, NAME, "v1", reason="first")
    assert run_inputs.resolve_init_from("production", out, NAME) == v1
    assert run_inputs.resolve_init_from("v1", out, NAME) == v1
    assert run_inputs.resolve_init_from(v1, out, NAME) == v1
    with pytest.raises(ConfigError, match=r"init_from: .*/v9: no manifest.json"):
        run_inputs.resolve_init_from("v9", out, NAME)


def test_eval_uri_must_exist_and_be_a_table(tmp_path):
    with pytest.raises(ConfigError, match="gate.eval_uri: .*missing.csv: no such file"):
        run_inputs.check_eval_uri(load_config({"gate": {"eval_uri": str(tmp_path / "missing.csv")}}))
    with pytest.raises(ConfigError, match="gate.eval_uri: .*x.txt: unsupported file type"):
        run_inputs.check_eval_uri(load_config({"gate": {"eval_uri": str(tmp_path / "x.txt")}}))


def test_fingerprint_changes_with_the_data_and_not_without(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,b\n")
    first = storage.fingerprint([str(path)])
    assert storage.fingerprint([str(path)]) == first
    path.write_text("text,label\na,cc\n")
    assert storage.fingerprint([str(path)]) != first


def test_the_gate_deck_leads_with_the_decision_and_lists_regressed_classes():
    from tasks import decks

    production = scores({"a": 27, "b": 27, "c": 27})
    decision = {**gate.compare(scores({"a": 30, "b": 30, "c": 24}), production, GateConfig(metric="accuracy"), "v1"),
                "production_version": "v1", "eval_sets": {"test split": {"rows": 90}},
                "candidate": {"n_examples": 90, "accuracy": 0.93, "macro_f1": 0.93},
                "production": {"n_examples": 90, "accuracy": 0.9, "macro_f1": 0.9}}
    page = decks.gate(decision)
    assert page.startswith("<p><b>not promoted</b>: class F1 dropped beyond gate.max_class_drop=0.05: &#x27;c&#x27;")
    assert "production v1" in page and "<td>c</td>" in page and "Classes that regressed" in page
