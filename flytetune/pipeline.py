"""The whole flow without Flyte: URI in, copy, prepare, train, evaluate, publish, URI out.

The Flyte workflow runs the same library functions as separate tasks; this module chains them
in one process for `python -m flytetune.train`, notebooks and the dev image.
"""

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

from flytetune import artifacts, checkpoint, distributed, gate, locations, run_inputs, scratch, storage
from flytetune.artifacts import summary
from flytetune.backbone import check_backbone
from flytetune.config import AUTO, DEFAULT_CONFIG_PATH, ConfigError, FinetuneConfig, load_config
from flytetune.data import DEFAULT_DATASET_URI, SAMPLE_DATASET, DataError, copy_dataset, locate
from flytetune.evaluate import evaluate
from flytetune.preemption import EXIT_PREEMPTED, Preempted
from flytetune.prepare import load_meta, prepare
from flytetune.registry import RegistryError
from flytetune.storage import StorageError
from flytetune.train import fit

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_URI = AUTO
# Errors a user can fix by changing an input; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, StorageError, checkpoint.CheckpointError, FileNotFoundError, FileExistsError,
               RegistryError)


def run_checkpoint_dir(cfg: FinetuneConfig, run_id: str) -> str | None:
    """The run-scoped checkpoint prefix shared by every attempt of one run."""
    return artifacts.join(cfg.checkpoint.uri, run_id) if cfg.checkpoint.uri else None


class RunResult(NamedTuple):
    run_uri: str | None  # None on the ranks of a torchrun other than 0
    metrics: dict
    # {"promoted": bool, "reason": str}: what the evaluation gate decided and whether production moved.
    release: dict


def run(cfg: FinetuneConfig, dataset_uri: str = DEFAULT_DATASET_URI, output_uri: str = DEFAULT_OUTPUT_URI,
        test_uri: str | None = None, work_dir: Path | None = None, run_id: str | None = None,
        from_checkpoint: str | None = None, prepared_uri: str | None = None, init_from: str | None = None,
        retrain_anyway: bool = False) -> RunResult:
    """Run every step; return the published run folder URI, the test metrics and the gate's outcome.

    Runs that share `run_id` share a checkpoint prefix: running again after a crash or a
    preemption continues from the newest complete checkpoint. `prepared_uri` skips copy and
    prepare; `init_from` (`production`, a version or a run URI) warm-starts from a published model.
    """
    world = distributed.init()
    # Rank 0 checks (the write probes of several ranks would trip over each other); every rank gets its answer.
    checked, error = None, None
    if world.is_main:
        try:
            checked = check_inputs(cfg, dataset_uri, output_uri, test_uri, from_checkpoint, prepared_uri, init_from,
                                   retrain_anyway)
        except USER_ERRORS as e:
            error = e
    checked, message = distributed.from_main(world, (checked, str(error) if error else None))
    if error is not None:
        raise error
    if message is not None:
        raise ConfigError(message)
    cfg, output_uri, resume_from, init_uri = checked
    # Under torchrun (one node) rank 0 copies, prepares and publishes; every rank trains.
    run_id = distributed.from_main(world, run_id or artifacts.new_version())
    with scratch.folder("work") as tmp:
        work = Path(distributed.from_main(world, str(work_dir or tmp)))
        if world.is_main:
            if prepared_uri:
                storage.sync(prepared_uri, str(work / "prepared"))
                meta = {**load_meta(work / "prepared"), "prepared_uri": prepared_uri}
            else:
                copy_dataset(dataset_uri, work / "raw", test_uri=test_uri)
                meta = prepare(work / "raw", work / "prepared", cfg)
            if init_uri:
                artifacts.fetch(init_uri, work / "init")
        distributed.barrier(world)
        fit(work / "prepared", work / "model", cfg, checkpoint_dir=run_checkpoint_dir(cfg, run_id),
            resume_from=resume_from, init_from=work / "init" if init_uri else None)
        if not world.is_main:
            return RunResult(None, {}, {})
        if cfg.train.objective == "mlm":
            # A pretrained backbone: no labels to evaluate, no gate; fine-tuning names its version URI.
            run_uri = artifacts.publish_backbone(work / "model", output_uri, cfg.model.name, config=cfg.to_dict(),
                                                 data_meta=meta)
            return RunResult(run_uri, artifacts.read_manifest(run_uri)["metrics"],
                             {"promoted": False, "reason": "a backbone: fine-tuning names its URI as model.backbone"})
        metrics = evaluate(work / "model", work / "prepared", batch_size=cfg.train.eval_batch_size)
        decision = gate.run(work / "model", work / "prepared", cfg, output_uri, work / "gate")
        run_uri = artifacts.publish(work / "model", output_uri, cfg.model.name, metrics=metrics,
                                    config=cfg.to_dict(), data_meta=meta, gate=decision, init_from=init_uri)
    return RunResult(run_uri, metrics, gate.promote_if_passed(output_uri, cfg, run_uri, decision))


