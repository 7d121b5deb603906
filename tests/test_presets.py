"""Presets, checked on what a cluster receives: `pyflyte package` protobufs and the dynamic job spec.

The training node's resources come from the preset at run time (a @dynamic applies
`with_overrides`), so the per-preset checks read the DynamicJobSpec that the dynamic task hands
to propeller, produced by flytekit's own serialisation.
"""

import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from flyteidl.admin import launch_plan_pb2
from flyteidl.core import dynamic_job_pb2

from flytetune.config import ConfigError, FinetuneConfig
from flytetune.presets import GKE_ACCELERATORS, available, load_preset
from tests.conftest import IMAGE, REPO, primary_container, task_specs

PRESETS = ["a100", "a100-80gb", "a100x4", "cpu", "h100x8", "t4"]


@pytest.fixture(autouse=True)
def _in_repo(in_repo):
    """Presets are found relative to the project root, as in `make` and in the image."""


def compile_dynamic(task, values: dict, type_hints: dict) -> dynamic_job_pb2.DynamicJobSpec:
    """What a @dynamic task's pod returns to propeller (futures.pb) for these inputs."""
    from flytekit.configuration import ImageConfig, SerializationSettings
    from flytekit.core.context_manager import ExecutionState, FlyteContextManager
    from flytekit.core.type_engine import TypeEngine

    # flytekit compiles a dynamic's body once per process (a pod runs it once); compile afresh here.
    task._wf = None
    settings = SerializationSettings(image_config=ImageConfig.auto(img_name=IMAGE))
    ctx = FlyteContextManager.current_context()
    with FlyteContextManager.with_context(ctx.with_serialization_settings(settings)) as ctx:
        mode = ctx.execution_state.with_params(mode=ExecutionState.Mode.TASK_EXECUTION)
        with FlyteContextManager.with_context(ctx.with_execution_state(mode)) as ctx:
            inputs = TypeEngine.dict_to_literal_map(ctx, values, type_hints=type_hints)
            return task.dispatch_execute(ctx, inputs).to_flyte_idl()


def compile_training_node(preset: str) -> dynamic_job_pb2.DynamicJobSpec:
    """What the `train_on_preset` pod returns to propeller for this preset."""
    from flytekit.types.directory import FlyteDirectory

    from tasks.finetune import train_on_preset

    return compile_dynamic(
        train_on_preset,
        {"prepared": FlyteDirectory("gs://bucket/prepared"), "cfg": FinetuneConfig(), "resume_from": None,
         "preset": preset},
        {"prepared": FlyteDirectory, "cfg": FinetuneConfig, "resume_from": Optional[str], "preset": str})


def resources(entries) -> dict[str, str]:
    names = {1: "cpu", 2: "gpu", 3: "mem", 4: "storage", 5: "ephemeral_storage"}
    return {names[e.name]: e.value for e in entries}


def test_every_preset_loads():
    assert available() == PRESETS
    for name in PRESETS:
        preset = load_preset(name)
        assert preset.name == name
        assert (preset.accelerator is None) == (preset.gpus == 0)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_reaches_the_cluster_as_written(name):
    preset = load_preset(name)
    spec = compile_training_node(name)
    (node,) = spec.nodes
    (task,) = spec.tasks

    # The one training task (or its data-parallel twin), in the release image.
    assert task.id.name == ("tasks.finetune.train_distributed" if preset.distributed
                                     else "tasks.finetune.train")
    assert primary_container(task)["image"] == IMAGE
    assert node.id == f"train-{name}"

    overrides = node.task_node.overrides
    requests, limits = resources(overrides.resources.requests), resources(overrides.resources.limits)
    assert requests["cpu"] == preset.requests.cpu and limits["cpu"] == preset.limits.cpu
    assert requests["mem"] == preset.requests.mem and limits["mem"] == preset.limits.mem
    assert requests["ephemeral_storage"] == preset.requests.ephemeral_storage
    assert requests.get("gpu") == limits.get("gpu") == (str(preset.gpus) if preset.gpus else None)
    extended = overrides.extended_resources
    assert extended.gpu_accelerator.device == (preset.accelerator or "")
    assert extended.shared_memory.size_limit == preset.shared_memory
    assert extended.shared_memory.mount_path == "/dev/shm"

    assert node.metadata.interruptible is True
    assert effective_retries(node, task) == preset.retries
    assert node.metadata.timeout.seconds == int(preset.timeout_hours * 3600)

    template = overrides.pod_template
    assert template.primary_container_name == "primary"
    assert dict(template.metadata.labels) == preset.labels
    pod_spec = dict(template.pod_spec)
    # Spot placement is the platform's job (interruptible): no selector may pin the last attempt to spot.
    assert "nodeSelector" not in pod_spec and "affinity" not in pod_spec
    assert "gke-spot" not in str(template) and "gke-preemptible" not in str(template)
    (container,) = pod_spec["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FLYTETUNE_PROCESSES_PER_NODE"] == str(preset.processes_per_node)
    # The preset's template replaces the task's: it must keep the AWS web identity (tasks/pods.py).
    assert env["AWS_WEB_IDENTITY_TOKEN_FILE"] == "/var/run/secrets/flytetune/aws/token"
    assert "sts.amazonaws.com" in str(pod_spec["volumes"])


