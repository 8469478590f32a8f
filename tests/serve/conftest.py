"""Fixtures for the serving tests: a tokenizer trained here, a scripted runner, the tiny model, a live server."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import grpc
import pytest
import torch

from jamba.model import Jamba, JambaArgs
from jamba.tokenizer import Tokenizer, train_tokenizer
from serve.engine import Engine, EngineConfig
from serve.proto.jamba.v1 import jamba_pb2_grpc
from serve.runner import LocalRunner, ModelSummary
from serve.server import create_server

CORPUS = [
    "12+34=46", "7+8=15", "100-1=99", "the quick brown fox jumps over the lazy dog",
    "hello world, hello server", "stream every token as soon as it is ready",
] * 20


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer(train_tokenizer(CORPUS, vocab_size=300, min_frequency=2))


class ScriptedRunner:
    """A Runner whose logits depend only on the tokens in a slot, so any batching gives the same rows.

    It checks the slot protocol the engine must follow (prefill only empty slots, decode only prefilled ones,
    stay within max_len), never proposes the eos token, and can sleep per step to make generation slow.
    """

    def __init__(self, vocab_size: int, num_slots: int, max_len: int, eos_id: int, step_delay_s: float = 0.0):
        self.summary = ModelSummary(
            name="scripted", vocab_size=vocab_size, hidden_size=8, num_hidden_layers=2, num_attention_layers=1,
            num_mamba_layers=1, num_experts=1, num_experts_per_tok=1,
        )
        self.num_slots = num_slots
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.adapters = ("scripted-adapter",)
        self.eos_id = eos_id
        self.step_delay_s = step_delay_s
        self.histories: dict[int, list[int]] = {}
        self.prefill_batches: list[int] = []
        self.decode_batches: list[int] = []
        self.protocol_errors: list[str] = []

    def _logits(self, history: list[int]) -> torch.Tensor:
        digest = hashlib.sha256(repr(history).encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        logits = torch.randn(self.vocab_size, generator=generator) * 3
        logits[self.eos_id] = float("-inf")
        return logits

    def prefill(self, slots, prompts, adapters):
        time.sleep(self.step_delay_s)
        self.prefill_batches.append(len(slots))
        for slot, prompt in zip(slots, prompts):
            if slot in self.histories:
                self.protocol_errors.append(f"prefill into occupied slot {slot}")
            if len(prompt) > self.max_len:
                self.protocol_errors.append(f"prompt of {len(prompt)} tokens in slot {slot}")
            self.histories[slot] = list(prompt)
        return torch.stack([self._logits(self.histories[slot]) for slot in slots])

    def decode(self, slots, tokens):
        time.sleep(self.step_delay_s)
        self.decode_batches.append(len(slots))
        for slot, token in zip(slots, tokens):
            if slot not in self.histories:
                self.protocol_errors.append(f"decode of empty slot {slot}")
                self.histories[slot] = []
            self.histories[slot].append(token)
            if len(self.histories[slot]) > self.max_len:
                self.protocol_errors.append(f"slot {slot} grew past max_len")
        return torch.stack([self._logits(self.histories[slot]) for slot in slots])

    def free(self, slots):
        for slot in slots:
            self.histories.pop(slot, None)

    def take_expert_load(self):
        return None


@pytest.fixture
def scripted_engine(tokenizer):
    """Factory of Engines over a ScriptedRunner."""

    def make(num_slots=4, max_len=256, step_delay_s=0.0, queue_size=16, **config) -> Engine:
        runner = ScriptedRunner(tokenizer.vocab_size, num_slots, max_len, tokenizer.eos_id, step_delay_s)
        return Engine(runner, tokenizer, EngineConfig(max_queue_size=queue_size, **config))

    return make


@pytest.fixture(scope="session")
def tiny_model(tokenizer) -> Jamba:
    torch.manual_seed(0)
    args = JambaArgs.from_preset("tiny", vocab_size=tokenizer.vocab_size)
    return Jamba(args).eval()


@pytest.fixture
def tiny_engine(tiny_model, tokenizer):
    """Factory of Engines over the tiny random model."""

    def make(num_slots=4, max_len=128, queue_size=32) -> Engine:
        runner = LocalRunner(tiny_model, num_slots=num_slots, max_len=max_len, name="tiny")
        return Engine(runner, tokenizer, EngineConfig(max_queue_size=queue_size))

    return make


class LiveServer:
    """A started server on 127.0.0.1 with its own event loop thread, and a channel to it."""

    def __init__(self, engine: Engine, **server_options) -> None:
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self.run(self._start(server_options))
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = jamba_pb2_grpc.JambaServiceStub(self.channel)

    async def _start(self, server_options):
        server, port = create_server("127.0.0.1:0", self.engine, **server_options)
        await server.start()
        return server, port

    def run(self, coroutine, timeout_s: float = 60.0):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def submit(self, coroutine):
        """Start a coroutine on the server's loop without waiting."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        return self.run(self.engine.wait_idle(timeout_s))

    def close(self) -> None:
        self.channel.close()
        self.run(self.server.stop(grace_s=0.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def live_server():
    """Factory of LiveServers, closed at the end of the test."""
    servers = []

    def make(engine: Engine, **server_options) -> LiveServer:
        server = LiveServer(engine, **server_options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()
