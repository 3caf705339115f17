"""cleanup (the workflow's exit handler): give back the GPU nodes training used.

Kubernetes target: the NodeClaims kaitune created for this workspace are deleted
when the workflow did not succeed, or when ``--keep-nodes false`` says serving
does not need them. It is idempotent: claims already gone are fine. Local
target: nothing was provisioned; the step reports the workflow's final status.
"""

from __future__ import annotations

import argparse
import logging

from steps.contract import run_step

log = logging.getLogger("kaitune")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m steps.cleanup", description=__doc__)
    p.add_argument("--target", choices=["local", "kubernetes"], required=True)
    p.add_argument("--workspace", required=True)
    p.add_argument("--namespace", default="default")
    p.add_argument("--workflow-status", default="Unknown")
    p.add_argument("--keep-nodes", default="true", help="keep the nodes after success: the model is served there")
    args = p.parse_args(argv)
    if args.target == "local":
        log.info("workflow %s for %s: local run, no nodes to release", args.workflow_status, args.workspace)
        return
    if args.workflow_status == "Succeeded" and args.keep_nodes.lower() == "true":
        log.info("workflow succeeded: keeping %s's GPU nodes for serving", args.workspace)
        return
    from steps import gpu_nodes, kube

    deleted = gpu_nodes.release_claims(kube.connect(), args.workspace, args.namespace)
    log.info("workflow %s: released NodeClaims %s", args.workflow_status, ", ".join(deleted) or "(none left)")


if __name__ == "__main__":
    run_step("cleanup", main)
