"""An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256``).

The local stand-in for a registry: ``skopeo copy oci:DIR:TAG docker://...`` or
``oras cp`` can move an image from it to any registry later. Blobs are written
by content address, index updates are atomic, and reads verify digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pipelines.errors import BadInput, Problem
from steps.adapter_image import INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, AdapterImage, Blob
from steps.contract import write_text_atomic

REF_ANNOTATION = "org.opencontainers.image.ref.name"


def _blob_path(root: Path, digest: str) -> Path:
    algorithm, hexdigest = digest.split(":", 1)
    return root / "blobs" / algorithm / hexdigest


def _write_blob(root: Path, blob: Blob) -> None:
    path = _blob_path(root, blob.digest)
    if path.exists() and path.stat().st_size == len(blob.data):
        return  # content-addressed: an existing blob of the right size is this blob
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(blob.data)
    os.replace(tmp, path)


def read_index(root: Path) -> dict[str, Any]:
    path = root / "index.json"
    if not path.exists():
        return {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}
    index: dict[str, Any] = json.loads(path.read_text())
    return index


def write_image(root: Path, image: AdapterImage, tag: str) -> str:
    """Store ``image`` under ``tag``; blobs first, then the index, so a reader never sees a dangling tag."""
    for blob in image.blobs:
        _write_blob(root, blob)
    write_text_atomic(root / "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}) + "\n")
    index = read_index(root)
    index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_ANNOTATION) != tag]
    index["manifests"].append(image.manifest.descriptor({REF_ANNOTATION: tag}))
    write_text_atomic(root / "index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
    return image.manifest.digest


def read_blob(root: Path, digest: str) -> bytes:
    path = _blob_path(root, digest)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(Problem(str(root), f"has no blob {digest}", "push the image again")) from None
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise BadInput(
            Problem(
                str(path),
                f"is corrupt: content digest {actual} != {digest}",
                "delete the blob and push the image again",
            )
        )
    return data


def resolve(root: Path, reference: str) -> str:
    """A tag or a digest in this layout, to the manifest digest."""
    if reference.startswith("sha256:"):
        return reference
    for m in read_index(root)["manifests"]:
        if m.get("annotations", {}).get(REF_ANNOTATION) == reference and m["mediaType"] == MANIFEST_MEDIA_TYPE:
            return str(m["digest"])
    raise BadInput(Problem(str(root), f"has no image tagged {reference!r}", "check the tag, or push first"))


def extract(root: Path, reference: str, dest: Path) -> dict[str, Any]:
    """Verify and unpack an adapter image's ``/data`` files into ``dest``; return the manifest."""
    import gzip
    import io
    import tarfile

    manifest: dict[str, Any] = json.loads(read_blob(root, resolve(root, reference)))
    config = json.loads(read_blob(root, manifest["config"]["digest"]))
    dest.mkdir(parents=True, exist_ok=True)
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        tar_bytes = gzip.decompress(read_blob(root, layer["digest"]))
        if "sha256:" + hashlib.sha256(tar_bytes).hexdigest() != diff_id:
            raise BadInput(
                Problem(
                    str(root),
                    f"layer {layer['digest']} does not match its diff_id",
                    "the image is corrupt; push it again",
                )
            )
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if not member.isfile() or name.parent != Path("data"):
                    continue  # only flat files under /data; no links, no path traversal
                src = tar.extractfile(member)
                assert src is not None
                (dest / name.name).write_bytes(src.read())
    return manifest
