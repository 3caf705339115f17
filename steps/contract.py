"""The step contract (DESIGN.md): outputs as files, exit codes, progress, atomic writes.

Every step's ``main`` goes through ``run_step`` so a user error is one clear
message and exit 2, a transient fault is exit 75 (Argo retries it), and anything
else is reported as a bug with its traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipelines.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT, BadInput, Transient

log = logging.getLogger("kaitune")


def setup_logging(step: str) -> None:
    logging.basicConfig(
        level=os.environ.get("KAITUNE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {step} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``final`` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_outputs(outputs_dir: Path, values: dict[str, Any]) -> None:
    """One file per output parameter; Argo reads them with ``valueFrom.path``."""
    for name, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        write_text_atomic(outputs_dir / name, text)


class Progress:
    """``N/M`` to ``$ARGO_PROGRESS_FILE`` (the Argo UI's progress column) when set."""

    def __init__(self, total: int) -> None:
        self.total = max(total, 1)
        self.path = os.environ.get("ARGO_PROGRESS_FILE")

    def update(self, done: int) -> None:
        if self.path:
            with contextlib.suppress(OSError):
                Path(self.path).write_text(f"{min(done, self.total)}/{self.total}\n")


def run_step(name: str, main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    setup_logging(name)
    try:
        main(argv)
    except BadInput as exc:
        print(exc.render(), file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except Transient as exc:
        print(f"error: {exc} (transient: the step may be retried)", file=sys.stderr)
        sys.exit(EXIT_TRANSIENT)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        print(
            f"{name}: internal error - this is a kaitune bug, please report it with the traceback above",
            file=sys.stderr,
        )
        sys.exit(1)
