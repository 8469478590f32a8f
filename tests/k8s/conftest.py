"""Fixtures for the manifest tests: every kustomization rendered once, and the KubeRay CRD schemas."""

from __future__ import annotations

import pytest
import yaml

from k8s_manifests import CRD_DIR, KUSTOMIZATIONS, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """name -> rendered objects, for every kustomization in KUSTOMIZATIONS."""
    return {name: render(folder) for name, folder in KUSTOMIZATIONS.items()}


@pytest.fixture(scope="session")
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of KubeRay's CRDs."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"the KubeRay CRDs are not at {CRD_DIR}")
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    assert schemas, f"no CRD in {CRD_DIR}"
    return schemas
