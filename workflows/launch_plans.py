"""Launch plans: named, pre-filled ways to run `finetune`, one of them scheduled.

    pyflyte register workflows --image IMAGE --version VERSION
    # then activate the schedule in the UI or with flytectl:
    flytectl update launchplan -p flytetune -d production finetune_weekly_a100 --version VERSION --activate

The S3 locations are the team's defaults; override them per execution like any input.
"""

from flytekit import CronSchedule, LaunchPlan

from workflows.finetune import finetune

# Every Monday 03:00 UTC: retrain on the newest export, on one preemptible A100, publish to S3.
finetune_weekly_a100 = LaunchPlan.get_or_create(
    finetune,
    name="finetune_weekly_a100",
    schedule=CronSchedule(schedule="0 3 * * 1"),
    default_inputs={
        "dataset_uri": "s3://flytetune-data/transactions/latest.parquet",
        "output_uri": "s3://flytetune-artifacts/models",
        "config": "configs/local.yaml",
    },
    fixed_inputs={"preset": "a100"},
)

# Debugging on a T4 with the tiny config: minutes, cents.
finetune_debug_t4 = LaunchPlan.get_or_create(
    finetune,
    name="finetune_debug_t4",
    default_inputs={"config": "configs/tiny.yaml"},
    fixed_inputs={"preset": "t4"},
)
