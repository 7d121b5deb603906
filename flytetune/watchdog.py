"""The cost guard: one reminder about each execution that has been running longer than its preset allows.

A GPU run that hangs, or that someone started and forgot, costs money until someone notices. The
scheduled watchdog (workflows/watchdog.py) lists the running executions, turns each into a
`RunningExecution` with `from_admin`, and calls `remind`, which

- picks the executions running longer than their preset's `remind_after_hours` (`due`),
- posts one message per execution to a Slack-compatible webhook (`{"text": ...}`): the execution,
  its preset, its running time, the estimated cost so far (hours x the preset's `hourly_usd`, the
  price of the whole node) and a link to the Flyte UI,
- remembers each reminder as a small object `<state_uri>/reminded/<project>/<domain>/<name>.json`,
  created only if absent (`storage.write_bytes_if(..., None)`), so a later run, or one running at the
  same time, does not post again. The marker is created before the post and removed if the post fails,
  so the next run retries; a post that reached Slack but whose answer was lost is posted again.

No Flyte import: the records are plain data, the listing is the JSON form of flyteidl messages.
The webhook URL is a secret (its path is the credential): it is never logged or put in an error.
"""

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

from flytetune import storage
from flytetune.presets import Preset

log = logging.getLogger(__name__)

# The training workflows and the default of their `preset` input (workflows/finetune.py, pretrain.py);
# tests/test_watchdog.py checks this against every workflow with a `preset` input.
FINETUNE_WORKFLOW = "workflows.finetune.finetune"
PRETRAIN_WORKFLOW = "workflows.pretrain.pretrain"
DEFAULT_PRESET = "cpu"
TRAINING_WORKFLOWS = {FINETUNE_WORKFLOW: DEFAULT_PRESET, PRETRAIN_WORKFLOW: DEFAULT_PRESET}
# A training execution whose inputs flyteadmin did not return (offloaded): reminded about after the
# shortest threshold of all presets, with no cost estimate.
UNKNOWN_PRESET = "unknown"
RUNNING = "RUNNING"
WEBHOOK_TIMEOUT_S = 10.0


class WebhookError(RuntimeError):
    """A reminder could not be posted; one line naming the webhook's host, never its URL."""


@dataclass(frozen=True)
class RunningExecution:
    """What the watchdog needs to know of one workflow execution."""

    project: str
    domain: str
    name: str
    workflow: str
    launch_plan: str
    # The hardware preset it trains on; None: not a training run (no `preset` input), never reminded about.
    preset: Optional[str]
    started_at: datetime  # UTC
    phase: str = RUNNING

    @property
    def key(self) -> str:
        return f"{self.project}/{self.domain}/{self.name}"

    def url(self, console_url: str) -> str:
        """The execution's page in the Flyte UI; `console_url` ends in /console."""
        return f"{console_url.rstrip('/')}/projects/{self.project}/domains/{self.domain}/executions/{self.name}"


@dataclass(frozen=True)
class Reminder:
    execution: RunningExecution
    running_hours: float
    threshold_hours: float
    hourly_usd: Optional[float]

    @property
    def cost_usd(self) -> Optional[float]:
        return None if self.hourly_usd is None else self.running_hours * self.hourly_usd

    def text(self, console_url: str) -> str:
        """The message: plain text with a bare link, which Slack, Mattermost and Teams' Slack mode all render."""
        e = self.execution
        if self.cost_usd is None:
            cost = "Cost unknown (no hourly_usd for this preset)"
        else:
            cost = (f"About ${self.cost_usd:,.2f} so far (estimate: {_duration(self.running_hours)} x "
                    f"${self.hourly_usd:,.2f}/h for the node, on-demand price)")
        return (f"Still running after {_duration(self.running_hours)}: execution {e.name} "
                f"({e.launch_plan}, {e.project}/{e.domain}) on preset {e.preset}, "
                f"over its {_duration(self.threshold_hours)} reminder threshold. {cost}. "
                f"If it is stuck or forgotten, stop it: {e.url(console_url)}")


@dataclass
class Report:
    posted: list[str] = field(default_factory=list)  # execution keys reminded about in this run
    already: list[str] = field(default_factory=list)  # due, but reminded about before (or by a run beside this one)
    failed: list[str] = field(default_factory=list)


def from_admin(execution: Mapping, inputs: Optional[Mapping]) -> RunningExecution:
    """A record from flyteadmin's answers in their JSON form (protobuf `MessageToDict`, camelCase keys):
    `execution` a `flyteidl.admin.Execution` of a listing, `inputs` the `full_inputs` literal map of
    `GetExecutionData` (a listing carries no inputs), None when flyteadmin did not inline them."""
    ident, spec, closure = execution["id"], execution.get("spec", {}), execution.get("closure", {})
    workflow = closure.get("workflowId", {}).get("name", "")
    preset = _string_input(inputs, "preset")
    if preset is None and workflow in TRAINING_WORKFLOWS:
        preset = UNKNOWN_PRESET if not inputs else TRAINING_WORKFLOWS[workflow]
    # A running execution has started_at; created_at stands in for one that has not started yet.
    started = closure.get("startedAt") or closure.get("createdAt")
    if not started:
        raise ValueError(f"execution {ident.get('name')!r}: neither startedAt nor createdAt in its closure")
    return RunningExecution(
        project=ident["project"], domain=ident["domain"], name=ident["name"], workflow=workflow,
        launch_plan=spec.get("launchPlan", {}).get("name", ""), preset=preset,
        started_at=_utc(started), phase=closure.get("phase", "UNDEFINED"))


