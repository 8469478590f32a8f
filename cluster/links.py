"""Shared-memory links between the processes of one replica that share a node, and the routing of its messages.

A decode step of the replica is a chain of small messages: the step to every actor, hidden states to the next
layer group, tokens to the expert shards and their sums back, logits to the runner. Each message wakes the process
that waits for it. Over gloo a message goes through a socket and the receiving process sleeps until it
arrives. Measured on the development machine (2 vCPUs), a layer group waited 0.7-1.0 ms per MoE layer for experts
that compute in 0.2-0.4 ms. Its own layers also ran slower than in one process, because every wait let its core
sleep. A link is a file in /dev/shm that both processes map. The sender copies its tensors into
it and bumps a counter. The receiver spins on the counter, yielding its core to any process that needs it, and
then sleeps on a futex (csrc/shared_wait.cpp in jamba). A message then costs a copy and a store.

`Messenger` sends each message over the link to its peer when there is one and the message fits in it, and over the
torch.distributed groups otherwise (other nodes, GPU tensors, prefill-sized messages). Both ends apply the same
rule to the same sizes, so they always agree on the path.

A link contains one message at a time: a second send waits until the first has been read. Every wait checks, a few
times a second, that the peer process still runs (through a pidfd), and gives up at its deadline, so a dead or hung
peer ends the wait with `LinkError`, a RuntimeError like gloo's own errors.
"""

import logging
import mmap
import os
import select
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from jamba import native

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
HEADER_BYTES = 4096  # the counters, each on a cache line of its own, and messages start on the next page
SENT, SENT_WAITERS, RECEIVED, RECEIVED_WAITERS = 0, 4, 64, 68  # byte offsets of the uint32 counters
ALIGN = 64  # bytes, so each tensor of a message starts on a cache line

# A waiting process spins this long before it sleeps: longer than a step's gaps while a replica decodes, short
# enough that an idle replica soon sleeps. It sleeps sooner when another process wants its core (see
# csrc/shared_wait.cpp in jamba).
SPIN_S = 0.02
# A sleeping waiter wakes up this often to check that its peer still runs.
CHECK_S = 0.1


class LinkError(RuntimeError):
    """The peer of a link exited, or sent nothing before the deadline."""


def message_bytes(tensors) -> int:
    """Return the room a message of these tensors (or of empty ones of the same shapes) takes in a link."""
    return sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors)


