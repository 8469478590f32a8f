"""Status codes, streaming, batching and lifecycle against a real gRPC server on 127.0.0.1."""

import asyncio
import concurrent.futures
import math
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jamba.generate import generate
from serve import client
from serve.metrics import Metrics
from serve.proto.jamba.v1 import jamba_pb2, jamba_pb2_grpc
from serve.server import SERVICE_NAME


def text_request(text="12+34=", **sampling) -> jamba_pb2.GenerateRequest:
    return jamba_pb2.GenerateRequest(text=text, sampling=jamba_pb2.SamplingParams(**sampling))


def ids_request(ids, **sampling) -> jamba_pb2.GenerateRequest:
    return jamba_pb2.GenerateRequest(token_ids=jamba_pb2.TokenIds(ids=ids), sampling=jamba_pb2.SamplingParams(**sampling))


def health_status(channel, service=""):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def assert_all_slots_free(server):
    assert server.wait_idle(), "requests still waiting or running"
    assert server.engine.num_free_slots == server.engine.runner.num_slots
    assert server.engine.num_running == 0
    assert server.engine.num_waiting == 0


BAD_REQUESTS = {
    "no prompt": jamba_pb2.GenerateRequest(),
    "empty text": text_request(""),
    "empty ids": ids_request([]),
    "prompt over context": ids_request([5] * 128),
    "id outside vocabulary": ids_request([5, 10_000]),
    "negative id": ids_request([-4]),
    "max_new_tokens zero": text_request(max_new_tokens=0),
    "max_new_tokens over limit": text_request(max_new_tokens=10_000),
    "negative temperature": text_request(temperature=-1.0),
    "nan temperature": text_request(temperature=math.nan),
    "inf temperature": text_request(temperature=math.inf),
    "top_p zero": text_request(top_p=0.0),
    "top_p over one": text_request(top_p=1.01),
    "negative top_k": text_request(top_k=-1),
    "too many stops": text_request(stop=[str(i) for i in range(9)]),
    "stop too long": text_request(stop=["x" * 65]),
    "unknown adapter": jamba_pb2.GenerateRequest(text="1+1=", adapter="missing"),
}


