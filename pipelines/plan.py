"""The plan: which model, which GPUs, which dtype, and whether it fits.

``make_plan`` is pure (no cluster, no GPU) so tests and ``kaitune plan`` share it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.errors import BadInput, Problem
from pipelines.gpus import GpuSku, find_sku, skus_by_size
from pipelines.memory import DTYPE_BYTES, MemoryEstimate, estimate, gpus_needed
from pipelines.presets import find_preset
from pipelines.spec import Spec, load_documents, parse_documents
from pipelines.training_config import KAITUNE_FIXES, Sections, TrainingKnobs, knobs

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


@dataclass(frozen=True)
class Plan:
    workspace: str
    preset: str
    model_id: str
    method: str
    target: str  # the SKU name, "byo-nodes", or "local-cpu"
    sku: GpuSku | None
    gpus_needed: int
    compute_dtype: str
    target_modules: tuple[str, ...]
    knobs: TrainingKnobs
    estimate: MemoryEstimate
    fits: bool
    capacity_gib: float | None
    suggestion: str | None
    notes: tuple[str, ...] = field(default=())

    @property
    def gpus_requested(self) -> int:
        """GPUs the train pod asks for: the whole node when the plan needs more than one."""
        return self.gpus_needed if self.sku else 0


def _local_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError):
        return 0.0


@dataclass(frozen=True)
class PlanRequest:
    """What the plan depends on: a Spec's subset, also rebuilt by the provision step from its flags."""

    workspace: str
    preset: str
    method: str
    instance_type: str | None
    training_config: Sections
    config_is_default: bool
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, spec: Spec) -> PlanRequest:
        return cls(
            spec.name,
            spec.preset_name,
            spec.method,
            spec.instance_type,
            spec.training_config,
            spec.config_is_default,
            tuple(spec.warnings),
        )


def _compute_dtype(req: PlanRequest, sku: GpuSku | None, local: bool) -> tuple[str, Problem | None]:
    if local:
        return "float32", None
    auto = "bfloat16" if sku is None or sku.supports_bf16 else "float16"
    if req.config_is_default:
        # Kaito's default says bfloat16 everywhere, which V100/T4 cannot run.
        return auto, None
    asked = req.training_config.get("ModelConfig", {}).get("torch_dtype")
    if not asked or asked == "auto":
        return auto, None
    dtype = _DTYPE_ALIASES.get(str(asked), str(asked))
    if dtype not in DTYPE_BYTES:
        return auto, Problem(
            "ModelConfig.torch_dtype", f"{asked!r} is not a training dtype", "use bfloat16, float16 or float32"
        )
    if dtype == "bfloat16" and sku is not None and not sku.supports_bf16:
        return auto, Problem(
            "ModelConfig.torch_dtype",
            f"bfloat16 needs compute capability 8.0; {sku.name} has {sku.gpu} ({sku.compute_capability})",
            "use float16 or remove torch_dtype",
        )
    return dtype, None


def _suggest(build: Callable[[GpuSku], tuple[MemoryEstimate, str]], cloud: str) -> str | None:
    """The smallest catalog SKU of the same cloud on which the plan fits."""
    for sku in skus_by_size():
        if sku.cloud == cloud and 0 < gpus_needed(build(sku)[0], sku.memory_gib) <= sku.count:
            return sku.name
    return None


def make_plan(req: PlanRequest, *, local: bool = False) -> tuple[Plan, list[Problem]]:
    preset = find_preset(req.preset)
    if preset is None:
        raise BadInput(
            Problem("tuning.preset.name", f"unknown preset {req.preset!r}", "use a preset from 'kaitune presets'")
        )
    kn = knobs(req.training_config, req.method, preset.context_length)
    targets = kn.target_modules or preset.target_modules
    sku = None if local or not req.instance_type else find_sku(req.instance_type)
    problems: list[Problem] = []

    def build(candidate: GpuSku | None) -> tuple[MemoryEstimate, str]:
        dtype, problem = _compute_dtype(req, candidate, local)
        if problem and candidate is sku:
            problems.append(problem)
        est = estimate(
            preset.shape,
            method=req.method,
            seq_len=kn.max_seq_length,
            batch_size=kn.batch_size,
            lora_rank=kn.lora_rank,
            target_modules=targets,
            compute_dtype=dtype,
            gradient_checkpointing=kn.gradient_checkpointing,
            on_gpu=not local,
        )
        return est, dtype

    est, dtype = build(sku)
    notes = [*req.warnings, *(f"kaitune fix: {f}" for f in KAITUNE_FIXES)]
    if local:
        capacity = _local_memory_gib()
        fits = capacity == 0.0 or est.total_gib <= capacity * 0.8
        plan = Plan(
            req.workspace,
            preset.name,
            preset.hf_id,
            req.method,
            "local-cpu",
            None,
            0,
            dtype,
            targets,
            kn,
            est,
            fits,
            capacity or None,
            None,
            tuple(notes),
        )
        return plan, problems
    if sku is None:
        plan = Plan(
            req.workspace,
            preset.name,
            preset.hf_id,
            req.method,
            "byo-nodes",
            None,
            1,
            dtype,
            targets,
            kn,
            est,
            True,
            None,
            None,
            tuple(notes),
        )
        return plan, problems
    needed = gpus_needed(est, sku.memory_gib)
    fits = 0 < needed <= sku.count
    suggestion = None if fits else _suggest(build, sku.cloud)
    if not fits:
        fix = f"use {suggestion}" if suggestion else "no catalog SKU fits; lower max_length or use a smaller preset"
        if req.method == "lora" and suggestion:
            fix += ", or switch to tuning.method: qlora"
        problems.append(
            Problem(
                "resource.instanceType",
                f"{preset.name} {req.method} needs ~{est.total_gib:.1f} GiB "
                f"({needed} x {sku.gpu} {sku.memory_gib:g} GiB), but {sku.name} has "
                f"{sku.count} x {sku.memory_gib:g} GiB",
                fix,
            )
        )
    plan = Plan(
        req.workspace,
        preset.name,
        preset.hf_id,
        req.method,
        sku.name,
        sku,
        needed,
        dtype,
        targets,
        kn,
        est,
        fits,
        sku.total_memory_gib,
        suggestion,
        tuple(notes),
    )
    return plan, problems


def load_spec(path: Path, *, allow_local_urls: bool = False) -> Spec:
    spec, problems = parse_documents(load_documents(path), path.resolve().parent, allow_local_urls=allow_local_urls)
    if problems or spec is None:
        raise BadInput(problems)
    return spec


def load_and_plan(path: Path, *, allow_local_urls: bool = False, local: bool = False) -> tuple[Spec, Plan]:
    """Validate a Workspace file and plan it; raise BadInput listing every problem."""
    spec = load_spec(path, allow_local_urls=allow_local_urls)
    plan, problems = make_plan(PlanRequest.from_spec(spec), local=local)
    if problems:
        raise BadInput(problems)
    return spec, plan