def effective_retries(node, task) -> int:
    """The retries propeller runs a node with: the node's, unless 0, then the task's
    (flytepropeller/pkg/compiler/transformers/k8s/utils.go, computeRetryStrategy)."""
    return node.metadata.retries.retries or task.metadata.retries.retries


def test_a_preset_can_switch_retries_off(tmp_path):
    path = tmp_path / "no-retries.yaml"
    path.write_text((REPO / "configs" / "presets" / "t4.yaml").read_text().replace("retries: 3", "retries: 0"))
    assert load_preset(str(path)).retries == 0
    spec = compile_training_node(str(path))
    (node,), (task,) = spec.nodes, spec.tasks
    assert effective_retries(node, task) == 0


def test_multi_gpu_preset_runs_one_process_per_gpu():
    preset = load_preset("a100x4")
    assert preset.distributed and preset.processes_per_node == preset.gpus == 4
    from tasks.finetune import train_distributed

    # nnodes=1: a plain pod running torch elastic; the plugin serialises it as a python-task.
    assert train_distributed.task_config.nnodes == 1
    assert train_distributed.task_type == "python-task"


def test_gke_accelerator_names_not_flytekit_h100():
    from flytekit.extras import accelerators

    from tasks.presets import accelerator

    assert accelerators.H100.to_flyte_idl().device == "nvidia-h100"  # flytekit's name: no GKE node has it
    assert accelerator("nvidia-h100-80gb").to_flyte_idl().device == "nvidia-h100-80gb"
    assert accelerator("nvidia-tesla-t4") is accelerators.T4
    assert accelerator("nvidia-a100-80gb") is accelerators.A100_80GB
    assert "nvidia-h100" not in GKE_ACCELERATORS


# The tasks the presets put on GPUs (tasks/presets.py, in train_on_preset's dynamic workflow).
TRAINING_TASKS = ("tasks.finetune.train", "tasks.finetune.train_distributed")


def test_static_task_specs(package):
    specs = task_specs(package)
    for name in TRAINING_TASKS:
        spec = specs[name]
        assert spec.template.metadata.interruptible is True
        assert spec.template.metadata.retries.retries == 0, "the preset's retries apply (see effective_retries)"
        assert spec.template.metadata.timeout.seconds == 12 * 3600
        assert primary_container(spec.template)["image"] == IMAGE
    # Everything else runs on small, on-demand CPU pods.
    for name in ("tasks.steps.resolve", "tasks.steps.copy_dataset", "tasks.steps.copy_and_prepare",
                 "tasks.steps.prepare", "tasks.finetune.train_on_preset", "tasks.finetune.evaluate",
                 "tasks.steps.publish"):
        template = specs[name].template
        assert not template.metadata.interruptible
        assert not template.HasField("extended_resources") or not template.extended_resources.gpu_accelerator.device
    # Whatever a later change adds: a task that can hold a GPU (or a spot node) ends by itself.
    for name, spec in specs.items():
        template = spec.template
        gpu = "gpu" in {**resources(template.container.resources.requests),
                        **resources(template.container.resources.limits)}
        accelerator = template.HasField("extended_resources") and template.extended_resources.gpu_accelerator.device
        if gpu or accelerator or template.metadata.interruptible or name in TRAINING_TASKS:
            assert template.metadata.timeout.seconds > 0, f"{name}: may hold a GPU and has no timeout"