class PeerProcess:
    """Another process on this node, to tell whether it still runs."""

    def __init__(self, pid: int, name: str):
        self.pid, self.name = pid, name
        # A pidfd refers to this very process, even once its pid is reused, and reads as ready when it exits.
        # Kernels before 5.3 (or a seccomp profile) may lack it, and then the process's /proc entry is read.
        try:
            self._fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._fd = None

    def alive(self) -> bool:
        if self._fd is not None:
            return not select.select([self._fd], [], [], 0)[0]
        try:
            with open(f"/proc/{self.pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # not a zombie
        except OSError:
            return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


class Link:
    """One direction between two processes on one node: a shared-memory file holding one message at a time.

    The sender creates the file (`create=True`) and the receiver opens it and removes its name, after which the
    memory lives as long as either process maps it.
    """

    def __init__(self, path: str, capacity: int, create: bool):
        self.path, self.capacity = path, capacity
        kernels = native.kernels()
        if kernels is None:
            raise RuntimeError("shared-memory links need the native kernels, which failed to build: install a C++ "
                               "compiler and ninja, or build the replica with shared_memory=False")
        self._wait_word, self._set_word = kernels.wait_word, kernels.set_word
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                # Reserving the memory now turns a full /dev/shm into an error here, not a SIGBUS at the first write.
                try:
                    os.posix_fallocate(fd, 0, HEADER_BYTES + capacity)
                except OSError as error:
                    os.unlink(path)
                    raise OSError(error.errno, f"cannot reserve {HEADER_BYTES + capacity} bytes in {SHM_DIR} for a "
                                  f"link ({error.strerror}): give {SHM_DIR} more room, or build the replica with "
                                  "shared_memory=False") from error
            self._map = mmap.mmap(fd, HEADER_BYTES + capacity)
        finally:
            os.close(fd)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._base = self._bytes.data_ptr()
        self._count = 0  # messages sent (sender) or read (receiver) so far, modulo 2**32

    @staticmethod
    def remove(path: str) -> None:
        """Remove a link's name, if it is still there; processes that mapped it keep the memory."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def fits(self, tensors) -> bool:
        return message_bytes(tensors) <= self.capacity

    def _wait(self, offset: int, expected: int, peer: PeerProcess, timeout_s: float, what: str,
              spin_s: float = SPIN_S) -> None:
        """Wait until the counter at `offset` differs from `expected`."""
        deadline = time.monotonic() + timeout_s
        word, waiters = self._base + offset, self._base + offset + 4
        if self._wait_word(word, expected, waiters, int(spin_s * 1e9), 0):
            return
        while not self._wait_word(word, expected, waiters, 0, int(CHECK_S * 1e9)):
            if not peer.alive():
                raise LinkError(f"{peer.name} (pid {peer.pid}) exited while this process waited for it to {what}")
            if time.monotonic() > deadline:
                raise LinkError(f"timed out after {timeout_s:g} s waiting for {peer.name} to {what}")

    def send(self, tensors, peer: PeerProcess, timeout_s: float) -> None:
        """Copy the tensors (CPU, contiguous or not) into the link as one message; wait first if it is full."""
        previous = (self._count - 1) & 0xFFFFFFFF
        self._wait(RECEIVED, previous, peer, timeout_s, "read the previous message")
        offset = HEADER_BYTES
        for tensor in tensors:
            size = tensor.numel() * tensor.element_size()
            self._bytes[offset:offset + size].view(tensor.dtype).view(tensor.shape).copy_(tensor)
            offset += -(-size // ALIGN) * ALIGN
        self._count = (self._count + 1) & 0xFFFFFFFF
        self._set_word(self._base + SENT, self._count, self._base + SENT_WAITERS)

    def receive(self, peer: PeerProcess, timeout_s: float, spin_s: float = SPIN_S) -> "Message":
        """Wait for the next message; read it with `Message.read` and release it with `Message.done`."""
        self._wait(SENT, self._count, peer, timeout_s, "send a message", spin_s)
        return Message(self)

    def _release(self) -> None:
        self._count = (self._count + 1) & 0xFFFFFFFF
        self._set_word(self._base + RECEIVED, self._count, self._base + RECEIVED_WAITERS)


class Message:
    """A received message, read tensor by tensor in the order they were sent."""

    def __init__(self, link: Link):
        self._link, self._offset = link, HEADER_BYTES

    def read(self, out: torch.Tensor) -> torch.Tensor:
        """Copy the next tensor of the message into `out` (its shape and dtype must be the sent ones)."""
        size = out.numel() * out.element_size()
        out.copy_(self._link._bytes[self._offset:self._offset + size].view(out.dtype).view(out.shape))
        self._offset += -(-size // ALIGN) * ALIGN
        return out

    def done(self) -> None:
        """Hand the link back to the sender."""
        self._link._release()


@dataclass(frozen=True)
class LinkSpec:
    """A link from rank `src` to rank `dst` of the control group, at `path` on their node."""

    src: int
    dst: int
    path: str
    capacity: int


def can_link() -> bool:
    """Return whether this process can use links: /dev/shm is writable and the native library loads."""
    return os.access(SHM_DIR, os.W_OK) and native.kernels() is not None


def plan_links(nodes: list[str], capable: list[bool], pairs: dict[tuple[int, int], int]) -> list[LinkSpec]:
    """Return links for the pairs (src, dst) -> capacity whose ranks share a node and can both use links.

    nodes[r] and capable[r] (see `can_link`) describe rank r; the last rank is this process.
    """
    token = uuid.uuid4().hex[:12]
    links = [LinkSpec(src, dst, os.path.join(SHM_DIR, f"jamba-{token}-{src}-{dst}"), capacity)
             for (src, dst), capacity in sorted(pairs.items())
             if nodes[src] == nodes[dst] and capable[src] and capable[dst] and capacity > 0]
    # This process's node is the last rank's. Where its /dev/shm is short, go without links rather than fail.
    local = [link for link in links if nodes[link.src] == nodes[-1]]
    needed = sum(HEADER_BYTES + link.capacity for link in local)
    stat = os.statvfs(SHM_DIR)
    if needed > stat.f_bavail * stat.f_frsize:
        log.warning("%s has %d bytes free, fewer than the %d the replica's shared-memory links need on this node; "
                    "using the torch.distributed groups only (mount a larger %s to use them)", SHM_DIR,
                    stat.f_bavail * stat.f_frsize, needed, SHM_DIR)
        return []
    return links


class Messenger:
    """The sending and receiving end of one process's messages to and from the other ranks of its replica.

    Ranks are those of the control group: the actors, then the runner. A message goes over the link to or from its
    peer when there is one and the message fits. Otherwise it goes tensor by tensor over the control group
    (`control=True`: the runner's requests and replies) or over the actors' torch.distributed group.
    """

    def __init__(self, rank: int, control, timeout_s: float):
        self.rank, self.control, self.timeout_s = rank, control, timeout_s
        self.out: dict[int, Link] = {}
        self.into: dict[int, Link] = {}
        self.peers: dict[int, PeerProcess] = {}

    def create_links(self, specs: list[LinkSpec]) -> None:
        """Create the links this rank sends on."""
        for spec in specs:
            if spec.src == self.rank:
                self.out[spec.dst] = Link(spec.path, spec.capacity, create=True)

    def open_links(self, specs: list[LinkSpec], pids: list[int], names: list[str]) -> None:
        """Open the links this rank receives on (after their senders created them) and watch the peers."""
        for spec in specs:
            if spec.dst == self.rank:
                link = Link(spec.path, spec.capacity, create=False)
                Link.remove(spec.path)
                self.into[spec.src] = link
        for peer in {*self.out, *self.into}:
            self.peers[peer] = PeerProcess(pids[peer], names[peer])

    def close(self) -> None:
        for link in self.out.values():
            Link.remove(link.path)  # when the receiver never opened it
        for peer in self.peers.values():
            peer.close()
        self.out, self.into, self.peers = {}, {}, {}

    def send(self, dst: int, tensors, control: bool = False) -> list:
        """Send the tensors to `dst` as one message; return the sends still in flight, to wait for before the
        tensors change."""
        link = self.out.get(dst)
        if link is not None and all(t.device.type == "cpu" for t in tensors) and link.fits(tensors):
            link.send(tensors, self.peers[dst], self.timeout_s)
            return []
        if control:
            return [self.control.send([t.contiguous()], dst, 0) for t in tensors]
        return [dist.isend(t.contiguous(), dst=dst) for t in tensors]

    def send_headed(self, dst: int, head: torch.Tensor, tensors) -> list:
        """Send `head`, a tensor of a size fixed in advance, and then the tensors it describes; return the sends
        still in flight. Both go to a peer of the control group."""
        link, message = self.out.get(dst), [head, *tensors]
        if link is None:
            return [self.control.send([t.contiguous()], dst, 0) for t in message]
        if link.fits(message):
            link.send(message, self.peers[dst], self.timeout_s)
            return []
        link.send([head], self.peers[dst], self.timeout_s)
        return [self.control.send([t.contiguous()], dst, 0) for t in tensors]

    def recv_headed(self, src: int, head: torch.Tensor, describe, timeout_s: float) -> list[torch.Tensor]:
        """Receive what `send_headed` sent: the head into `head`, then the tensors `describe(head)` returns, empty,
        and fills in."""
        link = self.into.get(src)
        if link is None:
            self.control.recv([head], src, 0).wait(timedelta(seconds=timeout_s))
            tensors = describe(head)
            for tensor in tensors:
                self.control.recv([tensor], src, 0).wait()
            return tensors
        message = link.receive(self.peers[src], timeout_s)
        message.read(head)
        tensors = describe(head)
        if link.fits([head, *tensors]):
            for tensor in tensors:
                message.read(tensor)
            message.done()
            return tensors
        message.done()
        for tensor in tensors:
            self.control.recv([tensor], src, 0).wait()
        return tensors

    def recv(self, src: int, tensors, control: bool = False, spin_s: float = SPIN_S) -> None:
        """Receive a message of `src` into the tensors, which give its shapes and dtypes; over a link, spin for up
        to `spin_s` before sleeping."""
        link = self.into.get(src)
        if link is not None and all(t.device.type == "cpu" for t in tensors) and link.fits(tensors):
            message = link.receive(self.peers[src], self.timeout_s, spin_s)
            for tensor in tensors:
                message.read(tensor)
            message.done()
            return
        for tensor in tensors:
            if control:
                self.control.recv([tensor], src, 0).wait()
            else:
                dist.recv(tensor, src=src)
