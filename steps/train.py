"""train: a LoRA or QLoRA adapter on the base model, written to the work volume.

Outputs: train-loss, eval-loss, eval-loss-before, tokens, tokens-per-second, adapter-dir.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from dataclasses import fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.errors import BadInput, Problem
from steps import allocator, distributed, loss_curve, packing
from steps.chat_tokens import Encoded, encode
from steps.contract import Progress, atomic_dir, run_step, write_json_atomic, write_outputs
from steps.http_fetch import read_token
from steps.lora_training import LoopConfig, LoopResult, schedule, train_loop
from steps.oci import options

log = logging.getLogger("kaitune")
# trl-style keys users put in TrainingArguments; the plan reads them, TrainingArguments does not know them.
_NOT_TRAINING_ARGUMENTS = {"max_length", "max_seq_length", "gradient_checkpointing", "output_dir", "packing"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m steps.train", description=__doc__)
    p.add_argument("--model", required=True, help="preset name, Hugging Face id, or a local directory")
    p.add_argument("--method", choices=["lora", "qlora"], required=True)
    p.add_argument("--training-config", default="{}", help="Kaito training_config sections as JSON")
    p.add_argument("--target-modules", required=True, help="comma-separated LoRA target modules")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"], required=True)
    p.add_argument("--max-seq-length", type=int, required=True)
    p.add_argument("--gradient-checkpointing", default="false")
    p.add_argument("--processes", default="1", help="data-parallel processes: a number, or auto (one per GPU)")
    p.add_argument("--token-file", default="", help="mounted secret file with a Hugging Face token (gated models)")
    p.add_argument("--model-image", default="", help="OCI image with the base weights (Kaito's presetOptions.image)")
    p.add_argument("--reuse-from", default="", help="the push target: reuse its adapter if its lineage matches")
    p.add_argument("--reuse-docker-config", type=lambda v: Path(v) if v else None, default=None,
                   help="the push target's login (its mounted Docker config)")  # fmt: skip
    p.add_argument("--checkpoint-minutes", type=float, default=10.0, help="also checkpoint this often")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--outputs", type=Path, required=True)
    options.add_arguments(p)
    return p.parse_args(argv)


def reject_unknown_fields(
    section: str, given: dict[str, Any], cls: Any, exclude: frozenset[str] | set[str] = frozenset()
) -> None:
    """A training_config key the library's dataclass does not have is bad input, named by its path."""
    known = {f.name for f in fields(cls)} - set(exclude)
    unknown = sorted(set(given) - known)
    if unknown:
        raise BadInput(
            Problem(
                f"training_config.{section}.{unknown[0]}",
                f"is not a {cls.__name__} field",
                f"see transformers.{cls.__name__} for the accepted arguments",
            )
        )


def check_collator(sections: dict[str, Any]) -> None:
    """Kaito's DataCollator section names DataCollatorForLanguageModeling's fields; kaitune collates itself.

    Its fields are checked, and what cannot apply is said out loud rather than silently dropped.
    """
    from transformers import DataCollatorForLanguageModeling

    section = sections.get("DataCollator", {})
    reject_unknown_fields("DataCollator", section, DataCollatorForLanguageModeling, exclude={"tokenizer"})
    if section.get("mlm"):
        log.warning(
            "DataCollator.mlm is true (Kaito's default); a causal LM is never trained with masked LM, so it is ignored"
        )
    ignored = sorted(set(section) - {"mlm"})
    if ignored:
        log.warning("DataCollator %s do not apply: kaitune packs examples and masks prompts itself", ignored)


def loop_config(
    sections: dict[str, Any],
    compute_dtype: str,
    work: Path,
    *,
    max_seq_length: int = 2048,
    checkpoint_dir: Path | None = None,
    checkpoint_minutes: float = 10.0,
) -> LoopConfig:
    from transformers import TrainingArguments

    raw = {k: v for k, v in sections.get("TrainingArguments", {}).items() if k not in _NOT_TRAINING_ARGUMENTS}
    if "warmup_ratio" in raw:
        # transformers 5 folded warmup_ratio into warmup_steps (a value below 1 is a ratio); older configs use it.
        raw["warmup_steps"] = float(raw.pop("warmup_ratio"))
    reject_unknown_fields("TrainingArguments", raw, TrainingArguments)
    try:
        args = TrainingArguments(output_dir=str(work / "checkpoints"), report_to="none", **raw)
    except (TypeError, ValueError) as exc:
        raise BadInput(
            Problem("training_config.TrainingArguments", str(exc), "use transformers.TrainingArguments' arguments")
        ) from None
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    packing = bool(sections.get("TrainingArguments", {}).get("packing", True))
    return LoopConfig(
        packing=packing,
        pack_tokens=max_seq_length * int(args.per_device_train_batch_size),
        checkpoint_dir=checkpoint_dir if strategy != "no" else None,
        save_steps=int(args.save_steps) if strategy == "steps" else 0,
        save_minutes=checkpoint_minutes,
        epochs=float(args.num_train_epochs),
        learning_rate=float(args.learning_rate),
        batch_size=int(args.per_device_train_batch_size),
        grad_accum=int(args.gradient_accumulation_steps),
        weight_decay=float(args.weight_decay),
        warmup=float(args.warmup_steps or 0),
        max_grad_norm=float(args.max_grad_norm),
        max_steps=int(args.max_steps),
        seed=int(args.seed),
        logging_steps=max(1, int(args.logging_steps) if args.logging_steps >= 1 else 10),
        compute_dtype=compute_dtype,
    )


