"""The placement plan of one model replica: which actor owns which layers and experts, and on which node.

A replica has layer-group actors, each owning a contiguous slice of layers (mixers, dense MLPs, MoE routers and
the caches of those layers), and expert-shard actors, each owning a subset of the experts of every MoE layer.
`make_plan` computes the plan from the config and the resources; `ReplicaPlan.from_dict` takes an explicit one.
"""

from dataclasses import asdict, dataclass

from jamba.model import JambaArgs


@dataclass(frozen=True)
class LayerGroupSpec:
    index: int
    layers: tuple[int, ...]  # contiguous layer indices
    node: int  # index into the replica's nodes
    has_embedding: bool  # the first group embeds the tokens
    has_head: bool  # the last group applies the final norm and the LM head


@dataclass(frozen=True)
class ExpertShardSpec:
    index: int
    experts: tuple[int, ...]  # expert indices this shard owns in every MoE layer
    node: int


@dataclass(frozen=True)
class ReplicaPlan:
    layer_groups: tuple[LayerGroupSpec, ...]
    expert_shards: tuple[ExpertShardSpec, ...]
    moe_layers: tuple[int, ...]  # MoE layers in execution order
    num_nodes: int
    device: str  # "cpu" or "cuda": each actor takes one CPU or one GPU

    def owner_of_layer(self, layer: int) -> LayerGroupSpec:
        return next(g for g in self.layer_groups if layer in g.layers)

    def shard_of_expert(self, expert: int) -> ExpertShardSpec:
        return next(s for s in self.expert_shards if expert in s.experts)

    def describe(self) -> str:
        lines = [f"replica plan on {self.num_nodes} node(s), one {self.device} per actor:"]
        for g in self.layer_groups:
            extra = " +embedding" * g.has_embedding + " +head" * g.has_head
            lines.append(f"  layer group {g.index}: layers {g.layers[0]}-{g.layers[-1]}{extra} on node {g.node}")
        for s in self.expert_shards:
            lines.append(f"  expert shard {s.index}: experts {list(s.experts)} of MoE layers "
                         f"{list(self.moe_layers)} on node {s.node}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, plan: dict, args: JambaArgs) -> "ReplicaPlan":
        """Read an explicit plan (the shape `to_dict` writes) and check it against the model."""
        groups = tuple(LayerGroupSpec(**{**g, "layers": tuple(g["layers"])}) for g in plan["layer_groups"])
        shards = tuple(ExpertShardSpec(**{**s, "experts": tuple(s["experts"])}) for s in plan["expert_shards"])
        result = cls(groups, shards, _moe_layers(args), plan.get("num_nodes", 1), plan.get("device", "cpu"))
        result.check(args)
        return result

    def check(self, args: JambaArgs) -> None:
        layers = [layer for g in self.layer_groups for layer in g.layers]
        if layers != list(range(args.num_hidden_layers)):
            raise ValueError(f"layer groups must cover layers 0..{args.num_hidden_layers - 1} in order, "
                             f"each once; got {[list(g.layers) for g in self.layer_groups]}")
        experts = sorted(e for s in self.expert_shards for e in s.experts)
        if self.moe_layers and experts != list(range(args.num_experts)):
            raise ValueError(f"expert shards must own experts 0..{args.num_experts - 1}, each once; "
                             f"got {[list(s.experts) for s in self.expert_shards]}")
        if not self.layer_groups[0].has_embedding or not self.layer_groups[-1].has_head:
            raise ValueError("the first layer group must hold the embedding and the last one the LM head")
        nodes = [g.node for g in self.layer_groups] + [s.node for s in self.expert_shards]
        if any(not 0 <= n < self.num_nodes for n in nodes):
            raise ValueError(f"every node index must be in [0, num_nodes={self.num_nodes}), got {nodes}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")


def _moe_layers(args: JambaArgs) -> tuple[int, ...]:
    return tuple(i for i, kind in enumerate(args.layer_schedule()) if kind.has_experts)


def _split(items: list[int], parts: int) -> list[list[int]]:
    """Split items into `parts` contiguous runs whose lengths differ by at most one."""
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        runs.append(items[start:end])
        start = end
    return runs


def make_plan(args: JambaArgs, layer_groups: int = 2, expert_shards: int = 2, nodes: int = 1,
              device: str = "cpu") -> ReplicaPlan:
    """Split the layers into contiguous groups and the experts into shards, and spread both over the nodes.

    Actors are assigned to nodes in order, so neighbouring layer groups share a node where they can, and each node
    gets an equal share of the expert shards.
    """
    if not 1 <= layer_groups <= args.num_hidden_layers:
        raise ValueError(f"layer_groups must be in [1, num_hidden_layers={args.num_hidden_layers}], got {layer_groups}")
    moe_layers = _moe_layers(args)
    if moe_layers and not 1 <= expert_shards <= args.num_experts:
        raise ValueError(f"expert_shards must be in [1, num_experts={args.num_experts}], got {expert_shards}")
    if not moe_layers:
        expert_shards = 0
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")

    groups = tuple(
        LayerGroupSpec(index=i, layers=tuple(layers), node=i * nodes // layer_groups, has_embedding=i == 0,
                       has_head=i == layer_groups - 1)
        for i, layers in enumerate(_split(list(range(args.num_hidden_layers)), layer_groups))
    )
    shards = tuple(
        ExpertShardSpec(index=i, experts=tuple(experts), node=i * nodes // expert_shards)
        for i, experts in enumerate(_split(list(range(args.num_experts)), expert_shards))
    ) if expert_shards else ()
    plan = ReplicaPlan(groups, shards, moe_layers, nodes, device)
    plan.check(args)
    return plan
