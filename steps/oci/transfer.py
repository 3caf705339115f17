"""Push an image to a registry, and pull any image reference (registry or ``oci-layout://``) into a directory.

Pull is what ``kaitune pull``, deploy's init container, fetch-data's ``input.image``
and train's image-held weights share. Every blob is verified against its digest
before anything is unpacked, and the target directory appears whole or not at all.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import image_ref
from pipelines.errors import BadInput, Problem
from steps.contract import atomic_dir
from steps.oci import layout, unpack
from steps.oci.adapter_image import AdapterImage
from steps.oci.blobs import Blob
from steps.oci.registry import INDEX_TYPES, RegistryClient, RegistryOptions

log = logging.getLogger("kaitune")
LAYOUT_SCHEME = "oci-layout://"


@dataclass(frozen=True)
class PushResult:
    digest: str
    reference: str  # digest-pinned: registry/repository@sha256:...
    tag: str
    uploaded: list[str]
    skipped: list[str]


@dataclass(frozen=True)
class PullResult:
    digest: str
    files: list[str]
    annotations: dict[str, str]

    def pinned(self, reference: str) -> str:
        """``reference`` pinned to the pulled digest (tag dropped): what lineage records."""
        if reference.startswith(LAYOUT_SCHEME):
            return f"{LAYOUT_SCHEME}{split_layout_reference(reference)[0]}@{self.digest}"
        ref = image_ref.parse(reference)
        return f"{ref.registry}/{ref.repository}@{self.digest}"


def push(image: AdapterImage, target: str, options: RegistryOptions | None = None) -> PushResult:
    """Push ``image`` to ``target`` (registry/repository:tag): blobs first, then the manifest under the tag."""
    ref = _parse(target, "--image")
    tag = ref.tag or "latest"
    client = RegistryClient(ref.registry, options)
    uploaded: list[str] = []
    skipped: list[str] = []
    for blob in (image.layer, image.config):
        (uploaded if client.push_blob(ref.repository, blob) else skipped).append(blob.digest)
    client.put_manifest(ref.repository, tag, image.manifest)
    pinned = f"{ref.registry}/{ref.repository}@{image.manifest.digest}"
    log.info("pushed %s (%s); uploaded %d blob(s), %d already there", pinned, tag, len(uploaded), len(skipped))
    return PushResult(image.manifest.digest, pinned, tag, uploaded, skipped)


def pull(
    reference: str,
    dest: Path,
    options: RegistryOptions | None = None,
    *,
    reuse: bool = False,
    roots: tuple[str, ...] = unpack.ADAPTER_ROOTS,
) -> PullResult:
    """Verify and unpack the image at ``reference`` into ``dest`` (replaced whole, never half-written).

    With ``reuse``, a ``dest`` that already holds this image's digest is kept as it is: a rerun after a
    preemption does not download base weights again.
    """
    if reference.startswith(LAYOUT_SCHEME):
        root, ref = split_layout_reference(reference)
        digest = layout.resolve(root, ref)
        cached = _cached(dest, digest) if reuse else None
        return cached or _unpack(root, digest, dest, reference, roots)
    remote = _parse(reference, "image reference")
    client = RegistryClient(remote.registry, options)
    body, digest = _resolve_manifest(client, remote.repository, remote.digest or remote.tag or "latest")
    cached = _cached(dest, digest) if reuse else None
    if cached:
        log.info("%s (%s) is already in %s", reference, digest[:19], dest)
        return cached
    with tempfile.TemporaryDirectory(prefix="kaitune-pull-") as scratch:
        root = Path(scratch)
        _fetch_blobs(client, remote.repository, body, root)
        return _unpack(root, digest, dest, reference, roots)


def split_layout_reference(reference: str) -> tuple[Path, str]:
    """``oci-layout://DIR[@sha256:...|:TAG]`` to the directory and the digest or tag (default ``latest``)."""
    rest = reference.removeprefix(LAYOUT_SCHEME)
    if "@" in rest:
        path, ref = rest.rsplit("@", 1)
    elif ":" in Path(rest).name:
        path, ref = rest.rsplit(":", 1)
    else:
        path, ref = rest, "latest"
    root = Path(path)
    if not (root / "index.json").is_file():
        raise BadInput(Problem(reference, f"{root} is not an OCI image layout (no index.json)", "check the path"))
    return root, ref


def _parse(text: str, what: str) -> image_ref.ImageRef:
    try:
        ref = image_ref.parse(text)
    except ValueError as exc:
        raise BadInput(Problem(what, f"{text!r}: {exc}", "use registry/repository:tag or ...@sha256:DIGEST")) from None
    problem = ref.strict_problem()
    if problem:
        raise BadInput(Problem(what, f"{text!r}: {problem}", "use the registry's real host and a lowercase name"))
    return ref


def _resolve_manifest(client: RegistryClient, repository: str, reference: str) -> tuple[bytes, str]:
    """The image manifest's bytes and digest; an index resolves to its linux/amd64 entry."""
    body, digest = client.fetch_manifest(repository, reference)
    manifest: dict[str, Any] = json.loads(body)
    if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
        body, digest = client.fetch_manifest(repository, _pick_platform(manifest["manifests"]))
    return body, digest


def _fetch_blobs(client: RegistryClient, repository: str, body: bytes, root: Path) -> None:
    manifest: dict[str, Any] = json.loads(body)
    for descriptor in [manifest["config"], *manifest.get("layers", [])]:
        client.fetch_blob(repository, descriptor, root)
    blob = Blob.of_bytes(manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json"), body)
    layout.write_blob(root, blob)
    layout.tag_manifest(root, blob, None)


def _pick_platform(manifests: list[dict[str, Any]]) -> str:
    for m in manifests:
        platform = m.get("platform", {})
        if platform.get("os") == "linux" and platform.get("architecture") == "amd64":
            return str(m["digest"])
    if not manifests:
        raise BadInput(Problem("image index", "lists no manifests", "push a real image"))
    return str(manifests[0]["digest"])


MARKER = ".kaitune-image.json"


def _cached(dest: Path, digest: str) -> PullResult | None:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("digest") != digest:
        return None
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and p.name != MARKER)
    return PullResult(digest, files, dict(marker.get("annotations") or {}))


def _unpack(root: Path, digest: str, dest: Path, where: str, roots: tuple[str, ...]) -> PullResult:
    manifest = layout.read_manifest(root, digest)
    annotations = dict(manifest.get("annotations") or {})
    with atomic_dir(dest) as tmp:
        files = unpack.unpack(root, manifest, tmp, where, roots)
        # Written last, inside the scratch directory: its presence means the whole image is there.
        (tmp / MARKER).write_text(json.dumps({"digest": digest, "reference": where, "annotations": annotations}))
    log.info("pulled %s (%s): %d file(s) into %s", where, digest[:19], len(files), dest)
    return PullResult(digest, files, annotations)
