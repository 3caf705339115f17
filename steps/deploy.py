"""deploy: serve the base model with the pushed adapter and prove ``/chat`` answers.

Local target: pull the adapter from the image (digests verified), start the
server as a background process on 127.0.0.1, wait for /health, smoke-test
/v1/models and /chat. Kubernetes target: not in this version yet (refused).

Outputs: endpoint, server-pid, chat-reply, curl.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipelines.errors import BadInput, Problem, Transient
from steps.contract import run_step, write_outputs
from steps.oci import options, transfer

log = logging.getLogger("kaitune")
SMOKE_PROMPT = "What is the capital of France?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m steps.deploy", description=__doc__)
    p.add_argument("--target", choices=["local", "kubernetes"], required=True)
    p.add_argument("--workspace", required=True)
    p.add_argument("--base-model", required=True)
    p.add_argument(
        "--image-ref", required=True, help="the push step's image-ref: registry/repo@sha256:... or oci-layout://"
    )
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--health-timeout", type=float, default=180.0)
    p.add_argument("--outputs", type=Path, required=True)
    options.add_arguments(p)
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text()[-2000:] if log_path.exists() else ""
            raise BadInput(
                Problem(
                    "deploy", f"the server exited with code {proc.returncode}:\n{tail}", "read the server log above"
                )
            )
        try:
            if http_json("GET", f"{url}/health", timeout=2).get("status") == "ok":
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    proc.terminate()
    raise Transient(f"the server at {url} was not healthy within {timeout:.0f}s (log: {log_path})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.target != "local":
        raise BadInput(
            Problem(
                "deploy",
                "deploying to Kubernetes is not available in this kaitune version yet",
                "run locally with 'kaitune run', or serve the adapter image with a Kaito inference Workspace",
            )
        )
    adapter_dir = args.work / "serving" / "adapter"
    pulled = transfer.pull(args.image_ref, adapter_dir, options.from_args(args))
    name = pulled.annotations.get("sh.kaito.model.name", args.workspace)
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = args.work / "serving" / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "steps.serve",
        "--base-model",
        args.base_model,
        "--adapter-dir",
        str(adapter_dir),
        "--adapter-name",
        args.workspace,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(log_path, "ab") as log_file:
        # Its own session: the server outlives this step, and the runner stops it by pid.
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    log.info("started the %s server (pid %d) at %s", name, proc.pid, url)
    wait_healthy(url, proc, args.health_timeout, log_path)
    models = [m["id"] for m in http_json("GET", f"{url}/v1/models")["data"]]
    if args.workspace not in models:
        raise BadInput(
            Problem(
                "deploy", f"/v1/models lists {models}, not the adapter {args.workspace!r}", "check the adapter image"
            )
        )
    reply = http_json("POST", f"{url}/chat", {"prompt": SMOKE_PROMPT, "generate_kwargs": {"max_new_tokens": 24}})
    answer = reply["Result"]
    log.info("smoke test: /chat %r -> %r", SMOKE_PROMPT, answer)
    curl = f"curl -s -X POST {url}/chat -H 'Content-Type: application/json' -d " + shlex.quote(
        json.dumps({"prompt": SMOKE_PROMPT})
    )
    write_outputs(args.outputs, {"endpoint": url, "server-pid": str(proc.pid), "chat-reply": answer, "curl": curl})


if __name__ == "__main__":
    run_step("deploy", main)
