"""Unpack an image's files from a verified OCI layout: Kaito's ``/data`` layers and ORAS file layers.

Two kinds of layer carry files:
- a filesystem layer (tar, optionally gzip): its regular files under one of the
  ``roots`` (``data/`` for Kaito's adapter images; weights images also use
  ``workspace/tfs/weights/``) land in ``dest``, subdirectories kept;
- an ORAS artifact layer (any other media type, named by its
  ``org.opencontainers.image.title`` annotation): the blob is the file.
Links, devices and paths that would escape ``dest`` are skipped, and each tar's
content is checked against the config's ``rootfs.diff_ids``.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

from pipelines.errors import BadInput, Problem
from steps.oci import layout
from steps.oci.blobs import HashingReader

TITLE_ANNOTATION = "org.opencontainers.image.title"
TAR_MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
ADAPTER_ROOTS = ("data",)
WEIGHTS_ROOTS = ("data", "workspace/tfs/weights", "workspace/weights", "weights")


def _safe_relative(name: str) -> PurePosixPath | None:
    path = PurePosixPath(name.lstrip("/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


def _under_root(path: PurePosixPath, roots: tuple[str, ...]) -> PurePosixPath | None:
    for root in roots:
        prefix = PurePosixPath(root).parts
        if path.parts[: len(prefix)] == prefix and len(path.parts) > len(prefix):
            return PurePosixPath(*path.parts[len(prefix) :])
    return None


def _extract_tar(stream: IO[bytes], dest: Path, roots: tuple[str, ...]) -> int:
    count = 0
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            path = _safe_relative(member.name)
            relative = _under_root(path, roots) if path is not None and member.isfile() else None
            if relative is None:
                continue
            target = dest.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            count += 1
    return count


def _diff_ids(root: Path, manifest: dict[str, Any]) -> list[str] | None:
    config = manifest.get("config", {})
    if not str(config.get("mediaType", "")).endswith(("image.config.v1+json", "container.image.v1+json")):
        return None  # an ORAS artifact: its config is not an image config
    doc = json.loads(layout.read_blob(root, config["digest"]))
    ids = doc.get("rootfs", {}).get("diff_ids")
    return list(ids) if isinstance(ids, list) else None


def unpack(
    root: Path, manifest: dict[str, Any], dest: Path, where: str, roots: tuple[str, ...] = ADAPTER_ROOTS
) -> list[str]:
    """Write the image's files into ``dest``; return their names. ``where`` names the image in errors."""
    dest.mkdir(parents=True, exist_ok=True)
    diff_ids = _diff_ids(root, manifest)
    tar_index = 0
    for layer in manifest.get("layers", []):
        media_type = layer.get("mediaType", "")
        title = (layer.get("annotations") or {}).get(TITLE_ANNOTATION)
        with layout.open_blob(root, layer["digest"]) as blob:
            if media_type in TAR_MEDIA_TYPES and not title:
                source = cast(IO[bytes], gzip.GzipFile(fileobj=blob)) if media_type.endswith("gzip") else blob
                plain = HashingReader(source)
                _extract_tar(cast(IO[bytes], plain), dest, roots)
                plain.drain()
                expected = diff_ids[tar_index] if diff_ids and tar_index < len(diff_ids) else None
                if expected and plain.digest != expected:
                    raise BadInput(
                        Problem(where, f"layer {layer['digest']} does not match its diff_id {expected}",
                                "the image is corrupt; push it again")
                    )  # fmt: skip
                tar_index += 1
            elif title:
                path = _safe_relative(title)
                if path is None:
                    raise BadInput(Problem(where, f"layer title {title!r} escapes the target directory",
                                           "pull only images from a source you trust"))  # fmt: skip
                target = dest.joinpath(*path.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    shutil.copyfileobj(blob, out)
    names = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    if not names:
        raise BadInput(
            Problem(where, f"holds no files under {', '.join('/' + r for r in roots)} and no ORAS file layers",
                    "push the adapter with kaitune, or put the files under /data in the image")
        )  # fmt: skip
    return names
