"""A kaitune workflow's state, read the way ``kubectl get workspace`` shows a Kaito Workspace.

Columns: NAME, INSTANCE, RESOURCEREADY (provision), INFERENCEREADY (deploy),
WORKSPACEREADY (the whole workflow), AGE. ``wide`` adds each step's phase and
duration, the adapter digest and the endpoint. Input is the Workflow JSON the
Argo Server returns (Argo 4): ``status.nodes`` keyed by node id, one Retry node
per step with its Pod attempts as children.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

STEPS = ("provision", "fetch-data", "train", "push", "deploy")


@dataclass(frozen=True)
class StepState:
    name: str
    phase: str
    started: str | None
    finished: str | None
    outputs: dict[str, str]
    pod_name: str | None

    def duration(self, now: datetime) -> str:
        if not self.started:
            return "-"
        end = _time(self.finished) if self.finished else now
        return age(end - _time(self.started))


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def age(delta: Any) -> str:
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _pod_name(workflow: str, node: dict[str, Any]) -> str | None:
    """Argo's v2 pod names: WORKFLOW-TEMPLATE-HASH, the hash being the node id's suffix."""
    if node.get("type") != "Pod":
        return None
    suffix = str(node.get("id", "")).rsplit("-", 1)[-1]
    return f"{workflow}-{node.get('templateName', node.get('displayName'))}-{suffix}"


def _params(node: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: str(p.get("value", "")) for p in (node.get("outputs") or {}).get("parameters") or []}


def steps(wf: dict[str, Any]) -> dict[str, StepState]:
    """Each pipeline step's state: its Retry node (the step as a whole) or, without retries, its Pod node."""
    name = wf.get("metadata", {}).get("name", "")
    nodes: dict[str, Any] = wf.get("status", {}).get("nodes") or {}
    out: dict[str, StepState] = {}
    for kind in ("Retry", "Pod"):
        for node in nodes.values():
            step = str(node.get("displayName", "")).split("(")[0]  # attempts are "train(0)", "train(1)"
            if node.get("type") != kind or step not in STEPS or step in out:
                continue
            attempts = sorted((nodes[c] for c in node.get("children") or [] if c in nodes),
                              key=lambda n: n.get("startedAt") or "")  # fmt: skip
            newest = attempts[-1] if kind == "Retry" and attempts else node
            params = _params(node) or _params(newest)
            out[step] = StepState(step, node.get("phase", "Pending"), node.get("startedAt"), node.get("finishedAt"),
                                  params, _pod_name(name, newest))  # fmt: skip
    return out


def _ready(phase: str | None) -> str:
    return {"Succeeded": "True", "Failed": "False", "Error": "False", "Omitted": "False"}.get(phase or "", "Unknown")


def parameters(wf: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: str(p.get("value", "")) for p in wf.get("spec", {}).get("arguments", {}).get("parameters", [])}


def row(wf: dict[str, Any], now: datetime | None = None, wide: bool = False) -> dict[str, str]:
    now = now or datetime.now(UTC)
    meta, status = wf.get("metadata", {}), wf.get("status", {})
    params = parameters(wf)
    state = steps(wf)
    workspace = meta.get("labels", {}).get("kaitune.io/workspace") or params.get("workspace") or meta.get("name", "")
    instance = params.get("instance-type") or ("byo" if params else "")
    created = meta.get("creationTimestamp")
    workflow_phase = status.get("phase")
    out = {
        "NAME": workspace,
        "INSTANCE": instance,
        "RESOURCEREADY": _ready(state["provision"].phase) if "provision" in state else "Unknown",
        "INFERENCEREADY": _ready(state["deploy"].phase) if "deploy" in state else "Unknown",
        "WORKSPACEREADY": _ready(workflow_phase) if workflow_phase in ("Succeeded", "Failed", "Error") else "Unknown",
        "AGE": age(now - _time(created)) if created else "-",
    }
    if wide:
        out["WORKFLOW"] = meta.get("name", "")
        out["PROGRESS"] = status.get("progress", "-")
        for step in STEPS:
            s = state.get(step)
            out[step.upper()] = f"{s.phase} ({s.duration(now)})" if s else "-"
        out["ADAPTER"] = state["push"].outputs.get("image-ref", "-") if "push" in state else "-"
        out["ENDPOINT"] = state["deploy"].outputs.get("endpoint", "-") if "deploy" in state else "-"
        if status.get("message") and workflow_phase in ("Failed", "Error"):
            out["MESSAGE"] = status["message"]
    return out
