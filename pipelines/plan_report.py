"""The plan as a rich table, shared by ``kaitune plan`` and the provision step's log."""

from __future__ import annotations

from rich.table import Table

from pipelines.plan import Plan


def plan_table(plan: Plan) -> Table:
    est = plan.estimate
    table = Table(title=f"kaitune plan: {plan.workspace}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    sku = plan.sku
    where = (
        f"{sku.name}: {sku.count} x {sku.gpu} {sku.memory_gib:g} GiB (compute {sku.compute_capability})"
        if sku
        else plan.target
    )
    rows = [
        ("model", f"{plan.preset} ({plan.model_id})"),
        ("method", plan.method),
        ("target", where),
        ("GPUs", f"{plan.gpus_needed} of {sku.count}" if sku else ("-" if plan.target == "local-cpu" else "?")),
        ("compute dtype", plan.compute_dtype),
        ("LoRA", f"r={plan.knobs.lora_rank} on {', '.join(plan.target_modules)} ({est.trainable_params:,} trainable)"),
        (
            "sequence",
            f"max {plan.knobs.max_seq_length} tokens, batch {plan.knobs.batch_size}, gradient "
            f"checkpointing {'on' if plan.knobs.gradient_checkpointing else 'off'}",
        ),
        (
            "memory",
            f"~{est.total_gib:.1f} GiB = weights {est.weights_gib:.1f} + adapters {est.adapters_gib:.2f} "
            f"+ activations {est.activations_gib:.2f} + logits {est.logits_gib:.2f} "
            f"+ overhead {est.overhead_gib:.2f}",
        ),
        (
            "fits",
            ("yes" if plan.fits else "[red]no[/red]")
            + (f" ({plan.capacity_gib:.0f} GiB available)" if plan.capacity_gib else ""),
        ),
    ]
    if plan.suggestion:
        rows.append(("suggestion", plan.suggestion))
    for what, value in rows:
        table.add_row(what, value)
    for note in plan.notes:
        table.add_row("note", note)
    return table
