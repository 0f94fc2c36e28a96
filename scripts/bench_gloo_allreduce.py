"""The gloo baseline for `xvlm-worker bench-allreduce`: torch.distributed's gloo all_reduce of an M MiB
float32 buffer across N local processes, with the same definitions (median over iterations of the slowest
rank's time, each iteration after a barrier; algbw = bytes / median; busbw = algbw x 2(N-1)/N).

    python scripts/bench_gloo_allreduce.py --world 4 --mb 64 --iters 10

With `--rank R --master HOST:PORT` it runs only rank R of the world, in this process, with rank 0
listening at HOST:PORT (start one per host or network namespace, as scripts/bench_allreduce_netns.sh
does; set GLOO_SOCKET_IFNAME to the interface the ranks reach each other on); rank 0 prints the line.

Needs a torch that imports. The project's .venv holds the PyPI torch 2.11 wheel for its libtorch only
(installed without its pip dependencies and without the CUDA libraries torch._C links), so to use it add
typing_extensions, filelock, fsspec, sympy, networkx and jinja2 on PYTHONPATH and make the missing
libcudnn/libcublas/... resolvable (gloo itself runs on the CPU and never calls them).
"""

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, world, mib, iters, master, queue):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = (mib << 20) // 4
    t = torch.full((n,), float(rank + 1), dtype=torch.float32)
    dist.all_reduce(t)
    expect = world * (world + 1) / 2
    assert t[-1].item() == expect, f"sum {t[-1].item()}, expected {expect}"
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - start)
    # Per iteration, the slowest rank's time (a tensor max: all_gather_object needs numpy).
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        queue.put(slowest.tolist())
    dist.destroy_process_group()


class Result:
    """Where rank 0 leaves the slowest times when it runs in this process (`--rank`)."""

    def put(self, slowest):
        self.slowest = slowest


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--mb", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rank", type=int, help="run only this rank (needs --master)")
    p.add_argument("--master", help="HOST:PORT where rank 0 listens (with --rank)")
    a = p.parse_args()
    if a.rank is not None:
        if a.master is None or not 0 <= a.rank < a.world:
            p.error("--rank needs --master and must be below --world")
        host, port = a.master.rsplit(":", 1)
        result = Result()
        rank_main(a.rank, a.world, a.mb, a.iters, (host, port), result)
        if a.rank != 0:
            return
        slowest = result.slowest
    else:
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        master = ("127.0.0.1", str(free_port()))
        mp.spawn(rank_main, args=(a.world, a.mb, a.iters, master, queue), nprocs=a.world)
        slowest = queue.get()
    median = statistics.median_high(slowest)  # sorted[iters // 2], as the Rust bench
    nbytes = (a.mb << 20) // 4 * 4
    algbw = nbytes / median / 1e9
    busbw = algbw * 2 * (a.world - 1) / a.world
    print(
        f"allreduce backend=gloo world={a.world} size={a.mb}MiB iters={a.iters} "
        f"median={median * 1e3:.2f}ms algbw={algbw:.3f}GB/s busbw={busbw:.3f}GB/s"
    )


if __name__ == "__main__":
    main()
