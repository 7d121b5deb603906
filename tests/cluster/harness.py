"""Propeller's side of the pod contract, imitated with docker on this machine.

Flyte stays the engine: every task runs as its serialised template says (image, command, env,
resources), in the built image as the image's user, with Flyte's template variables filled in, its
inputs and outputs as literal files in the bucket. This module only does what propeller does
between pods: order the nodes, bind outputs to inputs, start attempts, run what a dynamic task
yields, and retry a recoverable or killed attempt with the next attempt number.
"""

import re
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flyteidl.admin import launch_plan_pb2, task_pb2, workflow_pb2
from flyteidl.core import condition_pb2 as conditions_pb2
from flyteidl.core import dynamic_job_pb2, errors_pb2, literals_pb2, tasks_pb2
from flyteidl.core import workflow_pb2 as core_workflow_pb2
from google.protobuf.json_format import MessageToDict

from flytetune import storage

START = "start-node"
# Propeller's template variables (flyteplugins' pluginmachinery/core/template), spaces allowed.
_VARIABLE = re.compile(r"{{\s*\.(\w+)\s*}}")
# flyteplugins' ContainerError kinds (flyteidl core/errors.proto).
RECOVERABLE = errors_pb2.ContainerError.RECOVERABLE


class NodeFailed(RuntimeError):
    def __init__(self, node: str, attempts: list["Attempt"]):
        last = attempts[-1]
        super().__init__(f"node {node} failed after {len(attempts)} attempt(s): {last.error or last.exit_code}")
        self.node, self.attempts = node, attempts


@dataclass
class Attempt:
    node: str
    number: int
    container: str
    exit_code: int
    seconds: float
    logs: str
    error: str | None = None
    error_kind: int | None = None
    outputs: dict[str, literals_pb2.Literal] | None = None
    dynamic: dynamic_job_pb2.DynamicJobSpec | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Package:
    """What `pyflyte register` (fast registration) sends: task templates, the workflow, its launch plan."""

    tasks: dict[str, tasks_pb2.TaskTemplate]
    workflow: core_workflow_pb2.WorkflowTemplate
    defaults: dict[str, literals_pb2.Literal]
    subworkflows: dict[str, core_workflow_pb2.WorkflowTemplate] = field(default_factory=dict)


def python_value(literal: literals_pb2.Literal, kind: type):
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine
    from flytekit.models.literals import Literal

    return TypeEngine.to_python_value(FlyteContextManager.current_context(), Literal.from_flyte_idl(literal), kind)


def literal(value: str | None) -> literals_pb2.Literal:
    """A string input, or None for an empty optional one."""
    if value is None:
        return literals_pb2.Literal(scalar=literals_pb2.Scalar(none_type=literals_pb2.Void()))
    return literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(string_value=value)))


def cli_literal(python_type: type, value: str) -> literals_pb2.Literal:
    """What `pyflyte run --remote ... --<input> VALUE` sends: flytekit's own click conversion, on this machine."""
    import click
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine
    from flytekit.interaction.click_types import FlyteLiteralConverter

    ctx = FlyteContextManager.current_context()
    converter = FlyteLiteralConverter(ctx, TypeEngine.to_literal_type(python_type), python_type, is_remote=True)
    # As pyflyte run's option: the click type parses the text, the callback makes the literal.
    parsed = converter.click_type.convert(value, None, None)
    return converter.convert(click.Context(click.Command("run")), None, parsed).to_flyte_idl()


