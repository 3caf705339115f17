"""The train step for real on tiny-phi3: LoRA and QLoRA (bitsandbytes 4-bit on CPU)."""

from __future__ import annotations

import json
import shutil
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


def train_cmd(
    work: Path, method: str, config: dict[str, object], *extra: str, targets: str = TARGETS, ckpt: str = "false"
) -> list[str]:
    return [
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
        *extra,
    ]


def train(
    work: Path, method: str, config: dict[str, object], *extra: str, targets: str = TARGETS, ckpt: str = "false"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(train_cmd(work, method, config, *extra, targets=targets, ckpt=ckpt), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


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


def test_data_collator_is_checked_and_mlm_is_never_used(work: Path) -> None:
    bad = train(work, "lora", {"DataCollator": {"mlm_prob": 0.2}})
    assert bad.returncode == 2
    assert "DataCollator.mlm_prob: is not a DataCollatorForLanguageModeling field" in bad.stderr
    kaito = train(work, "lora", {**LORA, "TrainingArguments": {"max_steps": 1}, "DataCollator": {"mlm": True}})
    assert kaito.returncode == 0, kaito.stderr[-2000:]
    assert "DataCollator.mlm is true (Kaito's default)" in kaito.stderr


def test_unknown_training_argument_is_bad_input(work: Path) -> None:
    result = train(work, "lora", {"TrainingArguments": {"num_train_epoch": 3}})
    assert result.returncode == 2
    assert "TrainingArguments.num_train_epoch: is not a TrainingArguments field" in result.stderr


RESUME = {
    "LoraConfig": {"r": 8, "lora_alpha": 16},
    "TrainingArguments": {
        "num_train_epochs": 40,
        "learning_rate": 0.002,
        "per_device_train_batch_size": 1,
        "seed": 3,
        "save_strategy": "steps",
        "save_steps": 10,
        "logging_steps": 10,
    },
}


def _adapter_weights(adapter: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def test_kill_9_midway_then_rerun_resumes_and_matches(work: Path, tmp_path: Path) -> None:
    import signal
    import time

    import torch

    # The uninterrupted reference, in its own copy of the work volume.
    reference = tmp_path / "reference" / "work"
    shutil.copytree(work, reference)
    assert train(reference, "lora", RESUME).returncode == 0

    cmd = train_cmd(work, "lora", RESUME)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = work / "checkpoints"
    deadline = time.monotonic() + 300
    killed_at = 0
    while time.monotonic() < deadline and proc.poll() is None:
        done = [p for p in checkpoints.glob("*/step-*") if (p / "state.json").exists()]
        if any(int(p.name.removeprefix("step-")) >= 30 for p in done):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = max(int(p.name.removeprefix("step-")) for p in done)
            break
        time.sleep(0.02)
    assert killed_at >= 30, "the run finished before it could be killed; make it longer"
    assert not (work / "adapter").exists()  # nothing final was written

    rerun = train(work, "lora", RESUME)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from the checkpoint at step {killed_at}/" in rerun.stderr
    summary = json.loads((work / "adapter" / "training_summary.json").read_text())
    reference_summary = json.loads((reference / "adapter" / "training_summary.json").read_text())
    # No more than one checkpoint interval (10 steps) was lost, and the step counter continued.
    assert summary["metrics"]["resumed_from_step"] == killed_at
    assert summary["metrics"]["steps"] == reference_summary["metrics"]["steps"] > killed_at
    ours, theirs = _adapter_weights(work / "adapter"), _adapter_weights(reference / "adapter")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-5), key  # type: ignore[arg-type]
    assert summary["metrics"]["eval_loss"] == pytest.approx(reference_summary["metrics"]["eval_loss"], abs=1e-5)
    assert not (work / "checkpoints").exists() or not any((work / "checkpoints").iterdir())


def test_reloaded_adapter_generates_and_merge_matches(work: Path, tiny_phi3: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert train(work, "lora", LORA).returncode == 0
    adapter = work / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Peru?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        unmerged = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        merged = model.merge_and_unload()(**inputs).logits  # into the full-precision base
    assert text.strip()
    assert torch.allclose(unmerged, merged, atol=1e-4)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.float32)(**inputs).logits
    assert not torch.allclose(plain, merged, atol=1e-3)  # the adapter does change the model


def test_kaito_default_configmaps_are_accepted(work: Path) -> None:
    from pipelines.training_config import default_sections

    for method in ("lora", "qlora"):
        sections = default_sections(method)
        sections["TrainingArguments"] = {
            **sections["TrainingArguments"],
            "max_steps": 2,
            "gradient_accumulation_steps": 2,
            "warmup_ratio": 0.1,
        }
        result = train(work, method, sections, ckpt="true" if method == "qlora" else "false")
        assert result.returncode == 0, result.stderr[-2000:]


def test_two_data_parallel_processes_match_one(work: Path, tmp_path: Path) -> None:

    import torch

    # Four micro-batches per step, so each of two ranks takes two and the gradient all-reduce matters.
    config = {
        "LoraConfig": {"r": 8, "lora_alpha": 16},
        "TrainingArguments": {
            "max_steps": 6,
            "learning_rate": 0.002,
            "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 4,
            "seed": 5,
        },
    }
    single = tmp_path / "single" / "work"
    shutil.copytree(work, single)
    assert train(single, "lora", config).returncode == 0
    result = train(work, "lora", config, "--processes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training with 2 processes" in result.stderr
    ours, theirs = _adapter_weights(work / "adapter"), _adapter_weights(single / "adapter")
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-4), key  # type: ignore[arg-type]
    a = json.loads((work / "adapter" / "training_summary.json").read_text())["metrics"]
    b = json.loads((single / "adapter" / "training_summary.json").read_text())["metrics"]
    assert a["tokens"] == b["tokens"] and a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-4)


def test_base_weights_come_from_an_oci_image_in_a_registry(work: Path, tiny_phi3: Path, tmp_path: Path) -> None:
    """Kaito's presetOptions.image: the weights are pulled (digest-verified), kept for reruns, and used."""
    import torch
    from registry_server import run_registry
    from safetensors.torch import load_file, save_file

    from steps.oci import adapter_image, transfer

    # The image's weights differ from the cached tiny-phi3, so the loss before training tells which were used.
    weights = tmp_path / "image-weights"
    shutil.copytree(tiny_phi3, weights)
    tensors = load_file(weights / "model.safetensors")
    torch.manual_seed(0)
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in tensors.items()}, weights / "model.safetensors")
    image = adapter_image.build_from_files(sorted(weights.iterdir()), {}, tmp_path / "staging")
    one_step = {**LORA, "TrainingArguments": {**LORA["TrainingArguments"], "max_steps": 1}}
    with run_registry(tmp_path / "registry") as registry:
        pushed = transfer.push(image, f"{registry.host}/kaito/tiny-phi3-weights:0.1")
        result = train(work, "lora", one_step, "--model-image", f"{registry.host}/kaito/tiny-phi3-weights:0.1")
        assert result.returncode == 0, result.stderr
        assert "pulled" in result.stderr
        summary = json.loads((work / "adapter" / "training_summary.json").read_text())
        assert summary["base_model_image"] == f"{registry.host}/kaito/tiny-phi3-weights@{pushed.digest}"
        assert summary["base_model"] == "kaitune/tiny-phi3"  # the portable id, not the pull directory
        from_image = float((work.parent / "out" / "eval-loss-before").read_text())
        pulls = registry.requests("GET", r"/v2/kaito/tiny-phi3-weights/blobs/\S+")
    shutil.rmtree(work / "adapter")
    from_cache = train(work, "lora", one_step)
    assert from_cache.returncode == 0, from_cache.stderr
    assert abs(float((work.parent / "out" / "eval-loss-before").read_text()) - from_image) > 1e-3
    assert pulls == 2  # the config and the one layer, once


