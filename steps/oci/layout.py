"""An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256``).

The local stand-in for a registry, and the cache a registry pull fills:
``skopeo copy oci:DIR:TAG docker://...`` or ``oras cp`` can move an image from it
to any registry later. Blobs are written by content address through a temp name,
index updates are atomic, and every read verifies the digest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipelines.errors import BadInput, Problem
from steps.contract import write_text_atomic
from steps.oci.adapter_image import INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, AdapterImage
from steps.oci.blobs import Blob, HashingWriter, file_digest

REF_ANNOTATION = "org.opencontainers.image.ref.name"
DOCKER_MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def blob_path(root: Path, digest: str) -> Path:
    algorithm, hexdigest = digest.split(":", 1)
    return root / "blobs" / algorithm / hexdigest


def has_blob(root: Path, digest: str, size: int) -> bool:
    path = blob_path(root, digest)
    return path.is_file() and path.stat().st_size == size


@contextlib.contextmanager
def blob_writer(root: Path, digest: str, where: str) -> Iterator[HashingWriter]:
    """Stream a blob in; it lands under its digest only if the bytes hash to it."""
    path = blob_path(root, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as fh:
            writer = HashingWriter(fh)
            yield writer
        if writer.digest != digest:
            raise BadInput(
                Problem(where, f"served corrupt content for {digest}: the bytes hash to {writer.digest}",
                        "the stored blob is damaged; push the image again")
            )  # fmt: skip
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_blob(root: Path, blob: Blob) -> None:
    if has_blob(root, blob.digest, blob.size):
        return  # content-addressed: an existing blob of the right size is this blob
    with blob_writer(root, blob.digest, str(root)) as out, blob.open() as src:
        shutil.copyfileobj(src, out)


def read_index(root: Path) -> dict[str, Any]:
    path = root / "index.json"
    if not path.exists():
        return {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}
    index: dict[str, Any] = json.loads(path.read_text())
    return index


def tag_manifest(root: Path, manifest: Blob, tag: str | None) -> None:
    """Point ``tag`` (or just an untagged entry) at a stored manifest, atomically."""
    write_text_atomic(root / "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}) + "\n")
    index = read_index(root)
    keep = [
        m
        for m in index["manifests"]
        if m["digest"] != manifest.digest and (tag is None or m.get("annotations", {}).get(REF_ANNOTATION) != tag)
    ]
    index["manifests"] = [*keep, manifest.descriptor({REF_ANNOTATION: tag} if tag else None)]
    write_text_atomic(root / "index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_image(root: Path, image: AdapterImage, tag: str) -> str:
    """Store ``image`` under ``tag``; blobs first, then the index, so a reader never sees a dangling tag."""
    for blob in image.blobs:
        write_blob(root, blob)
    tag_manifest(root, image.manifest, tag)
    return image.manifest.digest


def verified_path(root: Path, digest: str) -> Path:
    """The blob's file, after checking that its content still hashes to ``digest``."""
    path = blob_path(root, digest)
    if not path.is_file():
        raise BadInput(Problem(str(root), f"has no blob {digest}", "push or pull the image again"))
    actual = file_digest(path)
    if actual != digest:
        raise BadInput(
            Problem(str(path), f"is corrupt: content digest {actual} != {digest}",
                    "delete the blob and push or pull the image again")
        )  # fmt: skip
    return path


def read_blob(root: Path, digest: str) -> bytes:
    return verified_path(root, digest).read_bytes()


def open_blob(root: Path, digest: str) -> IO[bytes]:
    return open(verified_path(root, digest), "rb")


def resolve(root: Path, reference: str) -> str:
    """A tag or a digest in this layout, to the manifest digest."""
    if reference.startswith("sha256:"):
        return reference
    for m in read_index(root)["manifests"]:
        tagged = m.get("annotations", {}).get(REF_ANNOTATION) == reference
        if tagged and m["mediaType"] in (MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST_MEDIA_TYPE):
            return str(m["digest"])
    raise BadInput(Problem(str(root), f"has no image tagged {reference!r}", "check the tag, or push first"))


def read_manifest(root: Path, digest: str) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads(read_blob(root, digest))
    if manifest.get("mediaType", MANIFEST_MEDIA_TYPE) not in (MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST_MEDIA_TYPE):
        raise BadInput(
            Problem(str(root), f"{digest} is a {manifest.get('mediaType')}, not an image manifest",
                    "reference one platform's image manifest by digest")
        )  # fmt: skip
    return manifest
