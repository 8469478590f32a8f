"""Checkpoint loading and saving: layouts that must load, and broken checkpoints that must fail clearly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from jamba.checkpoint import CheckpointError, load_pretrained
from jamba.model import Jamba, JambaArgs


@pytest.fixture()
def saved(tmp_path):
    model = Jamba(JambaArgs.from_preset("tiny")).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def assert_same_logits(a, b):
    ids = torch.randint(3, a.args.vocab_size, (2, 10))
    with torch.no_grad():
        diff = (a(ids).logits - b(ids).logits).abs().max().item()
    assert diff == 0, f"max logit difference {diff}"


def test_round_trip(saved):
    model, path = saved
    assert_same_logits(model, load_pretrained(path))


def test_sharded_round_trip(tmp_path):
    model = Jamba(JambaArgs.from_preset("tiny")).eval()
    model.save_pretrained(tmp_path, max_shard_bytes=100_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())

    assert len(shards) > 2
    assert set(index["weight_map"].values()) == set(shards)
    assert_same_logits(model, load_pretrained(tmp_path))


def test_fused_expert_tensors_load(saved):
    model, path = saved
    state = load_file(path / "model.safetensors")
    prefix = "model.layers.1.feed_forward.experts"
    experts = range(model.args.num_experts)
    gate_up = torch.stack([torch.cat([state.pop(f"{prefix}.{e}.gate_proj.weight"),
                                      state.pop(f"{prefix}.{e}.up_proj.weight")]) for e in experts])
    down = torch.stack([state.pop(f"{prefix}.{e}.down_proj.weight") for e in experts])
    state[f"{prefix}.gate_up_proj"], state[f"{prefix}.down_proj"] = gate_up, down
    save_file(state, path / "model.safetensors")

    assert_same_logits(model, load_pretrained(path))


def test_bf16_load(saved):
    model, path = saved
    loaded = load_pretrained(path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].mamba.A_log.dtype == torch.bfloat16


def test_missing_shard(tmp_path):
    Jamba(JambaArgs.from_preset("tiny")).save_pretrained(tmp_path, max_shard_bytes=100_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shards listed in .* are missing: .*{victim.name}"):
        load_pretrained(tmp_path)


def test_truncated_file(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors as safetensors"):
        load_pretrained(path)


def test_wrong_shape_missing_and_unknown_keys_listed_together(saved):
    _, path = saved
    state = load_file(path / "model.safetensors")
    state["model.layers.0.mamba.D"] = torch.ones(3)
    del state["model.layers.2.mamba.x_proj.weight"]
    state["model.layers.9.mamba.surprise"] = torch.ones(1)
    save_file(state, path / "model.safetensors")

    with pytest.raises(CheckpointError) as error:
        load_pretrained(path)
    message = str(error.value)
    assert "missing (1): ['model.layers.2.mamba.x_proj.weight']" in message
    assert "unexpected (1): ['model.layers.9.mamba.surprise']" in message
    assert "model.layers.0.mamba.D: checkpoint [3], model [128]" in message


def test_pickle_weights_are_not_read(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    torch.save({}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"found \['pytorch_model.bin'\], which are not read"):
        load_pretrained(path)


def test_missing_config(saved):
    _, path = saved
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_pretrained(path)


@pytest.mark.parametrize("field, value, message", [
    ("num_attention_heads", 5, r"num_attention_heads \(5\) must divide hidden_size \(64\)"),
    ("num_experts_per_tok", 9, r"num_experts_per_tok \(9\) must be between 1 and num_experts \(4\)"),
    ("attn_layer_offset", 7, r"attn_layer_offset must be in \[0, attn_layer_period=4\), got 7"),
    ("hidden_size", -1, r"hidden_size must be a positive integer, got -1"),
    ("model_type", "llama", r"model_type must be 'jamba', got 'llama'"),
])
def test_bad_config_values(saved, field, value, message):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config[field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_pretrained(path)
