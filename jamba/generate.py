"""In-process generation: prefill a batch of prompts once, then one cached step per new token.

`python -m jamba.generate --prompt "12+34="` answers with the embedded model.
"""

import argparse
import logging
from dataclasses import dataclass

import torch

from jamba.model import Jamba
from jamba.sampling import SamplingParams, sample


@dataclass
class Generation:
    tokens: list[int]
    finish_reason: str  # "length", "eos" or "stop"


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts of different lengths, padded on the left: (ids (B, L), attention_mask (B, L))."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, length - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def generate(model: Jamba, prompts: list[list[int]], max_new_tokens: int = 32,
             params: SamplingParams | list[SamplingParams] = SamplingParams(), eos_id: int | None = None,
             stop_sequences: list[list[int]] = ()) -> list[Generation]:
    """Continue every prompt until EOS, a stop sequence (token ids, kept in the output) or max_new_tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    generators = [p.make_generator() for p in params]
    device = model.lm_head.weight.device
    pad_id = model.args.pad_token_id or 0

    cache = model.new_cache(len(prompts), max(len(p) for p in prompts) + max_new_tokens)
    ids, mask = left_pad(prompts, pad_id)
    logits = model(ids.to(device), attention_mask=mask.to(device), cache=cache, slots=torch.arange(len(prompts)),
                   logits_to_keep=1).logits[:, -1]

    outputs = [Generation([], "length") for _ in prompts]
    active = list(range(len(prompts)))
    while active:
        tokens = sample(logits, [params[i] for i in active], [generators[i] for i in active])
        still_active = []
        for row, token in zip(active, tokens.tolist()):
            out = outputs[row]
            out.tokens.append(token)
            if eos_id is not None and token == eos_id:
                out.finish_reason = "eos"
            elif any(stop and out.tokens[-len(stop):] == list(stop) for stop in stop_sequences):
                out.finish_reason = "stop"
            elif len(out.tokens) < max_new_tokens:
                still_active.append(row)
        keep = [active.index(row) for row in still_active]
        active = still_active
        if active:
            step = tokens[keep][:, None].to(device)
            logits = model(step, cache=cache, slots=torch.tensor(active)).logits[:, -1]
    return outputs


def main(argv=None):
    from jamba.model import default_model_dir
    from jamba.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description="Generate text in-process with a Jamba checkpoint.")
    parser.add_argument("--model", default=str(default_model_dir()), help="checkpoint directory (default: embedded)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model = Jamba.from_pretrained(args.model)
    tokenizer = Tokenizer.from_file(args.model)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    prompts = [tokenizer.encode(p) for p in args.prompt]
    for prompt, out in zip(args.prompt, generate(model, prompts, args.max_new_tokens, params, tokenizer.eos_id)):
        print(f"{prompt}{tokenizer.decode(out.tokens)}  [{out.finish_reason}]")


if __name__ == "__main__":
    main()
