"""The plan: which model, which GPUs, which dtype, and whether it fits.

``make_plan`` is pure (no cluster, no GPU) so tests and ``kaitune plan`` share it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipelines.errors import BadInput, Problem
from pipelines.gpus import GpuSku, find_sku, skus_by_size
from pipelines.memory import DTYPE_BYTES, MemoryEstimate, estimate, gpus_needed
from pipelines.presets import find_preset
from pipelines.spec import PlanRequest, Spec, load_documents, parse_documents
from pipelines.training_config import KAITUNE_FIXES, TrainingKnobs, knobs

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
        """GPUs the train pod asks for: the whole node. A model that fits one GPU trains data parallel on all
        of them (one process each); a larger one is split by layers across the GPUs it needs."""
        if self.sku is None:
            return 0
        return self.sku.count if self.gpus_needed == 1 else self.gpus_needed

    @property
    def train_processes(self) -> int:
        return self.gpus_requested if self.gpus_needed == 1 and self.gpus_requested > 1 else 1


def _local_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError):
        return 0.0


def cpu_supports_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run 2.4x (AVX512-BF16, measured here) to 5-7x (AMX) faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _compute_dtype(req: PlanRequest, sku: GpuSku | None, local: bool) -> tuple[str, Problem | None]:
    if local:
        return ("bfloat16" if cpu_supports_bf16() else "float32"), None
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


def make_plan(req: PlanRequest, *, local: bool = False) -> tuple[Plan, list[Problem]]:
    preset = find_preset(req.preset)
    if preset is None:
        raise BadInput(
            Problem("tuning.preset.name", f"unknown preset {req.preset!r}", "use a preset from 'kaitune presets'")
        )
    kn = knobs(req.training_config, req.method, preset.context_length)
    targets = kn.target_modules or preset.target_modules
    sku = None if local or not req.instance_type else find_sku(req.instance_type)
    dtype, dtype_problem = _compute_dtype(req, sku, local)
    problems = [dtype_problem] if dtype_problem else []
    notes = [*req.warnings, *(f"kaitune fix: {f}" for f in KAITUNE_FIXES)]

    def build(candidate: GpuSku | None, knobs_: TrainingKnobs) -> MemoryEstimate:
        return estimate(
            preset.shape,
            method=req.method,
            seq_len=knobs_.max_seq_length,
            batch_size=knobs_.batch_size,
            lora_rank=knobs_.lora_rank,
            target_modules=targets,
            compute_dtype=_compute_dtype(req, candidate, local)[0],
            gradient_checkpointing=knobs_.gradient_checkpointing,
            on_gpu=not local,
        )

    def plan(
        target: str, needed: int, est: MemoryEstimate, fits: bool, capacity: float | None, suggestion: str | None = None
    ) -> Plan:
        return Plan(
            workspace=req.workspace,
            preset=preset.name,
            model_id=preset.hf_id,
            method=req.method,
            target=target,
            sku=sku,
            gpus_needed=needed,
            compute_dtype=dtype,
            target_modules=targets,
            knobs=kn,
            estimate=est,
            fits=fits,
            capacity_gib=capacity,
            suggestion=suggestion,
            notes=tuple(notes),
        )

    est = build(sku, kn)
    if local:
        capacity = _local_memory_gib()
        return plan("local-cpu", 0, est, capacity == 0.0 or est.total_gib <= capacity * 0.8, capacity or None), []
    if sku is None:
        return plan("byo-nodes", 1, est, True, None), problems
    needed = gpus_needed(est, sku.memory_gib)
    if needed > sku.count and not kn.gradient_checkpointing and not kn.checkpointing_explicit:
        # Recomputing activations costs ~30% speed; not fitting costs the run. The user did not choose.
        notes.append(f"gradient checkpointing turned on to fit (without it: ~{est.total_gib:.1f} GiB)")
        kn = replace(kn, gradient_checkpointing=True)
        est = build(sku, kn)
        needed = gpus_needed(est, sku.memory_gib)
    fits = 0 < needed <= sku.count
    suggestion = None
    if not fits:
        suggestion = next(
            (
                c.name
                for c in skus_by_size()
                if c.cloud == sku.cloud and 0 < gpus_needed(build(c, kn), c.memory_gib) <= c.count
            ),
            None,
        )
        fix = f"use {suggestion}" if suggestion else "no catalog SKU fits; lower max_length or use a smaller preset"
        if req.method == "lora" and suggestion:
            fix += ", or switch to tuning.method: qlora"
        problems.append(
            Problem(
                "resource.instanceType",
                f"{preset.name} {req.method} needs ~{est.total_gib:.1f} GiB ({needed} x {sku.gpu} "
                f"{sku.memory_gib:g} GiB), but {sku.name} has {sku.count} x {sku.memory_gib:g} GiB",
                fix,
            )
        )
    return plan(sku.name, needed, est, fits, sku.total_memory_gib, suggestion), problems


def load_spec(path: Path, *, allow_local_urls: bool = False) -> Spec:
    """Validate a Workspace file (admission rules only); raise BadInput listing every problem."""
    parsed = parse_documents(load_documents(path), path.resolve().parent, allow_local_urls=allow_local_urls)
    if parsed.spec is None:
        raise BadInput(parsed.problems)
    return parsed.spec


def load_and_plan(path: Path, *, allow_local_urls: bool = False, local: bool = False) -> tuple[Spec, Plan]:
    """Validate a Workspace file and plan it; raise BadInput listing every problem, the GPU fit included."""
    parsed = parse_documents(load_documents(path), path.resolve().parent, allow_local_urls=allow_local_urls)
    problems = list(parsed.problems)
    plan = None
    if parsed.plan_request is not None:
        plan, fit_problems = make_plan(parsed.plan_request, local=local)
        problems.extend(fit_problems)
    if problems or parsed.spec is None or plan is None:
        raise BadInput(problems)
    return parsed.spec, plan
