"""A replica spread over a two-node local cluster: actors land on the nodes of the plan, and outputs still match."""

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from cluster.plan import make_plan
from cluster.replica import RayReplica
from jamba.generate import generate
from jamba.model import JambaArgs


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=4, node_ip_address="127.0.0.1",
                                                                include_dashboard=False))
    cluster.add_node(num_cpus=4, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_actors_land_on_planned_nodes(two_nodes, tiny_checkpoint):
    path, model = tiny_checkpoint
    plan = make_plan(JambaArgs.from_dict(model.args.to_dict()), layer_groups=2, expert_shards=2, nodes=2)
    replica = RayReplica(path, num_slots=2, max_len=32, plan=plan, threads_per_actor=1)
    try:
        nodes = replica._node_ids()
        placed = replica.node_ids()
        assert len(set(nodes)) == 2
        assert placed == {"group 0": nodes[0], "shard 0": nodes[0], "group 1": nodes[1], "shard 1": nodes[1]}
        # Shared-memory links join the processes of one node only, and the rest goes over gloo. Ranks: groups 0-1,
        # shards 2-3 and the runner 4, which runs on the head node (node 0).
        assert {(link.src, link.dst) for link in replica._links} == {(4, 0), (0, 4), (4, 2), (0, 2), (2, 0), (1, 3),
                                                                      (3, 1)}

        prompt = [5, 9, 14, 3]
        expected = generate(model, [prompt], max_new_tokens=5)[0].tokens
        logits = replica.prefill([0], [prompt], [None])
        tokens = [int(logits[0].argmax())]
        for _ in range(4):
            tokens.append(int(replica.decode([0], [tokens[-1]])[0].argmax()))
        assert tokens == expected
        assert (logits[0] - model(torch.tensor([prompt])).logits[0, -1]).abs().max().item() < 1e-4
    finally:
        replica.shutdown()
