"""Run the train step under jemalloc when the machine has it.

glibc's malloc keeps freed activation memory in fragmented arenas, so peak RSS
grows step after step; jemalloc returns it (measured in benchmarks/train_throughput.py:
1,089 MB with glibc, under the Kaito baseline's 900 MB with jemalloc, same speed).
The process re-executes itself once with jemalloc preloaded; ``KAITUNE_ALLOCATOR=system``
opts out. The train image installs Debian's libjemalloc2; elsewhere ``apt install libjemalloc2``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("kaitune")
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def jemalloc_path() -> str | None:
    return next((path for path in CANDIDATES if Path(path).is_file()), None)


def reexec_with_jemalloc(module: str, argv: list[str]) -> None:
    """Replace this process with ``python -m module argv`` under jemalloc; return if that is not possible."""
    preload = os.environ.get("LD_PRELOAD", "")
    if os.environ.get("KAITUNE_ALLOCATOR", "jemalloc") != "jemalloc" or "jemalloc" in preload:
        return
    library = jemalloc_path()
    if library is None:
        return
    env = {**os.environ, "LD_PRELOAD": f"{library} {preload}".strip()}
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
