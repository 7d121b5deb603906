"""What a cluster receives must work on day one.

Checked on the protobufs `pyflyte package` writes, and by running the first task the way a pod
does: `pyflyte-execute` with the serialised task's own arguments, inputs as a literal file, an
execution id in a cluster domain, and the raw output prefix in a bucket (moto on loopback).
"""

import io
import os
import posixpath
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from flyteidl.admin import launch_plan_pb2, workflow_pb2
from flyteidl.core import errors_pb2, literals_pb2

from flytetune.config import AUTO, ConfigError, FinetuneConfig, load_config
from flytetune.locations import DURABLE_ENV
from flytetune.storage.uri import is_local
from tests.cluster.harness import cli_literal, python_value
from tests.conftest import IMAGE, LIGHT_IMAGE, REPO, primary_container, task_specs

LIGHT = {"tasks.steps.resolve", "tasks.steps.copy_and_prepare", "tasks.steps.copy_dataset", "tasks.steps.prepare",
         "tasks.steps.prepared_data", "tasks.steps.publish", "tasks.steps.publish_backbone",
         "workflows.watchdog.remind"}
TASKS = {*LIGHT, "tasks.finetune.train_on_preset", "tasks.finetune.train", "tasks.finetune.train_distributed",
         "tasks.finetune.evaluate", "tasks.prune.prune_model"}
# Tasks that may read or write s3://: the dataset, --prepared_uri, --from_checkpoint, --init_from, checkpoints,
# production's model for the gate, the published model and the registry; the model, corpus and output of prune.
S3_TASKS = {"tasks.steps.resolve", "tasks.steps.copy_dataset", "tasks.steps.prepared_data", "tasks.steps.publish",
            "tasks.steps.publish_backbone",
            "tasks.finetune.train", "tasks.finetune.train_distributed", "tasks.finetune.evaluate",
            "workflows.watchdog.remind", "tasks.prune.prune_model"}


def test_every_task_asks_for_explicit_resources(package):
    specs = task_specs(package)
    assert set(specs) == TASKS
    for name, spec in specs.items():
        resources = primary_container(spec.template)["resources"]
        for side in ("requests", "limits"):
            for key in ("cpu", "memory", "ephemeral-storage"):
                assert resources.get(side, {}).get(key), f"{name}: no {side}.{key}: the platform default would apply"


def test_copy_and_prepare_are_cached_on_the_cluster_by_what_changes_their_output(package):
    """What propeller's data catalog keys on: the task's cache version and its inputs (the copy's
    output literal carries the dataset's SHA-256 as its hash, set at run time by HashMethod)."""
    from tasks.steps import COPY_CACHE_VERSION, PREPARE_CACHE_VERSION

    specs = task_specs(package)
    cached = {name for name, spec in specs.items() if spec.template.metadata.discoverable}
    assert cached == {"tasks.steps.copy_dataset", "tasks.steps.prepare"}
    copy, prepare = specs["tasks.steps.copy_dataset"].template, specs["tasks.steps.prepare"].template
    assert copy.metadata.discovery_version == COPY_CACHE_VERSION
    assert prepare.metadata.discovery_version == PREPARE_CACHE_VERSION
    # The weekly kickoff time changes every week, the data may not: not part of the copy's key.
    assert list(copy.metadata.cache_ignore_input_vars) == ["kickoff_time"]
    # prepare sees the data settings, not the whole config: epochs or learning rate do not invalidate it.
    assert set(prepare.interface.inputs.variables) == {"dataset", "settings"}


