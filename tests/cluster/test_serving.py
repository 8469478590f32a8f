"""The gRPC service over a Ray replica: continuous batching unchanged, and a dead actor seen as UNAVAILABLE."""

import asyncio
import threading
import time

import grpc
import pytest
import ray

from cluster.replica import RayReplica
from jamba.tokenizer import Tokenizer, train_tokenizer
from serve.engine import Engine, EngineConfig
from serve.proto.jamba.v1 import jamba_pb2, jamba_pb2_grpc
from serve.runner import LocalRunner
from serve.server import create_server


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_checkpoint):
    """A server on 127.0.0.1 over a 2-group, 2-shard replica, run on its own event loop thread."""
    path, model = tiny_checkpoint
    tokenizer = Tokenizer(train_tokenizer([f"{a}+{a}={2 * a} words" for a in range(300)], vocab_size=300))
    replica = RayReplica(path, num_slots=4, max_len=64, threads_per_actor=1, step_timeout_s=30)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start(runner):
        server, port = create_server("127.0.0.1:0", Engine(runner, tokenizer, EngineConfig(max_queue_size=8)))
        await server.start()
        return server, port

    # The same service in-process gives the expected tokens (the engine masks ids beyond the tokenizer's vocab).
    servers = [asyncio.run_coroutine_threadsafe(start(runner), loop).result(60)
               for runner in (replica, LocalRunner(model, num_slots=4, max_len=64))]
    with grpc.insecure_channel(f"127.0.0.1:{servers[0][1]}") as channel, \
            grpc.insecure_channel(f"127.0.0.1:{servers[1][1]}") as local_channel:
        yield (jamba_pb2_grpc.JambaServiceStub(channel), replica, jamba_pb2_grpc.JambaServiceStub(local_channel))
    for server, _ in servers:
        asyncio.run_coroutine_threadsafe(server.stop(0.0), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    replica.shutdown()


def request(text, max_new_tokens):
    return jamba_pb2.GenerateRequest(text=text, sampling=jamba_pb2.SamplingParams(max_new_tokens=max_new_tokens))


def test_concurrent_requests_match_in_process(served):
    stub, _, local = served
    questions = [f"{a}+{a}=" for a in (3, 41, 250, 7, 99, 12)]
    expected = [list(local.Generate(request(q, 6), timeout=60).token_ids) for q in questions]

    results = [None] * len(questions)

    def ask(i):
        results[i] = list(stub.Generate(request(questions[i], 6), timeout=120).token_ids)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == expected


def test_dead_shard_ends_requests_unavailable_then_recovers(served):
    stub, replica, local = served
    stream = stub.GenerateStream(request("5+5=", 60), timeout=120)
    next(stream)
    ray.kill(replica.shards[0], no_restart=True)

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        for _ in stream:
            pass
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 30

    answer = stub.Generate(request("5+5=", 4), timeout=120)
    assert answer.token_ids == local.Generate(request("5+5=", 4), timeout=60).token_ids
    assert replica.rebuilds == 1
