"""The floor of an expert-group exchange on this machine: send/recv round trips between one
"replica" process and 1 or 2 "shard" processes over the group's CPU backends (`socket`:
deployments/socket_mesh.py; `gloo`: a torch.distributed gloo group), with nothing else in the loop
(no experts, no Ray, no engine), and gloo's all-reduce.

Each round the replica sends each shard one packed message the size of a decode row of the expert
group's wire format (`deployments/expert_group.py`: a 32-byte header, `rows x hidden` hidden states
in fp32, int32 expert ids, fp32 gate scores) and waits for the replies (`rows x hidden` fp32) of the
shards that reply. The shards loop: post a receive, wait, reply. All sends and receives of a round
are posted before any wait, as the expert group does. Modes:

- `1 peer`: one shard (2 processes);
- `2 peers, both reply`: two shards, each gets rows and replies;
- `2 peers, one replies`: two shards, one gets rows and replies, the other gets a header only (what a
  batch-1 step of the expert group does with top-1 routing: one shard owns the expert hit);
- `allreduce x3` (gloo): an all-reduce of 3 int64 among the 3 processes.

    python bench/group_floor.py                 # both backends, 1 row of width 256 (small-scout), 2000 rounds each
    python bench/group_floor.py --pin           # each process on its own core (os.sched_setaffinity)
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADER_BYTES = 32


def _request_bytes(rows: int, hidden: int) -> int:
    return HEADER_BYTES + rows * hidden * 4 + rows * 4 + rows * 4


def _pin(rank: int, pin: bool) -> None:
    if pin:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})


class _Mesh:
    """A `SocketMesh` behind the process group's send/recv calls."""

    def __init__(self, store, rank: int, world: int):
        from deployments.socket_mesh import SocketMesh

        self.mesh = SocketMesh(store, rank, world, 1, 60, "127.0.0.1")
        store.add("addressed", 1)
        while store.add("addressed", 0) < world:
            time.sleep(0.001)
        self.mesh.connect()

    def send(self, tensors, dst: int, tag: int):
        return self.mesh.send(tensors[0], dst, tag)

    def recv(self, tensors, src: int, tag: int):
        return self.mesh.recv(tensors[0], src, tag)


def _group(rank: int, world: int, port: int, backend: str):
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    if backend == "socket":
        return _Mesh(store, rank, world)
    pg = dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=60))
    pg.allreduce([torch.zeros(1)]).wait()
    return pg


def _shard(rank: int, world: int, port: int, args, replies: bool) -> None:
    torch.set_num_threads(1)
    _pin(rank, args.pin)
    pg = _group(rank, world, port, args.backend)
    req = torch.empty(_request_bytes(args.rows, args.hidden), dtype=torch.uint8)
    out = torch.zeros(args.rows, args.hidden)
    for mode in args.modes_for_run:
        while True:
            if args.backend == "socket":  # exact-size receives: the header, then the rows it announces
                pg.recv([req[:HEADER_BYTES]], 0, 0).wait()
                n = int(req[:8].view(torch.int64)[0])
                if n > 0:
                    pg.recv([req[HEADER_BYTES:]], 0, 0).wait()
            else:
                pg.recv([req], 0, 0).wait()
                n = int(req[:8].view(torch.int64)[0])
            if n < 0:  # end of this mode
                break
            if n and replies:
                pg.send([out], 0, 0).wait()
        if mode == "allreduce":
            flags = torch.zeros(3, dtype=torch.int64)
            for _ in range(args.warmup + args.rounds):
                pg.allreduce([flags]).wait()


def _replica(world: int, port: int, args, replying: list[int], queue) -> None:
    torch.set_num_threads(args.threads)
    _pin(0, args.pin)
    pg = _group(0, world, port, args.backend)
    shards = list(range(1, world))
    req = torch.zeros(_request_bytes(args.rows, args.hidden), dtype=torch.uint8)
    head = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    replies = {s: torch.empty(args.rows, args.hidden) for s in replying}
    req[:8].view(torch.int64)[0] = args.rows
    times = []
    for it in range(args.warmup + args.rounds):
        t0 = time.perf_counter()
        works = [pg.send([req if s in replying else head], s, 0) for s in shards]
        works += [pg.recv([replies[s]], s, 0) for s in replying]
        for w in works:
            w.wait()
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
    stop = torch.full((HEADER_BYTES // 8,), -1, dtype=torch.int64).view(torch.uint8)
    for s in shards:
        pg.send([stop], s, 0).wait()
    result = {"rounds": times}
    if args.modes_for_run[-1] == "allreduce":
        flags = torch.zeros(3, dtype=torch.int64)
        ar = []
        for it in range(args.warmup + args.rounds):
            t0 = time.perf_counter()
            pg.allreduce([flags]).wait()
            if it >= args.warmup:
                ar.append(time.perf_counter() - t0)
        result["allreduce"] = ar
    queue.put(result)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(args, peers: int, replying: list[int], allreduce: bool) -> dict:
    ctx = mp.get_context("spawn")
    world = peers + 1
    port = _free_port()
    args.modes_for_run = ["allreduce" if allreduce else "p2p"]
    queue = ctx.Queue()
    procs = [ctx.Process(target=_shard, args=(r, world, port, args, r in replying), daemon=True)
             for r in range(1, world)]
    for p in procs:
        p.start()
    rep = ctx.Process(target=_replica, args=(world, port, args, replying, queue), daemon=True)
    rep.start()
    result = queue.get(timeout=600)
    for p in [rep, *procs]:
        p.join(timeout=60)
    return result


def summary(times: list[float]) -> str:
    ms = sorted(1e3 * t for t in times)
    return f"{statistics.median(ms):7.3f} / {ms[int(0.9 * (len(ms) - 1))]:7.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1, help="rows per message (default 1: a decode row)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size, fp32 (default 256: small-scout, 1 KiB)")
    ap.add_argument("--rounds", type=int, default=2000, help="timed round trips per mode (default 2000)")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the replica process (default 1)")
    ap.add_argument("--pin", action="store_true", help="pin process i to core i mod cores (sched_setaffinity)")
    ap.add_argument("--backends", nargs="+", choices=["socket", "gloo"], default=["socket", "gloo"])
    args = ap.parse_args()
    print(f"round trips: {args.rows} row(s) x {args.hidden} fp32 "
          f"({_request_bytes(args.rows, args.hidden)} B out, {args.rows * args.hidden * 4} B back per replying "
          f"peer); {os.cpu_count()} CPUs; pinned: {args.pin}; load average (1 min) {os.getloadavg()[0]:.1f}",
          flush=True)
    print(f"  {'backend':8s} {'mode':24s} {'p50 / p90 ms':>17s}")
    for backend in args.backends:
        args.backend = backend
        for name, peers, replying, allreduce in [("1 peer", 1, [1], False),
                                                 ("2 peers, both reply", 2, [1, 2], False),
                                                 ("2 peers, one replies", 2, [1], backend == "gloo")]:
            r = run_mode(args, peers, replying, allreduce)
            print(f"  {backend:8s} {name:24s} {summary(r['rounds'])}", flush=True)
            if "allreduce" in r:
                print(f"  {backend:8s} {'allreduce x3 (3 int64)':24s} {summary(r['allreduce'])}", flush=True)
    print(f"  load average (1 min) {os.getloadavg()[0]:.1f} at the end", file=sys.stderr)


if __name__ == "__main__":
    main()
