"""tiny-phi3: a small Phi-3-architecture model built offline, for local runs and tests.

Random init, a byte-level BPE tokenizer trained with ``tokenizers`` on text the
project generates, Phi-3's chat template and special tokens, and a short
full-parameter warm-up so the model writes plausible text and LoRA then has
something to adapt. Built once into a cache directory, atomically.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

from steps.contract import atomic_dir
from steps.synthetic_chat import chat_rows, warmup_corpus

log = logging.getLogger("kaitune")

VERSION = "1"
NAME = "tiny-phi3"
# The Phi-3 chat template: each turn is <|role|>\n content <|end|>\n, and a
# finished conversation ends with the EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def cache_dir(part: str = "") -> Path:
    root = os.environ.get("KAITUNE_CACHE") or Path.home() / ".cache" / "kaitune"
    return Path(root) / "models" / f"{NAME}{part}-v{VERSION}"


def ensure_tokenizer() -> Path:
    """The tokenizer alone (no torch needed): fetch-data measures token lengths with it."""
    target = cache_dir("-tokenizer")
    if not (target / "tokenizer.json").exists():
        with atomic_dir(target) as tmp:
            build_tokenizer().save_pretrained(tmp)
    return target


def ensure(warmup_steps: int = 300) -> Path:
    """Return the cached tiny-phi3 directory, building it first if needed."""
    target = cache_dir()
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    log.info("building %s into %s (once)", NAME, target)
    with atomic_dir(target) as tmp:
        build(tmp, warmup_steps=warmup_steps)
    return target


def build_tokenizer() -> Any:
    """Byte-level BPE trained on the project's own text; deterministic."""
    from pipelines.presets import TINY_PHI3

    corpus = [m["content"] for row in chat_rows() for m in row["messages"]] + warmup_corpus(1)
    return _train_tokenizer(corpus, TINY_PHI3.vocab)


def _train_tokenizer(corpus: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    return fast


def build(dest: Path, *, warmup_steps: int = 300, seed: int = 0) -> None:
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    from pipelines.presets import TINY_PHI3
    from steps.chat_tokens import encode

    torch.manual_seed(seed)
    rng = random.Random(seed)
    warm_chats = [
        [{"role": "user", "content": f"Tell me about {line.split()[1]}."}, {"role": "assistant", "content": line}]
        for line in warmup_corpus(seed + 1)
    ]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_tokenizer())
    shape = TINY_PHI3
    # The embedding is padded to the preset's vocab so the memory plan's shape is exact.
    assert len(tokenizer) <= shape.vocab, (len(tokenizer), shape.vocab)
    config = Phi3Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    model = Phi3ForCausalLM(config)
    if warmup_steps:
        _warm_up(model, [encode(tokenizer, chat, 128) for chat in warm_chats], warmup_steps, rng)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    GenerationConfig(
        eos_token_id=[end_id, tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, do_sample=False
    ).save_pretrained(dest)
    (dest / "kaitune_build.json").write_text(
        json.dumps({"name": NAME, "version": VERSION, "seed": seed, "warmup_steps": warmup_steps}) + "\n"
    )


def _warm_up(model: Any, examples: list[Any], steps: int, rng: random.Random) -> None:
    """Full-parameter pre-training on the warm-up chats (all tokens learned)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = rng.sample(examples, 16)
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), model.config.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for row, e in enumerate(batch):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            log.info("tiny-phi3 warm-up %d/%d loss %.3f", step + 1, steps, loss.item())
    model.eval()
