import asyncio
import time

import pytest
import torch

from serve.engine import EngineConfig, FinishReason
from serve.validation import DeadlineExceeded, Draining, GenerationRequest, Overloaded, Sampling


def run(coroutine_fn, engine):
    """Start the engine, await coroutine_fn(), then stop the engine."""

    async def main():
        engine.start()
        try:
            return await coroutine_fn()
        finally:
            await engine.stop()

    return asyncio.run(main())


async def collect(engine, request, deadline=None):
    return [chunk async for chunk in engine.generate(request, deadline)]


def make_request(prompt=(1, 10, 11), max_new_tokens=8, **kwargs) -> GenerationRequest:
    return GenerationRequest(prompt_ids=tuple(prompt), max_new_tokens=max_new_tokens, **kwargs)


def test_generates_max_new_tokens(scripted_engine, tokenizer):
    engine = scripted_engine()
    chunks = run(lambda: collect(engine, make_request(max_new_tokens=6)), engine)

    token_ids = [t for chunk in chunks for t in chunk.token_ids]
    assert len(token_ids) == 6
    assert chunks[-1].finish_reason == FinishReason.LENGTH
    assert all(chunk.finish_reason is None for chunk in chunks[:-1])
    assert chunks[-1].prompt_tokens == 3
    assert chunks[-1].completion_tokens == 6
    assert "".join(chunk.text for chunk in chunks) == tokenizer.decode(token_ids)
    assert engine.num_free_slots == 4
    assert engine.runner.histories == {}
    assert engine.runner.protocol_errors == []


def test_context_limit_ends_generation(scripted_engine):
    engine = scripted_engine(max_len=10)
    chunks = run(lambda: collect(engine, make_request(prompt=range(3, 9), max_new_tokens=9)), engine)

    assert chunks[-1].finish_reason == FinishReason.LENGTH
    assert chunks[-1].completion_tokens == 4  # 6 prompt + 4 generated = max_len
    assert engine.runner.protocol_errors == []


def test_end_of_sequence(scripted_engine, tokenizer):
    engine = scripted_engine()
    first = run(lambda: collect(engine, make_request(max_new_tokens=4)), engine)
    tokens = [t for chunk in first for t in chunk.token_ids]

    # Make the third generated token the eos token by rewriting the runner's logits.
    engine = scripted_engine()
    original = engine.runner._logits

    def logits_with_eos(history):
        logits = original(history)
        if history[3:] == tokens[:2]:
            logits[tokenizer.eos_id] = 1e4
        return logits

    engine.runner._logits = logits_with_eos
    chunks = run(lambda: collect(engine, make_request(max_new_tokens=4)), engine)
    assert [t for chunk in chunks for t in chunk.token_ids] == [*tokens[:2], tokenizer.eos_id]
    assert chunks[-1].finish_reason == FinishReason.END_OF_SEQUENCE
    assert "".join(chunk.text for chunk in chunks) == tokenizer.decode(tokens[:2])


def test_stop_sequence_cut_and_held_back(scripted_engine, tokenizer):
    engine = scripted_engine()
    free_run = run(lambda: collect(engine, make_request(max_new_tokens=12)), engine)
    full_text = "".join(chunk.text for chunk in free_run)
    assert len(full_text) >= 6, full_text
    stop = full_text[3:6]
    expected_text = full_text[: full_text.index(stop)]

    engine = scripted_engine()
    chunks = run(lambda: collect(engine, make_request(max_new_tokens=12, stop=(stop,))), engine)
    assert chunks[-1].finish_reason == FinishReason.STOP_SEQUENCE
    assert "".join(chunk.text for chunk in chunks) == expected_text
    # No chunk ever sent text of the stop sequence, not even its first characters.
    sent = ""
    for chunk in chunks:
        sent += chunk.text
        assert stop not in sent
        assert sent == expected_text[: len(sent)]


def test_seeded_request_same_alone_and_batched(scripted_engine):
    target = make_request(max_new_tokens=10, sampling=Sampling(temperature=1.0, top_k=20, seed=1234))

    engine = scripted_engine()
    alone = run(lambda: collect(engine, target), engine)

    engine = scripted_engine(num_slots=8)

    async def batched():
        others = [
            asyncio.create_task(collect(engine, make_request(
                prompt=(1, 20 + i), max_new_tokens=3 + i, sampling=Sampling(temperature=1.0, seed=i))))
            for i in range(6)
        ]
        await asyncio.sleep(0)
        result = await collect(engine, target)
        await asyncio.gather(*others)
        return result

    together = run(batched, engine)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert max(engine.runner.decode_batches) > 1


