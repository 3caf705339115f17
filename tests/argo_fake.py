"""A fake Argo Server on loopback: the REST routes kaitune's submit, status and logs use, recording every request.

Workflows it returns are shaped like Argo 4's: ``status.nodes`` keyed by node id,
the DAG root, one Retry node per step with Pod attempts as children, output
parameters on the nodes, and ``progress``. Tests script a workflow's life as a
list of states that successive GETs walk through.
"""

from __future__ import annotations

import contextlib
import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from loopback import http_server, json_handler

TOKEN = "Bearer kaitune-test-token-9f8e7d"
STEP_ORDER = ("provision", "fetch-data", "train", "push", "deploy")


def workflow(
    name: str,
    phases: dict[str, str],
    phase: str,
    *,
    outputs: dict[str, dict[str, str]] | None = None,
    message: str = "",
    params: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A workflow as the Argo Server returns it, with each step at the given phase."""
    nodes: dict[str, Any] = {
        name: {
            "id": name,
            "name": name,
            "displayName": name,
            "type": "DAG",
            "templateName": "main",
            "phase": phase,
            "startedAt": "2026-11-28T10:00:00Z",
            "children": [],
        }
    }
    for i, step in enumerate(STEP_ORDER):
        if step not in phases:
            continue
        retry_id, pod_id = f"{name}-{1000 + i}", f"{name}-{2000 + i}"
        started, finished = f"2026-11-28T10:{i:02d}:00Z", f"2026-11-28T10:{i:02d}:42Z"
        done = phases[step] in ("Succeeded", "Failed", "Error")
        out = {"parameters": [{"name": k, "value": v} for k, v in (outputs or {}).get(step, {}).items()]}
        nodes[retry_id] = {
            "id": retry_id,
            "name": f"{name}.{step}",
            "displayName": step,
            "type": "Retry",
            "templateName": step,
            "phase": phases[step],
            "startedAt": started,
            **({"finishedAt": finished} if done else {}),
            "children": [pod_id],
            "outputs": out,
        }
        nodes[pod_id] = {
            "id": pod_id,
            "name": f"{name}.{step}(0)",
            "displayName": f"{step}(0)",
            "type": "Pod",
            "templateName": step,
            "phase": phases[step],
            "startedAt": started,
            **({"finishedAt": finished} if done else {}),
            "outputs": out,
        }
        nodes[name]["children"].append(retry_id)
    finished_steps = sum(1 for p in phases.values() if p == "Succeeded")
    return {
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "uid": "8d3c1a2e-0000-4000-8000-000000000001",
            "creationTimestamp": "2026-11-28T10:00:00Z",
            "labels": {"kaitune.io/workspace": "workspace-tuning-phi-3", "workflows.argoproj.io/phase": phase},
        },
        "spec": {
            "workflowTemplateRef": {"name": "kaitune-finetune"},
            "arguments": {
                "parameters": [
                    {"name": k, "value": v}
                    for k, v in (
                        params or {"workspace": "workspace-tuning-phi-3", "instance-type": "Standard_NC6s_v3"}
                    ).items()
                ]
            },
        },
        "status": {
            "phase": phase,
            "startedAt": "2026-11-28T10:00:00Z",
            "progress": f"{finished_steps}/6",
            "nodes": nodes,
            **({"message": message} if message else {}),
        },
    }


@dataclass
class FakeArgo:
    templates: dict[str, dict[str, Any]] = field(default_factory=dict)
    lives: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # name -> successive states
    logs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # name -> (pod, line)
    created: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, list[str]]]] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    url: str = ""

    def handle(self, method: str, raw: str, body: bytes, auth: str) -> tuple[int, Any]:
        parts = urllib.parse.urlsplit(raw)
        query = urllib.parse.parse_qs(parts.query)
        path = parts.path
        self.requests.append((method, path, query))
        self.auth_headers.append(auth)
        if auth != TOKEN:
            return 401, {"code": 16, "message": "token not valid. see https://argo-workflows.readthedocs.io/"}
        segments = path.strip("/").split("/")
        if segments[:3] == ["api", "v1", "workflow-templates"] and method == "GET":
            template = self.templates.get(segments[4])
            return (200, template) if template else (404, {"code": 5, "message": "workflowtemplates not found"})
        if segments[:3] == ["api", "v1", "workflows"] and method == "POST":
            request = json.loads(body)
            wf = request["workflow"]
            name = wf["metadata"].get("generateName", "wf-") + f"x{len(self.created) + 1:04d}"
            wf = {
                **wf,
                "metadata": {**wf["metadata"], "name": name, "uid": "1", "creationTimestamp": "2026-11-28T10:00:00Z"},
            }
            self.created.append(request)
            self.lives.setdefault(name, [{**wf, "status": {"phase": "Pending"}}])
            return 200, wf
        if segments[:3] == ["api", "v1", "workflows"] and len(segments) == 5 and method == "GET":
            states = self.lives.get(segments[4])
            if not states:
                return 404, {"code": 5, "message": f'workflows.argoproj.io "{segments[4]}" not found'}
            return 200, states.pop(0) if len(states) > 1 else states[0]
        if segments[:3] == ["api", "v1", "workflows"] and segments[-1] == "log":
            pod = query.get("podName", [None])[0]
            entries = [(p, line) for p, line in self.logs.get(segments[4], []) if pod is None or p == pod]
            return 200, "\n".join(json.dumps({"result": {"content": line, "podName": p}}) for p, line in entries)
        return 404, {"code": 5, "message": f"no route {method} {path}"}

    @contextlib.contextmanager
    def serve(self) -> Iterator[FakeArgo]:
        def answer(request: BaseHTTPRequestHandler, body: bytes) -> tuple[int, Any]:
            return self.handle(request.command, request.path, body, request.headers.get("Authorization", ""))

        with http_server(json_handler(answer)) as url:
            self.url = url
            yield self