def test_tasks_without_torch_run_in_the_light_image(package):
    images = {name: primary_container(spec.template)["image"] for name, spec in task_specs(package).items()}
    assert {name for name, image in images.items() if image == LIGHT_IMAGE} == LIGHT
    assert {name for name, image in images.items() if image == IMAGE} == TASKS - LIGHT
    # What such a pod does first: load its task by module and name, in an environment with no torch.
    code = (
        "import importlib.abc, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from flytekit.core.python_auto_container import default_task_resolver\n"
        f"for module, _, name in {sorted(n.rpartition('.') for n in LIGHT)!r}:\n"
        "    default_task_resolver.load_task(['task-module', module, 'task-name', name])\n"
        "assert 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_s3_tasks_carry_the_aws_web_identity(package):
    specs = task_specs(package)
    for name in TASKS:
        template = specs[name].template
        env = {e["name"]: e["value"] for e in primary_container(template).get("env", [])}
        if name not in S3_TASKS:
            continue
        assert env.get("AWS_WEB_IDENTITY_TOKEN_FILE") == "/var/run/secrets/flytetune/aws/token", name
        pod = str(template.k8s_pod.pod_spec)
        assert "sts.amazonaws.com" in pod and "/var/run/secrets/flytetune/aws" in pod, name
        assert "AWS_SECRET_ACCESS_KEY" not in str(template) and "AWS_ACCESS_KEY_ID" not in str(template)


def test_fast_registration_unpacks_where_the_image_user_can_write(tmp_path):
    """`pyflyte run --remote` (fast registration, destination `.`): each pod unpacks the code into the
    image's working directory, which uid 1000 owns (tests/test_images.py checks the Dockerfile)."""
    from tests.test_images import lineage, values

    out = tmp_path / "fast.tgz"
    subprocess.run([str(Path(sys.executable).parent / "pyflyte"), "--pkgs", "workflows", "package", "--image", IMAGE,
                    "--copy", "all", "--in-container-source-path", ".", "-o", str(out), "--force"],
                   cwd=REPO, check=True, capture_output=True)
    with tarfile.open(out) as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    for name, spec in task_specs(blobs).items():
        container = primary_container(spec.template)
        args = container["args"]
        assert args[0] == "pyflyte-fast-execute", name
        workdir = values(lineage("light" if container["image"] == LIGHT_IMAGE else "train"), "WORKDIR")[-1]
        dest = posixpath.normpath(posixpath.join(workdir, args[args.index("--dest-dir") + 1]))
        assert dest == workdir, f"{name}: code unpacked into {dest}, not the user's {workdir}"
    # The code bundle carries the configs as they are now, not as the image has them.
    (code,) = [b for n, b in blobs.items() if n.startswith("fast") and n.endswith(".tar.gz")]
    with tarfile.open(fileobj=io.BytesIO(code)) as tar:
        bundled = {m.name: m for m in tar.getmembers()}
        resources = tar.extractfile(bundled["configs/resources.yaml"]).read()
    assert resources == (REPO / "configs" / "resources.yaml").read_bytes()
    assert "configs/presets/a100.yaml" in bundled and not any(n.startswith(".venv") for n in bundled)
    # Read by the copy_and_prepare pod when it applies the run's size.
    assert tar_bytes(code, "configs/prepare_sizes.yaml") == (REPO / "configs" / "prepare_sizes.yaml").read_bytes()


def tar_bytes(archive: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return tar.extractfile(name).read()


def launch_plans(package) -> dict[str, launch_plan_pb2.LaunchPlanSpec]:
    plans = {}
    for name, blob in package.items():
        if name.endswith("_3.pb"):
            plan = launch_plan_pb2.LaunchPlan()
            plan.ParseFromString(blob)
            plans[plan.id.name] = plan.spec
    return plans


def test_launch_plans_keep_checkpoints_and_models_off_the_pod(package):
    plans = launch_plans(package)
    # The workflow's default plan is what `pyflyte run --remote` with no arguments starts.
    assert set(plans) == {"workflows.finetune.finetune", "finetune_weekly_a100", "finetune_debug_t4",
                          "workflows.pretrain.pretrain", "workflows.prune.prune", "workflows.watchdog.watchdog",
                          "watchdog_every_30_min"}
    # The cost guard's plans train nothing (tests/test_watchdog.py); pruning has no default output_uri.
    for name in ("workflows.watchdog.watchdog", "watchdog_every_30_min", "workflows.prune.prune"):
        del plans[name]
    for name, spec in plans.items():
        inputs = {k: p.default for k, p in spec.default_inputs.parameters.items() if p.HasField("default")}
        inputs.update(spec.fixed_inputs.literals)
        cfg = python_value(inputs["config"], FinetuneConfig)
        output_uri = python_value(inputs["output_uri"], str)
        for key, value in (("checkpoint.uri", cfg.checkpoint.uri), ("output_uri", output_uri)):
            assert value is not None, f"{name}: {key} is off"
            assert value == AUTO or not is_local(value), f"{name}: {key}={value!r} lives and dies with the pod"
    weekly = plans["finetune_weekly_a100"]
    assert python_value(weekly.default_inputs.parameters["config"].default, FinetuneConfig).checkpoint.every_minutes


def test_training_receives_the_config_resolve_returns(package):
    (blob,) = [b for n, b in package.items() if n.endswith("workflows.finetune.finetune_2.pb")]
    spec = workflow_pb2.WorkflowSpec()
    spec.ParseFromString(blob)
    nodes = {n.metadata.name: n for n in spec.template.nodes}
    resolve_id = nodes["resolve"].id
    for consumer in ("train_on_preset", "evaluate", "publish"):
        (binding,) = [b.binding.promise for b in nodes[consumer].inputs if b.var == "cfg"]
        assert (binding.node_id, binding.var) == (resolve_id, "cfg"), consumer
    # Copy and prepare take what resolve checked (the data's fingerprint, the data settings, the prepare
    # size `auto` resolved to): a typo fails in resolve before any data moves.
    copy_and_prepare = nodes["data"].branch_node.if_else.case.then_node
    bound = {b.var: b.binding.promise for b in copy_and_prepare.inputs}
    assert (bound["fingerprint"].node_id, bound["fingerprint"].var) == (resolve_id, "dataset_fingerprint")
    assert (bound["settings"].node_id, bound["settings"].var) == (resolve_id, "prepare_settings")
    assert (bound["prepare_size"].node_id, bound["prepare_size"].var) == (resolve_id, "prepare_size")


def run_as_pod(package, task: str, inputs: dict[str, literals_pb2.Literal], tmp: Path, raw_prefix: str,
               env: dict[str, str] | None = None) -> tuple[dict | None, str | None]:
    """Run a packaged task as its pod would: its own container args, Flyte's template variables filled in.

    Returns (outputs, None) or (None, the error message the UI would show).
    """
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "inputs.pb").write_bytes(literals_pb2.LiteralMap(literals=inputs).SerializeToString())
    values = {"{{.input}}": str(tmp / "inputs.pb"), "{{.outputPrefix}}": str(tmp / "out"),
              "{{.rawOutputDataPrefix}}": raw_prefix, "{{.checkpointOutputPrefix}}": str(tmp / "flyte-ckpt"),
              "{{.prevCheckpointPrefix}}": '""'}
    args = [values.get(a, a) for a in primary_container(task_specs(package)[task].template)["args"]]
    # The variables propeller sets in every task pod (flyteplugins' flytek8s/k8s_resource_adds.go).
    pod_env = {**os.environ, "FLYTE_INTERNAL_EXECUTION_ID": "f7a3c9e1d",
               "FLYTE_INTERNAL_EXECUTION_PROJECT": "flytetune",
               "FLYTE_INTERNAL_EXECUTION_DOMAIN": "development", "FLYTE_ATTEMPT_NUMBER": "0", **(env or {})}
    bin_dir = Path(sys.executable).parent
    done = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=REPO, env=pod_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 or (tmp / "out" / "error.pb").exists(), done.stderr[-3000:]
    if (tmp / "out" / "error.pb").exists():
        error = errors_pb2.ErrorDocument()
        error.ParseFromString((tmp / "out" / "error.pb").read_bytes())
        return None, error.error.message
    outputs = literals_pb2.LiteralMap()
    outputs.ParseFromString((tmp / "out" / "outputs.pb").read_bytes())
    return dict(outputs.literals), None


def resolve_inputs(config: literals_pb2.Literal, output_uri: str = AUTO) -> dict[str, literals_pb2.Literal]:
    def text(value: str) -> literals_pb2.Literal:
        return literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(string_value=value)))

    from google.protobuf.timestamp_pb2 import Timestamp

    from flytetune.exports import NO_CUTOFF

    none = literals_pb2.Literal(scalar=literals_pb2.Scalar(none_type=literals_pb2.Void()))
    newest = Timestamp()
    newest.FromDatetime(NO_CUTOFF)
    return {"config": config, "overrides": text("train.epochs=2"), "preset": text("t4"),
            "output_uri": text(output_uri), "from_checkpoint": none,
            "dataset_uri": text(str(REPO / "flytetune" / "sample" / "transactions.parquet")), "test_uri": none,
            "kickoff_time": literals_pb2.Literal(scalar=literals_pb2.Scalar(
                primitive=literals_pb2.Primitive(datetime=newest))),
            "retrain_anyway": literals_pb2.Literal(scalar=literals_pb2.Scalar(
                primitive=literals_pb2.Primitive(boolean=False))),
            "prepared_uri": text(""), "init_from": none, "prepare_size": text("auto"),
            "objective": text("classification")}


