"""Dataset files in, validated OpenAI-style ``messages`` rows out.

Reads parquet, jsonl, json and csv (optionally .gz), detects the schema
(messages, ShareGPT conversations, Alpaca, prompt/completion) and checks every
row, keeping the index and reason of each bad one for the report.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import BadInput, Problem

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
}
FORMATS = (".parquet", ".jsonl", ".json", ".csv")
SCHEMAS = ("messages", "conversations", "alpaca", "prompt_completion")

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class BadRow:
    index: int
    reason: str


def data_files(path: Path) -> list[Path]:
    """The data files at ``path``: the file itself, or a directory's shards in name order."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _format(p) is not None)
        if files:
            return files
        raise BadInput(
            Problem(
                str(path),
                f"holds no data files ({', '.join(FORMATS)}, optionally .gz)",
                "point the input at a directory of dataset shards",
            )
        )
    raise BadInput(Problem(str(path), "does not exist", "check tuning.input"))


def _format(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    return next((fmt for fmt in FORMATS if name.endswith(fmt)), None)


def read_records(path: Path) -> list[dict[str, Any]]:
    fmt = _format(path)
    if fmt is None:
        raise BadInput(Problem(str(path), "has an unknown format", f"use one of {', '.join(FORMATS)}"))
    try:
        if fmt == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_table(path).to_pylist())
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.name.lower().endswith(".gz") else raw).decode("utf-8")
        if fmt == ".jsonl":
            out = []
            for line_no, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise BadInput(
                            Problem(
                                f"{path}:{line_no}",
                                f"is not valid JSON ({exc.msg})",
                                "each line of a .jsonl file must be one JSON object",
                            )
                        ) from None
            return out
        if fmt == ".json":
            doc = json.loads(text)
            return doc if isinstance(doc, list) else [doc]
        return list(csv.DictReader(io.StringIO(text)))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise BadInput(Problem(str(path), f"cannot be read as {fmt}: {exc}", "check the file's format")) from None


def detect_schema(records: list[dict[str, Any]]) -> str:
    keys: set[str] = set()
    for record in records[:100]:
        if isinstance(record, dict):
            keys |= set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "conversations"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    raise BadInput(
        Problem(
            "dataset",
            f"has no recognised chat columns (found: {sorted(keys)[:10]})",
            "provide 'messages' (role/content), ShareGPT 'conversations', Alpaca "
            "instruction/input/output, or prompt/completion columns",
        )
    )


def _as_list(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def to_messages(record: dict[str, Any], schema: str) -> Messages:
    if schema == "messages":
        return list(_as_list(record.get("messages")) or [])
    if schema == "conversations":
        turns = _as_list(record.get("conversations")) or []
        return [
            {"role": SHAREGPT_ROLES.get(str(t.get("from")), str(t.get("from"))), "content": t.get("value")}
            for t in turns
        ]
    if schema == "alpaca":
        prompt = record.get("instruction") or ""
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record.get("output")}]
    return [
        {"role": "user", "content": record.get("prompt")},
        {"role": "assistant", "content": record.get("completion")},
    ]


def row_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "has no messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} is not an object"
        if message.get("role") not in ROLES:
            return f"message {i} has unknown role {message.get('role')!r}"
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"message {i} ({message['role']}) has empty or non-string content"
    if not any(m["role"] == "assistant" for m in messages):
        return "has no assistant turn to learn from"
    return None


def normalize(records: Iterable[dict[str, Any]], schema: str) -> tuple[list[Messages], list[BadRow]]:
    good: list[Messages] = []
    bad: list[BadRow] = []
    for index, record in enumerate(records):
        try:
            messages = to_messages(record, schema) if isinstance(record, dict) else None
        except (ValueError, AttributeError, TypeError) as exc:
            bad.append(BadRow(index, f"cannot be read as {schema}: {exc}"))
            continue
        why = row_problem(messages)
        if why:
            bad.append(BadRow(index, why))
        else:
            assert messages is not None
            good.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return good, bad
