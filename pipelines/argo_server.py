"""Talking to the Argo Server: settings from flags, environment or a config file, and errors the user can act on.

Settings, first found wins: command-line flags; ``ARGO_SERVER``, ``ARGO_TOKEN``,
``ARGO_NAMESPACE``, ``ARGO_SECURE``, ``ARGO_CA_FILE``; then ``~/.config/kaitune/argo.yaml``
(``server``, ``namespace``, ``token_file``, ``ca_file``). The token never comes from a
flag (flags show in ``ps``) and is never printed: errors name the server, not the token.
TLS is verified, with ``--ca-file`` for a private CA.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict

from pipelines.errors import BadInput, Problem, Transient

T = TypeVar("T")
CONFIG_FILE = Path.home() / ".config" / "kaitune" / "argo.yaml"


class ArgoSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    server: str
    namespace: str = "argo"
    token: str | None = None
    ca_file: Path | None = None

    def __repr__(self) -> str:  # the token stays out of reprs and tracebacks
        return f"ArgoSettings(server={self.server!r}, namespace={self.namespace!r})"

    __str__ = __repr__


def _file_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BadInput(
            Problem(str(path), f"is not valid YAML ({exc.__class__.__name__})", "fix or remove it")
        ) from None
    if not isinstance(data, dict):
        raise BadInput(Problem(str(path), "must be a mapping", "write server:, namespace:, token_file:, ca_file:"))
    return data


def settings(
    server: str | None = None,
    namespace: str | None = None,
    token_file: Path | None = None,
    ca_file: Path | None = None,
    config_file: Path = CONFIG_FILE,
) -> ArgoSettings:
    file = _file_config(config_file)
    host = server or os.environ.get("ARGO_SERVER") or file.get("server")
    if not host:
        raise BadInput(
            Problem("argo server", "is not set",
                    "pass --argo-server, set ARGO_SERVER (e.g. https://argo.example.com:2746), "
                    f"or write server: in {config_file}")
        )  # fmt: skip
    if "://" not in host:
        secure = os.environ.get("ARGO_SECURE", "true").lower() != "false"
        host = f"{'https' if secure else 'http'}://{host}"
    token_path = token_file or (Path(file["token_file"]).expanduser() if file.get("token_file") else None)
    token = os.environ.get("ARGO_TOKEN")
    if token_path is not None:
        try:
            token = token_path.read_text().strip()
        except OSError as exc:
            raise BadInput(Problem(str(token_path), f"cannot be read ({exc.strerror})", "check the path")) from None
    ca = ca_file or (Path(os.environ["ARGO_CA_FILE"]) if os.environ.get("ARGO_CA_FILE") else None)
    ca = ca or (Path(file["ca_file"]).expanduser() if file.get("ca_file") else None)
    if ca is not None and not ca.is_file():
        raise BadInput(Problem(str(ca), "CA file does not exist", "pass the PEM bundle that signs the Argo Server"))
    ns = namespace or os.environ.get("ARGO_NAMESPACE") or file.get("namespace") or "argo"
    return ArgoSettings(server=host.rstrip("/"), namespace=ns, token=token or None, ca_file=ca)


def service(s: ArgoSettings) -> Any:
    from hera.workflows.service import WorkflowsService

    verify: bool | str = str(s.ca_file) if s.ca_file else True
    return WorkflowsService(host=s.server, token=s.token, namespace=s.namespace, verify_ssl=verify)  # type: ignore[arg-type]


def call(s: ArgoSettings, what: str, fn: Callable[[], T]) -> T:
    """One Argo Server call, its failures as bad input (exit 2) or transient (exit 75) with the fix."""
    import requests
    from hera.exceptions import HeraException

    try:
        return fn()
    except requests.exceptions.SSLError:
        raise BadInput(
            Problem(s.server, "TLS verification failed", "pass --ca-file with the CA that signs the Argo Server")
        ) from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise Transient(
            f"Argo Server {s.server} is unreachable ({type(exc).__name__}) while trying to {what}"
        ) from None
    except HeraException as exc:
        code = getattr(exc, "status_code", None)
        if code == 401:
            fix = "set ARGO_TOKEN to a valid token (argo auth token), or --token-file"
            raise BadInput(Problem(s.server, f"rejected the token (HTTP 401) while trying to {what}", fix)) from None
        if code == 403:
            fix = "grant the token's service account rights on workflows there"
            problem = Problem(s.server, f"forbids this (HTTP 403): {what} in namespace {s.namespace}", fix)
            raise BadInput(problem) from None
        if code == 404:
            raise  # the caller knows what was missing
        if code is not None and code >= 500:
            raise Transient(f"Argo Server {s.server} answered HTTP {code} while trying to {what}") from None
        raise BadInput(Problem(s.server, f"refused to {what} (HTTP {code}): {_server_message(exc)}",
                               "check the workflow against the Argo schema")) from None  # fmt: skip


def _server_message(exc: Exception) -> str:
    text = str(exc)
    return text[:300]
