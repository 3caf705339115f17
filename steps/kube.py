"""The Kubernetes API for the steps: one client, and API errors turned into the step contract's exit codes.

In a pod the service account is used; elsewhere ``$KUBECONFIG`` (or ``~/.kube/config``).
A 401/403 or a missing CRD is bad input (exit 2) with the permission or install to
fix; a 409 is handled by callers; 429, 5xx and connection errors are transient
(exit 75) after a few quick retries, so an API server hiccup does not fail a step.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pipelines.errors import BadInput, Problem, Transient

log = logging.getLogger("kaitune")
T = TypeVar("T")
FIELD_MANAGER = "kaitune"
NODECLAIM = ("karpenter.sh", "v1", "nodeclaims")


@dataclass
class Apis:
    core: Any
    apps: Any
    custom: Any


def connect() -> Apis:
    from kubernetes import client, config

    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    except (config.ConfigException, OSError) as exc:
        raise BadInput(
            Problem("kubernetes", f"no cluster credentials ({exc})",
                    "run in a pod with a service account, or set KUBECONFIG")
        ) from None  # fmt: skip
    api = client.ApiClient()
    return Apis(client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api))


def call(what: str, fn: Callable[[], T], attempts: int = 4, backoff_s: float = 0.5) -> T:
    """Run one API call; retry transient failures briefly; raise BadInput/Transient with ``what`` in the message."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except ApiException as exc:
            if exc.status in (401, 403):
                raise BadInput(
                    Problem("kubernetes", f"{what}: forbidden (HTTP {exc.status}): {_message(exc)}",
                            "grant the workflow's service account the kaitune Role/ClusterRole (examples/gitops)")
                ) from None  # fmt: skip
            if exc.status == 404 and "nodeclaims" in what.lower():
                raise BadInput(
                    Problem("kubernetes", f"{what}: the NodeClaim API is missing ({_message(exc)})",
                            "install Kaito's gpu-provisioner (Karpenter) or use BYO nodes without instanceType")
                ) from None  # fmt: skip
            if exc.status not in (429, 500, 502, 503, 504) or attempt == attempts:
                if exc.status in (429, 500, 502, 503, 504):
                    raise Transient(f"{what}: the API server answered HTTP {exc.status}") from None
                raise
            reason = f"HTTP {exc.status}"
        except HTTPError as exc:
            if attempt == attempts:
                raise Transient(f"{what}: the API server is unreachable ({type(exc).__name__})") from None
            reason = type(exc).__name__
        log.warning("%s: %s; retrying", what, reason)
        time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def status_of(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


def _message(exc: Any) -> str:
    import json

    try:
        return str(json.loads(exc.body).get("message", exc.reason))
    except (TypeError, ValueError):
        return str(exc.reason)


def apply_config_map(apis: Apis, config_map: dict[str, Any], namespace: str) -> None:
    """Server-side apply the user's training ConfigMap, as Kaito users keep it beside the Workspace."""
    from functools import partial

    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": config_map["metadata"]["name"],
            "namespace": namespace}, "data": config_map.get("data", {})}  # fmt: skip
    name = body["metadata"]["name"]
    call(f"apply ConfigMap {name}", partial(apis.core.patch_namespaced_config_map, name, namespace, body,
         field_manager=FIELD_MANAGER, force=True, _content_type="application/apply-patch+yaml"))  # fmt: skip
    log.info("applied ConfigMap %s/%s", namespace, name)
