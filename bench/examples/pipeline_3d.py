"""3-D parallel training (pipeline x data x tensor) with fusedopt, resumable.

    python -m torch.distributed.run --standalone --nproc_per_node=8 --max-restarts=1 \\
        bench/examples/pipeline_3d.py --dir /tmp/run --pp 2 --dp 2 --tp 2 --steps 12 --every 4

A tiny GPT-like model (token embedding, pre-norm MLP blocks, final norm,
output head) on one DeviceMesh ``("pp", "dp", "tp")``: the blocks are cut into
``--pp`` pipeline stages (torch.distributed.pipelining, 1F1B over 4
micro-batches), each block's MLP is tensor parallel over "tp"
(Colwise/Rowwise) and every stage is sharded with FSDP2 over "dp". One
fusedopt.distributed.PipelineOptimizer(FusedAdamW, max_grad_norm=1.0) per rank
steps the stage it holds, clipping by the norm of the whole model; the lr
follows a cosine schedule; ``--fp16`` adds fp16 autocast and
fusedopt.GradScaler (every stage skips an overflowing step together). Every ``--every`` steps all ranks write a DCP
checkpoint (model, optimizer, scheduler step) into <dir>/step_<n> and rank 0
records it in <dir>/latest; a restarted job (torchrun --max-restarts) resumes
from it and, the batches being a function of the step, ends with the weights
of an uninterrupted run. The last stage prints the loss; every rank prints a
memory line (params, grads and optimizer states it holds) at the end; rank 0
of the last stage writes the full final weights to <dir>/final.pt.

Runs on CPU (gloo) or GPUs (NCCL, one per rank). ``--crash-at n`` kills the
last rank (SIGKILL) at step n in the first attempt only: what
tests/test_pipeline.py uses to check the resume.

The model pieces (TinyGPT, stage_of, parallelize) are what a user of
torchtitan writes: the stage is the whole model with the other stages'
layers removed, so its names are the whole model's (the checkpoint's keys do
not depend on the split).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, HIDDEN, SEQ = 64, 32, 64, 8


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyGPT(nn.Module):
    """Embedding, blocks, norm, head; any of them may be None in a stage
    (``layers`` keeps the whole model's keys, so the names do not change)."""

    def __init__(self, layers: int, vocab: int = VOCAB, dim: int = DIM, hidden: int = HIDDEN, tie: bool = False):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleDict({str(i): Block(dim, hidden) for i in range(layers)})
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.tok.weight

    def forward(self, x):
        h = self.tok(x) if self.tok is not None else x
        for layer in self.layers.values():
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h) if self.head is not None else h


def stage_of(model: TinyGPT, stage: int, stages: int, cuts: list[int] | None = None) -> TinyGPT:
    """A copy of `model` with only stage `stage`'s layers: the blocks from
    cuts[stage] to cuts[stage + 1] (an even split by default), the embedding
    on the first stage, norm and head on the last. A tied head gets a copy of
    the embedding's weight of its own (the stages then hold one copy each)."""
    n = len(model.layers)
    cuts = cuts or [round(i * n / stages) for i in range(stages + 1)]
    part = copy.deepcopy(model)
    if model.head is not None and model.tok is not None and model.head.weight is model.tok.weight and stage:
        part.head.weight = nn.Parameter(part.tok.weight.detach().clone())
    keep = {str(i) for i in range(cuts[stage], cuts[stage + 1])}
    for key in [k for k in part.layers if k not in keep]:
        del part.layers[key]
    if stage > 0:
        part.tok = None
    if stage < stages - 1:
        part.norm = part.head = None
    return part


def parallelize(stage: TinyGPT, tp_mesh=None, dp_mesh=None) -> TinyGPT:
    """Tensor parallel MLPs over tp_mesh, then FSDP2 over dp_mesh (per block and the stage)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if tp_mesh is not None:
        for block in stage.layers.values():
            parallelize_module(block, tp_mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    if dp_mesh is not None:
        for block in stage.layers.values():
            fully_shard(block, mesh=dp_mesh)
        fully_shard(stage, mesh=dp_mesh)
    return stage


def batch(step: int, size: int):
    """The step's batch: tokens and next tokens of a fixed rule (learnable)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, VOCAB, (size, SEQ), generator=g)
    return x, (3 * x + 1) % VOCAB


