"""`pyflyte run` twice: unchanged data and data settings skip copy and prepare (flytekit's local cache),
whatever the prepare size; a change of max_length prepares again. The same cache keys (the copy's
fingerprint input, the dataset's HashMethod hash, the data settings) are what flytepropeller's data
catalog uses on a cluster."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, SAMPLE, TINY_CONFIG

PYFLYTE = Path(sys.executable).parent / "pyflyte"


def cache_decisions(home: Path, out: Path, dataset: Path, *overrides: str,
                    args: tuple[str, ...] = ()) -> dict[str, str]:
    """Run the workflow locally; return {task name: "hit" | "miss"} from flytekit's cache log lines,
    after checking that the published manifest names `dataset` as the source."""
    env = {**os.environ, "HOME": str(home), "FLYTE_LOCAL_CACHE_ENABLED": "true", "FLYTE_SDK_LOGGING_LEVEL": "20",
           "FLYTE_SDK_RICH_TRACEBACKS": "0"}
    overrides = " ".join(["train.max_steps=1", "checkpoint.uri=null", *overrides])
    done = subprocess.run(
        [str(PYFLYTE), "run", "workflows/finetune.py", "finetune", "--config", str(TINY_CONFIG), "--output_uri",
         str(out), "--dataset_uri", str(dataset), "--overrides", overrides, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "Published(" in log, log[-3000:]
    (run_uri,) = re.findall(r"artifacts_uri='([^']+)'", log)
    assert json.loads(Path(run_uri, "manifest.json").read_text())["data"]["sources"] == [str(dataset)]
    found = re.findall(r"Checking cache for task named (\S+?),.*?(Cache hit|Cache miss)", log, flags=re.S)
    return {task.rpartition(".")[2]: decision.split()[1] for task, decision in found}


def test_a_second_run_with_unchanged_data_skips_copy_and_prepare(tmp_path):
    home, out, dataset = tmp_path / "home", tmp_path / "bucket", tmp_path / "data.parquet"
    dataset.write_bytes(SAMPLE.read_bytes())
    assert cache_decisions(home, out, dataset) == {"copy_dataset": "miss", "prepare": "miss"}
    # Another learning rate changes training, not the prepared data; another prepare size changes the
    # pod prepare would run on, not its output (the size is not part of prepare's cache key).
    assert cache_decisions(home, out, dataset, "train.learning_rate=1e-4", args=("--prepare_size", "large")) == {
        "copy_dataset": "hit", "prepare": "hit"}
    # max_length changes the tokenised features: the copy is reused, prepare runs again.
    assert cache_decisions(home, out, dataset, "data.max_length=40") == {"copy_dataset": "hit", "prepare": "miss"}
    # The same bytes under another name: copied (another source), but prepare is keyed by the content's
    # hash, not by where this execution's copy lives; the manifest still names the new source.
    moved = dataset.rename(tmp_path / "moved.parquet")
    assert cache_decisions(home, out, moved) == {"copy_dataset": "miss", "prepare": "hit"}
