"""The inference Deployment and Service on Kubernetes: manifests, server-side apply, and a rollout wait that explains.

The pod pulls the adapter image by digest in an init container (``kaitune pull``,
digests verified) into an emptyDir, then runs the serve image with the adapter.
It asks for the node's GPUs, tolerates the GPU taint, lands on the nodes the
provision step chose, and is probed on ``/health``. The adapter digest is a pod
template annotation, so a new adapter rolls out a new ReplicaSet; ``maxUnavailable: 0``
keeps the old pod serving until the new one is ready (given room for one more pod).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from pipelines.errors import BadInput, Problem, Transient
from steps.gpu_nodes import WORKSPACE_LABEL
from steps.kube import FIELD_MANAGER, Apis, call

log = logging.getLogger("kaitune")
SERVE_PORT = 5000
ADAPTERS = "/kaitune/adapters"
PUSH_SECRET_MOUNT = "/kaitune/secrets/push"
# Pod states that waiting will not fix; each is reported with the pod, container and message.
FATAL_WAITING = {"ImagePullBackOff", "ErrImagePull", "CrashLoopBackOff", "CreateContainerConfigError",
                 "InvalidImageName", "CreateContainerError"}  # fmt: skip


@dataclass(frozen=True)
class Serving:
    workspace: str
    namespace: str
    base_model: str
    image_ref: str  # digest-pinned adapter image
    serve_image: str
    step_image: str
    gpus: int
    node_selector: dict[str, str]
    push_secret: str = ""
    model_token_secret: str = ""
    model_token_key: str = "token"
    runtime: str = "vllm"

    @property
    def labels(self) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": "kaitune-inference",
            "app.kubernetes.io/instance": self.workspace,
            "app.kubernetes.io/managed-by": "kaitune",
            WORKSPACE_LABEL: self.workspace,
        }

    @property
    def selector(self) -> dict[str, str]:
        return {"app.kubernetes.io/instance": self.workspace, WORKSPACE_LABEL: self.workspace}


def deployment(s: Serving) -> dict[str, Any]:
    adapter_dir = f"{ADAPTERS}/{s.workspace}"
    mounts: list[dict[str, Any]] = [{"name": "adapters", "mountPath": ADAPTERS}]
    volumes: list[dict[str, Any]] = [
        {"name": "adapters", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    pull_env: list[dict[str, Any]] = []
    pull_mounts = list(mounts)
    if s.push_secret:
        volumes.append({"name": "push-secret", "secret": {"secretName": s.push_secret,
                        "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}})  # fmt: skip
        pull_mounts.append({"name": "push-secret", "mountPath": PUSH_SECRET_MOUNT, "readOnly": True})
        pull_env.append({"name": "DOCKER_CONFIG", "value": PUSH_SECRET_MOUNT})
    serve_env: list[dict[str, Any]] = []
    if s.model_token_secret:
        ref = {"secretKeyRef": {"name": s.model_token_secret, "key": s.model_token_key}}
        serve_env.append({"name": "HF_TOKEN", "valueFrom": ref})
    gpu = {"nvidia.com/gpu": str(max(s.gpus, 1))}
    probe = {"httpGet": {"path": "/health", "port": SERVE_PORT}, "periodSeconds": 10, "timeoutSeconds": 5}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": s.workspace,
            "namespace": s.namespace,
            "labels": s.labels,
            "annotations": {"kaitune.io/adapter-image": s.image_ref},
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": s.selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "progressDeadlineSeconds": 1800,
            "template": {
                "metadata": {"labels": s.labels, "annotations": {"kaitune.io/adapter-image": s.image_ref}},
                "spec": {
                    "nodeSelector": s.node_selector,
                    "tolerations": [
                        {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                    ],
                    "initContainers": [
                        {
                            "name": "pull-adapter",
                            "image": s.step_image,
                            "command": ["python", "-m", "pipelines.cli", "pull", s.image_ref, adapter_dir],
                            "env": pull_env,
                            "volumeMounts": pull_mounts,
                        }
                    ],
                    "containers": [
                        {
                            "name": "inference",
                            "image": s.serve_image,
                            "command": [
                                "python3",  # the vLLM base image has no plain `python`
                                "-m",
                                "steps.serve",
                                "--runtime",
                                s.runtime,
                                "--base-model",
                                s.base_model,
                                "--adapter-dir",
                                adapter_dir,
                                "--adapter-name",
                                s.workspace,
                                "--host",
                                "0.0.0.0",
                                "--port",
                                str(SERVE_PORT),
                            ],
                            "ports": [{"name": "http", "containerPort": SERVE_PORT}],
                            "env": serve_env,
                            "resources": {"requests": gpu, "limits": gpu},
                            "volumeMounts": [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}],
                            # Loading weights takes minutes: the startup probe allows 30 of them, then
                            # readiness gates traffic and liveness restarts a wedged server.
                            "startupProbe": {**probe, "failureThreshold": 180},
                            "readinessProbe": {**probe, "failureThreshold": 3},
                            "livenessProbe": {**probe, "failureThreshold": 6},
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


def service(s: Serving) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": s.workspace, "namespace": s.namespace, "labels": s.labels},
        "spec": {
            "type": "ClusterIP",
            "selector": s.selector,
            "ports": [{"name": "http", "port": 80, "targetPort": SERVE_PORT, "protocol": "TCP"}],
        },
    }


def apply(apis: Apis, s: Serving) -> None:
    """Server-side apply both objects: re-running converges, and fields others own are left alone."""
    ssa = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": "application/apply-patch+yaml"}
    call(f"apply Deployment {s.workspace}",
         partial(apis.apps.patch_namespaced_deployment, s.workspace, s.namespace, deployment(s), **ssa))  # fmt: skip
    call(f"apply Service {s.workspace}",
         partial(apis.core.patch_namespaced_service, s.workspace, s.namespace, service(s), **ssa))  # fmt: skip


def _pod_problem(pod: dict[str, Any]) -> str | None:
    status = pod.get("status") or {}
    name = (pod.get("metadata") or {}).get("name", "?")
    for cs in (status.get("init_container_statuses") or []) + (status.get("container_statuses") or []):
        state = cs.get("state") or {}
        # The root cause first: a CrashLoopBackOff after an OOM kill is an OOM.
        terminated = (cs.get("last_state") or {}).get("terminated") or state.get("terminated") or {}
        if terminated.get("reason") == "OOMKilled":
            return f"pod {name}, container {cs.get('name')}: OOMKilled (exit {terminated.get('exit_code')})"
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING:
            return f"pod {name}, container {cs.get('name')}: {waiting['reason']}: {waiting.get('message') or ''}"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"pod {name} cannot be scheduled: {condition.get('message') or condition.get('reason')}"
    return None


FIXES = {
    "ImagePullBackOff": "check the serve/step image names and the registry login (tuning.output.imagePushSecret)",
    "ErrImagePull": "check the serve/step image names and the registry login (tuning.output.imagePushSecret)",
    "OOMKilled": "serve on a larger instanceType, or lower the server's max model length",
    "CrashLoopBackOff": "read the pod's log: kubectl logs -n NAMESPACE POD -c inference --previous",
    "cannot be scheduled": "the GPU node is full or gone: check kubectl describe pod and the NodeClaim",
}


def wait_rollout(apis: Apis, s: Serving, timeout_s: float, poll_s: float) -> None:
    """Until the new ReplicaSet is fully available; a pod that cannot start ends the wait with its reason."""
    deadline = time.monotonic() + timeout_s
    selector = ",".join(f"{k}={v}" for k, v in sorted(s.selector.items()))
    last = "no status yet"
    while True:
        dep = call(f"get Deployment {s.workspace}",
                   partial(apis.apps.read_namespaced_deployment, s.workspace, s.namespace)).to_dict()  # fmt: skip
        meta, status = dep.get("metadata") or {}, dep.get("status") or {}
        want = (dep.get("spec") or {}).get("replicas", 1)
        if (
            (status.get("observed_generation") or 0) >= (meta.get("generation") or 0)
            and (status.get("updated_replicas") or 0) >= want
            and (status.get("available_replicas") or 0) >= want
            and not status.get("unavailable_replicas")
        ):
            log.info("Deployment %s rolled out (%d/%d available)", s.workspace, want, want)
            return
        for condition in status.get("conditions") or []:
            if condition.get("reason") == "ProgressDeadlineExceeded":
                raise BadInput(Problem(f"Deployment {s.workspace}", condition.get("message") or "no progress",
                                       "kubectl describe deployment for the cause"))  # fmt: skip
        pods = call("list Pods", partial(apis.core.list_namespaced_pod, s.namespace, label_selector=selector)).to_dict()
        for pod in pods.get("items") or []:
            problem = _pod_problem(pod)
            if problem:
                fix = next((v for k, v in FIXES.items() if k in problem), "kubectl describe pod for the cause")
                raise BadInput(Problem(f"Deployment {s.workspace}", problem, fix))
        last = f"{status.get('updated_replicas') or 0} updated, {status.get('available_replicas') or 0} available"
        if time.monotonic() > deadline:
            raise Transient(f"Deployment {s.workspace} did not roll out within {timeout_s:.0f}s ({last})")
        log.info("waiting for Deployment %s: %s", s.workspace, last)
        time.sleep(poll_s)
