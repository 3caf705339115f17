"""GPU nodes on Kubernetes: Karpenter NodeClaims the way Kaito's gpu-provisioner expects them, or BYO nodes.

NodeClaims carry the workspace's labels, the ``sku=gpu:NoSchedule`` taint, the
instance-type requirements and the do-not-disrupt annotation, and are named
from the workspace so a rerun finds its own claim instead of buying a second
node. Waiting ends when the claim is Ready and its Node is Ready with
``nvidia.com/gpu`` allocatable; ``InstanceTypesUnavailable`` ends it at once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from pipelines.errors import BadInput, Problem, Transient
from pipelines.gpus import GpuSku
from steps.kube import NODECLAIM, Apis, call, status_of

log = logging.getLogger("kaitune")
WORKSPACE_LABEL = "kaito.sh/workspace"
NAMESPACE_LABEL = "kaito.sh/workspacenamespace"
CREATED_BY_LABEL = "kaitune.io/created-by"
NODEPOOL = "kaito"
GPU_RESOURCE = "nvidia.com/gpu"
# Karpenter's launch failures that waiting cannot fix.
TERMINAL_REASONS = {"InstanceTypesUnavailable", "InsufficientCapacity", "InstanceTypeNotSupported"}
NODE_CLASSES = {
    "azure": {"group": "karpenter.azure.com", "kind": "AKSNodeClass", "name": "image-family-ubuntu"},
    "aws": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"},
}


def claim_name(workspace: str, namespace: str) -> str:
    return "ws" + hashlib.sha256(f"{namespace}/{workspace}".encode()).hexdigest()[:9]


def node_labels(workspace: str, namespace: str, match_labels: dict[str, str]) -> dict[str, str]:
    return {**match_labels, WORKSPACE_LABEL: workspace, NAMESPACE_LABEL: namespace}


def nodeclaim_manifest(
    workspace: str, namespace: str, sku: GpuSku, match_labels: dict[str, str], storage_gib: int
) -> dict[str, Any]:
    requirements = [
        {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": [sku.name]},
        {"key": "karpenter.sh/nodepool", "operator": "In", "values": [NODEPOOL]},
        {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
    ]
    if sku.cloud == "azure":
        requirements.append({"key": "karpenter.azure.com/sku-name", "operator": "In", "values": [sku.name]})
    else:
        requirements.append(
            {"key": "karpenter.k8s.aws/instance-gpu-count", "operator": "In", "values": [str(sku.count)]}
        )
    return {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodeClaim",
        "metadata": {
            "name": claim_name(workspace, namespace),
            "labels": {
                **node_labels(workspace, namespace, match_labels),
                "karpenter.sh/nodepool": NODEPOOL,
                CREATED_BY_LABEL: "kaitune",
            },
            "annotations": {"karpenter.sh/do-not-disrupt": "true"},
        },
        "spec": {
            "nodeClassRef": dict(NODE_CLASSES[sku.cloud]),
            "taints": [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
            "requirements": requirements,
            "resources": {"requests": {"storage": f"{storage_gib}Gi"}},
        },
    }


def storage_gib(params: float) -> int:
    """OS disk for the node: 16-bit weights, the container images, and headroom."""
    return max(120, math.ceil(2 * params / 1024**3 * 1.5 + 60))


def ensure_claim(apis: Apis, manifest: dict[str, Any]) -> dict[str, Any]:
    """Create the claim, or reuse this workspace's existing one (an idempotent rerun)."""
    from kubernetes.client.exceptions import ApiException

    group, version, plural = NODECLAIM
    name = manifest["metadata"]["name"]
    try:
        created: dict[str, Any] = call(
            f"create NodeClaim {name}",
            lambda: apis.custom.create_cluster_custom_object(group, version, plural, manifest),
        )
        log.info("created NodeClaim %s for %s", name, manifest["spec"]["requirements"][0]["values"][0])
        return created
    except ApiException as exc:
        if status_of(exc) != 409:
            raise
    existing: dict[str, Any] = call(
        f"get NodeClaim {name}", lambda: apis.custom.get_cluster_custom_object(group, version, plural, name)
    )
    log.info("reusing this workspace's NodeClaim %s", name)
    return existing


@dataclass(frozen=True)
class Wait:
    timeout_s: float = 1800.0
    poll_s: float = 10.0


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in (obj.get("status") or {}).get("conditions") or []}


