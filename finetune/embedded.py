"""Reproduce the embedded default model (`jamba/default/`) from scratch: data, tokenizer, training, checkpoint.

    python -m finetune.embedded --output jamba/default

One seeded run on a CPU, with nothing downloaded:
1. draw training problems from the train split of `finetune/arith.py` (addition only: subtraction is held out
   for the LoRA fine-tuning demo);
2. train a byte-level BPE tokenizer with one token per digit on solved problems and a few sentences;
3. build a small Jamba (Mamba and attention layers, MoE every other layer) and train every parameter with
   `finetune/train.py`, router load-balancing loss included;
4. save it in the Hugging Face layout (config.json, model.safetensors, tokenizer.json, tokenizer_config.json),
   with task.json (the digit ranges) and a README.md holding the recipe and the figures measured on held-out
   problems.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.arith import TaskSpec, corpus_for_tokenizer, generate
from finetune.evaluate import evaluate, format_report, save_task
from finetune.train import StepLog, TrainConfig, shuffled_batches, train_steps
from jamba.model import Jamba, JambaArgs
from jamba.tokenizer import Tokenizer, train_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """Model shape: a point in the design space of `JambaArgs.from_design` (layers, a:m ratio, MoE period, experts,
    top-K), plus the widths."""

    layers: int = 6
    attn_to_mamba: tuple[int, int] = (1, 2)
    expert_period: int = 2
    experts: int = 4
    top_k: int = 2
    hidden_size: int = 128
    intermediate_size: int = 256
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    mamba_d_state: int = 8
    mamba_dt_rank: int = 8
    router_aux_loss_coef: float = 0.01

    def args(self, tokenizer: Tokenizer) -> JambaArgs:
        return JambaArgs.from_design(
            self.layers, self.attn_to_mamba, self.expert_period, self.experts, self.top_k,
            vocab_size=tokenizer.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, mamba_d_state=self.mamba_d_state,
            mamba_dt_rank=self.mamba_dt_rank, router_aux_loss_coef=self.router_aux_loss_coef,
            pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
            max_position_embeddings=512,
        )


@dataclass(frozen=True)
class Recipe:
    # Addition of numbers up to 3 digits: every digit is a token and carries cross the whole answer. Multiplication
    # was tried too and left out: by one digit it has only about 900 distinct training problems, which a model of
    # this size memorises instead of learning the carry (65% held-out exact match after 4000 steps).
    spec: TaskSpec = TaskSpec(ops=("add",), add_digits=(3, 3))
    vocab_size: int = 512
    tokenizer_problems: int = 20000
    shape: Shape = Shape()
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=4000, batch_size=64, lr=2e-3, min_lr=1e-4, warmup_steps=200, weight_decay=0.1, log_every=100))


def training_records(recipe: Recipe, count: int, seed: int) -> list[dict]:
    """Draw `count` train-split problems in the recipe's mix of operations, shuffled."""
    records = [{"prompt": p.prompt, "completion": p.completion}
               for p in generate(recipe.spec, "train", count, seed)]
    random.Random(seed).shuffle(records)
    return records


def build(output: str | Path, recipe: Recipe = Recipe(), seed: int = 0, eval_n: int = 1000,
          check_every: int = 1000) -> dict:
    """Run the whole recipe and write the model to `output`; returns the figures put in its README.

    Every `check_every` steps (0: never) the run also reports exact match on 200 held-out problems per operation,
    drawn with another seed than the final evaluation.
    """
    if "sub" in recipe.spec.ops:
        raise ValueError("subtraction is held out of the embedded model's training: LoRA fine-tuning teaches it")
    output = Path(output)
    torch.manual_seed(seed)
    config = dataclasses.replace(recipe.train, seed=seed)

    tokenizer = Tokenizer(train_tokenizer(corpus_for_tokenizer(recipe.spec, recipe.tokenizer_problems, seed),
                                          vocab_size=recipe.vocab_size))
    records = training_records(recipe, config.steps * config.batch_size, seed)
    logger.info("tokenizer: %d tokens; %d training problems, e.g. %s%s", tokenizer.vocab_size, len(records),
                records[0]["prompt"], records[0]["completion"])

    args = recipe.shape.args(tokenizer)
    # On sequences of about a dozen tokens, the reference scan (a loop over time) trains faster than the chunked one.
    # Both compute the same function, so the saved model loads with the default path.
    model = Jamba(args, scan="ref")
    params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters, layers %s", params / 1e6,
                [f"{k.mixer}{'+moe' if k.has_experts else ''}" for k in args.layer_schedule()])

    def check(log: StepLog) -> None:
        if check_every and log.step % check_every == 0 and log.step < config.steps:
            result = evaluate(model, tokenizer, recipe.spec.ops, 200, seed=seed + 1, spec=recipe.spec)
            model.train()
            logger.info("step %d: held-out exact match %s, smallest expert share / fair %.2f", log.step,
                        {op: f"{100 * acc:.1f}%" for op, acc in result["accuracy"].items()},
                        result["min_load_vs_fair"])

    started = time.perf_counter()
    logs = train_steps(model, shuffled_batches(records, tokenizer, config.batch_size, seed), config, on_log=check)
    train_s = time.perf_counter() - started

    model.save_pretrained(output)
    tokenizer.save(output)
    save_task(recipe.spec, output)
    model = Jamba.from_pretrained(output)

    figures = {"params": params, "train_s": train_s, "threads": torch.get_num_threads(), "logs": logs, "eval": None,
               "size_mb": (output / "model.safetensors").stat().st_size / 1e6}
    if eval_n:
        figures["eval"] = evaluate(model, tokenizer, ("add", "sub"), eval_n, seed=seed, spec=recipe.spec)
        print(format_report(figures["eval"]))
    (output / "README.md").write_text(readme(recipe, args, config, figures, seed), encoding="utf-8")
    logger.info("wrote %s (%.1f MB of weights) after %.0f s of training", output, figures["size_mb"], train_s)
    return figures


