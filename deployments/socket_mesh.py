"""`SocketMesh`: the expert group's point-to-point messages over plain TCP connections, one set per
pair of members (the `socket` backend of deployments/expert_group.py, its default on the CPU).

Why not gloo on the CPU: a gloo send/recv is a rendezvous (the receiver tells the sender its receive
is posted) handed to gloo's own I/O thread, which then wakes the waiting thread: a round trip
replica -> two shards (one replying) of one decode row took 0.21-0.29 ms on the 2-core CPU, the same
bytes over TCP sockets read and written by the waiting threads themselves 0.08-0.10 ms
(bench/group_floor.py; bench/RESULTS.md, "MoE dispatch").
A message here is one `sendall` of its bytes; a receive reads exactly the bytes of the tensor it
fills, so a receiver of variable-size messages reads a header first (as on NCCL).

Each pair of members has `channels` connections: a message tagged `t < channels` goes over
connection `t`, any other tag over connection 0 (the expert group tags replies with their
micro-batch, so two micro-batch threads each read their own connection). Messages of one
connection arrive in the order they were sent.

Forming: each member listens on the address that routes to the rendezvous store's host, publishes
it in the store, and, once everyone has (the caller's barrier), connects to every lower rank and
accepts every higher one (a first message names the connecting rank and channel). Every read and
write has the group's timeout; a member that dies or leaves closes its connections, and a peer
reading from one fails at once (end of stream) rather than at the timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
import time

import torch

_HELLO = struct.Struct("<ii")  # rank, channel of the connecting member


class LinkError(RuntimeError):
    """A connection of the mesh broke, timed out or could not be made."""


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous CPU tensor `t`, shared, not copied: valid while `t` lives. Made with
    ctypes from the data pointer (~0.7 us; through `.view(torch.uint8).numpy()` ~3-5 us, and a batch-1
    exchange makes four of them per shard)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("the socket backend moves contiguous CPU tensors only")
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())) if n else memoryview(b"")


def _read_into(sock: socket.socket, view: memoryview) -> bool:
    """Fill `view` from `sock`; False when the peer ended the stream first (timeouts and resets raise)."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def local_address(peer_host: str) -> str:
    """This machine's address on the interface that routes to `peer_host` (nothing is sent)."""
    family = socket.getaddrinfo(peer_host, 1, type=socket.SOCK_DGRAM)[0][0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((peer_host, 1))
        return s.getsockname()[0]


class _Sent:
    """A send already done (`sendall` returned): waiting is a no-op, as for a completed gloo `Work`."""

    def wait(self, timeout=None) -> bool:
        return True


_SENT = _Sent()


class _Receive:
    """A receive into `t`, carried out by `wait` (in the waiting thread: no hand-off)."""

    def __init__(self, mesh: SocketMesh, sock: socket.socket, t: torch.Tensor, peer: int):
        self.mesh, self.sock, self.view, self.peer = mesh, sock, _bytes(t), peer

    def wait(self, timeout=None) -> bool:
        try:
            whole = _read_into(self.sock, self.view)
        except TimeoutError as e:
            raise LinkError(f"no message from rank {self.peer} within {self.mesh.timeout_s:g} s") from e
        except OSError as e:
            raise LinkError(f"receive from rank {self.peer}: {e}") from e
        if not whole:
            raise LinkError(f"connection closed by rank {self.peer}")
        return True


class SocketMesh:
    def __init__(self, store, rank: int, world_size: int, channels: int, timeout_s: float, store_host: str):
        """Listen and publish this member's address in `store` (call `connect` once every member has)."""
        self.rank, self.world_size, self.channels, self.timeout_s = rank, world_size, channels, timeout_s
        self.store = store
        self.links: dict[int, list[socket.socket]] = {}
        host = local_address(store_host)
        self.listener = socket.create_server((host, 0), family=socket.getaddrinfo(host, 0)[0][0],
                                             backlog=max(1, world_size * channels))
        store.set(f"address/{rank}", f"{host}|{self.listener.getsockname()[1]}")

    def connect(self) -> None:
        """Connect to every lower rank and accept every higher one (`channels` connections each)."""
        deadline = time.monotonic() + self.timeout_s
        try:
            for peer in range(self.rank):
                host, port = self.store.get(f"address/{peer}").decode().split("|")
                self.links[peer] = []
                for channel in range(self.channels):
                    s = socket.create_connection((host, int(port)), timeout=self.timeout_s)
                    self._ready(s).sendall(_HELLO.pack(self.rank, channel))
                    self.links[peer].append(s)
            pending = {(peer, channel) for peer in range(self.rank + 1, self.world_size)
                       for channel in range(self.channels)}
            accepted: dict[tuple[int, int], socket.socket] = {}
            while pending:
                self.listener.settimeout(max(0.001, deadline - time.monotonic()))
                s, _ = self.listener.accept()
                hello = self._read_hello(self._ready(s))
                if hello not in pending:  # not a member of this generation, or a second connection
                    s.close()
                    continue
                pending.discard(hello)
                accepted[hello] = s
            for peer in range(self.rank + 1, self.world_size):
                self.links[peer] = [accepted[(peer, channel)] for channel in range(self.channels)]
        except TimeoutError as e:
            self.close()
            raise LinkError(f"rank {self.rank}: the other members did not connect within {self.timeout_s:g} s") from e
        except OSError as e:
            self.close()
            raise LinkError(f"rank {self.rank}: connecting the mesh: {e}") from e
        finally:
            with contextlib.suppress(OSError):
                self.listener.close()

    def _ready(self, s: socket.socket) -> socket.socket:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(self.timeout_s)
        return s

    def _read_hello(self, s: socket.socket) -> tuple[int, int] | None:
        """(rank, channel) the connecting member names; None when it names nothing within a second."""
        buf = bytearray(_HELLO.size)
        s.settimeout(min(1.0, self.timeout_s))
        try:
            if not _read_into(s, memoryview(buf)):
                return None
        except OSError:  # timed out, or reset
            return None
        s.settimeout(self.timeout_s)
        return _HELLO.unpack(buf)

    def _link(self, peer: int, tag: int) -> socket.socket:
        try:
            return self.links[peer][tag if 0 <= tag < self.channels else 0]
        except KeyError:
            raise LinkError(f"rank {self.rank} has no connection to rank {peer} (closed, or not a member)") from None

    def send(self, t: torch.Tensor, dst: int, tag: int) -> _Sent:
        try:
            self._link(dst, tag).sendall(_bytes(t))
        except TimeoutError as e:
            raise LinkError(f"rank {dst} took no message within {self.timeout_s:g} s") from e
        except OSError as e:
            raise LinkError(f"send to rank {dst}: {e}") from e
        return _SENT

    def recv(self, t: torch.Tensor, src: int, tag: int) -> _Receive:
        """Exactly the bytes of `t`, read when the returned receive is waited for."""
        return _Receive(self, self._link(src, tag), t, src)

    def close(self) -> None:
        """Shut every connection down: peers reading fail at once, and so do threads of this process
        blocked reading one (a plain close would leave them blocked)."""
        links, self.links = self.links, {}
        for socks in links.values():
            for s in socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        with contextlib.suppress(OSError):
            self.listener.close()
