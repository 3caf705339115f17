"""serve: the inference server, base model + LoRA adapter, with Kaito's ``/chat`` and the OpenAI API.

Runtime ``transformers`` (CPU/local): transformers + peft in this process.
Routes: /health, /v1/models, /v1/chat/completions, /chat.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from steps.contract import run_step

log = logging.getLogger("kaitune")
DEFAULT_MAX_NEW_TOKENS = 64


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

    def generate(self, prompt_text: str, *, use_adapter: bool, kwargs: dict[str, Any]) -> tuple[str, int, int]:
        import torch

        gen = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False, **kwargs}
        if not gen.get("do_sample"):
            gen.pop("temperature", None)
            gen.pop("top_p", None)
        inputs = self.tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False)
        context: Any = contextlib.nullcontext()
        if self.adapter_name and not use_adapter:
            context = self.model.disable_adapter()
        with self.lock, torch.no_grad(), context:
            out = self.model.generate(**inputs, pad_token_id=self.tokenizer.pad_token_id, **gen)
        new = out[0, inputs["input_ids"].shape[1] :]
        text: str = self.tokenizer.decode(new, skip_special_tokens=True)
        return text, int(inputs["input_ids"].shape[1]), len(new)

    def chat_prompt(self, messages: list[ChatMessage]) -> str:
        text: str = self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
        )
        return text


def create_app(engine: Engine) -> Any:
    from fastapi import FastAPI, HTTPException

    app = FastAPI(title="kaitune inference", version="1")

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
        prompt = engine.chat_prompt(messages)
        text, _, _ = engine.generate(prompt, use_adapter=True, kwargs=dict(body.generate_kwargs))
        return {"Result": text}

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatCompletionRequest) -> dict[str, Any]:
        if body.model not in engine.model_names():
            raise HTTPException(404, f"model {body.model!r} not found; available: {engine.model_names()}")
        if body.stream:
            raise HTTPException(400, "stream=true is not supported by the transformers runtime yet")
        kwargs: dict[str, Any] = {}
        if body.max_tokens:
            kwargs["max_new_tokens"] = body.max_tokens
        if body.temperature:
            kwargs.update(do_sample=True, temperature=body.temperature)
        if body.top_p is not None:
            kwargs["top_p"] = body.top_p
        text, prompt_tokens, completion_tokens = engine.generate(
            engine.chat_prompt(body.messages), use_adapter=body.model == engine.adapter_name, kwargs=kwargs
        )
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m steps.serve", description=__doc__)
    p.add_argument("--base-model", required=True)
    p.add_argument("--adapter-dir", type=Path)
    p.add_argument("--adapter-name", default="adapter")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--runtime", choices=["transformers"], default="transformers")
    args = p.parse_args(argv)
    import uvicorn

    engine = Engine(args.base_model, args.adapter_dir, args.adapter_name)
    log.info("serving %s on http://%s:%d", engine.model_names(), args.host, args.port)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_step("serve", main)
