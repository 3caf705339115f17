"""`kaitune run examples/quickstart.yaml` end to end: all five steps for real, /chat answers."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EXAMPLES
from registry_server import run_registry

from steps.oci import transfer
from steps.oci.options import RegistryOptions

pytestmark = pytest.mark.slow


def copy_example(tmp_path: Path) -> Path:
    """The shipped example, byte for byte, in a scratch tree so outputs land there."""
    shutil.copytree(EXAMPLES / "data", tmp_path / "examples" / "data")
    shutil.copy(EXAMPLES / "quickstart.yaml", tmp_path / "examples" / "quickstart.yaml")
    return tmp_path / "examples" / "quickstart.yaml"


def kaitune_run(
    spec: Path, run_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(spec), "--run-dir", str(run_dir), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_quickstart_runs_all_five_steps(tmp_path: Path, kaitune_cache: Path) -> None:
    spec = copy_example(tmp_path)
    result = kaitune_run(spec, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(t["name"], t["status"]) for t in summary["tasks"]] == [
        ("provision", "Succeeded"),
        ("fetch-data", "Succeeded"),
        ("train", "Succeeded"),
        ("push", "Succeeded"),
        ("deploy", "Succeeded"),
        ("cleanup", "Succeeded"),
    ]
    outputs = {t["name"]: t["outputs"] for t in summary["tasks"]}
    assert float(outputs["train"]["eval-loss"]) < float(outputs["train"]["eval-loss-before"])
    assert outputs["deploy"]["chat-reply"].strip()
    assert "curl -s -X POST http://127.0.0.1:" in result.stdout
    # The train step's UI artifacts, collected as Argo would: the metrics and the loss curve (a real PNG).
    train_artifacts = next(t for t in summary["tasks"] if t["name"] == "train")["artifacts"]
    metrics = json.loads(Path(train_artifacts["metrics"]).read_text())
    assert f"{metrics['eval_loss']:.6f}" == outputs["train"]["eval-loss"]
    assert Path(train_artifacts["loss-curve"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The adapter image landed in the volume the Workspace names, and the server was stopped.
    layout = tmp_path / "runs" / "quickstart" / "adapter-image"
    assert json.loads((layout / "index.json").read_text())["manifests"][0]["digest"] == outputs["push"]["digest"]
    assert not alive(int(outputs["deploy"]["server-pid"]))
    # Training is seeded and the image is reproducible: a second, independent run pushing to a registry
    # that needs a login (the user's Docker config, as `docker push` uses) gives the same layer, and
    # deploy pulls the adapter back from that registry.
    with run_registry(tmp_path / "registry", htpasswd={"dev": "local-pass"}) as registry:
        docker = tmp_path / "docker"
        docker.mkdir()
        auth = base64.b64encode(b"dev:local-pass").decode()
        (docker / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
        doc = list(yaml.safe_load_all(spec.read_text()))
        doc[0]["tuning"]["output"] = {"image": f"{registry.host}/adapters/quickstart:0.1", "imagePushSecret": "login"}
        to_registry = spec.with_name("to-registry.yaml")
        to_registry.write_text(yaml.safe_dump_all(doc))
        again = kaitune_run(to_registry, tmp_path / "run2", env={"DOCKER_CONFIG": str(docker)})
        assert again.returncode == 0, again.stderr[-3000:]
        second = {
            t["name"]: t["outputs"] for t in json.loads((tmp_path / "run2" / "summary.json").read_text())["tasks"]
        }
        assert second["push"]["image-ref"] == f"{registry.host}/adapters/quickstart@{second['push']['digest']}"
        assert second["deploy"]["chat-reply"].strip()
        pushed = transfer.pull(second["push"]["image-ref"], tmp_path / "pulled", RegistryOptions(docker_config=docker))
    assert pushed.annotations["sh.kaito.model.name"] == "tiny-phi3"
    transfer.pull(f"oci-layout://{layout}@{outputs['push']['digest']}", tmp_path / "local")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "pulled" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    # The workflow the runner executed is the one `kaitune render` writes.
    rendered = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "render", str(spec)], capture_output=True, text=True, timeout=120
    )
    assert (tmp_path / "run" / "workflow.yaml").read_text() == rendered.stdout


def test_keep_serving_exposes_kaito_and_openai_routes(tmp_path: Path, kaitune_cache: Path) -> None:
    spec = copy_example(tmp_path)
    result = kaitune_run(spec, tmp_path / "run", "--keep-serving")
    assert result.returncode == 0, result.stderr[-3000:]
    deploy = next(
        t for t in json.loads((tmp_path / "run" / "summary.json").read_text())["tasks"] if t["name"] == "deploy"
    )
    url, pid = deploy["outputs"]["endpoint"], int(deploy["outputs"]["server-pid"])
    try:
        assert http("GET", f"{url}/health") == (200, {"status": "ok"})
        status, models = http("GET", f"{url}/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["kaitune/tiny-phi3", "quickstart"]
        question = [{"role": "user", "content": "What is the capital of France?"}]
        status, reply = http("POST", f"{url}/chat", {"messages": question, "generate_kwargs": {"max_new_tokens": 16}})
        assert status == 200 and reply["Result"].strip()
        answers = {}
        for model in ("kaitune/tiny-phi3", "quickstart"):
            status, body = http(
                "POST", f"{url}/v1/chat/completions", {"model": model, "messages": question, "max_tokens": 16}
            )
            assert status == 200 and body["object"] == "chat.completion"
            answers[model] = body["choices"][0]["message"]["content"]
        assert answers["quickstart"] != answers["kaitune/tiny-phi3"]  # the adapter changes the model
        assert http("POST", f"{url}/chat", {"generate_kwargs": {}})[0] == 422  # neither prompt nor messages
        assert http("POST", f"{url}/v1/chat/completions", {"model": "nope", "messages": question})[0] == 404
    finally:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            if not alive(pid):
                break
            time.sleep(0.1)
    assert not alive(pid)


def test_run_of_a_broken_spec_exits_2_before_running(tmp_path: Path) -> None:
    spec = copy_example(tmp_path)
    spec.write_text(spec.read_text().replace("method: lora", "method: full"))
    result = kaitune_run(spec, tmp_path / "run")
    assert result.returncode == 2 and "tuning.method" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_failing_step_stops_the_run_with_its_error(tmp_path: Path, kaitune_cache: Path) -> None:
    spec = copy_example(tmp_path)
    (tmp_path / "examples" / "data" / "quickstart_chat.jsonl").write_text('{"messages": "oops"}\n' * 5)
    result = kaitune_run(spec, tmp_path / "run")
    assert result.returncode == 2, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    status = {t["name"]: t["status"] for t in summary["tasks"]}
    assert status["fetch-data"] == "Failed" and status["train"] == "Omitted" and status["cleanup"] == "Succeeded"
    assert "5 of 5 rows are bad" in result.stderr
