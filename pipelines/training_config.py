"""Kaito's ``training_config.yaml``: its six sections, Kaito's defaults, and the
knobs the plan needs.

The sections are handed to the libraries' own dataclasses by the train step
(transformers ``TrainingArguments``, peft ``LoraConfig``, ``BitsAndBytesConfig``),
so nothing here re-declares their fields. This module only checks what must hold
before a GPU is paid for: the section names, and that the method agrees with
the quantization.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from pipelines.errors import Problem

# Kaito's DatasetConfig fields, and the few kaitune adds (documented in the README).
DATASET_CONFIG_KEYS = {
    "dataset_path",
    "dataset_extension",
    "shuffle_dataset",
    "shuffle_seed",
    "context_column",
    "response_column",
    "messages_column",
    "train_test_split",  # Kaito
    "schema",
    "max_bad_fraction",
    "sha256",  # kaitune
}
SECTIONS = ("ModelConfig", "QuantizationConfig", "LoraConfig", "TrainingArguments", "DataCollator", "DatasetConfig")
DEFAULT_CONFIGMAPS = {"qlora": "qlora-params", "lora": "lora-params"}
DEFAULT_MAX_SEQ_LENGTH = 2048

# Where kaitune deliberately departs from Kaito's defaults (DESIGN.md lists why).
KAITUNE_FIXES = (
    "LoRA target modules follow the architecture (Phi-3: qkv_proj, gate_up_proj, ...)",
    "loss on assistant tokens only, and EOS is learned (pad is never EOS)",
    "the collator is causal, never MLM",
    "an eval split is held out even when train_test_split is 1",
    "DatasetConfig.shuffle_seed is honoured",
)

Sections = dict[str, dict[str, Any]]


def default_configmap(method: str) -> dict[str, Any]:
    name = DEFAULT_CONFIGMAPS[method]
    text = resources.files("pipelines").joinpath(f"defaults/{name}.yaml").read_text()
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def default_sections(method: str) -> Sections:
    sections, problems = parse_config_text(default_configmap(method)["data"]["training_config.yaml"], "default")
    assert not problems, problems  # shipped data; a failure here is a packaging bug
    return sections


def parse_config_text(text: str, where: str) -> tuple[Sections, list[Problem]]:
    """Parse ``training_config.yaml`` text; ``where`` prefixes field paths in errors."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        return {}, [Problem(where, f"is not valid YAML: {exc}", "fix the YAML syntax of training_config.yaml")]
    if not isinstance(doc, dict) or not isinstance(doc.get("training_config"), dict):
        return {}, [
            Problem(
                where,
                "must hold a mapping under the key 'training_config'",
                "start the file with 'training_config:' and put the sections under it",
            )
        ]
    problems: list[Problem] = []
    sections: Sections = {}
    for name, body in doc["training_config"].items():
        path = f"{where}.training_config.{name}"
        if name not in SECTIONS:
            problems.append(Problem(path, f"unknown section {name!r}", f"use only: {', '.join(SECTIONS)}"))
        elif body is None:
            sections[name] = {}
        elif not isinstance(body, dict):
            problems.append(
                Problem(
                    path, "must be a mapping of argument names to values", "write the section as 'key: value' lines"
                )
            )
        else:
            sections[name] = body
            if name == "DatasetConfig":
                problems.extend(
                    Problem(
                        f"{path}.{key}",
                        "is not a DatasetConfig field",
                        f"use: {', '.join(sorted(DATASET_CONFIG_KEYS))}",
                    )
                    for key in body
                    if key not in DATASET_CONFIG_KEYS
                )
    return sections, problems


def quantization_problems(sections: Sections, method: str, where: str) -> list[Problem]:
    quant = sections.get("QuantizationConfig", {})
    bits4, bits8 = bool(quant.get("load_in_4bit")), bool(quant.get("load_in_8bit"))
    path = f"{where}.training_config.QuantizationConfig"
    if method == "lora" and (bits4 or bits8):
        return [
            Problem(
                path,
                "method lora trains a full-precision base, but load_in_4bit/load_in_8bit is true",
                "set tuning.method: qlora, or set load_in_4bit and load_in_8bit to false",
            )
        ]
    if method == "qlora" and not (bits4 or bits8):
        return [
            Problem(
                path,
                "method qlora needs a quantized base, but neither load_in_4bit nor load_in_8bit is true",
                "set load_in_4bit: true (NF4), or use tuning.method: lora",
            )
        ]
    if bits4 and bits8:
        return [Problem(path, "load_in_4bit and load_in_8bit are both true", "choose one of them")]
    return []


@dataclass(frozen=True)
class TrainingKnobs:
    """The few training values the memory plan depends on."""

    max_seq_length: int
    batch_size: int
    lora_rank: int
    target_modules: tuple[str, ...] | None  # None: the preset's
    gradient_checkpointing: bool
    checkpointing_explicit: bool  # the user chose; the plan may not turn it on to fit
    load_in_8bit: bool


def knobs(sections: Sections, method: str, context_length: int) -> TrainingKnobs:
    args = sections.get("TrainingArguments", {})
    lora = sections.get("LoraConfig", {})
    data = sections.get("DatasetConfig", {})
    max_len = args.get("max_length") or args.get("max_seq_length") or data.get("max_seq_length")
    targets = lora.get("target_modules")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    # QLoRA exists to fit small GPUs, so checkpointing defaults on there; for LoRA
    # the ~1.3x speed (DESIGN.md) is worth more than the memory.
    checkpointing = args.get("gradient_checkpointing", method == "qlora")
    return TrainingKnobs(
        max_seq_length=min(int(max_len or DEFAULT_MAX_SEQ_LENGTH), context_length),
        batch_size=int(args.get("per_device_train_batch_size", 1)),
        lora_rank=int(lora.get("r", 8)),
        target_modules=tuple(targets) if targets else None,
        gradient_checkpointing=bool(checkpointing),
        checkpointing_explicit="gradient_checkpointing" in args,
        load_in_8bit=bool(sections.get("QuantizationConfig", {}).get("load_in_8bit")),
    )
