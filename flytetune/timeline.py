"""A training run attempt by attempt, from its timeline (flytetune.train.TrainResult.events), and
what it cost at a preset's hourly price.

An attempt begins with a `start` or `resume` event and ends with its `preempted` or `end` event;
one without either was killed (no grace period) or is still running. Events travel with the
checkpoint, so an attempt killed outright keeps only what its last checkpoint saved.
"""

import datetime as dt
from dataclasses import dataclass, field


@dataclass
class Attempt:
    number: int  # 1 for the first attempt
    started: dt.datetime
    last_seen: dt.datetime  # its last event, or now while it runs
    from_step: int
    to_step: int
    # "finished", "preempted", "running" (the live one), or "lost" (killed: its end is not known)
    outcome: str
    resumed_from: str | None = None
    checkpoints: list[dict] = field(default_factory=list)  # the checkpoint events

    @property
    def seconds(self) -> float:
        return max(0.0, (self.last_seen - self.started).total_seconds())


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def attempts(events: list[dict], live_step: int | None = None, now: dt.datetime | None = None) -> list[Attempt]:
    """The attempts of a run, oldest first. `live_step`: the last attempt is this process, still going,
    at that step (its duration runs to `now`)."""
    out: list[Attempt] = []
    for event in events:
        when, kind, step = parse_time(event["time"]), event["event"], event["step"]
        if kind in ("start", "resume"):
            out.append(Attempt(len(out) + 1, when, when, step, step, "lost", resumed_from=event.get("checkpoint")))
            continue
        if not out:  # a timeline that starts mid-way (not written by fit): nothing to attach it to
            continue
        current = out[-1]
        current.last_seen, current.to_step = when, max(current.to_step, step)
        if kind == "checkpoint":
            current.checkpoints.append(event)
        elif kind == "preempted":
            current.outcome = "preempted"
        elif kind == "end":
            current.outcome = "finished"
    if live_step is not None and out and out[-1].outcome == "lost":
        current = out[-1]
        current.outcome, current.to_step = "running", max(current.to_step, live_step)
        current.last_seen = max(current.last_seen, now or dt.datetime.now(dt.timezone.utc))
    return out


def cost_usd(runs: list[Attempt], hourly_usd: float | None) -> float | None:
    """The estimated cost of the attempts' training time at `hourly_usd` per node hour (None: no price).
    Time a pod spends before training (scheduling, image pull, data download) is not counted."""
    if hourly_usd is None:
        return None
    return sum(a.seconds for a in runs) / 3600 * hourly_usd
