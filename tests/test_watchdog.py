"""The cost guard: decisions on a recorded flyteadmin listing, reminders posted to a webhook receiver on
127.0.0.1, state on local disk and loopback S3, and the scheduled task run as its pod runs it, against a
gRPC flyteadmin on loopback that serves the recording."""

import json
import logging
import re
import socket
import sys
import threading
import time
from concurrent import futures
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from croniter import croniter
from flyteidl.admin import execution_pb2
from flyteidl.core import execution_pb2 as core_execution_pb2
from flyteidl.core import literals_pb2
from flyteidl.service import admin_pb2_grpc
from google.protobuf.json_format import ParseDict

from flytetune import storage
from flytetune import watchdog as guard
from flytetune.config import ConfigError
from flytetune.presets import load_all, load_preset
from tests.cluster.harness import python_value
from tests.conftest import LIGHT_IMAGE, REPO, primary_container, task_specs
from tests.test_cluster import launch_plans, run_as_pod

RECORDED = json.loads((Path(__file__).parent / "data" / "watchdog_executions.json").read_text())
NOW = datetime.fromisoformat(RECORDED["now"])
PRESETS = load_all(REPO / "configs" / "presets")
CONSOLE = "https://flyte.example.test/console"
# Slack's incoming-webhook URLs carry their credential in the path.
SECRET_PATH = "/services/T0FLYTE/B0TUNE/s3cr3tT0k3nD0N0tLog"
WEEKLY = "flytetune/production/f3k9x2a1b7c4d5e6f7g8"
BY_HAND, ON_CPU = "flytetune/development/a8d7c6b5e4f3", "flytetune/development/c1p2u3r4u5n6"


def recorded_executions() -> list[guard.RunningExecution]:
    return [guard.from_admin(row["execution"], row["inputs"]) for row in RECORDED["executions"]]


class Receiver:
    """A Slack-compatible incoming webhook on 127.0.0.1: records every POST, answers `status`."""

    def __init__(self):
        self.posts: list[dict] = []
        self.status = 200
        self.delay_s = 0.0
        self.url = ""

    def texts(self) -> list[str]:
        return [p["json"]["text"] for p in self.posts if p["status"] == 200]


@pytest.fixture
def webhook():
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(receiver.delay_s)
            receiver.posts.append({"path": self.path, "content_type": self.headers["Content-Type"],
                                   "json": json.loads(body), "status": receiver.status})
            answer = b"ok" if receiver.status == 200 else b"internal_error"
            self.send_response(receiver.status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):  # http.server logs each request's path, which is the secret
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # a client that gave up waiting: not our failure
            pass

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_port}{SECRET_PATH}"
    yield receiver
    server.shutdown()
    server.server_close()


def remind(executions, now, webhook_url, state_uri, **kwargs) -> guard.Report:
    return guard.remind(executions, PRESETS, now, webhook_url=webhook_url, state_uri=state_uri,
                        console_url=CONSOLE, **kwargs)


def test_the_recorded_listing_becomes_records():
    records = {r.key: r for r in recorded_executions()}
    weekly = records[WEEKLY]
    assert (weekly.preset, weekly.phase, weekly.launch_plan, weekly.workflow) == (
        "a100", "RUNNING", "finetune_weekly_a100", "workflows.finetune.finetune")
    assert weekly.started_at == datetime(2026, 11, 24, 6, 30, tzinfo=timezone.utc)
    assert records[BY_HAND].launch_plan == "workflows.finetune.finetune" and records[BY_HAND].preset == "a100"
    assert records[ON_CPU].preset == "cpu"
    assert records["flytetune/production/s9u8c7c6e5e4"].phase == "SUCCEEDED"
    # The watchdog's own execution has no preset: not a training run.
    assert records["flytetune/production/w4t5c6h7d8o9"].preset is None
    page = f"{CONSOLE}/projects/flytetune/domains/production/executions/f3k9x2a1b7c4d5e6f7g8"
    assert weekly.url(CONSOLE) == weekly.url(CONSOLE + "/") == page


