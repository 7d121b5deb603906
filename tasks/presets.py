"""A hardware preset as the keyword arguments of `with_overrides` on the training task: the one place presets apply."""

from datetime import timedelta

from flytekit import PodTemplate, Resources
from flytekit.extras import accelerators
from kubernetes.client import V1Container, V1EnvVar, V1PodSpec

from flytetune.presets import Preset

# Read by tasks/finetune.py when the pod imports it: with nnodes=1 the Elastic plugin serialises
# no process count (the pod just re-imports the task), so the pod template carries it.
PROCESSES_ENV = "FLYTETUNE_PROCESSES_PER_NODE"

# flytekit's constants, by the device name they send; GKE names that flytekit spells differently
# (nvidia-h100-80gb) or lacks become plain GPUAccelerators with the GKE name.
_FLYTEKIT_ACCELERATORS = {a.to_flyte_idl().device: a for a in (
    accelerators.T4, accelerators.L4, accelerators.V100, accelerators.P100, accelerators.P4,
    accelerators.A100, accelerators.A100_80GB,
)}


def accelerator(name: str) -> accelerators.BaseAccelerator:
    return _FLYTEKIT_ACCELERATORS.get(name) or accelerators.GPUAccelerator(name)


def _resources(spec) -> Resources:
    return Resources(cpu=spec.cpu, mem=spec.mem, gpu=spec.gpu or None, ephemeral_storage=spec.ephemeral_storage)


def pod_template(preset: Preset) -> PodTemplate:
    """Labels and environment only: no node selector, so spot placement stays with `interruptible`."""
    env = {**preset.env, PROCESSES_ENV: str(preset.processes_per_node)}
    container = V1Container(name="primary", env=[V1EnvVar(name=k, value=v) for k, v in sorted(env.items())])
    return PodTemplate(pod_spec=V1PodSpec(containers=[container]), primary_container_name="primary",
                       labels=dict(preset.labels))


def overrides(preset: Preset) -> dict:
    kwargs = dict(
        requests=_resources(preset.requests),
        limits=_resources(preset.limits),
        interruptible=preset.interruptible,
        retries=preset.retries,
        timeout=timedelta(hours=preset.timeout_hours),
        pod_template=pod_template(preset),
    )
    if preset.accelerator:
        kwargs["accelerator"] = accelerator(preset.accelerator)
    if preset.shared_memory:
        kwargs["shared_memory"] = preset.shared_memory
    return kwargs
