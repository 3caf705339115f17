"""Sequence packing without cross-contamination.

Several examples share one row of up to ``capacity`` tokens, so the big matmuls
(projections, MLP, LM head) run on long rows with no padding, while attention
runs per example: ``position_ids`` restart at 0 for each (so RoPE is per
example) and a registered attention function calls SDPA causally on each
example's slice. No dense block-diagonal mask is ever built; that mask is what
made trl's ``packing=True`` slower and 3x the memory without flash-attention
(DESIGN.md).
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from steps.chat_tokens import IGNORE_INDEX, Encoded

ATTENTION = "kaitune_packed_sdpa"
_registered = False


def _packed_sdpa(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # not packed (generation, a plain forward): regular causal SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    bounds = cu.tolist()
    out_dtype = query.dtype
    if query.device.type == "cpu" and query.dtype == torch.bfloat16:
        # CPU bf16 SDPA kept growing memory (~25 MB a step, measured) across the many segment lengths packing
        # produces; attention is ~6% of the FLOPs here, so it runs in fp32 while the matmuls stay bf16.
        query, key, value = query.float(), key.float(), value.float()

    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            is_causal=True,
            scale=scaling,
            dropout_p=dropout if module.training else 0.0,
            enable_gqa=gqa,
        )
        for s, e in itertools.pairwise(bounds)
        if e > s
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous().to(out_dtype), None


def register() -> str:
    """Make the packed attention available to transformers; returns its name for ``attn_implementation``."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION, _packed_sdpa)
        # Packed rows need no mask at all; unpacked calls (eval, generation) get SDPA's usual one.
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        _registered = True
    return ATTENTION


def pack(examples: list[Encoded], capacity: int, rng: random.Random | None) -> list[list[Encoded]]:
    """Greedy first-fit of examples (shuffled when ``rng`` is given) into rows of at most ``capacity`` tokens."""
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([examples[i]])
            room.append(capacity - n)
        else:
            rows[slot].append(examples[i])
            room[slot] -= n
    return rows


def collate_packed(row: list[Encoded], device: Any, *, pad_to: int | None = None, pad_id: int = 0) -> dict[str, Any]:
    """One packed row; with ``pad_to``, filled to exactly that many tokens by a padding segment of its own.

    Rows of one fixed shape let oneDNN (CPU) and the CUDA allocator reuse one plan and one block, instead of
    growing memory with every new length.
    """
    import torch

    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    bounds = [0]
    used = sum(len(e.input_ids) for e in row)
    if pad_to is not None and pad_to > used:
        row = [*row, Encoded([pad_id] * (pad_to - used), [IGNORE_INDEX] * (pad_to - used))]
    for e in row:
        ids += e.input_ids
        # An example's first token is never predicted from inside it; never from the previous one either.
        labels += [IGNORE_INDEX, *e.labels[1:]]
        positions += list(range(len(e.input_ids)))
        bounds.append(len(ids))
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(len(e.input_ids) for e in row)
    return {
        "input_ids": torch.tensor([ids], device=device),
        "labels": torch.tensor([labels], device=device),
        "attention_mask": None,
        "model_kwargs": {
            "position_ids": torch.tensor([positions], device=device),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
        },
    }