def register(repo: Path, image: str, code_uri: str, out: Path) -> Package:
    """Serialise with `pyflyte package --copy all` (destination `.`, as `pyflyte run --remote`), upload
    the code archive to `code_uri`, and fill in its location as registration does."""
    pkg = out / "pkg.tgz"
    subprocess.run([str(Path(sys.executable).parent / "pyflyte"), "--pkgs", "workflows", "package",
                    "--image", image, "--copy", "all", "--in-container-source-path", ".", "-o", str(pkg), "--force"],
                   cwd=repo, check=True, capture_output=True)
    tasks, workflow, defaults, subworkflows = {}, None, {}, {}
    with tarfile.open(pkg) as tar:
        for member in tar.getmembers():
            blob = tar.extractfile(member).read()
            if member.name.startswith("fast") and member.name.endswith(".tar.gz"):
                (out / member.name).write_bytes(blob)
                storage.copy(str(out / member.name), code_uri)
            elif member.name.endswith("_1.pb"):
                spec = task_pb2.TaskSpec()
                spec.ParseFromString(blob)
                tasks[spec.template.id.name] = spec.template
            elif member.name.endswith("workflows.finetune.finetune_2.pb"):
                spec = workflow_pb2.WorkflowSpec()
                spec.ParseFromString(blob)
                workflow = spec.template
                subworkflows = {sub.id.name: sub for sub in spec.sub_workflows}
            elif member.name.endswith("workflows.finetune.finetune_3.pb"):
                plan = launch_plan_pb2.LaunchPlan()
                plan.ParseFromString(blob)
                defaults = {k: p.default for k, p in plan.spec.default_inputs.parameters.items()
                            if p.HasField("default")}
    for template in tasks.values():
        _fill(template, {"remote_package_path": code_uri})
    return Package(tasks, workflow, defaults, subworkflows)


def _fill(template: tasks_pb2.TaskTemplate, values: dict[str, str]) -> None:
    container = primary_container(template)
    args = [_VARIABLE.sub(lambda m: values.get(m.group(1), m.group(0)), a) for a in container["args"]]
    if template.HasField("container"):
        del template.container.args[:]
        template.container.args.extend(args)
    else:
        container["args"] = args
        _set_pod_containers(template, container)


def primary_container(template: tasks_pb2.TaskTemplate) -> dict:
    """The task's container as the pod will run it, in Kubernetes' spelling (image, command, args, env,
    resources, volumeMounts): the plain container, or the pod template's primary one."""
    if template.HasField("k8s_pod"):
        spec = MessageToDict(template.k8s_pod.pod_spec)
        primary = template.k8s_pod.metadata.annotations.get("primary_container_name", "primary")
        return next(c for c in spec["containers"] if c["name"] == primary)
    c = template.container
    return {"image": c.image, "command": list(c.command), "args": list(c.args),
            "env": [{"name": e.key, "value": e.value} for e in c.env], "resources": _resources(c.resources)}


def _resources(resources) -> dict[str, dict[str, str]]:
    """Flyte's Resources message (a template's or a node override's) in Kubernetes' names."""
    names = {1: "cpu", 2: "nvidia.com/gpu", 3: "memory", 5: "ephemeral-storage"}
    return {side: {names[r.name]: r.value for r in getattr(resources, side)} for side in ("requests", "limits")}


def _set_pod_containers(template: tasks_pb2.TaskTemplate, primary: dict) -> None:
    from google.protobuf.struct_pb2 import Struct

    spec = MessageToDict(template.k8s_pod.pod_spec)
    spec["containers"] = [primary if c["name"] == primary["name"] else c for c in spec["containers"]]
    fresh = Struct()
    fresh.update(spec)
    template.k8s_pod.pod_spec.CopyFrom(fresh)


def _volumes(template: tasks_pb2.TaskTemplate) -> list[dict]:
    return MessageToDict(template.k8s_pod.pod_spec).get("volumes", []) if template.HasField("k8s_pod") else []


def _quantity_bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", value)
    return int(float(match.group(1)) * units.get(match.group(2), 1))


