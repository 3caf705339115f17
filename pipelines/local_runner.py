"""Run an Argo Workflow dict on this machine: each task a local process, in DAG order.

This executes exactly what ``kaitune render`` writes (no second pipeline
definition). Volumes map to directories, ``{{...}}`` expressions are resolved
as Argo resolves them, output parameters are read from the files the steps
write, retryStrategy is honoured. Any Argo feature outside that subset is
refused up front, naming the field, instead of being silently ignored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pipelines.errors import BadInput, Problem

# Fields with no local meaning (scheduling, identity, metadata): accepted and not enforced.
_CLUSTER_ONLY_SPEC = {
    "serviceAccountName",
    "podMetadata",
    "podGC",
    "ttlStrategy",
    "nodeSelector",
    "tolerations",
    "affinity",
    "securityContext",
    "imagePullSecrets",
    "priority",
    "podPriorityClassName",
    "archiveLogs",
    "volumeClaimGC",
    "workflowMetadata",
    "activeDeadlineSeconds",
    "parallelism",
}
_SPEC_KEYS = {"arguments", "entrypoint", "onExit", "templates", "volumes", "volumeClaimTemplates"}
_CLUSTER_ONLY_TEMPLATE = {
    "podSpecPatch",
    "tolerations",
    "nodeSelector",
    "affinity",
    "metadata",
    "activeDeadlineSeconds",
    "serviceAccountName",
    "securityContext",
    "priorityClassName",
    "timeout",
    "metrics",  # Prometheus metrics: emitted by the Argo controller
    "memoize",  # locally every step already reuses its finished output
}
_TEMPLATE_KEYS = {"name", "container", "dag", "inputs", "outputs", "retryStrategy"}
_CONTAINER_KEYS = {"image", "command", "args", "env", "volumeMounts", "resources", "imagePullPolicy", "name"}
_TASK_KEYS = {"name", "template", "arguments", "depends", "dependencies"}
_EXPR = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
_RETRY_EXPR = re.compile(r"^asInt\(lastRetry\.exitCode\)\s*==\s*(\d+)$")
_DURATION = re.compile(r"^(\d+)(s|m|h)$")


@dataclass
class TaskRun:
    name: str
    template: str
    depends: list[str]
    arguments: dict[str, str]
    status: str = "Pending"  # Pending, Running, Succeeded, Failed, Omitted
    exit_code: int | None = None
    attempts: int = 0
    started: float | None = None
    finished: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    progress: str = ""
    log_path: Path | None = None

    @property
    def duration(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.monotonic()) - self.started


@dataclass
class RunResult:
    status: str
    tasks: list[TaskRun]
    exit_task: TaskRun | None
    run_dir: Path

    def failed(self) -> list[TaskRun]:
        return [t for t in self.tasks if t.status == "Failed"]


def _seconds(text: str | None) -> float:
    if not text:
        return 0.0
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(text)
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


def _is_docker_login(volume: dict[str, Any]) -> bool:
    """A kubernetes.io/dockerconfigjson secret volume (a registry login)."""
    return any(item.get("key") == ".dockerconfigjson" for item in volume.get("secret", {}).get("items", []))


class LocalRunner:
    def __init__(
        self,
        workflow: dict[str, Any],
        run_dir: Path,
        *,
        base_dir: Path,
        overrides: dict[str, str] | None = None,
        on_change: Callable[[TaskRun], None] | None = None,
        backoff_scale: float = 1.0,
    ) -> None:
        self.workflow = workflow
        self.spec: dict[str, Any] = workflow.get("spec", {})
        self.run_dir = run_dir
        self.base_dir = base_dir
        self.on_change = on_change or (lambda _t: None)
        self.backoff_scale = backoff_scale
        self.templates = {t["name"]: t for t in self.spec.get("templates", [])}
        self.params = {p["name"]: str(p.get("value", "")) for p in self.spec.get("arguments", {}).get("parameters", [])}
        unknown = sorted(set(overrides or {}) - set(self.params))
        if unknown:
            raise BadInput(
                Problem(
                    f"-p {unknown[0]}", "is not a parameter of this workflow", f"use one of: {', '.join(self.params)}"
                )
            )
        self.params.update(overrides or {})
        self.name = (
            workflow.get("metadata", {}).get("name")
            or workflow.get("metadata", {}).get("generateName", "run-").rstrip("-") + "-local"
        )
        self.status = "Running"
        self.volumes: dict[str, Path] = {}
        self._lock = threading.Lock()
        self.check()

    # -- validation -------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse, all at once, whatever this runner cannot do faithfully."""
        problems: list[Problem] = []

        def refuse(path: str, what: str) -> None:
            problems.append(
                Problem(
                    path,
                    f"{what} is not supported by the local runner",
                    "run this workflow on Argo, or remove the field for local runs",
                )
            )

        for key in self.spec:
            if key not in _SPEC_KEYS | _CLUSTER_ONLY_SPEC:
                refuse(f"spec.{key}", key)
        for i, vol in enumerate(self.spec.get("volumes", [])):
            kinds = set(vol) - {"name"}
            if kinds - {"hostPath", "emptyDir"} and not _is_docker_login(vol):
                refuse(f"spec.volumes[{i}]", f"volume type {sorted(kinds)[0]!r}")
        entry = self.templates.get(self.spec.get("entrypoint", ""))
        if entry is None or "dag" not in entry:
            problems.append(
                Problem("spec.entrypoint", "must name a DAG template", "use a DAG entrypoint for local runs")
            )
        exit_name = self.spec.get("onExit")
        if exit_name and "container" not in self.templates.get(exit_name, {}):
            problems.append(
                Problem(
                    "spec.onExit",
                    f"{exit_name!r} must be a container template",
                    "use a container template as exit handler",
                )
            )
        for name, tmpl in self.templates.items():
            where = f"spec.templates[{name}]"
            for key in tmpl:
                if key not in _TEMPLATE_KEYS | _CLUSTER_ONLY_TEMPLATE:
                    refuse(f"{where}.{key}", key)
            for key in tmpl.get("container", {}):
                if key not in _CONTAINER_KEYS:
                    refuse(f"{where}.container.{key}", key)
            for i, env in enumerate(tmpl.get("container", {}).get("env", [])):
                if "value" not in env:
                    refuse(f"{where}.container.env[{i}]", "env valueFrom")
            command = tmpl.get("container", {}).get("command", [])
            if "container" in tmpl and (not command or command[0] != "python"):
                refuse(f"{where}.container.command", f"command {command[:1]!r} (only 'python')")
            for out in tmpl.get("outputs", {}).get("parameters", []):
                if "path" not in out.get("valueFrom", {}):
                    refuse(f"{where}.outputs.parameters[{out.get('name')}]", "an output without valueFrom.path")
            for key in tmpl.get("outputs", {}):
                if key not in ("parameters", "artifacts"):
                    refuse(f"{where}.outputs.{key}", key)
            for art in tmpl.get("outputs", {}).get("artifacts", []):
                if "path" not in art:
                    refuse(f"{where}.outputs.artifacts[{art.get('name')}]", "an artifact without a path")
            retry = tmpl.get("retryStrategy")
            if retry:
                expr = retry.get("expression")
                if expr and not _RETRY_EXPR.match(expr):
                    refuse(f"{where}.retryStrategy.expression", f"expression {expr!r}")
                try:
                    for key in ("duration", "maxDuration"):
                        _seconds(retry.get("backoff", {}).get(key))
                except ValueError as exc:
                    refuse(f"{where}.retryStrategy.backoff", f"duration {exc}")
            for i, task in enumerate(tmpl.get("dag", {}).get("tasks", [])):
                for key in task:
                    if key not in _TASK_KEYS:
                        refuse(f"{where}.dag.tasks[{i}].{key}", key)
                if task.get("template") not in self.templates:
                    problems.append(
                        Problem(
                            f"{where}.dag.tasks[{i}].template",
                            f"{task.get('template')!r} is not a template here",
                            "fix the name",
                        )
                    )
                if "||" in task.get("depends", "") or "!" in task.get("depends", ""):
                    refuse(f"{where}.dag.tasks[{i}].depends", "'||' and '!' in depends")
        if problems:
            raise BadInput(problems)

    # -- expressions and paths ----------------------------------------------------------------------------------
    def _resolve(self, text: str, inputs: dict[str, str], tasks: dict[str, TaskRun]) -> str:
        def one(match: re.Match[str]) -> str:
            expr = match.group(1)
            parts = expr.split(".")
            if expr.startswith("workflow.parameters.") and parts[2] in self.params:
                return self.params[parts[2]]
            if expr.startswith("inputs.parameters.") and parts[2] in inputs:
                return inputs[parts[2]]
            if expr.startswith("tasks.") and len(parts) == 5 and parts[2:4] == ["outputs", "parameters"]:
                task = tasks.get(parts[1])
                if task and parts[4] in task.outputs:
                    return task.outputs[parts[4]]
            if expr == "workflow.name":
                return self.name
            if expr == "workflow.status":
                return self.status
            if expr == "workflow.namespace":
                return self.params.get("namespace", "default")
            raise BadInput(
                Problem(
                    f"{{{{{expr}}}}}",
                    "cannot be resolved by the local runner",
                    "check the parameter or task output name",
                )
            )

        return _EXPR.sub(one, text)

    def _volume_dir(self, name: str) -> Path:
        if name in self.volumes:
            return self.volumes[name]
        for vol in self.spec.get("volumes", []):
            if vol["name"] == name and _is_docker_login(vol):
                # A registry login is, locally, the user's own Docker config: what `docker push` would use.
                self.volumes[name] = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
                return self.volumes[name]
            if vol["name"] == name and "hostPath" in vol:
                path = Path(vol["hostPath"]["path"])
                self.volumes[name] = path if path.is_absolute() else (self.base_dir / path).resolve()
                return self.volumes[name]
        # volumeClaimTemplates and emptyDir: a directory of this run
        self.volumes[name] = self.run_dir / "volumes" / name
        self.volumes[name].mkdir(parents=True, exist_ok=True)
        return self.volumes[name]

    def _path_map(self, tmpl: dict[str, Any], task_dir: Path) -> list[tuple[str, Path]]:
        mapping = [
            (m["mountPath"].rstrip("/"), self._volume_dir(m["name"]))
            for m in tmpl.get("container", {}).get("volumeMounts", [])
        ]
        out_paths = [p["valueFrom"]["path"] for p in tmpl.get("outputs", {}).get("parameters", [])]
        if out_paths:
            parent = str(PurePosixPath(os.path.commonpath(out_paths)))
            if len(out_paths) == 1:
                parent = str(PurePosixPath(out_paths[0]).parent)
            mapping.append((parent, task_dir / "outputs"))
        # Longest mount first, as a container's mount table resolves nested mounts.
        return sorted(mapping, key=lambda item: len(item[0]), reverse=True)

    @staticmethod
    def _map_path(token: str, mapping: list[tuple[str, Path]]) -> str:
        prefix, sep, value = token.partition("=") if token.startswith("--") and "=" in token else ("", "", token)
        for container_path, host in mapping:
            if value == container_path or value.startswith(container_path + "/"):
                value = str(host) + value[len(container_path) :]
                break
        return f"{prefix}{sep}{value}"

    # -- execution ----------------------------------------------------------------------------------------------
    def _command(
        self, tmpl: dict[str, Any], inputs: dict[str, str], tasks: dict[str, TaskRun], task_dir: Path
    ) -> tuple[list[str], dict[str, str], list[tuple[str, Path]]]:
        container = tmpl["container"]
        mapping = self._path_map(tmpl, task_dir)
        argv = [
            self._map_path(self._resolve(a, inputs, tasks), mapping)
            for a in [*container.get("command", []), *container.get("args", [])]
        ]
        argv[0] = sys.executable
        env = dict(os.environ)
        for item in container.get("env", []):
            env[item["name"]] = self._map_path(self._resolve(item["value"], inputs, tasks), mapping)
        env["ARGO_PROGRESS_FILE"] = str(task_dir / "progress")
        return argv, env, mapping

    def _inputs(self, tmpl: dict[str, Any], task: TaskRun, tasks: dict[str, TaskRun]) -> dict[str, str]:
        values = {}
        for param in tmpl.get("inputs", {}).get("parameters", []):
            name = param["name"]
            if name in task.arguments:
                values[name] = self._resolve(task.arguments[name], {}, tasks)
            elif "value" in param or "default" in param:
                values[name] = str(param.get("value", param.get("default")))
            else:
                raise BadInput(
                    Problem(
                        f"task {task.name}", f"input parameter {name!r} has no value", "pass it in the task's arguments"
                    )
                )
        return values

    def _execute(self, task: TaskRun, tasks: dict[str, TaskRun]) -> None:
        tmpl = self.templates[task.template]
        task_dir = self.run_dir / "tasks" / task.name
        (task_dir / "outputs").mkdir(parents=True, exist_ok=True)
        task.log_path = self.run_dir / "logs" / f"{task.name}.log"
        task.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv, env, mapping = self._command(tmpl, self._inputs(tmpl, task, tasks), tasks, task_dir)
        retry = tmpl.get("retryStrategy") or {}
        limit = int(retry.get("limit", 0))
        match = _RETRY_EXPR.match(retry.get("expression", "")) if retry.get("expression") else None
        backoff = retry.get("backoff", {})
        delay, factor = _seconds(backoff.get("duration")), float(backoff.get("factor", 1))
        task.status, task.started = "Running", time.monotonic()
        self.on_change(task)
        while True:
            task.attempts += 1
            with open(task.log_path, "ab") as log:
                proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                while proc.poll() is None:
                    self._read_progress(task, task_dir)
                    time.sleep(0.2)
            task.exit_code = proc.returncode
            if proc.returncode == 0:
                break
            retryable = match is None or proc.returncode == int(match.group(1))
            if task.attempts > limit or not retryable:
                break
            time.sleep(delay * self.backoff_scale)
            delay *= factor
        task.finished = time.monotonic()
        if task.exit_code == 0:
            task.outputs = self._read_outputs(tmpl, mapping, task)
            task.artifacts = self._collect_artifacts(tmpl, mapping, task)
        task.status = "Succeeded" if task.exit_code == 0 else "Failed"
        self.on_change(task)

    def _read_progress(self, task: TaskRun, task_dir: Path) -> None:
        try:
            text = (task_dir / "progress").read_text().strip()
        except OSError:
            return
        if text and text != task.progress:
            task.progress = text
            self.on_change(task)

    def _read_outputs(self, tmpl: dict[str, Any], mapping: list[tuple[str, Path]], task: TaskRun) -> dict[str, str]:
        outputs = {}
        for param in tmpl.get("outputs", {}).get("parameters", []):
            path = Path(self._map_path(param["valueFrom"]["path"], mapping))
            try:
                outputs[param["name"]] = path.read_text()
            except FileNotFoundError:
                task.exit_code = 1
                with open(task.log_path or os.devnull, "a") as log:
                    log.write(f"kaitune runner: output parameter {param['name']!r} was not written to {path}\n")
        return outputs

    def _collect_artifacts(
        self, tmpl: dict[str, Any], mapping: list[tuple[str, Path]], task: TaskRun
    ) -> dict[str, str]:
        """Output artifacts copied under the run directory, as Argo would store them in its repository."""
        out = {}
        for art in tmpl.get("outputs", {}).get("artifacts", []):
            source = Path(self._map_path(art["path"], mapping))
            if not source.is_file():
                if not art.get("optional"):
                    task.exit_code = 1
                continue
            dest = self.run_dir / "artifacts" / task.name / f"{art['name']}{source.suffix}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
            out[art["name"]] = str(dest)
        return out

    def _dag_tasks(self) -> dict[str, TaskRun]:
        dag = self.templates[self.spec["entrypoint"]]["dag"]
        tasks = {}
        for t in dag["tasks"]:
            if "depends" in t:
                deps = [d.strip().split(".")[0] for d in t["depends"].split("&&") if d.strip()]
            else:
                deps = list(t.get("dependencies", []))
            args = {p["name"]: str(p.get("value", "")) for p in t.get("arguments", {}).get("parameters", [])}
            tasks[t["name"]] = TaskRun(t["name"], t["template"], deps, args)
        return tasks

    def run(self) -> RunResult:
        tasks = self._dag_tasks()
        threads: dict[str, threading.Thread] = {}
        while True:
            for task in tasks.values():
                if task.status != "Pending":
                    continue
                dep_status = [tasks[d].status for d in task.depends]
                if any(s in ("Failed", "Omitted") for s in dep_status):
                    task.status = "Omitted"
                    self.on_change(task)
                elif all(s == "Succeeded" for s in dep_status):
                    thread = threading.Thread(target=self._execute_safely, args=(task, tasks), daemon=True)
                    threads[task.name] = thread
                    task.status = "Running"
                    thread.start()
            if all(t.status in ("Succeeded", "Failed", "Omitted") for t in tasks.values()):
                break
            time.sleep(0.1)
        self.status = "Failed" if any(t.status == "Failed" for t in tasks.values()) else "Succeeded"
        exit_task = None
        if self.spec.get("onExit"):
            exit_task = TaskRun(self.spec["onExit"], self.spec["onExit"], [], {})
            self._execute_safely(exit_task, tasks)
        result = RunResult(self.status, list(tasks.values()), exit_task, self.run_dir)
        self._write_summary(result)
        return result

    def _execute_safely(self, task: TaskRun, tasks: dict[str, TaskRun]) -> None:
        try:
            self._execute(task, tasks)
        except BadInput as exc:
            task.status, task.exit_code, task.finished = "Failed", 2, time.monotonic()
            task.log_path = task.log_path or self.run_dir / "logs" / f"{task.name}.log"
            task.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(task.log_path, "a") as log:
                log.write(exc.render() + "\n")
            self.on_change(task)

    def _write_summary(self, result: RunResult) -> None:
        doc = {
            "workflow": self.name,
            "status": result.status,
            "tasks": [
                {
                    "name": t.name,
                    "status": t.status,
                    "exit_code": t.exit_code,
                    "attempts": t.attempts,
                    "seconds": round(t.duration or 0, 2),
                    "outputs": t.outputs,
                    "artifacts": t.artifacts,
                }
                for t in [*result.tasks, *([result.exit_task] if result.exit_task else [])]
            ],
        }
        (self.run_dir / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
