"""The actors of one model replica: layer groups and expert shards.

Both build their modules from `jamba.model` classes, with the checkpoint's parameter names, on the meta device, and
load only the tensors they own. They add no math: a layer group runs `JambaLayer.forward` and hands the experts of
its MoE layers to a dispatch function; an expert shard runs `jamba.model.run_experts` on the tokens it receives.

Two transports move activations between them (chosen by `transport`):
- "ray": every hand-off is a Ray call. The runner calls the layer groups one after the other, and a layer group
  calls each expert shard once per MoE layer. Simple, and the baseline.
- "collective": activations move in an order that every actor derives from the plan, so no message carries
  control information. The steps come from the runner to a thread that each actor starts once, so a step costs
  no Ray call (a Ray call round trip took 2.9 ms on the development machine, a gloo round trip with the same
  payloads 0.3 ms). Between processes of one node, messages go over shared-memory links (cluster/links.py).
  Otherwise activations go over a torch.distributed group of the actors (gloo on CPU, NCCL on GPU), and the
  runner's messages over a second, gloo, group that also contains the runner (the control group).

Legend: B batch, L sequence, D hidden size, T tokens in the step (B*L), K experts per token, V vocabulary.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from accelerate import init_empty_weights

from cluster.links import LinkSpec, Messenger, can_link
from cluster.plan import ExpertShardSpec, LayerGroupSpec, ReplicaPlan
from jamba.checkpoint import CheckpointReader, fill_module, load_args
from jamba.distributed import bound_store, client_store
from jamba.model import (MLP, HybridCache, JambaLayer, Masks, RMSNorm, build_masks, close_cache_view,
                         open_cache_view, run_experts)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInput:
    """The inputs of one step that every actor of the replica receives, small enough to travel as a Ray argument."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor | None  # (B, L), prefill with padding only
    slots: torch.Tensor  # (B,) long


def _routing(weights, experts):
    """Pack top-K weights and expert ids (T, K) into one fp32 tensor (T, 2K); ids are exact in fp32."""
    return torch.cat([weights.float(), experts.float()], dim=-1)


def _unpack_routing(routing, dtype):
    k = routing.shape[-1] // 2
    return routing[:, :k].to(dtype), routing[:, k:].long()


