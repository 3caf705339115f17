"""Kaito Workspace in, a validated ``Spec`` out.

Accepts ``kaito.sh/v1alpha1`` and ``kaito.sh/v1beta1`` Workspaces with the
top-level ``resource`` and ``tuning`` blocks, plus (in the same multi-document
file) the ConfigMap that ``tuning.config`` names. Applies Kaito's admission
rules and kaitune's own, and reports every problem at once with its field path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines import image_ref
from pipelines.errors import BadInput, Problem
from pipelines.gpus import find_sku
from pipelines.presets import PRESETS, Preset, find_preset
from pipelines.training_config import (
    DEFAULT_CONFIGMAPS,
    Sections,
    default_sections,
    parse_config_text,
    quantization_problems,
)
from pipelines.url_policy import url_problem

API_VERSIONS = ("kaito.sh/v1alpha1", "kaito.sh/v1beta1")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# kaitune's extensions to the Workspace, as annotations: Secrets (key "token") for gated datasets and models.
INPUT_TOKEN_ANNOTATION = "kaitune.io/input-token-secret"
MODEL_TOKEN_ANNOTATION = "kaitune.io/model-token-secret"
ARTIFACTS_ANNOTATION = "kaitune.io/ui-artifacts"


class _Lenient(BaseModel):
    # Unknown keys are kept (Kaito adds fields between versions); types are checked.
    model_config = ConfigDict(extra="allow")


class LabelSelector(_Lenient):
    matchLabels: dict[str, str] | None = None
    matchExpressions: list[dict[str, Any]] | None = None


class ResourceBlock(_Lenient):
    count: int | None = None
    instanceType: str | None = None
    labelSelector: LabelSelector | None = None
    preferredNodes: list[str] | None = None


class PresetOptionsBlock(_Lenient):
    image: str | None = None  # Kaito's private-mode weights image
    imagePullSecrets: list[str] | None = None
    modelAccessSecret: str | None = None  # a Secret with key HF_TOKEN (Kaito's name for it)


class PresetBlock(_Lenient):
    name: str | None = None
    accessMode: str | None = None
    presetOptions: PresetOptionsBlock | None = None


class InputBlock(_Lenient):
    urls: list[str] | None = None
    image: str | None = None
    imagePullSecrets: list[str] | None = None
    volumeSource: dict[str, Any] | None = None


class OutputBlock(_Lenient):
    image: str | None = None
    imagePushSecret: str | None = None
    volumeSource: dict[str, Any] | None = None


class TuningBlock(_Lenient):
    preset: PresetBlock | None = None
    method: str | None = None
    config: str | None = None
    input: InputBlock | None = None
    output: OutputBlock | None = None


class Metadata(_Lenient):
    name: str | None = None
    namespace: str | None = None
    annotations: dict[str, str] | None = None


class WorkspaceDoc(_Lenient):
    apiVersion: str | None = None
    kind: str | None = None
    metadata: Metadata | None = None
    resource: ResourceBlock | None = None
    inference: dict[str, Any] | None = None
    tuning: TuningBlock | None = None


class InputSource(BaseModel):
    kind: Literal["urls", "image", "volume"]
    urls: list[str] = []
    image: str | None = None
    pull_secrets: list[str] = []
    volume: dict[str, Any] | None = None
    token_secret: str | None = None  # a Secret with key "token", for gated dataset URLs


class OutputTarget(BaseModel):
    kind: Literal["image", "volume"]
    image: str | None = None
    push_secret: str | None = None  # the Secret's name only; its content is never read here
    volume: dict[str, Any] | None = None


@dataclass(frozen=True)
class PlanRequest:
    """What the memory plan depends on: a Spec's subset, also rebuilt by the provision step from its flags."""

    workspace: str
    preset: str
    method: str
    instance_type: str | None
    training_config: Sections
    config_is_default: bool
    warnings: tuple[str, ...] = ()


