"""Generated arithmetic problems: the checkable task of the embedded model.

A problem is a prompt such as "382+519=" and its completion "901". The model is trained to write the
completion and then the tokenizer's eos token. Since the tokenizer gives every digit its own token, a
problem is a short sequence of single digits and operators, and an answer is right or wrong with no
judgement involved (exact match).

Base training uses addition and multiplication; subtraction (with a >= b, so answers are never negative)
is held out so that the fine-tuning demo has something new to teach with LoRA.

Train and eval never overlap, for any seed: a problem belongs to the eval split iff a hash of its text
falls in a fixed 10% bucket. `a+b` and `b+a` (likewise for `*`) hash the same, so a model cannot see
the mirror image of an eval problem during training.

The JSONL written by `write_jsonl` is the fine-tuning data format: one `{"prompt": ..., "completion": ...}`
per line, the completion without eos (whoever tokenizes appends it, as `encode_problem` does).

    python -m finetune.arith --ops sub --split train -n 20000 --seed 0 --output data.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from jamba.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
WORDS = {"add": "plus", "sub": "minus", "mul": "times"}
COMMUTATIVE = frozenset({"add", "mul"})
BASE_OPS = ("add", "mul")
SPLITS = ("train", "eval")
EVAL_PERCENT = 10
MAX_DIGITS = 9


@dataclass(frozen=True)
class TaskSpec:
    """Operations to generate and the maximum number of digits of each operand, as (left, right).

    The defaults are sums of numbers up to 3 digits and products of a 2-digit by a 1-digit number.
    The embedded model trains on addition only: with this product range a 2.1M-parameter model reached 99.6%
    held-out exact match on sums but only 64.8% on products after 30 minutes of CPU training.
    """

    ops: tuple[str, ...] = BASE_OPS
    add_digits: tuple[int, int] = (3, 3)
    sub_digits: tuple[int, int] = (3, 3)
    mul_digits: tuple[int, int] = (2, 1)

    def __post_init__(self) -> None:
        if isinstance(self.ops, str) or not self.ops:
            raise ValueError(f"ops must be a non-empty tuple of {sorted(SYMBOLS)}, got {self.ops!r}")
        object.__setattr__(self, "ops", tuple(self.ops))
        unknown = [op for op in self.ops if op not in SYMBOLS]
        if unknown or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops must be distinct names from {sorted(SYMBOLS)}, got {self.ops!r}")
        for name in ("add_digits", "sub_digits", "mul_digits"):
            digits = tuple(getattr(self, name))
            if len(digits) != 2 or not all(type(d) is int and 1 <= d <= MAX_DIGITS for d in digits):
                raise ValueError(
                    f"{name} must be two integers in [1, {MAX_DIGITS}] (left, right operand), got {digits!r}"
                )
            object.__setattr__(self, name, digits)

    def digits(self, op: str) -> tuple[int, int]:
        return getattr(self, f"{op}_digits")


@dataclass(frozen=True)
class Problem:
    op: str
    a: int
    b: int

    def __post_init__(self) -> None:
        if self.op not in SYMBOLS:
            raise ValueError(f"op must be one of {sorted(SYMBOLS)}, got {self.op!r}")
        if self.a < 0 or self.b < 0:
            raise ValueError(f"operands must be non-negative, got a={self.a}, b={self.b}")
        if self.op == "sub" and self.a < self.b:
            raise ValueError(f"subtraction requires a >= b so the result is non-negative, got a={self.a}, b={self.b}")

    @property
    def answer(self) -> int:
        if self.op == "add":
            return self.a + self.b
        if self.op == "sub":
            return self.a - self.b
        return self.a * self.b

    @property
    def prompt(self) -> str:
        return f"{self.a}{SYMBOLS[self.op]}{self.b}="

    @property
    def completion(self) -> str:
        return str(self.answer)


def split_of(problem: Problem) -> str:
    """Return "eval" for the fixed 10% of problems held out of training, and "train" for the rest."""
    a, b = problem.a, problem.b
    if problem.op in COMMUTATIVE:
        a, b = min(a, b), max(a, b)
    key = f"{a}{SYMBOLS[problem.op]}{b}=".encode("ascii")
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 100
    return "eval" if bucket < EVAL_PERCENT else "train"


def _operand(rng: random.Random, max_digits: int) -> int:
    # Draw the length first, then the value: uniform values would make nine in ten 3-digit numbers and
    # leave short operands (and the carries they produce) rare.
    length = rng.randint(1, max_digits)
    low = 0 if length == 1 else 10 ** (length - 1)
    return rng.randrange(low, 10**length)


def _sample(spec: TaskSpec, rng: random.Random) -> Problem:
    op = rng.choice(spec.ops)
    left, right = spec.digits(op)
    a, b = _operand(rng, left), _operand(rng, right)
    if op == "sub" and a < b:
        a, b = b, a
    return Problem(op, a, b)


def generate(spec: TaskSpec, split: str, n: int, seed: int) -> list[Problem]:
    """Draw `n` problems of `split`, with replacement. The same arguments give the same problems."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")

    rng = random.Random(seed)
    problems: list[Problem] = []
    # A split contains about 10% (eval) or 90% (train) of the problem space, so running out of attempts
    # means that the spec leaves the split nearly empty.
    attempts = 1000 + 100 * n
    while len(problems) < n:
        if attempts == 0:
            raise ValueError(
                f"spec {spec} has too few {split} problems to draw {n}. Allow more digits or more operations."
            )
        attempts -= 1
        problem = _sample(spec, rng)
        if split_of(problem) == split:
            problems.append(problem)
    return problems


