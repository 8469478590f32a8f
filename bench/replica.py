"""Benchmark one model replica over Ray actors against the in-process model, in the same run.

Decode tokens/s at batch 16 for (a) the in-process model, (b) the replica with a Ray call per hand-off, (c) the
replica with its chosen transport (shared-memory links between the processes of a node, torch.distributed groups
for the rest) and (d) the same without the links (gloo groups only), plus the time each MoE layer spends on
dispatching tokens to expert shards and combining their results. The model is the `bench` preset (8 layers, MoE
every other layer with 4 experts top-2) with random weights. The replica has one actor per usable core by
default, half layer groups and half expert shards (1 + 1 on 2 cores), as a deployment gives each actor a device
of its own; `--layer-groups` and `--expert-shards` choose others.

    python bench/replica.py [--batch 16] [--steps 100] [--repeats 3] [--threads 1]

Every process computes on `--threads` torch threads: the in-process model of (a) and each actor. One thread each
compares like with like, since a replica's processes compute one after the other. A last row gives the in-process
model on all usable cores, for reference: on 2 cores, actors with 2 threads each oversubscribe them (see
docs/benchmarks.md).
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from cluster.replica import RayReplica  # noqa: E402
from jamba.model import Jamba, JambaArgs  # noqa: E402
from serve.runner import LocalRunner  # noqa: E402


def decode_rate(runner, batch: int, steps: int, repeats: int, prompt_len: int = 16) -> float:
    """Decode tokens/s at `batch` over `steps` steps after a prefill: the median of `repeats` runs."""
    slots = list(range(batch))
    prompts = [[3 + (i * 7 + j) % 4000 for j in range(prompt_len)] for i in slots]
    rates = []
    for _ in range(repeats):
        logits = runner.prefill(slots, prompts, [None] * batch)
        tokens = logits.argmax(-1).tolist()
        runner.decode(slots, tokens)  # warm-up
        started = time.perf_counter()
        for _ in range(steps):
            tokens = runner.decode(slots, tokens).argmax(-1).tolist()
        rates.append(batch * steps / (time.perf_counter() - started))
        runner.free(slots)
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--steps", type=int, default=100, help="timed decode steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per runner; the table gives the median")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in-process and per actor")
    # One actor per usable core by default: half of them layer groups, half expert shards.
    actors = max(2, len(os.sched_getaffinity(0)))
    parser.add_argument("--layer-groups", type=int, default=actors // 2, help="layer-group actors of the replica")
    parser.add_argument("--expert-shards", type=int, default=actors // 2, help="expert-shard actors of the replica")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    torch.manual_seed(0)
    model = Jamba(JambaArgs.from_preset("bench")).eval()
    path = tempfile.mkdtemp()
    model.save_pretrained(path)
    max_len = 16 + options.steps + 2

    def in_process_rate():
        return decode_rate(LocalRunner(model, options.batch, max_len), options.batch, options.steps, options.repeats)

    rows = [("(a) in-process", in_process_rate(), None)]
    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", log_to_driver=False)
    for label, transport, shared_memory in (("(b) replica, Ray call per hand-off", "ray", False),
                                            ("(c) replica, shared-memory links + gloo", "collective", True),
                                            ("(d) replica, gloo groups only", "collective", False)):
        replica = RayReplica(path, options.batch, max_len, layer_groups=options.layer_groups,
                             expert_shards=options.expert_shards, transport=transport,
                             threads_per_actor=options.threads, shared_memory=shared_memory)
        rate = decode_rate(replica, options.batch, options.steps, options.repeats)
        stats = ray.get([g.take_dispatch_stats.remote() for g in replica.groups])
        seconds, calls = sum(s for s, _ in stats), sum(c for _, c in stats)
        rows.append((label, rate, 1000 * seconds / max(calls, 1)))
        replica.shutdown()
    ray.shutdown()

    cores = len(os.sched_getaffinity(0))
    if cores != options.threads:
        torch.set_num_threads(cores)
        rows.append((f"in-process on {cores} threads, for reference", in_process_rate(), None))

    reference = rows[0][1]
    print(f"\ndecode at batch {options.batch}, median of {options.repeats} runs of {options.steps} steps, "
          f"{options.layer_groups} layer groups and "
          f"{options.expert_shards} expert shards, {options.threads} threads per process, torch {torch.__version__}\n")
    print("| runner | tokens/s | vs in-process | dispatch per MoE layer (ms) |")
    print("|---|---:|---:|---:|")
    for label, rate, dispatch_ms in rows:
        dispatch = "-" if dispatch_ms is None else f"{dispatch_ms:.2f}"
        print(f"| {label} | {rate:,.0f} | {rate / reference:.2f} | {dispatch} |")


if __name__ == "__main__":
    main()
