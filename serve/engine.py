"""Continuous batching: an asyncio scheduler that runs many requests over one runner's cache slots.

Scheduling is per iteration. Each iteration first frees the slots of finished, cancelled and expired requests,
then admits waiting requests into free slots with one batched prefill (prompts left-padded), then runs one decode
step for every running request. A request therefore joins or leaves between two model steps, and a cancelled
request keeps its slot for at most the step in flight.

The model steps and the sampling run in one worker thread, so the event loop keeps serving RPCs while the model
computes. Every runner call is made from that thread, one at a time (see `serve/runner.py`).

Each request samples with its own `torch.Generator`, seeded from the request's seed, so a seeded request draws
the same tokens whether it runs alone or batched with others, provided the runner's logits for a row do not
depend on the other rows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from jamba.sampling import SamplingParams, sample
from jamba.tokenizer import StreamDecoder, Tokenizer
from serve.metrics import Metrics
from serve.runner import Runner
from serve.validation import DeadlineExceeded, Draining, GenerationRequest, Limits, Overloaded

logger = logging.getLogger(__name__)


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens or the context length reached
    STOP_SEQUENCE = "stop_sequence"
    END_OF_SEQUENCE = "end_of_sequence"
    CANCELLED = "cancelled"  # the server cancelled the request, for example at the end of a shutdown


@dataclass(frozen=True)
class Chunk:
    """Output of one request from one model step; the last chunk has a finish reason and the totals."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling bounds of an Engine."""

    max_queue_size: int = 64  # requests waiting for a slot; beyond it requests are rejected
    max_prefill_tokens: int = 8192  # padded tokens (batch size x longest prompt) in one prefill call
    default_max_new_tokens: int = 64
    max_new_tokens_limit: int | None = None  # None: the runner's max_len minus one
    threads: int | None = None  # torch threads of the step thread; None: those of the thread creating the Engine

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be >= 0, got {self.max_queue_size}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")


class _Sequence:
    """Scheduling state of one request."""

    def __init__(self, request: GenerationRequest, deadline: float | None, tokenizer: Tokenizer) -> None:
        self.request = request
        self.deadline = deadline  # time.monotonic() value, or None
        self.slot: int | None = None
        self.params = SamplingParams(
            temperature=request.sampling.temperature,
            top_k=request.sampling.top_k,
            top_p=request.sampling.top_p,
            seed=request.sampling.seed,
        )
        self.generator = self.params.make_generator()  # None for greedy requests
        self.output_ids: list[int] = []
        self.decoder = StreamDecoder(tokenizer)
        self.text = ""
        self.sent_chars = 0  # length of the prefix of `text` already sent
        self.events: asyncio.Queue[Chunk | Exception] = asyncio.Queue()
        self.cancelled = False
        self.finished = False
        self.submitted_at = time.monotonic()
        self.last_token_at: float | None = None

    @property
    def id(self) -> str:
        return self.request.request_id


