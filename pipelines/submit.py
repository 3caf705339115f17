"""``kaitune submit``: a Workflow from the kaitune-finetune WorkflowTemplate (or inline), created through hera.

By reference, the Workflow carries only the spec's values as parameters; the
template on the server must have been rendered for a spec of the same shape
(the same volumes and parameters), which is checked before anything is created.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from pipelines import argo_server
from pipelines.argo_server import ArgoSettings
from pipelines.errors import BadInput, Problem
from pipelines.finetune import TEMPLATE_NAME, build, workflow_parameters
from pipelines.plan import Plan
from pipelines.spec import Spec

FINAL_PHASES = {"Succeeded", "Failed", "Error"}


def by_reference(spec: Spec, plan: Plan, namespace: str) -> dict[str, Any]:
    rendered = build(spec, plan).to_dict()
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {
            "generateName": f"{spec.name}-",
            "namespace": namespace,
            "labels": rendered["metadata"]["labels"],
            "annotations": rendered["metadata"]["annotations"],
        },
        "spec": {
            "workflowTemplateRef": {"name": TEMPLATE_NAME},
            "arguments": {"parameters": [{"name": k, "value": v} for k, v in workflow_parameters(spec, plan).items()]},
        },
    }


def inline(spec: Spec, plan: Plan, namespace: str) -> dict[str, Any]:
    doc: dict[str, Any] = build(spec, plan).to_dict()
    doc["metadata"].pop("name", None)
    doc["metadata"]["generateName"] = f"{spec.name}-"
    doc["metadata"]["namespace"] = namespace
    return doc


def check_template_shape(template: dict[str, Any], spec: Spec, plan: Plan) -> None:
    """The server's template must declare this spec's parameters and volumes, or the run would fail later."""
    wanted = build(spec, plan, kind="WorkflowTemplate").to_dict()["spec"]
    have = template.get("spec", {})

    def names(doc: dict[str, Any], *path: str) -> set[str]:
        node: Any = doc
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return {item["name"] for item in node} if isinstance(node, list) else set()

    missing_params = names(wanted, "arguments", "parameters") - names(have, "arguments", "parameters")
    missing_volumes = names(wanted, "volumes") - names(have, "volumes")
    if missing_params or missing_volumes:
        what = ", ".join(sorted(missing_params | missing_volumes))
        raise BadInput(
            Problem(f"WorkflowTemplate {TEMPLATE_NAME}", f"on the server lacks what this spec needs: {what}",
                    "re-render it (kaitune render FILE --template, or --gitops) and apply it, or submit --inline")
        )  # fmt: skip


def submit(s: ArgoSettings, spec: Spec, plan: Plan, *, use_inline: bool) -> dict[str, Any]:
    from hera.exceptions import NotFound
    from hera.workflows.models import Workflow as WorkflowModel
    from hera.workflows.models import WorkflowCreateRequest

    svc = argo_server.service(s)
    if not use_inline:
        try:
            template = argo_server.call(
                s,
                f"read WorkflowTemplate {TEMPLATE_NAME}",
                lambda: svc.get_workflow_template(TEMPLATE_NAME, namespace=s.namespace),
            )
        except NotFound:
            raise BadInput(
                Problem(f"WorkflowTemplate {TEMPLATE_NAME}", f"is not in namespace {s.namespace}",
                        "apply it first (kubectl apply -k examples/gitops), or submit with --inline")
            ) from None  # fmt: skip
        check_template_shape(_as_json(template), spec, plan)
    doc = inline(spec, plan, s.namespace) if use_inline else by_reference(spec, plan, s.namespace)
    request = WorkflowCreateRequest(workflow=WorkflowModel(**doc), namespace=s.namespace)
    created = argo_server.call(s, "create the Workflow", lambda: svc.create_workflow(request, namespace=s.namespace))
    return _as_json(created)


def get(s: ArgoSettings, name: str) -> dict[str, Any]:
    from hera.exceptions import NotFound

    svc = argo_server.service(s)
    try:
        wf = argo_server.call(s, f"read Workflow {name}", lambda: svc.get_workflow(name, namespace=s.namespace))
    except NotFound:
        raise BadInput(Problem(f"workflow {name}", f"is not in namespace {s.namespace}", "check the name")) from None
    return _as_json(wf)


def _as_json(model: Any) -> dict[str, Any]:
    """A hera model as the server's JSON (timestamps as strings, keys as aliases)."""
    doc: dict[str, Any] = json.loads(model.json(by_alias=True, exclude_none=True))
    return doc


def wait(
    s: ArgoSettings, name: str, on_update: Callable[[dict[str, Any]], None], poll_s: float = 5.0
) -> dict[str, Any]:
    """Follow the workflow until it finishes; ``on_update`` sees each new state."""
    last = None
    while True:
        wf = get(s, name)
        status = wf.get("status", {})
        marker = (status.get("phase"), status.get("progress"), len(status.get("nodes", {})))
        if marker != last:
            on_update(wf)
            last = marker
        if status.get("phase") in FINAL_PHASES:
            return wf
        time.sleep(poll_s)
