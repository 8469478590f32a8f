"""Exact-match accuracy on held-out arithmetic problems, per operation, and how the routers spread the tokens.

    python -m finetune.evaluate --model jamba/default --ops add,sub -n 1000

Problems come from the eval split of `finetune/arith.py`, which no training run draws from. The model's outputs are
decoded greedily, in batches, with the KV/SSM cache (`jamba.generate.generate`). An output counts as correct when its
text equals the completion and is followed by eos.

Expert load is measured over the evaluation sequences themselves (prompt, answer and eos, padding excluded): for
each MoE layer, the share of the top-K assignments that go to each expert. Shares sum to 1 per layer, and a fair
share is 1/E.

The digit ranges come from `task.json` in the model directory when there is one (the embedded model writes it), so
that the problems match what the model was trained on; otherwise the defaults of `TaskSpec`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from finetune.arith import SYMBOLS, Problem, TaskSpec, generate as generate_problems
from jamba.generate import generate
from jamba.model import Jamba, default_model_dir
from jamba.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

TASK_FILE = "task.json"


def save_task(spec: TaskSpec, directory: str | Path) -> None:
    """Record the digit ranges a model was trained on, for `load_task`."""
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}
    (Path(directory) / TASK_FILE).write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")


def load_task(directory: str | Path) -> TaskSpec:
    """Return the TaskSpec saved next to a model, or the defaults when the directory has none."""
    file = Path(directory) / TASK_FILE
    if not file.is_file():
        return TaskSpec()
    fields = json.loads(file.read_text(encoding="utf-8"))
    return TaskSpec(**{k: tuple(v) for k, v in fields.items()})


def answer(model: Jamba, tokenizer: Tokenizer, problems: Sequence[Problem], batch_size: int = 500) -> list[str | None]:
    """Return the greedy output for each problem's prompt, or None where the model did not end it with eos."""
    max_new_tokens = max(len(tokenizer.encode(p.completion)) for p in problems) + 1
    outputs: list[str | None] = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        prompts = [tokenizer.encode(p.prompt) for p in chunk]
        for out in generate(model, prompts, max_new_tokens, eos_id=tokenizer.eos_id):
            outputs.append(tokenizer.decode(out.tokens[:-1]) if out.finish_reason == "eos" else None)
    return outputs


@torch.no_grad()
def expert_load(model: Jamba, tokenizer: Tokenizer, problems: Sequence[Problem],
                batch_size: int = 500) -> dict[int, list[float]]:
    """Return {layer index: share of top-K assignments per expert} over the problems' full sequences."""
    args = model.args
    moe_layers = [i for i, kind in enumerate(args.layer_schedule()) if kind.has_experts]
    counts = torch.zeros(len(moe_layers), args.num_experts)
    device = model.lm_head.weight.device
    for start in range(0, len(problems), batch_size):
        sequences = [tokenizer.encode(p.prompt + p.completion) + [tokenizer.eos_id]
                     for p in problems[start:start + batch_size]]
        length = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(sequences), length, dtype=torch.long)
        for row, s in enumerate(sequences):
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        out = model(ids.to(device), attention_mask=mask.to(device))
        real = mask.reshape(-1).bool()
        for layer, logits in enumerate(out.router_logits):
            chosen = torch.topk(logits.float().cpu()[real], args.num_experts_per_tok, dim=-1).indices  # (T, K)
            counts[layer] += torch.bincount(chosen.reshape(-1), minlength=args.num_experts).float()
    shares = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return {layer: shares[row].tolist() for row, layer in enumerate(moe_layers)}


def evaluate(model: Jamba, tokenizer: Tokenizer, ops: Sequence[str] = ("add", "sub"), n: int = 1000,
             seed: int = 0, spec: TaskSpec | None = None) -> dict:
    """Measure exact match on n held-out problems per operation and the expert load over all of them.

    Returns {"accuracy": {op: fraction}, "n": n, "expert_load": {layer: [share per expert]},
    "min_load_vs_fair": smallest share times E (1.0 is perfectly even), "mistakes": {op: [(prompt, expected,
    got)]} (at most 5 per op, got None when there was no eos)}.
    """
    spec = spec or TaskSpec()
    unknown = [op for op in ops if op not in SYMBOLS]
    if not ops or unknown:
        raise ValueError(f"ops must be a non-empty list of {sorted(SYMBOLS)}, got {list(ops)!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")

    model.eval()
    accuracy, mistakes, everything = {}, {}, []
    for op in ops:
        op_spec = TaskSpec(ops=(op,), add_digits=spec.add_digits, sub_digits=spec.sub_digits,
                           mul_digits=spec.mul_digits)
        problems = generate_problems(op_spec, "eval", n, seed)
        outputs = answer(model, tokenizer, problems)
        right = [out == p.completion for p, out in zip(problems, outputs)]
        accuracy[op] = sum(right) / n
        mistakes[op] = [(p.prompt, p.completion, out) for p, out, ok in zip(problems, outputs, right) if not ok][:5]
        everything += problems
        logger.info("%s: %.1f%% exact match on %d held-out problems", op, 100 * accuracy[op], n)

    load = expert_load(model, tokenizer, everything)
    num_experts = model.args.num_experts
    min_share = min((min(shares) for shares in load.values()), default=1.0 / num_experts)
    return {"accuracy": accuracy, "n": n, "expert_load": load, "min_load_vs_fair": min_share * num_experts,
            "mistakes": mistakes}


def format_report(result: dict) -> str:
    """Render an `evaluate` result as two plain-text tables."""
    lines = [f"exact match on {result['n']} held-out problems per operation (greedy)", "", "op    accuracy"]
    lines += [f"{op:<5} {100 * acc:7.1f}%" for op, acc in result["accuracy"].items()]
    for op, wrong in result["mistakes"].items():
        for prompt, expected, got in wrong[:3]:
            lines.append(f"  {op} mistake: {prompt}{got if got is not None else '<no eos>'} (expected {expected})")

    load = result["expert_load"]
    if load:
        num_experts = len(next(iter(load.values())))
        lines += ["", f"expert load: share of top-K assignments (fair share {100 / num_experts:.1f}%)",
                  "layer " + " ".join(f"{'e' + str(e):>6}" for e in range(num_experts))]
        lines += [f"{layer:<5} " + " ".join(f"{100 * s:5.1f}%" for s in shares) for layer, shares in load.items()]
        lines.append(f"smallest share / fair share: {result['min_load_vs_fair']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_dir()), help="checkpoint directory (default: embedded)")
    parser.add_argument("--ops", default="add,sub", help="comma-separated operations from add, mul, sub")
    parser.add_argument("-n", type=int, default=1000, help="held-out problems per operation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    model = Jamba.from_pretrained(args.model)
    tokenizer = Tokenizer.from_file(args.model)
    try:
        result = evaluate(model, tokenizer, ops, args.n, args.seed, load_task(args.model))
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(result, indent=2) if args.json else format_report(result))


if __name__ == "__main__":
    main()
