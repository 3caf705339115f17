"""The Workspace spec: the seed is accepted as written, and broken variants get clear, distinct errors."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import QUICKSTART, SEED, load_docs

from pipelines.errors import BadInput
from pipelines.plan import cpu_supports_bf16, load_and_plan, load_spec


def write(tmp_path: Path, *docs: dict[str, Any]) -> Path:
    path = tmp_path / "workspace.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def kaitune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=120)


def test_seed_is_accepted_exactly_as_written() -> None:
    spec, plan = load_and_plan(SEED)
    assert spec.name == "workspace-tuning-phi-3"
    assert spec.method == "qlora"
    assert spec.input.kind == "urls" and spec.input.urls[0].endswith("?download=true")
    assert spec.output.image == "ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1"
    assert spec.output.push_secret == "ACR_REGISTRY_SECRET_HERE"
    assert spec.config_is_default and spec.config_name == "qlora-params"
    # The placeholder image is accepted, but the user is told a registry would refuse it.
    assert any("placeholder" in w for w in spec.warnings)
    assert plan.target == "Standard_NC6s_v3"
    assert plan.gpus_needed == 1
    assert plan.compute_dtype == "float16"  # V100: no bf16, though Kaito's default config says bfloat16
    assert plan.target_modules == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert plan.fits


def test_validate_cli_accepts_seed() -> None:
    result = kaitune("validate", str(SEED))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    assert "warning:" in result.stderr


def test_v1beta1_and_user_configmap(tmp_path: Path) -> None:
    spec = load_spec(QUICKSTART)
    assert spec.api_version == "kaito.sh/v1beta1"
    assert not spec.config_is_default
    assert spec.training_config["LoraConfig"]["r"] == 16
    assert spec.input.kind == "volume" and spec.output.kind == "volume"


def test_method_is_case_insensitive(tmp_path: Path, seed_doc: dict[str, Any]) -> None:
    seed_doc["tuning"]["method"] = "QLoRA"
    assert load_spec(write(tmp_path, seed_doc)).method == "qlora"


def test_gpu_fit_is_reported_with_admission_problems(tmp_path: Path, seed_doc: dict[str, Any]) -> None:
    seed_doc["metadata"]["name"] = "Bad_Name"
    seed_doc["tuning"]["preset"]["name"] = "phi-4"
    seed_doc["tuning"]["method"] = "lora"
    with pytest.raises(BadInput) as info:
        load_and_plan(write(tmp_path, seed_doc))
    assert [p.path for p in info.value.problems] == ["metadata.name", "resource.instanceType"]


def test_plan_turns_on_checkpointing_only_when_needed_and_not_chosen(tmp_path: Path, seed_doc: dict[str, Any]) -> None:
    seed_doc["tuning"]["method"] = "lora"
    seed_doc["tuning"]["config"] = "p"
    config = "training_config:\n  TrainingArguments:\n    max_length: 4096\n"
    _, plan = load_and_plan(write(tmp_path, seed_doc, _cm("p", config)))
    assert plan.knobs.gradient_checkpointing and any("checkpointing turned on" in n for n in plan.notes)
    explicit = config + "    gradient_checkpointing: false\n"
    with pytest.raises(BadInput, match="needs ~"):
        load_and_plan(write(tmp_path, seed_doc, _cm("p", explicit)))


def test_all_problems_are_reported_at_once(tmp_path: Path, seed_doc: dict[str, Any]) -> None:
    seed_doc["metadata"]["name"] = "Bad_Name"
    seed_doc["tuning"]["method"] = "full"
    seed_doc["tuning"]["preset"]["name"] = "gpt-5"
    with pytest.raises(BadInput) as info:
        load_spec(write(tmp_path, seed_doc))
    paths = {p.path for p in info.value.problems}
    assert {"metadata.name", "tuning.method", "tuning.preset.name"} <= paths


def _cm(name: str, body: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"training_config.yaml": body}}


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        doc = doc.setdefault(key, {})
    if value is _DELETE:
        doc.pop(keys[-1], None)
    else:
        doc[keys[-1]] = value


_DELETE = object()
LORA_4BIT = "training_config:\n  QuantizationConfig:\n    load_in_4bit: true\n"
QLORA_NOQUANT = "training_config:\n  LoraConfig:\n    r: 8\n"
UNKNOWN_DATASET_KEY = "training_config:\n  DatasetConfig:\n    shuffle: true\n"
UNKNOWN_SECTION = "training_config:\n  TokenizerParams:\n    padding: true\n"

# (id, edits to the seed, extra documents, expected field path, a phrase of the message)
BROKEN = [
    ("bad-name", {"metadata.name": "Workspace_Tuning"}, [], "metadata.name", "DNS-1123"),
    ("api-version", {"apiVersion": "kaito.sh/v2"}, [], "apiVersion", "not supported"),
    ("both-tuning-inference", {"inference": {"preset": {"name": "phi-3"}}}, [], "tuning", "not both"),
    ("no-tuning", {"tuning": _DELETE}, [], "tuning", "is required"),
    ("method", {"tuning.method": "full"}, [], "tuning.method", "lora or qlora"),
    ("two-inputs", {"tuning.input.image": "myacr.azurecr.io/data:1"}, [], "tuning.input", "exactly one"),
    ("no-input", {"tuning.input": {}}, [], "tuning.input", "none is set"),
    ("ftp-url", {"tuning.input.urls": ["ftp://example.com/d.parquet"]}, [], "tuning.input.urls[0]", "scheme"),
    (
        "loopback-url",
        {"tuning.input.urls": ["http://127.0.0.1:8000/d.parquet"]},
        [],
        "tuning.input.urls[0]",
        "loopback",
    ),
    ("metadata-url", {"tuning.input.urls": ["http://169.254.169.254/latest/"]}, [], "tuning.input.urls[0]", "metadata"),
    ("private-url", {"tuning.input.urls": ["https://10.0.0.7/d.parquet"]}, [], "tuning.input.urls[0]", "private"),
    (
        "bad-input-image",
        {"tuning.input": {"image": "myacr.azurecr.io/data@sha256:xyz"}},
        [],
        "tuning.input.image",
        "digest",
    ),
    ("no-push-secret", {"tuning.output.imagePushSecret": _DELETE}, [], "tuning.output.imagePushSecret", "is required"),
    ("two-outputs", {"tuning.output.volumeSource": {"emptyDir": {}}}, [], "tuning.output", "both are set"),
    ("bad-output-image", {"tuning.output.image": "not a ref!"}, [], "tuning.output.image", "spaces"),
    ("unknown-preset", {"tuning.preset.name": "gpt-5"}, [], "tuning.preset.name", "unknown preset"),
    ("count", {"resource.count": 2}, [], "resource.count", "one node"),
    ("no-selector", {"resource.labelSelector": _DELETE}, [], "resource.labelSelector", "is required"),
    ("unknown-sku", {"resource.instanceType": "Standard_Quantum_v9"}, [], "resource.instanceType", "catalog"),
    ("missing-configmap", {"tuning.config": "my-params"}, [], "tuning.config", "not in this file"),
    (
        "unknown-section",
        {"tuning.config": "p"},
        [_cm("p", UNKNOWN_SECTION)],
        "ConfigMap/p.data.training_config.yaml.training_config.TokenizerParams",
        "unknown section",
    ),
    (
        "lora-with-4bit",
        {"tuning.config": "p", "tuning.method": "lora"},
        [_cm("p", LORA_4BIT)],
        "ConfigMap/p.data.training_config.yaml.training_config.QuantizationConfig",
        "full-precision",
    ),
    (
        "qlora-without-quant",
        {"tuning.config": "p"},
        [_cm("p", QLORA_NOQUANT)],
        "ConfigMap/p.data.training_config.yaml.training_config.QuantizationConfig",
        "quantized base",
    ),
    (
        "gpu-fit",
        {"tuning.preset.name": "phi-3-medium-4k-instruct", "tuning.method": "lora"},
        [],
        "resource.instanceType",
        "needs ~",
    ),
    ("wrong-type", {"resource.count": "many"}, [], "resource.count", "integer"),
    (
        "dataset-config-key",
        {"tuning.config": "p"},
        [_cm("p", UNKNOWN_DATASET_KEY)],
        "ConfigMap/p.data.training_config.yaml.training_config.DatasetConfig.shuffle",
        "not a DatasetConfig field",
    ),
    (
        "token-secret-name",
        {"metadata.annotations": {"kaitune.io/input-token-secret": "Bad Name"}},
        [],
        "metadata.annotations[kaitune.io/input-token-secret]",
        "not a Secret name",
    ),
]


@pytest.mark.parametrize(("edits", "extra", "path", "phrase"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_variant_gets_a_clear_error(
    tmp_path: Path, seed_doc: dict[str, Any], edits: dict[str, Any], extra: list[dict[str, Any]], path: str, phrase: str
) -> None:
    doc = copy.deepcopy(seed_doc)
    for dotted, value in edits.items():
        _set(doc, dotted, value)
    with pytest.raises(BadInput) as info:
        load_and_plan(write(tmp_path, doc, *extra))
    problems = info.value.problems
    match = [p for p in problems if p.path == path and phrase in p.message]
    assert match, [p.render() for p in problems]
    assert all(p.fix for p in match), "every error says what to do"


def test_broken_variants_have_distinct_errors(tmp_path: Path, seed_doc: dict[str, Any]) -> None:
    messages = set()
    for _, edits, extra, _, _ in BROKEN:
        doc = copy.deepcopy(seed_doc)
        for dotted, value in edits.items():
            _set(doc, dotted, value)
        with pytest.raises(BadInput) as info:
            load_and_plan(write(tmp_path, doc, *extra))
        messages.add(info.value.render())
    assert len(messages) == len(BROKEN) >= 15


@pytest.mark.parametrize("variant", ["bad-name", "gpu-fit", "lora-with-4bit"])
def test_cli_validate_exits_2_without_traceback(tmp_path: Path, seed_doc: dict[str, Any], variant: str) -> None:
    _, edits, extra, path, _ = next(b for b in BROKEN if b[0] == variant)
    for dotted, value in edits.items():
        _set(seed_doc, dotted, value)
    result = kaitune("validate", str(write(tmp_path, seed_doc, *extra)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: {path}:" in result.stderr and "fix:" in result.stderr


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    result = kaitune("validate", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "cannot be read" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: kaito.sh/v1alpha1\nkind: Workspace\nmetadata: [unclosed\n")
    result = kaitune("validate", str(bad))
    assert result.returncode == 2 and "bad.yaml:" in result.stderr and "Traceback" not in result.stderr


def test_local_urls_allowed_with_flag(tmp_path: Path, seed_doc: dict[str, Any]) -> None:
    seed_doc["tuning"]["input"]["urls"] = ["http://127.0.0.1:8000/d.parquet"]
    path = write(tmp_path, seed_doc)
    with pytest.raises(BadInput):
        load_spec(path)
    assert load_spec(path, allow_local_urls=True).input.urls == ["http://127.0.0.1:8000/d.parquet"]


def test_quickstart_example_validates() -> None:
    docs = load_docs(QUICKSTART)
    assert [d["kind"] for d in docs] == ["Workspace", "ConfigMap"]
    _, plan = load_and_plan(QUICKSTART, local=True)
    assert plan.compute_dtype == ("bfloat16" if cpu_supports_bf16() else "float32") and plan.fits