def test_the_reuse_key_changes_when_and_only_when_an_input_changes() -> None:
    from steps.train import config_hash, parse_args

    base = ["--model", "tiny-phi3", "--method", "lora", "--training-config", '{"LoraConfig": {"r": 8}}',
            "--target-modules", TARGETS, "--compute-dtype", "float32", "--max-seq-length", "256",
            "--work", "/w", "--outputs", "/o"]  # fmt: skip
    key = config_hash(parse_args(base), "sha256:data", "")
    changed = {
        "model": ["--model", "phi-3-mini-4k-instruct"],
        "method": ["--method", "qlora"],
        "config": ["--training-config", '{"LoraConfig": {"r": 16}}'],
        "targets": ["--target-modules", "o_proj"],
        "dtype": ["--compute-dtype", "bfloat16"],
        "length": ["--max-seq-length", "512"],
    }
    for what, override in changed.items():
        assert config_hash(parse_args([*base, *override]), "sha256:data", "") != key, what
    assert config_hash(parse_args(base), "sha256:other-data", "") != key
    assert config_hash(parse_args(base), "sha256:data", "reg/w@sha256:1") != key
    # What does not change the adapter does not change the key: where things run, log and land.
    unchanged = ["--work", "/elsewhere", "--outputs", "/o2", "--processes", "4", "--checkpoint-minutes", "3",
                 "--reuse-from", "myacr.azurecr.io/a:1", "--token-file", "/t"]  # fmt: skip
    assert config_hash(parse_args([*base, *unchanged]), "sha256:data", "") == key


