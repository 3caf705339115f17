"""Training throughput: kaitune's train loop vs Kaito's default setup, measured in the same run.

Baseline (Kaito's defaults): trl SFTTrainer, per_device_train_batch_size 1, gradient
checkpointing, fp32. kaitune: its own loop (steps.lora_training), no checkpointing
(LoRA's default in the plan), at the same batch size 1 that Kaito's config asks for,
and at length-grouped batches of 4. Same model (a random Phi-3 of ~38M parameters, as DESIGN.md's
measurement), same LoRA targets, same data (dolly-like lengths: median ~170 tokens),
same number of examples. Prints tokens/s for both and the ratio.

    python benchmarks/bench_train_loop.py [--examples 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

RANK = 8
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def dolly_like_rows(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    from steps.synthetic_chat import warmup_corpus

    rng = random.Random(seed)
    sentences = warmup_corpus(seed)
    rows = []
    for _ in range(n):
        # Log-normal answer lengths give a median near 170 tokens and a long tail, like dolly-15k.
        words = min(900, int(rng.lognormvariate(4.6, 0.8)))
        answer, question = [], rng.choice(sentences)
        while sum(len(s.split()) for s in answer) < words:
            answer.append(rng.choice(sentences))
        rows.append([{"role": "user", "content": question}, {"role": "assistant", "content": " ".join(answer)}])
    return rows


def model_and_tokenizer() -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from steps import tiny_phi3

    tokenizer = AutoTokenizer.from_pretrained(tiny_phi3.ensure())
    torch.manual_seed(0)
    config = Phi3Config(
        vocab_size=768,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        original_max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    model = get_peft_model(Phi3ForCausalLM(config), LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS))
    return model, tokenizer


def run_kaitune(rows: list[list[dict[str, str]]], batch_size: int) -> tuple[int, float]:
    from steps.chat_tokens import encode
    from steps.lora_training import LoopConfig, train_loop

    model, tokenizer = model_and_tokenizer()
    examples = [encode(tokenizer, r, 1024) for r in rows]
    cfg = LoopConfig(
        epochs=1,
        learning_rate=1e-4,
        batch_size=batch_size,
        grad_accum=1,
        weight_decay=0.0,
        warmup_ratio=0.0,
        max_grad_norm=1.0,
        max_steps=0,
        seed=0,
        logging_steps=1000,
        compute_dtype="float32",
    )
    result = train_loop(model, examples, [], tokenizer.pad_token_id, cfg)
    return result.tokens, result.seconds


def run_kaito_default(rows: list[list[dict[str, str]]]) -> tuple[int, float]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = model_and_tokenizer()
    dataset = Dataset.from_list([{"messages": r} for r in rows])
    args = SFTConfig(
        output_dir="/tmp/kaitune-bench-sft",
        per_device_train_batch_size=1,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        num_train_epochs=1,
        max_length=1024,
        learning_rate=1e-4,
        report_to="none",
        logging_steps=1000,
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    started = time.monotonic()
    trainer.train()
    return tokens, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating repeats; the median is reported")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = dolly_like_rows(args.examples)
    runs: dict[str, Callable[[], tuple[int, float]]] = {
        "kaito default (SFTTrainer, batch 1, checkpointing)": lambda: run_kaito_default(rows),
        "kaitune loop (batch 1, no checkpointing)": lambda: run_kaitune(rows, 1),
        "kaitune loop (batch 4, no checkpointing)": lambda: run_kaitune(rows, 4),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    tokens_seen = set()
    # Alternate the setups so drift on a shared machine hits them alike.
    for _ in range(args.rounds):
        for name, run in runs.items():
            tokens, seconds = run()
            tokens_seen.add(tokens)
            rates[name].append(tokens / seconds)
    assert len(tokens_seen) == 1, f"setups did different work: {tokens_seen}"
    baseline = statistics.median(rates[next(iter(runs))])
    print(f"examples: {len(rows)}, tokens per epoch: {tokens_seen.pop()}, rounds: {args.rounds} (median tokens/s)")
    for name, values in rates.items():
        rate = statistics.median(values)
        spread = f"{min(values):.0f}-{max(values):.0f}"
        print(f"{name:52s} {rate:6.0f} tokens/s  (range {spread})  ratio {rate / baseline:.2f}x")


if __name__ == "__main__":
    main()
