"""A replica of 2 layer groups and 2 expert shards against the in-process model."""

import asyncio
import contextlib
import os
import select
import subprocess
import time

import pytest
import ray
import torch

from cluster.actors import WHOLE_BATCH_TOKENS
from cluster.links import Messenger
from cluster.plan import ReplicaPlan, make_plan
from cluster.replica import RayReplica, ReplicaFailure
from jamba.generate import generate
from jamba.model import JambaArgs
from serve.runner import LocalRunner


@contextlib.contextmanager
def started_replica(path, **options):
    """A RayReplica of the checkpoint at `path`, shut down on leaving the block."""
    replica = RayReplica(path, **options)
    try:
        yield replica
    finally:
        replica.shutdown()


def kill(actor) -> None:
    """Kill the actor and return once its process has exited (ray.kill returns before)."""
    pid = ray.get(actor.process.remote())[1]
    watch = os.pidfd_open(pid)
    try:
        ray.kill(actor, no_restart=True)
        assert select.select([watch], [], [], 30)[0], f"actor process {pid} still runs 30 s after ray.kill"
    finally:
        os.close(watch)


@pytest.fixture(scope="module", params=["collective", "ray"])
def replica(request, ray_cluster, tiny_checkpoint):
    path, _ = tiny_checkpoint
    replica = RayReplica(path, num_slots=4, max_len=64, transport=request.param, threads_per_actor=1)
    yield replica
    replica.shutdown()


# Steps of up to WHOLE_BATCH_TOKENS tokens send the shards every token, larger ones only the tokens routed to them:
# 2 x 3 prompt tokens take the first path, 2 x 40 the second.
@pytest.mark.parametrize("length", [3, 40])
def test_logits_match_in_process(replica, tiny_checkpoint, length):
    _, model = tiny_checkpoint
    local = LocalRunner(model, num_slots=4, max_len=64)
    prompts = [list(range(5, 5 + length)), list(range(100, 100 + length - 2))]

    diffs = [(local.prefill([1, 3], prompts, [None, None]) - replica.prefill([1, 3], prompts, [None, None]))]
    for tokens in ([20, 21], [30, 31], [40, 41]):
        diffs.append(local.decode([1, 3], tokens) - replica.decode([1, 3], tokens))
    local.free([1, 3])
    replica.free([1, 3])

    assert (sum(map(len, prompts)) > WHOLE_BATCH_TOKENS) == (length == 40)
    worst = max(d.abs().max().item() for d in diffs)
    assert worst < 1e-4, f"max logit difference {worst}"
    assert torch.equal(local.take_expert_load(), replica.take_expert_load())


def _greedy_on_runner(runner, prompts, steps):
    """Greedy continuation with sequences joining and leaving: prompt i joins at step i and runs `steps` tokens."""
    outputs = {i: [] for i in range(len(prompts))}
    running = {}
    for tick in range(len(prompts) + steps):
        if tick < len(prompts):
            logits = runner.prefill([tick], [prompts[tick]], [None])
            outputs[tick].append(int(logits[0].argmax()))
            running[tick] = tick
        done = [i for i in running if len(outputs[i]) == steps]
        if done:
            runner.free([running.pop(i) for i in done])
        if running:
            order = list(running)
            logits = runner.decode([running[i] for i in order], [outputs[i][-1] for i in order])
            for i, row in zip(order, logits):
                outputs[i].append(int(row.argmax()))
    return [outputs[i][:steps] for i in range(len(prompts))]


def test_greedy_tokens_match_under_continuous_batching(replica, tiny_checkpoint):
    _, model = tiny_checkpoint
    prompts = [[3 + i, 40 + i, 90 + 2 * i, 7] for i in range(4)]
    expected = [generate(model, [p], max_new_tokens=6)[0].tokens for p in prompts]
    assert _greedy_on_runner(replica, prompts, steps=6) == expected


def test_plan_actors_load_only_their_tensors(replica, tiny_checkpoint):
    _, model = tiny_checkpoint
    group_params = ray.get([g.__ray_call__.remote(lambda a: sum(p.numel() for p in a.modules.parameters()))
                            for g in replica.groups])
    shard_params = ray.get([s.__ray_call__.remote(lambda a: sum(p.numel() for p in a.modules.parameters()))
                            for s in replica.shards])
    total = sum(p.numel() for p in model.parameters())
    assert sum(group_params) + sum(shard_params) == total
    assert max(group_params + shard_params) < total / 2


