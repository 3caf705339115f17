"""Which dataset URLs a Workspace may name.

A tuning job runs inside the cluster with the workflow's service account, so a
URL pointing at loopback, a private network or a cloud metadata endpoint is a
server-side request forgery risk. Those are refused unless the user opts in
(local/dev runs against a loopback server).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

_METADATA_HOSTS = {
    "169.254.169.254",  # AWS, Azure, GCP, OpenStack
    "fd00:ec2::254",  # AWS IPv6
    "100.100.100.200",  # Alibaba Cloud
    "metadata.google.internal",
    "metadata.azure.internal",
    "metadata",
}


def url_problem(url: str, *, allow_local: bool) -> str | None:
    """Return why ``url`` is not acceptable, or None."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises on a malformed port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"uses scheme {parts.scheme or '(none)'!r}; only http and https are supported"
    if not host:
        return "has no host"
    if parts.username or parts.password:
        return "embeds credentials; put a token in a secret instead, never in the spec"
    host = host.lower().rstrip(".")
    if host in _METADATA_HOSTS:
        return f"points at a cloud metadata endpoint ({host}); that is never a dataset"
    if allow_local:
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return f"points at loopback ({host})"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None  # a DNS name; resolution happens at download time, not validation
    for flag, label in (
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_private", "a private network"),
        ("is_unspecified", "an unspecified address"),
        ("is_multicast", "multicast"),
        ("is_reserved", "a reserved range"),
    ):
        if getattr(ip, flag):
            return f"points at {label} ({host})"
    return None