class Spec(BaseModel):
    """A Workspace that passed validation: everything the pipeline needs."""

    name: str
    namespace: str
    api_version: str
    preset_name: str
    method: Literal["lora", "qlora"]
    instance_type: str | None
    label_selector: dict[str, str]
    preferred_nodes: list[str]
    input: InputSource
    output: OutputTarget
    config_name: str
    config_is_default: bool
    training_config: Sections
    config_map: dict[str, Any] | None  # the user's ConfigMap, applied alongside on submit
    model_token_secret: str | None = None  # a Secret holding a Hugging Face token, for gated base models
    model_token_key: str = "token"  # its key: "token" (kaitune's annotation) or "HF_TOKEN" (Kaito's presetOptions)
    model_image: str | None = None  # base weights from an OCI image (Kaito's presetOptions.image)
    model_image_pull_secret: str | None = None
    # metrics.json and the loss curve as Argo output artifacts; they need an artifact repository in the cluster.
    ui_artifacts: bool = True
    source_dir: Path
    warnings: list[str] = []

    @property
    def preset(self) -> Preset:
        return PRESETS[self.preset_name]

    def plan_request(self) -> PlanRequest:
        return PlanRequest(
            self.name,
            self.preset_name,
            self.method,
            self.instance_type,
            self.training_config,
            self.config_is_default,
            tuple(self.warnings),
        )


@dataclass
class Parsed:
    """The outcome of validation: the Spec when valid, every problem, and whether the GPU fit can be planned."""

    spec: Spec | None
    problems: list[Problem]
    plan_request: PlanRequest | None = None


def _pydantic_problems(exc: ValidationError) -> list[Problem]:
    out = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        out.append(
            Problem(
                path,
                f"{err['msg'].lower()} (got {err.get('input')!r})",
                "see the Kaito Workspace reference for this field's type",
            )
        )
    return out