def check_inputs(cfg: FinetuneConfig, dataset_uri: str, output_uri: str, test_uri: str | None,
                 from_checkpoint: str | None, prepared_uri: str | None, init_from: str | None,
                 retrain_anyway: bool) -> tuple[FinetuneConfig, str, str | None, str | None]:
    """Everything that can be checked before data moves: the config resolved for this machine, the
    output URI, the checkpoint to start from and the run folder to warm-start from."""
    check_backbone(cfg.model.backbone)
    cfg, output_uri = locations.resolve(cfg, output_uri, durable_root=None)
    locations.check_writable(cfg, output_uri)
    resume_from = checkpoint.resolve_resume(cfg, from_checkpoint)
    run_inputs.check_eval_uri(cfg)
    if prepared_uri:
        run_inputs.check_prepared(prepared_uri, cfg)
    else:
        run_inputs.check_new_data(locate(dataset_uri, test_uri), output_uri, cfg.model.name, retrain_anyway)
    init_uri = run_inputs.resolve_init_from(init_from, output_uri, cfg.model.name) if init_from else None
    return cfg, output_uri, resume_from, init_uri


def continue_command(argv: list[str], run_id: str) -> str:
    """The shell command that reruns `python -m flytetune.train argv` as the run `run_id`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--run_id":
            skip = True
        elif not arg.startswith("--run_id="):
            kept.append(arg)
    return shlex.join([sys.executable, "-m", "flytetune.train", *kept, "--run_id", run_id])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flytetune.train", description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="YAML config (default: %(default)s)")
    parser.add_argument("--dataset_uri", default=str(SAMPLE_DATASET),
                        help="CSV, parquet or JSON lines file (default: the bundled sample)")
    parser.add_argument("--test_uri", default=None, help="optional held-out test file")
    parser.add_argument("--output_uri", default=DEFAULT_OUTPUT_URI, 
                        help="where run folders are published (auto: artifacts/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=1 (repeatable)")
    parser.add_argument("--work_dir", type=Path, default=None, help="keep intermediate files here")
    parser.add_argument("--run_id", default=None,
                        help="checkpoints go to <checkpoint.uri>/<run_id>/; rerun with the same id to resume")
    parser.add_argument("--from_checkpoint", default=None, metavar="latest|URI",
                        help="start from a checkpoint: `latest` under checkpoint.uri, a step folder or a run prefix")
    parser.add_argument("--prepared_uri", default=None,
                        help="train on this prepared-data folder; skip copy and prepare")
    parser.add_argument("--init_from", default=None, metavar="production|VERSION|URI",
                        help="warm-start from a published model of model.name instead of the backbone")
    parser.add_argument("--retrain_anyway", action="store_true",
                        help="train even if the dated export is not newer than production's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        world = distributed.init()
        run_id = distributed.from_main(world, args.run_id or artifacts.new_version())
        if cfg.checkpoint.uri and world.is_main:
            # The id appears only inside checkpoint paths: without it a rerun would start from step 0.
            log.info("run id %s; to continue this run after a crash, rerun: %s",
                     run_id, continue_command(sys.argv[1:] if argv is None else argv, run_id))
        result = run(cfg, args.dataset_uri, args.output_uri, args.test_uri, args.work_dir, run_id=run_id,
                     from_checkpoint=args.from_checkpoint, prepared_uri=args.prepared_uri, init_from=args.init_from,
                     retrain_anyway=args.retrain_anyway)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    if result.run_uri is not None:  # torchrun: only rank 0 publishes and reports
        print(json.dumps({"test_metrics": summary(result.metrics), "artifacts": result.run_uri, **result.release},
                         indent=2))
    return 0
