"""fetch-data throughput: kaitune's step vs the straightforward Hugging Face datasets path, same run.

A 15,000-row dataset shaped like dolly-15k-oai-style (system/user/assistant messages,
a long tail of lengths) is served as parquet from a loopback HTTP server. Both sides
start as fresh processes and do the same work: fetch, validate, normalize, and
token-length stats with the same tokenizer (tiny-phi3's, built offline).

* kaitune: ``python -m steps.fetch_data`` (download, row validation, split, parquet
  out, token stats).
* baseline: ``datasets.load_dataset("parquet", data_files=URL)`` then
  ``.map(apply_chat_template)`` and a tokenizer pass for lengths.

Prints wall time, rows/s and peak RSS for each, and the ratios.

    python benchmarks/bench_fetch_data.py [--rows 15000]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BASELINE = r"""
import sys, time
from datasets import load_dataset
from transformers import AutoTokenizer
url, tok_dir, cache = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(tok_dir)
ds = load_dataset("parquet", data_files=url, split="train", cache_dir=cache)
ds = ds.map(lambda row: {"text": tok.apply_chat_template(row["messages"], tokenize=False)})
ds = ds.map(lambda batch: {"n": [len(x) for x in tok(batch["text"], add_special_tokens=False)["input_ids"]]},
            batched=True)
lengths = sorted(ds["n"])
print(len(ds), lengths[len(lengths) // 2])
"""


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return


def dolly_like(n: int, seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    words = [
        "the", "a", "river", "city", "model", "train", "data", "answer", "question", "because", "which", "people",
        "often", "small", "large", "time", "history", "science", "music", "water", "light", "energy", "system",
        "write", "read", "build", "learn",
    ]  # fmt: skip

    def text(mean_words: float) -> str:
        k = max(1, min(1200, int(rng.lognormvariate(mean_words, 0.9))))
        return " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."

    rows = []
    for _ in range(n):
        messages = [{"role": "user", "content": text(2.6)}, {"role": "assistant", "content": text(4.2)}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": text(3.0)})
        rows.append({"messages": messages})
    return rows


def peak_rss_mb(cmd: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    out, err = proc.stdout.read() if proc.stdout else "", proc.stderr.read() if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss / 1024, subprocess.CompletedProcess(cmd, code, out, err)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=15000)
    args = parser.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    from steps import tiny_phi3

    tokenizer_dir = tiny_phi3.ensure_tokenizer()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "serve").mkdir()
        pq.write_table(pa.Table.from_pylist(dolly_like(args.rows)), tmp / "serve" / "train.parquet")
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp / "serve")))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/train.parquet"
            env = {**os.environ, "HF_DATASETS_OFFLINE": "0", "PYTHONWARNINGS": "ignore"}
            ours_s, ours_mb, ours = peak_rss_mb(
                [
                    sys.executable,
                    "-m",
                    "steps.fetch_data",
                    "--input-kind",
                    "urls",
                    "--input-urls",
                    json.dumps([url]),
                    "--allow-local-urls",
                    "true",
                    "--model",
                    "tiny-phi3",
                    "--max-seq-length",
                    "2048",
                    "--work",
                    str(tmp / "work"),
                    "--outputs",
                    str(tmp / "out"),
                ],
                env,
            )
            assert ours.returncode == 0, ours.stderr[-2000:]
            base_s, base_mb, base = peak_rss_mb(
                [sys.executable, "-c", BASELINE, url, str(tokenizer_dir), str(tmp / "hf-cache")], env
            )
            assert base.returncode == 0, base.stderr[-2000:]
        finally:
            server.shutdown()
            server.server_close()
        rows = int((tmp / "out" / "rows").read_text())
        p50 = (tmp / "out" / "token-p50").read_text()
        base_rows, base_p50 = base.stdout.split()
        assert int(base_rows) == rows == args.rows, (base_rows, rows)
    print(f"rows: {rows}, median tokens/row: kaitune {p50}, baseline {base_p50}")
    print(f"kaitune fetch-data:            {ours_s:6.2f}s  {rows / ours_s:8.0f} rows/s  peak RSS {ours_mb:6.0f} MB")
    print(f"datasets.load_dataset + .map:  {base_s:6.2f}s  {rows / base_s:8.0f} rows/s  peak RSS {base_mb:6.0f} MB")
    print(
        f"ratio (baseline time / kaitune time): {base_s / ours_s:.2f}x; RSS kaitune/baseline: {ours_mb / base_mb:.2f}"
    )


if __name__ == "__main__":
    main()
