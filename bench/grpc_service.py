"""Benchmark the gRPC service: 32 concurrent streams against one request at a time, over loopback.

Prints total tokens/s, time to first token (TTFT) and time per output token (TPOT) at p50/p99 for both, and, as
the reference measured in the same run, transformers' `JambaForCausalLM.generate` decoding at batch 1 on the same
weights. The model is the `bench` preset (vocab 4096, hidden 256, 8 layers, MoE every other layer) with random
weights; prompts are token ids, and every request asks for --new-tokens tokens (the output says if any ended
early at the end-of-sequence token). The clients run in a process of their own, as they would in a deployment.

    python bench/grpc_service.py [--streams 32] [--new-tokens 64] [--temperature 0] [--threads 2]
"""

import argparse
import asyncio
import concurrent.futures
import logging
import multiprocessing
import tempfile
import time

import grpc
import torch

from jamba.model import Jamba, JambaArgs
from jamba.tokenizer import Tokenizer, train_tokenizer
from serve.engine import Engine, EngineConfig
from serve.proto.jamba.v1 import jamba_pb2, jamba_pb2_grpc
from serve.runner import LocalRunner, serving_threads
from serve.server import create_server


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def one_stream(stub, prompt, new_tokens, temperature, seed):
    """Run one GenerateStream; return (ttft_s, tpot_s, tokens)."""
    request = jamba_pb2.GenerateRequest(token_ids=jamba_pb2.TokenIds(ids=prompt), sampling=jamba_pb2.SamplingParams(
        max_new_tokens=new_tokens, temperature=temperature, seed=seed))
    started = time.perf_counter()
    first, count = None, 0
    async for message in stub.GenerateStream(request):
        if message.token_ids and first is None:
            first = time.perf_counter()
        count += len(message.token_ids)
    done = time.perf_counter()
    return first - started, (done - first) / max(count - 1, 1), count


async def run_load(port, prompts, new_tokens, concurrency, temperature):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.channel_ready()
        stub = jamba_pb2_grpc.JambaServiceStub(channel)
        started = time.perf_counter()
        if concurrency == 1:
            results = [await one_stream(stub, p, new_tokens, temperature, i) for i, p in enumerate(prompts)]
        else:
            results = await asyncio.gather(*(one_stream(stub, p, new_tokens, temperature, i)
                                             for i, p in enumerate(prompts)))
        elapsed = time.perf_counter() - started
    tokens = sum(r[2] for r in results)
    return tokens / elapsed, [r[0] for r in results], [r[1] for r in results], tokens


def run_load_in_process(*args):
    """run_load in a process of its own: clients do not share the server's interpreter, as in a deployment."""
    return asyncio.run(run_load(*args))


def transformers_batch1(path, prompt, new_tokens, threads) -> float:
    from transformers import JambaForCausalLM

    torch.set_num_threads(threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = JambaForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([prompt])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kwargs)
        started = time.perf_counter()
        model.generate(ids, **kwargs)
    return new_tokens / (time.perf_counter() - started)


async def main_async(options):
    torch.manual_seed(0)
    model = Jamba(JambaArgs.from_preset("bench")).eval()
    path = tempfile.mkdtemp()
    model.save_pretrained(path)
    text = [f"{a}+{b}={a + b} and some plain words to merge" for a in range(200) for b in range(0, 200, 7)]
    tokenizer = Tokenizer(train_tokenizer(text, vocab_size=1024))
    prompts = [[3 + (17 * i + j) % 1000 for j in range(16)] for i in range(options.streams)]
    loop = asyncio.get_running_loop()
    spawn = multiprocessing.get_context("spawn")
    # The reference runs first, in a process of its own, so that nothing competes with it. This process then starts
    # no OpenMP threads outside the engine: as in jamba-serve, only the engine's step thread uses several threads.
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as worker:
        reference = await loop.run_in_executor(worker, transformers_batch1, path, prompts[0], options.new_tokens,
                                               options.threads)

    engine = Engine(LocalRunner(model, num_slots=options.streams, max_len=16 + options.new_tokens + 1), tokenizer,
                    EngineConfig(max_queue_size=options.streams, threads=options.server_threads))
    server, port = create_server("127.0.0.1:0", engine)
    await server.start()
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as clients:
        await loop.run_in_executor(clients, run_load_in_process, port, prompts[:2], 4, 1, options.temperature)
        sequential = await loop.run_in_executor(clients, run_load_in_process, port,
                                                prompts[: max(2, options.streams // 8)], options.new_tokens, 1,
                                                options.temperature)
        parallel = await loop.run_in_executor(clients, run_load_in_process, port, prompts, options.new_tokens,
                                              options.streams, options.temperature)
    await server.stop(1.0)

    print(f"\n{options.streams} streams x {options.new_tokens} new tokens, 16-token prompts, server on "
          f"{options.server_threads} threads, transformers on {options.threads}, torch {torch.__version__}\n")
    print("| load | tokens/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) |")
    print("|---|---:|---:|---:|")
    for name, (rate, ttft, tpot, _) in (("one request at a time", sequential),
                                     (f"{options.streams} concurrent streams", parallel)):
        print(f"| {name} | {rate:,.0f} | {1000 * percentile(ttft, 50):.1f} / {1000 * percentile(ttft, 99):.1f} | "
              f"{1000 * percentile(tpot, 50):.1f} / {1000 * percentile(tpot, 99):.1f} |")
    print(f"| transformers generate, batch 1 | {reference:,.0f} | - | - |")
    expected = options.streams * options.new_tokens
    if parallel[3] != expected:
        print(f"\nnote: the streams ended early (end of sequence) with {parallel[3]} of {expected} tokens")
    print(f"\nconcurrent streams vs transformers batch 1: {parallel[0] / reference:.1f}x; "
          f"vs one request at a time: {parallel[0] / sequential[0]:.1f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32, help="concurrent GenerateStream calls")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens each request generates")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature of the requests, each seeded with its index; 0 is greedy, as the "
                             "transformers reference decodes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the transformers reference")
    parser.add_argument("--server-threads", type=int, default=serving_threads(),
                        help="torch threads of the server's engine, as jamba-serve picks them by default (the "
                             "usable cores)")
    options = parser.parse_args()
    torch.set_num_threads(1)  # see main_async: the model is built here, and steps run on the engine's thread
    asyncio.run(main_async(options))


if __name__ == "__main__":
    main()
