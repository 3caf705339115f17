"""provision and cleanup on Kubernetes, against a fake API server driven through the real kubernetes client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import schemas_dir
from kube_fake import FakeKube, gpu_node

from pipelines.gpus import find_sku
from steps import gpu_nodes

CLAIMS = "/apis/karpenter.sh/v1/nodeclaims"
NODES = "/api/v1/nodes"
SEED_ARGS = ["--preset", "phi-3-mini-128k-instruct", "--method", "qlora"]


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[FakeKube]:
    with FakeKube().serve() as fake:
        fake.kubeconfig(tmp_path)
        yield fake


def step(tmp_path: Path, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "kubeconfig")}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.run([sys.executable, "-m", f"steps.{module}", *args], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip


def provision(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    common = ["--target", "kubernetes", "--workspace", "workspace-tuning-phi-3", "--namespace", "team-a"]
    return step(tmp_path, "provision", *common, *SEED_ARGS, "--outputs", str(tmp_path / "out"), "--poll", "0.05", *args)


def outputs(tmp_path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}


def karpenter(ready_after_gets: int = 2, gpus: int = 1, terminal: str | None = None) -> Any:
    """Plays Karpenter: a new claim launches, registers its Node, and turns Ready after a few reads."""

    def hook(fake: FakeKube, method: str, path: str) -> None:
        for name, claim in list(fake.collection(CLAIMS).items()):
            if claim.get("status", {}).get("nodeName") or claim.get("status", {}).get("conditions"):
                continue
            if terminal:
                message = "no capacity for Standard_NC6s_v3 in eastus"
                launched = {"type": "Launched", "status": "False", "reason": terminal, "message": message}
                claim["status"] = {"conditions": [launched]}
            elif fake.count("GET", f"{CLAIMS}/{name}") >= ready_after_gets:
                node = f"aks-{name}-12345678-vmss000000"
                fake.put(NODES, gpu_node(node, labels=claim["metadata"]["labels"], gpus=gpus))
                claim["status"] = {"nodeName": node, "conditions": [{"type": "Ready", "status": "True"}]}

    return hook


def test_nodeclaim_matches_kaitos_shape_and_the_karpenter_crd() -> None:
    crd = yaml.safe_load((schemas_dir() / "karpenter.sh_nodeclaims.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for sku_name in ("Standard_NC6s_v3", "g5.12xlarge"):
        sku = find_sku(sku_name)
        assert sku is not None
        claim = gpu_nodes.nodeclaim_manifest("ws-a", "team-a", sku, {"apps": "phi-3"}, 150)
        jsonschema.validate(claim, schema)
        assert claim["metadata"]["labels"]["apps"] == "phi-3"
        assert claim["metadata"]["labels"]["kaito.sh/workspace"] == "ws-a"
        assert claim["metadata"]["annotations"] == {"karpenter.sh/do-not-disrupt": "true"}
        assert claim["spec"]["taints"] == [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}]
        keys = {r["key"]: r["values"] for r in claim["spec"]["requirements"]}
        assert keys["node.kubernetes.io/instance-type"] == [sku_name] and keys["kubernetes.io/os"] == ["linux"]
        if sku.cloud == "azure":
            assert keys["karpenter.azure.com/sku-name"] == [sku_name]
            assert claim["spec"]["nodeClassRef"]["kind"] == "AKSNodeClass"
        else:
            assert keys["karpenter.k8s.aws/instance-gpu-count"] == ["4"]
            assert claim["spec"]["nodeClassRef"]["kind"] == "EC2NodeClass"
    broken = {**claim, "spec": {**claim["spec"], "taints": [{"key": "sku", "effect": "Sometimes"}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_a_claim_that_becomes_ready_then_an_idempotent_rerun(tmp_path: Path, kube: FakeKube) -> None:
    kube.hooks.append(karpenter())
    result = provision(tmp_path, "--instance-type", "Standard_NC6s_v3", "--label-selector", '{"apps": "phi-3"}')
    assert result.returncode == 0, result.stderr
    [claim] = kube.collection(CLAIMS).values()
    assert claim["spec"]["requirements"][0]["values"] == ["Standard_NC6s_v3"]
    got = outputs(tmp_path)
    assert got["nodes"] == claim["status"]["nodeName"]
    selector = json.loads(got["node-selector"])
    assert selector == {"apps": "phi-3", "kaito.sh/workspace": "workspace-tuning-phi-3",
                        "kaito.sh/workspacenamespace": "team-a"}  # fmt: skip
    assert json.loads(got["pod-spec-patch"]) == {"nodeSelector": selector}
    posts = kube.count("POST", CLAIMS)
    again = provision(tmp_path, "--instance-type", "Standard_NC6s_v3", "--label-selector", '{"apps": "phi-3"}')
    assert again.returncode == 0, again.stderr
    assert "reusing this workspace's NodeClaim" in again.stderr
    assert len(kube.collection(CLAIMS)) == 1 and kube.count("POST", CLAIMS) == posts + 1  # answered 409


def test_a_claim_that_never_becomes_ready_times_out_transiently(tmp_path: Path, kube: FakeKube) -> None:
    result = provision(tmp_path, "--instance-type", "Standard_NC6s_v3", "--timeout", "1")
    assert result.returncode == 75, result.stderr
    assert "was not ready within 1s" in result.stderr and "Traceback" not in result.stderr


def test_instance_types_unavailable_is_terminal(tmp_path: Path, kube: FakeKube) -> None:
    kube.hooks.append(karpenter(terminal="InstanceTypesUnavailable"))
    result = provision(tmp_path, "--instance-type", "Standard_NC6s_v3", "--timeout", "60")
    assert result.returncode == 2, result.stderr
    assert "InstanceTypesUnavailable" in result.stderr and "GPU quota" in result.stderr


def test_a_node_without_gpu_capacity_names_the_device_plugin(tmp_path: Path, kube: FakeKube) -> None:
    kube.hooks.append(karpenter(gpus=0))
    result = provision(tmp_path, "--instance-type", "Standard_NC6s_v3", "--timeout", "1")
    assert result.returncode == 2, result.stderr
    assert "no nvidia.com/gpu" in result.stderr and "device plugin" in result.stderr


def test_byo_nodes_are_chosen_by_labels_fit_and_preference(tmp_path: Path, kube: FakeKube) -> None:
    gfd = {"apps": "phi-3", "nvidia.com/gpu.product": "NVIDIA-A100-PCIE-80GB", "nvidia.com/gpu.memory": "81920"}
    kube.put(NODES, gpu_node("small", labels={**gfd, "nvidia.com/gpu.memory": "4096"}))
    kube.put(NODES, gpu_node("a100-1", labels=gfd))
    kube.put(NODES, gpu_node("a100-2", labels=gfd))
    kube.put(NODES, gpu_node("cpu-only", labels={"apps": "phi-3"}, gpus=0))
    kube.put(NODES, gpu_node("other", labels={**gfd, "apps": "other"}))
    result = provision(tmp_path, "--label-selector", '{"apps": "phi-3"}', "--preferred-nodes", '["a100-2"]')
    assert result.returncode == 0, result.stderr
    assert outputs(tmp_path)["nodes"] == "a100-2"
    assert json.loads(outputs(tmp_path)["pod-spec-patch"]) == {"nodeSelector": {"kubernetes.io/hostname": "a100-2"}}
    assert kube.count("POST", CLAIMS) == 0  # BYO never buys nodes
    kube.collection(NODES).pop("a100-1")
    kube.collection(NODES).pop("a100-2")
    none = provision(tmp_path, "--label-selector", '{"apps": "phi-3"}')
    assert none.returncode == 2
    assert "small (1 x NVIDIA-A100-PCIE-80GB 4 GiB" in none.stderr and "cpu-only (no allocatable GPU)" in none.stderr


def test_cleanup_releases_claims_after_failure_and_is_idempotent(tmp_path: Path, kube: FakeKube) -> None:
    kube.hooks.append(karpenter())
    assert provision(tmp_path, "--instance-type", "Standard_NC6s_v3").returncode == 0
    kube.put(CLAIMS, {"metadata": {"name": "someone-elses", "labels": {"kaito.sh/workspace": "workspace-tuning-phi-3"}},
                      "spec": {}})  # fmt: skip
    common = ["--target", "kubernetes", "--workspace", "workspace-tuning-phi-3", "--namespace", "team-a"]
    kept = step(tmp_path, "cleanup", *common, "--workflow-status", "Succeeded")
    assert kept.returncode == 0 and len(kube.collection(CLAIMS)) == 2
    failed = step(tmp_path, "cleanup", *common, "--workflow-status", "Failed")
    assert failed.returncode == 0, failed.stderr
    assert list(kube.collection(CLAIMS)) == ["someone-elses"]  # only what kaitune created for this workspace
    again = step(tmp_path, "cleanup", *common, "--workflow-status", "Failed")
    assert again.returncode == 0 and "(none left)" in again.stderr


def test_no_credentials_or_permission_is_a_clear_error(tmp_path: Path, kube: FakeKube) -> None:
    (tmp_path / "kubeconfig").unlink()
    result = provision(tmp_path, "--instance-type", "Standard_NC6s_v3")
    assert result.returncode == 2 and "set KUBECONFIG" in result.stderr

    kube.kubeconfig(tmp_path)
    kube.deny.add(CLAIMS)
    denied = provision(tmp_path, "--instance-type", "Standard_NC6s_v3")
    assert denied.returncode == 2 and "forbidden (HTTP 403)" in denied.stderr and "service account" in denied.stderr


DEPLOYMENTS = "/apis/apps/v1/namespaces/team-a/deployments"
PODS = "/api/v1/namespaces/team-a/pods"
IMAGE = "myacr.azurecr.io/adapters/phi-3@sha256:" + "a" * 64


def deployment_controller(fail_with: str | None = None) -> Any:
    """Plays the Deployment controller and the kubelet: each new generation rolls out, or its pod fails."""

    def hook(fake: FakeKube, method: str, path: str) -> None:
        for name, dep in fake.collection(DEPLOYMENTS).items():
            generation = dep["metadata"]["generation"]
            if dep.get("status", {}).get("observedGeneration") == generation:
                continue
            labels = dep["spec"]["template"]["metadata"]["labels"]
            pod = {"metadata": {"name": f"{name}-{generation}-abcde", "labels": labels}, "status": {"phase": "Pending"}}
            if fail_with == "OOMKilled":
                pod["status"]["containerStatuses"] = [{"name": "inference", "ready": False, "restartCount": 2,
                    "image": "x", "imageID": "", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]  # fmt: skip
            elif fail_with:
                pod["status"]["initContainerStatuses"] = [{"name": "pull-adapter", "ready": False, "restartCount": 0,
                    "image": "x", "imageID": "", "state": {"waiting": {"reason": fail_with,
                    "message": 'Back-off pulling image "ghcr.io/kaitune/step:0.1.0"'}}}]  # fmt: skip
            fake.put(PODS, pod)
            if not fail_with:
                dep["status"] = {"observedGeneration": generation, "replicas": 1, "updatedReplicas": 1,
                                 "readyReplicas": 1, "availableReplicas": 1}  # fmt: skip

    return hook


def deploy(tmp_path: Path, *args: str, image: str = IMAGE) -> subprocess.CompletedProcess[str]:
    return step(
        tmp_path, "deploy", "--target", "kubernetes", "--workspace", "ws-phi3", "--namespace", "team-a",
        "--base-model", "kaitune/tiny-phi3", "--image-ref", image, "--work", str(tmp_path / "work"),
        "--outputs", str(tmp_path / "out"), "--node-selector", '{"kaito.sh/workspace": "ws-phi3"}',
        "--serve-image", "ghcr.io/kaitune/serve:0.1.0", "--step-image", "ghcr.io/kaitune/step:0.1.0",
        "--push-secret", "acr-push", "--poll", "0.05", "--rollout-timeout", "20", *args,
    )  # fmt: skip


def test_inference_manifests_are_valid_kubernetes() -> None:
    import kubernetes_validate

    from steps import inference_k8s

    serving = inference_k8s.Serving("ws-phi3", "team-a", "microsoft/Phi-3-mini-128k-instruct", IMAGE,
                                    "ghcr.io/kaitune/serve:0.1.0", "ghcr.io/kaitune/step:0.1.0", 1,
                                    {"kaito.sh/workspace": "ws-phi3"}, push_secret="acr-push",
                                    model_token_secret="hf", model_token_key="HF_TOKEN")  # fmt: skip
    dep, svc = inference_k8s.deployment(serving), inference_k8s.service(serving)
    for obj in (dep, svc):
        kubernetes_validate.validate(obj, "1.30", strict=True)
    pod = dep["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["command"][:5] == ["python", "-m", "pipelines.cli", "pull", IMAGE]
    [server] = pod["containers"]
    assert server["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/health", "port": 5000}
    assert {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in pod["tolerations"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": 5000, "protocol": "TCP"}]
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert "HF_TOKEN" not in json.dumps(init) and server["env"][0]["valueFrom"]["secretKeyRef"]["key"] == "HF_TOKEN"
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "five thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30", strict=True)


def test_a_rollout_that_fails_reports_the_pods_reason(tmp_path: Path, kube: FakeKube) -> None:
    kube.hooks.append(deployment_controller(fail_with="ImagePullBackOff"))
    result = deploy(tmp_path)
    assert result.returncode == 2, result.stderr
    assert "pull-adapter: ImagePullBackOff" in result.stderr and "imagePushSecret" in result.stderr
    kube.hooks[:] = [deployment_controller(fail_with="OOMKilled")]
    kube.collection(PODS).clear()
    kube.collection(DEPLOYMENTS)["ws-phi3"]["spec"]["replicas"] = 2  # a new generation, as a user edit would make
    oom = deploy(tmp_path, image=IMAGE.replace("a" * 64, "b" * 64))
    assert oom.returncode == 2 and "OOMKilled (exit 137)" in oom.stderr and "larger instanceType" in oom.stderr


def test_a_rollout_that_never_finishes_times_out(tmp_path: Path, kube: FakeKube) -> None:
    result = deploy(tmp_path, "--rollout-timeout", "1")
    assert result.returncode == 75 and "did not roll out within 1s" in result.stderr


def test_an_image_layout_cannot_be_served_from_kubernetes(tmp_path: Path, kube: FakeKube) -> None:
    result = deploy(tmp_path, image="oci-layout:///volumes/out@sha256:" + "c" * 64)
    assert result.returncode == 2 and "set tuning.output.image" in result.stderr
    assert kube.count("PATCH", DEPLOYMENTS) == 0


@pytest.fixture
def served_adapter(tmp_path: Path, tiny_phi3: Path) -> Iterator[str]:
    """The serve runtime with an adapter, on loopback: what the rolled-out pod answers with."""
    import socket
    import time
    import urllib.request

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_phi3), LoraConfig(r=4, target_modules=["qkv_proj"])
    )
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_phi3).save_pretrained(adapter)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "steps.serve", "--base-model", "tiny-phi3", "--adapter-dir", str(adapter),
           "--adapter-name", "ws-phi3", "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, "the server exited"
                time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_rollout_that_succeeds_is_smoke_tested_and_a_new_adapter_rolls_again(
    tmp_path: Path, kube: FakeKube, served_adapter: str
) -> None:
    kube.hooks.append(deployment_controller())
    result = deploy(tmp_path, "--endpoint", served_adapter)
    assert result.returncode == 0, result.stderr
    got = outputs(tmp_path)
    assert got["endpoint"] == served_adapter and "chat-reply" in got  # an untrained adapter may say nothing
    dep = kube.get(DEPLOYMENTS, "ws-phi3")
    svc = kube.get("/api/v1/namespaces/team-a/services", "ws-phi3")
    assert dep is not None and svc is not None and dep["metadata"]["generation"] == 1
    assert dep["spec"]["template"]["spec"]["nodeSelector"] == {"kaito.sh/workspace": "ws-phi3"}
    # Server-side apply, as the field manager kaitune.
    assert ("PATCH", f"{DEPLOYMENTS}/ws-phi3") in kube.requests
    again = deploy(tmp_path, "--endpoint", served_adapter)  # the same adapter: nothing changes
    assert again.returncode == 0 and kube.get(DEPLOYMENTS, "ws-phi3")["metadata"]["generation"] == 1  # type: ignore[index]
    new_image = IMAGE.replace("a" * 64, "d" * 64)
    rolled = deploy(tmp_path, "--endpoint", served_adapter, image=new_image)
    assert rolled.returncode == 0, rolled.stderr
    dep = kube.get(DEPLOYMENTS, "ws-phi3")
    assert dep is not None and dep["metadata"]["generation"] == 2
    assert dep["spec"]["template"]["metadata"]["annotations"]["kaitune.io/adapter-image"] == new_image
