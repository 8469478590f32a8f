"""The model shipped in jamba/default: it loads, does its arithmetic, and is a valid transformers checkpoint."""

import dataclasses
import json

import pytest
import torch

from finetune.arith import generate as generate_problems
from finetune.evaluate import answer, load_task
from jamba.generate import left_pad
from jamba.model import Jamba, default_model_dir
from jamba.tokenizer import Tokenizer

MODEL_DIR = default_model_dir()


@pytest.fixture(scope="module")
def model():
    return Jamba.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(MODEL_DIR)


def held_out(op, n, seed=123):
    spec = load_task(MODEL_DIR)
    return generate_problems(dataclasses.replace(spec, ops=(op,)), "eval", n, seed)


def test_files_and_size():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
    assert total < 50e6, f"embedded model is {total / 1e6:.1f} MB"
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "jamba"
    assert config["num_experts"] >= 4
    assert config["num_experts_per_tok"] == 2


def test_architecture_is_hybrid_moe(model):
    schedule = model.args.layer_schedule()
    assert sum(k.mixer == "attention" for k in schedule) >= 1
    assert sum(k.mixer == "mamba" for k in schedule) >= 3
    assert sum(k.has_experts for k in schedule) >= 1
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 12e6


def test_answers_held_out_additions(model, tokenizer):
    problems = held_out("add", 50)

    outputs = answer(model, tokenizer, problems)

    right = sum(out == p.completion for p, out in zip(problems, outputs))
    wrong = [(p.prompt, p.completion, out) for p, out in zip(problems, outputs) if out != p.completion]
    assert right >= 45, f"{right}/50 correct; wrong: {wrong[:5]}"


def test_does_not_know_subtraction(model, tokenizer):
    problems = held_out("sub", 50)

    outputs = answer(model, tokenizer, problems)

    right = sum(out == p.completion for p, out in zip(problems, outputs))
    assert right <= 10, f"{right}/50 subtractions correct, but subtraction is held out of training"


def test_same_greedy_answers_in_transformers(model, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.JambaForCausalLM.from_pretrained(MODEL_DIR).eval()
    problems = held_out("add", 10) + held_out("sub", 10)
    ours = answer(model, tokenizer, problems)

    prompts = [tokenizer.encode(p.prompt) for p in problems]
    ids, mask = left_pad(prompts, tokenizer.pad_id)
    with torch.no_grad():
        generated = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)[:, ids.shape[1]:]
    theirs = []
    for tokens in generated.tolist():
        ended = tokenizer.eos_id in tokens
        theirs.append(tokenizer.decode(tokens[:tokens.index(tokenizer.eos_id)]) if ended else None)

    assert ours == theirs


def test_tokenizer_loads_in_transformers(tokenizer):
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)

    assert hf_tokenizer("382+519=")["input_ids"] == tokenizer.encode("382+519=")
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id
