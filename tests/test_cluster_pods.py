"""The workflow run the way a Flyte cluster runs it: every node its own container of the built image.

`make cluster-test` builds the images (`make cluster-image`) and runs these. The dataset and the
published model are in S3 (moto), the cluster's own bucket with the intermediate data and the
checkpoints in GCS (the emulator), the code archive of the fast registration in S3; containers
reach both on loopback (`--network host`). S3 access is the pods' web identity: a projected
token file and the platform's AWS_ROLE_ARN, no keys.
"""

import dataclasses
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict

from flytetune import artifacts, storage
from flytetune.config import FinetuneConfig
from tests.cluster.harness import Cluster, NodeFailed, cli_literal, literal, python_value, register
from tests.conftest import REPO, SAMPLE

pytestmark = pytest.mark.cluster

IMAGE = "flytetune-train:cluster-test"
STEPS = 12
# Deterministic kernels: a run stopped once must end bit-identical to one that was not.
OVERRIDES = (f"train.max_steps={STEPS} train.deterministic=true checkpoint.every_steps=2 checkpoint.keep=20 "
             "train.log_every_steps=2 train.deck_every_minutes=0.001")


def _timed(label: str, timings: dict):
    class Timer:
        def __enter__(self):
            self.start = time.monotonic()

        def __exit__(self, *exc):
            timings[label] = time.monotonic() - self.start
    return Timer()


@pytest.fixture(scope="module")
def images():
    for image in (IMAGE, IMAGE.replace("flytetune-train:", "flytetune-train-light:")):
        found = subprocess.run(["docker", "image", "inspect", image], capture_output=True)
        if found.returncode != 0:
            pytest.fail(f"image {image} is missing: `make cluster-test` builds it (make cluster-image)")


@pytest.fixture(scope="module")
def buckets(s3_server, gcs_server):
    import boto3
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    storage.reset_clients()
    names = {"s3": f"team-data-{os.getpid()}", "gs": f"cluster-bucket-{os.getpid()}"}
    boto3.client("s3").create_bucket(Bucket=names["s3"])
    gcs.Client(project="flytetune-test", credentials=AnonymousCredentials()).create_bucket(names["gs"])
    storage.copy(str(SAMPLE), f"s3://{names['s3']}/datasets/transactions.parquet")
    return names


@pytest.fixture(scope="module")
def cluster(images, buckets, s3_server, gcs_server, tmp_path_factory) -> Cluster:
    tmp = tmp_path_factory.mktemp("cluster")
    timings = {}
    with _timed("register", timings):
        package = register(REPO, IMAGE, f"s3://{buckets['s3']}/flyte/fast/code.tar.gz", tmp)
    print(f"\nregister (pyflyte package --copy all, code archive to S3): {timings['register']:.1f} s")
    token = tmp / "token"  # what the kubelet writes for the projected service-account token
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6Zmx5dGV0dW5lIn0.c2ln")
    token.chmod(0o644)
    platform_env = {
        # The platform's default-env-vars (configs/flyte/values-*.yaml); no FLYTETUNE_DURABLE_URI, so
        # `auto` derives from the raw-output bucket.
        "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/flytetune-s3",
        # Standing in for the clouds' real endpoints.
        "AWS_ENDPOINT_URL": s3_server["AWS_ENDPOINT_URL"], "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true", **gcs_server,
        # flytekit's own S3 access for the code archive (the sandbox's way), not boto3's.
        "FLYTE_AWS_ENDPOINT": s3_server["AWS_ENDPOINT_URL"], "FLYTE_AWS_ACCESS_KEY_ID": "testing",
        "FLYTE_AWS_SECRET_ACCESS_KEY": "testing",
    }
    return Cluster(package, f"gs://{buckets['gs']}", platform_env, token, cpus=float(os.cpu_count() or 2))


def inputs(buckets, config: Path, overrides: str = OVERRIDES, preset: str = "cpu") -> dict:
    return {"dataset_uri": literal(f"s3://{buckets['s3']}/datasets/transactions.parquet"),
            "output_uri": literal(f"s3://{buckets['s3']}/models"),
            "config": cli_literal(FinetuneConfig, str(config)),
            "overrides": literal(overrides), "preset": literal(preset), "from_checkpoint": literal(None)}


@pytest.fixture(scope="module")
def edited_config(tmp_path_factory) -> Path:
    """A config written after the image was built: it reaches the pods only as the execution's input."""
    path = tmp_path_factory.mktemp("laptop") / "my.yaml"
    path.write_text((REPO / "configs" / "tiny.yaml").read_text() + "model: {name: laptop-edit}\n")
    return path


def weights(run_uri: str, tmp: Path) -> dict:
    from safetensors.numpy import load_file

    storage.copy(f"{run_uri}/model.safetensors", str(tmp / "model.safetensors"))
    return load_file(str(tmp / "model.safetensors"))