def test_decisions_on_the_recorded_listing():
    (reminder,) = guard.due(recorded_executions(), PRESETS, NOW)
    assert reminder.execution.key == WEEKLY
    assert reminder.running_hours == pytest.approx(5.5)
    assert reminder.threshold_hours == 4 and reminder.hourly_usd == 3.67
    assert reminder.cost_usd == pytest.approx(5.5 * 3.67)
    # Thresholds are per preset: 3 h later the A100 run by hand (5 h) is due, and the CPU run (9 h) passes cpu's 8 h.
    later = guard.due(recorded_executions(), PRESETS, NOW + timedelta(hours=3))
    assert [(r.execution.key, round(r.running_hours, 2)) for r in later] == [
        (ON_CPU, 9.0), (WEEKLY, 8.5), (BY_HAND, 5.0)]
    assert later[0].cost_usd == pytest.approx(9 * 0.27)
    # The succeeded H100x8 run (20 h) and the watchdog itself are never due.
    assert all(r.execution.preset not in ("h100x8", None) for r in later)


def test_a_preset_the_watchdog_does_not_know_is_reminded_about_early_without_a_cost():
    weekly = RECORDED["executions"][0]
    # flyteadmin did not inline the inputs: the preset is unknown, not silently `cpu`.
    unknown = guard.from_admin(weekly["execution"], None)
    assert unknown.preset == guard.UNKNOWN_PRESET
    shortest = min(p.remind_after_hours for p in PRESETS.values())
    assert shortest == 3
    (reminder,) = guard.due([unknown], PRESETS, unknown.started_at + timedelta(hours=3.1))
    assert reminder.threshold_hours == shortest and reminder.cost_usd is None
    assert "Cost unknown" in reminder.text(CONSOLE)
    assert guard.due([unknown], PRESETS, unknown.started_at + timedelta(hours=2.9)) == []
    # Inputs without a preset (a version of the workflow from before it had one): the workflow's default.
    assert guard.from_admin(weekly["execution"], {"literals": {}}).preset == "cpu"


def test_a_pretraining_run_without_inputs_is_still_a_training_run():
    """workflows/pretrain.py trains on the same presets (h100x8 included): flyteadmin not inlining its
    inputs must not hide it from the cost guard."""
    weekly = RECORDED["executions"][0]["execution"]
    closure = {**weekly["closure"], "workflowId": {**weekly["closure"]["workflowId"],
                                                   "name": "workflows.pretrain.pretrain"}}
    pretrain = {**weekly, "closure": closure}
    assert guard.from_admin(pretrain, None).preset == guard.UNKNOWN_PRESET
    assert guard.from_admin(pretrain, {"literals": {}}).preset == "cpu"  # pretrain's own default
    unknown = guard.from_admin(pretrain, None)
    (reminder,) = guard.due([unknown], PRESETS, unknown.started_at + timedelta(hours=3.1))
    assert reminder.threshold_hours == min(p.remind_after_hours for p in PRESETS.values())


def test_every_workflow_with_a_preset_input_is_known_to_the_watchdog():
    """A new training workflow (one with a `preset` input) must be added to guard.TRAINING_WORKFLOWS with
    its default, or the watchdog never reminds about it when flyteadmin returns no inputs."""
    import importlib
    import inspect

    from flytekit.core.workflow import WorkflowBase

    found = {}
    for path in sorted((REPO / "workflows").glob("*.py")):
        module = importlib.import_module(f"workflows.{path.stem}")
        for value in vars(module).values():
            if isinstance(value, WorkflowBase) and value.name.startswith("workflows."):
                parameter = inspect.signature(value._workflow_function).parameters.get("preset")
                if parameter is not None:
                    found[value.name] = parameter.default
    assert found == guard.TRAINING_WORKFLOWS