def encode_problem(tokenizer: Tokenizer, problem: Problem) -> tuple[list[int], int]:
    """Return the ids of prompt + completion + eos, and the number of prompt ids (excluded from the loss)."""
    prompt = tokenizer.encode(problem.prompt)
    return [*prompt, *tokenizer.encode(problem.completion), tokenizer.eos_id], len(prompt)


def exact_match(problems: Sequence[Problem], outputs: Sequence[str]) -> float:
    """Return the fraction of outputs equal to their completion.

    An output is the generated text up to eos, decoded without special tokens.
    """
    if len(problems) != len(outputs):
        raise ValueError(f"got {len(problems)} problems but {len(outputs)} outputs")
    if not problems:
        raise ValueError("problems must not be empty")
    return sum(p.completion == out for p, out in zip(problems, outputs)) / len(problems)


def write_jsonl(path: str | os.PathLike[str], problems: Iterable[Problem]) -> int:
    """Write one `{"prompt", "completion"}` record per line and return the number written."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for problem in problems:
            f.write(json.dumps({"prompt": problem.prompt, "completion": problem.completion}) + "\n")
            count += 1
    return count


_FRAMING = (
    "Arithmetic problems are written as a question and an answer.",
    "Each digit of a number is read on its own, from left to right.",
    "Add the numbers to find the sum, and multiply them to find the product.",
    "Subtract the smaller number from the larger one to find the difference.",
    "The answer follows the equals sign.",
    "Check the answer by working the problem again.",
)


def corpus_for_tokenizer(spec: TaskSpec, n: int, seed: int = 0) -> list[str]:
    """Return lines to train the tokenizer on: `n` solved problems, some also in words, and a few sentences.

    The problems alone would teach no merges (digits never merge, and operators stand apart), so a little
    English gives the vocabulary some ordinary word pieces.
    """
    problems = generate(spec, "train", n, seed)
    lines = [p.prompt + p.completion for p in problems]
    lines += [f"What is {p.a} {WORDS[p.op]} {p.b}? The answer is {p.answer}." for p in problems[::4]]
    lines += _FRAMING
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.arith", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=sorted(SYMBOLS), default=list(BASE_OPS))
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("-n", type=int, default=20000, help="number of problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, metavar="FILE")
    parser.add_argument(
        "--tokenizer-corpus",
        action="store_true",
        help="write plain text for `python -m jamba.tokenizer train` instead of JSONL",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = TaskSpec(ops=tuple(args.ops))
        if args.tokenizer_corpus:
            lines = corpus_for_tokenizer(spec, args.n, args.seed)
            Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
            count = len(lines)
        else:
            count = write_jsonl(args.output, generate(spec, args.split, args.n, args.seed))
    except ValueError as e:
        parser.error(str(e))
    logger.info("wrote %s lines to %s", count, args.output)


if __name__ == "__main__":
    main()