def test_a_config_edited_after_the_image_was_built_reaches_training(package, s3_bucket, tmp_path):
    """`pyflyte run --remote ... --config my.yaml`: the YAML is read on the laptop and travels as the input."""
    edited = tmp_path / "my.yaml"
    edited.write_text("data: {max_length: 40}\ntrain: {learning_rate: 1.234e-4}\n")
    config = cli_literal(FinetuneConfig, str(edited))
    assert "my.yaml" not in str(config), "the file's content travels, not its path"

    outputs, error = run_as_pod(package, "tasks.steps.resolve", resolve_inputs(config), tmp_path / "pod",
                                raw_prefix=f"s3://{s3_bucket}/raw/ab/f7a3c9e1d-n0-0")
    assert error is None, error
    cfg = python_value(outputs["cfg"], FinetuneConfig)
    assert (cfg.data.max_length, cfg.train.learning_rate, cfg.train.epochs) == (40, 1.234e-4, 2)
    # `auto` resolved in the pod, from the sample's bytes.
    assert python_value(outputs["prepare_size"], str) == "standard"
    # On a cluster, `auto` means the execution's bucket: checkpoints outlive a preempted pod.
    assert cfg.checkpoint.uri == f"s3://{s3_bucket}/flytetune/checkpoints"
    assert python_value(outputs["output_uri"], str) == f"s3://{s3_bucket}/flytetune/models"


