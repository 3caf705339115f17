"""fetch-data: turn ``tuning.input`` into validated train/eval ``messages`` parquet files.

Sources: http(s) URLs (resumable, verified downloads), a mounted volume or local
path (a file or a directory of shards), or an OCI image (registry or layout) with
data under /data, digests verified. Writes to the work volume ``data/``: train.parquet, eval.parquet,
stats.json and bad_rows.jsonl (each skipped row with its reason).

Outputs: rows, bad-rows, train-rows, eval-rows, dataset-digest, token-p50,
token-p95, token-p99, rows-over-max-length.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.errors import BadInput, Problem
from pipelines.url_policy import url_problem
from steps.chat_data import BadRow, Columns, Messages, normalize
from steps.contract import Progress, atomic_dir, run_step, write_json_atomic, write_outputs
from steps.dataset_files import Record, data_files, read_records
from steps.http_fetch import Downloader, read_token, terminal_progress
from steps.oci import options, transfer
from steps.oci.options import RegistryOptions
from steps.token_stats import TokenStats, try_measure

log = logging.getLogger("kaitune")
EVAL_FRACTION_WHEN_NONE = 0.1  # Kaito's default train_test_split: 1 leaves no eval set at all
DEFAULT_MAX_BAD_FRACTION = 0.05


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m steps.fetch_data", description=__doc__)
    p.add_argument("--input-kind", choices=["urls", "image", "volume"], required=True)
    p.add_argument("--input-urls", default="[]", help="JSON list of http(s) URLs (#sha256=HEX to verify)")
    p.add_argument(
        "--input-image", default="", help="registry/repo:tag, ...@sha256:..., or oci-layout://DIR[@DIGEST|:TAG]"
    )
    p.add_argument("--input-path", default="", help="where the input volume is mounted, or a local path")
    p.add_argument("--training-config", default="{}", help="Kaito training_config sections as JSON")
    p.add_argument("--model", default="", help="preset or model id whose tokenizer measures token lengths")
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--token-file", default="", help="mounted secret file with a bearer token for the URLs")
    p.add_argument("--work", type=Path, required=True, help="the work volume")
    p.add_argument("--outputs", type=Path, required=True)
    p.add_argument("--max-bad-fraction", type=float, default=None)
    p.add_argument("--allow-local-urls", default="false")
    options.add_arguments(p)
    return p.parse_args(argv)


def split(rows: list[Messages], dataset_config: dict[str, Any]) -> tuple[list[Messages], list[Messages]]:
    fraction = float(dataset_config.get("train_test_split", 0.8))
    if not 0 < fraction <= 1:
        raise BadInput(Problem("DatasetConfig.train_test_split", f"is {fraction}", "use a number in (0, 1]"))
    order = list(range(len(rows)))
    if dataset_config.get("shuffle_dataset", True):
        random.Random(int(dataset_config.get("shuffle_seed", 42))).shuffle(order)
    if fraction >= 1:
        fraction = 1 - EVAL_FRACTION_WHEN_NONE
        log.info(
            "train_test_split is 1 (Kaito's default): holding out %.0f%% for eval so eval loss is measured",
            EVAL_FRACTION_WHEN_NONE * 100,
        )
    n_eval = max(1, round(len(rows) * (1 - fraction))) if len(rows) > 1 else 0
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def _write_parquet(path: Path, rows: list[Messages]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    pq.write_table(pa.Table.from_pylist([{"messages": m} for m in rows], schema=schema), path)


def _digest(rows: list[Messages]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return f"sha256:{h.hexdigest()}"


def _image_files(ref: str, work: Path, registry: RegistryOptions) -> list[Path]:
    dest = work / "input-image"
    transfer.pull(ref, dest, registry)
    return data_files(dest)


def gather_files(args: argparse.Namespace, dataset_config: dict[str, Any]) -> list[Path]:
    if args.input_kind == "volume":
        return data_files(Path(args.input_path))
    if args.input_kind == "image":
        return _image_files(args.input_image, args.work, options.from_args(args))
    urls = json.loads(args.input_urls)
    allow_local = args.allow_local_urls.lower() == "true"
    progress = Progress(100)

    bar = terminal_progress()

    def on_bytes(done: int, total: int | None) -> None:
        if total:
            progress.update(int(50 * done / total))  # downloading is the first half of the step
        if bar:
            bar(done, total)

    downloader = Downloader(
        token=read_token(args.token_file), ca_file=str(args.ca_file) if args.ca_file else None, on_progress=on_bytes
    )
    files = []
    for i, url in enumerate(urls):
        why = url_problem(url, allow_local=allow_local)
        if why:
            raise BadInput(Problem(f"tuning.input.urls[{i}]", f"{url!r} {why}", "use a public http(s) URL"))
        sha = dataset_config.get("sha256") if len(urls) == 1 else None
        files.extend(data_files(downloader.fetch(url, args.work / "downloads" / str(i), sha256=sha)))
    return files


def _input_key(args: argparse.Namespace, files: list[Path]) -> str:
    parts = [
        args.input_kind,
        args.input_urls,
        args.input_image,
        args.training_config,
        args.model,
        str(args.max_seq_length),
        str(args.max_bad_fraction),
    ]
    parts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return "sha256:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _outputs(stats: dict[str, Any]) -> dict[str, str]:
    tokens = stats.get("tokens") or {}
    return {
        "rows": str(stats["rows"]),
        "bad-rows": str(stats["bad_rows"]),
        "train-rows": str(stats["train_rows"]),
        "eval-rows": str(stats["eval_rows"]),
        "dataset-digest": stats["digest"],
        "token-p50": str(tokens.get("p50", "")),
        "token-p95": str(tokens.get("p95", "")),
        "token-p99": str(tokens.get("p99", "")),
        "rows-over-max-length": str(tokens.get("over_max_length", "")),
    }


def _summary(stats: dict[str, Any], bad: list[BadRow]) -> None:
    table = Table(title="fetch-data", show_header=False, title_justify="left")
    table.add_row("schema", stats["schema"])
    table.add_row(
        "rows",
        f"{stats['rows']} ({stats['bad_rows']} skipped) -> {stats['train_rows']} train, {stats['eval_rows']} eval",
    )
    tokens = stats.get("tokens")
    if tokens:
        table.add_row(
            "tokens",
            f"p50 {tokens['p50']}, p95 {tokens['p95']}, p99 {tokens['p99']}, max {tokens['max']}"
            f" ({tokens['over_max_length']} rows over max length {tokens['max_length']})",
        )
    for row in bad[:5]:
        table.add_row("skipped", row.render())
    Console(stderr=True, width=120).print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sections = json.loads(args.training_config)
    dataset_config = sections.get("DatasetConfig", {})
    max_bad = args.max_bad_fraction
    if max_bad is None:
        max_bad = float(dataset_config.get("max_bad_fraction", DEFAULT_MAX_BAD_FRACTION))
    data_dir = args.work / "data"
    files = gather_files(args, dataset_config)
    key = _input_key(args, files)
    stats_path = data_dir / "stats.json"
    if stats_path.exists() and json.loads(stats_path.read_text()).get("input_key") == key:
        log.info("dataset for these inputs is already prepared; reusing it")
        write_outputs(args.outputs, _outputs(json.loads(stats_path.read_text())))
        return
    progress = Progress(100)
    progress.update(50)

    def records() -> Iterator[Record]:
        for path in files:
            yield from read_records(path)

    schema, rows, bad = normalize(records(), Columns.from_dataset_config(dataset_config))
    total = len(rows) + len(bad)
    if bad:
        log.warning("%d of %d rows skipped; first: %s", len(bad), total, bad[0].render())
    if len(bad) > max_bad * total:
        raise BadInput(
            Problem(
                "dataset",
                f"{len(bad)} of {total} rows are bad ({len(bad) / total:.1%}, over the "
                f"{max_bad:.0%} limit); first: {bad[0].render()}",
                "fix those rows, or raise DatasetConfig.max_bad_fraction to skip them",
            )
        )
    train, evaluation = split(rows, dataset_config)
    if not train:
        raise BadInput(Problem("dataset", "has no rows left to train on", "provide more rows"))
    progress.update(75)
    tokens: TokenStats | None = try_measure(rows, args.model, args.max_seq_length) if args.model else None
    stats = {
        "input_key": key,
        "schema": schema,
        "files": [p.name for p in files],
        "rows": total,
        "bad_rows": len(bad),
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "digest": _digest(rows),
        "tokens": tokens.as_dict() if tokens else None,
    }
    with atomic_dir(data_dir) as tmp:
        _write_parquet(tmp / "train.parquet", train)
        _write_parquet(tmp / "eval.parquet", evaluation)
        (tmp / "bad_rows.jsonl").write_text(
            "".join(
                json.dumps({"file": b.file, "row": b.row, "column": b.column, "reason": b.reason}) + "\n" for b in bad
            )
        )
        write_json_atomic(tmp / "stats.json", stats)
    progress.update(100)
    _summary(stats, bad)
    write_outputs(args.outputs, _outputs(stats))


if __name__ == "__main__":
    run_step("fetch-data", main)
