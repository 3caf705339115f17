"""submit, status and logs against a fake Argo Server on loopback, through hera's WorkflowsService."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from argo_fake import TOKEN, FakeArgo, workflow
from conftest import SEED, strict
from kube_fake import FakeKube

from pipelines.finetune import render
from pipelines.plan import load_and_plan
from pipelines.workflow_status import row

RUNNING = {"provision": "Succeeded", "fetch-data": "Succeeded", "train": "Running"}
DONE = dict.fromkeys(("provision", "fetch-data", "train", "push", "deploy"), "Succeeded")
OUTPUTS = {
    "push": {"digest": "sha256:" + "a" * 64, "image-ref": "myacr.azurecr.io/adapters/phi-3@sha256:" + "a" * 64},
    "deploy": {"endpoint": "http://workspace-tuning-phi-3.team-a.svc.cluster.local"},
}


@pytest.fixture
def argo(tmp_path: Path) -> Iterator[FakeArgo]:
    with FakeArgo().serve() as fake:
        (tmp_path / "token").write_text(TOKEN.removeprefix("Bearer "))
        yield fake


def kaitune(tmp_path: Path, argo: FakeArgo, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ARGO_SERVER": argo.url, "ARGO_NAMESPACE": "team-a", "HOME": str(tmp_path)}
    env["ARGO_TOKEN"] = token if token is not None else TOKEN.removeprefix("Bearer ")
    env["KUBECONFIG"] = str(tmp_path / "kubeconfig")
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)  # fmt: skip


def install_template(argo: FakeArgo, tmp_path: Path) -> None:
    spec, plan = load_and_plan(SEED)
    argo.templates["kaitune-finetune"] = render(spec, plan, kind="WorkflowTemplate")


def test_submit_by_reference_validates_and_applies_the_configmap(
    tmp_path: Path, argo: FakeArgo, argo_schema: dict[str, Any]
) -> None:
    install_template(argo, tmp_path)
    doc = yaml.safe_load(SEED.read_text())
    doc["tuning"]["config"] = "my-params"
    config = {"QuantizationConfig": {"load_in_4bit": True}, "TrainingArguments": {"num_train_epochs": 2}}
    text = yaml.safe_dump({"training_config": config})
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "my-params"},
        "data": {"training_config.yaml": text},
    }
    spec = tmp_path / "w.yaml"
    spec.write_text(yaml.safe_dump_all([doc, cm]))
    with FakeKube().serve() as kube:
        kube.kubeconfig(tmp_path)
        result = kaitune(tmp_path, argo, "submit", str(spec))
        assert result.returncode == 0, result.stderr
        applied = kube.get("/api/v1/namespaces/team-a/configmaps", "my-params")
    assert applied is not None and "num_train_epochs: 2" in applied["data"]["training_config.yaml"]
    [request] = argo.created
    wf = request["workflow"]
    jsonschema.validate(wf, strict(argo_schema))
    assert wf["spec"]["workflowTemplateRef"] == {"name": "kaitune-finetune"}
    params = {p["name"]: p["value"] for p in wf["spec"]["arguments"]["parameters"]}
    assert json.loads(params["training-config"])["TrainingArguments"]["num_train_epochs"] == 2
    assert wf["metadata"]["generateName"] == "workspace-tuning-phi-3-" and "templates" not in wf["spec"]
    assert "workflow workspace-tuning-phi-3-x0001 submitted in team-a" in result.stdout
    assert all(h == TOKEN for h in argo.auth_headers)
    assert TOKEN.removeprefix("Bearer ") not in result.stdout + result.stderr


def test_submit_inline_sends_the_whole_workflow(tmp_path: Path, argo: FakeArgo, argo_schema: dict[str, Any]) -> None:
    result = kaitune(tmp_path, argo, "submit", str(SEED), "--inline", "--no-apply-configmap")
    assert result.returncode == 0, result.stderr
    [request] = argo.created
    jsonschema.validate(request["workflow"], strict(argo_schema))
    assert {t["name"] for t in request["workflow"]["spec"]["templates"]} >= {"train", "push", "deploy"}
    assert not any(path.startswith("/api/v1/workflow-templates") for _, path, _ in argo.requests)


def test_submit_errors_are_clear_and_never_show_the_token(tmp_path: Path, argo: FakeArgo) -> None:
    absent = kaitune(tmp_path, argo, "submit", str(SEED), "--no-apply-configmap")
    assert absent.returncode == 2 and "is not in namespace team-a" in absent.stderr and "--inline" in absent.stderr
    bad_token = "wrong-token-value-123"
    denied = kaitune(tmp_path, argo, "submit", str(SEED), "--no-apply-configmap", token=bad_token)
    assert denied.returncode == 2 and "rejected the token (HTTP 401)" in denied.stderr
    assert bad_token not in denied.stdout + denied.stderr
    unreachable = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "status", "x", "--argo-server", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert (
        unreachable.returncode == 75 and "unreachable" in unreachable.stderr and "Traceback" not in unreachable.stderr
    )
    no_server = subprocess.run([sys.executable, "-m", "pipelines.cli", "status", "x"], capture_output=True, text=True,
                               timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("ARGO_")}
                               | {"HOME": str(tmp_path)})  # fmt: skip
    assert no_server.returncode == 2 and "ARGO_SERVER" in no_server.stderr


def test_a_template_of_another_shape_is_refused_before_creating(tmp_path: Path, argo: FakeArgo) -> None:
    install_template(argo, tmp_path)
    doc = yaml.safe_load(SEED.read_text())
    doc["tuning"]["input"] = {"volumeSource": {"persistentVolumeClaim": {"claimName": "data"}}}
    spec = tmp_path / "w.yaml"
    spec.write_text(yaml.safe_dump(doc))
    result = kaitune(tmp_path, argo, "submit", str(spec), "--no-apply-configmap")
    assert result.returncode == 2 and "lacks what this spec needs: input" in result.stderr
    assert argo.created == []


def test_status_shows_kaitos_columns_for_running_failed_and_succeeded() -> None:
    now = datetime(2026, 11, 28, 10, 30, tzinfo=UTC)
    running = row(workflow("w1", RUNNING, "Running"), now)
    assert running == {"NAME": "workspace-tuning-phi-3", "INSTANCE": "Standard_NC6s_v3", "RESOURCEREADY": "True",
                       "INFERENCEREADY": "Unknown", "WORKSPACEREADY": "Unknown", "AGE": "30m"}  # fmt: skip
    failed = row(workflow("w2", {**RUNNING, "train": "Failed"}, "Failed", message="child 'w2-2002' failed"), now, True)
    assert failed["WORKSPACEREADY"] == "False" and failed["TRAIN"] == "Failed (42s)"
    assert failed["MESSAGE"] == "child 'w2-2002' failed" and failed["DEPLOY"] == "-"
    done = row(workflow("w3", DONE, "Succeeded", outputs=OUTPUTS), now, wide=True)
    assert done["RESOURCEREADY"] == done["INFERENCEREADY"] == done["WORKSPACEREADY"] == "True"
    assert done["ADAPTER"] == OUTPUTS["push"]["image-ref"] and done["ENDPOINT"] == OUTPUTS["deploy"]["endpoint"]
    assert done["PROGRESS"] == "5/6"


def test_status_and_wait_follow_a_workflow_to_its_end(tmp_path: Path, argo: FakeArgo) -> None:
    argo.lives["w9"] = [workflow("w9", RUNNING, "Running"), workflow("w9", DONE, "Succeeded", outputs=OUTPUTS)]
    result = kaitune(tmp_path, argo, "status", "w9", "-o", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["TRAIN"].startswith("Running")
    again = kaitune(tmp_path, argo, "status", "w9")
    assert "WORKSPACEREADY" in again.stdout and "True" in again.stdout
    missing = kaitune(tmp_path, argo, "status", "nope")
    assert missing.returncode == 2 and "is not in namespace team-a" in missing.stderr


def test_logs_all_steps_or_one(tmp_path: Path, argo: FakeArgo) -> None:
    argo.lives["w5"] = [workflow("w5", DONE, "Succeeded")]
    argo.logs["w5"] = [("w5-train-2002", "step 10/40 loss 1.23"), ("w5-push-2003", "pushed myacr.azurecr.io/a@sha256")]
    everything = kaitune(tmp_path, argo, "logs", "w5")
    assert everything.returncode == 0, everything.stderr
    assert "w5-train-2002: step 10/40 loss 1.23" in everything.stdout and "w5-push-2003" in everything.stdout
    train = kaitune(tmp_path, argo, "logs", "w5", "--step", "train")
    assert train.stdout.strip() == "step 10/40 loss 1.23"
    assert ("podName", ["w5-train-2002"]) in [(k, v) for _, p, q in argo.requests for k, v in q.items()]
    wrong = kaitune(tmp_path, argo, "logs", "w5", "--step", "training")
    assert wrong.returncode == 2 and "use one of" in wrong.stderr
