"""Training memory estimate for LoRA / QLoRA on one accelerator.

The model is deliberately simple and every term is visible in ``MemoryEstimate``:

* weights: LoRA keeps the base in the compute dtype; QLoRA stores every per-layer
  linear as NF4 with double quantization (4 bits + 0.127 bits of quantization
  constants per parameter, QLoRA paper section 3), while embeddings, norms and the
  LM head stay in the compute dtype (bitsandbytes leaves them unquantized).
* adapters: trainable LoRA parameters kept in fp32, plus fp32 gradients and two
  fp32 Adam moments: 16 bytes per parameter.
* activations: per token and layer, attention 11h + norms 4h + gated MLP
  (2h + 8·intermediate) bytes at 2-byte precision (Korthikanti et al. 2022,
  "Reducing Activation Recomputation", with the s² attention term dropped because
  SDPA/flash attention never materialises it). With gradient checkpointing only
  each layer's input is kept, plus one layer recomputed at a time.
* logits: the LM head output in the compute dtype plus its fp32 upcast and
  gradient, which dominates for 128k+ vocabularies.
* overhead: CUDA context, cuBLAS workspaces and allocator fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.presets import ModelShape

GIB = 1024**3
NF4_DOUBLE_QUANT_BYTES = (4 + 0.127) / 8
CUDA_CONTEXT_GIB = 1.0
FRAGMENTATION = 0.10
# Leave room for spikes the estimate does not see (eval, longer-than-usual batches).
USABLE_FRACTION = 0.92

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    adapters_gib: float
    activations_gib: float
    logits_gib: float
    overhead_gib: float
    trainable_params: int

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.adapters_gib + self.activations_gib + self.logits_gib + self.overhead_gib


def lora_trainable_params(shape: ModelShape, rank: int, target_modules: tuple[str, ...]) -> int:
    """Parameters LoRA adds: r·(in + out) for each targeted linear in every layer."""
    linears = shape.linear_shapes()
    per_layer = sum(rank * (fan_in + fan_out) for name, (fan_in, fan_out) in linears.items() if name in target_modules)
    return per_layer * shape.layers


def estimate(
    shape: ModelShape,
    *,
    method: str,
    seq_len: int,
    batch_size: int,
    lora_rank: int,
    target_modules: tuple[str, ...],
    compute_dtype: str,
    gradient_checkpointing: bool,
    on_gpu: bool = True,
) -> MemoryEstimate:
    dtype_bytes = DTYPE_BYTES[compute_dtype]
    linear_params = shape.layers * sum(i * o for i, o in shape.linear_shapes().values())
    other_params = max(shape.params - linear_params, 0)
    if method == "qlora":
        weights = linear_params * NF4_DOUBLE_QUANT_BYTES + other_params * dtype_bytes
        # bitsandbytes dequantizes one linear at a time to the compute dtype while it runs
        weights += max(i * o for i, o in shape.linear_shapes().values()) * dtype_bytes
    else:
        weights = shape.params * dtype_bytes

    trainable = lora_trainable_params(shape, lora_rank, target_modules)
    adapters = trainable * 16

    tokens = seq_len * batch_size
    scale = dtype_bytes / 2
    per_layer = tokens * scale * (11 * shape.hidden + 4 * shape.hidden + 2 * shape.hidden + 8 * shape.intermediate)
    if gradient_checkpointing:
        activations = shape.layers * tokens * shape.hidden * dtype_bytes + per_layer
    else:
        activations = shape.layers * per_layer
    logits = tokens * shape.vocab * (dtype_bytes + 4 + 4)

    subtotal = weights + adapters + activations + logits
    # On CPU there is no CUDA context, only the torch runtime itself.
    overhead = CUDA_CONTEXT_GIB * GIB + FRAGMENTATION * subtotal if on_gpu else 0.5 * GIB
    return MemoryEstimate(
        weights_gib=weights / GIB,
        adapters_gib=adapters / GIB,
        activations_gib=activations / GIB,
        logits_gib=logits / GIB,
        overhead_gib=overhead / GIB,
        trainable_params=trainable,
    )


def gpus_needed(est: MemoryEstimate, memory_gib: float) -> int:
    """GPUs one training process needs when the model is split by layers across them.

    Kaito loads with ``device_map="auto"``, which places consecutive layers on the
    node's GPUs; each GPU pays its own CUDA context.
    """
    usable = memory_gib * USABLE_FRACTION - CUDA_CONTEXT_GIB
    if usable <= 0:
        return 0
    # Fragmentation scales with what each GPU holds; only the context is paid per GPU.
    return max(1, math.ceil((est.total_gib - CUDA_CONTEXT_GIB) / usable))
