"""Kaito's ``/chat`` inside vLLM's OpenAI server, as a vLLM endpoint plugin (entry point ``vllm.endpoint_plugins``).

vLLM loads it when ``VLLM_PLUGINS`` names ``kaitune-chat`` (``steps.serve --runtime vllm``
sets that). ``/chat`` turns Kaito's body (``prompt`` or ``messages``, plus transformers
``generate_kwargs``) into a chat completion for the adapter and calls vLLM's own
``/v1/chat/completions`` in process (an ASGI call, no socket), so validation,
batching and errors are vLLM's.
"""

# No `from __future__ import annotations` here: FastAPI must see the route's real parameter types.
import os
from argparse import Namespace
from typing import Any

PLUGIN_NAME = "kaitune-chat"
ADAPTER_ENV = "KAITUNE_ADAPTER_NAME"


def completion_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    """Kaito's /chat request as an OpenAI chat completion request; greedy unless do_sample asks otherwise."""
    messages = body.get("messages") or [{"role": "user", "content": body.get("prompt", "")}]
    kwargs = dict(body.get("generate_kwargs") or {})
    out: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": int(kwargs.pop("max_new_tokens", 64))}
    if kwargs.pop("do_sample", False):
        out.update({k: kwargs[k] for k in ("temperature", "top_p", "top_k") if k in kwargs})
    else:
        out["temperature"] = 0.0
    if "repetition_penalty" in kwargs:
        out["repetition_penalty"] = kwargs["repetition_penalty"]
    return out


class KaitoChatPlugin:
    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        import httpx
        from fastapi import Request
        from fastapi.responses import JSONResponse

        from steps.serve import KaitoChatRequest

        @app.post("/chat")
        async def chat(body: KaitoChatRequest, request: Request) -> Any:
            model = os.environ.get(ADAPTER_ENV) or request.app.state.args.served_model_name[0]
            transport = httpx.ASGITransport(app=request.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://kaitune.internal") as client:
                answer = await client.post("/v1/chat/completions", json=completion_body(body.model_dump(), model),
                                           timeout=None)  # fmt: skip
            if answer.status_code != 200:
                return JSONResponse(answer.json(), status_code=answer.status_code)
            return {"Result": answer.json()["choices"][0]["message"]["content"]}

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        return None