def due(executions: Iterable[RunningExecution], presets: Mapping[str, Preset], now: datetime) -> list[Reminder]:
    """The running training executions past their preset's `remind_after_hours`, longest-running first.

    A preset not in `presets` (a YAML path, a preset deleted since, or unknown inputs) gets the
    shortest threshold of all presets and no cost estimate: better an early reminder than none.
    """
    now = _utc(now)
    fallback = min((p.remind_after_hours for p in presets.values()), default=1.0)
    out = []
    for e in executions:
        if e.phase != RUNNING or e.preset is None:
            continue
        preset = presets.get(e.preset)
        threshold = preset.remind_after_hours if preset else fallback
        hours = max(0.0, (now - e.started_at).total_seconds() / 3600)
        if hours > threshold:
            out.append(Reminder(e, hours, threshold, preset.hourly_usd if preset else None))
    return sorted(out, key=lambda r: -r.running_hours)


def marker_uri(state_uri: str, execution: RunningExecution) -> str:
    return f"{state_uri.rstrip('/')}/reminded/{execution.key}.json"


def remind(executions: Iterable[RunningExecution], presets: Mapping[str, Preset], now: datetime, *,
           webhook_url: str, state_uri: str, console_url: str, timeout_s: float = WEBHOOK_TIMEOUT_S) -> Report:
    """Post one reminder about each due execution not reminded about before; see the module docstring.

    Every due execution is tried; if any post failed, WebhookError (one line, the host and the cause)
    is raised at the end, after the markers of the failed posts were removed.
    """
    report = Report()
    errors = []
    for reminder in due(executions, presets, now):
        e = reminder.execution
        marker = marker_uri(state_uri, e)
        record = {"execution": e.key, "preset": e.preset, "started_at": e.started_at.isoformat(),
                  "reminded_at": _utc(now).isoformat(), "running_hours": round(reminder.running_hours, 3),
                  "cost_usd": None if reminder.cost_usd is None else round(reminder.cost_usd, 2)}
        try:
            storage.write_bytes_if(marker, (json.dumps(record, indent=2) + "\n").encode(), None)
        except storage.PreconditionFailed:
            report.already.append(e.key)
            continue
        try:
            post(webhook_url, reminder.text(console_url), timeout_s=timeout_s)
        except WebhookError as err:
            storage.remove(marker)
            report.failed.append(e.key)
            errors.append(str(err))
            log.warning("not reminded about %s: %s (the next run retries)", e.key, err)
            continue
        report.posted.append(e.key)
        log.info("reminded about %s: preset %s, running %s", e.key, e.preset, _duration(reminder.running_hours))
    if errors:
        raise WebhookError(f"{errors[0]}; {len(errors)} of {len(errors) + len(report.posted)} reminders "
                           f"not posted, the next run retries")
    return report


def post(webhook_url: str, text: str, timeout_s: float = WEBHOOK_TIMEOUT_S) -> None:
    """POST `{"text": text}` as JSON to a Slack-compatible incoming webhook.

    WebhookError names the host (`webhook hooks.slack.com: HTTP 404 ...`), never the URL, whose path is
    the credential; the cause is not chained, so no traceback carries the URL either.
    """
    parts = urllib.parse.urlsplit(webhook_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(f"webhook: the secret is not an http(s) URL (scheme {parts.scheme or 'none'!r})")
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    request = urllib.request.Request(webhook_url.strip(), data=json.dumps({"text": text}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    problem = None
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as e:
        # Slack answers errors in a word (`invalid_token`, `no_service`); keep it short and without the URL.
        body = e.read(200).decode("utf-8", "replace").replace(parts.path, "...")
        problem = f"HTTP {e.code} {e.reason}" + (f" ({' '.join(body.split())[:100]})" if body.strip() else "")
    except urllib.error.URLError as e:
        reason = e.reason
        problem = f"no answer within {timeout_s:g} s" if isinstance(reason, TimeoutError) else _cause(reason)
    except TimeoutError:  # socket.timeout is TimeoutError
        problem = f"no answer within {timeout_s:g} s"
    except OSError as e:
        problem = _cause(e)
    if problem is not None:
        raise WebhookError(f"webhook {host}: {problem}")


def _cause(reason) -> str:
    if isinstance(reason, OSError):
        return reason.strerror or type(reason).__name__
    return str(reason)


def _string_input(inputs: Optional[Mapping], name: str) -> Optional[str]:
    literal = (inputs or {}).get("literals", {}).get(name)
    if literal is None:
        return None
    return literal.get("scalar", {}).get("primitive", {}).get("stringValue")


def _utc(value: datetime | str) -> datetime:
    if isinstance(value, str):  # RFC 3339, as protobuf's JSON writes a Timestamp ("...Z", 0-9 decimals)
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        raise ValueError(f"{value!r}: a time without a time zone")
    return value.astimezone(timezone.utc)


def _duration(hours: float) -> str:
    minutes = int(round(hours * 60))
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes % 60 else f"{minutes // 60} h"