def readme(recipe: Recipe, args: JambaArgs, config: TrainConfig, figures: dict, seed: int) -> str:
    spec, shape = recipe.spec, recipe.shape
    schedule = ", ".join(f"{i}: {k.mixer}{' + MoE' if k.has_experts else ''}"
                         for i, k in enumerate(args.layer_schedule()))
    logs = figures["logs"]
    stride = max(1, len(logs) // 8)
    curve = logs[stride - 1::stride]
    if curve[-1] is not logs[-1]:
        curve.append(logs[-1])
    lines = [
        "# The embedded default model",
        "",
        "A small Jamba that does arithmetic, trained from scratch on a CPU by this repository's own code. It answers",
        "prompts such as `382+519=` with `901` and then eos:",
        "",
        "    python -m jamba.generate --prompt \"382+519=\" --prompt \"47*6=\"",
        "",
        "## Reproduce",
        "",
        "    python -m finetune.embedded --output jamba/default" + ("" if seed == 0 else f" --seed {seed}"),
        "",
        f"Seeded (seed {seed}). Training took {figures['train_s'] / 60:.1f} minutes with {figures['threads']} torch "
        f"thread{'s' if figures['threads'] != 1 else ''} on a 2-core CPU shared with other work (an estimated 20 "
        "minutes when the machine is otherwise idle). Runs on other machines or thread counts give a model of the "
        "same quality, not the same bits.",
        "",
        "## Data",
        "",
        f"- {config.steps * config.batch_size} addition problems from the train split of `finetune/arith.py`, "
        "drawn with replacement.",
        f"- Addition of a number of up to {spec.add_digits[0]} digits and one of up to {spec.add_digits[1]}. An "
        "operand's length is drawn first (uniformly), then its value. Answers are written most significant digit "
        "first, as people read them.",
        "- Multiplication by one digit was tried and left out: its 900 or so distinct training problems are "
        "memorised by a model of this size instead of learned (65% held-out exact match after 4000 steps).",
        "- Subtraction is held out: the LoRA fine-tuning demo teaches it.",
        "- The loss covers the answer and eos only, not the prompt.",
        f"- Tokenizer: byte-level BPE, one token per digit, {args.vocab_size} tokens, trained on "
        f"{recipe.tokenizer_problems} solved problems (a quarter also in words) and a few sentences.",
        "",
        "## Model",
        "",
        f"{figures['params'] / 1e6:.2f}M parameters ({figures['size_mb']:.1f} MB in fp32): {args.num_hidden_layers} "
        f"layers, a:m = {shape.attn_to_mamba[0]}:{shape.attn_to_mamba[1]}, MoE every {args.expert_layer_period} "
        f"layers with {args.num_experts} experts, top-{args.num_experts_per_tok}; hidden size {args.hidden_size}, "
        f"MLP/expert size {args.intermediate_size}, {args.num_attention_heads} attention heads "
        f"({args.num_key_value_heads} key/value heads), Mamba d_state {args.mamba_d_state}, expand "
        f"{args.mamba_expand}, d_conv {args.mamba_d_conv}.",
        "",
        f"Layers: {schedule}.",
        "",
        "## Training",
        "",
        f"AdamW (betas {config.betas[0]}, {config.betas[1]}, weight decay {config.weight_decay} on matrices), "
        f"{config.steps} steps of {config.batch_size} problems, learning rate {config.lr:g} after "
        f"{config.warmup_steps} warmup steps, cosine down to {config.min_lr:g}, gradient norm clipped at "
        f"{config.grad_clip:g}; loss = LM loss + {args.router_aux_loss_coef:g} x router load-balancing loss.",
        "",
        "| step | loss | LM loss | aux loss | elapsed |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {log.step} | {log.loss:.4f} | {log.lm_loss:.4f} | {log.aux_loss:.3f} | {log.elapsed_s:.0f} s |"
              for log in curve]
    result = figures["eval"]
    if result is not None:
        num_experts = args.num_experts
        lines += [
            "",
            "## Held-out results",
            "",
            f"`python -m finetune.evaluate --model jamba/default -n {result['n']}`: exact match with greedy decoding "
            f"on {result['n']} problems per operation from the eval split, which training never draws from.",
            "",
            "| operation | exact match |",
            "|---|---:|",
        ]
        lines += [f"| {op} | {100 * acc:.1f}% |" for op, acc in result["accuracy"].items()]
        lines += [
            "",
            f"Expert load over the evaluation sequences (share of top-{args.num_experts_per_tok} assignments; fair "
            f"share {100 / num_experts:.1f}%):",
            "",
            "| layer | " + " | ".join(f"expert {e}" for e in range(num_experts)) + " |",
            "|---|" + "---:|" * num_experts,
        ]
        lines += [f"| {layer} | " + " | ".join(f"{100 * s:.1f}%" for s in shares) + " |"
                  for layer, shares in result["expert_load"].items()]
        lines += ["", f"The least used expert gets {result['min_load_vs_fair']:.2f} of its fair share."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.embedded", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count (quick trials)")
    parser.add_argument("--eval-n", type=int, default=1000, help="held-out problems per operation; 0 skips")
    parser.add_argument("--check-every", type=int, default=500, help="steps between held-out checks; 0 disables")
    # One thread by default: on a small machine shared with other work, OpenMP threads that wait on each other
    # made steps several times slower than a single thread.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    recipe = Recipe()
    if args.steps is not None:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, steps=args.steps))
    try:
        build(args.output, recipe, args.seed, args.eval_n, args.check_every)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