class Engine:
    """Schedules requests over a runner; `generate` is the only entry point requests use.

    Call `start` on the event loop that will run the requests, and `stop` when done.
    """

    def __init__(
        self,
        runner: Runner,
        tokenizer: Tokenizer,
        config: EngineConfig = EngineConfig(),
        metrics: Metrics | None = None,
    ) -> None:
        if tokenizer.vocab_size > runner.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {runner.vocab_size}"
            )
        # Fails now rather than on the first request when the tokenizer cannot stream text.
        StreamDecoder(tokenizer)
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics or Metrics()
        max_new_tokens_limit = config.max_new_tokens_limit or runner.max_len - 1
        self.limits = Limits(
            vocab_size=runner.vocab_size,
            max_context_length=runner.max_len,
            max_new_tokens_limit=max_new_tokens_limit,
            default_max_new_tokens=min(config.default_max_new_tokens, max_new_tokens_limit),
            adapters=tuple(runner.adapters),
        )
        self.eos_id = tokenizer.eos_id
        self.draining = False

        self._waiting: deque[_Sequence] = deque()
        self._running: dict[int, _Sequence] = {}  # slot -> sequence
        self._free_slots: list[int] = list(range(runner.num_slots))
        self._slots_to_free: list[int] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # torch's thread count is a per-thread setting of its OpenMP runtime, so the step thread sets its own.
        threads = config.threads or torch.get_num_threads()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="engine-step", initializer=torch.set_num_threads, initargs=(threads,)
        )
        self._task: asyncio.Task | None = None
        self.metrics.slots_total.set(runner.num_slots)

    # ---- state, for health checks, metrics and tests ----

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_free_slots(self) -> int:
        """Slots that a new request could be admitted into: not running and already reset by the runner."""
        return len(self._free_slots)

    # ---- lifecycle ----

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the engine is already started")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine-loop")

    async def stop(self) -> None:
        """Cancel every request (they end with CANCELLED), stop the loop and the worker thread."""
        self.draining = True
        self.cancel_all()
        if self._task is not None:
            self._wakeup.set()
            if not await self.wait_idle(timeout_s=10.0):
                logger.error("the engine did not become idle within 10 s of stopping; stopping it anyway")
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    def start_draining(self) -> None:
        """Reject new requests with UNAVAILABLE; the requests already submitted run to completion."""
        self.draining = True
        logger.info("draining: %s running and %s waiting requests left", self.num_running, self.num_waiting)

    async def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until no request is waiting or running and every slot is reset; return False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def cancel_all(self) -> None:
        """End every waiting and running request with FinishReason.CANCELLED and the output so far."""
        for seq in [*self._waiting, *self._running.values()]:
            if not seq.finished:
                self._finish(seq, FinishReason.CANCELLED)
        self._wakeup.set()

    # ---- requests ----

    async def generate(self, request: GenerationRequest, deadline: float | None = None) -> AsyncIterator[Chunk]:
        """Run a validated request and yield its chunks; the last one has a finish reason.

        `deadline` is a time.monotonic() value. Raises Draining or Overloaded before generating, and
        DeadlineExceeded when the deadline passes first. Closing the iterator early cancels the request.
        """
        seq = self._submit(request, deadline)
        try:
            while True:
                item = await seq.events.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                logger.info("request %s cancelled by the client after %s tokens", seq.id, len(seq.output_ids))
                seq.cancelled = True
                self._wakeup.set()

    def _submit(self, request: GenerationRequest, deadline: float | None) -> _Sequence:
        if self.draining:
            raise Draining("the server is shutting down and accepts no new requests")
        capacity = self.runner.num_slots + self.config.max_queue_size
        if len(self._waiting) + len(self._running) >= capacity:
            self.metrics.rejected.inc()
            raise Overloaded(
                f"all {self.runner.num_slots} cache slots are in use and the queue of "
                f"{self.config.max_queue_size} requests is full; retry later"
            )
        if len(request.prompt_ids) >= self.runner.max_len:
            raise AssertionError("validation admits prompts shorter than the context length only")
        seq = _Sequence(request, deadline, self.tokenizer)
        self._waiting.append(seq)
        self._idle.clear()
        self._wakeup.set()
        logger.debug("request %s queued: %s prompt tokens", seq.id, len(request.prompt_ids))
        return seq

    # ---- the scheduling loop ----

    async def _loop(self) -> None:
        while True:
            if not (self._waiting or self._running or self._slots_to_free):
                self._idle.set()
                self._update_gauges()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue

            try:
                await self._iterate()
            except Exception as error:
                # Keep serving: fail the requests in flight rather than leave their clients waiting forever.
                active = [*self._waiting, *self._running.values()]
                self._fail(active, "scheduling", error)
                self._drop_finished()

    async def _iterate(self) -> None:
        self._drop_finished()
        if self._slots_to_free:
            await self._free_slots_now()

        admitted = self._admit()
        if admitted:
            await self._prefill(admitted)
            self._drop_finished()

        if self._running:
            await self._decode()
        self._update_gauges()

    def _drop_finished(self) -> None:
        """Remove cancelled, expired and finished requests from the queue and from their slots."""
        now = time.monotonic()
        for seq in [*self._waiting, *self._running.values()]:
            if not seq.finished and not seq.cancelled and seq.deadline is not None and now >= seq.deadline:
                logger.info("request %s passed its deadline after %s tokens", seq.id, len(seq.output_ids))
                seq.finished = True
                seq.events.put_nowait(DeadlineExceeded(f"deadline exceeded after {len(seq.output_ids)} tokens"))
        self._waiting = deque(seq for seq in self._waiting if not (seq.finished or seq.cancelled))
        for slot, seq in list(self._running.items()):
            if seq.finished or seq.cancelled:
                del self._running[slot]
                self._slots_to_free.append(slot)

    async def _free_slots_now(self) -> None:
        slots, self._slots_to_free = self._slots_to_free, []
        try:
            await self._in_worker(self.runner.free, slots)
        except Exception:
            # The slots stay out of the pool: reusing a slot whose cache was not reset would corrupt its next
            # request.
            logger.exception("freeing slots %s failed; they are taken out of service", slots)
            return
        self._free_slots.extend(slots)

    def _admit(self) -> list[_Sequence]:
        """Move waiting requests into free slots, in arrival order, up to the prefill token budget."""
        admitted: list[_Sequence] = []
        longest = 0
        while self._waiting and self._free_slots:
            seq = self._waiting[0]
            new_longest = max(longest, len(seq.request.prompt_ids))
            if admitted and new_longest * (len(admitted) + 1) > self.config.max_prefill_tokens:
                break
            self._waiting.popleft()
            seq.slot = self._free_slots.pop(0)
            self._running[seq.slot] = seq
            admitted.append(seq)
            longest = new_longest
        return admitted

    async def _prefill(self, batch: list[_Sequence]) -> None:
        slots = [seq.slot for seq in batch]
        prompts = [list(seq.request.prompt_ids) for seq in batch]
        adapters = [seq.request.adapter for seq in batch]
        started = time.monotonic()
        try:
            tokens = await self._in_worker(self._prefill_and_sample, slots, prompts, adapters, batch)
        except Exception as error:
            self._fail(batch, "prefill", error)
            return
        self.metrics.step_seconds.labels("prefill").observe(time.monotonic() - started)
        self.metrics.prompt_tokens.inc(sum(len(prompt) for prompt in prompts))
        for seq, token in zip(batch, tokens):
            logger.debug("request %s prefilled into slot %s", seq.id, seq.slot)
            self._append(seq, token)

    async def _decode(self) -> None:
        batch = list(self._running.values())
        slots = [seq.slot for seq in batch]
        tokens = [seq.output_ids[-1] for seq in batch]
        started = time.monotonic()
        try:
            next_tokens = await self._in_worker(self._decode_and_sample, slots, tokens, batch)
        except Exception as error:
            self._fail(batch, "decode", error)
            return
        self.metrics.step_seconds.labels("decode").observe(time.monotonic() - started)
        for seq, token in zip(batch, next_tokens):
            # A request cancelled while the step ran still had its token computed; it is dropped here.
            if not (seq.finished or seq.cancelled):
                self._append(seq, token)

    def _fail(self, batch: list[_Sequence], step: str, error: Exception) -> None:
        logger.exception("%s step failed for requests %s", step, [seq.id for seq in batch], exc_info=error)
        for seq in batch:
            if not seq.finished:
                seq.finished = True
                seq.events.put_nowait(error)

    async def _in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- worker thread: model steps and sampling ----

    def _prefill_and_sample(
        self, slots: list[int], prompts: list[list[int]], adapters: list[str | None], batch: list[_Sequence]
    ) -> list[int]:
        logits = self.runner.prefill(slots, prompts, adapters)
        return self._sample(logits, batch)

    def _decode_and_sample(self, slots: list[int], tokens: list[int], batch: list[_Sequence]) -> list[int]:
        logits = self.runner.decode(slots, tokens)
        return self._sample(logits, batch)

    def _sample(self, logits: torch.Tensor, batch: list[_Sequence]) -> list[int]:
        expected = (len(batch), self.runner.vocab_size)
        if tuple(logits.shape) != expected:
            raise RuntimeError(f"the runner returned logits of shape {tuple(logits.shape)}, expected {expected}")
        if self.tokenizer.vocab_size < logits.shape[1]:
            # Rows beyond the tokenizer's vocabulary (a model vocabulary padded for speed) have no text. A copy,
            # because a runner may return tensors made under torch.inference_mode, which cannot change in place.
            logits = logits.clone()
            logits[:, self.tokenizer.vocab_size:] = float("-inf")
        tokens = sample(logits, [seq.params for seq in batch], [seq.generator for seq in batch])
        load = self.runner.take_expert_load()
        if load is not None:
            self.metrics.observe_expert_load(load)
        return tokens.tolist()

    # ---- output ----

    def _append(self, seq: _Sequence, token: int) -> None:
        """Record one generated token, check the stop conditions and send the request its chunk."""
        now = time.monotonic()
        if seq.last_token_at is None:
            self.metrics.time_to_first_token.observe(now - seq.submitted_at)
        else:
            self.metrics.time_per_output_token.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.generated_tokens.inc()
        seq.output_ids.append(token)

        finish_reason = None
        if token == self.eos_id:
            finish_reason = FinishReason.END_OF_SEQUENCE
        elif len(seq.output_ids) >= seq.request.max_new_tokens:
            finish_reason = FinishReason.LENGTH
        elif len(seq.request.prompt_ids) + len(seq.output_ids) >= self.runner.max_len:
            finish_reason = FinishReason.LENGTH

        text_before = len(seq.text)
        seq.text += seq.decoder.push(token)
        if finish_reason is not None:
            seq.text += seq.decoder.flush()
        if seq.request.stop and self._truncate_at_stop(seq, text_before):
            finish_reason = FinishReason.STOP_SEQUENCE

        if finish_reason is not None:
            self._finish(seq, finish_reason, (token,))
            return
        end = len(seq.text) - _stop_prefix_length(seq.text, seq.sent_chars, seq.request.stop)
        seq.events.put_nowait(Chunk(token_ids=(token,), text=seq.text[seq.sent_chars:end]))
        seq.sent_chars = end

    @staticmethod
    def _truncate_at_stop(seq: _Sequence, text_before: int) -> bool:
        """Cut the text before the first stop sequence in it, if any; return whether one was found."""
        longest = max(len(stop) for stop in seq.request.stop)
        # Only text that ends in the new characters can hold a stop sequence not seen before.
        search_from = max(0, text_before - longest + 1)
        found = [i for i in (seq.text.find(stop, search_from) for stop in seq.request.stop) if i >= 0]
        if not found:
            return False
        seq.text = seq.text[: min(found)]
        return True

    def _finish(self, seq: _Sequence, reason: FinishReason, token_ids: tuple[int, ...] = ()) -> None:
        seq.finished = True
        chunk = Chunk(
            token_ids=token_ids,
            text=seq.text[seq.sent_chars:],
            finish_reason=reason,
            prompt_tokens=len(seq.request.prompt_ids),
            completion_tokens=len(seq.output_ids),
        )
        seq.sent_chars = len(seq.text)
        seq.events.put_nowait(chunk)
        self.metrics.finished.labels(reason.value).inc()
        logger.info(
            "request %s finished (%s): %s prompt tokens, %s generated in %.3f s", seq.id, reason.value,
            chunk.prompt_tokens, chunk.completion_tokens, time.monotonic() - seq.submitted_at,
        )

    def _update_gauges(self) -> None:
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.running.set(len(self._running))
        self.metrics.slots_in_use.set(self.runner.num_slots - len(self._free_slots))


def _stop_prefix_length(text: str, start: int, stops: Sequence[str]) -> int:
    """Return the length of the longest end of text[start:] that is the start of a stop sequence.

    That much text is held back, because the next tokens may complete the stop sequence.
    """
    for length in range(min(len(text) - start, max((len(s) for s in stops), default=0) - 1), 0, -1):
        tail = text[len(text) - length:]
        if any(stop.startswith(tail) for stop in stops):
            return length
    return 0
