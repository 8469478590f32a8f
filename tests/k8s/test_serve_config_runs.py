"""The cpu overlay's serveConfigV2, deployed on a local Ray as KubeRay deploys it, serves Generate over gRPC.

KubeRay hands serveConfigV2 to the Ray dashboard, which starts Serve with the config's options and then deploys
its applications. `serve_start` and `deploy_apps` below are those two steps. The pods' environment (the jamba-env
ConfigMap) is set here too, with the image's /app mapped to this checkout, except that the gRPC ingress listens
on 127.0.0.1 rather than on every interface as in a pod.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import grpc
import pytest
import yaml

from k8s_manifests import REPO, objects_of, render

pytestmark = pytest.mark.slow

DEPLOY_TIMEOUT_S = 300


def pod_environment(objects: list[dict], tmp_path) -> dict[str, str]:
    (config_map,) = [obj for obj in objects_of(objects, "ConfigMap") if obj["metadata"]["name"].startswith("jamba-env")]
    env = {}
    for key, value in config_map["data"].items():
        if value.startswith("/app/"):
            env[key] = str(REPO / value.removeprefix("/app/"))
        elif key == "JAMBA_SERVE_HOST":
            env[key] = "127.0.0.1"
        else:
            # A volume's mount point in the pods, so an empty folder here.
            env[key] = str(tmp_path / value.strip("/"))
            (tmp_path / value.strip("/")).mkdir(parents=True)
    return env


def wait_until_running(app_name: str) -> None:
    from ray import serve

    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            pytest.fail(f"application {app_name} failed to deploy: {status.message}")
        time.sleep(1)
    pytest.fail(f"application {app_name} is not running after {DEPLOY_TIMEOUT_S} s: {serve.status()}")


def test_cpu_overlay_config_serves_generate(tmp_path, monkeypatch):
    try:
        importlib.import_module("serve.deployment")
    except ImportError as error:
        pytest.skip(f"serve.deployment is not importable yet: {error}")
    objects = render("k8s/overlays/cpu")
    env = pod_environment(objects, tmp_path)
    if not (Path(env["JAMBA_MODEL_DIR"]) / "config.json").is_file():
        pytest.skip(f"the model the cpu overlay serves is not in this checkout yet: {env['JAMBA_MODEL_DIR']}")

    import ray
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from serve.proto.jamba.v1 import jamba_pb2, jamba_pb2_grpc

    (service,) = objects_of(objects, "RayService")
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = config.applications
    # Ray's worker processes inherit the environment of the process that starts Ray, as in the pods.
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", log_to_driver=False)
    try:
        client = serve_start(http_options=config.http_options.model_dump(),
                             grpc_options=config.grpc_options.model_dump(),
                             proxy_location=config.proxy_location,
                             global_logging_config=config.logging_config)
        client.deploy_apps(config)
        wait_until_running(app.name)

        # The readiness probe's call, then a client's.
        with grpc.insecure_channel(f"127.0.0.1:{app.args['port']}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="jamba.v1.JambaService"), timeout=60)
            response = jamba_pb2_grpc.JambaServiceStub(channel).Generate(
                jamba_pb2.GenerateRequest(text="12+34=", sampling=jamba_pb2.SamplingParams(max_new_tokens=4)),
                timeout=120)
    finally:
        serve.shutdown()
        ray.shutdown()

    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert response.usage.completion_tokens > 0
    assert len(response.token_ids) == response.usage.completion_tokens
    assert response.finish_reason != jamba_pb2.FINISH_REASON_UNSPECIFIED
