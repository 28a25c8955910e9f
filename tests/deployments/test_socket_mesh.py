"""The socket backend's mesh on real TCP connections (members are threads of this process, each with
its own connections): messages arrive whole and in order per connection, tags pick connections,
a stranger connecting during formation is dropped, a receive times out, and a member that closes
fails its peers' receives at once, including one blocked in another thread of its own process."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
import torch.distributed as dist

from deployments.socket_mesh import LinkError, SocketMesh


def form(world: int, channels: int = 2, timeout_s: float = 10, before_connect=None) -> list[SocketMesh]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    meshes = [SocketMesh(store, rank, world, channels, timeout_s, "127.0.0.1") for rank in range(world)]
    if before_connect is not None:
        before_connect(store)
    errors: list[BaseException] = []

    def connect(m: SocketMesh) -> None:
        try:
            m.connect()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=connect, args=(m,)) for m in meshes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return meshes


def test_messages_arrive_whole_in_order_and_by_tag():
    a, b, c = form(3)
    big = torch.arange(300_000, dtype=torch.float32)  # more than a socket buffer: sent while read
    got_big = torch.empty_like(big)
    reader = threading.Thread(target=lambda: b.recv(got_big, 0, 1).wait())
    reader.start()
    a.send(torch.tensor([1, 2], dtype=torch.int64), 1, 0)
    a.send(torch.tensor([3.5], dtype=torch.bfloat16), 1, 0)
    a.send(big, 1, 1)  # connection 1 of the pair (a's second micro-batch)
    reader.join(30)
    assert torch.equal(got_big, big)
    first, second = torch.empty(2, dtype=torch.int64), torch.empty(1, dtype=torch.bfloat16)
    b.recv(first, 0, 0).wait()
    b.recv(second, 0, 7).wait()  # a tag without a connection of its own shares connection 0
    assert first.tolist() == [1, 2] and second.item() == 3.5
    c.send(torch.ones(3, 4)[:, 1:2].contiguous(), 0, 0)  # any rank to any rank
    col = torch.empty(3, 1)
    a.recv(col, 2, 0).wait()
    assert col.flatten().tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="contiguous CPU"):
        a.send(torch.ones(3, 4)[:, 1], 1, 0)
    for m in (a, b, c):
        m.close()


def test_a_stranger_connecting_during_formation_is_dropped():
    strangers = []

    def knock(store):
        host, port = store.get("address/0").decode().split("|")
        # rank 9 (not a member), garbage, nothing (ended), one byte and silence
        for hello in (b"\x09\x00\x00\x00\x00\x00\x00\x00", b"nonsense", b"", b"1"):
            s = socket.create_connection((host, int(port)))
            s.sendall(hello)
            if not hello:
                s.shutdown(socket.SHUT_WR)
            strangers.append(s)

    a, b = form(2, before_connect=knock)
    a.send(torch.tensor([42]), 1, 0)
    got = torch.empty(1, dtype=torch.int64)
    b.recv(got, 0, 0).wait()
    assert got.item() == 42
    for s in strangers:  # each was closed by the member it knocked at
        s.settimeout(5)
        assert s.recv(1) == b""
        s.close()
    a.close()
    b.close()


def test_a_receive_times_out():
    a, b = form(2, timeout_s=0.3)
    t0 = time.perf_counter()
    with pytest.raises(LinkError, match="no message from rank 1 within 0.3 s"):
        a.recv(torch.empty(1), 1, 0).wait()
    assert time.perf_counter() - t0 < 2
    a.close()
    b.close()


def test_a_closing_member_fails_its_peers_and_its_own_blocked_reader_at_once():
    a, b = form(2, timeout_s=20)
    failures: list[tuple[str, float]] = []

    def read(mesh: SocketMesh, src: int, name: str) -> None:
        try:
            mesh.recv(torch.empty(4), src, 1).wait()
        except LinkError as e:
            failures.append((name, time.perf_counter(), str(e)))

    peer = threading.Thread(target=read, args=(b, 0, "peer"))  # b waits on a
    own = threading.Thread(target=read, args=(a, 1, "own"))  # a thread of a waits on b
    peer.start()
    own.start()
    time.sleep(0.2)
    closed = time.perf_counter()
    a.close()
    peer.join(5)
    own.join(5)
    assert sorted(name for name, _, _ in failures) == ["own", "peer"]
    assert all(when - closed < 2 for _, when, _ in failures)
    assert any("closed by rank 0" in msg for _, _, msg in failures)
    with pytest.raises(LinkError, match="no connection"):
        a.send(torch.ones(1), 1, 0)
    b.close()
