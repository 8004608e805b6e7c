"""Run a test body on N ranks (torch.multiprocessing spawn): gloo on the CPU,
or NCCL with one GPU per rank."""
from __future__ import annotations

import faulthandler
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, backend: str = "gloo"):
    # a native abort in a rank (SIGABRT, SIGSEGV) prints every thread's Python stack to the test's stderr:
    # test_dtensor once died of "double free or corruption" in CI with nothing to say where
    faulthandler.enable(all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        import torch
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    fn(rank, world, *args)
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()
    # Skip interpreter finalization: now and then a native thread (gloo's or
    # OpenMP's) still alive at exit called std::terminate there ("terminate
    # called without an active exception", SIGABRT) after the test had passed.
    os._exit(0)


def spawn(fn, world: int, *args, backend: str = "gloo") -> None:
    """fn(rank, world, *args) on `world` ranks of `backend`; an exception on any rank fails the caller."""
    mp.spawn(_entry, args=(world, free_port(), fn, args, backend), nprocs=world, join=True)
