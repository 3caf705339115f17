"""The transformers runtime over real HTTP on loopback: streaming, Kaito's /chat, and bad input that never crashes."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

QUESTION = [{"role": "user", "content": "What is 2 plus 2?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, kaitune_cache: Path) -> Iterator[str]:
    import uvicorn
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps import tiny_phi3
    from steps.serve import Engine, create_app

    base = tiny_phi3.ensure()
    adapter = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["qkv_proj"]))
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    engine = Engine("tiny-phi3", adapter, "ws")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(engine, max_queue=2), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


def post(url: str, body: Any, raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json",
                                                                          **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_streaming_gives_the_same_text_as_a_plain_answer(server: str) -> None:
    body = {"model": "ws", "messages": QUESTION, "max_tokens": 12}
    status, plain = post(f"{server}/v1/chat/completions", body)
    assert status == 200
    text = json.loads(plain)["choices"][0]["message"]["content"]
    status, streamed = post(f"{server}/v1/chat/completions", {**body, "stream": True})
    assert status == 200
    events = [line.removeprefix("data: ") for line in streamed.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"} and chunks[-1]["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text


def test_bad_input_gets_http_errors_and_the_server_keeps_serving(server: str) -> None:
    status, answer = post(f"{server}/v1/chat/completions", {"model": "nope", "messages": QUESTION})
    assert status == 404 and b"available" in answer
    assert post(f"{server}/chat", None, raw=b"{not json")[0] == 422
    assert post(f"{server}/chat", {"prompt": "hi", "messages": QUESTION})[0] == 422  # both inputs
    status, answer = post(f"{server}/chat", {"prompt": "word " * 3000})
    assert status == 400 and b"tokens" in answer and b"context holds 512" in answer
    status, answer = post(f"{server}/v1/chat/completions", {"model": "ws", "messages": QUESTION, "max_tokens": 99999,
                                                             "stream": True})  # fmt: skip
    assert status == 400 and b"context holds" in answer
    status, answer = post(f"{server}/chat", {"prompt": "hi", "generate_kwargs": {"no_such_argument": 1}})
    assert status == 400 and b"no_such_argument" in answer
    # An oversized body is refused from its Content-Length, before any of it is read.
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/chat")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str((1 << 20) + 1))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    assert post(f"{server}/chat", {"prompt": "hi", "generate_kwargs": {"max_new_tokens": 4}})[0] == 200


def test_past_the_queue_limit_requests_get_503_not_a_pile_up(server: str) -> None:
    body = {"prompt": "Tell me a long story.", "generate_kwargs": {"max_new_tokens": 48, "min_new_tokens": 48}}
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: post(f"{server}/chat", body)[0], range(8)))
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    assert set(statuses) <= {200, 503}
    assert post(f"{server}/chat", {"prompt": "hi", "generate_kwargs": {"max_new_tokens": 2}})[0] == 200