def _tokens_for_shards(experts, shard_experts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Indices of the tokens that have at least one of their K experts in each shard."""
    return [torch.isin(experts, owned).any(-1).nonzero()[:, 0] for owned in shard_experts]


# Requests from the runner, over a link or the control group: a header (op, a, b, c) of int64, then the op's
# tensors.
#   STEP: (STEP, batch, length, has_mask), then input ids (batch, length), slots (batch,), mask (batch, length) if
#         has_mask. Afterwards every layer group sends the runner its expert counts of the step, (MoE layers, E),
#         the last one its logits (batch, V) first.
#   FREE: (FREE, n, 0, 0), then the slots (n,); layer groups only.
# The serving thread ends with its process: the runner kills the actors to stop or rebuild the replica.
STEP, FREE = 1, 2

# How long an idle actor waits for the runner's next request: without a limit of its own, the wait would end at
# the group's timeout (the step timeout) and take the actor down after that long without traffic. A dead runner
# still ends the wait: at once through its closed connection, or within CHECK_S of cluster/links.py on a link.
IDLE_WAIT = timedelta(days=365)

# Up to this many tokens in a step (decode sizes), a layer group sends every shard all of them with their routing
# in one message. Each shard returns a full (T, D) sum, zero where it owns none of a token's experts. That is one
# message each way instead of three, and no gathering of rows. Larger steps send each shard only its tokens.
# NOTE: measured with gloo on one CPU machine only. Over a network between GPUs, the fp32 copy of every token may
# cost more than the messages it saves.
WHOLE_BATCH_TOKENS = 64


def control_group(store, rank: int, size: int, timeout_s: float) -> dist.ProcessGroupGloo:
    """Join the control group (the actors, then the runner, by rank), a gloo group outside torch's default group.

    Its sockets bind this node's Ray address, 127.0.0.1 on a single machine.
    """
    import ray

    options = dist.ProcessGroupGloo._Options()
    options._timeout = timedelta(seconds=timeout_s)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=ray.util.get_node_ip_address())]
    return dist.ProcessGroupGloo(dist.PrefixStore("control/", store), rank, size, options)


def send_request(messenger: Messenger, ranks, op: int, *tensors: torch.Tensor,
                 header: tuple[int, int, int] = (0, 0, 0)) -> list:
    """Send the request `op` with its tensors to every rank in `ranks`; return the sends still in flight.

    A gloo send can take milliseconds to complete on a busy machine, so a caller that expects a reply waits for
    the reply first. Sending or waiting raises RuntimeError if a rank is gone.
    """
    head = torch.tensor([op, *header], dtype=torch.long)
    return [work for rank in ranks for work in messenger.send_headed(rank, head, tensors)]


def receive_request(messenger: Messenger, runner: int) -> tuple[int, tuple[torch.Tensor | None, ...]]:
    """Wait for the runner's next request; return its op and tensors (a StepInput's fields for STEP)."""
    def describe(head):
        op, first, second, has_mask = head.tolist()
        if op == STEP:
            ids, slots = torch.empty(first, second, dtype=torch.long), torch.empty(first, dtype=torch.long)
            return [ids, slots, torch.empty(first, second, dtype=torch.long)] if has_mask else [ids, slots]
        if op == FREE:
            return [torch.empty(first, dtype=torch.long)]
        raise ValueError(f"unknown request {op} from the runner; the runner and the actors run different code")

    head = torch.empty(4, dtype=torch.long)
    tensors = messenger.recv_headed(runner, head, describe, IDLE_WAIT.total_seconds())
    op = int(head[0])
    if op == STEP:
        ids, slots, *mask = tensors
        return op, (ids, mask[0] if mask else None, slots)
    return op, tuple(tensors)


class StepServer:
    """The thread that serves the runner's requests for a collective actor: the only thread that computes.

    A failed request ends the process, after logging why: the replica cannot go on with one actor out of step.
    Its peers and the runner then see its connections close, or its pidfd report the exit, and the runner builds
    the replica again.
    """

    threads: int  # torch threads of the steps
    plan: ReplicaPlan
    messenger: Messenger

    def node_id(self) -> str:
        """Return the id of this actor's Ray node."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def process(self) -> tuple[str, int, bool]:
        """Return this actor's node, its process id and whether it can use shared-memory links."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid(), can_link()

    def init_collective(self, rank: int, world_size: int, address: str, port: int, timeout_s: float,
                        links: list[LinkSpec]) -> None:
        """Join the actors' group (ranks 0..world_size-1) and the control group, whose last rank is the runner, and
        create the shared-memory links this actor sends on."""
        store = _init_process_group(rank, world_size, address, port, timeout_s, self.plan.device,
                                    getattr(self, "_store", None))
        self.runner_rank = world_size
        self.messenger = Messenger(rank, control_group(store, rank, world_size + 1, timeout_s), timeout_s)
        self.messenger.create_links(links)
        self._links = links

    def start_serving(self, pids: list[int], names: list[str]) -> None:
        """Open the links this actor receives on, then serve requests on a thread of its own; returns at once."""
        self.messenger.open_links(self._links, pids, names)
        threading.Thread(target=self._serve_safely, name="replica-steps", daemon=True).start()

    def _serve_safely(self) -> None:
        torch.set_num_threads(self.threads)
        try:
            while True:
                self.serve_request(*receive_request(self.messenger, self.runner_rank))
        except BaseException:
            log.exception("%s failed while serving the runner's requests; exiting", self.ready())
            logging.shutdown()
            os._exit(1)

    def serve_request(self, op: int, tensors: tuple[torch.Tensor, ...]) -> None:
        """Serve one request of the runner (see STEP and FREE); each actor class defines it."""
        raise NotImplementedError


def _load_on_one_thread(threads: int | None) -> int:
    """Switch this thread to one torch thread for loading; return the threads for the steps.

    Two threads that start OpenMP regions slow each other down (see serve.server), and with the collective
    transport the serving thread computes, not this one. None keeps the count the process started with, which
    Ray sets from the actor's CPUs (OMP_NUM_THREADS).
    """
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


class LayerGroup(StepServer):
    """A contiguous slice of layers with their caches; the first group embeds, the last one applies the LM head."""

    def __init__(self, spec: LayerGroupSpec, plan: ReplicaPlan, model_dir: str, num_slots: int, max_len: int,
                 dtype: torch.dtype = torch.float32, scan: str = "auto", threads: int | None = None):
        self.threads = _load_on_one_thread(threads)
        self.spec, self.plan = spec, plan
        self.args = load_args(model_dir)
        self.device = torch.device("cuda" if plan.device == "cuda" else "cpu")
        self.modules = self._build(model_dir, dtype, scan)
        self.cache = HybridCache(self.args, num_slots, max_len, layers=spec.layers,
                                 devices={i: self.device for i in spec.layers}, dtype=dtype)
        self.shard_experts = [torch.tensor(s.experts, device=self.device) for s in plan.expert_shards]
        self.expert_load = torch.zeros(len(plan.moe_layers), self.args.num_experts, dtype=torch.long)
        self.shards = []  # actor handles, for the "ray" transport
        self.dispatch_seconds, self.dispatch_calls = 0.0, 0
        torch.set_num_threads(self.threads)  # for steps by Ray calls, which run on this thread
        log.info("layer group %d ready: layers %s on %s", spec.index, list(spec.layers), self.device)

    def _build(self, model_dir, dtype, scan) -> nn.Module:
        args, spec = self.args, self.spec
        with init_empty_weights():
            part = nn.Module()
            part.model = nn.Module()
            if spec.has_embedding:
                part.model.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, args.pad_token_id)
            part.model.layers = nn.ModuleDict({str(i): JambaLayer(args, i, scan) for i in spec.layers})
            for layer in part.model.layers.values():
                if layer.kind.has_experts:
                    layer.feed_forward.experts = nn.ModuleList()  # the expert shards own them
            if spec.has_head:
                part.model.final_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
                if not args.tie_word_embeddings:
                    part.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        reader = CheckpointReader(model_dir)
        fill_module(part, reader, self.device, dtype, partial=True)
        if spec.has_head and args.tie_word_embeddings:
            part.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device=self.device, dtype=dtype)
            part.lm_head.weight.data.copy_(reader.get("model.embed_tokens.weight"))
        return part.eval()

    def ready(self) -> str:
        return f"layer group {self.spec.index}"

    def free(self, slots: list[int]) -> None:
        self.cache.free(slots)

    def take_expert_load(self) -> torch.Tensor:
        load, self.expert_load = self.expert_load, torch.zeros_like(self.expert_load)
        return load

    def set_shards(self, shards) -> None:
        self.shards = shards

    def take_dispatch_stats(self) -> tuple[float, int]:
        """Seconds spent sending tokens to expert shards and combining their results, and how many MoE layers."""
        stats = (self.dispatch_seconds, self.dispatch_calls)
        self.dispatch_seconds, self.dispatch_calls = 0.0, 0
        return stats

    def _timed(self, dispatch):
        def timed(x, weights, experts):
            started = time.perf_counter()
            out = dispatch(x, weights, experts)
            self.dispatch_seconds += time.perf_counter() - started
            self.dispatch_calls += 1
            return out
        return timed

    @torch.inference_mode()
    def run(self, step: StepInput, hidden: torch.Tensor | None, dispatch_for_layer):
        """Run this group's layers; return hidden states (B, L, D), or last-token logits (B, V) from the last group."""
        ids = step.input_ids.to(self.device)
        mask = None if step.attention_mask is None else step.attention_mask.to(self.device)
        view = open_cache_view(self.cache, ids.shape, mask, step.slots)
        masks = build_masks(mask, ids.shape[1]) if view.prefill else Masks(None, None)

        x = self.modules.model.embed_tokens(ids) if self.spec.has_embedding else hidden.to(self.device)
        for i in self.spec.layers:
            layer = self.modules.model.layers[str(i)]
            dispatch = self._timed(dispatch_for_layer(i)) if layer.kind.has_experts else None
            x, router_logits = layer(x, masks, view, dispatch)
            if layer.kind.has_experts:
                self._count(i, router_logits, mask)
        close_cache_view(view, ids.shape[1], mask)

        if not self.spec.has_head:
            return x
        x = self.modules.model.final_layernorm(x[:, -1])
        return self.modules.lm_head(x).float().cpu()

    def _count(self, layer, router_logits, mask):
        chosen = router_logits.topk(self.args.num_experts_per_tok, dim=-1).indices
        if mask is not None:
            chosen = chosen[mask.reshape(-1).bool()]
        row = self.plan.moe_layers.index(layer)
        self.expert_load[row] += torch.bincount(chosen.reshape(-1).cpu(), minlength=self.args.num_experts)

    # "ray" transport: one Ray call per hand-off.

    def forward_ray(self, step: StepInput, hidden: torch.Tensor | None):
        import ray

        def dispatch_for_layer(layer):
            def dispatch(x, weights, experts):
                tokens = _tokens_for_shards(experts, self.shard_experts)
                routing = _routing(weights, experts)
                refs = [shard.compute.remote(layer, x[idx].cpu(), routing[idx].cpu())
                        for shard, idx in zip(self.shards, tokens) if idx.numel()]
                out = torch.zeros_like(x)
                for idx, result in zip([t for t in tokens if t.numel()], ray.get(refs)):
                    out.index_add_(0, idx, result.to(out.device, out.dtype))
                return out
            return dispatch

        out = self.run(step, hidden, dispatch_for_layer)
        return out.cpu()

    # "collective" transport: tensors move over a torch.distributed group.

    def forward_collective(self, step: StepInput):
        rank = self.spec.index
        hidden = None
        if not self.spec.has_embedding:
            batch, length = step.input_ids.shape
            hidden = torch.empty(batch, length, self.args.hidden_size, dtype=self._dtype(), device=self.device)
            self.messenger.recv(rank - 1, [hidden])

        shard_ranks = [len(self.plan.layer_groups) + s.index for s in self.plan.expert_shards]

        def dispatch_whole_batch(x, weights, experts):
            payload = torch.cat([x.float(), _routing(weights, experts)], dim=-1)
            sends = [work for shard_rank in shard_ranks for work in self.messenger.send(shard_rank, [payload])]
            out = None
            for shard_rank in shard_ranks:
                result = torch.empty_like(x)
                self.messenger.recv(shard_rank, [result])
                out = result if out is None else out.add_(result)
            for work in sends:
                work.wait()
            return out

        def dispatch_for_layer(layer):
            def dispatch(x, weights, experts):
                if x.shape[0] <= WHOLE_BATCH_TOKENS:
                    return dispatch_whole_batch(x, weights, experts)
                tokens = _tokens_for_shards(experts, self.shard_experts)
                routing = _routing(weights, experts)
                # Every shard gets the routing of all tokens and works out its own tokens from it, so the only
                # message with a data-dependent size is one whose size both sides already know.
                sends = []
                for shard_rank, idx in zip(shard_ranks, tokens):
                    sends.append(dist.isend(routing.contiguous(), dst=shard_rank))
                    if idx.numel():
                        sends.append(dist.isend(x[idx].contiguous(), dst=shard_rank))
                out = torch.zeros_like(x)
                for shard_rank, idx in zip(shard_ranks, tokens):
                    if idx.numel():
                        result = torch.empty(idx.numel(), x.shape[-1], dtype=x.dtype, device=x.device)
                        dist.recv(result, src=shard_rank)
                        out.index_add_(0, idx, result)
                for work in sends:
                    work.wait()
                return out
            return dispatch

        out = self.run(step, hidden, dispatch_for_layer)
        if not self.spec.has_head:
            for work in self.messenger.send(rank + 1, [out]):
                work.wait()
            return None
        return out

    def _dtype(self):
        return next(self.modules.parameters()).dtype

    def open_store(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        self._store, address, port = open_store(world_size, timeout_s)
        return address, port

    def serve_request(self, op: int, tensors: tuple[torch.Tensor, ...]) -> None:
        if op == STEP:
            ids, mask, slots = tensors
            out = self.forward_collective(StepInput(ids, mask, slots))
            load, self.expert_load = self.expert_load, torch.zeros_like(self.expert_load)
            replies = [out, load] if self.spec.has_head else [load]
            for work in self.messenger.send(self.runner_rank, replies, control=True):
                work.wait()
        elif op == FREE:
            self.cache.free(tensors[0].tolist())


class ExpertShard(StepServer):
    """The experts `spec.experts` of every MoE layer."""

    def __init__(self, spec: ExpertShardSpec, plan: ReplicaPlan, model_dir: str, dtype: torch.dtype = torch.float32,
                 threads: int | None = None):
        self.threads = _load_on_one_thread(threads)
        self.spec, self.plan = spec, plan
        self.args = load_args(model_dir)
        self.device = torch.device("cuda" if plan.device == "cuda" else "cpu")
        self.dtype = dtype
        with init_empty_weights():
            part = nn.Module()
            part.model = nn.Module()
            part.model.layers = nn.ModuleDict()
            for layer in plan.moe_layers:
                block = nn.Module()
                block.feed_forward = nn.Module()
                block.feed_forward.experts = nn.ModuleDict({str(e): MLP(self.args) for e in spec.experts})
                part.model.layers[str(layer)] = block
        fill_module(part, CheckpointReader(model_dir), self.device, dtype, partial=True)
        self.modules = part.eval()
        self.owned = torch.tensor(spec.experts, device=self.device)
        torch.set_num_threads(self.threads)  # for steps by Ray calls, which run on this thread
        log.info("expert shard %d ready: experts %s of MoE layers %s on %s", spec.index, list(spec.experts),
                 list(plan.moe_layers), self.device)

    def ready(self) -> str:
        return f"expert shard {self.spec.index}"

    def _experts(self, layer):
        experts = self.modules.model.layers[str(layer)].feed_forward.experts
        return [experts[str(e)] for e in self.spec.experts]

    @torch.inference_mode()
    def compute(self, layer: int, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """Sum of weight * expert(x) over this shard's experts, for tokens x (n, D) with routing (n, 2K)."""
        x = x.to(self.device, self.dtype)
        weights, experts = _unpack_routing(routing.to(self.device), self.dtype)
        return run_experts(self._experts(layer), self.spec.experts, x, weights, experts).cpu()

    @torch.inference_mode()
    def forward_collective(self, step: StepInput) -> None:
        """Serve every MoE layer of one step, in order, for the layer group that owns it."""
        tokens = step.input_ids.numel()
        k, hidden = self.args.num_experts_per_tok, self.args.hidden_size
        for layer in self.plan.moe_layers:
            owner = self.plan.owner_of_layer(layer).index
            if tokens <= WHOLE_BATCH_TOKENS:
                payload = torch.empty(tokens, hidden + 2 * k, dtype=torch.float32, device=self.device)
                self.messenger.recv(owner, [payload])
                weights, experts = _unpack_routing(payload[:, hidden:], self.dtype)
                x = payload[:, :hidden].to(self.dtype).contiguous()
                if self.spec.experts:
                    out = run_experts(self._experts(layer), self.spec.experts, x, weights, experts)
                else:  # an explicit plan may leave a shard without experts
                    out = torch.zeros_like(x)
                for work in self.messenger.send(owner, [out]):
                    work.wait()
                continue
            routing = torch.empty(tokens, 2 * k, dtype=torch.float32, device=self.device)
            dist.recv(routing, src=owner)
            weights, experts = _unpack_routing(routing, self.dtype)
            idx = torch.isin(experts, self.owned).any(-1).nonzero()[:, 0]
            if not idx.numel():
                continue
            x = torch.empty(idx.numel(), self.args.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, src=owner)
            out = run_experts(self._experts(layer), self.spec.experts, x, weights[idx], experts[idx])
            dist.send(out.contiguous(), dst=owner)

    def serve_request(self, op: int, tensors: tuple[torch.Tensor, ...]) -> None:
        if op == STEP:
            ids, mask, slots = tensors
            self.forward_collective(StepInput(ids, mask, slots))


def open_store(world_size: int, timeout_s: float):
    """Start the torch.distributed store on this node's Ray address; return (store, address, port)."""
    import ray

    address = ray.util.get_node_ip_address()
    store, port = bound_store(address, world_size, timeout_s)
    return store, address, port


def _init_process_group(rank, world_size, address, port, timeout_s, device, store=None):
    if address.startswith("127."):
        # gloo otherwise binds the interface of the host name, which need not be loopback.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if store is None:
        store = client_store(address, port, world_size, timeout_s)
    # NOTE: only the gloo path has run (CPU tests); NCCL point-to-point with these shapes is untested.
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return store
