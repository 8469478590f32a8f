"""Ray Train's torch backend with a rendezvous store that listens on the workers' Ray address only.

Ray Train 2.60 starts the workers' process group with `init_method="env://"` or `tcp://`, and torch then creates a
TCPStore server that binds every interface. This backend starts the store itself on rank 0, bound to that worker's
Ray address (`jamba.distributed.bound_store`), and passes it to `init_process_group`. Everything else follows Ray
Train's own torch backend, which it extends (a private class, so this module is tied to the pinned Ray release).
"""

from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from jamba.distributed import bound_store, client_store

# Rank 0's store, kept alive in that worker process for as long as its process group lives.
_STORE = None


def _open_store(world_size: int, timeout_s: float) -> tuple[str, int]:
    global _STORE
    address = ray.util.get_node_ip_address()
    _STORE, port = bound_store(address, world_size, timeout_s)
    return address, port


def _init_process_group(backend: str, rank: int, world_size: int, address: str, port: int, timeout_s: float):
    store = _STORE if rank == 0 else client_store(address, port, world_size, timeout_s)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        resources = worker_group.get_resources_per_worker()
        backend = backend_config.backend or ("nccl" if resources.get("GPU", 0) > 0 else "gloo")
        world_size = len(worker_group)
        address, port = worker_group.execute_single(0, _open_store, world_size, backend_config.timeout_s)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, _init_process_group, backend, rank, world_size, address,
                                                   port, backend_config.timeout_s)
                 for rank in range(world_size)])


class BoundStoreTorchConfig(TorchConfig):
    """TorchConfig whose process group rendezvous listens on rank 0's Ray address only."""

    @property
    def backend_cls(self):
        return _BoundStoreBackend
