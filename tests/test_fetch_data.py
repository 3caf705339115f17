"""fetch-data end to end as Argo runs it: sources, formats, schemas, data errors, stats."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_faults import Answer, FaultServer, fault_server

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
        ]
    }
    for i in range(40)
]


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with fault_server() as s:
        yield s


def fetch(tmp_path: Path, *args: str, config: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "steps.fetch_data",
            *args,
            "--work",
            str(tmp_path / "work"),
            "--outputs",
            str(tmp_path / "out"),
            "--training-config",
            json.dumps(config or {}),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def volume(tmp_path: Path, path: Path, config: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    return fetch(tmp_path, "--input-kind", "volume", "--input-path", str(path), config=config)


def outputs(tmp_path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_url_source_with_the_seed_shape(server: FaultServer, tmp_path: Path) -> None:
    url = server.route(
        "/datasets/d/resolve/main/data/train-00000-of-00001.parquet", Answer(500), Answer(body=parquet_bytes(ROWS))
    )
    result = fetch(
        tmp_path,
        "--input-kind",
        "urls",
        "--input-urls",
        json.dumps([url + "?download=true"]),
        "--allow-local-urls",
        "true",
    )
    assert result.returncode == 0, result.stderr
    assert outputs(tmp_path)["rows"] == "40"
    assert (tmp_path / "work" / "downloads" / "0" / "train-00000-of-00001.parquet").exists()


def test_loopback_url_refused_without_the_flag(server: FaultServer, tmp_path: Path) -> None:
    url = server.route("/d.parquet", Answer(body=parquet_bytes(ROWS)))
    result = fetch(tmp_path, "--input-kind", "urls", "--input-urls", json.dumps([url]))
    assert result.returncode == 2 and "loopback" in result.stderr
    assert server.seen == []  # refused before any request


def test_404_is_exit_2_and_exhausted_retries_exit_75(server: FaultServer, tmp_path: Path) -> None:
    url = server.route("/missing.parquet", Answer(404))
    result = fetch(tmp_path, "--input-kind", "urls", "--input-urls", json.dumps([url]), "--allow-local-urls", "true")
    assert result.returncode == 2 and "HTTP 404" in result.stderr and "Traceback" not in result.stderr
    with fault_server() as gone:
        dead = gone.url + "/d.parquet"
    result = fetch(tmp_path, "--input-kind", "urls", "--input-urls", json.dumps([dead]), "--allow-local-urls", "true")
    assert result.returncode == 75 and "transient" in result.stderr


def test_token_file_is_sent_and_never_printed(server: FaultServer, tmp_path: Path) -> None:
    url = server.route("/gated.parquet", Answer(body=parquet_bytes(ROWS)))
    token = tmp_path / "token"
    token.write_text("hf_s3cr3tvalue\n")
    result = fetch(
        tmp_path,
        "--input-kind",
        "urls",
        "--input-urls",
        json.dumps([url]),
        "--allow-local-urls",
        "true",
        "--token-file",
        str(token),
    )
    assert result.returncode == 0, result.stderr
    assert server.requests_for("/gated.parquet")[0].headers["Authorization"] == "Bearer hf_s3cr3tvalue"
    assert "s3cr3t" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "name", ["d.parquet", "d.arrow", "d.jsonl", "d.json", "d.csv", "d.jsonl.gz", "d.jsonl.zst", "d.parquet.gz"]
)
def test_formats_and_compression(tmp_path: Path, name: str) -> None:
    table = pa.Table.from_pylist([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])
    path = tmp_path / name
    base = name.removesuffix(".gz").removesuffix(".zst")
    if base.endswith(".parquet"):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
    elif base.endswith(".arrow"):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        data = sink.getvalue().to_pybytes()
    elif base.endswith(".jsonl"):
        data = jsonl(table.to_pylist()).encode()
    elif base.endswith(".json"):
        data = json.dumps(table.to_pylist()).encode()
    else:
        data = ("prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(20))).encode()
    if name.endswith(".gz"):
        data = gzip.compress(data)
    if name.endswith(".zst"):
        data = pa.compress(data, codec="zstd", asbytes=True)
        # pyarrow's raw zstd block lacks the frame's content size; a frame from the stream writer is standard.
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as out:
            out.write(jsonl(table.to_pylist()).encode())
        data = sink.getvalue().to_pybytes()
    path.write_bytes(data)
    result = volume(tmp_path, path)
    assert result.returncode == 0, result.stderr
    assert outputs(tmp_path)["rows"] == "20"
    stats = json.loads((tmp_path / "work" / "data" / "stats.json").read_text())
    assert stats["schema"] == "prompt_completion"


@pytest.mark.parametrize(
    ("record", "schema"),
    [
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "conversations"),
        ({"instruction": "q", "input": "ctx", "output": "a"}, "alpaca"),
        ({"prompt": "q", "completion": "a"}, "prompt_completion"),
        ({"text": "plain text to learn"}, "text"),
        ({"messages": json.dumps(ROWS[0]["messages"])}, "messages"),  # a JSON string column, as in CSV
    ],
)
def test_schemas_are_detected(tmp_path: Path, record: dict[str, Any], schema: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl([record] * 10))
    assert volume(tmp_path, path).returncode == 0
    stats = json.loads((tmp_path / "work" / "data" / "stats.json").read_text())
    assert stats["schema"] == schema and stats["bad_rows"] == 0
    train = pq.read_table(tmp_path / "work" / "data" / "train.parquet").to_pylist()
    assert train[0]["messages"][-1]["role"] == "assistant"


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl(ROWS[:1]) + "{not json\n")
    result = volume(tmp_path, path)
    assert result.returncode == 2 and "d.jsonl line 2: is not valid JSON" in result.stderr


def test_directory_of_shards(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-0.jsonl").write_text(jsonl(ROWS[:25]))
    (shards / "part-1.jsonl").write_text(jsonl(ROWS[25:]))
    (shards / "README.md").write_text("not data")
    assert volume(tmp_path, shards).returncode == 0
    assert outputs(tmp_path)["rows"] == "40"


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (b"PAR1 this is not parquet", "d.parquet: is not a valid parquet file"),
        (b"", "d.parquet: is empty"),
    ],
    ids=["corrupt-parquet", "empty-file"],
)
def test_broken_files_name_the_file(tmp_path: Path, content: bytes, phrase: str) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(content)
    result = volume(tmp_path, path)
    assert result.returncode == 2 and phrase in result.stderr and "Traceback" not in result.stderr


def test_unknown_columns_name_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl([{"question": "q", "answer": "a"}]))
    result = volume(tmp_path, path)
    assert result.returncode == 2
    assert "d.jsonl row 0: has no recognised chat columns (found: answer, question)" in result.stderr


def test_mixed_schemas_name_both_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl([*ROWS[:3], {"instruction": "q", "output": "a"}]))
    result = volume(tmp_path, path)
    assert result.returncode == 2
    assert "d.jsonl row 3: is alpaca but d.jsonl row 0 is messages: mixed schemas" in result.stderr


def test_non_utf8_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(ROWS[:2]).encode() + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    result = volume(tmp_path, path)
    assert result.returncode == 2 and "d.jsonl line 3: is not UTF-8" in result.stderr


def test_bad_rows_are_reported_with_file_row_and_column(tmp_path: Path) -> None:
    rows = [
        *ROWS,
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl(rows))
    result = volume(tmp_path, path, config={"DatasetConfig": {"max_bad_fraction": 0.1}})
    assert result.returncode == 0, result.stderr
    report = [json.loads(line) for line in (tmp_path / "work" / "data" / "bad_rows.jsonl").read_text().splitlines()]
    assert report == [
        {
            "file": "d.jsonl",
            "row": 40,
            "column": "messages",
            "reason": "message 0 has unknown role 'robot' (use system, user, assistant, tool)",
        },
        {
            "file": "d.jsonl",
            "row": 41,
            "column": "messages",
            "reason": "message 1 (assistant) has empty or non-string content",
        },
        {"file": "d.jsonl", "row": 42, "column": "messages", "reason": "has no assistant turn to learn from"},
    ]
    assert outputs(tmp_path)["bad-rows"] == "3"
    # Over the default 5% they fail the step, and nothing is left half-written.
    result = volume(tmp_path / "strict", path)
    assert result.returncode == 2 and "3 of 43 rows are bad" in result.stderr
    assert not (tmp_path / "strict" / "work" / "data").exists()


def test_kaito_dataset_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl([{"ctx": f"q{i}", "resp": f"a{i}"} for i in range(10)]))
    result = volume(tmp_path, path, config={"DatasetConfig": {"context_column": "ctx", "response_column": "resp"}})
    assert result.returncode == 0, result.stderr
    train = pq.read_table(tmp_path / "work" / "data" / "train.parquet").to_pylist()
    assert train[0]["messages"][1]["role"] == "assistant"


def test_token_stats_use_the_presets_tokenizer(tmp_path: Path, kaitune_cache: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl(ROWS))
    result = fetch(tmp_path, "--input-kind", "volume", "--input-path", str(path), "--model", "tiny-phi3",
                   "--max-seq-length", "24")  # fmt: skip
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "work" / "data" / "stats.json").read_text())["tokens"]
    assert 10 < stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"] < 100
    assert stats["tokenizer"] == "tiny-phi3" and stats["over_max_length"] > 0
    out = outputs(tmp_path)
    assert out["token-p50"] == str(stats["p50"]) and out["rows-over-max-length"] == str(stats["over_max_length"])
    assert "tokens" in result.stderr  # the human summary


def test_image_source_from_an_oci_layout(tmp_path: Path) -> None:
    from steps.oci import adapter_image, layout

    shard = tmp_path / "train.jsonl"
    shard.write_text(jsonl(ROWS))
    image = adapter_image.build_from_files([shard], {}, tmp_path / "staging")
    layout.write_image(tmp_path / "layout", image, "v1")
    result = fetch(tmp_path, "--input-kind", "image", "--input-image", f"oci-layout://{tmp_path / 'layout'}:v1")
    assert result.returncode == 0, result.stderr
    assert outputs(tmp_path)["rows"] == str(len(ROWS))
    assert sorted(p.name for p in (tmp_path / "work" / "input-image").iterdir()) == [
        ".kaitune-image.json",
        "train.jsonl",
    ]


def test_rerun_reuses_prepared_data(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl(ROWS))
    assert volume(tmp_path, path).returncode == 0
    again = volume(tmp_path, path)
    assert again.returncode == 0 and "already prepared" in again.stderr
    path.write_text(jsonl(ROWS[:30]))
    changed = volume(tmp_path, path)
    assert "already prepared" not in changed.stderr and outputs(tmp_path)["rows"] == "30"
