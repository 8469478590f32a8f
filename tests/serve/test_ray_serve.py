"""The Ray Serve application: gRPC through Serve's proxy to a model replica spread over Ray actors."""

import socket
import threading
import time

import grpc
import pytest
import ray
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from jamba.generate import generate
from jamba.model import Jamba, JambaArgs
from serve.deployment import GrpcIngress, JambaDeployment, build_app
from serve.proto.jamba.v1 import jamba_pb2, jamba_pb2_grpc

CONFIG = yaml.safe_load(open("serve/serve_config.yaml"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_instance(tokenizer, tmp_path_factory):
    torch_model = Jamba(JambaArgs.from_preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    path = tmp_path_factory.mktemp("model")
    torch_model.save_pretrained(path)
    tokenizer.save(path)

    ray.init(address="local", num_cpus=16, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, proxy_location=CONFIG["proxy_location"])
    yield path, torch_model
    serve.shutdown()
    ray.shutdown()


def app_args(path, **overrides):
    """The Serve config's args with the test model, a free port and small sizes."""
    return {**CONFIG["applications"][0]["args"], "model": str(path), "port": free_port(), "slots": 4,
            "max_len": 64, "threads_per_actor": 1, **overrides}


def test_generate_through_serve_matches_in_process(serve_instance, tokenizer):
    path, torch_model = serve_instance
    args = app_args(path)
    serve.run(build_app(args), name="jamba", route_prefix=None)
    port = args["port"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = jamba_pb2_grpc.JambaServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        prompt = tokenizer.encode_prompt("12+34=")
        request = jamba_pb2.GenerateRequest(text="12+34=", sampling=jamba_pb2.SamplingParams(max_new_tokens=8))

        unary = stub.Generate(request, timeout=60)
        streamed = list(stub.GenerateStream(request, timeout=60))
        with pytest.raises(grpc.RpcError) as bad:
            stub.Generate(jamba_pb2.GenerateRequest(text="12+34=", sampling=jamba_pb2.SamplingParams(top_p=1.5)),
                          timeout=30)

    expected = generate(torch_model, [prompt], max_new_tokens=8)[0].tokens
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert list(unary.token_ids) == expected
    assert [t for m in streamed for t in m.token_ids] == expected
    assert streamed[-1].usage.completion_tokens == 8
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_p" in bad.value.details()


def prompt_without_eos(torch_model, tokenizer, new_tokens):
    """A prompt whose greedy continuation runs new_tokens tokens without end-of-sequence, so it takes long."""
    for text in ["7+8=", "12+34=", "hello", "the quick", "stream", "100-1=", "world", "9"]:
        prompt = tokenizer.encode_prompt(text)
        if generate(torch_model, [prompt], new_tokens, eos_id=tokenizer.eos_id)[0].finish_reason == "length":
            return text
    pytest.fail("every candidate prompt ends early, so no request is sure to outlast the deadline")


def test_cancelled_streams_and_deadlines_free_the_slots(serve_instance, tokenizer):
    path, torch_model = serve_instance
    # Also the replica's options from the config: the gloo groups alone, and a limit for loading.
    args = app_args(path, slots=4, max_len=512, shared_memory=False, load_timeout_s=120)
    serve.run(build_app(args), name="jamba", route_prefix=None)
    model = serve.get_deployment_handle("JambaDeployment", app_name="jamba")
    request = jamba_pb2.GenerateRequest(text="7+8=", sampling=jamba_pb2.SamplingParams(max_new_tokens=60))

    with grpc.insecure_channel(f"127.0.0.1:{args['port']}") as channel:
        stub = jamba_pb2_grpc.JambaServiceStub(channel)
        for _ in range(3):
            streams = [stub.GenerateStream(request, timeout=60) for _ in range(6)]
            for stream in streams:
                next(stream)
                stream.cancel()
        # 400 tokens without end-of-sequence take seconds even on a fast machine, so the deadline comes first.
        long_request = jamba_pb2.GenerateRequest(text=prompt_without_eos(torch_model, tokenizer, 400),
                                                 sampling=jamba_pb2.SamplingParams(max_new_tokens=400))
        with pytest.raises(grpc.RpcError) as late:
            stub.Generate(long_request, timeout=0.5)

    deadline = time.monotonic() + 10
    stats = model.stats.remote().result()
    while time.monotonic() < deadline and stats["free_slots"] < 4:
        time.sleep(0.2)
        stats = model.stats.remote().result()
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stats == {"free_slots": 4, "running": 0, "waiting": 0}


def test_ingress_listens_on_loopback_only(serve_instance):
    import subprocess

    path, _ = serve_instance
    args = app_args(path)
    serve.run(build_app(args), name="jamba", route_prefix=None)
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    ingress = [line for line in lines if f":{args['port']} " in line]
    assert len(ingress) == 1
    assert ingress[0].split()[3] in (f"127.0.0.1:{args['port']}", f"[::ffff:127.0.0.1]:{args['port']}")


def _replicas(app="jamba") -> int:
    deployment = serve.status().applications[app].deployments["JambaDeployment"]
    return sum(deployment.replica_states.get(state, 0) for state in ("RUNNING",))


def test_autoscaling_grows_under_load_and_shrinks_when_idle(serve_instance):
    path, _ = serve_instance
    args = app_args(path, slots=2, layer_groups=1, expert_shards=1)
    port = args.pop("port")
    model = JambaDeployment.options(autoscaling_config=dict(
        min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0.5, downscale_delay_s=3,
        metrics_interval_s=0.5, look_back_period_s=1)).bind(**{k: v for k, v in args.items() if k != "host"})
    serve.run(GrpcIngress.bind(model, model=args["model"], port=port), name="jamba", route_prefix=None)
    assert _replicas() == 1

    stop = threading.Event()
    errors = []

    def client():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = jamba_pb2_grpc.JambaServiceStub(channel)
            request = jamba_pb2.GenerateRequest(text="7+8=", sampling=jamba_pb2.SamplingParams(max_new_tokens=48))
            while not stop.is_set():
                try:
                    stub.Generate(request, timeout=60)
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    peak, deadline = 1, time.monotonic() + 90
    while time.monotonic() < deadline and peak < 2:
        peak = max(peak, _replicas())
        time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()

    low, deadline = peak, time.monotonic() + 90
    while time.monotonic() < deadline and low > 1:
        time.sleep(1)
        low = _replicas()

    assert not errors, errors[:3]
    assert peak == 2
    assert low == 1
