"""Cached generation: decode steps against the full forward, slots, sampling."""

import pytest
import torch

from jamba.generate import generate, left_pad
from jamba.model import Jamba, JambaArgs
from jamba.sampling import SamplingParams


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Jamba(JambaArgs.from_preset("tiny")).eval()


@torch.no_grad()
def test_decode_steps_match_full_forward(model):
    ids = torch.randint(3, 512, (3, 20))
    full = model(ids).logits
    cache = model.new_cache(num_slots=4, max_len=32)
    slots = torch.tensor([3, 0, 2])

    prefill = model(ids[:, :12], cache=cache, slots=slots).logits
    assert (prefill - full[:, :12]).abs().max().item() < 1e-5
    for t in range(12, 20):
        step = model(ids[:, t:t + 1], cache=cache, slots=slots).logits[:, 0]
        diff = (step - full[:, t]).abs().max().item()
        assert diff < 1e-5, f"position {t}: max difference {diff}"
    assert cache.lengths.tolist() == [20, 0, 20, 20]


@torch.no_grad()
def test_left_padded_prefill_matches_each_prompt_alone(model):
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (15, 4, 9)]
    ids, mask = left_pad(prompts, pad_id=0)
    cache = model.new_cache(num_slots=3, max_len=32)
    slots = torch.arange(3)

    last = model(ids, attention_mask=mask, cache=cache, slots=slots, logits_to_keep=1).logits[:, -1]
    nxt = torch.randint(3, 512, (3, 1))
    after = model(nxt, cache=cache, slots=slots).logits[:, -1]

    for row, prompt in enumerate(prompts):
        alone = model(torch.tensor([prompt + [int(nxt[row])]])).logits[0]
        assert (last[row] - alone[-2]).abs().max().item() < 1e-5
        assert (after[row] - alone[-1]).abs().max().item() < 1e-5
    assert cache.lengths.tolist() == [16, 5, 10]


@torch.no_grad()
def test_freed_slot_is_reused_cleanly(model):
    cache = model.new_cache(num_slots=2, max_len=16)
    model(torch.randint(3, 512, (1, 10)), cache=cache, slots=[1])
    cache.free([1])
    ids = torch.randint(3, 512, (1, 6))

    reused = model(ids, cache=cache, slots=[1], logits_to_keep=1).logits
    fresh = model(ids).logits[:, -1:]
    assert (reused - fresh).abs().max().item() < 1e-6


def test_cache_memory_is_attention_kv_only(model):
    cache = model.new_cache(num_slots=2, max_len=100)
    args = model.args
    attention_layers = sum(k.mixer == "attention" for k in args.layer_schedule())
    assert cache.kv_bytes_per_token() == attention_layers * 2 * args.num_key_value_heads * args.head_dim * 4


def test_cache_rejects_mixed_prefill_and_decode(model):
    cache = model.new_cache(num_slots=2, max_len=16)
    model(torch.randint(3, 512, (1, 4)), cache=cache, slots=[0])
    with pytest.raises(ValueError, match="either prefills empty slots or adds one token"):
        model(torch.randint(3, 512, (2, 1)), cache=cache, slots=[0, 1])


def test_cache_rejects_overflow(model):
    cache = model.new_cache(num_slots=1, max_len=8)
    with pytest.raises(ValueError, match="would exceed the cache length 8"):
        model(torch.randint(3, 512, (1, 9)), cache=cache, slots=[0])


def test_generate_stops_at_eos_and_stop_sequence(model):
    prompt = torch.randint(3, 512, (6,)).tolist()
    free_run = generate(model, [prompt], max_new_tokens=8)[0]
    assert free_run.finish_reason == "length"
    assert len(free_run.tokens) == 8

    at_eos = generate(model, [prompt], max_new_tokens=8, eos_id=free_run.tokens[2])[0]
    assert at_eos.tokens == free_run.tokens[:3]
    assert at_eos.finish_reason == "eos"

    stopped = generate(model, [prompt], max_new_tokens=8, stop_sequences=[free_run.tokens[3:5]])[0]
    assert stopped.tokens == free_run.tokens[:5]
    assert stopped.finish_reason == "stop"


def test_batched_generation_equals_alone(model):
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (3, 11, 7)]
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=5),
              SamplingParams(temperature=1.2, top_p=0.9, seed=9)]
    batched = generate(model, prompts, max_new_tokens=10, params=params)
    for prompt, p, out in zip(prompts, params, batched):
        assert generate(model, [prompt], max_new_tokens=10, params=p)[0].tokens == out.tokens


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be an integer >= 0"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_top_k_one_is_greedy(model):
    prompt = torch.randint(3, 512, (5,)).tolist()
    greedy = generate(model, [prompt], max_new_tokens=6)[0].tokens
    sampled = generate(model, [prompt], max_new_tokens=6, params=SamplingParams(temperature=1.0, top_k=1, seed=1))
    assert sampled[0].tokens == greedy


def test_sampling_follows_filtered_distribution():
    from jamba.sampling import filter_logits, sample

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 2
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.7, top_k=5, seed=2),
              SamplingParams(temperature=1.2, top_p=0.5, seed=3)]
    generators = [p.make_generator() for p in params]
    counts = torch.zeros(3, 50)
    for _ in range(4000):
        counts[torch.arange(3), sample(logits, params, generators)] += 1
    for row, p in enumerate(params):
        expected = torch.softmax(filter_logits(logits[row] / p.temperature, p.top_k, p.top_p), dim=-1)
        observed = counts[row] / counts[row].sum()
        assert counts[row][expected == 0].sum() == 0, "a filtered-out token was drawn"
        assert (observed - expected).abs().max().item() < 0.03