def test_a_resubmit_reuses_the_pushed_adapter_instead_of_training(work: Path, tmp_path: Path) -> None:
    from registry_server import run_registry

    one_step = {**LORA, "TrainingArguments": {**LORA["TrainingArguments"], "max_steps": 2}}
    with run_registry(tmp_path / "registry") as registry:
        target = f"{registry.host}/adapters/tiny:0.1"
        first = train(work, "lora", one_step, "--reuse-from", target)
        assert first.returncode == 0, first.stderr
        assert "no reusable adapter" in first.stderr
        push = [sys.executable, "-m", "steps.push", "--adapter-dir", str(work / "adapter"), "--model-name", "tiny-phi3",
                "--image", target]  # fmt: skip
        pushed = subprocess.run([*push, "--outputs", str(tmp_path / "p1")], capture_output=True, text=True, timeout=120)
        assert pushed.returncode == 0, pushed.stderr
        uploads = registry.requests("PUT", r"/v2/adapters/tiny/blobs/uploads/\S+")
        trained_loss = (work.parent / "out" / "eval-loss").read_text()
        (work.parent / "out" / "eval-loss").unlink()
        # A new workflow starts with an empty work volume: the adapter comes back from the registry.
        shutil.rmtree(work / "adapter")
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        again = train(work, "lora", one_step, "--reuse-from", target)
        assert again.returncode == 0, again.stderr
        assert "reusing it, not training" in again.stderr and "eval loss before training" not in again.stderr
        assert (work.parent / "out" / "eval-loss").read_text() == trained_loss
        repushed = subprocess.run([*push, "--outputs", str(tmp_path / "p2")], capture_output=True, text=True,
                                  timeout=120)  # fmt: skip
        assert repushed.returncode == 0, repushed.stderr
        assert (tmp_path / "p2" / "digest").read_text() == (tmp_path / "p1" / "digest").read_text()
        assert registry.requests("PUT", r"/v2/adapters/tiny/blobs/uploads/\S+") == uploads  # nothing uploaded
        # A changed input invalidates the match: training runs again.
        shutil.rmtree(work / "adapter")
        changed = train(work, "lora", {**one_step, "LoraConfig": {"r": 8, "lora_alpha": 16}}, "--reuse-from", target)
        assert changed.returncode == 0 and "reusing it" not in changed.stderr


def test_bf16_lora_matmuls_keep_fp32_weights_and_match_peft_gradients(tiny_phi3: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from steps.lora_training import bf16_lora_matmuls

    def grads(convert: bool) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_phi3, dtype=torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=8, target_modules=["qkv_proj", "down_proj"], init_lora_weights=False))
        if convert:
            bf16_lora_matmuls(model)
            layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "cast_input_dtype_enabled")]
            assert layers and not any(m.cast_input_dtype_enabled for m in layers)
        ids = torch.arange(2, 66).unsqueeze(0)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                   for p in trainable.values())  # fmt: skip
        return float(loss), {n: p.grad for n, p in trainable.items()}

    loss_ref, ref = grads(False)
    loss_new, new = grads(True)
    assert abs(loss_new - loss_ref) < 0.02 * abs(loss_ref)
    for name, g in ref.items():
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), new[name].flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))
