import pytest

from jamba.model import PRESETS, JambaArgs


def test_presets_build():
    for name in PRESETS:
        args = JambaArgs.from_preset(name)
        assert args.num_hidden_layers == len(args.layer_schedule())


def test_large_preset_shape():
    args = JambaArgs.from_preset("jamba-1.5-large")
    schedule = args.layer_schedule()
    assert len(schedule) == 72
    assert sum(kind.mixer == "attention" for kind in schedule) == 9
    assert args.mamba_dt_rank == 512


def test_schedule_follows_period_and_offset():
    schedule = JambaArgs.from_preset("jamba-v0.1").layer_schedule()
    attention = [i for i, kind in enumerate(schedule) if kind.mixer == "attention"]
    experts = [i for i, kind in enumerate(schedule) if kind.has_experts]
    assert attention == [4, 12, 20, 28]
    assert experts == list(range(1, 32, 2))


def test_from_design():
    args = JambaArgs.from_design(layers=16, attn_to_mamba=(1, 3), expert_period=4, experts=8, top_k=2,
                                 hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100)
    schedule = args.layer_schedule()
    assert [i for i, k in enumerate(schedule) if k.mixer == "attention"] == [2, 6, 10, 14]
    assert [i for i, k in enumerate(schedule) if k.has_experts] == [3, 7, 11, 15]
    assert (args.num_experts, args.num_experts_per_tok) == (8, 2)


def test_config_dict_round_trip():
    args = JambaArgs.from_preset("tiny")
    assert JambaArgs.from_dict(args.to_dict()) == args


@pytest.mark.parametrize("overrides, message", [
    (dict(num_key_value_heads=3), r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)"),
    (dict(num_hidden_layers=1, attn_layer_offset=1), "the model has no attention layer"),
    (dict(num_hidden_layers=2, attn_layer_offset=0, expert_layer_period=4, expert_layer_offset=3),
     "otherwise no layer has experts"),
    (dict(hidden_act="gelu"), "hidden_act must be 'silu'"),
    (dict(eos_token_id=512), r"eos_token_id must be in \[0, vocab_size=512\), got 512"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be positive"),
])
def test_invalid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        JambaArgs.from_preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'jamba-2'; presets are"):
        JambaArgs.from_preset("jamba-2")