def test_listeners_stay_on_loopback(replica):
    """The replica's actors, their torch.distributed sockets and this process's end of the control group listen on
    127.0.0.1 only."""
    replica.prefill([0], [[5, 6]], [None])
    replica.free([0])
    pids = ray.get([actor.__ray_call__.remote(lambda _: os.getpid()) for actor in replica._actors]) + [os.getpid()]
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    ours = [line for line in lines if any(f"pid={pid}," in line for pid in pids)]
    exposed = [line for line in ours if not line.split()[3].startswith(("127.", "[::1]", "[::ffff:127."))]
    assert ours
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_links_join_every_pair_on_node(ray_cluster, tiny_checkpoint):
    """On one node every pair of processes that exchange messages has a shared-memory link, and no link's file
    outlives the setup."""
    path, _ = tiny_checkpoint
    with started_replica(path, num_slots=2, max_len=64, threads_per_actor=1) as replica:
        # Ranks: layer groups 0-1, expert shards 2-3, the runner 4.
        pairs = {(link.src, link.dst) for link in replica._links}
        assert pairs == {(4, 0), (4, 1), (4, 2), (4, 3), (0, 4), (1, 4), (0, 1),
                         (0, 2), (0, 3), (2, 0), (3, 0), (1, 2), (1, 3), (2, 1), (3, 1)}
        assert not any(os.path.exists(link.path) for link in replica._links)
        replica.prefill([0], [[5, 6, 7]], [None])
        assert replica._messenger.into[1]._count == 1  # the logits came over the link
        prefix = os.path.basename(replica._links[0].path).rsplit("-", 2)[0]
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


# Each actor's death must reach the runner: the shard's through the layer groups, the first group's through the
# second, and the last group's directly.
@pytest.mark.parametrize("victim", ["shard 1", "group 0", "group 1"])
def test_dead_actor_fails_then_recovers(ray_cluster, tiny_checkpoint, victim):
    path, model = tiny_checkpoint
    with started_replica(path, num_slots=2, max_len=64, transport="collective", threads_per_actor=1,
                         step_timeout_s=30) as replica:
        replica.prefill([0], [[5, 6, 7]], [None])
        kind, index = victim.split()
        kill((replica.shards if kind == "shard" else replica.groups)[int(index)])

        started = time.monotonic()
        with pytest.raises(ReplicaFailure, match="a model actor failed during step") as failure:
            replica.decode([0], [8])
        assert time.monotonic() - started < 30
        name = f"{'expert shard' if kind == 'shard' else 'layer group'} {index}"
        # The actors that exited are listed (the others follow the victim), not only the one the runner waited for.
        assert f"{name} (pid" in str(failure.value).split("; exited: ")[1]

        replica.free([0])  # rebuilds the replica before freeing
        assert replica.rebuilds == 1
        logits = replica.prefill([0], [[5, 6, 7]], [None])
        expected = model(torch.tensor([[5, 6, 7]])).logits[0, -1]
        assert (logits[0] - expected).abs().max().item() < 1e-4


def test_interrupted_step_rebuilds(ray_cluster, tiny_checkpoint, monkeypatch):
    """A step interrupted with its replies unread (Ctrl-C in a script) must not hand them to the next step."""
    path, model = tiny_checkpoint
    with started_replica(path, num_slots=2, max_len=64, threads_per_actor=1) as replica:
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(replica._messenger, "recv", interrupted)
        with pytest.raises(KeyboardInterrupt):
            replica.prefill([0], [[9, 10, 11, 12]], [None])

        logits = replica.prefill([0], [[5, 6, 7]], [None])
        assert replica.rebuilds == 1
        expected = model(torch.tensor([[5, 6, 7]])).logits[0, -1]
        assert (logits[0] - expected).abs().max().item() < 1e-4


def test_invalid_steps_rejected_before_actors(ray_cluster, tiny_checkpoint):
    path, model = tiny_checkpoint
    with started_replica(path, num_slots=2, max_len=8, threads_per_actor=1) as replica:
        replica.prefill([0], [[5, 6, 7]], [None])
        cases = [
            (lambda: replica.decode([0, 1], [5]), "got 2 slots and 1 tokens"),
            (lambda: replica.decode([], []), "at least one slot"),
            (lambda: replica.decode([2], [5]), r"slots must be in \[0, 2\), got \[2\]"),
            (lambda: replica.decode([0, 0], [5, 5]), "distinct"),
            (lambda: replica.decode([1], [5]), "slot 1 is empty"),
            (lambda: replica.prefill([0], [[5]], [None]), "slot 0 is in use"),
            (lambda: replica.prefill([1], [[]], [None]), "at least one token"),
            (lambda: replica.prefill([1], [list(range(3, 12))], [None]), "9 tokens, more than max_len 8"),
            (lambda: replica.free([5]), r"slots must be in \[0, 2\)"),
        ]
        for call, message in cases:
            with pytest.raises(ValueError, match=message):
                call()
        assert replica.rebuilds == 0

        for token in [8, 9, 10, 11, 12]:  # up to max_len
            logits = replica.decode([0], [token])
        with pytest.raises(ValueError, match="slot 0 would hold 9 tokens"):
            replica.decode([0], [13])
        expected = model(torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])).logits[0, -1]
        assert (logits[0] - expected).abs().max().item() < 1e-4