def test_the_platform_can_name_the_durable_bucket(package, s3_bucket, tmp_path):
    config = cli_literal(FinetuneConfig, str(REPO / "configs" / "local.yaml"))
    outputs, error = run_as_pod(package, "tasks.steps.resolve", resolve_inputs(config), tmp_path,
                                raw_prefix="gs://cluster-bucket/raw", env={DURABLE_ENV: f"s3://{s3_bucket}/flytetune/"})
    assert error is None, error
    assert python_value(outputs["cfg"], FinetuneConfig).checkpoint.uri == f"s3://{s3_bucket}/flytetune/checkpoints"


@pytest.mark.parametrize("config, output_uri, problem", [
    ("checkpoint: {uri: checkpoints}\n", AUTO, "checkpoint.uri: 'checkpoints' is a path inside the pod"),
    ("checkpoint: {uri: /mnt/ckpt}\n", AUTO, "checkpoint.uri: '/mnt/ckpt' is a path inside the pod"),
    ("{}\n", "artifacts", "output_uri: 'artifacts' is a path inside the pod"),
    ("{}\n", "file:///tmp/models", "output_uri: 'file:///tmp/models' is a path inside the pod"),
])
def test_a_local_path_on_a_cluster_fails_in_the_first_task(package, s3_bucket, tmp_path, config, output_uri, problem):
    path = tmp_path / "cfg.yaml"
    path.write_text(config)
    outputs, error = run_as_pod(package, "tasks.steps.resolve",
                                resolve_inputs(cli_literal(FinetuneConfig, str(path)), output_uri), tmp_path / "pod",
                                raw_prefix=f"s3://{s3_bucket}/raw")
    assert outputs is None and problem in error


