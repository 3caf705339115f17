"""Token lengths of the normalized rows, measured with the base model's own tokenizer and chat template."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from steps.chat_data import Messages

log = logging.getLogger("kaitune")
BATCH = 512


@dataclass(frozen=True)
class TokenStats:
    tokenizer: str
    p50: int
    p90: int
    p95: int
    p99: int
    max: int
    total: int
    over_max_length: int
    max_length: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_tokenizer(model: str) -> Any:
    """The preset's tokenizer: tiny-phi3's from the local build, else the hub id or a local directory."""
    from transformers import AutoTokenizer

    from pipelines.presets import find_preset

    preset = find_preset(model)
    if preset is not None and preset.local_only:
        from steps import tiny_phi3

        return AutoTokenizer.from_pretrained(tiny_phi3.ensure_tokenizer())
    source = preset.hf_id if preset is not None else model
    return AutoTokenizer.from_pretrained(source if not Path(source).is_dir() else Path(source))


def _percentile(sorted_values: list[int], q: float) -> int:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def measure(rows: list[Messages], tokenizer: Any, name: str, max_length: int) -> TokenStats:
    lengths: list[int] = []
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        texts = tokenizer.apply_chat_template(batch, tokenize=False)
        lengths.extend(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    ordered = sorted(lengths) or [0]
    return TokenStats(
        tokenizer=name,
        p50=_percentile(ordered, 0.5),
        p90=_percentile(ordered, 0.9),
        p95=_percentile(ordered, 0.95),
        p99=_percentile(ordered, 0.99),
        max=ordered[-1],
        total=sum(lengths),
        over_max_length=sum(1 for n in lengths if n > max_length),
        max_length=max_length,
    )


def try_measure(rows: list[Messages], model: str, max_length: int) -> TokenStats | None:
    """Token stats, or None with a warning when the tokenizer cannot be had (offline, gated)."""
    try:
        tokenizer = load_tokenizer(model)
    except (OSError, ValueError) as exc:
        log.warning(
            "token-length stats skipped: the tokenizer for %s is not reachable (%s)", model, str(exc).splitlines()[0]
        )
        return None
    return measure(rows, tokenizer, model, max_length)
