"""The GitOps bundle: the WorkflowTemplate, least-privilege RBAC, Kaito's default ConfigMaps, a kustomization.

``kubectl apply -k DIR`` installs everything a namespace needs to run
``kaitune submit``. The service account may: manage NodeClaims (cluster-scoped)
and read Nodes; manage the inference Deployment and Service; read Pods and their
logs (rollout reasons); read Secrets (the push and pull logins the steps mount
are read by the kubelet, but deploy's smoke test and SSA need none of them, so
only ``get``); write WorkflowTaskResults (how Argo's executor reports outputs and
progress); and apply ConfigMaps (the training config).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipelines.finetune import TEMPLATE_NAME, render
from pipelines.plan import Plan
from pipelines.spec import Spec

SERVICE_ACCOUNT = "kaitune"
NAMESPACE = "kaitune"  # kustomize rewrites it: set `namespace:` in kustomization.yaml
LABELS = {"app.kubernetes.io/name": "kaitune", "app.kubernetes.io/part-of": "kaitune"}


def _rule(groups: list[str], resources_: list[str], verbs: list[str]) -> dict[str, Any]:
    return {"apiGroups": groups, "resources": resources_, "verbs": verbs}


def rbac() -> list[dict[str, Any]]:
    meta = {"labels": LABELS}
    namespaced = [
        _rule(["apps"], ["deployments"], ["get", "list", "watch", "create", "patch", "update"]),
        _rule([""], ["services"], ["get", "create", "patch", "update"]),
        _rule([""], ["pods"], ["get", "list", "watch"]),
        _rule([""], ["pods/log"], ["get"]),
        _rule([""], ["secrets"], ["get"]),
        _rule([""], ["configmaps"], ["get", "create", "patch", "update"]),
        _rule(["argoproj.io"], ["workflowtaskresults"], ["create", "patch"]),
    ]
    cluster = [
        _rule(["karpenter.sh"], ["nodeclaims"], ["get", "list", "watch", "create", "patch", "delete"]),
        _rule([""], ["nodes"], ["get", "list", "watch"]),
    ]
    subject = [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT, **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": SERVICE_ACCOUNT, **meta}, "rules": namespaced},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": SERVICE_ACCOUNT, **meta},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICE_ACCOUNT},
         "subjects": subject},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "kaitune-gpu-nodes", **meta}, "rules": cluster},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "kaitune-gpu-nodes", **meta},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kaitune-gpu-nodes"},
         "subjects": subject},
    ]  # fmt: skip


def default_config_maps() -> list[dict[str, Any]]:
    docs = []
    for name in ("qlora-params.yaml", "lora-params.yaml"):
        text = resources.files("pipelines").joinpath("defaults", name).read_text()
        docs.append(yaml.safe_load(text))
    return docs


def _yaml_docs(docs: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=False, width=120, allow_unicode=True) for d in docs)


def bundle(spec: Spec, plan: Plan) -> dict[str, str]:
    """File name to content: what ``kaitune render --gitops DIR`` writes."""
    template = render(spec, plan, kind="WorkflowTemplate")
    files = {
        "workflowtemplate.yaml": _yaml_docs([template]),
        "rbac.yaml": _yaml_docs(rbac()),
        "configmaps.yaml": _yaml_docs(default_config_maps()),
    }
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        "resources": list(files),
    }
    header = f"# kaitune's GitOps bundle: WorkflowTemplate {TEMPLATE_NAME}, RBAC, Kaito's default ConfigMaps.\n"
    files["kustomization.yaml"] = header + yaml.safe_dump(kustomization, sort_keys=False)
    return files


def write(directory: Path, files: dict[str, str]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
