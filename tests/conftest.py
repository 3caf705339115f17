"""Shared fixtures: paths, the Argo schema validator, a tiny-phi3 cache, the seed Workspace."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SEED = EXAMPLES / "kaito_workspace_tuning_phi_3.yaml"
QUICKSTART = EXAMPLES / "quickstart.yaml"


def schemas_dir() -> Path:
    """``../shared/schemas`` beside the checkout (DESIGN.md), or $KAITUNE_SCHEMAS."""
    env = os.environ.get("KAITUNE_SCHEMAS")
    return Path(env) if env else ROOT.parent / "shared" / "schemas"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true", help="rewrite golden files from the code")


@pytest.fixture
def regen_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regen-golden")) or os.environ.get("KAITUNE_REGEN_GOLDEN") == "1"


@pytest.fixture(scope="session")
def argo_schema() -> dict[str, Any]:
    path = schemas_dir() / "argo-workflows-v4.0.5.schema.json"
    if not path.exists():
        pytest.fail(f"Argo schema not found at {path}; set KAITUNE_SCHEMAS to the shared/schemas folder")
    schema: dict[str, Any] = json.loads(path.read_text())
    # Upstream types IntOrString as string only (argo-workflows#6060); Kubernetes accepts both.
    schema["definitions"]["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = {"type": ["string", "integer"]}
    return schema


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown keys rejected wherever an object lists its properties."""
    out = copy.deepcopy(schema)
    for definition in out["definitions"].values():
        if definition.get("type") == "object" and "properties" in definition:
            definition.setdefault("additionalProperties", False)
    return out


@pytest.fixture(scope="session")
def kaitune_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where tiny-phi3 is built: $KAITUNE_CACHE if set (CI sets a fresh one), else a session temp dir."""
    cache = Path(os.environ.get("KAITUNE_CACHE") or tmp_path_factory.mktemp("kaitune-cache"))
    old = os.environ.get("KAITUNE_CACHE")
    os.environ["KAITUNE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("KAITUNE_CACHE", None)
    else:
        os.environ["KAITUNE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_phi3(kaitune_cache: Path) -> Path:
    from steps import tiny_phi3

    return tiny_phi3.ensure()


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture
def seed_doc() -> dict[str, Any]:
    return load_docs(SEED)[0]
