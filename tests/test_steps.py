"""Steps run as their CLI runs them (``python -m steps.X``): data, tokens, image, exit codes."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from steps.chat_tokens import IGNORE_INDEX, encode
from steps.fetch_data import split
from steps.oci import layout as oci_layout
from steps.oci import transfer


def step(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"steps.{module}", *args], capture_output=True, text=True, timeout=300)


def chat(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_split_honours_seed_and_always_keeps_an_eval_set() -> None:
    rows = [[{"role": "user", "content": str(i)}] for i in range(50)]
    a = split(rows, {"shuffle_seed": 1, "train_test_split": 0.8})
    b = split(rows, {"shuffle_seed": 1, "train_test_split": 0.8})
    c = split(rows, {"shuffle_seed": 2, "train_test_split": 0.8})
    assert a == b and a != c
    train, evaluation = split(rows, {"train_test_split": 1})  # Kaito's default: no eval at all
    assert len(evaluation) == 5 and len(train) == 45


def test_assistant_only_labels_and_eos(tiny_phi3: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_phi3)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
        {"role": "user", "content": "And Chile?"},
        {"role": "assistant", "content": "Santiago."},
    ]
    enc = encode(tok, messages, 256)
    learned = tok.decode([t for t in enc.labels if t != IGNORE_INDEX])
    assert "Lima." in learned and "Santiago." in learned
    assert "Capital of Peru" not in learned and "Be brief" not in learned and "<|assistant|>" not in learned
    assert enc.labels[-1] == tok.eos_token_id  # the model learns to stop
    assert tok.pad_token_id != tok.eos_token_id


def push(adapter: Path, out: Path, *target: str, model: str = "m") -> subprocess.CompletedProcess[str]:
    return step("push", "--adapter-dir", str(adapter), "--model-name", model, *target, "--outputs", str(out))


def _adapter_dir(tmp_path: Path) -> Path:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "kaitune/tiny-phi3"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    (adapter / "tokenizer.json").write_text("{}")
    (adapter / "training_summary.json").write_text(
        json.dumps(
            {
                "base_model": "kaitune/tiny-phi3",
                "method": "lora",
                "dataset_digest": "sha256:" + "1" * 64,
                "config_hash": "sha256:" + "2" * 64,
                "metrics": {"eval_loss": 1.5},
            }
        )
    )
    return adapter


def test_push_writes_kaito_layout_reproducibly(tmp_path: Path) -> None:
    adapter = _adapter_dir(tmp_path)
    digests = []
    for name in ("a", "b"):
        result = push(
            adapter, tmp_path / f"out-{name}", "--layout", str(tmp_path / name), "--tag", "0.0.1", model="tiny-phi3"
        )
        assert result.returncode == 0, result.stderr
        digests.append((tmp_path / f"out-{name}" / "digest").read_text())
        (adapter / "adapter_model.safetensors").touch()  # a new mtime must not change the digest
    assert digests[0] == digests[1]
    layout = tmp_path / "a"
    manifest = json.loads(oci_layout.read_blob(layout, oci_layout.resolve(layout, "0.0.1")))
    assert manifest["annotations"]["sh.kaito.model.name"] == "tiny-phi3"
    assert manifest["annotations"]["kaitune.eval-loss"] == "1.500000"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    tar_bytes = gzip.decompress(oci_layout.read_blob(layout, layer["digest"]))
    config = json.loads(oci_layout.read_blob(layout, manifest["config"]["digest"]))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        names = tar.getnames()
    assert names == ["data", "data/adapter_config.json", "data/adapter_model.safetensors", "data/tokenizer.json"]
    assert (tmp_path / "out-a" / "image-ref").read_text() == f"oci-layout://{layout}@{digests[0]}"


def test_pull_detects_a_corrupted_blob(tmp_path: Path) -> None:
    adapter = _adapter_dir(tmp_path)
    assert push(adapter, tmp_path / "out", "--layout", str(tmp_path / "img")).returncode == 0
    digest = (tmp_path / "out" / "digest").read_text()
    transfer.pull(f"oci-layout://{tmp_path / 'img'}@{digest}", tmp_path / "pulled")
    assert (tmp_path / "pulled" / "adapter_model.safetensors").read_bytes() == b"\0" * 1000
    manifest = json.loads(oci_layout.read_blob(tmp_path / "img", digest))
    blob = tmp_path / "img" / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
    blob.write_bytes(blob.read_bytes()[:-1] + b"x")
    from pipelines.errors import BadInput

    with pytest.raises(BadInput, match="is corrupt"):
        transfer.pull(f"oci-layout://{tmp_path / 'img'}@{digest}", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_push_without_adapter_is_bad_input(tmp_path: Path) -> None:
    result = push(tmp_path, tmp_path / "out", "--layout", str(tmp_path / "img"))
    assert result.returncode == 2 and "run the train step first" in result.stderr
