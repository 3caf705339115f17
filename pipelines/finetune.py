"""The pipeline, defined once with Hera: provision ∥ fetch-data → train → push → deploy, exit handler cleanup.

Every spec value is a workflow parameter; each step is a container running
``python -m steps.<name>`` with explicit flags; data moves through the ``work``
volume and small values through output parameter files. ``kaitune render``
writes this, ``kaitune submit`` sends it, and ``kaitune run`` executes the very
same dict locally.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from hera.workflows import (
    DAG,
    Artifact,
    Container,
    Gauge,
    Label,
    NoneArchiveStrategy,
    Parameter,
    RetryStrategy,
    Task,
    Workflow,
    WorkflowTemplate,
)
from hera.workflows import models as m

from pipelines import __version__
from pipelines.plan import Plan
from pipelines.spec import Spec

TEMPLATE_NAME = "kaitune-finetune"
WORK_MOUNT = "/kaitune/work"
INPUT_MOUNT = "/kaitune/input"
OUTPUT_MOUNT = "/kaitune/output"
PUSH_SECRET_MOUNT = "/kaitune/secrets/push"
INPUT_TOKEN_MOUNT = "/kaitune/secrets/input"
INPUT_PULL_MOUNT = "/kaitune/secrets/input-pull"
MODEL_TOKEN_MOUNT = "/kaitune/secrets/model"
MODEL_PULL_MOUNT = "/kaitune/secrets/model-pull"
OUTPUTS_DIR = "/tmp/kaitune/outputs"
EXIT_TRANSIENT = 75
GPU_TOLERATIONS = [
    m.Toleration(key="sku", operator="Equal", value="gpu", effect="NoSchedule"),  # Kaito's GPU node taint
    m.Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),
]


@dataclass(frozen=True)
class Images:
    step: str = f"ghcr.io/kaitune/step:{__version__}"
    train: str = f"ghcr.io/kaitune/train:{__version__}"
    serve: str = f"ghcr.io/kaitune/serve:{__version__}"


def wf(name: str) -> str:
    return f"{{{{workflow.parameters.{name}}}}}"


def task_output(task: str, name: str) -> str:
    return f"{{{{tasks.{task}.outputs.parameters.{name}}}}}"


def workflow_parameters(spec: Spec, plan: Plan) -> dict[str, str]:
    """Every spec value, as the strings Argo parameters are."""
    preset = spec.preset
    return {
        "workspace": spec.name,
        "namespace": spec.namespace,
        "preset": preset.name,
        "model": preset.name if preset.local_only else preset.hf_id,
        "method": spec.method,
        "model-image": spec.model_image or "",
        "model-image-pull-secret": spec.model_image_pull_secret or "",
        "instance-type": spec.instance_type or "",
        "label-selector": json.dumps(spec.label_selector, sort_keys=True),
        "preferred-nodes": json.dumps(spec.preferred_nodes),
        "training-config": json.dumps(spec.training_config, sort_keys=True),
        "config-source": "default" if spec.config_is_default else "configmap",
        "input-kind": spec.input.kind,
        "input-urls": json.dumps(spec.input.urls),
        "input-image": spec.input.image or "",
        "input-pull-secret": spec.input.pull_secrets[0] if spec.input.pull_secrets else "",
        "output-image": spec.output.image or "",
        "output-push-secret": spec.output.push_secret or "",
        "adapter-tag": _adapter_tag(spec),
        "compute-dtype": plan.compute_dtype,
        "target-modules": ",".join(plan.target_modules),
        "max-seq-length": str(plan.knobs.max_seq_length),
        "gradient-checkpointing": str(plan.knobs.gradient_checkpointing).lower(),
        "train-processes": str(plan.train_processes),
        "allow-local-urls": "false",
        "target": "kubernetes",
    }


def _adapter_tag(spec: Spec) -> str:
    if spec.output.image and ":" in spec.output.image.rsplit("/", 1)[-1]:
        return spec.output.image.rsplit(":", 1)[1]
    return "latest"


def _retry() -> RetryStrategy:
    # Only the step contract's "transient" exit code is retried; bad input (2) and bugs are not.
    return RetryStrategy(
        limit=3,
        retry_policy="Always",
        expression=f"asInt(lastRetry.exitCode) == {EXIT_TRANSIENT}",
        backoff=m.Backoff(duration="30s", factor=m.IntOrString(2), max_duration="20m"),
    )


# Step outputs the Argo UI shows on the workflow itself (global output parameters).
GLOBAL_OUTPUTS = {
    ("train", "eval-loss"): "eval-loss",
    ("push", "digest"): "adapter-digest",
    ("push", "image-ref"): "adapter-image",
    ("deploy", "endpoint"): "endpoint",
}


def _outputs(step: str, *names: str) -> list[Parameter]:
    return [
        Parameter(name=n, value_from=m.ValueFrom(path=f"{OUTPUTS_DIR}/{n}"), global_name=GLOBAL_OUTPUTS.get((step, n)))
        for n in names
    ]


def _metrics(step: str, *gauges: tuple[str, str, str]) -> list[Gauge]:
    """Prometheus metrics Argo emits when the step ends: its duration, plus any gauges from its outputs."""
    labels = [Label(key="step", value=step), Label(key="workspace", value=wf("workspace"))]
    metrics = [Gauge(name="kaitune_step_duration_seconds", help="Duration of a kaitune pipeline step",
                     labels=labels, realtime=False, value="{{duration}}")]  # fmt: skip
    metrics += [
        Gauge(name=name, help=help_, labels=labels, realtime=False, value=value) for name, help_, value in gauges
    ]
    return metrics


def _mount(name: str, path: str) -> m.VolumeMount:
    return m.VolumeMount(name=name, mount_path=path)


def _ui_artifacts() -> list[Artifact]:
    """metrics.json and the loss curve as plain files (no tar), so the Argo UI shows them in place."""
    return [
        Artifact(name="metrics", path=f"{WORK_MOUNT}/adapter/metrics.json", archive=NoneArchiveStrategy()),
        Artifact(name="loss-curve", path=f"{WORK_MOUNT}/adapter/loss_curve.png", archive=NoneArchiveStrategy()),
    ]


def _step(name: str, image: str, module: str, args: list[str], **kwargs: Any) -> Container:
    kwargs.setdefault("metrics", _metrics(name))
    return Container(
        name=name,
        image=image,
        command=["python", "-m", f"steps.{module}"],
        args=args,
        retry_strategy=_retry(),
        **kwargs,
    )


def work_volume_gib(spec: Spec) -> int:
    """The base weights as downloaded (16-bit), with headroom for data, the adapter and checkpoints."""
    download_gib = 2 * spec.preset.shape.params / 1024**3
    return max(20, math.ceil(download_gib * 1.5 + 10))


def _description(spec: Spec, plan: Plan) -> str:
    source = {"urls": ", ".join(spec.input.urls), "image": spec.input.image or "", "volume": "a volume"}[
        spec.input.kind
    ]
    dest = spec.output.image if spec.output.kind == "image" else "an OCI layout on a volume"
    return (
        f"**{plan.preset}** ({plan.model_id}) tuned with **{spec.method}** on "
        f"`{plan.target}` ({plan.gpus_needed} GPU, {plan.compute_dtype}).\n\n"
        f"Data: {source}\n\nAdapter image: `{dest}`"
    )


def build(
    spec: Spec, plan: Plan, *, kind: Literal["Workflow", "WorkflowTemplate"] = "Workflow", images: Images | None = None
) -> Workflow:
    images = images or Images()
    params = workflow_parameters(spec, plan)
    labels = {
        "app.kubernetes.io/name": "kaitune",
        "app.kubernetes.io/component": "finetune",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/version": __version__,
        "kaitune.io/workspace": spec.name,
    }
    annotations = {
        "workflows.argoproj.io/title": f"kaitune: fine-tune {plan.preset} ({spec.method}) for {spec.name}",
        "workflows.argoproj.io/description": _description(spec, plan),
    }
    volumes: list[m.Volume] = []
    if spec.input.kind == "volume":
        volumes.append(m.Volume(name="input", **_volume_source(spec.input.volume)))
    if spec.input.token_secret:
        volumes.append(_token_volume("input-token", spec.input.token_secret))
    if spec.input.kind == "image" and spec.input.pull_secrets:
        volumes.append(_docker_config_volume("input-pull-secret", wf("input-pull-secret")))
    if spec.model_token_secret:
        volumes.append(_token_volume("model-token", spec.model_token_secret, spec.model_token_key))
    if spec.model_image and spec.model_image_pull_secret:
        volumes.append(_docker_config_volume("model-pull-secret", wf("model-image-pull-secret")))
    if spec.output.kind == "volume":
        volumes.append(m.Volume(name="output", **_volume_source(spec.output.volume)))
    else:
        volumes.append(_docker_config_volume("push-secret", wf("output-push-secret")))
    cls = WorkflowTemplate if kind == "WorkflowTemplate" else Workflow
    is_template = kind == "WorkflowTemplate"
    work_claim = m.PersistentVolumeClaim(
        metadata=m.ObjectMeta(name="work"),
        spec=m.PersistentVolumeClaimSpec(
            access_modes=["ReadWriteOnce"],
            resources=m.VolumeResourceRequirements(requests={"storage": m.Quantity(f"{work_volume_gib(spec)}Gi")}),
        ),
    )
    with cls(
        name=TEMPLATE_NAME if is_template else None,
        generate_name=None if is_template else f"{spec.name}-",
        namespace=spec.namespace,
        entrypoint="main",
        on_exit="cleanup",
        labels=labels,
        annotations=annotations,
        arguments=[Parameter(name=k, value=v) for k, v in params.items()],
        volumes=volumes,
        volume_claim_templates=[work_claim],
        pod_metadata=m.Metadata(labels={"kaitune.io/workspace": spec.name}),
        service_account_name="kaitune",
    ) as workflow:
        work = _mount("work", WORK_MOUNT)
        provision = _step(
            "provision", images.step, "provision",
            flags(target=wf("target"), workspace=wf("workspace"), preset=wf("preset"), method=wf("method"),
                  instance_type=wf("instance-type"), training_config=wf("training-config"),
                  config_source=wf("config-source"), namespace="{{workflow.namespace}}",
                  label_selector=wf("label-selector"), preferred_nodes=wf("preferred-nodes"), outputs=OUTPUTS_DIR),
            outputs=_outputs("provision", "nodes", "devices", "node-selector", "pod-spec-patch"),
        )  # fmt: skip
        fetch_mounts = [work]
        if spec.input.kind == "volume":
            fetch_mounts.append(_mount("input", INPUT_MOUNT))
        token_file = ""
        if spec.input.token_secret:
            fetch_mounts.append(m.VolumeMount(name="input-token", mount_path=INPUT_TOKEN_MOUNT, read_only=True))
            token_file = f"{INPUT_TOKEN_MOUNT}/token"
        fetch_env = []
        if spec.input.kind == "image" and spec.input.pull_secrets:
            fetch_mounts.append(m.VolumeMount(name="input-pull-secret", mount_path=INPUT_PULL_MOUNT, read_only=True))
            fetch_env = [m.EnvVar(name="DOCKER_CONFIG", value=INPUT_PULL_MOUNT)]
        fetch = _step(
            "fetch-data", images.step, "fetch_data",
            flags(input_kind=wf("input-kind"), input_urls=wf("input-urls"), input_image=wf("input-image"),
                  input_path=INPUT_MOUNT, training_config=wf("training-config"), model=wf("model"),
                  max_seq_length=wf("max-seq-length"), token_file=token_file,
                  allow_local_urls=wf("allow-local-urls"), work=WORK_MOUNT, outputs=OUTPUTS_DIR),
            volume_mounts=fetch_mounts,
            env=fetch_env,
            outputs=_outputs("fetch-data", "rows", "train-rows", "eval-rows", "bad-rows", "dataset-digest", "token-p50",
                             "token-p95", "token-p99", "rows-over-max-length"),
        )  # fmt: skip
        train_mounts, train_env = [work], []
        if spec.output.kind == "image":  # to find an adapter already pushed for the same inputs
            train_mounts.append(m.VolumeMount(name="push-secret", mount_path=PUSH_SECRET_MOUNT, read_only=True))
        if spec.model_token_secret:
            train_mounts.append(m.VolumeMount(name="model-token", mount_path=MODEL_TOKEN_MOUNT, read_only=True))
        if spec.model_image and spec.model_image_pull_secret:
            train_mounts.append(m.VolumeMount(name="model-pull-secret", mount_path=MODEL_PULL_MOUNT, read_only=True))
            train_env.append(m.EnvVar(name="DOCKER_CONFIG", value=MODEL_PULL_MOUNT))
        train = _step(
            "train", images.train, "train",
            flags(model=wf("model"), method=wf("method"), training_config=wf("training-config"),
                  target_modules=wf("target-modules"), compute_dtype=wf("compute-dtype"),
                  max_seq_length=wf("max-seq-length"), gradient_checkpointing=wf("gradient-checkpointing"),
                  token_file=f"{MODEL_TOKEN_MOUNT}/token" if spec.model_token_secret else "",
                  processes=wf("train-processes"), model_image=wf("model-image"),
                  reuse_from=wf("output-image") if spec.output.kind == "image" else "",
                  reuse_docker_config=PUSH_SECRET_MOUNT if spec.output.kind == "image" else "",
                  work=WORK_MOUNT, outputs=OUTPUTS_DIR),
            inputs=[Parameter(name="pod-spec-patch")],
            pod_spec_patch="{{inputs.parameters.pod-spec-patch}}",
            volume_mounts=train_mounts,
            env=train_env,
            tolerations=GPU_TOLERATIONS,
            resources=m.ResourceRequirements(limits={"nvidia.com/gpu": m.Quantity(str(max(plan.gpus_requested, 1)))}),
            outputs=[*_outputs("train", "train-loss", "eval-loss", "eval-loss-before", "tokens", "tokens-per-second",
                               "adapter-dir"),
                     *(_ui_artifacts() if spec.ui_artifacts else [])],
            metrics=_metrics("train", ("kaitune_tokens_trained", "Tokens the adapter was trained on",
                                       "{{outputs.parameters.tokens}}"),
                             ("kaitune_eval_loss", "Eval loss after training", "{{outputs.parameters.eval-loss}}")),
        )  # fmt: skip
        push_flags = flags(
            adapter_dir=f"{WORK_MOUNT}/adapter", model_name=wf("preset"), tag=wf("adapter-tag"), outputs=OUTPUTS_DIR
        )
        if spec.output.kind == "volume":
            push_flags += flags(layout=OUTPUT_MOUNT)
            push_mounts = [work, _mount("output", OUTPUT_MOUNT)]
            push_env = []
        else:
            push_flags += flags(image=wf("output-image"))
            push_mounts = [work, m.VolumeMount(name="push-secret", mount_path=PUSH_SECRET_MOUNT, read_only=True)]
            push_env = [m.EnvVar(name="DOCKER_CONFIG", value=PUSH_SECRET_MOUNT)]
        push = _step("push", images.step, "push", push_flags, volume_mounts=push_mounts, env=push_env,
                     outputs=_outputs("push", "digest", "image-ref", "tag"))  # fmt: skip
        deploy = _step(
            "deploy", images.step, "deploy",
            flags(target=wf("target"), workspace=wf("workspace"), base_model=wf("model"),
                  image_ref="{{inputs.parameters.image-ref}}", work=WORK_MOUNT, outputs=OUTPUTS_DIR,
                  namespace="{{workflow.namespace}}", node_selector="{{inputs.parameters.node-selector}}",
                  gpus=str(max(plan.gpus_requested, 1)), serve_image=images.serve, step_image=images.step,
                  push_secret=wf("output-push-secret"), model_token_secret=spec.model_token_secret or "",
                  model_token_key=spec.model_token_key),
            inputs=[Parameter(name="image-ref"), Parameter(name="node-selector")],
            # The login that pushed the adapter pulls it back (the server's init container does the same).
            volume_mounts=[work, *push_mounts[1:]] if spec.output.kind == "image" else [work],
            env=push_env,
            outputs=_outputs("deploy", "endpoint", "server-pid", "chat-reply", "curl"),
        )  # fmt: skip
        _step("cleanup", images.step, "cleanup",
              flags(target=wf("target"), workspace=wf("workspace"), namespace="{{workflow.namespace}}",
                    workflow_status="{{workflow.status}}"))  # fmt: skip

        with DAG(name="main"):
            Task(name="provision", template=provision)
            Task(name="fetch-data", template=fetch)
            # provision and fetch-data run in parallel: data downloads while the GPU node boots.
            Task(
                name="train",
                template=train,
                depends="provision && fetch-data",
                arguments={"pod-spec-patch": task_output("provision", "pod-spec-patch")},
            )
            Task(name="push", template=push, depends="train")
            Task(
                name="deploy",
                template=deploy,
                depends="push",
                arguments={
                    "image-ref": task_output("push", "image-ref"),
                    "node-selector": task_output("provision", "node-selector"),
                },
            )
    return workflow


def _docker_config_volume(name: str, secret: str) -> m.Volume:
    """A kubernetes.io/dockerconfigjson secret as ``config.json``, the file $DOCKER_CONFIG names."""
    return m.Volume(
        name=name,
        secret=m.SecretVolumeSource(
            secret_name=secret, items=[m.KeyToPath(key=".dockerconfigjson", path="config.json")]
        ),
    )


def _token_volume(name: str, secret: str, key: str = "token") -> m.Volume:
    """A Secret's token key as the file ``token``: credentials travel as mounted files, never flags or env values."""
    return m.Volume(
        name=name, secret=m.SecretVolumeSource(secret_name=secret, items=[m.KeyToPath(key=key, path="token")])
    )


def flags(**values: str) -> list[str]:
    """``--name value`` pairs, in the order given (underscores become dashes)."""
    out: list[str] = []
    for name, value in values.items():
        out += [f"--{name.replace('_', '-')}", value]
    return out


def _volume_source(source: dict[str, Any] | None) -> dict[str, Any]:
    """A Kubernetes VolumeSource (camelCase, as in the Workspace) as Hera's Volume fields."""
    assert source, "validated specs always carry a volume source"
    out = {}
    for key, value in source.items():
        field = "".join("_" + c.lower() if c.isupper() else c for c in key)
        out[field] = value
    return out


def render(
    spec: Spec, plan: Plan, *, kind: Literal["Workflow", "WorkflowTemplate"] = "Workflow", images: Images | None = None
) -> dict[str, Any]:
    doc: dict[str, Any] = build(spec, plan, kind=kind, images=images).to_dict()
    return doc
