"""Fault-tolerant ZeRO training: checkpoint every k steps, resume after a restart.

    python -m torch.distributed.run --standalone --nproc_per_node=2 --max-restarts=1 \\
        bench/examples/zero_elastic.py --dir /tmp/run --steps 12 --every 4

A small MLP on a fixed synthetic regression task, FusedAdamW sharded with
ZeroOptimizer (stage 2) over gloo (CPU) or NCCL (GPU). Every `--every` steps all
ranks write a checkpoint with torch.distributed.checkpoint (the sharded
optimizer state, the model, the step) into <dir>/step_<n>, and rank 0 then
records it in <dir>/latest. When torchrun restarts the job (a rank died), each
rank loads the latest checkpoint and continues from its step; the batches are
a function of the step, so the run ends with the weights an uninterrupted run
ends with. Rank 0 writes them to <dir>/final.pt.

`--crash-at n` kills rank 1 (SIGKILL) when it reaches step n, in the first
attempt only: what tests/test_distributed.py uses to check the resume.
"""
from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from fusedopt.distributed import ZeroOptimizer


def batch(step: int, rank: int, world: int, device):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8 * world, 16, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)


def init_process_group(backend: str) -> None:
    """init_process_group on torchrun's store, under a prefix of its own per
    restart: a restarted attempt must not read the addresses the previous
    attempt's (dead) ranks left in the store (gloo then fails to connect)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group(backend, store=dist.PrefixStore(f"zero_elastic/attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--crash-at", type=int, default=None)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1)).to(device)
    opt = ZeroOptimizer(model.parameters(), stage=2, lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)

    start = 0
    latest = args.dir / "latest"
    if latest.exists():  # a restart: continue from the last complete checkpoint
        path = args.dir / latest.read_text().strip()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=str(path))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed from {path.name} at step {start}", flush=True)

    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    for step in range(start, args.steps):
        if args.crash_at == step and rank == 1 and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch(step, rank, world, device)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % args.every == 0:
            name = f"step_{step + 1}"
            dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                      "step": torch.tensor(step + 1)}, checkpoint_id=str(args.dir / name))
            dist.barrier()  # every rank's part is written before it counts as the latest
            if rank == 0:
                latest.write_text(name)
        if rank == 0:
            print(f"step {step:3d} loss {loss.item():.5f}", flush=True)
    if rank == 0:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, args.dir / "final.pt")
    dist.barrier()  # tearing gloo down while a peer still talks to it can abort the process
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
