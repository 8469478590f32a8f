"""The model here against transformers' JambaForCausalLM on the same weights."""

import pytest
import torch
from transformers import JambaConfig, JambaForCausalLM

from jamba.generate import generate, left_pad
from jamba.model import Jamba, load_balancing_loss

BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, mamba_d_state=8, mamba_dt_rank=8, max_position_embeddings=1024)

SCHEDULES = {
    # a:m = 1:3 with the attention layer at offset 1, MoE every other layer, 4 experts top-2, GQA 2:1.
    "attn-offset-1": dict(attn_layer_period=4, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                          num_experts=4, num_experts_per_tok=2),
    # a:m = 1:1, MoE in every layer, 8 experts top-3, multi-query attention.
    "mqa-moe-everywhere": dict(num_attention_heads=8, num_key_value_heads=1, attn_layer_period=2,
                               attn_layer_offset=0, expert_layer_period=1, expert_layer_offset=0, num_experts=8,
                               num_experts_per_tok=3),
    # No experts at all, plain multi-head attention, tied embeddings.
    "dense-tied": dict(num_hidden_layers=3, attn_layer_period=3, attn_layer_offset=2, num_experts=1,
                       num_experts_per_tok=1, num_key_value_heads=4, tie_word_embeddings=True),
    # a:m = 1:5, MoE every third layer, top-1, Mamba projections with bias and a conv without.
    "top1-proj-bias": dict(num_hidden_layers=6, attn_layer_period=6, attn_layer_offset=5, expert_layer_period=3,
                           expert_layer_offset=0, num_experts=4, num_experts_per_tok=1, mamba_proj_bias=True,
                           mamba_conv_bias=False),
}


def make_hf(schedule: str, path):
    torch.manual_seed(0)
    hf = JambaForCausalLM(JambaConfig(**{**BASE, **SCHEDULES[schedule]})).eval()
    # transformers initialises dt_proj.bias to zero; random values exercise the time-step path harder.
    with torch.no_grad():
        for layer in hf.model.layers:
            if hasattr(layer, "mamba"):
                layer.mamba.dt_proj.bias.uniform_(-4, 0)
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_logits_match_transformers(schedule, tmp_path):
    hf = make_hf(schedule, tmp_path)
    model = Jamba.from_pretrained(tmp_path)
    ids = torch.randint(3, BASE["vocab_size"], (2, 24))

    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids).logits

    diff = (expected - got).abs().max().item()
    assert diff < 1e-4, f"max logit difference {diff}"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_greedy_continuation_matches_transformers(schedule, tmp_path):
    hf = make_hf(schedule, tmp_path)
    model = Jamba.from_pretrained(tmp_path)
    prompt = torch.randint(3, BASE["vocab_size"], (1, 9))

    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, 9:].tolist()
    got = generate(model, [prompt[0].tolist()], max_new_tokens=20)[0].tokens

    assert got == expected


@pytest.mark.parametrize("schedule", ["attn-offset-1", "dense-tied"])
def test_saved_here_loads_in_transformers(schedule, tmp_path):
    from jamba.model import JambaArgs

    model = Jamba(JambaArgs(**{**BASE, **SCHEDULES[schedule]})).eval()
    model.save_pretrained(tmp_path)
    hf = JambaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, BASE["vocab_size"], (2, 16))

    with torch.no_grad():
        diff = (hf(ids).logits - model(ids).logits).abs().max().item()

    assert diff < 1e-4, f"max logit difference {diff}"


def test_left_padded_batch_matches_transformers(tmp_path):
    hf = make_hf("attn-offset-1", tmp_path)
    model = Jamba.from_pretrained(tmp_path)
    prompts = [torch.randint(3, BASE["vocab_size"], (n,)).tolist() for n in (12, 5, 9)]
    ids, mask = left_pad(prompts, pad_id=0)

    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits

    real = mask.bool()
    diff = (expected[real] - got[real]).abs().max().item()
    assert diff < 1e-4, f"max logit difference on real tokens {diff}"


def test_aux_loss_matches_transformers(tmp_path):
    hf = make_hf("mqa-moe-everywhere", tmp_path)
    model = Jamba.from_pretrained(tmp_path)
    prompts = [torch.randint(3, BASE["vocab_size"], (n,)).tolist() for n in (12, 7)]
    ids, mask = left_pad(prompts, pad_id=0)

    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, output_router_logits=True).aux_loss
        got = model(ids, attention_mask=mask).aux_loss

    assert abs(expected.item() - got.item()) < 1e-5


def test_aux_loss_is_top_k_at_init():
    from jamba.model import JambaArgs

    args = JambaArgs(**{**BASE, **SCHEDULES["mqa-moe-everywhere"]})
    model = Jamba(args).eval()
    ids = torch.randint(3, BASE["vocab_size"], (4, 32))

    with torch.no_grad():
        aux = model(ids).aux_loss.item()

    assert abs(aux - args.num_experts_per_tok) < 0.1 * args.num_experts_per_tok


def test_aux_loss_ignores_padding():
    from jamba.model import JambaArgs

    args = JambaArgs(**{**BASE, **SCHEDULES["attn-offset-1"]})
    model = Jamba(args).eval()
    prompts = [torch.randint(3, BASE["vocab_size"], (n,)).tolist() for n in (14, 6)]
    ids, mask = left_pad(prompts, pad_id=0)

    with torch.no_grad():
        padded = model(ids, attention_mask=mask).aux_loss
        alone = [model(torch.tensor([p])).router_logits for p in prompts]
    per_layer = [torch.cat([rows[layer] for rows in alone]) for layer in range(len(alone[0]))]
    expected = load_balancing_loss(per_layer, args.num_experts, args.num_experts_per_tok)

    assert abs(padded.item() - expected.item()) < 1e-6