def test_launch_plans_pin_their_preset(package):
    plans = {}
    for name, blob in package.items():
        if name.endswith("_3.pb") and "finetune_" in name and "workflows." not in name:
            plan = launch_plan_pb2.LaunchPlan()
            plan.ParseFromString(blob)
            plans[plan.id.name] = plan.spec
    assert set(plans) == {"finetune_weekly_a100", "finetune_debug_t4"}
    weekly = plans["finetune_weekly_a100"]
    assert weekly.entity_metadata.schedule.cron_schedule.schedule == "0 3 * * 1"
    assert weekly.fixed_inputs.literals["preset"].scalar.primitive.string_value == "a100"
    assert plans["finetune_debug_t4"].fixed_inputs.literals["preset"].scalar.primitive.string_value == "t4"


@pytest.mark.parametrize("text, problem", [
    ("requests: {gpu: 1}\nlimits: {gpu: 2}\naccelerator: nvidia-tesla-t4\n", "requests.gpu: must equal limits.gpu"),
    ("requests: {gpu: 1}\nlimits: {gpu: 1}\naccelerator: nvidia-h100\n", "did you mean nvidia-h100"),
    ("requests: {gpu: 1}\nlimits: {gpu: 1}\n", "accelerator: required"),
    ("limits: {mem: lots}\n", "limits.mem: 'lots' is not a Kubernetes quantity"),
    ("requests: {gpu: 2}\nlimits: {gpu: 2}\naccelerator: nvidia-l4\nprocesses_per_node: 4\n",
     "processes_per_node: must not exceed the 2 GPU(s)"),
    ("retrys: 3\n", "retrys: unknown key (did you mean retries?)"),
    ("node_selector: {cloud.google.com/gke-spot: 'true'}\n", "node_selector: unknown key"),
])
def test_bad_preset_names_the_key(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(problem)) as e:
        load_preset(str(path))
    assert str(path) in str(e.value)


def test_unknown_preset_suggests_one():
    with pytest.raises(ConfigError, match=r"preset 'a10': not found .*did you mean a100\?"):
        load_preset("a10")


def test_gpu_preset_runs_on_cpu_with_a_notice(tmp_path):
    pyflyte = str(Path(sys.executable).parent / "pyflyte")
    done = subprocess.run([pyflyte, "run", "workflows/finetune.py", "finetune", "--config", "configs/tiny.yaml",
                           "--overrides", "train.max_steps=2 checkpoint.uri=null", "--output_uri", str(tmp_path),
                           "--preset", "t4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert output.count("preset t4 asks for 1 GPU(s) but none is visible: training on CPU") == 1
    assert "Published(" in output


def test_multi_gpu_preset_runs_data_parallel_locally(tmp_path, tiny_backbone):
    """Elastic starts 2 CPU processes locally (no pod template); rank 0 checkpoints under the run's prefix."""
    pyflyte = str(Path(sys.executable).parent / "pyflyte")
    done = subprocess.run([pyflyte, "run", "workflows/finetune.py", "finetune", "--config", "configs/tiny.yaml",
                           "--overrides", f"train.max_steps=4 checkpoint.uri={tmp_path / 'ckpt'} checkpoint.keep=5 "
                                          f"model.backbone={tiny_backbone}",
                           "--output_uri", str(tmp_path / "out"), "--preset", "a100x4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert output.count("preset a100x4 asks for 4 GPU(s) but none is visible: training on CPU") == 2
    (run,) = (tmp_path / "ckpt").iterdir()
    assert run.name != "" and [p.name for p in run.iterdir()] == ["step-000004"]
    assert "Published(" in output
