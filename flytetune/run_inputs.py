"""Where a run starts from, checked before any data moves: new data, prepared data, warm-start weights.

The first task (and `python -m flytetune.train`) calls these, so that each mistake is one line
naming the option, long before a GPU is asked for.
"""

import json
from pathlib import Path

from flytetune import artifacts, registry, storage
from flytetune.config import ConfigError, FinetuneConfig
from flytetune.data import LABELLED_READERS, DataError
from flytetune.prepare import META, TEST_TEXTS

PRODUCTION = "production"


def check_new_data(located: dict[str, dict], output_uri: str, name: str, retrain_anyway: bool) -> None:
    """Refuse to retrain on an export that is not newer than the one production was trained on
    (a schedule firing twice, or no new export since last week), unless `retrain_anyway`."""
    export = located["dataset"]["export"]
    pointer = registry.production(output_uri, name)
    if export is None or pointer is None or retrain_anyway:
        return
    trained_on = (artifacts.read_manifest(pointer["run_uri"])["data"].get("exports") or {}).get("dataset")
    if not trained_on:
        return  # production was trained on a fixed file: nothing to compare dates with
    # Both in the lineage's one UTC format (flytetune/exports.py), so the strings compare as dates.
    if export.lineage()["date"] <= trained_on["date"]:
        raise DataError(f"{located['dataset']['uri']}: no export newer than production {pointer['version']}'s "
                        f"({trained_on['uri']}); the newest usable one is {export.uri}; set retrain_anyway "
                        "to train on it anyway")


def check_prepared(prepared_uri: str, cfg: FinetuneConfig) -> dict:
    """The meta of a prepared-data folder this run can train on; ConfigError naming prepared_uri if not."""
    meta_uri = artifacts.join(prepared_uri, META)
    if not storage.exists(meta_uri):
        raise ConfigError(f"prepared_uri: {prepared_uri} is not prepared data (no {META}; incomplete or wrong folder)")
    meta = json.loads(storage.read_bytes(meta_uri))
    for key, theirs, ours in (("model.backbone", meta.get("tokenizer"), cfg.model.backbone),
                              ("data.max_length", meta.get("max_length"), cfg.data.max_length)):
        if theirs != ours:
            raise ConfigError(f"prepared_uri: {prepared_uri} was prepared with {key}={theirs!r}, this run has "
                              f"{ours!r}; set {key}={theirs!r} or prepare again")
    if not storage.exists(artifacts.join(prepared_uri, TEST_TEXTS)):
        raise ConfigError(f"prepared_uri: {prepared_uri} has no {TEST_TEXTS} (prepared by an older version); "
                          "prepare again")
    return meta


def resolve_init_from(value: str, output_uri: str, name: str) -> str:
    """The published run folder to warm-start from: `production`, a version of `name` under
    `output_uri`, or a run folder URI. ConfigError naming init_from unless it has a manifest."""
    if value == PRODUCTION:
        pointer = registry.production(output_uri, name)
        if pointer is None:
            raise ConfigError(f"init_from: no production version of {name} under {output_uri} yet")
        uri = pointer["run_uri"]
    elif "://" in value or value.startswith(("/", ".")) or Path(value).is_dir():
        uri = value
    else:
        uri = artifacts.join(output_uri, name, value)
    try:
        artifacts.read_manifest(uri)
    except (FileNotFoundError, storage.StorageError) as e:
        raise ConfigError(f"init_from: {e}") from None
    return uri


def check_eval_uri(cfg: FinetuneConfig) -> None:
    uri = cfg.gate.eval_uri
    if uri is None:
        return
    # Scoring needs labels: text lines (.txt) hold none.
    if Path(uri).suffix.lower() not in LABELLED_READERS:
        raise ConfigError(f"gate.eval_uri: {uri}: unsupported file type; use one of {', '.join(LABELLED_READERS)}")
    if storage.stat(uri) is None:
        raise ConfigError(f"gate.eval_uri: {uri}: no such file")
