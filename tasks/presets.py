"""A hardware preset as the keyword arguments of `with_overrides` on the training task: the one place presets apply."""

from datetime import timedelta

from flytekit.extras import accelerators

from flytetune.presets import Preset
from tasks.pods import pod_template, resources

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


def overrides(preset: Preset) -> dict:
    kwargs = dict(
        requests=resources(preset.requests),
        limits=resources(preset.limits),
        interruptible=preset.interruptible,
        # A node's retries of 0 fall back to the task's (propeller's compiler, transformers/k8s/utils.go):
        # the training tasks declare 0, so a preset's 0 means no retry.
        retries=preset.retries,
        timeout=timedelta(hours=preset.timeout_hours),
        # Replaces the task's pod template: keeps the AWS identity, adds the preset's labels and environment.
        pod_template=pod_template({**preset.env, PROCESSES_ENV: str(preset.processes_per_node)}, dict(preset.labels)),
    )
    if preset.accelerator:
        kwargs["accelerator"] = accelerator(preset.accelerator)
    if preset.shared_memory:
        kwargs["shared_memory"] = preset.shared_memory
    return kwargs
