"""serve: the inference server, base model + LoRA adapter, with Kaito's ``/chat`` and the OpenAI API.

Runtime ``vllm`` (production): vLLM's OpenAI server with ``--enable-lora``, this process
replaced by it, and Kaito's ``/chat`` added in-process by kaitune's vLLM endpoint plugin.
Runtime ``transformers`` (CPU/local): transformers + peft in this process.
Routes: /health, /v1/models, /v1/chat/completions (with ``stream``), /chat.
Bad input is an HTTP error, never a crash: malformed bodies 422, a prompt longer
than the context 400 with the numbers, an unknown model 404, bodies over 1 MiB
413; past ``--max-queue`` waiting requests the server answers 503 with Retry-After.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from steps.contract import run_step

log = logging.getLogger("kaitune")
DEFAULT_MAX_NEW_TOKENS = 64
MAX_BODY_BYTES = 1 << 20


class InputTooLong(ValueError):
    """The prompt and the requested new tokens do not fit the model's context."""


class ChatMessage(BaseModel):
    role: str
    content: str


class KaitoChatRequest(BaseModel):
    """Kaito's /chat body: a prompt or messages, plus transformers generate kwargs."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    generate_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_input(self) -> KaitoChatRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class ChatCompletionRequest(BaseModel):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False


class Engine:
    """The loaded model; generation is serialised because one model serves all requests."""

    def __init__(self, base: str, adapter_dir: Path | None, adapter_name: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from steps.model_loading import resolve_base

        source, self.base_name = resolve_base(base)
        tokenizer_source = adapter_dir if adapter_dir and (adapter_dir / "tokenizer_config.json").exists() else source
        self.tokenizer: Any = AutoTokenizer.from_pretrained(tokenizer_source)
        model: Any = AutoModelForCausalLM.from_pretrained(source)
        self.adapter_name = adapter_name if adapter_dir else None
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name)
        self.model = model.eval()
        self.lock = threading.Lock()

    def model_names(self) -> list[str]:
        return [self.base_name, *([self.adapter_name] if self.adapter_name else [])]

    @property
    def context_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", 0) or self.tokenizer.model_max_length)

    def _prepare(self, prompt_text: str, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        gen = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False, **kwargs}
        if not gen.get("do_sample"):
            gen.pop("temperature", None)
            gen.pop("top_p", None)
        inputs = self.tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False)
        prompt_tokens, new_tokens = int(inputs["input_ids"].shape[1]), int(gen["max_new_tokens"])
        if prompt_tokens + new_tokens > self.context_length:
            raise InputTooLong(
                f"the prompt has {prompt_tokens} tokens and {new_tokens} new tokens were asked for, but the "
                f"context holds {self.context_length}: shorten the prompt or lower max_tokens/max_new_tokens"
            )
        return inputs, gen

    def generate(self, prompt_text: str, *, use_adapter: bool, kwargs: dict[str, Any]) -> tuple[str, int, int]:
        import torch

        inputs, gen = self._prepare(prompt_text, kwargs)
        with self.lock, torch.no_grad(), self._adapter(use_adapter):
            out = self.model.generate(**inputs, pad_token_id=self.tokenizer.pad_token_id, **gen)
        new = out[0, inputs["input_ids"].shape[1] :]
        text: str = self.tokenizer.decode(new, skip_special_tokens=True)
        return text, int(inputs["input_ids"].shape[1]), len(new)

    def stream(self, prompt_text: str, *, use_adapter: bool, kwargs: dict[str, Any]) -> Any:
        """Yield text pieces as they are generated (generation runs in a thread, under the model lock)."""
        import torch
        from transformers import TextIteratorStreamer

        inputs, gen = self._prepare(prompt_text, kwargs)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)

        def run() -> None:
            with self.lock, torch.no_grad(), self._adapter(use_adapter):
                self.model.generate(**inputs, pad_token_id=self.tokenizer.pad_token_id, streamer=streamer, **gen)

        threading.Thread(target=run, daemon=True).start()
        yield from streamer

    def _adapter(self, use_adapter: bool) -> Any:
        if self.adapter_name and not use_adapter:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def chat_prompt(self, messages: list[ChatMessage]) -> str:
        text: str = self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
        )
        return text


def create_app(engine: Engine, max_queue: int = 64) -> Any:
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="kaitune inference", version="1")
    # Requests past this many in flight are refused at once (503) rather than piling up behind the model lock.
    admission = threading.BoundedSemaphore(max_queue)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    @contextlib.contextmanager
    def admitted() -> Any:
        if not admission.acquire(blocking=False):
            raise HTTPException(503, "the server is busy; retry shortly", headers={"Retry-After": "1"})
        try:
            yield
        except InputTooLong as exc:
            raise HTTPException(400, str(exc)) from None
        except (ValueError, TypeError) as exc:  # generate() rejecting a generate_kwargs entry
            raise HTTPException(400, f"invalid generation arguments: {exc}") from None
        finally:
            admission.release()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "owned_by": "kaitune"} for name in engine.model_names()],
        }

    @app.post("/chat")
    def chat(body: KaitoChatRequest) -> dict[str, str]:
        # An instruct model answers a bare prompt best as one user turn of its chat template.
        messages = body.messages or [ChatMessage(role="user", content=body.prompt or "")]
        with admitted():
            text, _, _ = engine.generate(engine.chat_prompt(messages), use_adapter=True,
                                         kwargs=dict(body.generate_kwargs))  # fmt: skip
        return {"Result": text}

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatCompletionRequest) -> Any:
        if body.model not in engine.model_names():
            raise HTTPException(404, f"model {body.model!r} not found; available: {engine.model_names()}")
        kwargs: dict[str, Any] = {}
        if body.max_tokens:
            kwargs["max_new_tokens"] = body.max_tokens
        if body.temperature:
            kwargs.update(do_sample=True, temperature=body.temperature)
        if body.top_p is not None:
            kwargs["top_p"] = body.top_p
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        prompt = engine.chat_prompt(body.messages)
        use_adapter = body.model == engine.adapter_name
        if body.stream:
            with admitted():
                pieces = engine.stream(prompt, use_adapter=use_adapter, kwargs=kwargs)
                first = next(pieces, None)  # a too-long prompt fails here, before the 200 is sent

            def events() -> Any:
                def chunk(delta: dict[str, str], finish: str | None) -> str:
                    payload = {"id": ident, "object": "chat.completion.chunk", "created": created,
                               "model": body.model, "choices": [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish}]}  # fmt: skip
                    return f"data: {json.dumps(payload)}\n\n"

                yield chunk({"role": "assistant"}, None)
                for piece in [first, *pieces] if first is not None else []:
                    if piece:
                        yield chunk({"content": piece}, None)
                yield chunk({}, "stop")
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        with admitted():
            text, prompt_tokens, completion_tokens = engine.generate(prompt, use_adapter=use_adapter, kwargs=kwargs)
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop" if completion_tokens < kwargs.get("max_new_tokens", 64) else "length",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    return app


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """vLLM's OpenAI server for the base model with the adapter, and the environment that loads /chat."""
    from steps.model_loading import resolve_base
    from steps.vllm_chat import ADAPTER_ENV, PLUGIN_NAME

    source, base_name = resolve_base(args.base_model)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(source),
            "--served-model-name", base_name, "--host", args.host, "--port", str(args.port), "--dtype", args.dtype,
            "--generation-config", "vllm"]  # fmt: skip
    env = {**os.environ, "VLLM_PLUGINS": PLUGIN_NAME}
    if args.adapter_dir is not None:
        rank = int(json.loads((args.adapter_dir / "adapter_config.json").read_text()).get("r", 8))
        max_rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
        argv += ["--enable-lora", "--lora-modules", f"{args.adapter_name}={args.adapter_dir}",
                 "--max-lora-rank", str(max_rank)]  # fmt: skip
        env[ADAPTER_ENV] = args.adapter_name
    return argv + shlex.split(args.vllm_args), env


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m steps.serve", description=__doc__)
    p.add_argument("--base-model", required=True)
    p.add_argument("--adapter-dir", type=Path)
    p.add_argument("--adapter-name", default="adapter")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--runtime", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--dtype", default="auto", help="vllm runtime: the model dtype (auto, bfloat16, float32, ...)")
    p.add_argument("--vllm-args", default="", help='vllm runtime: more server flags, e.g. "--max-model-len 4096"')
    p.add_argument("--max-queue", type=int, default=64, help="requests in flight before 503")
    args = p.parse_args(argv)
    if args.runtime == "vllm":
        command, env = vllm_command(args)
        log.info("starting vLLM: %s", " ".join(command))
        os.execve(command[0], command, env)  # vLLM takes over this process: signals and probes reach it
    import uvicorn

    engine = Engine(args.base_model, args.adapter_dir, args.adapter_name)
    log.info("serving %s on http://%s:%d", engine.model_names(), args.host, args.port)
    uvicorn.run(create_app(engine, args.max_queue), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_step("serve", main)
