"""Records in, validated OpenAI-style ``messages`` rows out.

Schemas, detected per row, overridable in DatasetConfig (Kaito's ``messages_column``,
``context_column``/``response_column``, or kaitune's ``schema``):

* ``messages``: [{role, content}, ...] (a JSON string is accepted too)
* ``conversations``: ShareGPT [{from, value}, ...]
* ``alpaca``: instruction, optional input, output
* ``prompt_completion``: prompt, completion (or Kaito's context/response columns)
* ``text``: plain text, learned as one assistant turn

A dataset holds one schema; a row of another is an error naming file and row. A
row that breaks the rules (unknown role, no assistant turn, empty content) is
skipped and reported by file, row and column.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipelines.errors import BadInput, Problem
from steps.dataset_files import Record

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function_call": "tool",
    "observation": "tool",
}
SCHEMAS = ("messages", "conversations", "alpaca", "prompt_completion", "text")
Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Columns:
    """Which columns hold what, from DatasetConfig (Kaito's names)."""

    schema: str | None = None
    messages: str = "messages"
    context: str = "prompt"
    response: str = "completion"
    text: str = "text"

    @classmethod
    def from_dataset_config(cls, config: dict[str, Any]) -> Columns:
        schema = config.get("schema")
        if schema is not None and schema not in SCHEMAS:
            raise BadInput(
                Problem(
                    "DatasetConfig.schema",
                    f"{schema!r} is not a known schema",
                    f"use one of {', '.join(SCHEMAS)}, or leave it out to detect it",
                )
            )
        if config.get("messages_column"):
            return cls(schema or "messages", messages=config["messages_column"])
        if config.get("context_column"):
            return cls(
                schema or "prompt_completion",
                context=config["context_column"],
                response=config.get("response_column", "text"),
            )
        # Kaito's response_column alone (default "text") names a plain-text column.
        return cls(schema, text=config.get("response_column", "text"))


@dataclass(frozen=True)
class BadRow:
    file: str
    row: int
    column: str
    reason: str

    def render(self) -> str:
        return f"{self.file} row {self.row} column {self.column}: {self.reason}"


def row_schema(data: dict[str, Any], cols: Columns) -> str | None:
    present = {k for k, v in data.items() if v is not None and v != ""}
    if cols.messages in present:
        return "messages"
    if "conversations" in present:
        return "conversations"
    if {"instruction", "output"} <= present:
        return "alpaca"
    if {cols.context, cols.response} <= present:
        return "prompt_completion"
    if cols.text in present:
        return "text"
    return None


def _json_list(value: Any, column: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is a string but not JSON ({exc.msg})") from None
    return value


def to_messages(data: dict[str, Any], schema: str, cols: Columns) -> tuple[str, Messages]:
    """The row as messages, and the column the row's content came from (for error messages)."""
    if schema == "messages":
        return cols.messages, list(_json_list(data.get(cols.messages), cols.messages) or [])
    if schema == "conversations":
        turns = _json_list(data.get("conversations"), "conversations") or []
        return "conversations", [
            {"role": SHAREGPT_ROLES.get(str(t.get("from")), str(t.get("from"))), "content": t.get("value")}
            if isinstance(t, dict)
            else t
            for t in turns
        ]
    if schema == "alpaca":
        prompt = data.get("instruction") or ""
        if data.get("input"):
            prompt = f"{prompt}\n\n{data['input']}"
        return "instruction/output", [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": data.get("output")},
        ]
    if schema == "prompt_completion":
        return f"{cols.context}/{cols.response}", [
            {"role": "user", "content": data.get(cols.context)},
            {"role": "assistant", "content": data.get(cols.response)},
        ]
    return cols.text, [{"role": "assistant", "content": data.get(cols.text)}]


def row_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "has no messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} is not an object"
        if message.get("role") not in ROLES:
            return f"message {i} has unknown role {message.get('role')!r} (use system, user, assistant, tool)"
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"message {i} ({message['role']}) has empty or non-string content"
    if not any(m["role"] == "assistant" for m in messages):
        return "has no assistant turn to learn from"
    return None


def normalize(records: Iterable[Record], cols: Columns) -> tuple[str, list[Messages], list[BadRow]]:
    """Every record as messages; the dataset's schema; the rows skipped and why."""
    schema = cols.schema
    first: Record | None = None
    good: list[Messages] = []
    bad: list[BadRow] = []
    for record in records:
        found = row_schema(record.data, cols)
        if schema is None:
            if found is None:
                raise BadInput(
                    Problem(
                        record.where,
                        f"has no recognised chat columns (found: {', '.join(sorted(record.data)) or 'none'})",
                        "provide messages, ShareGPT conversations, Alpaca instruction/output, "
                        "prompt/completion or text columns, or name them in DatasetConfig",
                    )
                )
            schema, first = found, record
        elif cols.schema is None and found is not None and found != schema:
            assert first is not None
            raise BadInput(
                Problem(
                    record.where,
                    f"is {found} but {first.where} is {schema}: mixed schemas",
                    "convert the files to one schema, or set DatasetConfig.schema",
                )
            )
        try:
            column, messages = to_messages(record.data, schema, cols)
        except (ValueError, AttributeError, TypeError) as exc:
            bad.append(BadRow(record.file, record.row, schema, f"cannot be read as {schema}: {exc}"))
            continue
        why = row_problem(messages)
        if why:
            bad.append(BadRow(record.file, record.row, column, why))
        else:
            good.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if schema is None:
        raise BadInput(Problem("dataset", "is empty: no rows in any file", "check that the input holds rows"))
    return schema, good, bad