def test_unplaceable_replica_times_out(ray_cluster, tiny_checkpoint):
    path, _ = tiny_checkpoint

    def live_placement_groups():
        return {key for key, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}

    before = live_placement_groups()
    started = time.monotonic()
    with pytest.raises(ReplicaFailure, match="timed out after 1.0 s: the cluster lacks the resources"):
        RayReplica(path, num_slots=2, max_len=64, cpus_per_actor=100, load_timeout_s=1.0)
    assert time.monotonic() - started < 30
    assert live_placement_groups() == before  # the pending placement group was removed


def test_failed_setup_leaves_no_link_files(ray_cluster, tiny_checkpoint, monkeypatch):
    path, _ = tiny_checkpoint
    before = {name for name in os.listdir("/dev/shm") if name.startswith("jamba-")}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Messenger, "open_links", interrupted)  # in this process only: after the files exist
    with pytest.raises(KeyboardInterrupt):
        RayReplica(path, num_slots=2, max_len=64, threads_per_actor=1)
    assert {name for name in os.listdir("/dev/shm") if name.startswith("jamba-")} == before


def test_idle_replica_keeps_serving_with_default_threads(ray_cluster, tiny_checkpoint):
    """Actors wait for requests longer than the step timeout, and compute on the threads Ray gives their CPUs."""
    path, model = tiny_checkpoint
    with started_replica(path, num_slots=2, max_len=64, layer_groups=1, expert_shards=1, cpus_per_actor=2,
                         step_timeout_s=3) as replica:
        threads = ray.get([a.__ray_call__.remote(lambda actor: actor.threads) for a in replica._actors])
        assert threads == [2, 2]

        local = LocalRunner(model, num_slots=2, max_len=64)
        expected = [local.prefill([0], [[5, 6, 7]], [None]), local.decode([0], [8])]
        logits = [replica.prefill([0], [[5, 6, 7]], [None])]
        time.sleep(5)
        logits.append(replica.decode([0], [8]))
        assert replica.rebuilds == 0
        assert max((a - b).abs().max().item() for a, b in zip(logits, expected)) < 1e-4


def test_failed_rebuild_is_tried_again(ray_cluster, tiny_checkpoint, monkeypatch):
    path, model = tiny_checkpoint
    with started_replica(path, num_slots=2, max_len=64, threads_per_actor=1, step_timeout_s=30) as replica:
        replica.prefill([0], [[5, 6, 7]], [None])
        kill(replica.shards[0])
        with pytest.raises(ReplicaFailure):
            replica.decode([0], [8])

        build = replica._build
        attempts = []

        def build_failing_once():
            attempts.append(len(attempts))
            if len(attempts) == 1:
                raise ReplicaFailure("a model actor failed during collective setup: simulated")
            build()

        monkeypatch.setattr(replica, "_build", build_failing_once)
        replica.free([0])  # the failed rebuild does not fail the free: the slot is free after any rebuild
        logits = replica.prefill([0], [[5, 6, 7]], [None])
        assert attempts == [0, 1]
        assert replica.rebuilds == 2
        expected = model(torch.tensor([[5, 6, 7]])).logits[0, -1]
        assert (logits[0] - expected).abs().max().item() < 1e-4


def test_shard_without_experts_matches_in_process(ray_cluster, tiny_checkpoint):
    """An explicit plan may leave a shard without experts, and decode steps still send it every token."""
    path, model = tiny_checkpoint
    args = JambaArgs.from_dict(model.args.to_dict())
    layout = make_plan(args, layer_groups=1, expert_shards=2).to_dict()
    layout["expert_shards"][0]["experts"] = list(range(args.num_experts))
    layout["expert_shards"][1]["experts"] = []
    plan = ReplicaPlan.from_dict(layout, args)
    with started_replica(path, num_slots=2, max_len=64, plan=plan, threads_per_actor=1) as replica:
        local = LocalRunner(model, num_slots=2, max_len=64)
        diffs = [local.prefill([1], [[5, 6, 7]], [None]) - replica.prefill([1], [[5, 6, 7]], [None])]
        for token in (8, 9, 10):
            diffs.append(local.decode([1], [token]) - replica.decode([1], [token]))
        assert max(d.abs().max().item() for d in diffs) < 1e-4
