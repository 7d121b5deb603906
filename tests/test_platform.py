"""The platform side of the presets: helm values for flyte-core and flyte-binary, and the client config.

Flyte lowers every request and limit above its task resource limits to them, and refuses to
register a task asking for more, so a preset that does not fit would silently train on less.
Both charts must carry the same settings, each at the path its chart reads.
"""

from decimal import Decimal

import pytest
import yaml

from flytetune.presets import available, load_prepare_sizes, load_preset
from tests.conftest import REPO

FLYTE_CONFIGS = REPO / "configs" / "flyte"
STEP_RESOURCES = REPO / "configs" / "resources.yaml"
PREPARE_SIZES = REPO / "configs" / "prepare_sizes.yaml"
CHARTS = ["flyte-core", "flyte-binary"]

# preset / resources.yaml field -> flyteadmin TaskResourceSet key (flyteadmin/pkg/runtime/interfaces).
RESOURCE_KEYS = {"cpu": "cpu", "mem": "memory", "gpu": "gpu", "ephemeral_storage": "ephemeralStorage"}

_SUFFIXES = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def quantity(value) -> Decimal:
    """A Kubernetes quantity (500m, 16Gi, "8", 8) as a number of base units."""
    text = str(value).strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return Decimal(text)


def test_quantity_parses_kubernetes_forms():
    assert quantity("500m") == Decimal("0.5")
    assert quantity("16Gi") == 16 * 2**30
    assert quantity("1800Gi") > quantity("1000G")
    assert quantity("8") == quantity(8) == 8
    assert quantity("200") > quantity("46")


def load_values(chart: str) -> dict:
    return yaml.safe_load((FLYTE_CONFIGS / f"values-{chart}.yaml").read_text(encoding="utf-8"))


def platform(chart: str) -> dict:
    """The settings flytetune relies on, read from where each chart puts them."""
    values = load_values(chart)
    if chart == "flyte-core":
        # configmap.task_resource_defaults -> task_resource_defaults.yaml, configmap.core -> core.yaml,
        # configmap.k8s -> k8s.yaml (charts/flyte-core/templates/{admin,propeller}/configmap.yaml).
        cm = values["configmap"]
        sections = {"task_resources": cm["task_resource_defaults"]["task_resources"],
                    "propeller": cm["core"]["propeller"], "k8s": cm["k8s"]["plugins"]["k8s"]}
    else:
        # configuration.inline -> 100-inline-config.yaml (charts/flyte-binary/templates/configmap.yaml).
        inline = values["configuration"]["inline"]
        sections = {"task_resources": inline["task_resources"], "propeller": inline["propeller"],
                    "k8s": inline["plugins"]["k8s"]}
    # A null value deletes the chart's (or an underlying values file's) key in helm's merge.
    sections["task_resources"] = {
        level: {k: v for k, v in (sections["task_resources"].get(level) or {}).items() if v is not None}
        for level in ("defaults", "limits")
    }
    return sections


@pytest.fixture(params=CHARTS)
def chart(request) -> str:
    return request.param


def _requirements(spec, where: str) -> list[tuple[str, str, Decimal]]:
    """(where, TaskResourceSet key, quantity) for every resource a preset or step asks for."""
    get = spec.get if isinstance(spec, dict) else lambda k: getattr(spec, k, None)
    return [(f"{where}.{field}", key, quantity(get(field)))
            for field, key in RESOURCE_KEYS.items() if get(field) not in (None, 0, "0")]


def _assert_fit(limits: dict, needs: list[tuple[str, str, Decimal]], chart: str):
    for where, key, needed in needs:
        assert key in limits, f"{chart}: no task resource limit for {key}, needed by {where}"
        assert quantity(limits[key]) >= needed, (
            f"{chart}: task resource limit {key}={limits[key]} is below {where} ({needed}); "
            f"Flyte would lower it to the limit")


def test_values_files_parse(chart):
    values = load_values(chart)
    assert isinstance(values, dict)
    assert set(platform(chart)["task_resources"]) == {"defaults", "limits"}


def test_task_resource_keys_are_flyteadmins(chart):
    """flyteadmin reads only cpu, gpu, memory, ephemeralStorage: any other key is silently ignored."""
    for level, values in platform(chart)["task_resources"].items():
        unknown = set(values) - set(RESOURCE_KEYS.values())
        assert not unknown, f"{chart}: task_resources.{level}: unknown keys {sorted(unknown)}"


