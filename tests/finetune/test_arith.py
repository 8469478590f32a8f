import json
import re

import pytest

from finetune.arith import (
    Problem,
    TaskSpec,
    corpus_for_tokenizer,
    encode_problem,
    exact_match,
    generate,
    main,
    split_of,
    write_jsonl,
)
from jamba.tokenizer import Tokenizer, train_tokenizer

ALL_OPS = TaskSpec(ops=("add", "sub", "mul"))
PROMPT = re.compile(r"^(\d+)([+*-])(\d+)=$")


def parse(prompt: str) -> tuple[int, str, int]:
    match = PROMPT.match(prompt)
    assert match, prompt
    return int(match[1]), match[2], int(match[3])


def test_answers_are_correct():
    problems = generate(ALL_OPS, "train", 3000, seed=0)
    assert {p.op for p in problems} == {"add", "sub", "mul"}
    for p in problems:
        a, symbol, b = parse(p.prompt)
        expected = {"+": a + b, "-": a - b, "*": a * b}[symbol]
        assert p.completion == str(expected), p
        assert (p.a, p.b) == (a, b)


def test_examples_format():
    assert (Problem("add", 382, 519).prompt, Problem("add", 382, 519).completion) == ("382+519=", "901")
    assert (Problem("sub", 500, 7).prompt, Problem("sub", 500, 7).completion) == ("500-7=", "493")
    assert (Problem("mul", 12, 9).prompt, Problem("mul", 12, 9).completion) == ("12*9=", "108")


def test_subtraction_is_never_negative():
    for split in ("train", "eval"):
        for p in generate(TaskSpec(ops=("sub",)), split, 2000, seed=1):
            assert p.a >= p.b
            assert p.answer >= 0
            assert not p.completion.startswith("-")
    with pytest.raises(ValueError, match="a >= b"):
        Problem("sub", 3, 5)


def test_operands_respect_digit_limits():
    spec = TaskSpec(ops=("add", "mul"), add_digits=(3, 2), mul_digits=(2, 1))
    problems = generate(spec, "train", 4000, seed=2)
    limits = {"add": (999, 99), "mul": (99, 9)}
    for p in problems:
        assert p.a <= limits[p.op][0], p
        assert p.b <= limits[p.op][1], p
    assert any(p.a < 10 for p in problems if p.op == "add"), "1-digit operands must appear"
    assert any(p.a >= 100 for p in problems if p.op == "add")


def test_default_spec_holds_subtraction_out():
    assert TaskSpec().ops == ("add", "mul")
    assert {p.op for p in generate(TaskSpec(), "train", 500, seed=0)} == {"add", "mul"}


def test_train_and_eval_are_disjoint_across_seeds():
    train = {p.prompt for seed in range(3) for p in generate(ALL_OPS, "train", 5000, seed)}
    evaluation = {p.prompt for seed in range(3) for p in generate(ALL_OPS, "eval", 2000, seed)}
    assert train and evaluation
    assert not train & evaluation


def test_mirrored_problems_share_a_split():
    for a in range(100):
        for b in range(100):
            for op in ("add", "mul"):
                assert split_of(Problem(op, a, b)) == split_of(Problem(op, b, a))


def test_eval_split_is_about_ten_percent():
    problems = [Problem("sub", a, b) for a in range(1000) for b in range(0, a + 1, 7)]
    share = sum(split_of(p) == "eval" for p in problems) / len(problems)
    assert 0.09 < share < 0.11, share


def test_generate_returns_problems_of_the_requested_split():
    for split in ("train", "eval"):
        assert all(split_of(p) == split for p in generate(ALL_OPS, split, 1000, seed=3))


def test_generate_is_deterministic():
    assert generate(ALL_OPS, "train", 200, seed=7) == generate(ALL_OPS, "train", 200, seed=7)
    assert generate(ALL_OPS, "train", 200, seed=7) != generate(ALL_OPS, "train", 200, seed=8)
    assert generate(ALL_OPS, "eval", 0, seed=7) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ops": ()}, r"ops must be a non-empty tuple"),
        ({"ops": ("add", "div")}, r"ops must be distinct names from \['add', 'mul', 'sub'\], got \('add', 'div'\)"),
        ({"ops": ("add", "add")}, r"ops must be distinct"),
        ({"ops": "add"}, r"ops must be a non-empty tuple"),
        ({"add_digits": (0, 3)}, r"add_digits must be two integers in \[1, 9\] .* got \(0, 3\)"),
        ({"mul_digits": (2,)}, r"mul_digits must be two integers"),
        ({"sub_digits": (3, 10)}, r"sub_digits .* got \(3, 10\)"),
    ],
)
def test_task_spec_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskSpec(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "test"}, r"split must be one of \('train', 'eval'\), got 'test'"),
        ({"n": -1}, r"n must be an integer >= 0, got -1"),
        ({"n": 2.5}, r"n must be an integer >= 0, got 2.5"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    args = {"spec": TaskSpec(), "split": "train", "n": 10, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(**args)


def test_write_jsonl_records(tmp_path):
    problems = [Problem("add", 382, 519), Problem("sub", 10, 3)]
    path = tmp_path / "data.jsonl"
    assert write_jsonl(path, problems) == 2
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"prompt": "382+519=", "completion": "901"},
        {"prompt": "10-3=", "completion": "7"},
    ]


def test_corpus_trains_usable_tokenizer():
    corpus = corpus_for_tokenizer(ALL_OPS, 500)
    assert "The answer follows the equals sign." in corpus
    assert any(re.fullmatch(r"\d+[+*-]\d+=\d+", line) for line in corpus)
    assert any(line.startswith("What is ") for line in corpus)

    tok = Tokenizer(train_tokenizer(corpus, vocab_size=400))
    assert tok.vocab_size > 259, "the English lines must give some merges"

    problem = Problem("add", 382, 519)
    ids, prompt_len = encode_problem(tok, problem)
    assert prompt_len == len("382+519=")
    assert len(ids) == len("382+519=") + len("901") + 1
    assert ids[-1] == tok.eos_id == 2
    assert tok.decode(ids[:prompt_len]) == "382+519="
    assert tok.decode(ids[prompt_len:]) == "901"


def test_exact_match():
    problems = [Problem("add", 1, 2), Problem("mul", 12, 3), Problem("sub", 9, 9)]
    assert exact_match(problems, ["3", "36", "0"]) == 1.0
    assert exact_match(problems, ["3", "35", "0 "]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="got 3 problems but 2 outputs"):
        exact_match(problems, ["3", "36"])


def test_cli_writes_requested_split(tmp_path):
    out = tmp_path / "data.jsonl"
    main(["--ops", "sub", "--split", "eval", "-n", "300", "--seed", "0", "--output", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 300
    for record in records:
        a, symbol, b = parse(record["prompt"])
        assert symbol == "-"
        assert a >= b
        assert record["completion"] == str(a - b)
        assert split_of(Problem("sub", a, b)) == "eval"


def test_cli_writes_tokenizer_corpus(tmp_path):
    out = tmp_path / "corpus.txt"
    main(["--tokenizer-corpus", "-n", "100", "--output", str(out)])
    assert out.read_text().splitlines() == corpus_for_tokenizer(TaskSpec(), 100)