def test_overload_rejected(scripted_engine):
    engine = scripted_engine(num_slots=2, queue_size=1, step_delay_s=0.01)

    async def flood():
        tasks = [asyncio.create_task(collect(engine, make_request(max_new_tokens=5))) for _ in range(5)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(flood, engine)
    rejected = [r for r in results if isinstance(r, Overloaded)]
    completed = [r for r in results if isinstance(r, list)]
    assert len(rejected) == 2
    assert len(completed) == 3
    assert all(r[-1].completion_tokens == 5 for r in completed)


def test_cancel_frees_slot_within_one_step(scripted_engine):
    engine = scripted_engine(num_slots=1, step_delay_s=0.01)

    async def cancel_then_generate():
        stream = engine.generate(make_request(max_new_tokens=200))
        await stream.__anext__()
        decodes_before = len(engine.runner.decode_batches)
        await stream.aclose()
        # The next request gets the only slot once the step in flight ends.
        chunks = await collect(engine, make_request(max_new_tokens=2))
        return decodes_before, chunks

    decodes_before, chunks = run(cancel_then_generate, engine)
    assert chunks[-1].completion_tokens == 2
    # After the cancel: at most the decode step already in flight, then the new request's single decode.
    assert len(engine.runner.decode_batches) - decodes_before <= 2
    assert engine.num_free_slots == 1
    assert engine.runner.protocol_errors == []


def test_deadline_expires(scripted_engine):
    engine = scripted_engine(step_delay_s=0.01)

    async def late():
        with pytest.raises(DeadlineExceeded):
            await collect(engine, make_request(max_new_tokens=200), deadline=time.monotonic() + 0.1)
        return await engine.wait_idle(5.0)

    assert run(late, engine)
    assert engine.num_free_slots == 4
    assert engine.runner.histories == {}


def test_draining_rejects_new_requests(scripted_engine):
    engine = scripted_engine(step_delay_s=0.005)

    async def drain():
        running = asyncio.create_task(collect(engine, make_request(max_new_tokens=10)))
        await asyncio.sleep(0.02)
        engine.start_draining()
        with pytest.raises(Draining):
            await collect(engine, make_request())
        return await running

    chunks = run(drain, engine)
    assert chunks[-1].finish_reason == FinishReason.LENGTH
    assert chunks[-1].completion_tokens == 10


def test_stop_cancels_running_requests(scripted_engine):
    engine = scripted_engine(step_delay_s=0.005)

    async def stop_midway():
        engine.start()
        stream = engine.generate(make_request(max_new_tokens=500))
        first = await stream.__anext__()
        await engine.stop()
        rest = [chunk async for chunk in stream]
        return [first, *rest]

    chunks = asyncio.run(stop_midway())
    assert chunks[-1].finish_reason == FinishReason.CANCELLED
    assert 1 <= chunks[-1].completion_tokens < 500


def test_prefill_batches_respect_token_budget(scripted_engine):
    engine = scripted_engine(num_slots=8, max_prefill_tokens=20, step_delay_s=0.002)

    async def many():
        tasks = [asyncio.create_task(collect(engine, make_request(prompt=range(3, 13), max_new_tokens=2)))
                 for _ in range(6)]
        return await asyncio.gather(*tasks)

    results = run(many, engine)
    assert all(r[-1].completion_tokens == 2 for r in results)
    assert max(engine.runner.prefill_batches) == 2  # 2 prompts x 10 tokens fill the budget of 20


@pytest.mark.parametrize("threads", [1, 3])
def test_step_thread_uses_configured_threads(scripted_engine, monkeypatch, threads):
    engine = scripted_engine(threads=threads)
    seen = []
    decode = engine.runner.decode

    def spy(slots, tokens):
        seen.append(torch.get_num_threads())
        return decode(slots, tokens)

    monkeypatch.setattr(engine.runner, "decode", spy)
    run(lambda: collect(engine, make_request(max_new_tokens=3)), engine)
    assert seen
    assert set(seen) == {threads}


def test_engine_config_rejects_zero_threads():
    with pytest.raises(ValueError, match="threads must be >= 1"):
        EngineConfig(threads=0)