@pytest.mark.parametrize("preset_name", available())
def test_limits_cover_every_preset(in_repo, chart, preset_name):
    preset = load_preset(preset_name)
    limits = platform(chart)["task_resources"]["limits"]
    needs = _requirements(preset.requests, f"{preset_name}.requests") + \
        _requirements(preset.limits, f"{preset_name}.limits")
    _assert_fit(limits, needs, chart)


def test_presets_are_found():
    # Guards the parametrisation above: no presets would mean no checks.
    assert {"cpu", "t4", "a100", "a100x4", "h100x8"} <= set(available())


def test_limits_cover_every_step(chart):
    steps = yaml.safe_load(STEP_RESOURCES.read_text(encoding="utf-8"))
    assert steps, f"{STEP_RESOURCES}: no steps"
    limits = platform(chart)["task_resources"]["limits"]
    for name, spec in steps.items():
        _assert_fit(limits, _requirements(spec["requests"], f"{name}.requests")
                    + _requirements(spec["limits"], f"{name}.limits"), chart)


def test_limits_cover_every_prepare_size(chart):
    sizes = load_prepare_sizes(PREPARE_SIZES)
    assert sizes, f"{PREPARE_SIZES}: no sizes"
    limits = platform(chart)["task_resources"]["limits"]
    for name, size in sizes.items():
        _assert_fit(limits, _requirements(size.requests, f"prepare size {name}.requests")
                    + _requirements(size.limits, f"prepare size {name}.limits"), chart)


def test_defaults_within_limits_and_no_default_gpu(chart):
    resources = platform(chart)["task_resources"]
    for key, value in resources["defaults"].items():
        assert key in resources["limits"], f"{chart}: default {key} has no limit"
        assert quantity(value) <= quantity(resources["limits"][key]), f"{chart}: default {key} above its limit"
    # A default GPU would give every task, CPU steps included, a GPU.
    assert "gpu" not in resources["defaults"]


def test_charts_carry_the_same_platform_settings():
    core, binary = platform("flyte-core"), platform("flyte-binary")
    assert core == binary


def test_platform_settings(chart):
    settings = platform(chart)
    node_config = settings["propeller"]["node-config"]
    assert node_config["ignore-retry-cause"] is True
    assert node_config["interruptible-failure-threshold"] == -1
    assert settings["propeller"]["rawoutput-prefix"].startswith("gs://")

    k8s = settings["k8s"]
    assert k8s["gpu-device-node-label"] == "cloud.google.com/gke-accelerator"
    assert k8s["gpu-resource-name"] == "nvidia.com/gpu"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        k8s["resource-tolerations"]["nvidia.com/gpu"]
    assert k8s["interruptible-node-selector-requirement"] == {
        "key": "cloud.google.com/gke-spot", "operator": "In", "values": ["true"]}
    assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"} in \
        k8s["interruptible-tolerations"]
    # The last, on-demand attempt must not land on a spot node again.
    assert k8s["non-interruptible-node-selector-requirement"] == {
        "key": "cloud.google.com/gke-spot", "operator": "DoesNotExist"}

    env = k8s["default-env-vars"]
    assert isinstance(env, dict), "default-env-vars is a map (flytek8s/config/config.go DefaultEnvVars)"
    assert env["FLYTETUNE_DURABLE_URI"].startswith(("gs://", "s3://"))
    assert env["AWS_ROLE_ARN"].startswith("arn:aws:iam::") and env["AWS_ROLE_ARN"].endswith(":role/flytetune-s3")


def test_only_the_two_values_files():
    """One values file per chart; the old flyte-core-only file would drift from them."""
    assert sorted(p.name for p in FLYTE_CONFIGS.glob("*values*.yaml")) == \
        ["values-flyte-binary.yaml", "values-flyte-core.yaml"]


def test_client_config_has_no_default_image():
    """flytekit takes the default image from --image only; `images.default` here would be ignored."""
    config = yaml.safe_load((FLYTE_CONFIGS / "config.yaml").read_text(encoding="utf-8"))
    assert "default" not in (config.get("images") or {})
    assert config["admin"]["endpoint"]