def published(buckets, name: str) -> set[str]:
    prefix = f"s3://{buckets['s3']}/models/{name}/"
    return {key[len(prefix):].split("/")[0] for key in storage.ls(prefix)}


@pytest.fixture(scope="module")
def uninterrupted(cluster, buckets, edited_config):
    started = time.monotonic()
    out = cluster.execute(inputs(buckets, edited_config), execution_id="fc0ffee0001")
    print(f"uninterrupted run: {time.monotonic() - started:.1f} s")
    return out


def test_the_workflow_runs_in_the_image_s3_to_gcs_to_s3(cluster, buckets, uninterrupted, tmp_path):
    run_uri = python_value(uninterrupted["artifacts_uri"], str)
    print(f"published: {run_uri}")
    # The config written after the build reached every pod: it names the published model.
    assert run_uri.startswith(f"s3://{buckets['s3']}/models/laptop-edit/")
    manifest = artifacts.verify(run_uri)
    assert manifest["config"]["train"]["max_steps"] == STEPS
    # Checkpoints went to the cluster's bucket, not into a pod: `auto` on a cluster.
    checkpoints = storage.ls(f"gs://{buckets['gs']}/flytetune/checkpoints/fc0ffee0001/")
    assert any(key.endswith(f"step-{STEPS:06d}/manifest.json") for key in checkpoints), checkpoints
    # Every node ran in a container of its own, as the image's user, once.
    nodes = [a.node for a in cluster.attempts if a.env["FLYTE_INTERNAL_EXECUTION_ID"] == "fc0ffee0001"]
    # n1 is the branch on --prepared_uri: copy_and_prepare (n1-n0), a dynamic whose pod yields the copy
    # and the prepare node, the latter named after the prepare size resolve chose (`auto`: standard).
    assert nodes == ["n0", "n1-n0", "n1-n0-copy-dataset", "n1-n0-prepare-standard", "n2", "n2-train-cpu", "n3",
                     "n4"], nodes
    for attempt in cluster.attempts:
        print(f"  {attempt.container}: {attempt.seconds:.1f} s")


def test_the_dynamic_node_carries_the_preset(cluster, uninterrupted):
    (train,) = [a for a in cluster.attempts if a.node == "n2-train-cpu" and a.env["FLYTE_INTERNAL_EXECUTION_ID"]
                == "fc0ffee0001"]
    from flytetune.presets import load_preset

    preset = load_preset(str(REPO / "configs" / "presets" / "cpu.yaml"))
    assert train.env["FLYTETUNE_PROCESSES_PER_NODE"] == "1"
    assert train.env["AWS_WEB_IDENTITY_TOKEN_FILE"] == "/var/run/secrets/flytetune/aws/token"
    assert preset.interruptible


def test_a_preempted_training_pod_resumes_and_ends_bit_identical(cluster, buckets, edited_config, uninterrupted,
                                                                tmp_path):
    execution = "fc0ffee0002"
    prefix = f"gs://{buckets['gs']}/flytetune/checkpoints/{execution}/"
    before = published(buckets, "laptop-edit")

    def preempt(attempt, container) -> bool:
        """Stop the first training attempt once it has written a checkpoint, as a spot reclaim does."""
        if attempt.node != "n2-train-cpu" or attempt.number != 0:
            return False
        return any(key.endswith("/manifest.json") for key in storage.ls(prefix))

    out = cluster.execute(inputs(buckets, edited_config), execution_id=execution, interrupt=preempt)
    train = [a for a in cluster.attempts if a.node == "n2-train-cpu" and a.env["FLYTE_INTERNAL_EXECUTION_ID"]
             == execution]
    assert [a.number for a in train] == [0, 1], "stopped once, retried once"
    assert "preempted" in (train[0].error or "") or train[0].exit_code in (137, 143), train[0].logs[-2000:]
    assert "resuming from checkpoint" in train[1].logs and f"/{execution}/step-" in train[1].logs
    run_uri = python_value(out["artifacts_uri"], str)
    reference = python_value(uninterrupted["artifacts_uri"], str)
    got, want = weights(run_uri, tmp_path / "a"), weights(reference, tmp_path / "b")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want), "bit-identical weights"
    assert len(published(buckets, "laptop-edit") - before) == 1, "published once"
    print(json.dumps({a.container: round(a.seconds, 1) for a in train}))
    # The Training deck in each attempt's output prefix, where the UI reads it: the stopped attempt never
    # ended, so only publishing while it ran wrote its page; the last one tells the run attempt by attempt.
    decks = {}
    for number in (0, 1):
        storage.copy(f"{cluster.metadata_uri}/metadata/{execution}/n2-train-cpu/{number}/deck.html",
                     str(tmp_path / f"deck-{number}.html"))
        decks[number] = (tmp_path / f"deck-{number}.html").read_text()
    assert 'class="flytetune-status" data-running="true"' in decks[0]
    # "lost" when SIGTERM came right after a periodic save: no save of its own carried the preemption.
    assert re.search(r"<td>1</td><td>[\d-]+ [\d:]+</td><td>\w+</td><td>0-\d+</td><td>(preempted|lost)</td>",
                     decks[1]), decks[1][-3000:]
    assert re.search(r"<td>2</td><td>[\d-]+ [\d:]+</td><td>\w+</td><td>\d+-12</td><td>finished</td><td>gs://", decks[1])