def test_bad_inputs_invalid_argument(tiny_engine, live_server):
    server = live_server(tiny_engine(max_len=128))

    for name, request in BAD_REQUESTS.items():
        with pytest.raises(grpc.RpcError) as unary:
            server.stub.Generate(request, timeout=10)
        assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        with pytest.raises(grpc.RpcError) as stream:
            list(server.stub.GenerateStream(request, timeout=10))
        assert stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert stream.value.details() == unary.value.details(), name

    with pytest.raises(grpc.RpcError) as raised:
        server.stub.Tokenize(jamba_pb2.TokenizeRequest(text=""), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert health_status(server.channel) == health_pb2.HealthCheckResponse.SERVING
    assert_all_slots_free(server)
    assert server.engine.runner.cache.lengths.tolist() == [0] * 4
    response = server.stub.Generate(text_request(max_new_tokens=3), timeout=30)
    assert response.usage.completion_tokens == len(response.token_ids) >= 1


def test_bad_input_message_names_field_and_range(tiny_engine, live_server):
    server = live_server(tiny_engine(max_len=128))
    cases = [
        (text_request(top_p=1.5), ["sampling.top_p", "1.5", "(0, 1]"]),
        (text_request(max_new_tokens=0), ["sampling.max_new_tokens", "0", "[1, 127]"]),
        (ids_request([3, 999]), ["token_ids", "999", "[0, 300)"]),
        (ids_request([5] * 128), ["token_ids", "128", "127"]),
    ]
    for request, fragments in cases:
        with pytest.raises(grpc.RpcError) as raised:
            server.stub.Generate(request, timeout=10)
        for fragment in fragments:
            assert fragment in raised.value.details()


def test_message_size_limit(tiny_engine, live_server):
    server = live_server(tiny_engine(), max_message_bytes=1024)

    with pytest.raises(grpc.RpcError) as raised:
        server.stub.Generate(text_request("1" * 2000), timeout=10)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert health_status(server.channel) == health_pb2.HealthCheckResponse.SERVING


def test_stream_matches_unary(tiny_engine, live_server, tokenizer):
    server = live_server(tiny_engine())
    request = text_request("7+8=", max_new_tokens=12)

    unary = server.stub.Generate(request, timeout=30)
    messages = list(server.stub.GenerateStream(request, timeout=30))

    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in messages) == unary.text
    assert unary.text == tokenizer.decode(unary.token_ids)
    assert all(m.finish_reason == jamba_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert messages[-1].finish_reason == unary.finish_reason
    assert unary.finish_reason in (jamba_pb2.FINISH_REASON_LENGTH, jamba_pb2.FINISH_REASON_END_OF_SEQUENCE)
    prompt_tokens = len(tokenizer.encode_prompt("7+8="))
    assert unary.usage.prompt_tokens == messages[-1].usage.prompt_tokens == prompt_tokens
    assert unary.usage.completion_tokens == messages[-1].usage.completion_tokens == len(unary.token_ids)


def test_greedy_matches_in_process_with_batch_churn(tiny_model, tiny_engine, live_server, tokenizer):
    prompt = tokenizer.encode_prompt("12+34=")
    expected = generate(tiny_model, [prompt], max_new_tokens=24, eos_id=tokenizer.eos_id)[0].tokens

    engine = tiny_engine(num_slots=8, max_len=128)
    decode_batch_sizes = []
    decode = engine.runner.decode

    def recording_decode(slots, tokens):
        decode_batch_sizes.append(len(slots))
        return decode(slots, tokens)

    engine.runner.decode = recording_decode
    server = live_server(engine)
    others = [
        ids_request(tokenizer.encode_prompt(f"{i}+{2 * i}=" + "9" * (i % 5)),
                    max_new_tokens=2 + (i * 3) % 17, temperature=0.8, seed=i)
        for i in range(16)
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        # Requests start before, with and after the target, and finish at different steps.
        early = [pool.submit(server.stub.Generate, r, timeout=60) for r in others[:6]]
        time.sleep(0.05)
        target = server.stub.Generate.future(ids_request(prompt, max_new_tokens=24), timeout=60)
        late = []
        for r in others[6:]:
            time.sleep(0.01)
            late.append(pool.submit(server.stub.Generate, r, timeout=60))
        response = target.result()
        other_responses = [f.result() for f in early + late]

    assert list(response.token_ids) == expected
    assert all(r.usage.completion_tokens >= 1 for r in other_responses)
    assert max(decode_batch_sizes) >= 4
    assert len(set(decode_batch_sizes)) >= 3, "the batch never changed size while requests joined and left"
    assert_all_slots_free(server)


def test_seeded_sampling_same_alone_and_batched(tiny_engine, live_server, tokenizer):
    server = live_server(tiny_engine(num_slots=8))
    request = text_request("100-1=", max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.95, seed=7)

    alone = server.stub.Generate(request, timeout=30)
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        noise = [pool.submit(server.stub.Generate, text_request(f"{i}+{i}=", max_new_tokens=12, temperature=1.0),
                             timeout=60) for i in range(7)]
        batched = server.stub.Generate(request, timeout=30)
        for future in noise:
            future.result()
    different_seed = server.stub.Generate(
        text_request("100-1=", max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.95, seed=8), timeout=30)

    assert list(batched.token_ids) == list(alone.token_ids)
    assert batched.text == alone.text
    assert list(different_seed.token_ids) != list(alone.token_ids)


def test_cancelled_streams_free_slots(scripted_engine, live_server):
    engine = scripted_engine(num_slots=8, max_len=1024, step_delay_s=0.001, queue_size=256)
    server = live_server(engine)

    async def read_then_cancel(stub, i):
        call = stub.GenerateStream(ids_request([1, 10 + i % 50], max_new_tokens=1000), timeout=60)
        received = []
        async for message in call:
            received.append(message)
            if len(received) == 1 + i % 4:
                break
        call.cancel()
        return received, await call.code()

    async def cancel_all():
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = jamba_pb2_grpc.JambaServiceStub(channel)
            return await asyncio.gather(*(read_then_cancel(stub, i) for i in range(200)))

    results = asyncio.run(cancel_all())

    for i, (received, code) in enumerate(results):
        assert len(received) == 1 + i % 4
        assert all(m.finish_reason == jamba_pb2.FINISH_REASON_UNSPECIFIED for m in received)
        assert code == grpc.StatusCode.CANCELLED
    assert_all_slots_free(server)
    assert engine.runner.histories == {}
    assert engine.runner.protocol_errors == []
    # Every stream stopped long before its 1000 tokens: each ran at most a few steps past its cancel.
    assert sum(engine.runner.decode_batches) < 200 * 20


def test_deadline_exceeded_frees_slot(scripted_engine, live_server):
    engine = scripted_engine(num_slots=2, step_delay_s=0.01)
    server = live_server(engine)

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as unary:
        server.stub.Generate(ids_request([1, 5], max_new_tokens=200), timeout=0.3)
    assert unary.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0

    with pytest.raises(grpc.RpcError) as stream:
        for _ in server.stub.GenerateStream(ids_request([1, 6], max_new_tokens=200), timeout=0.3):
            pass
    assert stream.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    assert_all_slots_free(server)
    assert engine.runner.histories == {}


def test_overload_resource_exhausted(scripted_engine, live_server):
    engine = scripted_engine(num_slots=2, queue_size=2, step_delay_s=0.02)
    server = live_server(engine)

    futures = [server.stub.Generate.future(ids_request([1, 20 + i], max_new_tokens=15), timeout=30)
               for i in range(8)]
    ok, exhausted = [], []
    for future in futures:
        try:
            ok.append(future.result())
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert "queue of 2 requests is full" in error.details()
            exhausted.append(error)

    assert len(exhausted) == 4
    assert len(ok) == 4
    assert all(len(r.token_ids) == 15 for r in ok)
    assert_all_slots_free(server)


def test_health_not_serving_while_draining(scripted_engine, live_server):
    engine = scripted_engine(num_slots=2, step_delay_s=0.01)
    server = live_server(engine)
    assert health_status(server.channel) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(server.channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING

    stream = server.stub.GenerateStream(ids_request([1, 5], max_new_tokens=40), timeout=30)
    next(stream)
    drained = server.submit(server.server.drain(timeout_s=20))
    deadline = time.monotonic() + 5
    while health_status(server.channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health never turned NOT_SERVING"
        time.sleep(0.01)
    assert health_status(server.channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING

    with pytest.raises(grpc.RpcError) as raised:
        server.stub.Generate(ids_request([1, 6], max_new_tokens=2), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    rest = list(stream)
    assert rest[-1].finish_reason == jamba_pb2.FINISH_REASON_LENGTH
    assert rest[-1].usage.completion_tokens == 40
    assert drained.result(20) is True


def test_stop_cancels_after_grace(scripted_engine, live_server):
    engine = scripted_engine(num_slots=2, step_delay_s=0.01)
    server = live_server(engine)

    stream = server.stub.GenerateStream(ids_request([1, 5], max_new_tokens=250), timeout=30)
    next(stream)
    stopped = server.submit(server.server.stop(grace_s=0.2))
    rest = list(stream)
    stopped.result(20)

    assert rest[-1].finish_reason == jamba_pb2.FINISH_REASON_CANCELLED
    assert 1 < rest[-1].usage.completion_tokens < 250


def test_bearer_token(tiny_engine, live_server):
    server = live_server(tiny_engine(), token="s3cret")
    request = text_request(max_new_tokens=2)

    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
        with pytest.raises(grpc.RpcError) as unary:
            server.stub.Generate(request, timeout=10, metadata=metadata)
        assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as stream:
            list(server.stub.GenerateStream(request, timeout=10, metadata=metadata))
        assert stream.value.code() == grpc.StatusCode.UNAUTHENTICATED

    response = server.stub.Generate(request, timeout=30, metadata=[("authorization", "Bearer s3cret")])
    assert len(response.token_ids) >= 1
    assert health_status(server.channel) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_service(tiny_engine, live_server):
    server = live_server(tiny_engine())
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)

    responses = list(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="jamba.v1.JambaService"),
    ]), timeout=10))

    services = {s.name for s in responses[0].list_services_response.service}
    assert {"jamba.v1.JambaService", "grpc.health.v1.Health"} <= services
    files = responses[1].file_descriptor_response.file_descriptor_proto
    assert len(files) >= 1


def test_model_info_and_tokenize(tiny_engine, live_server, tokenizer):
    server = live_server(tiny_engine(num_slots=3, max_len=96, queue_size=5))

    info = server.stub.GetModelInfo(jamba_pb2.GetModelInfoRequest(), timeout=10)
    assert info.model_name == "tiny"
    assert info.vocab_size == tokenizer.vocab_size
    assert info.max_context_length == 96
    assert info.max_new_tokens_limit == 95
    assert info.num_slots == 3
    assert info.max_queue_size == 5
    assert info.num_hidden_layers == 4
    assert info.num_attention_layers == 1
    assert info.num_mamba_layers == 3
    assert info.num_experts == 4
    assert info.num_experts_per_tok == 2
    assert list(info.adapters) == []
    assert info.eos_token_id == tokenizer.eos_id

    tokens = server.stub.Tokenize(jamba_pb2.TokenizeRequest(text="12+34="), timeout=10)
    assert list(tokens.token_ids) == tokenizer.encode_prompt("12+34=")


def test_metrics_endpoint(tiny_model, tokenizer, live_server):
    from serve.engine import Engine
    from serve.runner import LocalRunner

    metrics = Metrics()
    engine = Engine(LocalRunner(tiny_model, num_slots=2, max_len=64), tokenizer, metrics=metrics)
    server = live_server(engine)
    port = metrics.serve(0)
    try:
        response = server.stub.Generate(text_request(max_new_tokens=5), timeout=30)
        server.wait_idle()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            body = page.read().decode()
    finally:
        metrics.close()

    samples = dict(line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#"))
    assert float(samples["jamba_generated_tokens_total"]) == len(response.token_ids)
    assert float(samples["jamba_time_to_first_token_seconds_count"]) == 1
    assert float(samples["jamba_slots"]) == 2
    assert float(samples["jamba_slots_in_use"]) == 0
    routed = sum(float(v) for k, v in samples.items() if k.startswith("jamba_expert_tokens_total"))
    # Each MoE layer routes each real token to K=2 experts: prompt tokens plus fed-back generated tokens.
    fed_tokens = response.usage.prompt_tokens + response.usage.completion_tokens - 1
    assert routed == 2 * 2 * fed_tokens


def test_client_cli_streams(tiny_engine, live_server, capsys):
    server = live_server(tiny_engine(), token="tok")
    expected = server.stub.Generate(text_request("7+8=", max_new_tokens=6), timeout=30,
                                    metadata=[("authorization", "Bearer tok")])

    status = client.main(["--target", server.target, "--token", "tok", "--max-new-tokens", "6", "7+8="])

    captured = capsys.readouterr()
    assert status == 0
    assert captured.out.rstrip("\n") == expected.text.rstrip("\n")
    assert f"{expected.usage.completion_tokens} generated" in captured.err


def test_client_cli_reports_error(tiny_engine, live_server, capsys):
    server = live_server(tiny_engine())

    status = client.main(["--target", server.target, "--top-p", "2", "hi"])

    assert status == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_tls(tiny_engine, live_server, tmp_path):
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    import datetime
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    server = live_server(tiny_engine(), tls_cert=cert_file, tls_key=key_file)
    credentials = grpc.ssl_channel_credentials(cert_file.read_bytes())
    with grpc.secure_channel(server.target, credentials) as channel:
        stub = jamba_pb2_grpc.JambaServiceStub(channel)
        response = stub.Generate(text_request(max_new_tokens=3), timeout=30)
    assert len(response.token_ids) >= 1

    with pytest.raises(grpc.RpcError) as raised:
        server.stub.Generate(text_request(max_new_tokens=3), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_unseeded_sampling_varies(tiny_engine, live_server):
    server = live_server(tiny_engine())
    request = text_request("1+1=", max_new_tokens=12, temperature=1.5)

    outputs = {tuple(server.stub.Generate(request, timeout=30).token_ids) for _ in range(4)}

    assert len(outputs) > 1
