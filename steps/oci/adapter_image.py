"""Kaito's adapter image: one tar+gzip layer with the adapter under /data, built reproducibly.

The same adapter files always give the same digests: entries sorted, mtimes,
owners and modes fixed, and a gzip header without name or timestamp.
"""

from __future__ import annotations

import gzip
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps.oci.blobs import Blob, HashingWriter

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
MODEL_NAME_ANNOTATION = "sh.kaito.model.name"
# What goes into the image: the adapter and the tokenizer, nothing from training.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


@dataclass(frozen=True)
class AdapterImage:
    layer: Blob
    config: Blob
    manifest: Blob
    diff_id: str

    @property
    def blobs(self) -> tuple[Blob, Blob, Blob]:
        return self.layer, self.config, self.manifest


def image_files(adapter_dir: Path) -> list[Path]:
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        from pipelines.errors import BadInput, Problem

        raise BadInput(Problem(str(adapter_dir), f"lacks {', '.join(missing)}", "run the train step first"))
    return [adapter_dir / n for n in (*ADAPTER_FILES, *TOKENIZER_FILES) if (adapter_dir / n).is_file()]


def write_layer(files: list[Path], dest: Path) -> tuple[Blob, str]:
    """Stream a tar+gzip of ``files`` under ``data/`` into ``dest``; return the blob and the tar's diff_id.

    Streaming keeps memory constant whatever the adapter's size; fixed metadata
    and a gzip header without name or time make the bytes reproducible.
    """
    with open(dest, "wb") as out:
        compressed = HashingWriter(out)
        with gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=compressed, mtime=0) as gz:
            plain = HashingWriter(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                directory = tarfile.TarInfo("data")
                directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, 0
                tar.addfile(directory)
                for path in sorted(files, key=lambda p: p.name):
                    info = tarfile.TarInfo(f"data/{path.name}")
                    info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    with open(path, "rb") as fh:
                        tar.addfile(info, fh)
    layer = Blob(LAYER_MEDIA_TYPE, compressed.digest, compressed.size, path=dest)
    return layer, plain.digest


def build(adapter_dir: Path, annotations: dict[str, str], staging: Path) -> AdapterImage:
    """Build the adapter's image; the layer is written to ``staging`` (which must outlive the image)."""
    return build_from_files(image_files(adapter_dir), annotations, staging)


def build_from_files(files: list[Path], annotations: dict[str, str], staging: Path) -> AdapterImage:
    """An image with ``files`` under ``/data`` (adapters, and dataset images for ``input.image``)."""
    staging.mkdir(parents=True, exist_ok=True)
    layer, diff_id = write_layer(files, staging / "layer.tar.gz")
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config = Blob.of_bytes(CONFIG_MEDIA_TYPE, _canonical(config_doc))
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
        "annotations": dict(sorted(annotations.items())),
    }
    return AdapterImage(layer, config, Blob.of_bytes(MANIFEST_MEDIA_TYPE, _canonical(manifest_doc)), diff_id)


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
