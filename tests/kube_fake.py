"""A fake Kubernetes API server on loopback, for driving the real ``kubernetes`` client without a cluster.

It keeps objects in memory by collection path and answers what the steps use:
get, list (with ``labelSelector``), create (201, 409 on a duplicate), patch
(server-side apply creates or merges; merge patches merge), delete (404 when
gone), with resourceVersions, uids, generations and timestamps. Tests play the
controllers (Karpenter, the Deployment controller) through ``on_request`` hooks,
which run after each request with the store locked. Every request is recorded.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import yaml
from loopback import http_server, json_handler

KINDS = {
    "nodeclaims": ("NodeClaim", "karpenter.sh/v1"),
    "nodes": ("Node", "v1"),
    "pods": ("Pod", "v1"),
    "services": ("Service", "v1"),
    "deployments": ("Deployment", "apps/v1"),
    "configmaps": ("ConfigMap", "v1"),
}
NAMED = (
    "/apis/karpenter.sh/v1/nodeclaims",
    "/api/v1/nodes",
    "/api/v1/namespaces/{ns}/pods",
    "/api/v1/namespaces/{ns}/services",
    "/api/v1/namespaces/{ns}/configmaps",
    "/apis/apps/v1/namespaces/{ns}/deployments",
)


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _merge(base.get(key), value)
        return out
    return copy.deepcopy(patch)


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


@dataclass
class FakeKube:
    objects: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    hooks: list[Callable[[FakeKube, str, str], None]] = field(default_factory=list)
    deny: set[str] = field(default_factory=set)  # path prefixes answered 403, as RBAC would
    url: str = ""
    lock: threading.RLock = field(default_factory=threading.RLock)
    _rv: int = 100

    def collection(self, path: str) -> dict[str, dict[str, Any]]:
        return self.objects.setdefault(path, {})

    def put(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store ``obj`` in collection ``path`` as the API server would (tests seed Nodes with it)."""
        with self.lock:
            self._rv += 1
            plural = path.rsplit("/", 1)[-1]
            kind, api_version = KINDS[plural]
            obj = {"apiVersion": api_version, "kind": kind, **copy.deepcopy(obj)}
            meta = obj.setdefault("metadata", {})
            existing = self.collection(path).get(meta["name"])
            meta.setdefault("uid", existing["metadata"]["uid"] if existing else str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", "2026-11-28T12:00:00Z")
            meta["resourceVersion"] = str(self._rv)
            old_spec = existing.get("spec") if existing else None
            generation = existing["metadata"].get("generation", 1) if existing else 1
            meta["generation"] = generation + (1 if existing and old_spec != obj.get("spec") else 0)
            if "/namespaces/" in path:
                meta["namespace"] = path.split("/namespaces/")[1].split("/")[0]
            self.collection(path)[meta["name"]] = obj
            return obj

    def get(self, path: str, name: str) -> dict[str, Any] | None:
        return self.collection(path).get(name)

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-sa-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # -- HTTP ------------------------------------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
        parts = urllib.parse.urlsplit(raw_path)
        query = urllib.parse.parse_qs(parts.query)
        path = parts.path.rstrip("/")
        with self.lock:
            self.requests.append((method, path))
            if any(path.startswith(prefix) for prefix in self.deny):
                message = f'{path} is forbidden: User "system:serviceaccount:team-a:kaitune" cannot {method.lower()}'
                return 403, _status(403, "Forbidden", message)
            status, answer = self._route(method, path, query, body, content_type)
            for hook in list(self.hooks):
                hook(self, method, path)
            return status, answer

    def _split(self, path: str) -> tuple[str, str | None]:
        for pattern in NAMED:
            prefix, _, suffix = pattern.partition("{ns}")
            if "{ns}" in pattern and path.startswith(prefix):
                rest = path[len(prefix) :]
                ns, _, tail = rest.partition("/")
                collection = f"{prefix}{ns}{suffix}"
                if tail == suffix.lstrip("/"):
                    return collection, None
                if tail.startswith(suffix.lstrip("/") + "/"):
                    return collection, tail[len(suffix.lstrip("/")) + 1 :].split("/")[0]
            elif path == pattern:
                return pattern, None
            elif path.startswith(pattern + "/"):
                return pattern, path[len(pattern) + 1 :].split("/")[0]
        return "", None

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, content_type: str
    ) -> tuple[int, dict[str, Any]]:
        collection, name = self._split(path)
        if not collection:
            return 404, _status(404, "NotFound", f"the server could not find the requested resource {path}")
        kind, api_version = KINDS[collection.rsplit("/", 1)[-1]]
        items = self.collection(collection)
        if method == "GET" and name is None:
            selector = query.get("labelSelector", [""])[0]
            chosen = [o for o in items.values() if _matches(o["metadata"].get("labels", {}), selector)]
            meta = {"resourceVersion": str(self._rv)}
            return 200, {"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta, "items": chosen}
        if method == "GET":
            return (200, items[name]) if name in items else (404, _status(404, "NotFound", f'"{name}" not found'))
        if method == "POST":
            obj = json.loads(body)
            if obj["metadata"]["name"] in items:
                return 409, _status(409, "AlreadyExists", f'{kind} "{obj["metadata"]["name"]}" already exists')
            return 201, self.put(collection, obj)
        if method == "PATCH" and name is not None:
            patch = yaml.safe_load(body) if "yaml" in content_type else json.loads(body)
            existing = items.get(name)
            if existing is None and "apply-patch" not in content_type:
                return 404, _status(404, "NotFound", f'"{name}" not found')
            merged = _merge(existing or {}, patch)
            merged.setdefault("metadata", {})["name"] = name
            return (200 if existing else 201), self.put(collection, merged)
        if method == "DELETE" and name is not None:
            if name not in items:
                return 404, _status(404, "NotFound", f'{kind} "{name}" not found')
            return 200, items.pop(name)
        return 405, _status(405, "MethodNotAllowed", f"{method} {path}")

    @contextlib.contextmanager
    def serve(self) -> Iterator[FakeKube]:
        def answer(request: BaseHTTPRequestHandler, body: bytes) -> tuple[int, Any]:
            return self.handle(request.command, request.path, body, request.headers.get("Content-Type", ""))

        with http_server(json_handler(answer)) as url:
            self.url = url
            yield self


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}  # fmt: skip


def gpu_node(name: str, labels: dict[str, str] | None = None, gpus: int = 1, ready: bool = True) -> dict[str, Any]:
    """A Node as the kubelet and NVIDIA's device plugin and GPU feature discovery report it."""
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "KubeletReady"}],
            "allocatable": {"cpu": "6", "memory": "110Gi", **({"nvidia.com/gpu": str(gpus)} if gpus else {})},
            "capacity": {"cpu": "6", "memory": "112Gi", **({"nvidia.com/gpu": str(gpus)} if gpus else {})},
        },
    }
