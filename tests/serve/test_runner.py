import argparse

import pytest
import torch

from jamba.generate import generate
from serve.runner import LocalRunner, slots_for_memory
from serve.server import parse_bytes


def test_slots_from_memory_budget(tiny_model):
    per_slot = tiny_model.new_cache(num_slots=1, max_len=64).bytes_per_slot()

    assert slots_for_memory(tiny_model, 64, int(3.5 * per_slot)) == 3
    assert slots_for_memory(tiny_model, 64, per_slot) == 1
    with pytest.raises(ValueError, match="below one cache slot"):
        slots_for_memory(tiny_model, 64, per_slot - 1)


def test_local_runner_matches_generate(tiny_model, tokenizer):
    prompts = [[1, *tokenizer.encode("12+34=")], [1, *tokenizer.encode("7+8=")]]
    expected = generate(tiny_model, prompts, max_new_tokens=5)
    runner = LocalRunner(tiny_model, num_slots=4, max_len=32)

    # Slots 3 and 1, out of order, to check rows follow the slots given.
    tokens = runner.prefill([3, 1], prompts, [None, None]).argmax(-1).tolist()
    outputs = [[t] for t in tokens]
    for _ in range(4):
        tokens = runner.decode([3, 1], tokens).argmax(-1).tolist()
        for output, token in zip(outputs, tokens):
            output.append(token)

    assert outputs == [g.tokens for g in expected]
    assert runner.cache.lengths.tolist() == [0, len(prompts[1]) + 4, 0, len(prompts[0]) + 4]
    runner.free([1, 3])
    assert runner.cache.lengths.tolist() == [0, 0, 0, 0]
    load = runner.take_expert_load()
    assert load.shape == (2, 4)
    assert int(load.sum()) == 2 * 2 * (len(prompts[0]) + len(prompts[1]) + 2 * 4)
    assert int(runner.take_expert_load().sum()) == 0


def test_local_runner_rejects_unknown_adapter(tiny_model):
    runner = LocalRunner(tiny_model, num_slots=1, max_len=8)
    with pytest.raises(ValueError, match=r"unknown adapters \['math'\]; this runner has \[\]"):
        runner.prefill([0], [[1, 2]], ["math"])
    assert torch.equal(runner.cache.lengths, torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("text, expected", [
    ("1048576", 1048576), ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000), ("64kib", 65536),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12XB", "0", "-5MiB"])
def test_parse_bytes_invalid(text):
    with pytest.raises(argparse.ArgumentTypeError, match="invalid size"):
        parse_bytes(text)