def test_the_reminder_names_the_run_its_preset_time_cost_and_link(webhook, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    report = remind(recorded_executions(), NOW, webhook.url, str(tmp_path / "state"))
    assert report.posted == [WEEKLY] and report.failed == []
    (post,) = webhook.posts
    assert post["path"] == SECRET_PATH and post["content_type"] == "application/json"
    assert set(post["json"]) == {"text"}
    text = post["json"]["text"]
    assert "f3k9x2a1b7c4d5e6f7g8" in text and "finetune_weekly_a100" in text
    assert "preset a100" in text
    assert "5 h 30 min" in text
    assert f"${5.5 * 3.67:,.2f}" in text and "$3.67/h" in text
    assert f"{CONSOLE}/projects/flytetune/domains/production/executions/f3k9x2a1b7c4d5e6f7g8" in text
    # The webhook URL is a credential: not in the logs, not on the terminal.
    out, err = capfd.readouterr()
    assert "reminded about flytetune/production/f3k9x2a1b7c4d5e6f7g8" in caplog.text
    for shown in (caplog.text, out, err):
        assert "s3cr3t" not in shown and webhook.url not in shown


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_run_does_not_post_again(webhook, tmp_path, where, request):
    state = str(tmp_path / "state") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/watchdog"
    first = remind(recorded_executions(), NOW, webhook.url, state)
    second = remind(recorded_executions(), NOW + timedelta(minutes=30), webhook.url, state)
    assert first.posted == [WEEKLY] and second.posted == [] and second.already == [WEEKLY]
    assert len(webhook.posts) == 1
    marker = json.loads(storage.read_text(f"{state}/reminded/{WEEKLY}.json"))
    assert marker["preset"] == "a100" and marker["cost_usd"] == round(5.5 * 3.67, 2)
    assert marker["reminded_at"] == NOW.isoformat()
    # Hours later two more runs are due: each is reminded about once, the first one not again.
    third = remind(recorded_executions(), NOW + timedelta(hours=3), webhook.url, state)
    assert sorted(third.posted) == sorted([ON_CPU, BY_HAND]) and third.already == [WEEKLY]
    assert len(webhook.posts) == 3


def test_watchdog_runs_at_once_post_once(webhook, tmp_path):
    """Runs that overlap (a slow run and the next schedule) race for the marker; only the winner posts.
    Each round starts 6 runs at a barrier, with the interpreter switching threads as often as it can."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for round_ in range(15):
            state, start = str(tmp_path / f"state{round_}"), threading.Barrier(6)

            def run(_, state=state, start=start):
                start.wait()
                return remind(recorded_executions(), NOW, webhook.url, state)

            with futures.ThreadPoolExecutor(6) as pool:
                reports = list(pool.map(run, range(6)))
            assert sum(len(r.posted) for r in reports) == 1 and sum(len(r.already) for r in reports) == 5, round_
    finally:
        sys.setswitchinterval(switch)
    assert len(webhook.posts) == 15


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("failure", ["http 500", "closed port", "no answer"])
def test_a_failing_webhook_leaves_no_marker_and_the_next_run_retries(webhook, tmp_path, caplog, capfd, failure):
    caplog.set_level(logging.DEBUG)
    state = str(tmp_path / "state")
    url, host, cause = webhook.url, webhook.url.split("/")[2], None
    if failure == "http 500":
        webhook.status, cause = 500, "HTTP 500 Internal Server Error (internal_error)"
    elif failure == "closed port":
        host = f"127.0.0.1:{closed_port()}"
        url, cause = f"http://{host}{SECRET_PATH}", "Connection refused"
    else:
        webhook.delay_s, cause = 2.0, "no answer within 0.5 s"
    with pytest.raises(guard.WebhookError) as e:
        remind(recorded_executions(), NOW, url, state, timeout_s=0.5)
    message = str(e.value)
    assert message == f"webhook {host}: {cause}; 1 of 1 reminders not posted, the next run retries"
    # One line, and no chained exception whose traceback would show the URL.
    assert "\n" not in message and e.value.__cause__ is None and e.value.__context__ is None
    assert not storage.exists(f"{state}/reminded/{WEEKLY}.json")
    out, err = capfd.readouterr()
    for shown in (message, caplog.text, out, err):
        assert "s3cr3t" not in shown

    webhook.status, webhook.delay_s = 200, 0.0
    retried = remind(recorded_executions(), NOW + timedelta(minutes=30), webhook.url, state)
    assert retried.posted == [WEEKLY] and len(webhook.texts()) == 1
    assert storage.exists(f"{state}/reminded/{WEEKLY}.json")


def test_a_webhook_secret_that_is_no_url_is_named_without_its_value():
    with pytest.raises(guard.WebhookError, match=r"^webhook: the secret is not an http\(s\) URL \(scheme 'none'\)$"):
        guard.post("s3cr3tT0k3n-pasted-without-https", "hello")


@pytest.mark.parametrize("text, problem", [
    ("hourly_usd: -1\n", "hourly_usd: must be >= 0"),
    ("hourly_usd: cheap\n", "hourly_usd:"),
    ("remind_after_hours: 0\n", "remind_after_hours: must be positive"),
    ("remind_after_hour: 2\n", "remind_after_hour: unknown key (did you mean remind_after_hours?)"),
])
def test_bad_price_or_threshold_names_the_key(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: {problem}")):
        load_preset(str(path))


def test_every_preset_has_a_price_and_a_threshold_below_its_timeout():
    assert set(PRESETS) == {"a100", "a100-80gb", "a100x4", "cpu", "h100x8", "t4"}
    for name, preset in PRESETS.items():
        assert preset.hourly_usd is not None and preset.hourly_usd > 0, name
        assert 0 < preset.remind_after_hours < preset.timeout_hours, name
    # The priciest node gets the shortest leash.
    assert PRESETS["h100x8"].remind_after_hours == min(p.remind_after_hours for p in PRESETS.values())


# --- the scheduled task, as its pod runs it ----------------------------------------------------------


class RecordedAdmin(admin_pb2_grpc.AdminServiceServicer):
    """flyteadmin's ListExecutions and GetExecutionData over gRPC, answering from the recording as if it
    had been made `shift` later (the task computes running times from its own clock)."""

    def __init__(self, shift: timedelta):
        self.executions, self.inputs, self.list_requests = [], {}, []
        for row in RECORDED["executions"]:
            execution = ParseDict(row["execution"], execution_pb2.Execution())
            for stamp in (execution.closure.started_at, execution.closure.created_at, execution.closure.updated_at):
                stamp.FromDatetime(stamp.ToDatetime() + shift)
            self.executions.append(execution)
            self.inputs[execution.id.name] = ParseDict(row["inputs"], literals_pb2.LiteralMap())

    def ListExecutions(self, request, context):
        self.list_requests.append(request)
        if request.filters != "eq(phase,RUNNING)":  # the one filter the watchdog sends
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected filters {request.filters!r}")
        matching = [e for e in self.executions
                    if (e.id.project, e.id.domain) == (request.id.project, request.id.domain)
                    and e.closure.phase == core_execution_pb2.WorkflowExecution.RUNNING]
        # flyteadmin's paging (execution_manager.go, ListExecutions): the token is the next offset, given
        # only when the page is full.
        offset = int(request.token or 0)
        page = matching[offset:offset + request.limit]
        token = str(offset + len(page)) if len(page) == request.limit else ""
        return execution_pb2.ExecutionList(executions=page, token=token)

    def GetExecutionData(self, request, context):
        return execution_pb2.WorkflowExecutionGetDataResponse(full_inputs=self.inputs[request.id.name])


@pytest.fixture
def admin():
    recorded = RecordedAdmin(shift=datetime.now(timezone.utc) - NOW)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    admin_pb2_grpc.add_AdminServiceServicer_to_server(recorded, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    recorded.endpoint = f"127.0.0.1:{port}"
    yield recorded
    server.stop(grace=None)


def test_listing_pages_through_flyteremote(admin):
    from workflows.watchdog import connect, list_running

    remote = connect(admin.endpoint, True, "flytetune")
    running = list_running(remote, "flytetune", "development", page_size=1)
    assert sorted(e.key for e in running) == sorted([BY_HAND, ON_CPU])
    assert [r.token for r in admin.list_requests] == ["", "1", "2"]
    assert {r.limit for r in admin.list_requests} == {1}


def text_literal(value: str) -> literals_pb2.Literal:
    return literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(string_value=value)))


def test_the_scheduled_task_reminds_once_as_its_pod_runs_it(package, admin, webhook, s3_bucket, tmp_path):
    """pyflyte-execute with the packaged task's arguments; the webhook URL mounted as Flyte's secret
    webhook mounts a Kubernetes secret (a file under FLYTE_SECRETS_DEFAULT_DIR); state at `auto`."""
    secrets = tmp_path / "secrets"
    (secrets / "watchdog").mkdir(parents=True)
    (secrets / "watchdog" / "webhook_url").write_text(webhook.url + "\n")
    inputs = {"project": text_literal("flytetune"), "console_url": text_literal(CONSOLE),
              "domains": literals_pb2.Literal(collection=literals_pb2.LiteralCollection(
                  literals=[text_literal(d) for d in ("development", "staging", "production")])),
              "state_uri": text_literal("auto"), "admin_endpoint": text_literal(admin.endpoint),
              "admin_insecure": literals_pb2.Literal(scalar=literals_pb2.Scalar(
                  primitive=literals_pb2.Primitive(boolean=True)))}
    raw = f"s3://{s3_bucket}/raw/ab/w4t5c6h7d8o9-n0-0"
    for attempt in range(2):
        outputs, error = run_as_pod(package, "workflows.watchdog.remind", inputs, tmp_path / f"pod{attempt}",
                                    raw_prefix=raw, env={"FLYTE_SECRETS_DEFAULT_DIR": str(secrets)})
        assert error is None, error
        assert python_value(outputs["o0"], list[str]) == ([WEEKLY] if attempt == 0 else [])
    assert len(webhook.posts) == 1 and "preset a100" in webhook.texts()[0]
    assert {(r.id.project, r.id.domain) for r in admin.list_requests} == {
        ("flytetune", d) for d in ("development", "staging", "production")}
    # `auto` state: the execution's bucket, beside checkpoints and models (flytetune/locations.py).
    assert storage.exists(f"s3://{s3_bucket}/flytetune/watchdog/reminded/{WEEKLY}.json")


def test_a_state_uri_inside_the_pod_is_refused(package, tmp_path):
    inputs = {"project": text_literal("flytetune"), "console_url": text_literal(CONSOLE),
              "domains": literals_pb2.Literal(collection=literals_pb2.LiteralCollection(
                  literals=[text_literal("development")])),
              "state_uri": text_literal("/tmp/watchdog"), "admin_endpoint": text_literal("127.0.0.1:1"),
              "admin_insecure": literals_pb2.Literal(scalar=literals_pb2.Scalar(
                  primitive=literals_pb2.Primitive(boolean=True)))}
    secrets = tmp_path / "secrets"
    (secrets / "watchdog").mkdir(parents=True)
    (secrets / "watchdog" / "webhook_url").write_text("http://127.0.0.1:1/hook\n")
    _, error = run_as_pod(package, "workflows.watchdog.remind", inputs, tmp_path / "pod",
                          raw_prefix="s3://bucket/raw/ab/w4t5c6h7d8o9-n0-0",
                          env={"FLYTE_SECRETS_DEFAULT_DIR": str(secrets)})
    assert "state_uri: '/tmp/watchdog' is a path inside the pod, lost when the pod ends" in str(error), error


def test_the_watchdog_is_scheduled_every_30_minutes_with_the_webhook_secret(package):
    from flytekit import Email, Slack

    from workflows.notifications import RECIPIENTS

    plan = launch_plans(package)["watchdog_every_30_min"]
    schedule = plan.entity_metadata.schedule
    assert schedule.cron_schedule.schedule == "*/30 * * * *"
    start = datetime(2026, 11, 24, 12, 1, tzinfo=timezone.utc)
    fires = croniter(schedule.cron_schedule.schedule, start)
    assert [fires.get_next(datetime).strftime("%H:%M") for _ in range(3)] == ["12:30", "13:00", "13:30"]
    # The scheduler starts it with no inputs: none may be required.
    assert [k for k, p in plan.default_inputs.parameters.items() if p.required] == []
    defaults = {k: p.default for k, p in plan.default_inputs.parameters.items()}
    assert python_value(defaults["state_uri"], str) == "auto"
    assert python_value(defaults["domains"], list[str]) == ["development", "staging", "production"]
    # A watchdog that cannot post reaches the team by email, at the addresses the training plans use.
    kinds = {n.WhichOneof("type"): list(getattr(n, n.WhichOneof("type")).recipients_email)
             for n in plan.entity_metadata.notifications}
    assert kinds == {"email": RECIPIENTS[Email], "slack": RECIPIENTS[Slack]}

    template = task_specs(package)["workflows.watchdog.remind"].template
    assert [(s.group, s.key) for s in template.security_context.secrets] == [("watchdog", "webhook_url")]
    assert primary_container(template)["image"] == LIGHT_IMAGE
    assert template.metadata.timeout.seconds == 600 and not template.metadata.interruptible