def _cpus(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


@dataclass
class Cluster:
    """One project-domain of a Flyte cluster: its buckets, the platform's pod environment, docker."""

    package: Package
    metadata_uri: str  # the cluster's own bucket (gs:// on GKE): inputs, outputs, raw data
    platform_env: dict[str, str]  # propeller's default-env-vars plus the endpoints standing in for clouds
    token_file: Path  # what the kubelet projects for a service-account token volume
    project: str = "flytetune"
    domain: str = "development"
    cpus: float = 2.0
    log: Callable[[str], None] = print
    attempts: list[Attempt] = field(default_factory=list)
    # execution -> node id -> outputs (START: the workflow's inputs), as propeller records them
    results: dict[str, dict[str, dict[str, literals_pb2.Literal]]] = field(default_factory=dict)

    def execute(self, inputs: dict[str, literals_pb2.Literal], execution_id: str | None = None,
                interrupt: Callable[[Attempt, str], bool] | None = None,
                task_env: dict[str, dict[str, str]] | None = None) -> dict[str, literals_pb2.Literal]:
        """Run the workflow's nodes in dependency order; return the workflow's outputs.

        `interrupt(attempt, container)` is polled while an attempt runs; True stops its container
        as a preempted node does (`docker stop --time 15`: SIGTERM, then SIGKILL after the grace period).
        `task_env` adds environment per task name (what a platform's pod template would add).
        """
        execution = execution_id or f"f{uuid.uuid4().hex[:12]}"
        results = self.results.setdefault(execution, {START: {**self.package.defaults, **inputs}})
        return self._run_graph(execution, "", self.package.workflow, results, interrupt, task_env or {})

    def _run_graph(self, execution, prefix, template, results, interrupt, task_env) -> dict:
        """A workflow's nodes in dependency order (recorded in `results` by node id); its outputs."""
        pending = list(template.nodes)
        while pending:
            node = next(n for n in pending if all(u in results for u in _needs(n)))
            pending.remove(node)
            results[node.id] = self._run_any(execution, f"{prefix}{node.id}", node, results, interrupt, task_env)
        return {b.var: self._bound(b.binding, results) for b in template.outputs}

    def _run_any(self, execution, node_id, node, results, interrupt, task_env) -> dict:
        """A task node in its pods; a branch as its chosen node; a sub-workflow as a graph of its own
        (propeller names the nodes inside them after their parent: n1-n0-n0)."""
        inputs = {b.var: self._bound(b.binding, results) for b in node.inputs}
        if node.HasField("branch_node"):
            chosen = _choose(node.branch_node.if_else, inputs)
            return self._run_any(execution, f"{node_id}-{chosen.id}", chosen, results, interrupt, task_env)
        if node.HasField("workflow_node"):
            sub = self.package.subworkflows[node.workflow_node.sub_workflow_ref.name]
            return self._run_graph(execution, f"{node_id}-", sub, {START: inputs}, interrupt, task_env)
        template = self.package.tasks[node.task_node.reference_id.name]
        return self.run_node(execution, node_id, template, inputs, node.metadata, interrupt=interrupt,
                             task_env=task_env)

    @staticmethod
    def _bound(binding, results) -> literals_pb2.Literal:
        if binding.HasField("promise"):
            return results[binding.promise.node_id or START][binding.promise.var]
        if binding.HasField("scalar"):
            return literals_pb2.Literal(scalar=binding.scalar)
        raise NotImplementedError(f"binding kind {binding.WhichOneof('value')}")

    def run_node(self, execution: str, node_id: str, template: tasks_pb2.TaskTemplate,
                 inputs: dict[str, literals_pb2.Literal], metadata, interrupt=None, overrides=None,
                 task_env=None) -> dict[str, literals_pb2.Literal]:
        # Retries: the node's, unless 0, then the task's (flytepropeller compiler, transformers/k8s/utils.go).
        retries = metadata.retries.retries or template.metadata.retries.retries
        base = f"{self.metadata_uri}/metadata/{execution}/{node_id}"
        storage.write_bytes(f"{base}/inputs.pb", literals_pb2.LiteralMap(literals=inputs).SerializeToString())
        attempts = []
        for number in range(retries + 1):
            attempt = self._attempt(execution, node_id, template, base, number, interrupt, overrides,
                                    (task_env or {}).get(template.id.name, {}))
            attempts.append(attempt)
            if attempt.dynamic is not None:
                return self._run_dynamic(execution, node_id, attempt.dynamic, interrupt, task_env)
            if attempt.outputs is not None:
                return attempt.outputs
            # A graceful stop raises a recoverable error; a killed pod is a system failure: both retried.
            if attempt.error is not None and attempt.error_kind != RECOVERABLE:
                break
        raise NodeFailed(node_id, attempts)

    def compile_dynamic(self, execution: str, node_id: str, inputs: dict[str, literals_pb2.Literal]):
        """One attempt of a dynamic node: what its pod hands back to propeller (futures.pb), not run."""
        node = next(n for n in self.package.workflow.nodes if n.id == node_id)
        template = self.package.tasks[node.task_node.reference_id.name]
        base = f"{self.metadata_uri}/metadata/{execution}/{node_id}"
        storage.write_bytes(f"{base}/inputs.pb", literals_pb2.LiteralMap(literals=inputs).SerializeToString())
        attempt = self._attempt(execution, node_id, template, base, 0, None, None, {})
        assert attempt.dynamic is not None, attempt.error or attempt.logs[-3000:]
        return attempt.dynamic

    def _run_dynamic(self, execution, parent, spec: dynamic_job_pb2.DynamicJobSpec, interrupt, task_env):
        """Run what a dynamic task yielded, as propeller does after its pod returns futures.pb."""
        tasks = {t.id.name: t for t in spec.tasks}
        results: dict[str, dict[str, literals_pb2.Literal]] = {}
        pending = list(spec.nodes)
        while pending:
            node = next(n for n in pending if all(u in results for u in n.upstream_node_ids))
            pending.remove(node)
            inputs = {b.var: self._bound(b.binding, results) for b in node.inputs}
            results[node.id] = self.run_node(execution, f"{parent}-{node.id}", tasks[node.task_node.reference_id.name],
                                             inputs, node.metadata, interrupt, overrides=node.task_node.overrides,
                                             task_env=task_env)
        return {b.var: self._bound(b.binding, results) for b in spec.outputs}

    def _attempt(self, execution, node_id, template, base, number, interrupt, overrides, extra_env) -> Attempt:
        out = f"{base}/{number}"

        def raw(n: int) -> str:  # propeller's {rawoutput-prefix}/{shard}/{execution}-{node}-{attempt}
            return f"{self.metadata_uri}/raw/{execution[-2:]}/{execution}-{node_id}-{n}"

        container = primary_container(template)
        values = {"input": f"{base}/inputs.pb", "outputPrefix": out, "rawOutputDataPrefix": raw(number),
                  "checkpointOutputPrefix": f"{raw(number)}/_flytecheckpoints",
                  "prevCheckpointPrefix": f"{raw(number - 1)}/_flytecheckpoints" if number else '""'}
        args = [_VARIABLE.sub(lambda m: values.get(m.group(1), m.group(0)), a) for a in container["args"]]
        env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
        resources = container.get("resources", {})
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        volumes = _volumes(template)
        shm = None
        if overrides is not None and overrides.HasField("pod_template"):
            pod = MessageToDict(overrides.pod_template.pod_spec)
            primary = next(c for c in pod["containers"] if c["name"] == overrides.pod_template.primary_container_name)
            env.update({e["name"]: e.get("value", "") for e in primary.get("env", [])})
            mounts.update({m["name"]: m["mountPath"] for m in primary.get("volumeMounts", [])})
            volumes = pod.get("volumes", [])
        if overrides is not None and overrides.HasField("resources"):
            resources = _resources(overrides.resources)
        if overrides is not None and overrides.extended_resources.shared_memory.size_limit:
            shm = overrides.extended_resources.shared_memory.size_limit
        # What propeller adds to every task pod (flyteplugins' flytek8s/k8s_resource_adds.go).
        env.update({"FLYTE_INTERNAL_EXECUTION_WORKFLOW": self.package.workflow.id.name,
                    "FLYTE_INTERNAL_EXECUTION_ID": execution, "FLYTE_INTERNAL_EXECUTION_PROJECT": self.project,
                    "FLYTE_INTERNAL_EXECUTION_DOMAIN": self.domain, "FLYTE_ATTEMPT_NUMBER": str(number),
                    "FLYTE_INTERNAL_TASK_PROJECT": self.project, "FLYTE_INTERNAL_TASK_DOMAIN": self.domain,
                    "FLYTE_INTERNAL_TASK_NAME": template.id.name, "FLYTE_INTERNAL_TASK_VERSION": "cluster-test",
                    **self.platform_env, **extra_env})
        name = f"{execution}-{node_id}-{number}".replace("_", "-")[:63]
        cmd = ["docker", "run", "-d", "--name", name, "--network", "host"]
        for key, value in sorted(env.items()):
            cmd += ["-e", f"{key}={value}"]
        for volume in volumes:  # a projected service-account token: the kubelet's file
            if "projected" in volume and volume["name"] in mounts:
                cmd += ["-v", f"{self.token_file}:{mounts[volume['name']]}/token:ro"]
        limits = resources.get("limits", {})
        if "memory" in limits:
            cmd += ["--memory", str(_quantity_bytes(limits["memory"]))]
        if "cpu" in limits:
            cmd += ["--cpus", str(min(_cpus(limits["cpu"]), self.cpus))]
        if shm:  # the preset's /dev/shm, within this machine's means
            cmd += ["--shm-size", str(min(_quantity_bytes(shm), 2 * 2**30))]
        started = time.monotonic()
        subprocess.run([*cmd, container["image"], *container.get("command", []), *args], check=True,
                       capture_output=True, text=True)
        stopped = False
        while True:
            state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name],
                                   capture_output=True, text=True).stdout.strip()
            if state != "true":
                break
            if interrupt and not stopped and interrupt(Attempt(node_id, number, name, -1, 0, "", env=env), name):
                self.log(f"  preempting {name}: docker stop --time 15")
                subprocess.run(["docker", "stop", "--time", "15", name], check=True, capture_output=True)
                stopped = True
            time.sleep(0.5)
        exit_code = int(subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", name],
                                       capture_output=True, text=True).stdout.strip())
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
        subprocess.run(["docker", "rm", name], capture_output=True)
        attempt = Attempt(node_id, number, name, exit_code, time.monotonic() - started,
                          logs.stdout + logs.stderr, env=env)
        if storage.exists(f"{out}/error.pb"):
            doc = errors_pb2.ErrorDocument()
            doc.ParseFromString(storage.read_bytes(f"{out}/error.pb"))
            attempt.error, attempt.error_kind = doc.error.message, doc.error.kind
        elif storage.exists(f"{out}/futures.pb"):
            attempt.dynamic = dynamic_job_pb2.DynamicJobSpec()
            attempt.dynamic.ParseFromString(storage.read_bytes(f"{out}/futures.pb"))
        elif exit_code == 0 and storage.exists(f"{out}/outputs.pb"):
            outputs = literals_pb2.LiteralMap()
            outputs.ParseFromString(storage.read_bytes(f"{out}/outputs.pb"))
            attempt.outputs = dict(outputs.literals)
        else:
            attempt.error = f"exit code {exit_code}, no outputs"
        self.attempts.append(attempt)
        status = "ok" if attempt.error is None else f"failed ({attempt.error.strip().splitlines()[-1][:160]})"
        self.log(f"  {node_id} attempt {number}: {attempt.seconds:.1f} s, {status}")
        return attempt


