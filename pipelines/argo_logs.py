"""``kaitune logs``: a workflow's step logs from the Argo Server's log stream (newline-delimited JSON)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pipelines.argo_server import ArgoSettings
from pipelines.errors import BadInput, Problem, Transient
from pipelines.workflow_status import STEPS, steps


def pod_for(wf: dict[str, Any], step: str) -> str:
    if step not in STEPS:
        raise BadInput(Problem("--step", f"{step!r} is not a step", f"use one of: {', '.join(STEPS)}"))
    state = steps(wf).get(step)
    if state is None or state.pod_name is None:
        raise BadInput(Problem(f"step {step}", "has not started a pod yet", "wait, or look at kaitune status -o wide"))
    return state.pod_name


def lines(s: ArgoSettings, name: str, pod: str | None = None, follow: bool = False) -> Iterator[tuple[str, str]]:
    """(pod name, log line) pairs, in the server's order; ``follow`` keeps the stream open."""
    import requests

    params = {"logOptions.container": "main", "logOptions.follow": "true" if follow else None, "podName": pod}
    headers = {"Authorization": s.token if s.token.split()[0] == "Bearer" else f"Bearer {s.token}"} if s.token else {}
    url = f"{s.server}/api/v1/workflows/{s.namespace}/{name}/log"
    verify: bool | str = str(s.ca_file) if s.ca_file else True
    try:
        response = requests.get(url, params=params, headers=headers, stream=True, verify=verify,
                                timeout=(10, None if follow else 120))  # fmt: skip
    except requests.exceptions.SSLError:
        raise BadInput(Problem(s.server, "TLS verification failed", "pass --ca-file with the server's CA")) from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise Transient(f"Argo Server {s.server} is unreachable ({type(exc).__name__})") from None
    with response:
        if response.status_code in (401, 403):
            raise BadInput(Problem(s.server, f"refused the logs (HTTP {response.status_code})",
                                   "check ARGO_TOKEN and its rights on workflows and pods/log"))  # fmt: skip
        if response.status_code == 404:
            raise BadInput(Problem(f"workflow {name}", f"is not in namespace {s.namespace}", "check the name"))
        if response.status_code != 200:
            raise Transient(f"Argo Server {s.server} answered HTTP {response.status_code} for the logs")
        for raw in response.iter_lines():
            if not raw:
                continue
            result = json.loads(raw).get("result", {})
            yield str(result.get("podName", "")), str(result.get("content", ""))
