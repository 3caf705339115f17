"""An adapter's lineage as image annotations, and the reverse: how a rerun finds an adapter it already pushed.

The push step writes the training summary's identity (base model, method, dataset
digest, config hash) and metrics into ``kaitune.*`` manifest annotations. Before
training, the train step reads the manifest at the push target: if its
``kaitune.config-hash`` equals this run's key (model, method, training config,
targets, dtype, max length, dataset digest, base weights), the adapter is pulled
instead of trained again, and the summary rebuilt from the annotations gives the
push step the very same manifest, so nothing is uploaded and the digest is unchanged.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipelines import image_ref
from pipelines.errors import BadInput, Transient
from steps.oci.options import RegistryOptions

log = logging.getLogger("kaitune")
PREFIX = "kaitune."
CONFIG_HASH = "kaitune.config-hash"


def lineage_annotations(summary: dict[str, Any]) -> dict[str, str]:
    out = {
        "kaitune.base-model": summary["base_model"],
        "kaitune.method": summary["method"],
        "kaitune.dataset-digest": summary["dataset_digest"],
        CONFIG_HASH: summary["config_hash"],
        "kaitune.metrics": json.dumps(summary["metrics"], sort_keys=True, separators=(",", ":")),
    }
    if summary["metrics"].get("eval_loss") is not None:
        out["kaitune.eval-loss"] = f"{summary['metrics']['eval_loss']:.6f}"
    if summary.get("base_model_image"):
        out["kaitune.base-model-image"] = summary["base_model_image"]
    return out


def summary_from(found: dict[str, str]) -> dict[str, Any]:
    """The training summary an image's annotations carry (enough for push to rebuild the same manifest)."""
    return {
        "base_model": found["kaitune.base-model"],
        "method": found["kaitune.method"],
        "dataset_digest": found["kaitune.dataset-digest"],
        "config_hash": found[CONFIG_HASH],
        "metrics": json.loads(found["kaitune.metrics"]),
        "base_model_image": found.get("kaitune.base-model-image"),
        "finished_at": found.get("org.opencontainers.image.created"),
        "reused_from": None,
    }


def find_trained(reference: str, key: str, options: RegistryOptions) -> dict[str, str] | None:
    """The annotations of the image at ``reference`` when it holds the adapter for ``key``; else None."""
    from steps.oci.registry import RegistryClient
    from steps.oci.transfer import _resolve_manifest

    try:
        ref = image_ref.parse(reference)
        client = RegistryClient(ref.registry, options)
        body, _ = _resolve_manifest(client, ref.repository, ref.digest or ref.tag or "latest")
    except (BadInput, Transient, ValueError) as exc:
        # No image yet (the usual first run), or the registry cannot be read: train as usual.
        log.info("no reusable adapter at %s (%s)", reference, str(exc).splitlines()[0][:160])
        return None
    found: dict[str, str] = json.loads(body).get("annotations") or {}
    if found.get(CONFIG_HASH) != key:
        return None
    return found
