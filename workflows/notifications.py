"""Who hears when a scheduled execution ends: the one place for the team's addresses.

No torch is imported here: the watchdog (light image) and the training plans both use it.
"""

from flytekit import Email, Slack
from flytekit.models.core.execution import WorkflowExecutionPhase as Phase

# Team addresses, never a person's. Flyte sends every kind as an email through flyteadmin's
# notifications config (README, "Notifications"): Slack by a channel's email address (channel details >
# Integrations > Send emails to this channel; the address below is a placeholder to replace), PagerDuty
# (flytekit's `PagerDuty`) by a service's integration email.
RECIPIENTS = {
    Email: ["ml-alerts@example.com"],
    Slack: ["flytetune-alerts-placeholder@example.slack.com"],
}
PROBLEMS = [Phase.FAILED, Phase.TIMED_OUT]


def notify(phases: list[int]) -> list:
    return [kind(phases=phases, recipients_email=addresses) for kind, addresses in RECIPIENTS.items()]
