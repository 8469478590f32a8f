"""The runner interface between the batching engine and a model, and its in-process implementation.

The engine (`serve/engine.py`) owns scheduling: which request occupies which cache slot, when to prefill, decode,
sample and free. A runner owns the model and its cache and does the forward passes. Runner methods are plain
synchronous calls: the engine makes them from one worker thread, one at a time, so an implementation needs no
locking. A runner spread over Ray actors implements the same methods by waiting on its remote calls.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from jamba.generate import left_pad

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSummary:
    """The model facts that GetModelInfo reports."""

    name: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_layers: int
    num_mamba_layers: int
    num_experts: int
    num_experts_per_tok: int


class Runner(Protocol):
    """A model with a fixed pool of `num_slots` cache slots, each holding one sequence of up to `max_len` tokens.

    Logits are returned as float32 on the CPU, one row per slot given, in the order given. B is the number of
    slots in a call and V the vocabulary size.
    """

    summary: ModelSummary
    num_slots: int
    max_len: int
    vocab_size: int
    adapters: tuple[str, ...]  # adapter names a request may select, empty for the base model only

    def prefill(
        self, slots: Sequence[int], prompts: Sequence[Sequence[int]], adapters: Sequence[str | None]
    ) -> torch.Tensor:
        """Run the prompts into empty slots and return the logits of each prompt's last token, (B, V).

        `adapters[i]` selects the adapter of slot `slots[i]` for this prefill and every later decode of it.
        """
        ...

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Append one token to each of the prefilled slots and return the logits after it, (B, V)."""
        ...

    def free(self, slots: Sequence[int]) -> None:
        """Reset the slots so that a later prefill can reuse them."""
        ...

    def take_expert_load(self) -> torch.Tensor | None:
        """Return the tokens routed to each expert since the last call, (MoE layers, E), or None if not tracked."""
        ...


def summarize(args, name: str) -> ModelSummary:
    """Build a ModelSummary from a `jamba.model.JambaArgs`."""
    num_attention_layers = sum(1 for kind in args.layer_schedule() if kind.mixer == "attention")
    return ModelSummary(
        name=name,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_layers=num_attention_layers,
        num_mamba_layers=args.num_hidden_layers - num_attention_layers,
        num_experts=args.num_experts,
        num_experts_per_tok=args.num_experts_per_tok,
    )


