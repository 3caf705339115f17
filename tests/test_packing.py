"""Packing keeps examples apart: per-example losses equal the unpacked ones, and nothing leaks across."""

from __future__ import annotations

from pathlib import Path

import pytest

from steps.chat_tokens import Encoded, encode
from steps.lora_training import LoopConfig, collate, schedule, token_losses
from steps.packing import ATTENTION, collate_packed, pack, register
from steps.synthetic_chat import chat_rows


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_phi3: Path):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register()
    model = AutoModelForCausalLM.from_pretrained(tiny_phi3, attn_implementation=ATTENTION, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_phi3)


def per_example_packed(model, examples: list[Encoded]) -> list[float]:  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        losses, _ = token_losses(model, collate_packed(examples, "cpu"))
    out, start = [], 0
    for e in examples:
        end = start + len(e.input_ids)
        out.append(float(losses[0, start : end - 1].sum()))  # the shifted positions inside this example
        start = end
    return out


def test_packed_losses_equal_unpacked_per_example(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    import torch

    model, tok = model_and_tokenizer
    examples = [encode(tok, row["messages"], 256) for row in chat_rows()[:8]]
    with torch.no_grad():
        alone = [float(token_losses(model, collate([e], tok.pad_token_id, "cpu"))[0].sum()) for e in examples]
    packed = per_example_packed(model, examples)
    assert packed == pytest.approx(alone, abs=1e-4)
    assert len({round(x, 3) for x in alone}) > 1  # the examples really differ


def test_no_attention_across_examples(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, tok = model_and_tokenizer
    a, b, c = (encode(tok, row["messages"], 256) for row in chat_rows()[:3])
    first = per_example_packed(model, [a, b])
    second = per_example_packed(model, [c, b])  # a different neighbour before b
    assert second[1] == pytest.approx(first[1], abs=1e-5)


def test_pack_respects_capacity_and_keeps_every_example() -> None:
    examples = [Encoded(list(range(n)), list(range(n))) for n in (5, 9, 3, 7, 2, 8)]
    rows = pack(examples, 10, None)
    assert all(sum(len(e.input_ids) for e in row) <= 10 for row in rows)
    assert sorted(len(e.input_ids) for row in rows for e in row) == [2, 3, 5, 7, 8, 9]


def test_schedule_is_deterministic_in_the_seed() -> None:
    examples = [Encoded(list(range(n)), list(range(n))) for n in range(2, 40)]
    cfg = LoopConfig(
        epochs=2,
        learning_rate=1e-3,
        batch_size=1,
        grad_accum=2,
        weight_decay=0,
        warmup=0,
        max_grad_norm=1,
        max_steps=0,
        seed=3,
        logging_steps=1,
        compute_dtype="float32",
        pack_tokens=64,
    )
    first, again = schedule(examples, cfg), schedule(examples, cfg)
    other = schedule(examples, LoopConfig(**{**cfg.__dict__, "seed": 4}))

    def ids(plan):  # type: ignore[no-untyped-def]
        return [[[e.input_ids for e in g] for g in s] for s in plan]

    assert ids(first) == ids(again) and ids(first) != ids(other)
