"""The cost guard on a schedule: every 30 minutes, one reminder about each training run that runs too long.

    pyflyte register workflows --image IMAGE --version VERSION --copy none
    kubectl -n flytetune-production create secret generic watchdog --from-literal=webhook_url=https://hooks.slack.com/services/...
    flytectl update launchplan -p flytetune -d production watchdog_every_30_min --version VERSION --activate

Lists the running executions of a project through FlyteRemote, reads each one's `preset` input, and
hands them to `flytetune.watchdog.remind` (thresholds and prices: configs/presets/*.yaml). The webhook
URL is a Flyte secret; reminders already posted are remembered under `state_uri`.
"""

import dataclasses
from datetime import datetime, timedelta, timezone
from pathlib import Path

from flytekit import CronSchedule, LaunchPlan, Secret, current_context, task, workflow
from flytekit.configuration import Config, PlatformConfig
from flytekit.models.filters import Filter
from flytekit.remote import FlyteRemote
from google.protobuf.json_format import MessageToDict

from flytetune import storage
from flytetune import watchdog as guard
from flytetune.config import AUTO, ConfigError
from flytetune.presets import load_all
from tasks.context import durable_root
from tasks.pods import LIGHT_IMAGE, pod_template, step
from workflows.notifications import PROBLEMS, notify

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "presets"
# A Kubernetes secret `watchdog` with the key `webhook_url` in the execution's namespace (README, "Cost guard").
WEBHOOK = Secret(group="watchdog", key="webhook_url")
# flyteadmin's gRPC service seen from a pod: the flyte-binary release `flyte-backend` of the README's
# "Deploy to GKE" (flyte-core: flyteadmin.flyte.svc.cluster.local:81).
ADMIN_ENDPOINT = "flyte-backend-flyte-binary-grpc.flyte.svc.cluster.local:8089"
CONSOLE_URL = "https://flyte.ml.example.com/console"  # configs/flyte/config.yaml's console, plus /console
DOMAINS = ["development", "staging", "production"]
PAGE_SIZE = 100

def connect(admin_endpoint: str, insecure: bool, project: str) -> FlyteRemote:
    """FlyteRemote at `admin_endpoint`; credentials, if the platform needs any, from the pod's FLYTE_* variables."""
    platform = dataclasses.replace(PlatformConfig.auto(), endpoint=admin_endpoint, insecure=insecure)
    return FlyteRemote(Config(platform=platform), default_project=project, default_domain=DOMAINS[0])


def list_running(remote: FlyteRemote, project: str, domain: str,
                 page_size: int = PAGE_SIZE) -> list[guard.RunningExecution]:
    """The executions flyteadmin reports RUNNING in one project and domain, every page, with their inputs.

    A listing carries no inputs (flyteadmin clears them), so each execution's `preset` comes from
    GetExecutionData, which returns the inputs with the launch plan's defaults and fixed inputs merged in.
    """
    running, token = [], None
    while True:
        page, token = remote.client.list_executions_paginated(
            project, domain, limit=page_size, token=token, filters=[Filter.from_python_std("eq(phase,RUNNING)")])
        for execution in page:
            data = remote.client.get_execution_data(execution.id)
            inputs = MessageToDict(data.full_inputs.to_flyte_idl()) if data.full_inputs.literals else None
            running.append(guard.from_admin(MessageToDict(execution.to_flyte_idl()), inputs))
        if not token:
            return running


def state_location(state_uri: str) -> str:
    """`auto`: the cluster's durable prefix (flytetune/locations.py) plus /watchdog; artifacts/watchdog locally.
    In a pod, a local path is refused: it ends with the pod, and every run would remind again."""
    root = durable_root()
    if state_uri == AUTO:
        return f"{root}/watchdog" if root else "artifacts/watchdog"
    if root and storage.is_local(state_uri):
        raise ConfigError(f"state_uri: {state_uri!r} is a path inside the pod, lost when the pod ends (every run "
                          f"would remind again); use s3://, gs:// or `auto` ({root}/watchdog)")
    return state_uri


# On demand (not interruptible) and small; a hung listing must not pile up behind the next schedule.
@task(container_image=LIGHT_IMAGE, pod_template=pod_template(), secret_requests=[WEBHOOK],
      timeout=timedelta(minutes=10), **step("watchdog"))
def remind(project: str, domains: list[str], console_url: str, state_uri: str, admin_endpoint: str,
           admin_insecure: bool) -> list[str]:
    """Post one reminder about each execution running longer than its preset's `remind_after_hours`;
    return the executions reminded about in this run (`project/domain/name`)."""
    state = state_location(state_uri)
    webhook_url = current_context().secrets.get(WEBHOOK.group, WEBHOOK.key)
    remote = connect(admin_endpoint, admin_insecure, project)
    running = [e for domain in domains for e in list_running(remote, project, domain)]
    report = guard.remind(running, load_all(PRESETS), datetime.now(timezone.utc), webhook_url=webhook_url,
                          state_uri=state, console_url=console_url)
    return report.posted


@workflow
def watchdog(project: str = "flytetune", domains: list[str] = DOMAINS, console_url: str = CONSOLE_URL,
             state_uri: str = AUTO, admin_endpoint: str = ADMIN_ENDPOINT, admin_insecure: bool = True) -> list[str]:
    """Remind the team, once per execution, of training runs past their preset's threshold."""
    return remind(project=project, domains=domains, console_url=console_url, state_uri=state_uri,
                  admin_endpoint=admin_endpoint, admin_insecure=admin_insecure)


# Every 30 minutes (UTC). A failed run (webhook down, flyteadmin unreachable) reaches the team by email.
watchdog_every_30_min = LaunchPlan.get_or_create(
    watchdog,
    name="watchdog_every_30_min",
    schedule=CronSchedule(schedule="*/30 * * * *"),
    notifications=notify(PROBLEMS),
)