def serving_threads() -> int:
    """Return the torch threads for a serving process's engine: every core this process may run on.

    The gRPC event loop shares the cores with them. Measured on 2 cores with 32 streams, 2 threads gave 27x
    transformers' batch-1 tokens/s and 1 thread 20x, once only the engine's step thread ran OpenMP regions.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1  # macOS and Windows have no CPU affinity call


def slots_for_memory(model, max_len: int, memory_budget_bytes: int) -> int:
    """Return how many cache slots of `max_len` tokens fit in `memory_budget_bytes`, at least one, or raise ValueError."""
    per_slot = model.new_cache(num_slots=1, max_len=max_len).bytes_per_slot()
    num_slots = memory_budget_bytes // per_slot
    if num_slots < 1:
        raise ValueError(
            f"memory budget of {memory_budget_bytes} bytes is below one cache slot of {max_len} tokens "
            f"({per_slot} bytes); raise the budget or lower the maximum length"
        )
    logger.info(
        "cache slot of %s tokens takes %s bytes: %s slots fit in %s bytes", max_len, per_slot, num_slots,
        memory_budget_bytes,
    )
    return num_slots


class LocalRunner:
    """A runner over a `jamba.model.Jamba` in this process, with the LoRA adapters of `adapters_dir` if given.

    Each slot keeps the adapter its request named at prefill for all its decode steps; a batch can mix adapters.
    """

    def __init__(self, model, num_slots: int, max_len: int, name: str = "jamba", adapters_dir=None) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be at least 1, got {num_slots}")
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {max_len}")
        self.model = model
        self.cache = model.new_cache(num_slots=num_slots, max_len=max_len)
        self.summary = summarize(model.args, name)
        self.num_slots = num_slots
        self.max_len = max_len
        self.vocab_size = model.args.vocab_size
        # Padded positions are masked out, so any id would do. The model's pad id has an all-zero embedding row.
        self.pad_id = model.args.pad_token_id or 0
        self.adapters: tuple[str, ...] = ()
        self.forward_model = model
        if adapters_dir is not None:
            from serve.adapters import load_adapters

            self.forward_model, self.adapters = load_adapters(model, adapters_dir)
        self.slot_adapters: list[str | None] = [None] * num_slots
        self.device = next(model.parameters()).device
        num_moe_layers = sum(1 for kind in model.args.layer_schedule() if kind.has_experts)
        self._expert_load = torch.zeros(num_moe_layers, model.args.num_experts, dtype=torch.long)
        logger.info(
            "local runner: %s slots of %s tokens, %s bytes of cache per slot, on %s, adapters %s",
            num_slots, max_len, self.cache.bytes_per_slot(), self.device, list(self.adapters),
        )

    def _forward(self, batch_slots: Sequence[int], **kwargs):
        """Run the model on a batch whose rows belong to `batch_slots`, each with its slot's adapter."""
        if not self.adapters:
            return self.model(**kwargs)
        from serve.adapters import adapter_rows

        rows = adapter_rows([self.slot_adapters[s] for s in batch_slots])
        return self.forward_model(adapter_names=rows, **kwargs)

    @torch.inference_mode()
    def prefill(
        self, slots: Sequence[int], prompts: Sequence[Sequence[int]], adapters: Sequence[str | None]
    ) -> torch.Tensor:
        if len(slots) != len(prompts) or len(slots) != len(adapters):
            raise ValueError(f"got {len(slots)} slots, {len(prompts)} prompts and {len(adapters)} adapters")
        unknown = sorted({a for a in adapters if a is not None and a not in self.adapters})
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; this runner has {list(self.adapters)}")
        for slot, adapter in zip(slots, adapters):
            self.slot_adapters[slot] = adapter

        # Left padding lines up the last prompt tokens, so position -1 contains every row's next-token logits.
        input_ids, attention_mask = left_pad([list(prompt) for prompt in prompts], self.pad_id)

        out = self._forward(
            slots,
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            cache=self.cache,
            slots=torch.tensor(slots, dtype=torch.long, device=self.device),
            logits_to_keep=1,
        )
        self._count_experts(out.router_logits, attention_mask.reshape(-1).bool())
        return out.logits[:, -1].float().cpu()  # (B, V)

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        if len(slots) != len(tokens):
            raise ValueError(f"got {len(slots)} slots and {len(tokens)} tokens")
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        out = self._forward(
            slots, input_ids=input_ids, cache=self.cache, slots=torch.tensor(slots, dtype=torch.long, device=self.device),
            logits_to_keep=1,
        )
        self._count_experts(out.router_logits, None)
        return out.logits[:, -1].float().cpu()  # (B, V)

    def free(self, slots: Sequence[int]) -> None:
        self.cache.free(list(slots))
        for slot in slots:
            self.slot_adapters[slot] = None

    def take_expert_load(self) -> torch.Tensor:
        load, self._expert_load = self._expert_load, torch.zeros_like(self._expert_load)
        return load

    def _count_experts(self, router_logits: Sequence[torch.Tensor], real_tokens: torch.Tensor | None) -> None:
        """Add each MoE layer's top-K choices of the real (unpadded) tokens to the expert load."""
        k = self.model.args.num_experts_per_tok
        for layer, logits in enumerate(router_logits):  # logits (B*L, E)
            if real_tokens is not None:
                logits = logits[real_tokens.to(logits.device)]
            chosen = logits.topk(k, dim=-1).indices.reshape(-1).cpu()
            self._expert_load[layer] += torch.bincount(chosen, minlength=self._expert_load.shape[1])
