"""Chat rows to token ids with labels on assistant tokens only.

The tokenizer's own chat template renders the conversation; assistant spans are
found by rendering each prefix, so this works for any template that renders a
conversation as the concatenation of its turns (Phi-3, Llama 3, ChatML, Mistral).
The closing EOS is labelled, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return text


def _strip_eos(tokenizer: Any, text: str) -> str:
    eos = tokenizer.eos_token or ""
    return text[: -len(eos)] if eos and text.endswith(eos) else text


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans to learn."""
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_strip_eos(tokenizer, _render(tokenizer, messages[:i], generation_prompt=True))) if i else 0
        end = len(_strip_eos(tokenizer, _render(tokenizer, messages[: i + 1], generation_prompt=False)))
        if full.startswith(_strip_eos(tokenizer, _render(tokenizer, messages[: i + 1], generation_prompt=False))):
            spans.append((start, end))
    eos = tokenizer.eos_token or ""
    if messages and messages[-1]["role"] == "assistant" and eos and full.endswith(eos):
        spans.append((len(full) - len(eos), len(full)))
    return full, spans


def encode(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> Encoded:
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    labels = []
    for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        inside = any(s <= start and end <= e and end > start for s, e in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return Encoded(list(enc["input_ids"]), labels)
