"""The kustomizations under k8s/: schemas, the embedded Serve config, and what the manifests promise each other.

Rendering needs kubectl with its built-in kustomize. The KubeRay kinds are checked against the CRDs in
shared/kuberay-crds, and the built-in kinds against the Kubernetes JSON schemas that kubernetes-validate ships.
Nothing here talks to a cluster.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys

import jsonschema
import pytest
import yaml

from k8s_manifests import (
    KUSTOMIZATIONS, RAY_KINDS, REPO, SERVING_OF, name_of, objects_of, pod_templates, ray_cluster_spec,
    ray_pod_templates,
)

# The oldest Kubernetes the manifests target; gRPC probes are generally available from 1.27.
KUBERNETES_VERSION = "1.30.0"

SERVE_CONFIG = REPO / "serve" / "serve_config.yaml"
SERVE_CONFIG_COPY = REPO / "k8s" / "base" / "serve_config.yaml"
LORA = REPO / "finetune" / "lora.py"
SERVING = ["base", "cpu", "gpu"]
FINETUNING = ["base/finetune", "cpu/finetune", "gpu/finetune"]
DEPLOYMENT_SOURCE = REPO / "serve" / "deployment.py"


def rayservice(rendered, name: str) -> dict:
    (service,) = objects_of(rendered[name], "RayService")
    return service


def rayjob(rendered, name: str) -> dict:
    (job,) = objects_of(rendered[name], "RayJob")
    return job


def env_config(rendered, name: str) -> dict:
    """The data of the jamba-env ConfigMap (its name carries a hash suffix)."""
    (config_map,) = [obj for obj in objects_of(rendered[name], "ConfigMap")
                     if obj["metadata"]["name"].startswith("jamba-env")]
    return config_map


def entrypoint_args(job: dict) -> list[str]:
    """The arguments after finetune/lora.py in a RayJob's entrypoint."""
    tokens = shlex.split(job["spec"]["entrypoint"])
    scripts = [i for i, token in enumerate(tokens) if token.endswith("finetune/lora.py")]
    assert len(scripts) == 1, f"{name_of(job)}: the entrypoint should run finetune/lora.py once, got {tokens}"
    assert tokens[scripts[0] - 1] in ("python", "python3"), (
        f"{name_of(job)}: the entrypoint should be `python .../finetune/lora.py ARGS`, got {tokens}")
    return tokens[scripts[0] + 1:]


def entrypoint_options(job: dict) -> dict[str, str | None]:
    """--flag -> value (None for a flag without one) of a RayJob's entrypoint."""
    options, args = {}, entrypoint_args(job)
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            options[arg] = args[i + 1] if has_value else None
    return options


