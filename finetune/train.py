"""The training loop shared by base training (`finetune/embedded.py`) and LoRA fine-tuning.

Plain PyTorch: no Ray here. A Ray Train worker builds its model (bare, or wrapped in peft or DDP), its data and a
`TrainConfig`, then calls `train_steps`. Metrics come back through the `on_log` callback, so the worker can forward
them to `ray.train.report`.

Data are prompt/completion records (`{"prompt": "382+519=", "completion": "901"}`, the JSONL format of
`finetune/arith.py`). `collate` turns a list of them into a right-padded batch whose labels are -100 on the prompt and
the padding, so the loss covers the completion and its eos only.

Loss = LM loss + coef * router load-balancing loss (Switch Transformer), with coef taken from the model's
`router_aux_loss_coef` unless the config sets it. The optimizer sees only parameters with `requires_grad`, so a
LoRA-wrapped model trains its adapters and nothing else.

Limitations: one optimizer step per batch (no gradient accumulation); the learning-rate schedule is a pure function
of the step, so resuming needs only the step number and the optimizer state.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jamba.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4  # the cosine schedule ends here
    warmup_steps: int = 100
    weight_decay: float = 0.1  # applied to matrices only, never to norms, biases, A_log or D
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    aux_loss_coef: float | None = None  # None: the model's router_aux_loss_coef
    log_every: int = 50
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"lr must be positive and min_lr in [0, lr], got lr={self.lr}, min_lr={self.min_lr}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.aux_loss_coef is not None and self.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be >= 0 or None, got {self.aux_loss_coef}")


@dataclass
class StepLog:
    """Means over the steps since the previous log."""

    step: int  # optimizer steps done so far
    loss: float
    lm_loss: float
    aux_loss: float
    lr: float
    grad_norm: float  # before clipping
    tokens_per_s: float  # completion tokens (those with a label) per second
    elapsed_s: float


def encode_record(tokenizer: Tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    """Return the ids of prompt + completion + eos and the number of prompt ids."""
    prompt_ids = tokenizer.encode(prompt)
    return [*prompt_ids, *tokenizer.encode(completion), tokenizer.eos_id], len(prompt_ids)


def collate(records: Sequence[dict], tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """Tokenize prompt/completion records into a right-padded batch.

    Returns input_ids and attention_mask (B, L) and labels (B, L), aligned with input_ids (the loss shifts them):
    the completion ids and eos, -100 elsewhere.
    """
    if not records:
        raise ValueError("records must not be empty")
    encoded = []
    for record in records:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            raise ValueError(f"a record needs string 'prompt' and 'completion' fields, got {record!r}")
        encoded.append(encode_record(tokenizer, record["prompt"], record["completion"]))

    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(encoded), length, dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def shuffled_batches(records: Sequence[dict], tokenizer: Tokenizer, batch_size: int,
                     seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches forever: each pass over the records in a new order drawn from `seed`."""
    if len(records) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} records, got {len(records)}")
    rng = random.Random(seed)
    order = list(range(len(records)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([records[i] for i in order[start:start + batch_size]], tokenizer)


def model_args(model: torch.nn.Module):
    """Return the `JambaArgs` of a Jamba model, also through DDP (`.module`) or peft (`.base_model.model`) wrappers."""
    for _ in range(4):
        if hasattr(model, "args") and hasattr(model.args, "router_aux_loss_coef"):
            return model.args
        model = getattr(model, "module", None) or getattr(model, "base_model", None) or getattr(model, "model", None)
        if model is None:
            break
    raise TypeError("cannot find the JambaArgs of the model (looked through .module, .base_model and .model)")


def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                 aux_loss_coef: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (total, lm_loss, aux_loss): total = lm_loss + coef * aux_loss.

    lm_loss is the mean next-token cross-entropy over the labelled tokens; aux_loss is the router load-balancing
    loss (zero for a model without experts). coef defaults to the model's router_aux_loss_coef.
    """
    if aux_loss_coef is None:
        aux_loss_coef = model_args(model).router_aux_loss_coef
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1]  # position t predicts token t+1
    labels = batch["labels"][:, 1:]
    lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                              ignore_index=IGNORE_INDEX)
    aux_loss = out.aux_loss if out.aux_loss is not None else lm_loss.new_zeros(())
    return lm_loss + aux_loss_coef * aux_loss, lm_loss, aux_loss


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr at config.steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices (embeddings, projections, experts) only."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)


def train_steps(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], config: TrainConfig,
                optimizer: torch.optim.Optimizer | None = None, on_log: Callable[[StepLog], None] | None = None,
                start_step: int = 0) -> list[StepLog]:
    """Train until config.steps optimizer steps are done (counting from start_step) or the batches run out.

    Returns the logs made every config.log_every steps (and at the last step); each is also passed to on_log.
    """
    if not 0 <= start_step <= config.steps:
        raise ValueError(f"start_step must be in [0, steps={config.steps}], got {start_step}")
    torch.manual_seed(config.seed)
    optimizer = optimizer or make_optimizer(model, config)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = next(p.device for p in params)
    model.train()

    logs: list[StepLog] = []
    sums = dict(loss=0.0, lm_loss=0.0, aux_loss=0.0, grad_norm=0.0, tokens=0.0)
    since_log, started, interval_start = 0, time.perf_counter(), time.perf_counter()
    step = start_step
    iterator = iter(batches)
    while step < config.steps:
        batch = next(iterator, None)
        if batch is None:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr

        total, lm_loss, aux_loss = compute_loss(model, batch, config.aux_loss_coef)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip else float("inf"))
        optimizer.step()
        step += 1

        since_log += 1
        sums["loss"] += total.item()
        sums["lm_loss"] += lm_loss.item()
        sums["aux_loss"] += aux_loss.item()
        sums["grad_norm"] += grad_norm.item()
        sums["tokens"] += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if step % config.log_every == 0 or step == config.steps:
            now = time.perf_counter()
            record = StepLog(step=step, lr=lr, tokens_per_s=sums["tokens"] / max(now - interval_start, 1e-9),
                             elapsed_s=now - started,
                             **{k: sums[k] / since_log for k in ("loss", "lm_loss", "aux_loss", "grad_norm")})
            logs.append(record)
            logger.info("step %d/%d  loss %.4f  lm %.4f  aux %.4f  lr %.2e  grad_norm %.2f  %.0f tok/s  %.0fs",
                        record.step, config.steps, record.loss, record.lm_loss, record.aux_loss, record.lr,
                        record.grad_norm, record.tokens_per_s, record.elapsed_s)
            if on_log is not None:
                on_log(record)
            sums = dict.fromkeys(sums, 0.0)
            since_log, interval_start = 0, now
    model.eval()
    return logs
