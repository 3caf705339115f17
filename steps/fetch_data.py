"""fetch-data: turn ``tuning.input`` into validated train/eval ``messages`` parquet files.

Outputs (one file each): rows, train-rows, eval-rows, bad-rows, dataset-digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

from pipelines.errors import BadInput, Problem
from pipelines.url_policy import url_problem
from steps.chat_data import Messages, data_files, detect_schema, normalize, read_records
from steps.contract import Progress, atomic_dir, run_step, write_json_atomic, write_outputs
from steps.download import fetch

log = logging.getLogger("kaitune")
EVAL_FRACTION_WHEN_NONE = 0.1  # Kaito's default train_test_split: 1 leaves no eval set at all


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m steps.fetch_data", description=__doc__)
    p.add_argument("--input-kind", choices=["urls", "image", "volume"], required=True)
    p.add_argument("--input-urls", default="[]", help="JSON list of http(s) URLs")
    p.add_argument("--input-image", default="")
    p.add_argument("--input-path", default="", help="where the input volume is mounted")
    p.add_argument("--training-config", default="{}", help="Kaito training_config sections as JSON")
    p.add_argument("--work", type=Path, required=True, help="the work volume")
    p.add_argument("--outputs", type=Path, required=True)
    p.add_argument("--max-bad-fraction", type=float, default=0.05)
    p.add_argument("--allow-local-urls", default="false")
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
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    return [rows[i] for i in train_idx], [rows[i] for i in eval_idx]


def _write_parquet(path: Path, rows: list[Messages]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"messages": m} for m in rows]), path)


def _digest(rows: list[Messages]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return f"sha256:{h.hexdigest()}"


def gather_files(args: argparse.Namespace) -> list[Path]:
    if args.input_kind == "volume":
        return data_files(Path(args.input_path))
    if args.input_kind == "image":
        raise BadInput(
            Problem(
                "tuning.input.image",
                "pulling dataset images is not available yet in this kaitune version",
                "use input.urls or input.volumeSource for now",
            )
        )
    urls = json.loads(args.input_urls)
    allow_local = args.allow_local_urls.lower() == "true"
    files = []
    for i, url in enumerate(urls):
        why = url_problem(url, allow_local=allow_local)
        if why:
            raise BadInput(Problem(f"tuning.input.urls[{i}]", f"{url!r} {why}", "use a public http(s) URL"))
        files.extend(data_files(fetch(url, args.work / "downloads" / str(i))))
    return files


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sections = json.loads(args.training_config)
    dataset_config = sections.get("DatasetConfig", {})
    data_dir = args.work / "data"
    progress = Progress(3)
    files = gather_files(args)
    progress.update(1)

    records: list[dict[str, Any]] = []
    for path in files:
        records.extend(read_records(path))
    schema = dataset_config.get("schema") or detect_schema(records)
    rows, bad = normalize(records, schema)
    for row in bad[:10]:
        log.warning("row %d skipped: %s", row.index, row.reason)
    if not records:
        raise BadInput(Problem("dataset", "is empty", "check that the input holds rows"))
    if len(bad) / len(records) > args.max_bad_fraction:
        raise BadInput(
            Problem(
                "dataset",
                f"{len(bad)} of {len(records)} rows are bad (first: row {bad[0].index} "
                f"{bad[0].reason}), over the {args.max_bad_fraction:.0%} limit",
                "fix the rows listed in the log, or raise --max-bad-fraction",
            )
        )
    train, evaluation = split(rows, dataset_config)
    if not train:
        raise BadInput(Problem("dataset", "has no rows left to train on", "provide more rows"))
    progress.update(2)

    with atomic_dir(data_dir) as tmp:
        _write_parquet(tmp / "train.parquet", train)
        _write_parquet(tmp / "eval.parquet", evaluation)
        stats = {
            "schema": schema,
            "files": [p.name for p in files],
            "rows": len(records),
            "bad_rows": len(bad),
            "train_rows": len(train),
            "eval_rows": len(evaluation),
            "digest": _digest(rows),
            "skipped": [{"index": b.index, "reason": b.reason} for b in bad],
        }
        write_json_atomic(tmp / "stats.json", stats)
    progress.update(3)
    log.info(
        "%d rows (%s schema): %d train, %d eval, %d skipped",
        len(records),
        schema,
        len(train),
        len(evaluation),
        len(bad),
    )
    write_outputs(
        args.outputs,
        {
            "rows": str(len(records)),
            "train-rows": str(len(train)),
            "eval-rows": str(len(evaluation)),
            "bad-rows": str(len(bad)),
            "dataset-digest": stats["digest"],
        },
    )


if __name__ == "__main__":
    run_step("fetch-data", main)
