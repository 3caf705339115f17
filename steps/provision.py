"""provision: get the nodes training runs on, and say what they are.

Local target: report this machine's devices and the memory plan. Kubernetes
target: with ``resource.instanceType``, a Karpenter NodeClaim (created or reused)
and a wait until its Node is Ready with GPUs; without it, the best ready GPU node
among those ``resource.labelSelector`` picks (BYO), its memory checked against the plan.

Outputs: nodes, devices, node-selector (the labels train and serve pods select),
pod-spec-patch (node placement for the train pod).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
from pathlib import Path

from rich.console import Console

from pipelines.errors import BadInput, Problem
from pipelines.plan import Plan, make_plan
from pipelines.plan_report import plan_table
from pipelines.spec import PlanRequest
from steps.contract import run_step, write_outputs

log = logging.getLogger("kaitune")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m steps.provision", description=__doc__)
    p.add_argument("--target", choices=["local", "kubernetes"], required=True)
    p.add_argument("--workspace", required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--method", choices=["lora", "qlora"], required=True)
    p.add_argument("--instance-type", default="")
    p.add_argument("--training-config", default="{}")
    p.add_argument("--config-source", choices=["default", "configmap"], default="default")
    p.add_argument("--namespace", default="default")
    p.add_argument("--label-selector", default="{}", help="resource.labelSelector.matchLabels as JSON")
    p.add_argument("--preferred-nodes", default="[]", help="resource.preferredNodes as JSON")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the GPU node")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between readiness checks")
    p.add_argument("--outputs", type=Path, required=True)
    return p.parse_args(argv)


def local_devices() -> list[str]:
    devices = [f"cpu: {os.cpu_count()} cores, {platform.machine()}"]
    try:
        import torch
    except ImportError:
        return devices
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(
            f"cuda:{i}: {props.name}, {props.total_memory / 1024**3:.0f} GiB, compute {props.major}.{props.minor}"
        )
    return devices


def kubernetes_nodes(args: argparse.Namespace, plan: Plan) -> dict[str, str]:
    from pipelines.presets import PRESETS
    from steps import gpu_nodes, kube

    apis = kube.connect()
    match_labels: dict[str, str] = json.loads(args.label_selector)
    if plan.sku is not None:
        labels = gpu_nodes.node_labels(args.workspace, args.namespace, match_labels)
        manifest = gpu_nodes.nodeclaim_manifest(
            args.workspace,
            args.namespace,
            plan.sku,
            match_labels,
            gpu_nodes.storage_gib(PRESETS[plan.preset].shape.params),
        )
        claim = gpu_nodes.ensure_claim(apis, manifest)
        node = gpu_nodes.wait_for_claim(apis, claim["metadata"]["name"], gpu_nodes.Wait(args.timeout, args.poll))
        devices = f"{plan.sku.count} x {plan.sku.gpu} ({plan.sku.name})"
    else:
        choice = gpu_nodes.byo_nodes(
            apis, match_labels, json.loads(args.preferred_nodes), plan.estimate.total_gib, plan.gpus_needed
        )
        node, labels = choice.name, {"kubernetes.io/hostname": choice.name}
        memory = f" {choice.gpu_memory_gib:.0f} GiB" if choice.gpu_memory_gib else ""
        devices = f"{choice.gpus} x {choice.product}{memory} (BYO node)"
    log.info("training runs on %s: %s", node, devices)
    patch = {"nodeSelector": labels}
    return {"nodes": node, "devices": devices, "node-selector": json.dumps(labels, sort_keys=True),
            "pod-spec-patch": json.dumps(patch, sort_keys=True)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    request = PlanRequest(
        args.workspace,
        args.preset,
        args.method,
        args.instance_type or None,
        json.loads(args.training_config),
        args.config_source == "default",
    )
    plan, problems = make_plan(request, local=args.target == "local")
    if problems:
        raise BadInput(problems)
    Console(stderr=True, width=120).print(plan_table(plan))
    if args.target == "kubernetes":
        write_outputs(args.outputs, kubernetes_nodes(args, plan))
        return
    devices = local_devices()
    for device in devices:
        log.info("device %s", device)
    if not plan.fits:
        raise BadInput(
            Problem(
                "provision",
                f"the plan needs ~{plan.estimate.total_gib:.1f} GiB but this machine has {plan.capacity_gib:.0f} GiB",
                "use a smaller preset or tiny-phi3 locally",
            )
        )
    node = platform.node() or "localhost"
    write_outputs(
        args.outputs,
        {"nodes": node, "devices": "; ".join(devices), "node-selector": "{}", "pod-spec-patch": "{}"},
    )


if __name__ == "__main__":
    run_step("provision", main)
