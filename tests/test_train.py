"""The train step for real on tiny-phi3: LoRA and QLoRA (bitsandbytes 4-bit on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from steps.synthetic_chat import chat_rows

pytestmark = pytest.mark.slow
TARGETS = "qkv_proj,o_proj,gate_up_proj,down_proj"


@pytest.fixture
def work(tmp_path: Path, tiny_phi3: Path) -> Path:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "steps.fetch_data",
            "--input-kind",
            "volume",
            "--input-path",
            str(data),
            "--work",
            str(tmp_path / "work"),
            "--outputs",
            str(tmp_path / "fetched"),
            "--training-config",
            '{"DatasetConfig": {"train_test_split": 0.85}}',
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return tmp_path / "work"


def train(
    work: Path, method: str, config: dict[str, object], targets: str = TARGETS, ckpt: str = "false"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "steps.train",
            "--model",
            "tiny-phi3",
            "--method",
            method,
            "--training-config",
            json.dumps(config),
            "--target-modules",
            targets,
            "--compute-dtype",
            "float32",
            "--max-seq-length",
            "256",
            "--gradient-checkpointing",
            ckpt,
            "--work",
            str(work),
            "--outputs",
            str(work.parent / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


LORA = {
    "LoraConfig": {"r": 16, "lora_alpha": 32},
    "TrainingArguments": {"num_train_epochs": 6, "learning_rate": 0.003, "per_device_train_batch_size": 8, "seed": 7},
}


def test_lora_learns_and_writes_a_portable_adapter(work: Path) -> None:
    result = train(work, "lora", LORA)
    assert result.returncode == 0, result.stderr
    out = work.parent / "out"
    before, after = float((out / "eval-loss-before").read_text()), float((out / "eval-loss").read_text())
    assert after < before * 0.6, (before, after)
    adapter = work / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "kaitune/tiny-phi3"  # never a local absolute path
    assert sorted(config["target_modules"]) == sorted(TARGETS.split(","))
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    summary = json.loads((adapter / "training_summary.json").read_text())
    assert summary["metrics"]["tokens"] > 0 and summary["versions"]["torch"].startswith("2.13.0")
    # A rerun with the same inputs reuses the finished adapter.
    mtime = (adapter / "adapter_model.safetensors").stat().st_mtime
    again = train(work, "lora", LORA)
    assert again.returncode == 0 and "reusing it" in again.stderr
    assert (adapter / "adapter_model.safetensors").stat().st_mtime == mtime


def test_qlora_trains_with_bitsandbytes_4bit_on_cpu(work: Path) -> None:
    config = {
        **LORA,
        "QuantizationConfig": {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16",
        },
    }
    result = train(work, "qlora", config, ckpt="true")
    assert result.returncode == 0, result.stderr
    out = work.parent / "out"
    assert float((out / "eval-loss").read_text()) < float((out / "eval-loss-before").read_text())
    summary = json.loads((work / "adapter" / "training_summary.json").read_text())
    assert summary["method"] == "qlora"


def test_target_modules_that_miss_are_bad_input(work: Path) -> None:
    # Kaito's Phi-3 fault: Llama names on a fused-qkv model.
    result = train(work, "lora", LORA, targets="q_proj,k_proj,v_proj,o_proj")
    assert result.returncode == 2
    assert "['q_proj', 'k_proj', 'v_proj'] match no module" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_training_argument_is_bad_input(work: Path) -> None:
    result = train(work, "lora", {"TrainingArguments": {"num_train_epoch": 3}})
    assert result.returncode == 2
    assert "TrainingArguments.num_train_epoch: is not a TrainingArguments field" in result.stderr
