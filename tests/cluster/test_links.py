"""Shared-memory links between two real processes, and the Messenger's choice between a link and a gloo group."""

import os
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cluster.links import SHM_DIR, Link, LinkError, LinkSpec, Messenger, PeerProcess, plan_links
from jamba import native
from jamba.distributed import bound_store

pytestmark = pytest.mark.skipif(native.kernels() is None or not os.path.isdir(SHM_DIR),
                                reason="links need the native kernels and /dev/shm")

REPO = Path(__file__).resolve().parents[2]

# The echo process: opens the link to it, creates the link back, and returns every message with its tensors
# plus one, `count` times. Message i is a float32 (i + 1, 3) tensor and an int64 (5,) tensor.
ECHO = """
import sys, time, torch
from cluster.links import Link, PeerProcess
to_echo, back, count, parent = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
link_in = Link(to_echo, 4096, create=False)
Link.remove(to_echo)
link_out = Link(back, 4096, create=True)
peer = PeerProcess(parent, "the test")
for i in range(count):
    message = link_in.receive(peer, 30)
    values, ids = message.read(torch.empty(i + 1, 3)), message.read(torch.empty(5, dtype=torch.long))
    message.done()
    link_out.send([values + 1, ids + 1], peer, 30)
if count == 0:
    time.sleep(60)  # silent until killed
"""


