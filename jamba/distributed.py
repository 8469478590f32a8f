"""A torch.distributed rendezvous store that listens on one address only.

torch's TCPStore, when it creates its own listening socket, binds every interface. `bound_store` binds the socket
itself, to the address given (a node's Ray address, 127.0.0.1 on a single machine), and hands it to the store.
"""

import socket
from datetime import timedelta

import torch.distributed as dist


def bound_store(address: str, world_size: int, timeout_s: float) -> tuple[dist.TCPStore, int]:
    """Start the store's server on `address` and a free port; returns the store and the port."""
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    listener.bind((address, 0))
    listener.listen(world_size * 2)
    port = listener.getsockname()[1]
    # The store owns the socket from here on (detach), so Python never closes it under the store's server.
    store = dist.TCPStore(address, port, world_size, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=listener.detach(), use_libuv=False)
    return store, port


def client_store(address: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(address, port, world_size, False, timedelta(seconds=timeout_s), use_libuv=False)
