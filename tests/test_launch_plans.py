"""The launch plans as flyteadmin receives them (`pyflyte package`): schedule, notifications, inputs."""

from datetime import datetime, timezone

from croniter import croniter
from flyteidl.core import execution_pb2, types_pb2

from flytetune.exports import NO_CUTOFF
from tests.cluster.harness import python_value
from tests.test_cluster import launch_plans
from workflows.notifications import RECIPIENTS

Phase = execution_pb2.WorkflowExecution.Phase
TEAM_EMAIL, TEAM_SLACK = RECIPIENTS.values()


def notifications(spec) -> set[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(kind, phases, recipients) of every notification on a launch plan."""
    out = set()
    for n in spec.entity_metadata.notifications:
        kind = n.WhichOneof("type")
        out.add((kind, tuple(sorted(Phase.Name(p) for p in n.phases)),
                 tuple(getattr(n, kind).recipients_email)))
    return out


def defaults(spec) -> dict:
    return {k: p.default for k, p in spec.default_inputs.parameters.items() if p.HasField("default")}


def test_the_weekly_schedule_passes_its_kickoff_time(package):
    weekly = launch_plans(package)["finetune_weekly_a100"]
    schedule = weekly.entity_metadata.schedule
    assert schedule.cron_schedule.schedule == "0 3 * * 1"
    assert schedule.kickoff_time_input_arg == "kickoff_time"
    # flyteadmin's checks at registration (flyteadmin/pkg/manager/impl/validation/launch_plan_validator.go):
    # the argument is a free input of type DATETIME (an Optional[datetime] is a union, and is refused),
    # and no other input is required.
    parameters = weekly.default_inputs.parameters
    assert "kickoff_time" in parameters and "kickoff_time" not in weekly.fixed_inputs.literals
    assert parameters["kickoff_time"].var.type.simple == types_pb2.SimpleType.DATETIME
    assert [k for k, p in parameters.items() if p.required and k != "kickoff_time"] == []
    # Mondays 03:00 UTC (flytescheduler evaluates the cron in UTC).
    fire = croniter(schedule.cron_schedule.schedule, datetime(2026, 11, 25, tzinfo=timezone.utc)).get_next(datetime)
    assert fire == datetime(2026, 11, 30, 3, tzinfo=timezone.utc) and fire.weekday() == 0


def test_failures_reach_the_team_and_the_weekly_success_too(package):
    plans = launch_plans(package)
    problems = ("FAILED", "TIMED_OUT")
    assert notifications(plans["finetune_debug_t4"]) == {
        ("email", problems, tuple(TEAM_EMAIL)), ("slack", problems, tuple(TEAM_SLACK))}
    weekly = ("FAILED", "SUCCEEDED", "TIMED_OUT")
    assert notifications(plans["finetune_weekly_a100"]) == {
        ("email", weekly, tuple(TEAM_EMAIL)), ("slack", weekly, tuple(TEAM_SLACK))}
    # Recipients are team addresses in one place (workflows/launch_plans.py), not people.
    assert TEAM_EMAIL == ["ml-alerts@example.com"] and all(a.endswith("@example.slack.com") for a in TEAM_SLACK)


def test_default_inputs(package):
    plans = launch_plans(package)
    weekly = defaults(plans["finetune_weekly_a100"])
    # A prefix of dated exports (flytetune/exports.py), not one file: each run picks up the newest data.
    assert python_value(weekly["dataset_uri"], str) == "s3://flytetune-data/transactions/exports/"
    assert python_value(weekly["output_uri"], str) == "s3://flytetune-artifacts/models"
    assert plans["finetune_weekly_a100"].fixed_inputs.literals["preset"].scalar.primitive.string_value == "a100"
    # Prepare's pod follows the export's size (resolve's `auto`), and stays open to a hand-started run.
    for name in ("finetune_weekly_a100", "finetune_debug_t4"):
        assert python_value(defaults(plans[name])["prepare_size"], str) == "auto", name
        assert "prepare_size" not in plans[name].fixed_inputs.literals, name
    # Started by hand (any plan, or the workflow's default plan), no cutoff: the newest complete export.
    for name, spec in plans.items():
        # The cost guard's plans (tests/test_watchdog.py), pretraining's (no dated exports) and vocabulary
        # pruning's (tests/test_prune.py) have no kickoff_time.
        if name not in ("workflows.watchdog.watchdog", "watchdog_every_30_min", "workflows.pretrain.pretrain",
                        "workflows.prune.prune"):
            assert python_value(defaults(spec)["kickoff_time"], datetime) == NO_CUTOFF, name
    assert python_value(defaults(plans["finetune_debug_t4"])["output_uri"], str) == "auto"
