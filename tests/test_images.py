"""Containerfiles cannot be built here (no engine); check what can be checked without one."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from conftest import ROOT

from pipelines.finetune import Images, build
from pipelines.plan import load_and_plan

IMAGES = sorted((ROOT / "images").glob("*/Containerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_there_is_one_image_per_kind() -> None:
    assert [p.parent.name for p in IMAGES] == ["serve", "step", "train"]


@pytest.mark.parametrize("containerfile", IMAGES, ids=[p.parent.name for p in IMAGES])
def test_copy_sources_exist_and_base_is_pinned(containerfile: Path) -> None:
    steps = instructions(containerfile)
    for op, arg in steps:
        if op == "COPY":
            *sources, _dest = arg.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{containerfile}: COPY {source} does not exist"
        if op == "FROM":
            image = arg.split()[0]
            assert re.search(r":v?\d+\.\d+\.\d+", image) or "@sha256:" in image, f"unpinned base {image}"
    users = [arg for op, arg in steps if op == "USER"]
    assert users and not users[-1].startswith(("0", "root")), "images run as a non-root user"


@pytest.mark.parametrize("containerfile", IMAGES, ids=[p.parent.name for p in IMAGES])
def test_entrypoint_modules_import(containerfile: Path) -> None:
    label = re.search(r'io\.kaitune\.steps="([^"]+)"', containerfile.read_text())
    assert label, "each image lists the step modules it runs"
    for module in label.group(1).split():
        assert callable(importlib.import_module(module).main)


def test_every_workflow_step_runs_in_an_image_that_carries_it() -> None:
    carried: dict[str, set[str]] = {}
    for containerfile in IMAGES:
        label = re.search(r'io\.kaitune\.steps="([^"]+)"', containerfile.read_text())
        assert label
        carried[containerfile.parent.name] = set(label.group(1).split())
    images = Images()
    by_ref = {images.step: "step", images.train: "train", images.serve: "serve"}
    spec, plan = load_and_plan(ROOT / "examples" / "kaito_workspace_tuning_phi_3.yaml")
    for template in build(spec, plan).to_dict()["spec"]["templates"]:
        if "container" in template:
            module = template["container"]["command"][2]
            assert module in carried[by_ref[template["container"]["image"]]], template["name"]
