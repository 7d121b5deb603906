"""A run's attempts and cost from its timeline (flytetune/timeline.py), on recorded timelines: the
one fit writes for a run preempted once, and one whose first attempt was killed outright."""

import datetime as dt

import pytest

from flytetune.timeline import attempts, cost_usd

T0 = dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.timezone.utc)


def at(minutes: float) -> str:
    return (T0 + dt.timedelta(minutes=minutes)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Preempted at step 130 (saved on SIGTERM), resumed 20 minutes later, finished at step 300.
PREEMPTED_ONCE = [
    {"event": "start", "step": 0, "time": at(0), "total_steps": 300},
    {"event": "checkpoint", "step": 100, "time": at(10), "uri": "s3://b/ckpt/run/step-000100", "seconds": 2.0},
    {"event": "preempted", "step": 130, "time": at(13), "signal": "SIGTERM"},
    {"event": "checkpoint", "step": 130, "time": at(13.1), "uri": "s3://b/ckpt/run/step-000130", "seconds": 1.5},
    {"event": "resume", "step": 130, "time": at(33), "checkpoint": "s3://b/ckpt/run/step-000130"},
    {"event": "checkpoint", "step": 200, "time": at(40), "uri": "s3://b/ckpt/run/step-000200", "seconds": 2.0},
    {"event": "checkpoint", "step": 300, "time": at(50), "uri": "s3://b/ckpt/run/step-000300", "seconds": 2.0},
    {"event": "end", "step": 300, "time": at(50.1)},
]


def test_attempts_of_a_run_preempted_once():
    first, second = attempts(PREEMPTED_ONCE)
    assert (first.number, first.outcome, first.from_step, first.to_step) == (1, "preempted", 0, 130)
    assert [c["step"] for c in first.checkpoints] == [100, 130], "the save on SIGTERM belongs to the attempt"
    assert first.seconds == pytest.approx(13.1 * 60)
    assert (second.number, second.outcome, second.from_step, second.to_step) == (2, "finished", 130, 300)
    assert second.resumed_from == "s3://b/ckpt/run/step-000130"
    assert second.seconds == pytest.approx(17.1 * 60)
    # The 20 minutes between the attempts are not training time.
    assert cost_usd([first, second], 3.60) == pytest.approx((13.1 + 17.1) / 60 * 3.60)
    assert cost_usd([first, second], None) is None


def test_a_killed_attempt_is_lost_and_the_live_one_runs_to_now():
    # SIGKILL after step 100's checkpoint: only what that checkpoint carried survives.
    killed = PREEMPTED_ONCE[:2]
    live = [*killed, {"event": "resume", "step": 100, "time": at(30), "checkpoint": "s3://b/ckpt/run/step-000100"}]
    first, second = attempts(live, live_step=160, now=T0 + dt.timedelta(minutes=36))
    assert (first.outcome, first.to_step, first.seconds) == ("lost", 100, 600.0)
    assert (second.outcome, second.from_step, second.to_step, second.seconds) == ("running", 100, 160, 360.0)
    # Without live_step (a finished task reading an old timeline) nothing is running.
    assert [a.outcome for a in attempts(live)] == ["lost", "lost"]


def test_a_finished_attempt_is_not_made_live():
    last = attempts(PREEMPTED_ONCE, live_step=300, now=T0 + dt.timedelta(hours=5))[-1]
    assert (last.outcome, last.seconds) == ("finished", pytest.approx(17.1 * 60))
