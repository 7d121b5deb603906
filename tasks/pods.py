"""What a task's pod carries beyond its container: resources from configs/, and the AWS web identity.

S3 access from GKE uses workload identity federation, no stored keys (README, "Deploy to GKE"):
the pod gets a Kubernetes service-account token for the audience AWS trusts, and boto3 exchanges it
(AssumeRoleWithWebIdentity) for the role in `AWS_ROLE_ARN`, which the platform sets for every pod.
"""

from pathlib import Path
from typing import Optional

from flytekit import PodTemplate, Resources
from kubernetes.client import (
    V1Container,
    V1EnvVar,
    V1PodSpec,
    V1ProjectedVolumeSource,
    V1ServiceAccountTokenProjection,
    V1Volume,
    V1VolumeMount,
    V1VolumeProjection,
)

from flytetune.config import ConfigError
from flytetune.presets import ResourceSpec, load_prepare_sizes, load_step_resources

# Found from this file, not the working directory: the same in a checkout, the image and a fast-registered pod.
STEP_RESOURCES = Path(__file__).resolve().parents[1] / "configs" / "resources.yaml"
PREPARE_SIZES = Path(__file__).resolve().parents[1] / "configs" / "prepare_sizes.yaml"
# Tasks that need no torch run in a light image (docker/Dockerfile, target `light`), pushed beside
# the train image: <registry>/flytetune-train:<tag> -> <registry>/flytetune-train-light:<tag>.
LIGHT_IMAGE = "{{.image.default.fqn}}-light:{{.image.default.version}}"

AWS_AUDIENCE = "sts.amazonaws.com"
AWS_TOKEN_DIR = "/var/run/secrets/flytetune/aws"
AWS_TOKEN_FILE = f"{AWS_TOKEN_DIR}/token"
_AWS_VOLUME = "aws-web-identity"


def resources(spec: ResourceSpec) -> Resources:
    return Resources(cpu=spec.cpu, mem=spec.mem, gpu=spec.gpu or None, ephemeral_storage=spec.ephemeral_storage)


def step(name: str) -> dict:
    """The @task keyword arguments for a CPU step's requests and limits."""
    spec = load_step_resources(STEP_RESOURCES)[name]
    return dict(requests=resources(spec.requests), limits=resources(spec.limits))


def prepare_resources(name: Optional[str] = None) -> dict:
    """The requests and limits of a prepare size (configs/prepare_sizes.yaml; default: the first, the
    smallest), as @task or with_overrides keyword arguments."""
    sizes = load_prepare_sizes(PREPARE_SIZES)
    name = name or next(iter(sizes))
    if name not in sizes:  # `auto` too: resolve turns it into a size
        raise ConfigError(f"prepare_size: {name!r} is not a prepare size; one of {', '.join(sizes)} ({PREPARE_SIZES})")
    spec = sizes[name]
    return dict(requests=resources(spec.requests), limits=resources(spec.limits))


def pod_template(env: Optional[dict[str, str]] = None, labels: Optional[dict[str, str]] = None) -> PodTemplate:
    """A primary container with the AWS web identity mounted, plus `env` and pod `labels`.

    No node selector: spot placement stays with `interruptible`, so the platform can move the
    last attempt to an on-demand node.
    """
    env = {**(env or {}), "AWS_WEB_IDENTITY_TOKEN_FILE": AWS_TOKEN_FILE}
    container = V1Container(
        name="primary",
        env=[V1EnvVar(name=k, value=v) for k, v in sorted(env.items())],
        volume_mounts=[V1VolumeMount(name=_AWS_VOLUME, mount_path=AWS_TOKEN_DIR, read_only=True)],
    )
    # The kubelet refreshes a projected token before it expires; boto3 re-reads the file.
    token = V1ServiceAccountTokenProjection(audience=AWS_AUDIENCE, expiration_seconds=3600, path="token")
    volume = V1Volume(name=_AWS_VOLUME,
                      projected=V1ProjectedVolumeSource(sources=[V1VolumeProjection(service_account_token=token)]))
    return PodTemplate(pod_spec=V1PodSpec(containers=[container], volumes=[volume]),
                       primary_container_name="primary", labels=labels)
