"""One model replica spread over Ray actors, behind the runner interface of `serve.runner`.

`RayReplica` places the actors of a `ReplicaPlan` in one placement group, one bundle per actor (each bundle pinned
to its node when the plan spans several), waits until every actor has loaded its part of the checkpoint, and then
runs prefill and decode steps over them. A step waits on all of its actors; if one of them dies, the step raises
`ReplicaFailure` at once, the replica kills the rest (which may be blocked in a collective) and builds itself
again, and the engine ends the affected requests with UNAVAILABLE.

With the collective transport this process joins the actors' control group (see cluster/actors.py) as its last
rank and sends them each step over it, or over a shared-memory link to the actors on its node (cluster/links.py).
A dead actor shows as a closed connection or an exited process, and a hung one as the timeout, `step_timeout_s`.
"""

import logging
import os
import time
from collections.abc import Sequence

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors import (FREE, STEP, WHOLE_BATCH_TOKENS, ExpertShard, LayerGroup, StepInput, control_group,
                            send_request)
from cluster.links import Link, Messenger, can_link, message_bytes, plan_links
from cluster.plan import ReplicaPlan, make_plan
from jamba.checkpoint import load_args
from jamba.distributed import client_store
from jamba.generate import left_pad

log = logging.getLogger(__name__)

TRANSPORTS = ("collective", "ray")
# Room in the runner's link to each actor: decode steps of every slot, and prompts of a few thousand tokens.
REQUEST_BYTES = 64 * 1024


class ReplicaFailure(ConnectionError):
    """An actor of the replica died or timed out; the step's requests cannot continue."""


