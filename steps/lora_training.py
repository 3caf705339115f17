"""The training loop: length-grouped batches, AdamW on the adapter, token-weighted eval loss.

A plain loop rather than a Trainer subclass: every step's cost is visible and the
per-step overhead DESIGN.md measured in SFTTrainer is not paid. Loss is the mean
over assistant tokens; padding is masked by position.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from steps.chat_tokens import IGNORE_INDEX, Encoded

log = logging.getLogger("kaitune")


@dataclass(frozen=True)
class LoopConfig:
    epochs: float
    learning_rate: float
    batch_size: int
    grad_accum: int
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    max_steps: int
    seed: int
    logging_steps: int
    compute_dtype: str


@dataclass
class LoopResult:
    steps: int
    tokens: int
    seconds: float
    train_loss: float
    eval_loss_before: float | None
    eval_loss: float | None
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def batches(examples: list[Encoded], batch_size: int, rng: random.Random | None) -> Iterator[list[Encoded]]:
    """Batches of similar length (less padding); shuffled batch order when ``rng`` is given."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(groups)
    for group in groups:
        yield [examples[i] for i in group]


def collate(batch: list[Encoded], pad_id: int, device: Any) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _summed_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Sum of token losses over labelled tokens, and their count (for exact means)."""
    import torch

    mask = batch["attention_mask"]
    # Without padding, no mask lets SDPA take its causal fast path instead of a dense 4D mask.
    logits = model(input_ids=batch["input_ids"], attention_mask=None if bool(mask.all()) else mask).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum())


def evaluate(model: Any, examples: list[Encoded], pad_id: int, batch_size: int) -> float | None:
    import torch

    if not examples:
        return None
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches(examples, batch_size, None):
            loss, n = _summed_loss(model, collate(batch, pad_id, device))
            total, count = total + float(loss), count + n
    model.train(was_training)
    return total / count if count else None


def train_loop(
    model: Any,
    train: list[Encoded],
    evaluation: list[Encoded],
    pad_id: int,
    cfg: LoopConfig,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
) -> LoopResult:
    import torch

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = next(p.device for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(math.ceil(len(train) / cfg.batch_size) / cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(per_epoch * cfg.epochs))
    warmup = int(total_steps * cfg.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup))
        ),
    )
    use_autocast = device.type == "cuda" and cfg.compute_dtype != "float32"
    autocast_dtype = torch.bfloat16 if cfg.compute_dtype == "bfloat16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_autocast and cfg.compute_dtype == "float16")

    eval_before = evaluate(model, evaluation, pad_id, cfg.batch_size)
    log.info("eval loss before training: %s", f"{eval_before:.4f}" if eval_before is not None else "n/a")
    model.train()
    step, tokens, started = 0, 0, time.monotonic()
    window_loss, window_tokens, last_loss = 0.0, 0, float("nan")
    history: list[dict[str, float]] = []
    while step < total_steps:
        micro = 0
        for batch in batches(train, cfg.batch_size, rng):
            inputs = collate(batch, pad_id, device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
                loss_sum, n = _summed_loss(model, inputs)
            if n == 0:
                continue
            scaler.scale(loss_sum / n / cfg.grad_accum).backward()
            window_loss, window_tokens = window_loss + float(loss_sum.detach()), window_tokens + n
            tokens += int(inputs["attention_mask"].sum())
            micro += 1
            if micro % cfg.grad_accum:
                continue
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            last_loss = window_loss / max(window_tokens, 1)
            if not math.isfinite(last_loss):
                from pipelines.errors import BadInput, Problem

                raise BadInput(
                    Problem(
                        "TrainingArguments.learning_rate",
                        f"loss became {last_loss} at step {step}",
                        "lower the learning rate, or use float32/bfloat16",
                    )
                )
            record = {
                "step": step,
                "loss": last_loss,
                "lr": float(scheduler.get_last_lr()[0]),
                "tokens_per_second": tokens / (time.monotonic() - started),
            }
            if step % cfg.logging_steps == 0 or step == total_steps:
                history.append(record)
                eta = (time.monotonic() - started) / step * (total_steps - step)
                log.info(
                    "step %d/%d loss %.4f lr %.2e %.0f tok/s eta %.0fs",
                    step,
                    total_steps,
                    last_loss,
                    record["lr"],
                    record["tokens_per_second"],
                    eta,
                )
            window_loss, window_tokens = 0.0, 0
            if on_step:
                on_step(step, total_steps, record)
            if step >= total_steps:
                break
    seconds = time.monotonic() - started
    eval_after = evaluate(model, evaluation, pad_id, cfg.batch_size)
    log.info("eval loss after training: %s", f"{eval_after:.4f}" if eval_after is not None else "n/a")
    return LoopResult(step, tokens, seconds, last_loss, eval_before, eval_after, history)
