"""LoRA adapters served per request: rows of one batch use different adapters or none."""

import copy

import grpc
import pytest
import torch
from peft import LoraConfig, get_peft_model

from jamba.model import Jamba, JambaArgs
from serve.adapters import load_adapters
from serve.engine import Engine
from serve.proto.jamba.v1 import jamba_pb2, jamba_pb2_grpc
from serve.runner import LocalRunner
from jamba.generate import generate


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    """Two random LoRA adapters on a copy of a tiny model, saved as peft writes them."""
    torch.manual_seed(0)
    base = Jamba(JambaArgs.from_preset("tiny")).eval()
    directory = tmp_path_factory.mktemp("adapters")
    for name, targets in (("math", ["in_proj", "out_proj", "q_proj", "v_proj"]), ("style", ["x_proj", "o_proj"])):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        get_peft_model(copy.deepcopy(base), config).save_pretrained(directory / name)
    return base, directory


def test_mixed_batch_matches_each_adapter_alone(adapters_dir):
    base, directory = adapters_dir
    runner = LocalRunner(copy.deepcopy(base), num_slots=4, max_len=32, adapters_dir=directory)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    chosen = ["math", None, "style"]

    mixed = runner.prefill([0, 1, 2], prompts, chosen)
    step = runner.decode([0, 1, 2], [20, 21, 22])

    reference, _ = load_adapters(copy.deepcopy(base), directory)
    for row, (prompt, adapter, token) in enumerate(zip(prompts, chosen, [20, 21, 22])):
        ids = torch.tensor([prompt + [token]])
        with torch.no_grad():
            if adapter is None:
                with reference.disable_adapter():
                    expected = reference(ids).logits[0]
            else:
                reference.set_adapter(adapter)
                expected = reference(ids).logits[0]
        assert (mixed[row] - expected[-2]).abs().max().item() < 1e-5, f"prefill row {row}"
        assert (step[row] - expected[-1]).abs().max().item() < 1e-5, f"decode row {row}"
    assert not torch.allclose(mixed[0], runner.model(torch.tensor([prompts[0]])).logits[0, -1])
    assert runner.adapters == ("math", "style")


def test_request_selects_adapter_over_grpc(adapters_dir, tokenizer, live_server):
    base, directory = adapters_dir
    model = Jamba(JambaArgs.from_preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    adapted = directory.parent / "adapters-for-tokenizer"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "q_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(model), config).save_pretrained(adapted / "math")
    runner = LocalRunner(copy.deepcopy(model), num_slots=2, max_len=32, adapters_dir=adapted)
    server = live_server(Engine(runner, tokenizer))
    sampling = jamba_pb2.SamplingParams(max_new_tokens=4)

    info = server.stub.GetModelInfo(jamba_pb2.GetModelInfoRequest())
    tuned = server.stub.Generate(jamba_pb2.GenerateRequest(text="12+", sampling=sampling, adapter="math"))
    plain = server.stub.Generate(jamba_pb2.GenerateRequest(text="12+", sampling=sampling))
    with pytest.raises(grpc.RpcError) as unknown:
        server.stub.Generate(jamba_pb2.GenerateRequest(text="12+", sampling=sampling, adapter="poetry"))

    prompt = tokenizer.encode_prompt("12+")
    expected_plain = generate(model, [prompt], max_new_tokens=4)[0].tokens
    assert list(info.adapters) == ["math"]
    assert tuned.usage.completion_tokens == 4
    assert list(plain.token_ids) == expected_plain
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "poetry" in unknown.value.details()