def _read_documents(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise BadInput(Problem(str(path), f"cannot be read: {exc.strerror}", "check the file path")) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise BadInput(
            Problem(where, f"is not valid YAML ({getattr(exc, 'problem', exc)})", "fix the YAML syntax at that line")
        ) from None
    bad = [i for i, d in enumerate(docs) if not isinstance(d, dict)]
    if bad:
        raise BadInput(
            Problem(
                f"{path} document {bad[0] + 1}", "is not a mapping", "each YAML document must be a Kubernetes object"
            )
        )
    return docs


def _secret_annotation(annotations: dict[str, str], key: str, problems: list[Problem]) -> str | None:
    value = annotations.get(key)
    if value is not None and not _DNS1123_SUBDOMAIN.match(value):
        problems.append(
            Problem(
                f"metadata.annotations[{key}]", f"{value!r} is not a Secret name", "name a Secret with a 'token' key"
            )
        )
        return None
    return value


def _check_name(doc: WorkspaceDoc, problems: list[Problem]) -> str:
    name = doc.metadata.name if doc.metadata else None
    if not name:
        problems.append(Problem("metadata.name", "is required", "give the workspace a name, e.g. tuning-phi-3"))
        return ""
    if len(name) > 63 or not _DNS1123_LABEL.match(name):
        problems.append(
            Problem(
                "metadata.name",
                f"{name!r} is not a DNS-1123 label",
                "use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
            )
        )
    return name


def _check_resource(doc: WorkspaceDoc, problems: list[Problem], warnings: list[str]) -> None:
    res = doc.resource
    if res is None or res.labelSelector is None:
        problems.append(
            Problem(
                "resource.labelSelector",
                "is required (Kaito admission rule)",
                "add resource.labelSelector.matchLabels, e.g. {app: tuning-phi-3}",
            )
        )
    if res is None:
        return
    if res.count is not None and res.count > 1:
        problems.append(
            Problem(
                "resource.count",
                f"is {res.count}; tuning runs on one node",
                "remove resource.count or set it to 1; use a SKU with more GPUs instead",
            )
        )
    if res.count is not None and res.count < 1:
        problems.append(Problem("resource.count", f"is {res.count}", "remove resource.count or set it to 1"))
    if res.instanceType and find_sku(res.instanceType) is None:
        problems.append(
            Problem(
                "resource.instanceType",
                f"{res.instanceType!r} is not in kaitune's GPU catalog",
                "use a catalog SKU (kaitune skus) or omit instanceType and select "
                "your own GPU nodes with labelSelector",
            )
        )
    if not res.instanceType:
        warnings.append(
            "resource.instanceType is not set: existing nodes matching labelSelector are used, "
            "and the GPU fit cannot be checked before the run"
        )


def _check_preset(tuning: TuningBlock, problems: list[Problem]) -> str:
    name = tuning.preset.name if tuning.preset else None
    if not name:
        problems.append(Problem("tuning.preset.name", "is required", "name a preset, e.g. phi-3-mini-128k-instruct"))
        return ""
    preset = find_preset(name)
    if preset is None:
        known = ", ".join(sorted(PRESETS))
        problems.append(Problem("tuning.preset.name", f"unknown preset {name!r}", f"use one of: {known}"))
        return ""
    return preset.name


@dataclass(frozen=True)
class ModelSource:
    image: str | None = None
    pull_secret: str | None = None
    access_secret: str | None = None


def _check_model_source(tuning: TuningBlock, problems: list[Problem], warnings: list[str]) -> ModelSource:
    """Kaito's ``presetOptions``: a private weights image and its pull secret, or a gated model's HF token."""
    preset = tuning.preset
    options = preset.presetOptions if preset else None
    mode = (preset.accessMode or "public").lower() if preset else "public"
    if mode not in ("public", "private"):
        problems.append(Problem("tuning.preset.accessMode", f"is {mode!r}", "use public or private"))
    image = options.image if options else None
    if mode == "private" and not image:
        problems.append(
            Problem("tuning.preset.presetOptions.image", "is required when accessMode is private",
                    "name the image that holds the model weights")
        )  # fmt: skip
    if image:
        try:
            image_ref.parse(image)
        except ValueError as exc:
            problems.append(Problem("tuning.preset.presetOptions.image", f"{image!r}: {exc}",
                                    "write it as registry/repository:tag"))  # fmt: skip
    secrets = (options.imagePullSecrets if options else None) or []
    if len(secrets) > 1:
        warnings.append(
            f"tuning.preset.presetOptions.imagePullSecrets: only the first secret ({secrets[0]!r}) is used; "
            "merge the logins into one kubernetes.io/dockerconfigjson secret"
        )
    return ModelSource(image, secrets[0] if secrets else None, options.modelAccessSecret if options else None)


def _check_method(tuning: TuningBlock, problems: list[Problem]) -> Literal["lora", "qlora"] | None:
    method = (tuning.method or "").strip().lower()
    if method == "lora":
        return "lora"
    if method == "qlora":
        return "qlora"
    got = f"{tuning.method!r}" if tuning.method else "missing"
    problems.append(Problem("tuning.method", f"is {got}; it must be lora or qlora", "set tuning.method: qlora"))
    return None


def _check_input(
    block: InputBlock | None, allow_local_urls: bool, problems: list[Problem], warnings: list[str]
) -> InputSource | None:
    given = [k for k in ("urls", "image", "volumeSource") if block is not None and getattr(block, k)]
    if len(given) != 1:
        what = "none is set" if not given else f"{' and '.join(given)} are all set"
        problems.append(
            Problem(
                "tuning.input", f"needs exactly one of urls, image, volumeSource; {what}", "keep a single data source"
            )
        )
        return None
    assert block is not None
    if block.urls:
        bad = False
        for i, url in enumerate(block.urls):
            why = url_problem(url, allow_local=allow_local_urls)
            if why:
                bad = True
                if "metadata" in why or "credentials" in why:
                    fix = "point the input at the dataset's own URL"
                elif "scheme" in why or "valid URL" in why or "no host" in why:
                    fix = "use an http:// or https:// URL"
                else:
                    fix = "use a public http(s) URL; for a local test server pass --allow-local-urls"
                problems.append(Problem(f"tuning.input.urls[{i}]", f"{url!r} {why}", fix))
        return None if bad else InputSource(kind="urls", urls=block.urls)
    if block.image:
        try:
            image_ref.parse(block.image)
        except ValueError as exc:
            problems.append(
                Problem("tuning.input.image", f"{block.image!r}: {exc}", "write it as registry/repository:tag")
            )
            return None
        secrets = block.imagePullSecrets or []
        if len(secrets) > 1:
            warnings.append(
                f"tuning.input.imagePullSecrets: only the first secret ({secrets[0]!r}) is used to pull "
                f"{block.image}; merge the logins into one kubernetes.io/dockerconfigjson secret"
            )
        return InputSource(kind="image", image=block.image, pull_secrets=secrets)
    return InputSource(kind="volume", volume=block.volumeSource)


def _check_output(block: OutputBlock | None, problems: list[Problem], warnings: list[str]) -> OutputTarget | None:
    given = [k for k in ("image", "volumeSource") if block is not None and getattr(block, k)]
    if len(given) != 1:
        what = "none is set" if not given else "both are set"
        problems.append(
            Problem(
                "tuning.output",
                f"needs exactly one of image, volumeSource; {what}",
                "keep a single destination for the adapter",
            )
        )
        return None
    assert block is not None
    if block.volumeSource:
        return OutputTarget(kind="volume", volume=block.volumeSource)
    assert block.image is not None
    ok = True
    try:
        ref = image_ref.parse(block.image)
        strict = ref.strict_problem()
        if strict:
            warnings.append(
                f"tuning.output.image {block.image!r}: {strict}; a registry will refuse it "
                "(a placeholder?) - replace it before submitting"
            )
        if ref.digest:
            problems.append(
                Problem(
                    "tuning.output.image", "names a digest; an output can only be a tag", "remove the @sha256:... part"
                )
            )
            ok = False
    except ValueError as exc:
        problems.append(
            Problem(
                "tuning.output.image",
                f"{block.image!r}: {exc}",
                "write it as registry/repository:tag, e.g. myacr.azurecr.io/adapters/phi-3:0.0.1",
            )
        )
        ok = False
    if not block.imagePushSecret:
        problems.append(
            Problem(
                "tuning.output.imagePushSecret",
                "is required with an output image",
                "name a kubernetes.io/dockerconfigjson Secret holding push credentials",
            )
        )
        ok = False
    return OutputTarget(kind="image", image=block.image, push_secret=block.imagePushSecret) if ok else None


def _training_config(
    tuning: TuningBlock, method: str | None, configmaps: dict[str, dict[str, Any]], problems: list[Problem]
) -> tuple[str, bool, Sections, dict[str, Any] | None]:
    if not tuning.config:
        if method is None:
            return "", True, {}, None
        return DEFAULT_CONFIGMAPS[method], True, default_sections(method), None
    name = tuning.config
    cm = configmaps.get(name)
    if cm is None:
        problems.append(
            Problem(
                "tuning.config",
                f"names ConfigMap {name!r}, which is not in this file",
                "add the ConfigMap as another YAML document (---), or remove tuning.config to use Kaito's defaults",
            )
        )
        return name, False, {}, None
    where = f"ConfigMap/{name}.data.training_config.yaml"
    text = (cm.get("data") or {}).get("training_config.yaml")
    if not isinstance(text, str):
        problems.append(
            Problem(
                f"ConfigMap/{name}.data",
                "has no 'training_config.yaml' key",
                "put the training config under data.training_config.yaml",
            )
        )
        return name, False, {}, cm
    sections, found = parse_config_text(text, where)
    problems.extend(found)
    if method is not None and not found:
        problems.extend(quantization_problems(sections, method, where))
    return name, False, sections, cm


def parse_documents(docs: list[dict[str, Any]], source_dir: Path, *, allow_local_urls: bool = False) -> Parsed:
    """Validate parsed YAML documents: the Spec (if valid), every problem, and the plan inputs if they are sound."""
    workspaces = [d for d in docs if d.get("kind") == "Workspace"]
    configmaps = {(d.get("metadata") or {}).get("name", ""): d for d in docs if d.get("kind") == "ConfigMap"}
    if len(workspaces) != 1:
        kinds = [d.get("kind") for d in docs]
        return Parsed(
            None,
            [
                Problem(
                    "kind",
                    f"expected exactly one Workspace, found {len(workspaces)} (kinds: {kinds})",
                    "put one 'kind: Workspace' document in the file",
                )
            ],
        )
    raw = workspaces[0]
    problems: list[Problem] = []
    warnings: list[str] = []
    try:
        doc = WorkspaceDoc.model_validate(raw)
    except ValidationError as exc:
        return Parsed(None, _pydantic_problems(exc))

    if doc.apiVersion not in API_VERSIONS:
        problems.append(
            Problem("apiVersion", f"{doc.apiVersion!r} is not supported", f"use {' or '.join(API_VERSIONS)}")
        )
    name = _check_name(doc, problems)
    _check_resource(doc, problems, warnings)
    if doc.tuning is not None and doc.inference is not None:
        problems.append(
            Problem(
                "tuning",
                "a Workspace has either tuning or inference, not both (Kaito admission rule)",
                "split it into two Workspaces; kaitune deploys the tuned adapter itself",
            )
        )
    if doc.tuning is None:
        fix = (
            "kaitune runs tuning workspaces; serve an inference-only workspace with Kaito"
            if doc.inference is not None
            else "add a tuning block with preset, method, input and output"
        )
        problems.append(Problem("tuning", "is required", fix))
        return Parsed(None, problems)

    tuning = doc.tuning
    preset_name = _check_preset(tuning, problems)
    method = _check_method(tuning, problems)
    source = _check_input(tuning.input, allow_local_urls, problems, warnings)
    annotations = (doc.metadata.annotations if doc.metadata else None) or {}
    token_secret = _secret_annotation(annotations, INPUT_TOKEN_ANNOTATION, problems)
    model_token_secret = _secret_annotation(annotations, MODEL_TOKEN_ANNOTATION, problems)
    model_source = _check_model_source(tuning, problems, warnings)
    model_token_key = "token"
    if model_source.access_secret and not model_token_secret:
        model_token_secret, model_token_key = model_source.access_secret, "HF_TOKEN"
    if source is not None and token_secret:
        if source.kind != "urls":
            problems.append(
                Problem(
                    f"metadata.annotations[{INPUT_TOKEN_ANNOTATION}]",
                    "a dataset token applies to input.urls only",
                    "remove the annotation",
                )
            )
        else:
            source = source.model_copy(update={"token_secret": token_secret})
    target = _check_output(tuning.output, problems, warnings)
    before_config = len(problems)
    config_name, is_default, sections, cm = _training_config(tuning, method, configmaps, problems)
    request = None
    instance_type = doc.resource.instanceType if doc.resource else None
    if preset_name and method and len(problems) == before_config and (not instance_type or find_sku(instance_type)):
        # Enough is sound to check the GPU fit too, so it is reported with the other problems.
        request = PlanRequest(
            name or "workspace", preset_name, method, instance_type, sections, is_default, tuple(warnings)
        )
    if problems:
        return Parsed(None, problems, request)
    assert method is not None and source is not None and target is not None and doc.resource is not None
    selector = doc.resource.labelSelector
    spec = Spec(
        name=name,
        namespace=(doc.metadata.namespace if doc.metadata and doc.metadata.namespace else "default"),
        api_version=doc.apiVersion or "",
        preset_name=preset_name,
        method=method,
        instance_type=doc.resource.instanceType,
        label_selector=(selector.matchLabels or {}) if selector else {},
        preferred_nodes=doc.resource.preferredNodes or [],
        input=source,
        output=target,
        config_name=config_name,
        config_is_default=is_default,
        training_config=sections,
        config_map=cm,
        model_token_secret=model_token_secret,
        model_token_key=model_token_key,
        model_image=model_source.image,
        model_image_pull_secret=model_source.pull_secret,
        ui_artifacts=annotations.get(ARTIFACTS_ANNOTATION, "true").lower() != "false",
        source_dir=source_dir,
        warnings=warnings,
    )
    return Parsed(spec, [], request)


def load_documents(path: Path) -> list[dict[str, Any]]:
    return _read_documents(path)
