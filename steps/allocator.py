"""Run the train step under jemalloc when the machine has it.

glibc's malloc fragments under a training loop's churn of activation tensors, so peak
RSS grows step after step. jemalloc, with huge allocations kept in the normal arenas
(``oversize_threshold:0``) and dirty pages reused rather than purged and faulted in again,
keeps the peak below the Kaito baseline's and runs faster than glibc (figures in the
README's benchmark table). The process re-executes itself once with jemalloc preloaded;
``KAITUNE_ALLOCATOR=system`` opts out and a user's ``MALLOC_CONF`` wins. The train image
installs Debian's libjemalloc2; elsewhere ``apt install libjemalloc2``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def jemalloc_path() -> str | None:
    return next((path for path in CANDIDATES if Path(path).is_file()), None)


MALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def jemalloc_env(base: dict[str, str]) -> dict[str, str] | None:
    """``base`` with jemalloc preloaded and configured, or None when it is absent, opted out or already loaded."""
    preload = base.get("LD_PRELOAD", "")
    if base.get("KAITUNE_ALLOCATOR", "jemalloc") != "jemalloc" or "jemalloc" in preload:
        return None
    library = jemalloc_path()
    if library is None:
        return None
    return {**base, "LD_PRELOAD": f"{library} {preload}".strip(), "MALLOC_CONF": base.get("MALLOC_CONF", MALLOC_CONF)}


def reexec_with_jemalloc(module: str, argv: list[str]) -> None:
    """Replace this process with ``python -m module argv`` under jemalloc; return if that is not possible."""
    env = jemalloc_env(dict(os.environ))
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
