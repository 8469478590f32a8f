import pytest
import torch

from jamba.model import Jamba, JambaArgs


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance that listens on 127.0.0.1 only."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny model with 4 experts saved in the checkpoint format, and the model itself."""
    torch.manual_seed(0)
    args = JambaArgs.from_preset("tiny", num_hidden_layers=6, attn_layer_period=6, attn_layer_offset=4)
    model = Jamba(args).eval()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return path, model