def test_an_unwritable_output_fails_in_the_first_task(package, s3_bucket, tmp_path):
    """A typo in a bucket name fails before data moves, not after hours of training."""
    config = cli_literal(FinetuneConfig, str(REPO / "configs" / "local.yaml"))
    outputs, error = run_as_pod(package, "tasks.steps.resolve",
                                resolve_inputs(config, f"s3://{s3_bucket}-typo/models"), tmp_path,
                                raw_prefix=f"s3://{s3_bucket}/raw")
    assert outputs is None and f"output_uri: s3://{s3_bucket}-typo/models: not writable" in error


def test_a_bad_config_file_fails_on_the_laptop_naming_the_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train: {epoch: 2}\n")
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key \(did you mean train\.epochs\?\)"):
        cli_literal(FinetuneConfig, str(path))


def test_config_input_goes_through_the_same_checks_as_a_file():
    assert FinetuneConfig.from_json('{"train": {"epochs": 2}}') == load_config(None, ["train.epochs=2"])
    with pytest.raises(ConfigError, match=r"config: data.max_length: must be between 8 and 512"):
        FinetuneConfig.from_json('{"data": {"max_length": 4}}')


def test_a_gpu_preset_on_a_node_without_a_usable_gpu_fails_at_once(package, s3_bucket, tmp_path):
    """A driver too old for torch's CUDA leaves torch without a GPU: paying for the GPU while training
    on CPU is worse than failing, so on a cluster the training task stops before touching the data."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine
    from flytekit.types.directory import FlyteDirectory

    ctx = FlyteContextManager.current_context()
    inputs = {"prepared": TypeEngine.to_literal(ctx, FlyteDirectory(f"s3://{s3_bucket}/no-such-prepared"),
                                                FlyteDirectory, TypeEngine.to_literal_type(FlyteDirectory)),
              "cfg": TypeEngine.to_literal(ctx, FinetuneConfig(), FinetuneConfig,
                                           TypeEngine.to_literal_type(FinetuneConfig))}
    inputs = {k: v.to_flyte_idl() for k, v in inputs.items()}
    inputs.update({k: v for k, v in resolve_inputs(inputs["cfg"]).items() if k in ("preset",)})
    inputs["resume_from"] = literals_pb2.Literal(scalar=literals_pb2.Scalar(none_type=literals_pb2.Void()))
    inputs["init_from"] = inputs["resume_from"]
    outputs, error = run_as_pod(package, "tasks.finetune.train", inputs, tmp_path, raw_prefix=f"s3://{s3_bucket}/raw")
    assert outputs is None
    assert "preset t4 asks for 1 GPU(s) but torch" in error and "NVIDIA driver must support CUDA" in error


def test_s3_through_the_pods_web_identity_no_keys(s3_bucket, tmp_path):
    """What an S3 task's pod has on GKE: a projected token file and a role, no access keys. boto3
    exchanges the token with STS (moto's, at AWS_ENDPOINT_URL) by itself; the token is never printed."""
    from flytetune import storage

    storage.write_text(f"s3://{s3_bucket}/data/train.csv", "text,label\n")
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2lnbmF0dXJl")
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_WEB_IDENTITY_TOKEN_FILE=str(token), AWS_ROLE_ARN="arn:aws:iam::123456789012:role/flytetune-s3")

    def copy(dest: Path, **extra) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flytetune.storage", "copy", f"s3://{s3_bucket}/data/train.csv",
                               str(dest)], env={**env, **extra}, cwd=REPO, capture_output=True, text=True, timeout=120)

    done = copy(tmp_path / "train.csv")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "train.csv").read_text() == "text,label\n"
    # Without the role the platform provides: one line that says so, and no token in it.
    env.pop("AWS_ROLE_ARN")
    failed = copy(tmp_path / "again.csv")
    assert failed.returncode == 2 and "AWS credentials are misconfigured" in failed.stderr
    assert token.read_text() not in failed.stdout + failed.stderr + done.stdout + done.stderr
