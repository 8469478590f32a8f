"""Rendering the kustomizations under k8s/ and walking the objects they hold."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

# In CI the repository sits next to a copy of shared/, which contains the KubeRay CRDs.
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"

# name -> folder of each kustomization, relative to the repository root.
KUSTOMIZATIONS = {
    "base": "k8s/base",
    "base/finetune": "k8s/base/finetune",
    "cpu": "k8s/overlays/cpu",
    "cpu/finetune": "k8s/overlays/cpu/finetune",
    "gpu": "k8s/overlays/gpu",
    "gpu/finetune": "k8s/overlays/gpu/finetune",
}

# Each fine-tuning kustomization uses the volumes that the serving kustomization beside it creates.
SERVING_OF = {"base/finetune": "base", "cpu/finetune": "cpu", "gpu/finetune": "gpu"}

RAY_KINDS = ("RayService", "RayJob", "RayCluster")


def render(folder: str) -> list[dict]:
    """The objects `kubectl kustomize` renders from a kustomization folder."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed, so the kustomizations cannot be rendered")
    result = subprocess.run([kubectl, "kustomize", str(REPO / folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


def objects_of(objects: list[dict], *kinds: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] in kinds]


def name_of(obj: dict) -> str:
    return f"{obj['kind']} {obj['metadata']['name']}"


def ray_cluster_spec(obj: dict) -> dict:
    """The RayCluster spec of a RayService, a RayJob or a RayCluster."""
    if obj["kind"] == "RayService":
        return obj["spec"]["rayClusterConfig"]
    if obj["kind"] == "RayJob":
        return obj["spec"]["rayClusterSpec"]
    return obj["spec"]


def ray_pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, template) for the head and every worker group of a KubeRay object; the Ray container is first."""
    cluster = ray_cluster_spec(obj)
    templates = [(f"{name_of(obj)} head", cluster["headGroupSpec"]["template"])]
    for group in cluster.get("workerGroupSpecs", []):
        templates.append((f"{name_of(obj)} worker group {group['groupName']}", group["template"]))
    return templates


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """ray_pod_templates, and the submitter pod of a RayJob."""
    templates = ray_pod_templates(obj)
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        templates.append((f"{name_of(obj)} submitter", obj["spec"]["submitterPodTemplate"]))
    return templates
