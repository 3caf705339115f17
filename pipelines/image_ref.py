"""OCI image references: ``[registry[:port]/]repository[:tag][@digest]``.

Parsing follows the distribution reference grammar. Two levels: ``parse`` is
lenient about case and underscores in the host so a template with placeholders
(``ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1``, as Kaito's own examples
ship) still validates; ``ImageRef.strict_problem`` says what a registry would
reject, so callers can warn before anything is pushed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HOST = r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*"
_DOMAIN = re.compile(rf"^(?:{_HOST}|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?$")
_PATH_COMPONENT = re.compile(r"^[A-Za-z0-9]+(?:(?:[._]|__|-+)[A-Za-z0-9]+)*$")
_STRICT_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_STRICT_HOST = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?$"
)
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$|^sha512:[a-f0-9]{128}$")
DEFAULT_REGISTRY = "docker.io"


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def strict_problem(self) -> str | None:
        host = self.registry
        if not _STRICT_HOST.match(host) and not host.startswith("["):
            return f"registry host {host!r} is not a valid hostname (letters, digits, '-' and '.')"
        bad = [c for c in self.repository.split("/") if not _STRICT_COMPONENT.match(c)]
        if bad:
            return f"repository component {bad[0]!r} must be lowercase"
        return None


def parse(text: str) -> ImageRef:
    """Parse an image reference; raise ValueError saying which part is wrong."""
    ref = text.strip()
    if not ref or any(c.isspace() for c in ref):
        raise ValueError("an image reference cannot be empty or contain spaces")
    digest = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
        if not _DIGEST.match(digest):
            raise ValueError(f"digest {digest!r} is not 'sha256:' followed by 64 lowercase hex digits")
    tag = None
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        ref, tag = ref.rsplit(":", 1)
        if not _TAG.match(tag):
            raise ValueError(f"tag {tag!r} may hold only letters, digits, '_', '.' and '-' (128 at most)")
    parts = ref.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry, path = parts[0], parts[1:]
        if not _DOMAIN.match(registry):
            raise ValueError(f"registry {registry!r} is not a host name with an optional port")
    else:
        registry, path = DEFAULT_REGISTRY, parts
    if not path or not all(path):
        raise ValueError("the repository name is missing")
    for component in path:
        if not _PATH_COMPONENT.match(component):
            raise ValueError(f"repository component {component!r} may hold only letters, digits and separators")
    return ImageRef(registry, "/".join(path), tag, digest)
