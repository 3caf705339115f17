"""push: package the adapter as Kaito's OCI image and push it.

Targets: a registry (``--image registry/repository:tag``; credentials from the
mounted ``imagePushSecret``, ``$DOCKER_CONFIG`` or ``~/.docker``), or an OCI image
layout directory (``--layout DIR``, the local default and ``output.volumeSource``).

Outputs: digest, image-ref (digest-pinned), tag.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from pipelines import __version__
from pipelines.errors import BadInput, Problem
from steps import adapter_lineage
from steps.contract import run_step, write_outputs
from steps.oci import adapter_image, layout, options, transfer

log = logging.getLogger("kaitune")
SOURCE_URL = "https://github.com/kaitune/kaitune"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m steps.push", description=__doc__)
    p.add_argument("--adapter-dir", type=Path, required=True)
    p.add_argument("--model-name", required=True, help="value of the sh.kaito.model.name annotation")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--image", help="registry reference registry/repository:tag")
    target.add_argument("--layout", type=Path, help="OCI image layout directory to write instead of a registry")
    p.add_argument("--tag", default="latest", help="tag inside the layout")
    p.add_argument("--outputs", type=Path, required=True)
    options.add_arguments(p)
    return p.parse_args(argv)


def _created(summary: dict[str, object]) -> str | None:
    """When the adapter was made, so that pushing the same adapter twice gives the same digest."""
    if isinstance(summary.get("finished_at"), str):
        return str(summary["finished_at"])
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return datetime.fromtimestamp(int(epoch), UTC).isoformat().replace("+00:00", "Z") if epoch else None


def image_annotations(adapter_dir: Path, model_name: str) -> dict[str, str]:
    out = {
        adapter_image.MODEL_NAME_ANNOTATION: model_name,
        "org.opencontainers.image.title": f"{model_name} adapter",
        "org.opencontainers.image.source": SOURCE_URL,
        "org.opencontainers.image.revision": __version__,
    }
    summary_path = adapter_dir / "training_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    created = _created(summary)
    if created:
        out["org.opencontainers.image.created"] = created
    if summary:
        out.update(adapter_lineage.lineage_annotations(summary))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.adapter_dir.is_dir():
        raise BadInput(Problem(str(args.adapter_dir), "is not a directory", "run the train step first"))
    # The layer is staged beside the adapter (the work volume), not in a small container /tmp.
    with tempfile.TemporaryDirectory(dir=args.adapter_dir.parent, prefix=".push-") as staging:
        image = adapter_image.build(
            args.adapter_dir, image_annotations(args.adapter_dir, args.model_name), Path(staging)
        )
        log.info("adapter image %s: layer %s, %d bytes", image.manifest.digest[:19], image.layer.digest[:19],
                 image.layer.size)  # fmt: skip
        if args.layout is not None:
            digest = layout.write_image(args.layout, image, args.tag)
            ref, tag = f"oci-layout://{args.layout}@{digest}", args.tag
        else:
            result = transfer.push(image, args.image, options.from_args(args))
            digest, ref, tag = result.digest, result.reference, result.tag
    write_outputs(args.outputs, {"digest": digest, "image-ref": ref, "tag": tag})


if __name__ == "__main__":
    run_step("push", main)