class RayReplica:
    """A runner (see `serve.runner.Runner`) whose model lives in layer-group and expert-shard actors."""

    def __init__(self, model_dir: str, num_slots: int, max_len: int, plan: ReplicaPlan | None = None,
                 layer_groups: int = 2, expert_shards: int = 2, transport: str = "collective",
                 dtype: torch.dtype = torch.float32, scan: str = "auto", cpus_per_actor: float = 1.0,
                 threads_per_actor: int | None = None, step_timeout_s: float = 120.0, name: str = "jamba",
                 shared_memory: bool = True, load_timeout_s: float = 600.0):
        from serve.runner import summarize

        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.model_dir, self.dtype, self.scan = str(model_dir), dtype, scan
        self.args = load_args(model_dir)
        self.plan = plan or make_plan(self.args, layer_groups, expert_shards)
        self.plan.check(self.args)
        self.num_slots, self.max_len, self.vocab_size = num_slots, max_len, self.args.vocab_size
        self.summary = summarize(self.args, name)
        self.adapters: tuple[str, ...] = ()
        self.pad_id = self.args.pad_token_id or 0
        self.transport = transport
        self.shared_memory = shared_memory  # links between the processes of one node (collective transport)
        self.cpus_per_actor, self.threads_per_actor = cpus_per_actor, threads_per_actor
        self.step_timeout_s = step_timeout_s
        self.load_timeout_s = load_timeout_s  # placing the actors and loading the checkpoint, which can take minutes
        self.rebuilds = 0
        self._broken = False
        self._actors: list = []
        self._pg = None
        self._messenger = None  # this process's end of the control group and links, for the collective transport
        self._links = []
        self._expert_load = torch.zeros(len(self.plan.moe_layers), self.args.num_experts, dtype=torch.long)
        self._lengths = [0] * num_slots  # tokens in each slot's cache, to check steps before they reach the actors
        log.info("%s\ntransport: %s", self.plan.describe(), transport)
        try:
            self._build()
        except BaseException:
            self.shutdown()  # the actors started so far, and the links' files
            raise

    # Building and tearing down.

    def _node_ids(self) -> list[str]:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) < self.plan.num_nodes:
            raise ValueError(f"the plan needs {self.plan.num_nodes} nodes but the cluster has {len(alive)}")
        # The head node first, the others in a stable order, so node 0 of the plan is the head.
        alive.sort(key=lambda n: (not n.get("Resources", {}).get("node:__internal_head__"), n["NodeID"]))
        return [n["NodeID"] for n in alive[: self.plan.num_nodes]]

    def _build(self) -> None:
        resource = "GPU" if self.plan.device == "cuda" else "CPU"
        specs = [*self.plan.layer_groups, *self.plan.expert_shards]
        bundles = [{resource: self.cpus_per_actor if resource == "CPU" else 1} for _ in specs]
        if self.plan.num_nodes > 1:
            nodes = self._node_ids()
            selectors = [{"ray.io/node-id": nodes[spec.node]} for spec in specs]
            self._pg = placement_group(bundles, strategy="PACK", bundle_label_selector=selectors)
        else:
            self._pg = placement_group(bundles, strategy="STRICT_PACK" if resource == "GPU" else "PACK")
        try:
            ray.get(self._pg.ready(), timeout=self.load_timeout_s)
        except ray.exceptions.GetTimeoutError as error:
            self._broken = True
            raise ReplicaFailure(f"placing the replica's {len(bundles)} actors ({bundles[0]} each) timed out after "
                                 f"{self.load_timeout_s} s: the cluster lacks the resources") from error

        def options(bundle):
            return dict(num_cpus=self.cpus_per_actor if resource == "CPU" else 0,
                        num_gpus=1 if resource == "GPU" else 0, max_restarts=0,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, bundle))

        group_cls, shard_cls = ray.remote(LayerGroup), ray.remote(ExpertShard)
        self.groups = [
            group_cls.options(**options(i)).remote(spec, self.plan, self.model_dir, self.num_slots, self.max_len,
                                                   self.dtype, self.scan, self.threads_per_actor)
            for i, spec in enumerate(self.plan.layer_groups)
        ]
        offset = len(self.groups)
        self.shards = [
            shard_cls.options(**options(offset + i)).remote(spec, self.plan, self.model_dir, self.dtype,
                                                            self.threads_per_actor)
            for i, spec in enumerate(self.plan.expert_shards)
        ]
        self._actors = [*self.groups, *self.shards]
        self._wait([a.ready.remote() for a in self._actors], "loading", self.load_timeout_s)
        self._wait([g.set_shards.remote(self.shards) for g in self.groups], "setup", self.load_timeout_s)
        if self.transport == "collective":
            self._join_collective()

    def _join_collective(self) -> None:
        """Connect the actors' group and the control group, with this process as the control group's last rank,
        and the shared-memory links between the processes that share a node (see cluster/links.py)."""
        world = len(self._actors)
        places = [*self._wait([a.process.remote() for a in self._actors], "setup", self.load_timeout_s),
                  (ray.get_runtime_context().get_node_id(), os.getpid(), can_link())]
        nodes, pids, capable = [list(column) for column in zip(*places)]
        names = [f"layer group {i}" for i in range(len(self.groups))]
        names += [f"expert shard {i}" for i in range(len(self.shards))] + ["the runner"]
        self._links = plan_links(nodes, capable, self._link_sizes()) if self.shared_memory else []
        messenger = Messenger(world, None, self.step_timeout_s)
        messenger.create_links(self._links)
        self._messenger = messenger
        address, port = self._wait([self.groups[0].open_store.remote(world + 1, self.step_timeout_s)], "setup",
                                   self.load_timeout_s)[0]
        joined = [a.init_collective.remote(rank, world, address, port, self.step_timeout_s, self._links)
                  for rank, a in enumerate(self._actors)]
        try:
            # Building the group returns once every rank has joined, so the actors' calls must be under way.
            store = client_store(address, port, world + 1, self.step_timeout_s)
            messenger.control = control_group(store, world, world + 1, self.step_timeout_s)
        except RuntimeError as error:  # torch's store and gloo errors, a timeout included
            self._control_failed("collective setup", error)
        self._wait(joined, "collective setup", self.load_timeout_s)
        messenger.open_links(self._links, pids, names)
        self._wait([a.start_serving.remote(pids, names) for a in self._actors], "collective setup",
                   self.load_timeout_s)
        log.info("shared-memory links: %s", ", ".join(f"{names[s.src]} -> {names[s.dst]}" for s in self._links)
                 or "none")

    def _link_sizes(self) -> dict[tuple[int, int], int]:
        """Return the capacity in bytes of the link for each pair of ranks that exchange messages.

        A link fits a decode step of every slot at once. Larger messages (prefill) take the groups."""
        args, groups, runner = self.args, len(self.groups), len(self._actors)
        slots, hidden, k = self.num_slots, args.hidden_size, args.num_experts_per_tok

        def room(*shapes, dtype=torch.float32):
            return message_bytes([torch.empty(shape, dtype=dtype, device="meta") for shape in shapes])

        load = tuple(self._expert_load.shape)
        sizes = {}
        for rank in range(runner):
            sizes[runner, rank] = REQUEST_BYTES + room((slots,), (slots,), dtype=torch.long)
        for g in range(groups - 1):
            sizes[g, runner] = room(load, dtype=torch.long)
        sizes[groups - 1, runner] = room((slots, self.vocab_size)) + room(load, dtype=torch.long)
        if self.plan.device == "cpu":  # activations on GPUs go over NCCL
            for g in range(groups - 1):
                sizes[g, g + 1] = room((max(slots, WHOLE_BATCH_TOKENS), hidden), dtype=self.dtype)
            for g, spec in enumerate(self.plan.layer_groups):
                if not any(layer in self.plan.moe_layers for layer in spec.layers):
                    continue
                for s in range(len(self.shards)):
                    sizes[g, groups + s] = room((WHOLE_BATCH_TOKENS, hidden + 2 * k))
                    sizes[groups + s, g] = room((WHOLE_BATCH_TOKENS, hidden), dtype=self.dtype)
        return sizes

    def node_ids(self) -> dict[str, str]:
        """Node of every actor, by name: 'group 0', 'shard 1', ..."""
        names = [f"group {i}" for i in range(len(self.groups))] + [f"shard {i}" for i in range(len(self.shards))]
        return dict(zip(names, ray.get([a.node_id.remote() for a in self._actors])))

    def shutdown(self) -> None:
        if self._messenger is not None:  # the actors' serving threads end with them, below
            self._messenger.close()
            self._messenger = None
        for spec in self._links:  # links that an actor that died early never opened, on this node
            Link.remove(spec.path)
        self._links = []
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def rebuild(self) -> None:
        log.warning("rebuilding the replica: killing %d actors and starting them again", len(self._actors))
        self.shutdown()
        self.rebuilds += 1
        self._lengths = [0] * self.num_slots  # the new actors' caches are empty
        self._build()

    def _wait(self, refs, what: str, timeout_s: float | None = None):
        """Wait for every ref; raise ReplicaFailure as soon as one fails, and mark the replica for rebuilding."""
        pending, results = list(refs), {}
        timeout_s = timeout_s or self.step_timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise ReplicaFailure(f"{what} timed out after {timeout_s} s")
                results[ready[0]] = ray.get(ready[0])
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ReplicaFailure) as error:
            log.error("replica %s failed: %s", what, error)
            self._broken = True
            raise ReplicaFailure(f"a model actor failed during {what}: {error}") from error
        return [results[r] for r in refs]

    # The runner interface.

    def _ensure_healthy(self) -> None:
        """Rebuild after a failure, on the next call, so that the failed step's error reaches its requests first.

        A rebuild that fails leaves the replica marked, so the call after it tries again.
        """
        if self._broken:
            self.rebuild()
            self._broken = False

    def _control_failed(self, stage: str, error: Exception):
        """Mark the replica for rebuilding and raise ReplicaFailure for an error of the control group or a link.

        The error names the peer this process waited for, which may only have seen another actor die, so the
        message also lists the actors on this node whose processes have exited (those that lost a peer exit too).
        """
        peers = self._messenger.peers.values() if self._messenger is not None else []
        exited = [f"{peer.name} (pid {peer.pid})" for peer in peers if not peer.alive()]
        detail = f"; exited: {', '.join(exited)}" if exited else ""
        log.error("replica %s failed: %s%s", stage, error, detail)
        self._broken = True
        raise ReplicaFailure(f"a model actor failed during {stage}: {error}{detail}") from error

    def _step(self, step: StepInput) -> torch.Tensor:
        self._ensure_healthy()
        if self.transport == "collective":
            batch, length = step.input_ids.shape
            tensors = [step.input_ids, step.slots]
            if step.attention_mask is not None:
                tensors.append(step.attention_mask.long())
            last = len(self.groups) - 1
            logits = torch.empty(batch, self.vocab_size, dtype=torch.float32)
            try:
                sends = send_request(self._messenger, range(len(self._actors)), STEP, *tensors,
                                     header=(batch, length, int(step.attention_mask is not None)))
                # A reply takes a whole step, so this process sleeps at once instead of spinning on a core that
                # an actor may need (one wake-up per step).
                for rank in reversed(range(len(self.groups))):
                    load = torch.empty_like(self._expert_load)
                    self._messenger.recv(rank, [logits, load] if rank == last else [load], control=True, spin_s=0)
                    self._expert_load += load
                for work in sends:
                    work.wait()
            except RuntimeError as error:  # gloo's error for a closed connection or a timeout
                self._control_failed("step", error)
            except BaseException:
                # Interrupted (KeyboardInterrupt, for one) with replies unread: the next step would read this
                # step's, so the replica must start again.
                self._broken = True
                raise
            return logits
        hidden = None
        for group in self.groups:
            hidden = self._wait([group.forward_ray.remote(step, hidden)], "step")[0]
        return hidden

    def _check_step(self, slots: Sequence[int], new_tokens: Sequence[int], prefill: bool) -> None:
        """Raise ValueError for a step that the actors' caches would reject, which would cost a rebuild.

        A replica that failed is rebuilt first, since its caches start empty again.
        """
        self._ensure_healthy()
        if not slots:
            raise ValueError("a step needs at least one slot")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct, got {list(slots)}")
        outside = [slot for slot in slots if not 0 <= slot < self.num_slots]
        if outside:
            raise ValueError(f"slots must be in [0, {self.num_slots}), got {outside}")
        for slot, count in zip(slots, new_tokens):
            length = self._lengths[slot]
            if prefill and length:
                raise ValueError(f"slot {slot} is in use; free it before a prefill")
            if not prefill and not length:
                raise ValueError(f"slot {slot} is empty; prefill it before decoding")
            if length + count > self.max_len:
                raise ValueError(f"slot {slot} would hold {length + count} tokens, more than max_len {self.max_len}")

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
                adapters: Sequence[str | None]) -> torch.Tensor:
        if len(slots) != len(prompts) or len(slots) != len(adapters):
            raise ValueError(f"got {len(slots)} slots, {len(prompts)} prompts and {len(adapters)} adapters")
        if any(adapter is not None for adapter in adapters):
            raise NotImplementedError("the Ray replica serves the base model only; adapters are not loaded yet")
        if any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        self._check_step(slots, [len(prompt) for prompt in prompts], prefill=True)
        ids, mask = left_pad([list(p) for p in prompts], self.pad_id)
        step = StepInput(ids, None if bool(mask.all()) else mask, torch.tensor(list(slots)))
        logits = self._step(step)
        for slot, prompt in zip(slots, prompts):
            self._lengths[slot] = len(prompt)
        return logits

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        if len(slots) != len(tokens):
            raise ValueError(f"got {len(slots)} slots and {len(tokens)} tokens")
        self._check_step(slots, [1] * len(slots), prefill=False)
        step = StepInput(torch.tensor(list(tokens))[:, None], None, torch.tensor(list(slots)))
        logits = self._step(step)
        for slot in slots:
            self._lengths[slot] += 1
        return logits

    def free(self, slots: Sequence[int]) -> None:
        """Reset the slots. A replica that fails meanwhile is marked for rebuilding instead of raising: the slots
        are free either way, since a rebuilt replica's caches start empty, and the engine takes slots whose free
        raised out of service."""
        outside = [slot for slot in slots if not 0 <= slot < self.num_slots]
        if outside:
            raise ValueError(f"slots must be in [0, {self.num_slots}), got {outside}")
        for slot in slots:
            self._lengths[slot] = 0
        try:
            self._ensure_healthy()
            if self.transport == "collective":
                for work in send_request(self._messenger, range(len(self.groups)), FREE, torch.tensor(list(slots)),
                                         header=(len(slots), 0, 0)):
                    work.wait()
            else:
                self._wait([g.free.remote(list(slots)) for g in self.groups], "free")
        except (ReplicaFailure, RuntimeError) as error:  # RuntimeError: gloo's errors and LinkError
            self._broken = True
            log.warning("freeing slots %s failed (%s); the replica rebuilds before its next step", list(slots), error)
        except BaseException:
            self._broken = True  # interrupted, as in _step
            raise

    def take_expert_load(self) -> torch.Tensor:
        if self.transport == "collective":  # the layer groups send their counts after every step
            load, self._expert_load = self._expert_load, torch.zeros_like(self._expert_load)
            return load
        loads = self._wait([g.take_expert_load.remote() for g in self.groups], "expert load")
        return sum(loads)
