"""Load the base model the way the plan says: source, dtype, quantization, LoRA.

Kaito's ``training_config`` sections go straight into the libraries' own
classes (``BitsAndBytesConfig``, peft ``LoraConfig``), so any of their arguments
works; a wrong argument becomes a bad-input error naming the section.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipelines.errors import BadInput, Problem
from pipelines.presets import find_preset

log = logging.getLogger("kaitune")
# Kaito-only keys that its own dataclasses add and the libraries do not accept.
_KAITO_ONLY = {"QuantizationConfig": {"quant_method"}, "ModelConfig": {"chat_template", "device_map"}}


def resolve_base(model: str) -> tuple[Path | str, str]:
    """Where to load ``model`` from, and the portable name recorded in the adapter.

    ``base_model_name_or_path`` must not be a local absolute path: the adapter is
    served on another machine, where that path means nothing.
    """
    preset = find_preset(model)
    if preset is not None and preset.local_only:
        from steps import tiny_phi3

        return tiny_phi3.ensure(), preset.hf_id
    if preset is not None:
        return preset.hf_id, preset.hf_id
    path = Path(model)
    if path.is_dir():
        return path, path.name
    return model, model


def _section(sections: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in sections.get(name, {}).items() if k not in _KAITO_ONLY.get(name, set())}


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(source: Path | str, local_only: bool, token: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, token=token)
    except OSError as exc:
        raise BadInput(
            Problem(
                "tuning.preset",
                f"tokenizer for {source} is not reachable: {exc}",
                "pre-load the weights into the cache or volume, or check network access",
            )
        ) from None
    if tokenizer.pad_token is None:
        # Labels mask padding by position (steps.lora_training), never by token id, so
        # pad == eos cannot hide the EOS the model must learn (Kaito's fault).
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise BadInput(
            Problem(
                "tuning.preset",
                f"{source} has no chat template",
                "use an instruct model, or set ModelConfig.chat_template",
            )
        )
    return tokenizer


def load_model(
    source: Path | str,
    *,
    method: str,
    sections: dict[str, Any],
    compute_dtype: str,
    local_only: bool,
    attn_implementation: str | None = None,
    token: str | None = None,
    device: Any = None,
) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {
        k: v
        for k, v in _section(sections, "ModelConfig").items()
        if k not in ("torch_dtype", "dtype", "local_files_only")
    }
    kwargs["dtype"] = _torch_dtype(compute_dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if method == "qlora":
        quant = _section(sections, "QuantizationConfig")
        quant.setdefault("bnb_4bit_compute_dtype", compute_dtype)
        # On a GPU without bf16, Kaito's default compute dtype would crash: follow the plan.
        if quant.get("bnb_4bit_compute_dtype") == "bfloat16" and compute_dtype != "bfloat16":
            quant["bnb_4bit_compute_dtype"] = compute_dtype
        try:
            kwargs["quantization_config"] = BitsAndBytesConfig(**quant)
        except (TypeError, ValueError) as exc:
            raise BadInput(
                Problem("training_config.QuantizationConfig", str(exc), "use BitsAndBytesConfig's arguments")
            ) from None
        if device is not None and device.type == "cuda":
            kwargs["device_map"] = {"": device.index}  # data parallel: each rank holds the whole model
        elif torch.cuda.is_available():
            kwargs.setdefault("device_map", "auto")
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, token=token, **kwargs)
    except OSError as exc:
        raise BadInput(
            Problem(
                "tuning.preset",
                f"weights for {source} are not reachable: {exc}",
                "pre-load the weights into the cache or volume, or check network access",
            )
        ) from None
    except TypeError as exc:
        raise BadInput(Problem("training_config.ModelConfig", str(exc), "use from_pretrained's arguments")) from None
    if method == "lora" and torch.cuda.is_available():
        model = model.to(device if device is not None else "cuda")
    return model


def add_lora(
    model: Any, *, method: str, sections: dict[str, Any], target_modules: list[str], gradient_checkpointing: bool
) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpoint_kwargs = {"use_reentrant": False}
    if method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=checkpoint_kwargs
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
        model.enable_input_require_grads()
    lora_args = _section(sections, "LoraConfig")
    lora_args["target_modules"] = target_modules
    lora_args.setdefault("task_type", "CAUSAL_LM")
    try:
        config = LoraConfig(**lora_args)
    except (TypeError, ValueError) as exc:
        raise BadInput(Problem("training_config.LoraConfig", str(exc), "use peft LoraConfig's arguments")) from None
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in present]
    if missing:
        # peft only fails when *nothing* matches; a partial miss silently trains less (Kaito's Phi-3 fault).
        raise BadInput(
            Problem(
                "training_config.LoraConfig.target_modules",
                f"{missing} match no module of this model",
                f"use module names the model has, e.g. {sorted(present & _LINEAR_HINTS)}",
            )
        )
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA on %s: %d trainable of %d parameters (%.3f%%)",
        ",".join(target_modules),
        trainable,
        total,
        100 * trainable / total,
    )
    return model


_LINEAR_HINTS = {
    "qkv_proj",
    "o_proj",
    "gate_up_proj",
    "down_proj",
    "q_proj",
    "k_proj",
    "v_proj",
    "gate_proj",
    "up_proj",
}
