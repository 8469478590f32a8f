"""Benchmark the model against transformers' JambaForCausalLM on the same weights, in the same run.

Prints a table of prefill and decode throughput and the cache memory per token. The shape is the `bench` preset
(vocab 4096, hidden 256, 8 layers, attention at layer 4, MoE every other layer with 4 experts top-2), fp32, on
2 CPU threads unless --threads says otherwise.

    python bench/model.py [--threads 2] [--repeats 3]
"""

import argparse
import logging
import tempfile
import time

import torch

from jamba.generate import generate
from jamba.model import Jamba, JambaArgs


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the best one is reported")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    from transformers import JambaForCausalLM

    torch.manual_seed(0)
    args = JambaArgs.from_preset("bench")
    ours = Jamba(args).eval()
    with tempfile.TemporaryDirectory() as path:
        ours.save_pretrained(path)
        theirs = JambaForCausalLM.from_pretrained(path).eval()
    vocab = args.vocab_size
    rows = []

    for length in (512, 2048):
        ids = torch.randint(3, vocab, (1, length))

        def run_ours():
            cache = ours.new_cache(1, length)
            ours(ids, cache=cache, slots=[0], logits_to_keep=1)

        def run_theirs():
            theirs(ids, use_cache=True, logits_to_keep=1)

        with torch.no_grad():
            t_ours, t_theirs = best_time(run_ours, options.repeats), best_time(run_theirs, options.repeats)
        rows.append((f"prefill {length} tokens (tokens/s)", length / t_ours, length / t_theirs))

    new_tokens = 64
    for batch in (1, 8):
        prompts = torch.randint(3, vocab, (batch, 16))

        def run_ours():
            generate(ours, prompts.tolist(), max_new_tokens=new_tokens)

        def run_theirs():
            theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        with torch.no_grad():
            t_ours, t_theirs = best_time(run_ours, options.repeats), best_time(run_theirs, options.repeats)
        rows.append((f"decode batch {batch}, {new_tokens} new tokens (tokens/s)", batch * new_tokens / t_ours,
                     batch * new_tokens / t_theirs))

    print(f"\nthreads={options.threads}, torch {torch.__version__}, best of {options.repeats}\n")
    print("| measure | this project | transformers | ratio |")
    print("|---|---:|---:|---:|")
    for name, mine, reference in rows:
        print(f"| {name} | {mine:,.0f} | {reference:,.0f} | {mine / reference:.2f}x |")

    cache = ours.new_cache(1, 1)
    attention_only = JambaArgs.from_preset("bench", attn_layer_period=1, attn_layer_offset=0)
    pure = Jamba(attention_only).new_cache(1, 1)
    print(f"\ncache bytes per token: {cache.kv_bytes_per_token()} (pure-attention model of the same shape: "
          f"{pure.kv_bytes_per_token()}, ratio {cache.kv_bytes_per_token() / pure.kv_bytes_per_token():.4f}); "
          f"constant Mamba state per sequence: {cache.bytes_per_slot() - cache.kv_bytes_per_token()} bytes")


if __name__ == "__main__":
    main()
