"""One training process per GPU on the node (data parallel), as Kaito runs accelerate.

``launch`` starts the worker processes itself, rather than through torchrun, so a
worker's exit code (2 for bad input, 75 for transient) is the step's exit code,
which is what Argo's retry strategy reads. Workers find each other on 127.0.0.1;
on CPU they use gloo, which is how the tests run two of them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def current() -> Dist:
    return Dist(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def processes_for(value: str) -> int:
    """``auto``: one per visible CUDA device (1 on CPU); else the number given."""
    if value != "auto":
        return max(1, int(value))
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def launch(nproc: int, module: str, argv: list[str]) -> int:
    """Run ``python -m module argv`` as ``nproc`` ranks; return the first failing rank's exit code, else 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nproc),
        }
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env))
    code = 0
    while procs:
        for proc in list(procs):
            rc = proc.poll()
            if rc is None:
                continue
            procs.remove(proc)
            if rc != 0 and code == 0:
                code = rc
                for other in procs:  # one rank failed: the others would wait for it forever
                    other.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    return code


def init(dist: Dist) -> Any:
    """Join the process group; return this rank's device."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)
        device = torch.device("cuda", dist.local_rank)
    else:
        device = torch.device("cpu")
    if dist.enabled and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch

        torch.distributed.barrier()


def sum_across(dist: Dist, value: float) -> float:
    if not dist.enabled:
        return value
    import torch

    tensor = torch.tensor([value], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch.distributed.all_reduce(tensor)
    return float(tensor.item())


def shutdown(dist: Dist) -> None:
    if dist.enabled:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
