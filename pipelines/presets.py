"""Model presets: what kaitune knows about each base model Kaito can tune.

Shapes come from each model's published ``config.json`` on the Hugging Face hub
(num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads,
intermediate_size, vocab_size, max_position_embeddings). They drive the memory
estimate and the LoRA target modules, so a wrong number here is a wrong plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Architecture = Literal["phi3", "llama", "mistral", "qwen2"]

# Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``: naming
# q_proj/k_proj/v_proj there silently matches nothing (Kaito's fault).
TARGET_MODULES: dict[Architecture, tuple[str, ...]] = {
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory depends on."""

    architecture: Architecture
    params: float  # total parameters, embeddings included
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each per-layer linear, by module name."""
        kv = self.kv_heads * self.head_dim
        if self.architecture == "phi3":
            return {
                "qkv_proj": (self.hidden, self.hidden + 2 * kv),
                "o_proj": (self.hidden, self.hidden),
                "gate_up_proj": (self.hidden, 2 * self.intermediate),
                "down_proj": (self.intermediate, self.hidden),
            }
        return {
            "q_proj": (self.hidden, self.hidden),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (self.hidden, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }


@dataclass(frozen=True)
class Preset:
    name: str
    hf_id: str
    shape: ModelShape
    context_length: int
    chat_template: str  # the template family the tokenizer ships
    local_only: bool = False  # built by kaitune, never downloaded

    @property
    def target_modules(self) -> tuple[str, ...]:
        return TARGET_MODULES[self.shape.architecture]


_PHI3_MINI = ModelShape("phi3", 3.821e9, 32, 3072, 32, 32, 8192, 32064)
_PHI3_MEDIUM = ModelShape("phi3", 13.96e9, 40, 5120, 40, 10, 17920, 32064)
_MISTRAL_7B = ModelShape("mistral", 7.248e9, 32, 4096, 32, 8, 14336, 32768)

# tiny-phi3 is built offline by steps.tiny_phi3 with exactly this shape.
TINY_PHI3 = ModelShape("phi3", 0.755e6, 4, 128, 4, 4, 256, 768, tied_embeddings=True)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-4k-instruct", _PHI3_MINI, 4096, "phi-3"),
        Preset("phi-3-mini-128k-instruct", "microsoft/Phi-3-mini-128k-instruct", _PHI3_MINI, 131072, "phi-3"),
        Preset("phi-3-medium-4k-instruct", "microsoft/Phi-3-medium-4k-instruct", _PHI3_MEDIUM, 4096, "phi-3"),
        Preset("phi-3-medium-128k-instruct", "microsoft/Phi-3-medium-128k-instruct", _PHI3_MEDIUM, 131072, "phi-3"),
        Preset("phi-3.5-mini-instruct", "microsoft/Phi-3.5-mini-instruct", _PHI3_MINI, 131072, "phi-3"),
        Preset(
            "phi-4-mini-instruct",
            "microsoft/Phi-4-mini-instruct",
            ModelShape("phi3", 3.836e9, 32, 3072, 24, 8, 8192, 200064, tied_embeddings=True),
            131072,
            "phi-4",
        ),
        Preset(
            "phi-4",
            "microsoft/phi-4",
            ModelShape("phi3", 14.66e9, 40, 5120, 40, 10, 17920, 100352),
            16384,
            "phi-4",
        ),
        Preset("mistral-7b", "mistralai/Mistral-7B-v0.3", _MISTRAL_7B, 32768, "mistral"),
        Preset("mistral-7b-instruct", "mistralai/Mistral-7B-Instruct-v0.3", _MISTRAL_7B, 32768, "mistral"),
        Preset(
            "qwen2.5-coder-7b-instruct",
            "Qwen/Qwen2.5-Coder-7B-Instruct",
            ModelShape("qwen2", 7.616e9, 28, 3584, 28, 4, 18944, 152064),
            32768,
            "chatml",
        ),
        Preset(
            "qwen2.5-coder-32b-instruct",
            "Qwen/Qwen2.5-Coder-32B-Instruct",
            ModelShape("qwen2", 32.76e9, 64, 5120, 40, 8, 27648, 152064),
            32768,
            "chatml",
        ),
        Preset(
            "llama-3.1-8b-instruct",
            "meta-llama/Llama-3.1-8B-Instruct",
            ModelShape("llama", 8.03e9, 32, 4096, 32, 8, 14336, 128256),
            131072,
            "llama-3",
        ),
        Preset("tiny-phi3", "kaitune/tiny-phi3", TINY_PHI3, 512, "phi-3", local_only=True),
    ]
}

# Names users write for the same model (Kaito's own and the HF-style spelling).
ALIASES = {"mistral-7b-v0.3-instruct": "mistral-7b-instruct", "mistral-7b-v0.3": "mistral-7b"}


def find_preset(name: str) -> Preset | None:
    key = name.strip().lower()
    return PRESETS.get(ALIASES.get(key, key))