def test_the_multi_gpu_preset_compiles_in_its_pod(cluster, uninterrupted):
    """The a100x4 training node as the dynamic's pod yields it: the overrides propeller would apply."""
    from flytetune.presets import load_preset

    done = cluster.results["fc0ffee0001"]
    inputs = {"prepared": done["n1"]["o0"], "cfg": done["n0"]["cfg"], "resume_from": done["n0"]["resume_from"],
              "preset": literal("a100x4"), "init_from": literal(None)}
    spec = cluster.compile_dynamic("fc0ffee0003", "n2", inputs)
    (node,), (task,) = spec.nodes, spec.tasks
    preset = load_preset(str(REPO / "configs" / "presets" / "a100x4.yaml"))
    assert task.id.name == "tasks.finetune.train_distributed"
    overrides = node.task_node.overrides
    limits = {r.name: r.value for r in overrides.resources.limits}
    assert limits[2] == "4" and limits[3] == preset.limits.mem  # GPU, memory
    assert overrides.extended_resources.gpu_accelerator.device == "nvidia-tesla-a100"
    assert node.metadata.interruptible and node.metadata.retries.retries == preset.retries
    (container,) = MessageToDict(overrides.pod_template.pod_spec)["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FLYTETUNE_PROCESSES_PER_NODE"] == "4" and env["NCCL_DEBUG"] == "WARN"


def test_the_elastic_task_runs_two_processes_in_one_container(cluster, buckets, edited_config):
    """train_distributed as a pod runs it: torch elastic starts 2 gloo processes; rank 0 checkpoints."""
    execution = "fc0ffee0004"
    out = cluster.execute(inputs(buckets, edited_config, overrides="train.max_steps=4 checkpoint.every_steps=2",
                                 preset="tests/cluster/presets/cpu-x2.yaml"), execution_id=execution)
    (train,) = [a for a in cluster.attempts if a.env["FLYTE_INTERNAL_EXECUTION_ID"] == execution
                and a.node == "n2-train-cpu-x2"]
    assert train.env["FLYTETUNE_PROCESSES_PER_NODE"] == "2"
    # Each process logs its start of training.
    assert len(re.findall(r"training \S+ on \S+: \d+ examples", train.logs)) == 2, train.logs[-3000:]
    assert storage.exists(f"gs://{buckets['gs']}/flytetune/checkpoints/{execution}/step-000004/manifest.json")
    assert python_value(out["artifacts_uri"], str).startswith(f"s3://{buckets['s3']}/models/laptop-edit/")


def test_a_pod_local_checkpoint_path_fails_in_the_first_pod(cluster, buckets, tmp_path):
    config = tmp_path / "local.yaml"
    config.write_text((REPO / "configs" / "local.yaml").read_text().replace("uri: auto", "uri: checkpoints"))
    with pytest.raises(NodeFailed) as failed:
        cluster.execute(inputs(buckets, config), execution_id="fc0ffee0005")
    assert failed.value.node == "n0" and len(failed.value.attempts) == 1
    assert "checkpoint.uri: 'checkpoints' is a path inside the pod" in failed.value.attempts[0].error


def test_s3_without_the_platforms_role_fails_naming_it(cluster, buckets, edited_config):
    """The pods have the token but the platform set no AWS_ROLE_ARN: the first pod's write probe of the
    S3 output fails in one line naming the key; the token never appears."""
    env = {k: v for k, v in cluster.platform_env.items() if k != "AWS_ROLE_ARN"}
    no_role = dataclasses.replace(cluster, platform_env=env, attempts=[], results={})
    with pytest.raises(NodeFailed) as failed:
        no_role.execute(inputs(buckets, edited_config), execution_id="fc0ffee0006")
    assert failed.value.node == "n0"
    error = failed.value.attempts[0].error
    assert f"output_uri: s3://{buckets['s3']}/models: not writable (AWS credentials are misconfigured" in error
    assert "AWS_ROLE_ARN" in error
    assert cluster.token_file.read_text() not in failed.value.attempts[0].logs + error
