"""Benchmark LoRA training throughput against transformers + peft on the same weights, adapter and data.

Both sides start from one `bench`-preset checkpoint (vocab 4096, hidden 256, 8 layers, attention at layer 4, MoE
every other layer with 4 experts top-2). They also share one adapter with the default targets of
`finetune/adapters.py` at rank 8, which this project saves and transformers' `JambaForCausalLM` loads with
`PeftModel.from_pretrained`. Each
step is a forward pass, LM loss + router load-balancing loss, backward and an AdamW step, on the same random token
batches, in fp32 on CPU. The first step's loss is printed for both, as a check that they compute the same thing.

    python bench/lora.py [--threads 2] [--batch-size 4] [--seq-len 128] [--steps 3]
"""

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.adapters import LoraSpec, apply_lora  # noqa: E402
from finetune.train import TrainConfig, compute_loss, make_optimizer  # noqa: E402
from jamba.model import Jamba, JambaArgs  # noqa: E402


def transformers_loss(model, batch, coef: float) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    return lm_loss + coef * out.aux_loss


def time_training(loss_fn, model, batches, config: TrainConfig) -> tuple[float, float]:
    """Return (first loss, seconds per step after one warm-up step)."""
    optimizer = make_optimizer(model, config)
    model.train()
    times, first = [], None
    for batch in batches:
        start = time.perf_counter()
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        first = loss.item() if first is None else first
    return first, sum(times[1:]) / len(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation, after one warm-up")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("finetune").setLevel(logging.WARNING)

    from peft import PeftModel
    from transformers import JambaForCausalLM

    torch.manual_seed(0)
    args = JambaArgs.from_preset("bench")
    config = TrainConfig(steps=options.steps + 1, batch_size=options.batch_size, lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(options.steps + 1):
        ids = torch.randint(3, args.vocab_size, (options.batch_size, options.seq_len), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})

    with tempfile.TemporaryDirectory() as path:
        base = Jamba(args)
        base.save_pretrained(Path(path) / "base")
        ours = apply_lora(base, LoraSpec())
        ours.save_pretrained(str(Path(path) / "adapter"))
        theirs = PeftModel.from_pretrained(JambaForCausalLM.from_pretrained(Path(path) / "base"),
                                           str(Path(path) / "adapter"), is_trainable=True)

    coef = args.router_aux_loss_coef
    rows = []
    for name, model, loss_fn in [
        ("this project (jamba/ + peft)", ours, lambda m, b: compute_loss(m, b, coef)[0]),
        ("transformers JambaForCausalLM + peft", theirs, lambda m, b: transformers_loss(m, b, coef)),
    ]:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        first_loss, step_s = time_training(loss_fn, model, batches, config)
        rows.append((name, trainable, first_loss, step_s, options.batch_size * options.seq_len / step_s))

    print(f"\nLoRA training, bench preset, batch {options.batch_size} x {options.seq_len} tokens, fp32, "
          f"threads={options.threads}, torch {torch.__version__}, mean of {options.steps} steps after a warm-up\n")
    print("| implementation | trainable params | first loss | s/step | tokens/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    reference = rows[-1][4]
    for name, trainable, first_loss, step_s, tokens_per_s in rows:
        print(f"| {name} | {trainable:,} | {first_loss:.5f} | {step_s:.3f} | {tokens_per_s:,.0f} | "
              f"{tokens_per_s / reference:.2f}x |")


if __name__ == "__main__":
    main()
