"""push: package the adapter as Kaito's OCI image and store it.

Targets: an OCI image layout directory (``--layout DIR``, the local default and
``output.volumeSource``). Pushing to a registry (``--image REF``) is not in this
version yet and is refused with a clear error rather than half-done.

Outputs: digest, image-ref (digest-pinned), tag.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipelines import image_ref
from pipelines.errors import BadInput, Problem
from steps import adapter_image, oci_layout
from steps.contract import run_step, write_outputs

log = logging.getLogger("kaitune")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m steps.push", description=__doc__)
    p.add_argument("--adapter-dir", type=Path, required=True)
    p.add_argument("--model-name", required=True, help="value of the sh.kaito.model.name annotation")
    p.add_argument("--image", default="", help="registry reference registry/repository:tag")
    p.add_argument("--layout", type=Path, help="OCI image layout directory to write instead of a registry")
    p.add_argument("--tag", default="latest", help="tag inside the layout")
    p.add_argument("--outputs", type=Path, required=True)
    return p.parse_args(argv)


def image_annotations(adapter_dir: Path, model_name: str) -> dict[str, str]:
    out = {adapter_image.MODEL_NAME_ANNOTATION: model_name, "org.opencontainers.image.title": "kaitune adapter"}
    summary_path = adapter_dir / "training_summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        out.update(
            {
                "kaitune.base-model": summary["base_model"],
                "kaitune.method": summary["method"],
                "kaitune.dataset-digest": summary["dataset_digest"],
                "kaitune.config-hash": summary["config_hash"],
            }
        )
        if summary["metrics"].get("eval_loss") is not None:
            out["kaitune.eval-loss"] = f"{summary['metrics']['eval_loss']:.6f}"
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    image = adapter_image.build(args.adapter_dir, image_annotations(args.adapter_dir, args.model_name))
    if args.layout is None:
        target = image_ref.parse(args.image) if args.image else None
        raise BadInput(
            Problem(
                "tuning.output.image",
                f"pushing to a registry ({target}) is not available in this kaitune version yet",
                "use tuning.output.volumeSource to write an OCI image "
                "layout, then copy it with 'skopeo copy oci:DIR:TAG docker://REF'",
            )
        )
    digest = oci_layout.write_image(args.layout, image, args.tag)
    ref = f"oci-layout://{args.layout}@{digest}"
    log.info("adapter image %s (layer %s, %d bytes)", ref, image.layer.digest[:19], len(image.layer.data))
    write_outputs(args.outputs, {"digest": digest, "image-ref": ref, "tag": args.tag})


if __name__ == "__main__":
    run_step("push", main)
