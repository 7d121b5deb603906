"""Launch plans: named, pre-filled ways to run `finetune`, one of them scheduled.

    pyflyte register workflows --image IMAGE --version VERSION --copy none
    # then activate the schedule in the UI or with flytectl:
    flytectl update launchplan -p flytetune -d production finetune_weekly_a100 --version VERSION --activate

The configs are read at registration and travel inside the launch plans. Checkpoints and models
go to `auto` locations: object storage on the cluster, never the pod's disk (tested).
"""

from pathlib import Path

from flytekit import CronSchedule, LaunchPlan
from flytekit.models.core.execution import WorkflowExecutionPhase as Phase

from flytetune.config import AUTO, load_config
from flytetune.presets import AUTO_SIZE
from workflows.finetune import finetune
from workflows.notifications import PROBLEMS, notify

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Every Monday 03:00 UTC: retrain on one preemptible A100 on the newest complete export dated at or
# before the scheduled time (flytetune/exports.py), publish to S3. The scheduler fills `kickoff_time`.
finetune_weekly_a100 = LaunchPlan.get_or_create(
    finetune,
    name="finetune_weekly_a100",
    schedule=CronSchedule(schedule="0 3 * * 1", kickoff_time_input_arg="kickoff_time"),
    default_inputs={
        "dataset_uri": "s3://flytetune-data/transactions/exports/",
        "output_uri": "s3://flytetune-artifacts/models",
        "config": load_config(CONFIGS / "cluster.yaml"),
        # The exports grow week by week: resolve picks prepare's pod by the chosen export's bytes
        # (configs/prepare_sizes.yaml). A default, not fixed: a run started by hand may name a size.
        "prepare_size": AUTO_SIZE,
    },
    fixed_inputs={"preset": "a100"},
    notifications=notify([*PROBLEMS, Phase.SUCCEEDED]),
)

# Debugging on a T4 with the tiny config: minutes, cents. Publishes to the cluster's durable bucket.
finetune_debug_t4 = LaunchPlan.get_or_create(
    finetune,
    name="finetune_debug_t4",
    default_inputs={"config": load_config(CONFIGS / "tiny.yaml"), "output_uri": AUTO},
    fixed_inputs={"preset": "t4"},
    notifications=notify(PROBLEMS),
)
