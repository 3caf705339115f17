"""provision: get the nodes training runs on, and say what they are.

Local target: report this machine's devices and the memory plan. Kubernetes
target (Karpenter NodeClaims or labelled BYO nodes): not in this version yet,
refused with a clear error rather than pretending.

Outputs: nodes, devices, pod-spec-patch (node placement for the train pod).
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
from pipelines.plan import make_plan
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.target != "local":
        raise BadInput(
            Problem(
                "provision",
                "creating Karpenter NodeClaims or selecting GPU nodes is not available in this kaitune version yet",
                "run locally with 'kaitune run'",
            )
        )
    request = PlanRequest(
        args.workspace,
        args.preset,
        args.method,
        args.instance_type or None,
        json.loads(args.training_config),
        args.config_source == "default",
    )
    plan, problems = make_plan(request, local=True)
    if problems:
        raise BadInput(problems)
    devices = local_devices()
    for device in devices:
        log.info("device %s", device)
    Console(stderr=True, width=120).print(plan_table(plan))
    if not plan.fits:
        raise BadInput(
            Problem(
                "provision",
                f"the plan needs ~{plan.estimate.total_gib:.1f} GiB but this machine has {plan.capacity_gib:.0f} GiB",
                "use a smaller preset or tiny-phi3 locally",
            )
        )
    write_outputs(
        args.outputs, {"nodes": platform.node() or "localhost", "devices": "; ".join(devices), "pod-spec-patch": "{}"}
    )


if __name__ == "__main__":
    run_step("provision", main)
