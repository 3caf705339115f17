"""The rendered Workflow: schema-valid, round-trips through Hera, golden GitOps file, no secret content."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import EXAMPLES, QUICKSTART, SEED, strict
from hera.workflows import Workflow, WorkflowTemplate

from pipelines.cli import to_yaml
from pipelines.finetune import render
from pipelines.plan import load_and_plan

GOLDEN = EXAMPLES / "gitops" / "workflowtemplate.yaml"


def rendered(path: Path, kind: str = "Workflow") -> dict[str, Any]:
    spec, plan = load_and_plan(path)
    return render(spec, plan, kind=kind)  # type: ignore[arg-type]


def validate(doc: dict[str, Any], schema: dict[str, Any]) -> None:
    definition = f"io.argoproj.workflow.v1alpha1.{doc['kind']}"
    jsonschema.validate(doc, {"$ref": f"#/definitions/{definition}", "definitions": schema["definitions"]})


@pytest.mark.parametrize("kind", ["Workflow", "WorkflowTemplate"])
@pytest.mark.parametrize("example", [SEED, QUICKSTART], ids=["seed", "quickstart"])
def test_render_is_schema_valid(argo_schema: dict[str, Any], example: Path, kind: str) -> None:
    doc = rendered(example, kind)
    validate(doc, argo_schema)
    validate(doc, strict(argo_schema))  # no key the schema does not know


def test_schema_check_can_fail(argo_schema: dict[str, Any]) -> None:
    doc = rendered(SEED)
    doc["spec"]["templates"][0]["container"]["imagePullPolicy"] = 7
    with pytest.raises(jsonschema.ValidationError):
        validate(doc, argo_schema)
    doc = rendered(SEED)
    doc["spec"]["templates"][0]["retryStrategy"]["retryPolicy2"] = "Always"
    with pytest.raises(jsonschema.ValidationError):
        validate(doc, strict(argo_schema))


@pytest.mark.parametrize(("kind", "cls"), [("Workflow", Workflow), ("WorkflowTemplate", WorkflowTemplate)])
def test_render_round_trips_through_hera(kind: str, cls: type[Workflow]) -> None:
    doc = rendered(SEED, kind)
    assert cls.from_dict(doc).to_dict() == doc
    assert cls.from_yaml(to_yaml(doc)).to_dict() == doc


def test_dag_shape_and_contract() -> None:
    doc = rendered(SEED)
    spec = doc["spec"]
    tasks = {t["name"]: t for t in next(t for t in spec["templates"] if t["name"] == "main")["dag"]["tasks"]}
    assert set(tasks) == {"provision", "fetch-data", "train", "push", "deploy"}
    assert "depends" not in tasks["provision"] and "depends" not in tasks["fetch-data"]  # run in parallel
    assert tasks["train"]["depends"] == "provision && fetch-data"
    assert tasks["push"]["depends"] == "train" and tasks["deploy"]["depends"] == "push"
    assert spec["onExit"] == "cleanup"
    templates = {t["name"]: t for t in spec["templates"]}
    for name in ("provision", "fetch-data", "train", "push", "deploy", "cleanup"):
        container = templates[name]["container"]
        module = name.replace("-", "_")
        assert container["command"] == ["python", "-m", f"steps.{module}"]
        # Only the transient exit code is retried.
        assert templates[name]["retryStrategy"]["expression"] == "asInt(lastRetry.exitCode) == 75"
    train = templates["train"]
    assert train["container"]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in train["tolerations"]
    assert train["podSpecPatch"] == "{{inputs.parameters.pod-spec-patch}}"
    params = {p["name"]: p["value"] for p in spec["arguments"]["parameters"]}
    assert params["compute-dtype"] == "float16"
    assert params["target-modules"] == "qkv_proj,o_proj,gate_up_proj,down_proj"
    assert params["output-image"] == "ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1"
    assert doc["metadata"]["annotations"]["workflows.argoproj.io/title"].startswith("kaitune: fine-tune")
    assert doc["metadata"]["labels"]["kaitune.io/workspace"] == "workspace-tuning-phi-3"
    # Every workflow parameter reference resolves to a declared parameter.
    text = yaml.safe_dump(doc)
    for name in {part.split("}}")[0] for part in text.split("{{workflow.parameters.")[1:]}:
        assert name in params, name


def test_push_secret_is_a_reference_only() -> None:
    doc = rendered(SEED)
    volumes = {v["name"]: v for v in doc["spec"]["volumes"]}
    secret = volumes["push-secret"]["secret"]
    assert secret["secretName"] == "{{workflow.parameters.output-push-secret}}"
    push = next(t for t in doc["spec"]["templates"] if t["name"] == "push")
    assert {"name": "DOCKER_CONFIG", "value": "/kaitune/secrets/push"} in push["container"]["env"]
    text = yaml.safe_dump(doc)
    for secret_word in ("auths", "password", '.dockerconfigjson": ', "stringData"):
        assert secret_word not in text
    # The secret's name is a value, never a flag carrying credentials.
    assert "ACR_REGISTRY_SECRET_HERE" not in " ".join(push["container"]["args"])


def test_dataset_token_secret_is_mounted_not_inlined(tmp_path: Path) -> None:
    doc = yaml.safe_load(SEED.read_text())
    doc["metadata"]["annotations"] = {
        "kaitune.io/input-token-secret": "hf-token",
        "kaitune.io/model-token-secret": "hf-model-token",
    }
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(doc))
    rendered_doc = rendered(path)
    volumes = {v["name"]: v for v in rendered_doc["spec"]["volumes"]}
    assert volumes["input-token"]["secret"] == {"secretName": "hf-token", "items": [{"key": "token", "path": "token"}]}
    fetch = next(t for t in rendered_doc["spec"]["templates"] if t["name"] == "fetch-data")
    args = fetch["container"]["args"]
    assert args[args.index("--token-file") + 1] == "/kaitune/secrets/input/token"
    assert {"name": "input-token", "mountPath": "/kaitune/secrets/input", "readOnly": True} in fetch["container"][
        "volumeMounts"
    ]
    train = next(t for t in rendered_doc["spec"]["templates"] if t["name"] == "train")["container"]
    assert train["args"][train["args"].index("--token-file") + 1] == "/kaitune/secrets/model/token"
    assert volumes["model-token"]["secret"]["secretName"] == "hf-model-token"
    # Without the annotation there is no token volume and the flag is empty.
    plain = next(t for t in rendered(SEED)["spec"]["templates"] if t["name"] == "fetch-data")["container"]["args"]
    assert plain[plain.index("--token-file") + 1] == ""


def test_dataset_image_pull_secret_becomes_fetch_datas_docker_config(tmp_path: Path) -> None:
    doc = yaml.safe_load(SEED.read_text())
    doc["tuning"]["input"] = {"image": "myacr.azurecr.io/datasets/chat:1", "imagePullSecrets": ["acr-pull", "other"]}
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(doc))
    rendered_doc = rendered(path)
    volumes = {v["name"]: v for v in rendered_doc["spec"]["volumes"]}
    assert volumes["input-pull-secret"]["secret"]["secretName"] == "{{workflow.parameters.input-pull-secret}}"
    params = {p["name"]: p.get("value") for p in rendered_doc["spec"]["arguments"]["parameters"]}
    assert params["input-pull-secret"] == "acr-pull" and params["input-image"] == "myacr.azurecr.io/datasets/chat:1"
    fetch = next(t for t in rendered_doc["spec"]["templates"] if t["name"] == "fetch-data")["container"]
    assert {"name": "DOCKER_CONFIG", "value": "/kaitune/secrets/input-pull"} in fetch["env"]
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "validate", str(path)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and "only the first secret ('acr-pull')" in result.stderr


def test_kaito_preset_options_give_a_weights_image_and_a_model_access_secret(tmp_path: Path) -> None:
    doc = yaml.safe_load(SEED.read_text())
    doc["tuning"]["preset"] = {
        "name": doc["tuning"]["preset"]["name"],
        "accessMode": "private",
        "presetOptions": {"image": "myacr.azurecr.io/kaito/phi-3:0.1", "imagePullSecrets": ["acr-pull"],
                          "modelAccessSecret": "hf-access"},
    }  # fmt: skip
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(doc))
    rendered_doc = rendered(path)
    volumes = {v["name"]: v for v in rendered_doc["spec"]["volumes"]}
    assert volumes["model-token"]["secret"]["items"] == [{"key": "HF_TOKEN", "path": "token"}]
    assert volumes["model-pull-secret"]["secret"]["secretName"] == "{{workflow.parameters.model-image-pull-secret}}"
    train = next(t for t in rendered_doc["spec"]["templates"] if t["name"] == "train")["container"]
    assert train["args"][train["args"].index("--model-image") + 1] == "{{workflow.parameters.model-image}}"
    assert {"name": "DOCKER_CONFIG", "value": "/kaitune/secrets/model-pull"} in train["env"]
    params = {p["name"]: p.get("value") for p in rendered_doc["spec"]["arguments"]["parameters"]}
    assert (
        params["model-image"] == "myacr.azurecr.io/kaito/phi-3:0.1" and params["model-image-pull-secret"] == "acr-pull"
    )
    # Kaito's rule: a private preset must name its image.
    del doc["tuning"]["preset"]["presetOptions"]["image"]
    path.write_text(yaml.safe_dump(doc))
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "validate", str(path)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "tuning.preset.presetOptions.image: is required" in result.stderr


def test_argo_ui_gets_global_outputs_plain_artifacts_and_prometheus_metrics(tmp_path: Path) -> None:
    doc = rendered(SEED)
    templates = {t["name"]: t for t in doc["spec"]["templates"]}
    globals_ = {p["globalName"]: (name, p["name"]) for name, t in templates.items()
                for p in t.get("outputs", {}).get("parameters", []) if "globalName" in p}  # fmt: skip
    assert globals_ == {"eval-loss": ("train", "eval-loss"), "adapter-digest": ("push", "digest"),
                        "adapter-image": ("push", "image-ref"), "endpoint": ("deploy", "endpoint")}  # fmt: skip
    artifacts = {a["name"]: a for a in templates["train"]["outputs"]["artifacts"]}
    assert artifacts["loss-curve"]["path"].endswith("loss_curve.png") and artifacts["loss-curve"]["archive"] == {
        "none": {}
    }
    names = {g["name"] for g in templates["train"]["metrics"]["prometheus"]}
    assert names == {"kaitune_step_duration_seconds", "kaitune_tokens_trained", "kaitune_eval_loss"}
    assert templates["push"]["metrics"]["prometheus"][0]["gauge"]["value"] == "{{duration}}"
    # Clusters without an artifact repository turn the artifacts off with an annotation.
    plain = yaml.safe_load(SEED.read_text())
    plain["metadata"]["annotations"] = {"kaitune.io/ui-artifacts": "false"}
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(plain))
    train = next(t for t in rendered(path)["spec"]["templates"] if t["name"] == "train")
    assert "artifacts" not in train["outputs"]


def test_gitops_bundle_is_valid_and_in_sync(regen_golden: bool, argo_schema: dict[str, Any], tmp_path: Path) -> None:
    import kubernetes_validate

    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "render", str(SEED), "--gitops", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    files = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert sorted(files) == ["configmaps.yaml", "kustomization.yaml", "rbac.yaml", "workflowtemplate.yaml"]
    kustomization = yaml.safe_load(files["kustomization.yaml"])
    assert sorted(kustomization["resources"]) == ["configmaps.yaml", "rbac.yaml", "workflowtemplate.yaml"]
    [template] = list(yaml.safe_load_all(files["workflowtemplate.yaml"]))
    jsonschema.validate(template, strict(argo_schema))
    assert template["spec"]["serviceAccountName"] == "kaitune"
    kinds = []
    for name in ("rbac.yaml", "configmaps.yaml"):
        for doc in yaml.safe_load_all(files[name]):
            kubernetes_validate.validate(doc, "1.30", strict=True)
            kinds.append(doc["kind"])
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
                     "ConfigMap"]  # fmt: skip
    rules = {(r, v) for d in yaml.safe_load_all(files["rbac.yaml"]) for rule in d.get("rules", [])
             for r in rule["resources"] for v in rule["verbs"]}  # fmt: skip
    needed = {("nodeclaims", "create"), ("nodeclaims", "delete"), ("nodes", "get"), ("deployments", "patch"),
              ("services", "patch"), ("pods", "list"), ("pods/log", "get"), ("workflowtaskresults", "create"),
              ("configmaps", "patch")}  # fmt: skip
    assert needed <= rules and not any(v in ("*", "escalate", "bind") for _, v in rules)
    for name, text in files.items():
        golden = GOLDEN.parent / name
        if regen_golden:
            golden.write_text(text)
        assert golden.read_text() == text, f"examples/gitops/{name} is stale: rerun pytest with --regen-golden"


def test_cli_render_writes_file(tmp_path: Path) -> None:
    out = tmp_path / "wf.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "render", str(SEED), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(out.read_text()) == rendered(SEED)
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "render", str(SEED), "--template"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert yaml.safe_load(result.stdout)["kind"] == "WorkflowTemplate"


def test_model_that_fits_one_gpu_trains_data_parallel_on_the_whole_node(tmp_path: Path) -> None:
    doc = yaml.safe_load(SEED.read_text())
    doc["resource"]["instanceType"] = "Standard_NC24s_v3"  # 4 x V100
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(doc))
    wf = rendered(path)
    train = next(t for t in wf["spec"]["templates"] if t["name"] == "train")
    assert train["container"]["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    params = {p["name"]: p["value"] for p in wf["spec"]["arguments"]["parameters"]}
    assert params["train-processes"] == "4"
    assert "{{workflow.parameters.train-processes}}" in train["container"]["args"]
