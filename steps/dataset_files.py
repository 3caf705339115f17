"""Dataset files to records, one at a time: parquet, arrow, jsonl, json, csv, optionally .gz/.zst.

Each record comes with its file and row number so every later error can say
where it is. Compression is recognised by suffix or magic bytes (a download
named ``train.parquet`` may still be gzip), and decompressed as a stream.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipelines.errors import BadInput, Problem

FORMATS = (".parquet", ".arrow", ".jsonl", ".json", ".csv")
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
_SUFFIX_CODEC = {".gz": "gzip", ".zst": "zstd"}


@dataclass(frozen=True)
class Record:
    file: str
    row: int
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file} row {self.row}"


def data_files(path: Path) -> list[Path]:
    """The data files at ``path``: the file itself, or a directory's shards in name order."""
    if path.is_file():
        return [path]
    if path.is_dir():
        # Hidden files are never shards: editors' and macOS's litter, and kaitune's own pull marker.
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and file_format(p) is not None
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if files:
            return files
        raise BadInput(
            Problem(
                str(path),
                f"holds no data files ({', '.join(FORMATS)}, optionally .gz or .zst)",
                "point the input at a file or a directory of dataset shards",
            )
        )
    raise BadInput(Problem(str(path), "does not exist", "check tuning.input"))


def file_format(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in _SUFFIX_CODEC:
        name = name.removesuffix(suffix)
    return next((fmt for fmt in FORMATS if name.endswith(fmt)), None)


def _codec(path: Path) -> str | None:
    with open(path, "rb") as fh:
        head = fh.read(4)
    for magic, codec in _MAGIC.items():
        if head.startswith(magic):
            return codec
    return None


def _open(path: Path) -> BinaryIO:
    import pyarrow as pa

    codec = _codec(path)
    if codec is None:
        return open(path, "rb")
    return pa.CompressedInputStream(pa.OSFile(str(path)), codec)


def read_records(path: Path) -> Iterator[Record]:
    fmt = file_format(path)
    if fmt is None:
        raise BadInput(Problem(str(path), "has an unknown format", f"use one of {', '.join(FORMATS)}"))
    if path.stat().st_size == 0:
        raise BadInput(Problem(str(path), "is empty", "check the download or the file"))
    name = path.name
    try:
        if fmt in (".parquet", ".arrow"):
            yield from _columnar(path, fmt, name)
        elif fmt == ".jsonl":
            yield from _jsonl(path, name)
        elif fmt == ".json":
            yield from _json(path, name)
        else:
            yield from _csv(path, name)
    except UnicodeDecodeError as exc:
        raise BadInput(
            Problem(name, f"is not UTF-8 text (byte {exc.start}: {exc.reason})", "re-encode the file as UTF-8")
        ) from None


def _columnar(path: Path, fmt: str, name: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with _open(path) as raw:
            # Parquet needs random access: a compressed file is decompressed into memory first.
            source: Any = raw if _codec(path) is None else pa.BufferReader(raw.read())
            if fmt == ".parquet":
                batches: Iterator[Any] = pq.ParquetFile(source).iter_batches(batch_size=4096)
            else:
                batches = _arrow_batches(source)
            row = 0
            for batch in batches:
                for data in batch.to_pylist():
                    yield Record(name, row, data)
                    row += 1
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        kind = "parquet" if fmt == ".parquet" else "Arrow IPC"
        raise BadInput(
            Problem(
                name,
                f"is not a valid {kind} file ({exc})",
                "check the file; a partial download? delete it and fetch again",
            )
        ) from None


def _arrow_batches(source: Any) -> Iterator[Any]:
    import pyarrow as pa

    data = source.read() if hasattr(source, "read") else source
    buffer = pa.py_buffer(data) if isinstance(data, bytes) else data
    try:
        reader: Any = pa.ipc.open_file(buffer)
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        # The Hugging Face datasets cache writes the streaming format.
        yield from pa.ipc.open_stream(buffer)


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    # Decoded line by line, so a bad byte is reported on its own line, not somewhere in a chunk.
    with _open(path) as raw, io.BufferedReader(raw) as lines:  # type: ignore[type-var]
        for line_no, line in enumerate(lines, 1):
            try:
                yield line_no, line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadInput(
                    Problem(
                        f"{path.name} line {line_no}",
                        f"is not UTF-8 (byte {exc.start}: {exc.reason})",
                        "re-encode the file as UTF-8",
                    )
                ) from None


def _jsonl(path: Path, name: str) -> Iterator[Record]:
    row = 0
    for line_no, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(
                Problem(
                    f"{name} line {line_no}",
                    f"is not valid JSON ({exc.msg}, column {exc.colno})",
                    "each line of a .jsonl file must be one JSON object",
                )
            ) from None
        if not isinstance(data, dict):
            raise BadInput(
                Problem(
                    f"{name} line {line_no}",
                    f"is a JSON {type(data).__name__}, not an object",
                    "each line must be one JSON object of columns",
                )
            )
        yield Record(name, row, data)
        row += 1


def _json(path: Path, name: str) -> Iterator[Record]:
    with _open(path) as raw:
        text = raw.read().decode("utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines under a .json name
            yield from _jsonl(path, name)
            return
        raise BadInput(
            Problem(
                f"{name} line {exc.lineno}",
                f"is not valid JSON ({exc.msg})",
                "fix the JSON, or use .jsonl with one object per line",
            )
        ) from None
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        columns = list(doc)
        lengths = {len(doc[c]) for c in columns}
        if len(lengths) != 1:
            raise BadInput(Problem(name, "column lists have different lengths", "give every column the same length"))
        rows: list[Any] = [dict(zip(columns, values, strict=True)) for values in zip(*doc.values(), strict=True)]
    else:
        rows = doc if isinstance(doc, list) else [doc]
    for row, data in enumerate(rows):
        if not isinstance(data, dict):
            raise BadInput(
                Problem(
                    f"{name} row {row}",
                    f"is a JSON {type(data).__name__}, not an object",
                    "a .json file holds an array of objects",
                )
            )
        yield Record(name, row, data)


def _csv(path: Path, name: str) -> Iterator[Record]:
    import csv

    with _open(path) as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        reader = csv.DictReader(text)
        for row, data in enumerate(reader):
            if None in data:
                raise BadInput(
                    Problem(f"{name} row {row}", "has more fields than the header", "quote fields that contain commas")
                )
            yield Record(name, row, dict(data))
