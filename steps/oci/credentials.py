"""Registry credentials from Docker's config: the mounted ``kubernetes.io/dockerconfigjson`` secret locally or on Argo.

Lookup order: ``KAITUNE_REGISTRY_USERNAME``/``KAITUNE_REGISTRY_PASSWORD``, then the
config file (``--docker-config``, else ``$DOCKER_CONFIG/config.json``, else
``~/.docker/config.json``): its ``auths`` entry, then ``credHelpers``/``credsStore``.
Secrets are never printed: ``Credentials`` hides them from ``repr`` and errors name
only the file they came from.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import BadInput, Problem

DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/")


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = field(default="", repr=False)
    # An OAuth2 refresh token, as `az acr login --expose-token` or `docker login` to ACR with a token store.
    identity_token: str = field(default="", repr=False)
    source: str = ""

    @property
    def basic(self) -> str:
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.password, self.identity_token, self.basic if self.password else "") if s)


def config_file(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return explicit / "config.json" if explicit.is_dir() else explicit
    if os.environ.get("DOCKER_CONFIG"):
        return Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    return Path.home() / ".docker" / "config.json"


def _host_of(key: str) -> str:
    host = key.removeprefix("https://").removeprefix("http://")
    return host.split("/", 1)[0]


def _aliases(registry: str) -> set[str]:
    if registry in DOCKER_HUB_KEYS:
        return {"docker.io", "index.docker.io", "registry-1.docker.io"}
    return {registry}


def _from_entry(entry: dict[str, Any], source: str) -> Credentials | None:
    if entry.get("identitytoken"):
        return Credentials(entry.get("username", ""), identity_token=entry["identitytoken"], source=source)
    if entry.get("auth"):
        try:
            username, _, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise BadInput(
                Problem(source, "its 'auth' value is not base64 of 'user:password'",
                        "recreate the secret with 'kubectl create secret docker-registry'")
            ) from None  # fmt: skip
        return Credentials(username, password, source=source)
    if entry.get("username") and entry.get("password"):
        return Credentials(entry["username"], entry["password"], source=source)
    return None


def _from_helper(helper: str, registry: str, source: str) -> Credentials | None:
    binary = f"docker-credential-{helper}"
    try:
        # The registry goes in on stdin and the secret comes back on stdout: never argv.
        proc = subprocess.run([binary, "get"], input=registry, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise BadInput(
            Problem(source, f"names the credential helper {binary!r}, which is not on PATH",
                    f"install {binary} or put the credentials in the config's 'auths'")
        ) from None  # fmt: skip
    if proc.returncode != 0:
        return None  # the helper has nothing for this registry
    payload = json.loads(proc.stdout)
    if payload.get("Username") == "<token>":
        return Credentials(identity_token=payload["Secret"], source=f"{source} ({binary})")
    return Credentials(payload.get("Username", ""), payload.get("Secret", ""), source=f"{source} ({binary})")


def lookup(registry: str, docker_config: Path | None = None) -> Credentials | None:
    """The credentials for ``registry`` (host[:port]), or None for anonymous access."""
    if os.environ.get("KAITUNE_REGISTRY_USERNAME") and os.environ.get("KAITUNE_REGISTRY_PASSWORD"):
        return Credentials(
            os.environ["KAITUNE_REGISTRY_USERNAME"], os.environ["KAITUNE_REGISTRY_PASSWORD"], source="environment"
        )
    path = config_file(docker_config)
    if not path.exists():
        if docker_config is not None:
            raise BadInput(Problem(str(path), "does not exist", "pass the Docker config.json that holds the login"))
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise BadInput(
            Problem(str(path), f"is not a readable Docker config ({reason})",
                    "it must be the JSON of a kubernetes.io/dockerconfigjson secret: {\"auths\": {...}}")
        ) from None  # fmt: skip
    if not isinstance(config, dict):
        raise BadInput(Problem(str(path), "is not a JSON object", 'write {"auths": {"REGISTRY": {"auth": "..."}}}'))
    names = _aliases(registry)
    for key, entry in (config.get("auths") or {}).items():
        if _host_of(key) in names and isinstance(entry, dict):
            found = _from_entry(entry, str(path))
            if found:
                return found
    helper = next((h for k, h in (config.get("credHelpers") or {}).items() if _host_of(k) in names), None)
    helper = helper or config.get("credsStore")
    return _from_helper(helper, registry, str(path)) if helper else None
