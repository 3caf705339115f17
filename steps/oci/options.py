"""How to reach a registry: TLS, credentials file, chunk size and the retry policy, with their CLI flags.

Flags default from the environment (``KAITUNE_REGISTRY_CA_FILE``,
``KAITUNE_REGISTRY_PLAIN_HTTP``) so an Argo step or an init container can be
configured without changing its arguments.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    budget_s: float = 25.0  # no new attempt starts after this long: a dead registry fails in < 30 s
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after and retry_after.strip().isdigit():
            return min(float(retry_after), self.max_backoff_s)
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)


@dataclass(frozen=True)
class RegistryOptions:
    plain_http: bool | None = None  # None: plain HTTP for loopback registries (as Docker does), HTTPS elsewhere
    ca_file: Path | None = None
    docker_config: Path | None = None
    chunk_size: int = 8 << 20
    retry: RetryPolicy = field(default_factory=RetryPolicy)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("registry")
    ca = os.environ.get("KAITUNE_REGISTRY_CA_FILE")
    group.add_argument(
        "--ca-file",
        type=Path,
        default=Path(ca) if ca else None,
        help="PEM bundle that signs the registry's TLS certificate (verification is never turned off)",
    )
    plain = os.environ.get("KAITUNE_REGISTRY_PLAIN_HTTP", "").lower()
    group.add_argument(
        "--plain-http",
        action=argparse.BooleanOptionalAction,
        default={"true": True, "1": True, "false": False, "0": False}.get(plain),
        help="talk plain HTTP (default: only to loopback registries)",
    )
    group.add_argument(
        "--docker-config",
        type=Path,
        default=None,
        help="Docker config.json (or its directory) with the login; default $DOCKER_CONFIG, ~/.docker",
    )


def from_args(args: argparse.Namespace) -> RegistryOptions:
    return RegistryOptions(plain_http=args.plain_http, ca_file=args.ca_file, docker_config=args.docker_config)