def torch_seed(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def _encode_split(tokenizer: Any, path: Path, max_len: int) -> tuple[list[Encoded], int]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    encoded = [encode(tokenizer, row["messages"], max_len) for row in rows]
    kept = [e for e in encoded if e.trainable_tokens > 0]
    return kept, len(encoded) - len(kept)


def config_hash(args: argparse.Namespace, dataset_digest: str, weights_ref: str = "") -> str:
    key = json.dumps(
        {
            "model": args.model,
            "weights": weights_ref,
            "method": args.method,
            "config": json.loads(args.training_config),
            "targets": args.target_modules,
            "dtype": args.compute_dtype,
            "max_len": args.max_seq_length,
            "dataset": dataset_digest,
        },
        sort_keys=True,
    )
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "kaitune"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _outputs(summary: dict[str, Any], adapter: Path) -> dict[str, str]:
    m = summary["metrics"]
    return {
        "train-loss": f"{m['train_loss']:.6f}",
        "eval-loss": f"{m['eval_loss']:.6f}",
        "eval-loss-before": f"{m['eval_loss_before']:.6f}",
        "tokens": str(m["tokens"]),
        "tokens-per-second": f"{m['tokens_per_second']:.1f}",
        "adapter-dir": str(adapter),
    }


def reuse_pushed(args: argparse.Namespace, key: str, adapter_dir: Path) -> bool:
    """An adapter already pushed for exactly these inputs is pulled, not trained again (Argo resubmits)."""
    from dataclasses import replace as with_changes

    from steps import adapter_lineage
    from steps.oci import transfer

    registry = with_changes(options.from_args(args), docker_config=args.reuse_docker_config)
    found = adapter_lineage.find_trained(args.reuse_from, key, registry)
    if found is None:
        return False
    with atomic_dir(adapter_dir) as tmp:
        transfer.pull(args.reuse_from, tmp, registry)
        summary = {**adapter_lineage.summary_from(found), "reused_from": args.reuse_from}
        write_json_atomic(tmp / "training_summary.json", summary)
    log.info("%s already holds the adapter for these inputs (%s): reusing it, not training", args.reuse_from, key[:19])
    return True


def pull_weights(args: argparse.Namespace) -> tuple[Path | None, str]:
    """Base weights from an OCI image into the work volume (kept across reruns): the directory, the pinned ref."""
    if not args.model_image:
        return None, ""
    from steps.oci import transfer, unpack

    dest = args.work / "base-model"
    pulled = transfer.pull(args.model_image, dest, options.from_args(args), reuse=True, roots=unpack.WEIGHTS_ROOTS)
    if not (dest / "config.json").is_file():
        raise BadInput(
            Problem("tuning.preset.presetOptions.image", f"{args.model_image} holds no config.json",
                    "the image must carry a Hugging Face model directory under /data or /workspace/tfs/weights")
        )  # fmt: skip
    return dest, pulled.pinned(args.model_image)


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # a real command line, not a test calling main() in-process
        allocator.reexec_with_jemalloc("steps.train", sys.argv[1:])
    args = parse_args(argv)
    sections = json.loads(args.training_config)
    data_dir, adapter_dir = args.work / "data", args.work / "adapter"
    stats_path = data_dir / "stats.json"
    if not stats_path.exists():
        raise BadInput(Problem(str(data_dir), "has no prepared dataset", "run fetch-data first"))
    stats = json.loads(stats_path.read_text())
    weights_dir, weights_ref = pull_weights(args)
    key = config_hash(args, stats["digest"], weights_ref)
    summary_path = adapter_dir / "training_summary.json"
    if summary_path.exists() and json.loads(summary_path.read_text()).get("config_hash") == key:
        log.info("adapter for these inputs is already trained (%s); reusing it", key[:19])
        write_outputs(args.outputs, _outputs(json.loads(summary_path.read_text()), adapter_dir))
        return
    if args.reuse_from and reuse_pushed(args, key, adapter_dir):
        write_outputs(args.outputs, _outputs(json.loads(summary_path.read_text()), adapter_dir))
        return
    dist = distributed.current()
    nproc = distributed.processes_for(args.processes)
    if nproc > 1 and not dist.enabled:
        log.info("training with %d processes (one per GPU)", nproc)
        code = distributed.launch(nproc, "steps.train", sys.argv[1:] if argv is None else argv)
        if code:
            sys.exit(code)  # the failing rank already printed its error
        return
    device = distributed.init(dist)

    from steps.model_loading import add_lora, load_model, load_tokenizer, resolve_base

    check_collator(sections)
    source, base_name = resolve_base(args.model)
    if weights_dir is not None:
        source = weights_dir  # the same model, from the image; the adapter still names its portable id
    local_only = bool(sections.get("ModelConfig", {}).get("local_files_only", False)) or isinstance(source, Path)
    cfg = loop_config(
        sections,
        args.compute_dtype,
        args.work,
        max_seq_length=args.max_seq_length,
        checkpoint_dir=args.work / "checkpoints" / key.removeprefix("sha256:")[:16],
        checkpoint_minutes=args.checkpoint_minutes,
    )
    token = read_token(args.token_file)
    tokenizer = load_tokenizer(source, local_only, token=token)
    train, dropped = _encode_split(tokenizer, data_dir / "train.parquet", args.max_seq_length)
    evaluation, _ = _encode_split(tokenizer, data_dir / "eval.parquet", args.max_seq_length)
    if not train:
        raise BadInput(
            Problem(
                "dataset",
                f"no training row has an assistant token within max length "
                f"{args.max_seq_length} ({dropped} rows dropped)",
                "raise TrainingArguments.max_length or shorten the conversations",
            )
        )
    # Seed before the adapter exists: LoRA's A matrices are randomly initialised.
    torch_seed(cfg.seed)
    if cfg.checkpoint_dir and not cfg.save_steps:
        # save_strategy "epoch" (Kaito's default): a checkpoint at each epoch's end.
        cfg = replace(cfg, save_steps=max(1, len(schedule(train, replace(cfg, epochs=1.0, max_steps=0)))))
    model = load_model(
        source,
        method=args.method,
        sections=sections,
        compute_dtype=args.compute_dtype,
        local_only=local_only,
        attn_implementation=packing.register() if cfg.packing else None,
        token=token,
        device=device if dist.enabled else None,
    )
    model = add_lora(
        model,
        method=args.method,
        sections=sections,
        target_modules=[t for t in args.target_modules.split(",") if t],
        gradient_checkpointing=args.gradient_checkpointing.lower() == "true",
    )
    progress = Progress(1)

    def on_step(step: int, total: int, _record: dict[str, float]) -> None:
        progress.total = total
        progress.update(step)

    result = _train_with_clear_oom(
        model, train, evaluation, tokenizer.pad_token_id, cfg, on_step if dist.main else None, dist
    )
    if not dist.main:
        distributed.shutdown(dist)
        return  # rank 0 writes the adapter and the outputs
    summary = {
        "base_model": base_name,
        "method": args.method,
        "config_hash": key,
        "dataset_digest": stats["digest"],
        "base_model_image": weights_ref or None,
        "target_modules": args.target_modules.split(","),
        "compute_dtype": args.compute_dtype,
        "metrics": {
            "train_loss": result.train_loss,
            "eval_loss": result.eval_loss,
            "eval_loss_before": result.eval_loss_before,
            "steps": result.steps,
            "tokens": result.tokens,
            "tokens_per_second": result.tokens_per_second,
            "seconds": result.seconds,
            "resumed_from_step": result.resumed_from,
            "train_rows": len(train),
            "eval_rows": len(evaluation),
            "rows_dropped_too_long": dropped,
        },
        "history": result.history,
        "versions": _versions(),
        "finished_at": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
    }
    with atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = base_name
        # peft writes target_modules from a set: sort it so the same adapter gives the same image digest.
        if isinstance(adapter_config.get("target_modules"), list):
            adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
        write_json_atomic(config_path, adapter_config)
        write_json_atomic(tmp / "training_summary.json", summary)
        write_json_atomic(tmp / "metrics.json", {**summary["metrics"], "history": result.history})
        loss_curve.write_png(result.history, tmp / "loss_curve.png", title=f"{base_name} {args.method}")
    if cfg.checkpoint_dir:
        shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)  # the adapter is final; resume state is not needed
    write_outputs(args.outputs, _outputs(summary, adapter_dir))


def _train_with_clear_oom(
    model: Any,
    train: list[Encoded],
    evaluation: list[Encoded],
    pad_id: int,
    cfg: LoopConfig,
    on_step: Any,
    dist: distributed.Dist,
) -> LoopResult:
    import torch

    try:
        return train_loop(model, train, evaluation, pad_id, cfg, on_step, dist)
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        raise BadInput(
            Problem(
                "training_config.TrainingArguments",
                f"out of memory at {cfg.pack_tokens if cfg.packing else cfg.batch_size} "
                f"{'tokens per row' if cfg.packing else 'rows per batch'} ({str(exc).splitlines()[0][:200]})",
                "lower per_device_train_batch_size or max_length, set gradient_checkpointing: true, use method qlora, "
                "or pick a larger instanceType (see 'kaitune plan')",
            )
        ) from None


if __name__ == "__main__":
    run_step("train", main)
