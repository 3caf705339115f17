"""deploy: serve the base model with the pushed adapter and prove ``/chat`` answers.

Local target: pull the adapter from the image (digests verified), start the
server as a background process on 127.0.0.1, wait for /health, smoke-test
/v1/models and /chat. Kubernetes target: server-side apply a Deployment (vLLM
with the adapter, pulled by digest in an init container) and a Service, wait for
the rollout (a pod that cannot start is reported with its reason), then run the
same smoke test against the in-cluster endpoint.

Outputs: endpoint, server-pid (local), chat-reply, curl.
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
    k8s = p.add_argument_group("kubernetes target")
    k8s.add_argument("--namespace", default="default")
    k8s.add_argument("--node-selector", default="{}", help="the provision step's node-selector (JSON)")
    k8s.add_argument("--gpus", type=int, default=1)
    k8s.add_argument("--serve-image", default="")
    k8s.add_argument("--step-image", default="")
    k8s.add_argument("--runtime", choices=["vllm", "transformers"], default="vllm")
    k8s.add_argument("--push-secret", default="", help="Secret name: the login that pushed the adapter pulls it")
    k8s.add_argument("--model-token-secret", default="")
    k8s.add_argument("--model-token-key", default="token")
    k8s.add_argument("--rollout-timeout", type=float, default=1800.0)
    k8s.add_argument("--poll", type=float, default=5.0)
    k8s.add_argument("--endpoint", default="", help="default: the Service's in-cluster address")
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


def smoke_test(url: str, workspace: str) -> str:
    """/v1/models lists the adapter and /chat answers: the user's first curl, run for them."""
    models = [m["id"] for m in http_json("GET", f"{url}/v1/models")["data"]]
    if workspace not in models:
        raise BadInput(Problem("deploy", f"/v1/models lists {models}, not the adapter {workspace!r}",
                               "check the adapter image"))  # fmt: skip
    reply = http_json("POST", f"{url}/chat", {"prompt": SMOKE_PROMPT, "generate_kwargs": {"max_new_tokens": 24}})
    answer = str(reply["Result"])
    log.info("smoke test: /chat %r -> %r", SMOKE_PROMPT, answer)
    return answer


def curl_for(url: str) -> str:
    body = shlex.quote(json.dumps({"prompt": SMOKE_PROMPT}))
    return f"curl -s -X POST {url}/chat -H 'Content-Type: application/json' -d {body}"


def deploy_kubernetes(args: argparse.Namespace) -> None:
    from steps import inference_k8s, kube

    if args.image_ref.startswith("oci-layout://"):
        raise BadInput(
            Problem("tuning.output", "a pod cannot pull the adapter from an image layout on a volume",
                    "push to a registry for serving on Kubernetes: set tuning.output.image and imagePushSecret")
        )  # fmt: skip
    serving = inference_k8s.Serving(
        workspace=args.workspace,
        namespace=args.namespace,
        base_model=args.base_model,
        image_ref=args.image_ref,
        serve_image=args.serve_image,
        step_image=args.step_image,
        gpus=args.gpus,
        node_selector=json.loads(args.node_selector),
        push_secret=args.push_secret,
        model_token_secret=args.model_token_secret,
        model_token_key=args.model_token_key,
        runtime=args.runtime,
    )
    apis = kube.connect()
    inference_k8s.apply(apis, serving)
    inference_k8s.wait_rollout(apis, serving, args.rollout_timeout, args.poll)
    url = args.endpoint or f"http://{args.workspace}.{args.namespace}.svc.cluster.local"
    answer = smoke_test(url, args.workspace)
    write_outputs(args.outputs, {"endpoint": url, "server-pid": "", "chat-reply": answer, "curl": curl_for(url)})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.target == "kubernetes":
        deploy_kubernetes(args)
        return
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
    answer = smoke_test(url, args.workspace)
    write_outputs(
        args.outputs, {"endpoint": url, "server-pid": str(proc.pid), "chat-reply": answer, "curl": curl_for(url)}
    )


if __name__ == "__main__":
    run_step("deploy", main)
