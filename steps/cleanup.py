"""cleanup (the workflow's exit handler): give back the nodes training used.

Local target: nothing was provisioned, so there is nothing to release; the run
reports the workflow's final status. Kubernetes target: releasing NodeClaims is
not in this version yet (refused, like provision).
"""

from __future__ import annotations

import argparse
import logging

from pipelines.errors import BadInput, Problem
from steps.contract import run_step

log = logging.getLogger("kaitune")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m steps.cleanup", description=__doc__)
    p.add_argument("--target", choices=["local", "kubernetes"], required=True)
    p.add_argument("--workspace", required=True)
    p.add_argument("--workflow-status", default="Unknown")
    args = p.parse_args(argv)
    if args.target != "local":
        raise BadInput(
            Problem(
                "cleanup",
                "releasing Karpenter NodeClaims is not available in this kaitune version yet",
                "delete the workspace's NodeClaims with kubectl",
            )
        )
    log.info("workflow %s for %s: local run, no nodes to release", args.workflow_status, args.workspace)


if __name__ == "__main__":
    run_step("cleanup", main)