def gpu_count(node: dict[str, Any]) -> int:
    value = str(((node.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE, "0"))
    return int(value) if value.isdigit() else 0


def node_ready(node: dict[str, Any]) -> bool:
    return _conditions(node).get("Ready", {}).get("status") == "True"


def wait_for_claim(apis: Apis, name: str, wait: Wait) -> str:
    """Block until the claim's Node is Ready with GPUs; return the node name."""
    group, version, plural = NODECLAIM
    deadline = time.monotonic() + wait.timeout_s
    last = "no status yet"
    while True:
        claim = call(
            f"get NodeClaim {name}", lambda: apis.custom.get_cluster_custom_object(group, version, plural, name)
        )
        for condition in _conditions(claim).values():
            if condition.get("status") == "False" and condition.get("reason") in TERMINAL_REASONS:
                raise BadInput(
                    Problem(f"NodeClaim {name}", f"{condition['reason']}: {condition.get('message', '')}".strip(),
                            "pick another resource.instanceType, another region, or ask for GPU quota")
                )  # fmt: skip
        ready = _conditions(claim).get("Ready", {})
        node_name = (claim.get("status") or {}).get("nodeName")
        if ready.get("status") == "True" and node_name:
            node = _camel_node(call(f"get Node {node_name}", partial(apis.core.read_node, node_name)).to_dict())
            if node_ready(node) and gpu_count(node) > 0:
                log.info("node %s is Ready with %d GPU(s)", node_name, gpu_count(node))
                return str(node_name)
            last = f"node {node_name} is {'Ready' if node_ready(node) else 'not Ready'} with no allocatable GPU yet"
            if time.monotonic() > deadline and node_ready(node):
                raise BadInput(
                    Problem(f"node {node_name}", f"is Ready but reports no {GPU_RESOURCE} after {wait.timeout_s:.0f}s",
                            "install the NVIDIA device plugin (the GPU operator) on the cluster")
                )  # fmt: skip
        else:
            last = f"Ready={ready.get('status', 'Unknown')} {ready.get('reason', '')}".strip()
        if time.monotonic() > deadline:
            raise Transient(f"NodeClaim {name} was not ready within {wait.timeout_s:.0f}s ({last})")
        log.info("waiting for NodeClaim %s: %s", name, last)
        time.sleep(wait.poll_s)


def _camel_node(node: dict[str, Any]) -> dict[str, Any]:
    """The typed client's snake_case Node as the API's shape, for the few fields read here."""
    status = node.get("status") or {}
    return {
        "metadata": node.get("metadata") or {},
        "status": {"conditions": status.get("conditions") or [], "allocatable": status.get("allocatable") or {}},
    }


@dataclass(frozen=True)
class NodeChoice:
    name: str
    gpus: int
    gpu_memory_gib: float | None
    product: str


def release_claims(apis: Apis, workspace: str, namespace: str) -> list[str]:
    """Delete the NodeClaims kaitune created for this workspace; claims already gone are fine."""
    from kubernetes.client.exceptions import ApiException

    group, version, plural = NODECLAIM
    selector = f"{CREATED_BY_LABEL}=kaitune,{NAMESPACE_LABEL}={namespace},{WORKSPACE_LABEL}={workspace}"
    listed = call(
        "list NodeClaims",
        partial(apis.custom.list_cluster_custom_object, group, version, plural, label_selector=selector),
    )
    deleted = []
    for item in listed.get("items") or []:
        name = item["metadata"]["name"]
        try:
            call(
                f"delete NodeClaim {name}",
                partial(apis.custom.delete_cluster_custom_object, group, version, plural, name),
            )
            deleted.append(name)
        except ApiException as exc:
            if status_of(exc) != 404:
                raise
    return deleted


def byo_nodes(apis: Apis, match_labels: dict[str, str], preferred: list[str], need_gib: float, gpus: int) -> NodeChoice:
    """The best ready GPU node among the labelled ones: preferred first; the memory fit checked from GFD labels."""
    selector = ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))
    listed = call("list Nodes", lambda: apis.core.list_node(label_selector=selector).to_dict())
    seen: list[str] = []
    choices: list[NodeChoice] = []
    for raw in listed.get("items") or []:
        node = _camel_node(raw)
        name = node["metadata"].get("name", "")
        labels = node["metadata"].get("labels") or {}
        count = gpu_count(node)
        memory_mib = labels.get("nvidia.com/gpu.memory", "")
        memory = int(memory_mib) / 1024 if memory_mib.isdigit() else None
        product = labels.get("nvidia.com/gpu.product", "unknown GPU")
        if not node_ready(node) or count == 0:
            seen.append(f"{name} ({'not Ready' if not node_ready(node) else 'no allocatable GPU'})")
            continue
        per_gpu = need_gib / max(gpus, 1)
        if memory is not None and (memory < per_gpu or count < gpus):
            seen.append(f"{name} ({count} x {product} {memory:.0f} GiB < {gpus} x {per_gpu:.1f} GiB needed)")
            continue
        choices.append(NodeChoice(name, count, memory, product))
    if not choices:
        found = "; ".join(seen) if seen else f"no node has the labels {selector or '(none)'}"
        raise BadInput(
            Problem("resource.labelSelector", f"no ready GPU node fits: {found}",
                    "label a ready GPU node with resource.labelSelector.matchLabels, or set resource.instanceType")
        )  # fmt: skip
    rank = {name: i for i, name in enumerate(preferred)}
    choices.sort(key=lambda c: (rank.get(c.name, len(rank)), c.name))
    return choices[0]
