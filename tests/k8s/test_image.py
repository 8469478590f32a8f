"""The image recipes in k8s/image, read as text: nothing here runs docker.

They must install the project with torch pinned as in pyproject.toml, keep the source where the manifests look for
it (/app), and run as the non-root uid the manifests' securityContext names.
"""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from k8s_manifests import RAY_KINDS, REPO, objects_of, ray_cluster_spec, render

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

IMAGE = REPO / "k8s" / "image"
DOCKERFILES = {"cpu": IMAGE / "Dockerfile.cpu", "gpu": IMAGE / "Dockerfile"}


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILES[name].read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            result.append((instruction.upper(), " ".join(arguments.split())))
    return result


def build_args(name: str) -> dict[str, str]:
    args = {}
    for instruction, arguments in instructions(name):
        if instruction == "ARG" and "=" in arguments:
            key, _, value = arguments.partition("=")
            args[key] = value.strip('"')
    return args


def pip_installs(name: str) -> list[list[str]]:
    """The arguments of every `pip install` in the RUN instructions."""
    commands = []
    for instruction, arguments in instructions(name):
        if instruction != "RUN":
            continue
        command: list[str] = []
        for word in shlex.split(arguments) + ["&&"]:
            if word not in ("&&", ";"):
                command.append(word)
                continue
            if "pip" in command and command[command.index("pip") + 1:command.index("pip") + 2] == ["install"]:
                commands.append(command[command.index("pip") + 2:])
            command = []
    return commands


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def torch_pin(pyproject: dict) -> str:
    (pin,) = [dep for dep in pyproject["project"]["dependencies"] if re.match(r"torch\b", dep)]
    assert pin.startswith("torch=="), f"pyproject.toml should pin torch exactly, got {pin}"
    return pin


def packages(pyproject: dict) -> list[str]:
    return [pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_uid_1000(name):
    users = [arguments for instruction, arguments in instructions(name) if instruction == "USER"]
    # Numeric, so that the kubelet can check runAsNonRoot without reading /etc/passwd.
    assert users and users[-1] in ("1000", "1000:1000"), f"the last USER of {name} is {users[-1:]}, not uid 1000"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_project_with_pinned_torch(name, pyproject):
    installs = pip_installs(name)
    assert any(torch_pin(pyproject) in args for args in installs), (
        f"{name}: no pip install of {torch_pin(pyproject)}, the pin of pyproject.toml")
    project = "'.[gpu]'" if name == "gpu" else "."
    assert any(shlex.split(project)[0] in args for args in installs), f"{name}: no pip install of {project}"
    for args in installs:
        unpinned = [arg for arg in args if re.fullmatch(r"torch([<>=!~].*)?", arg) and "==" not in arg]
        assert not unpinned, f"{name}: unpinned torch in pip install {args}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_keeps_packages_in_app(name, pyproject):
    workdirs = [arguments for instruction, arguments in instructions(name) if instruction == "WORKDIR"]
    assert workdirs[-1] == "/app", "the manifests run /app/finetune/lora.py and serve /app/jamba/default"
    copied = [source for instruction, arguments in instructions(name) if instruction == "COPY"
              for source in arguments.split()[:-1]]
    for needed in ["pyproject.toml", "README.md", *packages(pyproject)]:
        assert needed in copied, f"{name}: {needed} is not copied into the image"

    # The build context sends only what the allow-list of the Dockerfile's own ignore file lets through.
    ignore_file = DOCKERFILES[name].parent / f"{DOCKERFILES[name].name}.dockerignore"
    ignore = [line.strip() for line in ignore_file.read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", f"{ignore_file.name} should leave out everything, then allow what the image needs"
    for needed in ["pyproject.toml", "README.md", *packages(pyproject)]:
        assert f"!{needed}" in ignore, f"{name}: {needed} is left out of the build context"


def test_gpu_kernels_match_cuda():
    args = build_args("gpu")
    (base,) = [arguments for instruction, arguments in instructions("gpu") if instruction == "FROM"]
    assert base.startswith("nvidia/cuda:${CUDA_VERSION}-"), f"the GPU image starts from a CUDA image, got {base}"
    assert "-devel-" in base, "the kernels compile against the CUDA toolkit of a devel image"
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert args["TORCH_CUDA"] == f"cu{major}{minor}", (
        f"torch for {args['TORCH_CUDA']} on a CUDA {args['CUDA_VERSION']} base")
    installs = pip_installs("gpu")
    (torch_install,) = [args for args in installs if "--index-url" in args]
    assert torch_install[torch_install.index("--index-url") + 1].endswith("/${TORCH_CUDA}")
    (project_install,) = [args for args in installs if ".[gpu]" in args]
    assert "--no-build-isolation" in project_install, "the kernels must build against the torch installed first"


def test_cpu_image_is_python_slim():
    (base,) = [arguments for instruction, arguments in instructions("cpu") if instruction == "FROM"]
    assert base == "python:3.11-slim"


def test_ray_versions_agree():
    versions = {name: build_args(name)["RAY_VERSION"] for name in DOCKERFILES}
    assert len(set(versions.values())) == 1, f"the images install different Rays: {versions}"
    (version,) = set(versions.values())
    for folder in ["k8s/base", "k8s/base/finetune"]:
        for obj in objects_of(render(folder), *RAY_KINDS):
            assert ray_cluster_spec(obj)["rayVersion"] == version, f"{folder}: {obj['kind']} rayVersion"


def test_app_paths_exist_in_image(pyproject):
    copied = set(packages(pyproject))
    for folder in ["k8s/overlays/cpu", "k8s/overlays/cpu/finetune", "k8s/overlays/gpu/finetune"]:
        text = yaml.safe_dump_all(render(folder))
        for path in re.findall(r"/app/([\w./-]+)", text):
            assert path.split("/")[0] in copied, f"{folder}: /app/{path} is not in the image"