def start_echo(count: int):
    """Start the echo process; return it with the links to it and back."""
    token = uuid.uuid4().hex[:8]
    to_echo, back = f"{SHM_DIR}/jamba-test-{token}-a", f"{SHM_DIR}/jamba-test-{token}-b"
    link_out = Link(to_echo, 4096, create=True)
    process = subprocess.Popen([sys.executable, "-c", ECHO, to_echo, back, str(count), str(os.getpid())],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while not os.path.exists(back):
        assert process.poll() is None, "the echo process exited during setup"
        assert time.monotonic() < deadline, "the echo process did not create its link within 60 s"
        time.sleep(0.01)
    link_in = Link(back, 4096, create=False)
    Link.remove(back)
    return process, link_out, link_in


def test_link_round_trips_between_processes():
    process, link_out, link_in = start_echo(count=40)
    peer = PeerProcess(process.pid, "echo")
    try:
        for i in range(40):
            values = torch.randn(3, i + 1).t()  # not contiguous
            ids = torch.arange(5) * i
            link_out.send([values, ids], peer, 30)
            message = link_in.receive(peer, 30)
            echoed_values = message.read(torch.empty(i + 1, 3))
            echoed_ids = message.read(torch.empty(5, dtype=torch.long))
            message.done()
            assert torch.equal(echoed_values, values + 1)
            assert torch.equal(echoed_ids, ids + 1)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        peer.close()
    assert not os.path.exists(link_out.path)  # the receiver removed the name


def test_wait_ends_when_peer_exits():
    process, link_out, link_in = start_echo(count=0)
    peer = PeerProcess(process.pid, "echo")
    try:
        process.kill()
        started = time.monotonic()
        with pytest.raises(LinkError, match=rf"echo \(pid {process.pid}\) exited"):
            link_in.receive(peer, timeout_s=30)
        assert time.monotonic() - started < 5
    finally:
        peer.close()


def test_peer_exit_seen_without_pidfd(monkeypatch):
    process, _, _ = start_echo(count=0)
    monkeypatch.delattr(os, "pidfd_open")
    peer = PeerProcess(process.pid, "echo")
    assert peer.alive()
    process.kill()
    deadline = time.monotonic() + 5
    while peer.alive():  # a zombie until this process reaps it
        assert time.monotonic() < deadline, "a killed process still looks alive after 5 s"
        time.sleep(0.01)
    process.wait()
    assert not peer.alive()


def test_wait_times_out_for_silent_peer():
    process, link_out, link_in = start_echo(count=0)
    peer = PeerProcess(process.pid, "echo")
    try:
        started = time.monotonic()
        with pytest.raises(LinkError, match="timed out after 0.3 s waiting for echo to send a message"):
            link_in.receive(peer, timeout_s=0.3)
        assert 0.3 <= time.monotonic() - started < 5

        # One message fits; the second waits for the first to be read, which never happens.
        link_out.send([torch.ones(1, 3), torch.zeros(5, dtype=torch.long)], peer, 1)
        with pytest.raises(LinkError, match="timed out after 0.3 s waiting for echo to read the previous message"):
            link_out.send([torch.ones(1, 3), torch.zeros(5, dtype=torch.long)], peer, 0.3)
    finally:
        process.kill()
        process.wait()
        peer.close()


# The other rank of the gloo group below: echoes a small message (over the link) and a large one (over the group).
MESSENGER_PEER = """
import sys, torch
from datetime import timedelta
import torch.distributed as dist
from cluster.links import LinkSpec, Messenger
port, links, parent = int(sys.argv[1]), eval(sys.argv[2]), int(sys.argv[3])
store = dist.TCPStore("127.0.0.1", port, 2, False, timedelta(seconds=60), use_libuv=False)
messenger = Messenger(1, dist.ProcessGroupGloo(store, 1, 2, timedelta(seconds=60)), 60)
messenger.create_links(links)
store.set("created 1", "1")
store.wait(["created 0"])
messenger.open_links(links, [parent, 0], ["the test", "this process"])
for size in (8, 4096):
    message = torch.empty(size)
    messenger.recv(0, [message], control=True)
    for work in messenger.send(0, [message * 2], control=True):
        work.wait()
"""


def test_oversized_message_takes_group():
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store, port = bound_store("127.0.0.1", 2, 60)
    token = uuid.uuid4().hex[:8]
    links = [LinkSpec(0, 1, f"{SHM_DIR}/jamba-test-{token}-0-1", 256),
             LinkSpec(1, 0, f"{SHM_DIR}/jamba-test-{token}-1-0", 256)]
    process = subprocess.Popen([sys.executable, "-c", MESSENGER_PEER, str(port), repr(links), str(os.getpid())],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo"})
    messenger = Messenger(0, None, 60)
    try:
        messenger.control = dist.ProcessGroupGloo(store, 0, 2, timedelta(seconds=60))
        messenger.create_links(links)
        store.set("created 0", "1")
        store.wait(["created 1"])
        messenger.open_links(links, [os.getpid(), process.pid], ["this process", "the peer"])

        for size in (8, 4096):  # 32 bytes fit in the link, 16 KiB do not
            sent = torch.arange(size, dtype=torch.float32)
            for work in messenger.send(1, [sent], control=True):
                work.wait()
            echoed = torch.empty(size)
            messenger.recv(1, [echoed], control=True)
            assert torch.equal(echoed, sent * 2)
        assert messenger.out[1]._count == 1  # only the small message took the link
        assert messenger.into[1]._count == 1
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        messenger.close()


def test_short_shm_means_no_links(monkeypatch, caplog):
    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    pairs = {(0, 1): 1 << 20, (1, 0): 1 << 20, (1, 2): 1 << 20}
    with caplog.at_level("WARNING", logger="cluster.links"):
        assert plan_links(["a", "a", "a"], [True] * 3, pairs) == []
    assert "fewer than the" in caplog.text


def test_links_only_within_node_between_capable_ranks():
    pairs = {(0, 1): 4096, (1, 0): 4096, (1, 2): 4096, (2, 1): 4096, (0, 3): 4096, (3, 0): 4096}
    links = plan_links(["a", "a", "b", "a"], [True, True, True, False], pairs)
    assert [(link.src, link.dst) for link in links] == [(0, 1), (1, 0)]


def test_full_shm_fails_link_creation(monkeypatch):
    def no_room(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    path = f"{SHM_DIR}/jamba-test-{uuid.uuid4().hex[:8]}"
    with pytest.raises(OSError, match="shared_memory=False"):
        Link(path, 4096, create=True)
    assert not os.path.exists(path)