def mounts(container: dict) -> dict[str, dict]:
    return {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


# ---- every kustomization renders and matches its schemas ----

@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders_the_expected_objects(rendered, name):
    kinds = sorted(obj["kind"] for obj in rendered[name])
    if name in SERVING_OF:
        assert kinds == ["RayJob"]
    else:
        assert kinds == ["ConfigMap", "PersistentVolumeClaim", "PersistentVolumeClaim", "PersistentVolumeClaim",
                         "RayCluster", "RayService"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_builtin_kinds_match_kubernetes_schemas(rendered, name):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (the Kubernetes JSON schemas) is not installed")

    # The pod templates and the Service spec inside KubeRay objects are built-in types too.
    documents = [(name_of(obj), obj) for obj in rendered[name] if obj["kind"] not in RAY_KINDS]
    for obj in objects_of(rendered[name], *RAY_KINDS):
        for where, template in pod_templates(obj):
            documents.append((where, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}))
        if obj["kind"] == "RayService" and "serveService" in obj["spec"]:
            documents.append((f"{name_of(obj)} serveService",
                              {"apiVersion": "v1", "kind": "Service", **obj["spec"]["serveService"]}))

    errors = []
    for where, document in documents:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{where}: {'/'.join(map(str, error.absolute_path))}: {error.message}")
    assert not errors, "\n".join(errors)


def strict(schema: dict) -> dict:
    """A CRD's openAPIV3Schema that also rejects unknown fields, as `kubectl apply` does by default."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {key: strict(value) for key, value in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(branch) for branch in schema[key]]
    return schema


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kuberay_kinds_match_crd_schemas(rendered, crd_schemas, name):
    errors = []
    for obj in objects_of(rendered[name], *RAY_KINDS):
        schema = crd_schemas.get((obj["apiVersion"], obj["kind"]))
        assert schema is not None, f"{name_of(obj)}: no CRD serves {obj['apiVersion']}"
        validator = jsonschema.Draft7Validator(strict(schema))
        for error in validator.iter_errors(obj):
            errors.append(f"{name_of(obj)}: {'/'.join(map(str, error.absolute_path))}: {error.message}")
    assert not errors, "\n".join(errors)


# ---- the Serve config ----

def test_kustomize_copy_is_the_serve_config():
    assert SERVE_CONFIG_COPY.read_bytes() == SERVE_CONFIG.read_bytes(), (
        "k8s/base/serve_config.yaml differs from serve/serve_config.yaml; edit serve/serve_config.yaml, then "
        "cp serve/serve_config.yaml k8s/base/serve_config.yaml")


@pytest.mark.parametrize("name", SERVING)
def test_rayservice_embeds_the_serve_config(rendered, name):
    assert rayservice(rendered, name)["spec"]["serveConfigV2"] == SERVE_CONFIG.read_text()


def test_serve_config_matches_ray_schema(serve_config):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config)


def import_attr(path: str):
    """The object named by "package.module:attr" or "package.module.attr"."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def test_serve_config_import_paths_resolve(serve_config):
    paths = [app["import_path"] for app in serve_config["applications"]]
    paths += serve_config.get("grpc_options", {}).get("grpc_servicer_functions", [])
    for path in paths:
        assert callable(import_attr(path)), f"{path} is not callable"


def ingress_port(config: dict) -> int:
    """The port of the application's gRPC ingress (its `port` arg)."""
    (app,) = config["applications"]
    return app["args"]["port"]


def test_grpc_ingress_stays_off_the_head(serve_config):
    # The head starts with num-cpus 0, and excludeHeadPodFromServeSvc keeps it out of the serve Service: the
    # ingress is reachable only on a worker pod, where only a deployment that asks for CPU is sure to land.
    from serve.deployment import GrpcIngress

    (app,) = serve_config["applications"]
    overrides = {d["name"]: d for d in app.get("deployments", [])}.get("GrpcIngress", {})
    options = overrides.get("ray_actor_options", GrpcIngress.ray_actor_options or {})
    assert options.get("num_cpus", 1) > 0, (
        f"GrpcIngress asks for no CPU (ray_actor_options {options}), so Ray may place it on the head pod, "
        "which the serve Service leaves out")


@pytest.mark.parametrize("name", SERVING)
def test_application_reads_the_pod_environment(rendered, name):
    source = DEPLOYMENT_SOURCE.read_text()
    for variable in env_config(rendered, name)["data"]:
        assert variable in source, f"jamba-env sets {variable}, which serve/deployment.py does not read"


@pytest.mark.parametrize("name", SERVING)
def test_grpc_port_agrees_everywhere(rendered, name):
    service = rayservice(rendered, name)
    port = ingress_port(yaml.safe_load(service["spec"]["serveConfigV2"]))

    # KubeRay puts container ports named "serve" or "serve-*" into the serve Service.
    service_ports = service["spec"]["serveService"]["spec"]["ports"]
    assert [(p["name"], p["port"], p["targetPort"], p["appProtocol"]) for p in service_ports] == [
        ("serve-grpc", port, port, "kubernetes.io/h2c")]

    for where, template in ray_pod_templates(service):
        container = template["spec"]["containers"][0]
        named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert named.get("serve-grpc") == port, f"{where}: no container port serve-grpc={port}"
        if "worker group" in where:
            probe = container["readinessProbe"]["grpc"]
            assert probe["port"] == port, f"{where}: the readiness probe checks port {probe['port']}, not {port}"


# ---- pods: security, volumes, environment ----

@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pods_run_non_root_read_only(rendered, name):
    for obj in objects_of(rendered[name], *RAY_KINDS):
        for where, template in pod_templates(obj):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] == 1000, f"{where}: the image's user is uid 1000"
            volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
            for container in pod["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False, where
                assert context["capabilities"]["drop"] == ["ALL"], where
                assert context["readOnlyRootFilesystem"] is True, where
                paths = mounts(container)
                writable = ["/tmp", "/home/ray"] + (["/tmp/ray"] if "submitter" not in where else [])
                for path in writable:
                    assert path in paths, f"{where}: {container['name']} needs a writable {path}"
                    assert "emptyDir" in volumes[paths[path]["name"]], f"{where}: {path} should be an emptyDir"
        cluster = ray_cluster_spec(obj)
        if cluster.get("enableInTreeAutoscaling"):
            context = cluster["autoscalerOptions"]["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name_of(obj)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_volumes_and_claims_exist(rendered, name):
    claims = {obj["metadata"]["name"] for obj in objects_of(rendered[SERVING_OF.get(name, name)],
                                                            "PersistentVolumeClaim")}
    for obj in objects_of(rendered[name], *RAY_KINDS):
        for where, template in pod_templates(obj):
            volumes = {volume["name"]: volume for volume in template["spec"].get("volumes", [])}
            for container in template["spec"]["containers"]:
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes, f"{where}: mount {mount['name']} has no volume"
            for volume in volumes.values():
                if "persistentVolumeClaim" in volume:
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    assert claim in claims, f"{where}: claim {claim} is not among {sorted(claims)}"


@pytest.mark.parametrize("name", SERVING)
def test_serve_environment_paths_are_mounted(rendered, name):
    data = env_config(rendered, name)["data"]
    assert set(data) == {"JAMBA_MODEL_DIR", "JAMBA_ADAPTERS_DIR", "JAMBA_SERVE_HOST"}
    assert data["JAMBA_SERVE_HOST"] == "0.0.0.0", "the ingress must listen on the pod's address for the Service"
    config_map_name = env_config(rendered, name)["metadata"]["name"]
    for where, template in ray_pod_templates(rayservice(rendered, name)):
        container = template["spec"]["containers"][0]
        assert {"configMapRef": {"name": config_map_name}} in container.get("envFrom", []), where
        paths = mounts(container)
        assert data["JAMBA_ADAPTERS_DIR"] in paths, f"{where}: JAMBA_ADAPTERS_DIR is not a mounted volume"
        model_dir = data["JAMBA_MODEL_DIR"]
        # Either on the models volume or the model shipped in the image's /app (see test_image.py).
        assert model_dir.startswith("/app/") or any(model_dir.startswith(path + "/") for path in paths), where


@pytest.mark.parametrize("name", SERVING)
def test_serving_pods_mount_memory_shm(rendered, name):
    """The replica's shared-memory links and Ray's object store need more than a container's default /dev/shm."""
    for where, template in ray_pod_templates(rayservice(rendered, name)):
        volumes = {volume["name"]: volume for volume in template["spec"].get("volumes", [])}
        paths = mounts(template["spec"]["containers"][0])
        assert "/dev/shm" in paths, f"{where}: /dev/shm is not a mounted volume"
        assert volumes[paths["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory", where


@pytest.mark.parametrize("name", FINETUNING)
def test_finetuning_output_reaches_service(rendered, name):
    options = entrypoint_options(rayjob(rendered, name))
    serving = env_config(rendered, SERVING_OF[name])["data"]
    # The adapter must be trained on the model the service serves, and land in its adapters folder.
    assert options["--model"] == serving["JAMBA_MODEL_DIR"]
    output = options["--output"]
    assert output.rpartition("/")[0] == serving["JAMBA_ADAPTERS_DIR"], (
        f"--output {output} is not a folder directly under the service's adapters folder")
    for where, template in ray_pod_templates(rayjob(rendered, name)):
        paths = mounts(template["spec"]["containers"][0])
        adapters = paths[serving["JAMBA_ADAPTERS_DIR"]]
        assert not adapters.get("readOnly"), f"{where}: the adapters volume must be writable"
        data_dir = options["--data"].rpartition("/")[0]
        assert data_dir in paths, f"{where}: --data {options['--data']} is not on a mounted volume"


# ---- scaling and accelerators ----

def ray_limits(template: dict) -> dict:
    return template["spec"]["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize("name", SERVING)
def test_clusters_autoscale_within_bounds(rendered, name):
    for obj in objects_of(rendered[name], "RayService", "RayCluster"):
        cluster = ray_cluster_spec(obj)
        assert cluster["enableInTreeAutoscaling"] is True, name_of(obj)
        for group in cluster["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (
                f"{name_of(obj)} {group['groupName']}")
        assert any(group["maxReplicas"] > group["minReplicas"] for group in cluster["workerGroupSpecs"]), (
            f"{name_of(obj)}: no worker group can grow")


@pytest.mark.parametrize("name", ["base", "cpu"])
def test_cpu_worker_fits_one_replica(rendered, serve_config, name):
    # So that Serve adding a replica makes the Ray autoscaler add a pod (docs/deploy-kubernetes.md, scaling).
    (app,) = serve_config["applications"]
    args = app["args"]
    ask = (args["layer_groups"] + args["expert_shards"]) * args["cpus_per_actor"]
    groups = ray_cluster_spec(rayservice(rendered, name))["workerGroupSpecs"]
    (group,) = [group for group in groups if group["groupName"] == "cpu"]
    assert float(group["rayStartParams"]["num-cpus"]) == ask, (
        f"{name}: the cpu workers offer Ray {group['rayStartParams']['num-cpus']} CPUs, a model replica asks {ask}")


def test_only_gpu_overlay_requests_gpus(rendered):
    gpu_groups = [where for where, template in ray_pod_templates(rayservice(rendered, "gpu"))
                  if int(ray_limits(template).get("nvidia.com/gpu", 0)) > 0]
    assert gpu_groups, "the gpu overlay's RayService has no worker group with nvidia.com/gpu limits"
    assert "--use-gpu" in entrypoint_options(rayjob(rendered, "gpu/finetune"))

    for name in ["base", "base/finetune", "cpu", "cpu/finetune"]:
        for obj in objects_of(rendered[name], *RAY_KINDS):
            for where, template in ray_pod_templates(obj):
                assert "nvidia.com/gpu" not in ray_limits(template), f"{name}: {where}"


@pytest.mark.parametrize("name", FINETUNING)
def test_finetuning_workers_fit_cluster(rendered, name):
    job = rayjob(rendered, name)
    options = entrypoint_options(job)
    workers = int(options["--workers"])
    resource = "nvidia.com/gpu" if "--use-gpu" in options else "cpu"
    capacity = sum(group["replicas"] * int(ray_limits(group["template"]).get(resource, 0))
                   for group in ray_cluster_spec(job)["workerGroupSpecs"])
    assert workers <= capacity, f"{name}: --workers {workers} but the worker pods hold {capacity} {resource}"


# ---- the fine-tuning entry point ----

def parse_help(text: str) -> dict[str, bool]:
    """--option -> whether it takes a value, from argparse's --help output."""
    options = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("-"):
            continue
        invocation = re.split(r"\s{2,}", stripped)[0]
        for part in invocation.split(", "):
            flag, _, metavar = part.partition(" ")
            if flag.startswith("--"):
                options[flag] = bool(metavar)
    return options


@pytest.fixture(scope="module")
def lora_options() -> dict[str, bool]:
    if not LORA.exists():
        pytest.skip("finetune/lora.py does not exist yet")
    result = subprocess.run([sys.executable, str(LORA), "--help"], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, f"finetune/lora.py --help failed:\n{result.stderr}"
    options = parse_help(result.stdout)
    assert options, f"no options found in finetune/lora.py --help:\n{result.stdout}"
    return options


@pytest.mark.parametrize("name", FINETUNING)
def test_rayjob_arguments_accepted_by_lora(rendered, lora_options, name):
    args = entrypoint_args(rayjob(rendered, name))
    i = 0
    while i < len(args):
        flag = args[i]
        assert flag in lora_options, f"{name}: finetune/lora.py has no option {flag}"
        if lora_options[flag]:
            assert i + 1 < len(args), f"{name}: {flag} needs a value"
            assert not args[i + 1].startswith("--"), f"{name}: {flag} needs a value, got {args[i + 1]}"
            i += 2
        else:
            i += 1