def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def init_process_group(backend: str) -> None:
    """init_process_group on torchrun's store, under a prefix of its own per
    restart (a restarted attempt must not read the dead attempt's addresses)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group(backend, store=dist.PrefixStore(f"pipeline_3d/attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def held_bytes(stage: nn.Module, opt) -> tuple[int, int, int]:
    """(params, grads, optimizer states) bytes this rank holds (local shards)."""
    def local(t):
        return t._local_tensor if hasattr(t, "_local_tensor") else t

    params = sum(local(p).numel() * p.element_size() for p in stage.parameters())
    grads = sum(local(p.grad).numel() * p.grad.element_size() for p in stage.parameters() if p.grad is not None)
    states = sum(local(v).numel() * v.element_size() for s in opt.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor))
    return params, grads, states


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--crash-at", type=int, default=None)
    parser.add_argument("--fp16", action="store_true",
                        help="fp16 autocast with fusedopt.GradScaler (the last stage scales the loss)")
    args = parser.parse_args(argv)

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from fusedopt import FusedAdamW, GradScaler
    from fusedopt.distributed import PipelineOptimizer

    cuda = torch.cuda.is_available()
    init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        torch.set_num_threads(1)
    world = dist.get_world_size()
    if args.pp < 2:
        raise SystemExit("--pp must be at least 2 (a pipeline); without one, train the model whole")
    if args.pp * args.dp * args.tp != world:
        raise SystemExit(f"--pp x --dp x --tp = {args.pp * args.dp * args.tp}, but {world} processes run")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (args.pp, args.dp, args.tp), mesh_dim_names=("pp", "dp", "tp"))
    pp_rank, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    first, last = pp_rank == 0, pp_rank == args.pp - 1

    torch.manual_seed(0)
    stage_module = stage_of(TinyGPT(args.layers), pp_rank, args.pp).to(device)
    parallelize(stage_module, mesh["tp"] if args.tp > 1 else None, mesh["dp"] if args.dp > 1 else None)
    stage = PipelineStage(stage_module, pp_rank, args.pp, device, group=mesh["pp"].get_group())
    # fusedopt's scaler: the stages without the loss never call scale(), and every stage skips together
    scaler = GradScaler(device.type, enabled=args.fp16)
    schedule = Schedule1F1B(stage, args.microbatches, loss_fn=lambda out, y: scaler.scale(loss_fn(out, y)))
    opt = PipelineOptimizer(stage_module, FusedAdamW, pp_group=mesh["pp"], lr=args.lr, weight_decay=0.1,
                            max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))

    start = 0
    latest = args.dir / "latest"
    if latest.exists():  # a restart: continue from the last complete checkpoint
        path = args.dir / latest.read_text().strip()
        state = {"model": get_model_state_dict(stage_module), "optimizer": opt.state_dict(), "step": torch.tensor(0),
                 "scaler": scaler.state_dict()}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(stage_module, state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start = int(state["step"])
        sched.last_epoch = start
        sched._last_lr = [group["lr"] for group in opt.param_groups]
        if dist.get_rank() == 0:
            print(f"resumed from {path.name} at step {start}", flush=True)

    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    for step in range(start, args.steps):
        if args.crash_at == step and dist.get_rank() == world - 1 and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch(step, args.batch)
        x, y = x.chunk(args.dp)[dp_rank].to(device), y.chunk(args.dp)[dp_rank].to(device)
        losses: list = []
        with torch.autocast(device.type, dtype=torch.float16, enabled=args.fp16):
            if first:
                schedule.step(x, target=y if last else None, losses=losses if last else None)
            elif last:
                schedule.step(target=y, losses=losses)
            else:
                schedule.step()
        scale = scaler.get_scale() if args.fp16 else 1.0
        scaler.step(opt)  # opt.step() when not enabled
        scaler.update()
        sched.step()
        held = held_bytes(stage_module, opt)
        if last:  # the mean over the data-parallel ranks' micro-batches
            loss = torch.stack([t.detach().float() for t in losses]).mean() / scale
            if args.dp > 1:
                dist.all_reduce(loss, group=mesh["dp"].get_group())
                loss /= args.dp
        if last and dp_rank == 0 and mesh["tp"].get_local_rank() == 0:
            print(f"step {step:3d} loss {loss.item():.5f} grad_norm {opt.last_grad_norm.item():.5f}", flush=True)
        opt.zero_grad()
        if (step + 1) % args.every == 0:
            name = f"step_{step + 1}"
            dcp.save({"model": get_model_state_dict(stage_module), "optimizer": opt.state_dict(),
                      "step": torch.tensor(step + 1), "scaler": scaler.state_dict()},
                     checkpoint_id=str(args.dir / name))
            dist.barrier()  # every rank's part is written before it counts as the latest
            if dist.get_rank() == 0:
                latest.write_text(name)
    params, grads, states = held  # at the last step, before zero_grad
    print(f"rank {dist.get_rank()} (pp {pp_rank}, dp {dp_rank}, tp {mesh['tp'].get_local_rank()}): "
          f"params {params / 1024:.1f} KiB, grads {grads / 1024:.1f} KiB, optimizer states {states / 1024:.1f} KiB",
          flush=True)
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in stage_module.state_dict().items()}
    gathered = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object({k: v.cpu() for k, v in full.items()}, gathered, dst=0)
    if dist.get_rank() == 0:
        torch.save({k: v for part in gathered for k, v in part.items()}, args.dir / "final.pt")
    dist.barrier()  # tearing gloo down while a peer still talks to it can abort the process
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
