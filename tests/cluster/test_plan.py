import pytest

from cluster.plan import ReplicaPlan, make_plan
from jamba.model import JambaArgs


def test_plan_splits_layers_and_experts():
    args = JambaArgs.from_preset("bench")
    plan = make_plan(args, layer_groups=3, expert_shards=2, nodes=2)

    assert [g.layers for g in plan.layer_groups] == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert [s.experts for s in plan.expert_shards] == [(0, 1), (2, 3)]
    assert plan.moe_layers == (1, 3, 5, 7)
    assert [g.node for g in plan.layer_groups] == [0, 0, 1]
    assert [s.node for s in plan.expert_shards] == [0, 1]
    assert plan.layer_groups[0].has_embedding and plan.layer_groups[-1].has_head


def test_plan_round_trips_through_dict():
    args = JambaArgs.from_preset("bench")
    plan = make_plan(args, layer_groups=2, expert_shards=4)
    assert ReplicaPlan.from_dict(plan.to_dict(), args) == plan


def test_explicit_plan_is_checked():
    args = JambaArgs.from_preset("bench")
    plan = make_plan(args).to_dict()
    plan["layer_groups"][1]["layers"] = [5, 6, 7]
    with pytest.raises(ValueError, match="layer groups must cover layers 0..7 in order"):
        ReplicaPlan.from_dict(plan, args)

    plan = make_plan(args).to_dict()
    plan["expert_shards"][1]["experts"] = [1, 2]
    with pytest.raises(ValueError, match="expert shards must own experts 0..3, each once"):
        ReplicaPlan.from_dict(plan, args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layer_groups=9), r"layer_groups must be in \[1, num_hidden_layers=8\]"),
    (dict(expert_shards=5), r"expert_shards must be in \[1, num_experts=4\]"),
    (dict(nodes=0), "nodes must be >= 1"),
])
def test_bad_plan_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_plan(JambaArgs.from_preset("bench"), **kwargs)


def test_describe_names_every_actor():
    text = make_plan(JambaArgs.from_preset("bench"), layer_groups=2, expert_shards=2).describe()
    assert "layer group 0: layers 0-3 +embedding on node 0" in text
    assert "expert shard 1: experts [2, 3] of MoE layers [1, 3, 5, 7] on node 0" in text
