"""LoRA adapters on the jamba/ graph: transformers parity, merging, serving helpers, and input checks before Ray."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune import lora, merge
from finetune.adapters import (
    ADAPTER_WEIGHTS,
    LoraSpec,
    apply_lora,
    load_adapter,
    parse_targets,
)
from finetune.arith import TaskSpec, corpus_for_tokenizer, generate, write_jsonl
from jamba.model import Jamba, JambaArgs
from jamba.tokenizer import Tokenizer, train_tokenizer
from serve.adapters import adapter_rows, load_adapters

MAX_POSITIONS = 64


def make_model_dir(path, seed: int = 0):
    """Save a tiny Jamba and an arithmetic tokenizer to path; layers 1 and 3 are MoE, layer 1 is attention."""
    tokenizer = Tokenizer(train_tokenizer(corpus_for_tokenizer(TaskSpec(ops=("add", "sub", "mul")), 300),
                                          vocab_size=300))
    torch.manual_seed(seed)
    model = Jamba(JambaArgs.from_preset("tiny", vocab_size=tokenizer.vocab_size,
                                        max_position_embeddings=MAX_POSITIONS))
    model.save_pretrained(path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny"))


def randomize_adapter(peft_model, seed: int = 1):
    """Give every trainable tensor random values, so that the adapter changes the output (lora_B starts at 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return peft_model


def input_ids(vocab_size: int = 300):
    ids = torch.randint(3, vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


@pytest.mark.parametrize("train_router", [False, True])
def test_adapter_matches_transformers_logits(model_dir, tmp_path, train_router):
    from peft import PeftModel
    from transformers import JambaForCausalLM

    ours = randomize_adapter(apply_lora(Jamba.from_pretrained(model_dir), LoraSpec(train_router=train_router),
                                        base_model_path=str(model_dir))).eval()
    ours.save_pretrained(str(tmp_path / "adapter"))
    saved = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert all(key.startswith("base_model.model.model.layers.") for key in saved)
    assert any(".mamba.in_proj.lora_A" in key for key in saved) and any(".self_attn.q_proj.lora_B" in key
                                                                          for key in saved)
    assert any(key.endswith("feed_forward.router.weight") for key in saved) == train_router

    theirs = PeftModel.from_pretrained(JambaForCausalLM.from_pretrained(model_dir), str(tmp_path / "adapter")).eval()
    ids, mask = input_ids()
    with torch.no_grad():
        base = Jamba.from_pretrained(model_dir)(ids, attention_mask=mask).logits
        expected = ours(ids, attention_mask=mask).logits
        got = theirs(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    difference = (expected - got)[real].abs().max().item()
    assert difference < 1e-4, f"max |ours - transformers| = {difference}"
    assert (expected - base)[real].abs().max() > 1e-2, "the adapter must change the output for the test to mean much"


@pytest.mark.parametrize("targets", ["in_proj,q_proj,gate_proj", "experts.gate_proj,experts.up_proj,"
                                                                  "experts.down_proj,o_proj"])
def test_merge_equals_unmerged(model_dir, tmp_path, targets):
    from transformers import JambaForCausalLM

    peft_model = randomize_adapter(apply_lora(Jamba.from_pretrained(model_dir),
                                              LoraSpec(targets=parse_targets(targets), train_router=True))).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merge.main(["--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--output",
                str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    ids, mask = input_ids()
    with torch.no_grad():
        unmerged = peft_model(ids, attention_mask=mask).logits
        merged = Jamba.from_pretrained(tmp_path / "merged")(ids, attention_mask=mask).logits
        theirs = JambaForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (unmerged - merged)[real].abs().max().item() < 1e-4
    assert (merged - theirs)[real].abs().max().item() < 1e-4


def test_expert_adapter_rejected_by_transformers(model_dir, tmp_path):
    """The documented limitation: transformers 5 fuses the experts, so per-expert LoRA has nothing to attach to."""
    from peft import PeftModel
    from transformers import JambaForCausalLM

    spec = LoraSpec(targets=("experts.gate_proj", "experts.up_proj", "experts.down_proj"))
    apply_lora(Jamba.from_pretrained(model_dir), spec).save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="not found"):
        PeftModel.from_pretrained(JambaForCausalLM.from_pretrained(model_dir), str(tmp_path / "adapter"))


def test_load_adapter_strict_keys(model_dir, tmp_path):
    peft_model = randomize_adapter(apply_lora(Jamba.from_pretrained(model_dir), LoraSpec())).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    loaded = load_adapter(Jamba.from_pretrained(model_dir), tmp_path / "adapter")
    ids, _ = input_ids()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, peft_model(ids).logits, atol=1e-6)

    weights = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    with pytest.raises(ValueError, match="missing \\(1\\)"):
        load_adapter(Jamba.from_pretrained(model_dir), tmp_path / "adapter")
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        load_adapter(Jamba.from_pretrained(model_dir), tmp_path)


def test_adapters_dir_mixed_batch(model_dir, tmp_path):
    singles = {}
    for seed, name in enumerate(["sub", "add"], start=1):
        spec = LoraSpec(targets=("in_proj", "q_proj") if name == "sub" else ("out_proj", "v_proj"))
        peft_model = randomize_adapter(apply_lora(Jamba.from_pretrained(model_dir), spec), seed).eval()
        peft_model.save_pretrained(str(tmp_path / "adapters" / name))
        singles[name] = peft_model
    (tmp_path / "adapters" / "notes").mkdir()

    # The service's loader (serve/adapters.py) reads what apply_lora saved.
    served, names = load_adapters(Jamba.from_pretrained(model_dir), tmp_path / "adapters")
    assert names == ("add", "sub")
    ids, mask = input_ids()
    with torch.no_grad():
        base = Jamba.from_pretrained(model_dir)(ids, attention_mask=mask).logits
        expected = {name: singles[name](ids, attention_mask=mask).logits for name in singles}
        for name in names:
            served.set_adapter(name)
            assert torch.allclose(served(ids, attention_mask=mask).logits, expected[name], atol=1e-5)
        mixed = served(ids, attention_mask=mask, adapter_names=adapter_rows(["sub", None])).logits
    assert torch.allclose(mixed[0], expected["sub"][0], atol=1e-5)
    assert torch.allclose(mixed[1], base[1], atol=1e-5)


@pytest.mark.parametrize("name, reason", [
    ("conv1d", "depthwise convolution"),
    ("dt_proj", "reads dt_proj.weight directly"),
    ("router", "pass --train-router"),
    ("embed_tokens", "token embeddings stay frozen"),
    ("input_layernorm", "RMSNorm scale vector"),
    ("A_log", "not a Linear layer"),
    ("wq", "unknown target module 'wq'; valid targets are in_proj, x_proj"),
])
def test_targets_rejected_with_reason(name, reason):
    with pytest.raises(ValueError, match=f"'{name}'.*{reason}" if "unknown" not in reason else reason):
        parse_targets(f"q_proj,{name}")


def test_targets_sparse_layers_warn(model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="finetune.adapters"):
        apply_lora(Jamba.from_pretrained(model_dir), LoraSpec(targets=("q_proj", "v_proj")))
    assert "reach only 1 of 4 layers; layers [0, 2, 3] are left untouched" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune.adapters"):
        apply_lora(Jamba.from_pretrained(model_dir), LoraSpec())
    assert "untouched" not in caplog.text


# Every bad input fails in the driver, before Ray starts; `main` turns the error into a usage error (exit 2).
@pytest.fixture
def job_dir(model_dir, tmp_path):
    write_jsonl(tmp_path / "sub.jsonl", generate(TaskSpec(ops=("sub",)), "train", 40, 0))
    return tmp_path


def run_main(job_dir, model_dir, *extra, data="sub.jsonl", output="out"):
    argv = ["--model", str(model_dir), "--data", str(job_dir / data), "--output", str(job_dir / output),
            "--workers", "2", "--batch-size", "4", "--steps", "3", *extra]
    with pytest.raises(SystemExit) as exit_info:
        lora.main(argv)
    return exit_info.value.code


@pytest.mark.parametrize("extra, data, message", [
    ((), "missing.jsonl", "does not exist"),
    ((), "empty.jsonl", "contains no records"),
    ((), "no_completion.jsonl", "record 1 has no string 'completion' field"),
    (("--target-modules", "q_proj,conv1d"), "sub.jsonl", "target module 'conv1d' cannot take LoRA"),
    (("--target-modules", "q_proj,attn"), "sub.jsonl", "unknown target module 'attn'; valid targets are"),
    (("--seq-len", "65"), "sub.jsonl", "--seq-len 65 exceeds the model's max_position_embeddings \\(64\\)"),
    (("--seq-len", "8"), "sub.jsonl", "records are longer than --seq-len 8 tokens"),
    (("--fsdp",), "sub.jsonl", "--fsdp is not implemented"),
    (("--epochs", "2"), "sub.jsonl", "give --steps or --epochs, not both"),
    (("--batch-size", "40"), "sub.jsonl", "fewer than one global batch"),
])
def test_main_bad_input_fails_before_ray(job_dir, model_dir, capsys, extra, data, message):
    import ray

    (job_dir / "empty.jsonl").write_text("", encoding="utf-8")
    (job_dir / "no_completion.jsonl").write_text('{"prompt": "1-1=", "completion": "0"}\n{"prompt": "2-1="}\n',
                                                 encoding="utf-8")
    assert run_main(job_dir, model_dir, *extra, data=data) == 2
    stderr = capsys.readouterr().err
    assert re_search(message, stderr), stderr
    assert not ray.is_initialized()
    assert not (job_dir / "out").exists()


def re_search(pattern, text):
    import re

    return re.search(pattern, text.replace("\n", " ")) is not None


def test_main_output_dir_conflicts(job_dir, model_dir, capsys):
    import ray

    options = lora.build_parser().parse_args(["--model", str(model_dir), "--data", str(job_dir / "sub.jsonl"),
                                              "--output", str(job_dir / "out"), "--steps", "3", "--batch-size", "4"])
    job, identity = lora.plan(options)
    (job_dir / "out").mkdir()
    (job_dir / "out" / lora.RUN_FILE).write_text(json.dumps(identity), encoding="utf-8")

    assert run_main(job_dir, model_dir, "--lr", "0.01") == 2
    assert re_search("contains a different run \\(lr: 0.001 -> 0.01\\)", capsys.readouterr().err)
    assert run_main(job_dir, model_dir, "--lr", "0.01", "--resume") == 2
    assert re_search("contains a different run", capsys.readouterr().err)
    assert run_main(job_dir, model_dir) == 2
    assert re_search("already contains this run; pass --resume", capsys.readouterr().err)
    assert run_main(job_dir, model_dir, "--resume", output="elsewhere") == 2
    assert re_search("contains no run to resume", capsys.readouterr().err)
    (job_dir / "stray").mkdir()
    (job_dir / "stray" / "notes.txt").write_text("mine", encoding="utf-8")
    assert run_main(job_dir, model_dir, output="stray") == 2
    assert re_search("is not empty and contains no run.json", capsys.readouterr().err)
    assert not ray.is_initialized()