def _needs(node) -> set[str]:
    """The nodes whose outputs `node` reads, including those read inside its branches: flytekit leaves
    a branch node's upstream_node_ids empty, propeller's compiler derives them from the bindings."""
    needed = set(node.upstream_node_ids)
    for binding in node.inputs:
        if binding.binding.HasField("promise"):
            needed.add(binding.binding.promise.node_id or START)
    if node.HasField("branch_node"):
        if_else = node.branch_node.if_else
        for inner in [if_else.case.then_node, *(c.then_node for c in if_else.other), if_else.else_node]:
            needed |= _needs(inner)
    return needed


def _value(operand, inputs: dict[str, literals_pb2.Literal]):
    """A comparison operand as a comparable value: a primitive, or None for none (also inside a union)."""
    if operand.HasField("var"):
        scalar = inputs[operand.var].scalar
        if scalar.HasField("union"):
            scalar = scalar.union.value.scalar
    else:
        scalar = operand.scalar if operand.HasField("scalar") else literals_pb2.Scalar(primitive=operand.primitive)
    if scalar.HasField("none_type"):
        return None
    primitive = scalar.primitive
    return getattr(primitive, primitive.WhichOneof("value"))


def _choose(if_else, inputs: dict[str, literals_pb2.Literal]):
    """The node a branch runs: the first case whose comparison holds (EQ or NEQ), else the else node."""
    operators = {conditions_pb2.ComparisonExpression.EQ: lambda a, b: a == b,
                 conditions_pb2.ComparisonExpression.NEQ: lambda a, b: a != b}
    for case in [if_else.case, *if_else.other]:
        comparison = case.condition.comparison
        if not case.condition.HasField("comparison") or comparison.operator not in operators:
            raise NotImplementedError(f"branch condition {case.condition}")
        left, right = _value(comparison.left_value, inputs), _value(comparison.right_value, inputs)
        if operators[comparison.operator](left, right):
            return case.then_node
    if if_else.HasField("else_node"):
        return if_else.else_node
    raise RuntimeError(f"no branch matched: {if_else.error.message}")
