"""fusedopt.distributed.PipelineOptimizer and clip_grad_norm_ over pipeline
stages (torch.distributed.pipelining on gloo): every run is checked against
the same optimizer on the whole model in one process. One spawn per layout
(PP=2 on 2 ranks; PP x FSDP2 and PP x TP on 4), many cases inside."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from dist_helpers import spawn

from fusedopt import FusedAdamW, FusedLAMB, FusedMuon
from fusedopt._resources import shipped_module

example = shipped_module("bench", "examples.pipeline_3d")
TinyGPT, stage_of, batch, loss_fn = example.TinyGPT, example.stage_of, example.batch, example.loss_fn

pytestmark = pytest.mark.distributed

LAYERS, MICRO, BATCH, STEPS = 4, 4, 8, 3
KWARGS = {FusedAdamW: dict(lr=1e-2, weight_decay=0.1, max_grad_norm=0.5),
          FusedLAMB: dict(lr=1e-2, weight_decay=0.01, max_grad_norm=0.5),
          # fp32 Newton-Schulz: micro-batches sum the grads in another order, which a bf16 rounding could magnify
          FusedMuon: dict(lr=2e-2, weight_decay=0.1, max_grad_norm=0.5, ns_dtype=torch.float32)}


def close(a, b, what, rtol=2e-5, atol=2e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def model(seed: int = 0, tie: bool = False) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(LAYERS, tie=tie)


def reference(whole: TinyGPT, opt_class, steps: int, first: int = 0, **kwargs):
    """The whole model in one process: (grad norm of each step, the model)."""
    opt = opt_class(whole.parameters(), **kwargs)
    out = []
    for step in range(first, first + steps):
        x, y = batch(step, BATCH)
        loss_fn(whole(x), y).backward()
        opt.step()
        out.append(opt.last_grad_norm.clone())
        opt.zero_grad()
    return out, whole


def run_pipeline(stage_module, rank: int, stages: int, group, opt, steps: int, schedule_class, *, first: int = 0,
                 dp=None, after_backward=None):
    """`steps` steps of a pipeline schedule + opt.step(); the grad norm of each
    step. stage_module: this rank's stage, or {stage index: module} for a
    multi-stage schedule (the first stage on rank 0, the last on the last rank)."""
    from torch.distributed.pipelining import PipelineStage

    parts = stage_module if isinstance(stage_module, dict) else {rank: stage_module}
    built = [PipelineStage(m, i, stages, torch.device("cpu"), group=group) for i, m in parts.items()]
    schedule = schedule_class(built if isinstance(stage_module, dict) else built[0], MICRO, loss_fn=loss_fn)
    last_rank = group.size() - 1
    out = []
    for step in range(first, first + steps):
        x, y = batch(step, BATCH)
        if dp is not None:  # (dp rank, dp size): this rank's part of the batch
            x, y = x.chunk(dp[1])[dp[0]], y.chunk(dp[1])[dp[0]]
        if rank == 0:
            schedule.step(x)
        elif rank == last_rank:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
        if after_backward is not None:
            after_backward()
        opt.step()
        out.append(opt.last_grad_norm.clone() if opt.last_grad_norm is not None else None)
        opt.zero_grad()
    return out


def check_params(stage_module, whole, what):
    wanted = dict(whole.named_parameters(remove_duplicate=False))
    for name, p in stage_module.named_parameters():
        # micro-batches sum the grads in another order, and Adam's and LAMB's normalised steps magnify
        # that where a grad is near 0: fp32 tolerance on the params
        close(full(p.detach()), wanted[name].detach(), f"{what}: {name}", rtol=1e-4, atol=2e-5)


# --- PP=2 -------------------------------------------------------------------------


def pp2_worker(rank, world, directory):
    import torch.distributed as dist
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    import fusedopt
    from fusedopt.distributed import PipelineOptimizer, clip_grad_norm_, mark_shared

    torch.set_num_threads(1)
    group = dist.group.WORLD

    # params and the clip norm of every step equal the whole model's, for AdamW, LAMB and Muon
    for opt_class in (FusedAdamW, FusedLAMB, FusedMuon):
        want_norms, whole = reference(model(), opt_class, STEPS, **KWARGS[opt_class])
        for schedule in (ScheduleGPipe, Schedule1F1B):
            part = stage_of(model(), rank, 2)
            opt = PipelineOptimizer(part, opt_class, pp_group=group, **KWARGS[opt_class])
            norms = run_pipeline(part, rank, 2, group, opt, STEPS, schedule)
            what = f"PP=2 {schedule.__name__} {opt_class.__name__}"
            for step, (got, want) in enumerate(zip(norms, want_norms)):
                close(got, want, f"{what}: grad norm of step {step}")
            check_params(part, whole, what)
            assert all(n > KWARGS[opt_class]["max_grad_norm"] for n in want_norms)  # clipping took effect

    # the collectives of a step: one all-reduce for the norm and GradScaler's flag together, none without either
    count_collectives = shipped_module("bench", "pipeline").count_collectives
    part = stage_of(model(), rank, 2)
    for p in part.parameters():
        p.grad = torch.ones_like(p)
    clipping = PipelineOptimizer(part, FusedAdamW, pp_group=group, max_grad_norm=1.0)
    assert count_collectives(clipping.step) == 1
    clipping.grad_scale, clipping.found_inf = torch.ones(()), torch.zeros(())  # as GradScaler hands them
    assert count_collectives(clipping.step) == 1
    assert count_collectives(PipelineOptimizer(part, FusedAdamW, pp_group=group).step) == 0

    # an interleaved schedule: two stages on each rank (0 and 2 on rank 0, 1 and 3 on rank 1), one optimizer
    from torch.distributed.pipelining import ScheduleInterleaved1F1B

    want_norms, whole = reference(model(), FusedAdamW, STEPS, **KWARGS[FusedAdamW])
    parts = {i: stage_of(model(), i, 4) for i in (rank, rank + 2)}
    opt = PipelineOptimizer(list(parts.values()), FusedAdamW, pp_group=group, **KWARGS[FusedAdamW])
    assert len(opt.param_groups[0]["params"]) == sum(len(list(m.parameters())) for m in parts.values())
    norms = run_pipeline(parts, rank, 4, group, opt, STEPS, ScheduleInterleaved1F1B)
    for step, (got, want) in enumerate(zip(norms, want_norms)):
        close(got, want, f"interleaved: grad norm of step {step}")
    for part in parts.values():
        check_params(part, whole, "interleaved")

    # a tied embedding / head held by both stages: counted once in the norm, both copies stepped alike
    want_norms, whole = reference(model(tie=True), FusedAdamW, STEPS, **KWARGS[FusedAdamW])
    part = stage_of(model(tie=True), rank, 2)
    tied = part.tok.weight if rank == 0 else part.head.weight
    mark_shared(tied, "embedding")

    def sum_tied_grads():  # the model's job: both copies get the sum of both uses
        dist.all_reduce(tied.grad, group=group)

    opt = PipelineOptimizer(part, FusedAdamW, pp_group=group, **KWARGS[FusedAdamW])
    assert opt.optimizer._across_stages.uncounted == ({id(tied)} if rank == 1 else set())
    norms = run_pipeline(part, rank, 2, group, opt, STEPS, ScheduleGPipe, after_backward=sum_tied_grads)
    for step, (got, want) in enumerate(zip(norms, want_norms)):
        close(got, want, f"tied: grad norm of step {step}")
    check_params(part, whole, "tied")
    close(tied.detach(), whole.tok.weight.detach(), "tied copy")
    # the same tie named by the shared= argument instead of mark_shared
    part = stage_of(model(tie=True), rank, 2)
    opt = PipelineOptimizer(part, FusedAdamW, pp_group=group, shared=[("tok.weight", "head.weight")])
    assert opt.optimizer._across_stages.uncounted == ({id(part.head.weight)} if rank == 1 else set())

    # clip_grad_norm_ over the stages: the whole model's norm and clipped grads (2-norm and inf-norm)
    for norm_type in (2.0, math.inf):
        whole = model()
        x, y = batch(0, BATCH)
        loss_fn(whole(x), y).backward()
        want = torch.nn.utils.clip_grad_norm_(whole.parameters(), 0.3, norm_type)
        part = stage_of(model(), rank, 2)
        opt = PipelineOptimizer(part, FusedAdamW, pp_group=group)  # no clipping, no scaler: no collective
        clipped = {}

        def clip():
            clipped["norm"] = clip_grad_norm_(part.parameters(), 0.3, norm_type, pp_group=group)
            clipped["grads"] = {n: p.grad.clone() for n, p in part.named_parameters()}

        run_pipeline(part, rank, 2, group, opt, 1, ScheduleGPipe, after_backward=clip)
        close(clipped["norm"], want, f"clip_grad_norm_ over stages, norm_type={norm_type}")
        grads = dict(whole.named_parameters())
        for name, g in clipped["grads"].items():
            close(g, grads[name].grad, f"clipped grad {name}")
    with pytest.raises(TypeError, match="ProcessGroup"):
        clip_grad_norm_(part.parameters(), 1.0, pp_group="pp")

    # GradScaler: an inf in stage 1's grads makes both stages skip and keep the same scale
    for scaler_class, opt_class in ((torch.amp.GradScaler, FusedAdamW), (fusedopt.GradScaler, FusedAdamW),
                                    (fusedopt.GradScaler, FusedMuon)):
        scaler = scaler_class("cpu", init_scale=2.0**10)
        if rank == 0 and scaler_class is torch.amp.GradScaler:  # torch's needs scale() on a stage without the loss
            scaler.scale(torch.zeros(()))
        part = stage_of(model(), rank, 2)
        opt = PipelineOptimizer(part, opt_class, pp_group=group, **KWARGS[opt_class])

        def poison():
            if rank == 1 and poison.on:
                part.head.weight.grad[0, 0] = math.inf

        from torch.distributed.pipelining import PipelineStage
        stage = PipelineStage(part, rank, 2, torch.device("cpu"), group=group)
        schedule = ScheduleGPipe(stage, MICRO, loss_fn=lambda out, y: scaler.scale(loss_fn(out, y)))
        for step, bad in enumerate((False, True, False)):
            before = {n: p.detach().clone() for n, p in part.named_parameters()}
            x, y = batch(step, BATCH)
            schedule.step(x) if rank == 0 else schedule.step(target=y, losses=[])
            poison.on = bad
            poison()
            with pytest.warns(FutureWarning, match="GradScaler"):
                scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            changed = any(not torch.equal(before[n], p) for n, p in part.named_parameters())
            assert changed != bad, f"{scaler_class.__name__} {opt_class.__name__} step {step}: rank {rank} " \
                                   f"stepped={changed}"
            scales = [None, None]
            dist.all_gather_object(scales, scaler.get_scale(), group=group)
            assert scales[0] == scales[1] == 2.0**10 * (0.5 if step else 1.0), scales

    # a stage with no grads under GradScaler, without clipping: it still joins the flag's all-reduce
    scaler = fusedopt.GradScaler("cpu", init_scale=2.0**10)
    part = stage_of(model(), rank, 2)
    opt = PipelineOptimizer(part, FusedAdamW, pp_group=group)
    if rank == 1:
        for p in part.parameters():
            p.grad = torch.full_like(p, math.inf if p is part.head.weight else 1.0)
    with pytest.warns(FutureWarning, match="GradScaler"):
        scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9  # rank 0 saw rank 1's inf

    # a DCP checkpoint at PP=2: continued at another cut of the blocks, and (by the test) in one process
    import torch.distributed.checkpoint as dcp

    kwargs = KWARGS[FusedAdamW]
    part = stage_of(model(), rank, 2)
    opt = PipelineOptimizer(part, FusedAdamW, pp_group=group, **kwargs)
    run_pipeline(part, rank, 2, group, opt, 2, Schedule1F1B)
    dcp.save({"model": part.state_dict(), "optim": opt.state_dict()}, checkpoint_id=f"{directory}/ckpt")
    run_pipeline(part, rank, 2, group, opt, 2, Schedule1F1B, first=2)
    uninterrupted = {n: p.detach().clone() for n, p in part.named_parameters()}
    torch.save(uninterrupted, f"{directory}/final_{rank}.pt")
    # stage 0 now holds block 0 only, stage 1 blocks 1-3 (the checkpoint's split was 2 + 2)
    part = stage_of(model(seed=1), rank, 2, cuts=[0, 1, LAYERS])
    opt = PipelineOptimizer(part, FusedAdamW, pp_group=group, **kwargs)
    state = {"model": part.state_dict(), "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=f"{directory}/ckpt")
    part.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    run_pipeline(part, rank, 2, group, opt, 2, Schedule1F1B, first=2)
    finals = [None, None]
    dist.all_gather_object(finals, uninterrupted, group=group)
    want = {k: v for f in finals for k, v in f.items()}
    for name, p in part.named_parameters():
        close(p.detach(), want[name], f"resumed at another cut: {name}")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's load in one process
def test_pipeline_two_stages(tmp_path):
    """PP=2 on 2 ranks (GPipe and 1F1B, 4 micro-batches): AdamW and LAMB with
    max_grad_norm equal the whole model in one process (params, the clip
    norm of every step); a tied embedding/head counted once;
    clip_grad_norm_ over the stages; GradScaler with an inf in one stage
    (every stage skips, same scale); DCP checkpoints continued at another
    cut of the blocks, and here in one process (pp_group=None)."""
    spawn(pp2_worker, 2, str(tmp_path))
    import torch.distributed.checkpoint as dcp

    from fusedopt.distributed import PipelineOptimizer

    whole = model(seed=1)
    opt = PipelineOptimizer(whole, FusedAdamW, **KWARGS[FusedAdamW])
    state = {"model": whole.state_dict(), "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    whole.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    assert int(opt.state[whole.tok.weight]["step"]) == 2
    for step in (2, 3):
        x, y = batch(step, BATCH)
        loss_fn(whole(x), y).backward()
        opt.step()
        opt.zero_grad()
    want = {**torch.load(tmp_path / "final_0.pt"), **torch.load(tmp_path / "final_1.pt")}
    for name, p in whole.named_parameters():
        close(p.detach(), want[name], f"resumed in one process: {name}")


# --- PP x FSDP2, PP x TP ------------------------------------------------------------


def pp_2d_worker(rank, world, directory):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import Schedule1F1B

    from fusedopt.distributed import PipelineOptimizer

    torch.set_num_threads(1)
    for inner in ("dp", "tp"):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", inner))
        pp_rank, inner_rank = mesh["pp"].get_local_rank(), mesh[inner].get_local_rank()
        dp = (inner_rank, 2) if inner == "dp" else None

        def build(opt_class, cuts=None, seed=0):
            part = stage_of(model(seed), pp_rank, 2, cuts)
            example.parallelize(part, tp_mesh=mesh["tp"] if inner == "tp" else None,
                                dp_mesh=mesh["dp"] if inner == "dp" else None)
            assert any(hasattr(p, "placements") for p in part.parameters())
            return part, PipelineOptimizer(part, opt_class, pp_group=mesh["pp"], **KWARGS[opt_class])

        for opt_class in (FusedAdamW, FusedLAMB):
            want_norms, whole = reference(model(), opt_class, STEPS, **KWARGS[opt_class])
            part, opt = build(opt_class)
            norms = run_pipeline(part, pp_rank, 2, mesh["pp"].get_group(), opt, STEPS, Schedule1F1B, dp=dp)
            what = f"PP=2 x {inner.upper()}=2 {opt_class.__name__}"
            for step, (got, want) in enumerate(zip(norms, want_norms)):
                close(got, want, f"{what}: grad norm of step {step}")
            check_params(part, whole, what)
            states = opt.state_dict()
            assert any(hasattr(v, "placements") for k, v in states.items() if k.endswith("exp_avg")), what

        # a DCP checkpoint written at PP=2 x FSDP2=2 (2 + 2 blocks) continues at PP=2 x TP=2 (1 + 3 blocks)
        _, whole = reference(model(), FusedAdamW, STEPS + 2, **KWARGS[FusedAdamW])
        if inner == "dp":
            part, opt = build(FusedAdamW)
            run_pipeline(part, pp_rank, 2, mesh["pp"].get_group(), opt, STEPS, Schedule1F1B, dp=dp)
            dcp.save({"model": get_model_state_dict(part), "optim": opt.state_dict()},
                     checkpoint_id=f"{directory}/fsdp")
        else:
            part, opt = build(FusedAdamW, cuts=[0, 1, LAYERS], seed=1)
            state = {"model": get_model_state_dict(part), "optim": opt.state_dict()}
            dcp.load(state, checkpoint_id=f"{directory}/fsdp")
            set_model_state_dict(part, state["model"])
            opt.load_state_dict(state["optim"])
            run_pipeline(part, pp_rank, 2, mesh["pp"].get_group(), opt, 2, Schedule1F1B, first=STEPS)
            check_params(part, whole, "PP=2 x FSDP2=2 checkpoint continued at PP=2 x TP=2, another cut")


def test_pipeline_with_fsdp_and_tensor_parallel(tmp_path):
    """PP=2 x FSDP2=2 and PP=2 x TP=2 on 4 ranks: AdamW and LAMB with
    max_grad_norm equal the whole model in one process; states stay DTensors
    in the FQN-keyed state_dict; a DCP checkpoint written at PP=2 x FSDP2=2
    continues at PP=2 x TP=2 with the blocks cut differently."""
    spawn(pp_2d_worker, 4, str(tmp_path))


# --- one process --------------------------------------------------------------------


def test_one_stage_is_the_plain_optimizer():
    """pp_group=None: the plain optimizer (same params, norm); the flat
    FQN-keyed state_dict round-trips; bad arguments raise before anything."""
    import fusedopt
    from fusedopt.distributed import PipelineOptimizer

    kwargs = KWARGS[FusedAdamW]
    want_norms, whole = reference(model(), FusedAdamW, STEPS, **kwargs)
    mine = model()
    opt = PipelineOptimizer(mine, FusedAdamW, **kwargs)
    seen = []
    opt.register_step_post_hook(lambda o, args, kw: seen.append(o))
    for step in range(STEPS):
        x, y = batch(step, BATCH)
        loss_fn(mine(x), y).backward()
        opt.step()
        close(opt.last_grad_norm, want_norms[step], f"norm of step {step}")
        opt.zero_grad()
    assert seen == [opt] * STEPS
    check_params(mine, whole, "pp_group=None")
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)  # drives the inner optimizer's lr
    loss_fn(mine(x), y).backward()
    opt.step()
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == kwargs["lr"] / 2
    sd = opt.state_dict()
    assert set(sd) >= {"state.tok.weight.exp_avg", "state.layers.3.down.bias.step", "param_groups.head.weight.lr"}
    other = PipelineOptimizer(copy.deepcopy(mine), FusedAdamW, lr=0.5)
    other.load_state_dict({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()})
    assert other.param_groups[0]["lr"] == kwargs["lr"] / 2
    for key, value in other.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sd[key]), key
    with pytest.raises(ValueError, match="flat layout"):
        other.load_state_dict(opt.optimizer.state_dict())
    with pytest.raises(ValueError, match="none of this rank's"):  # another model's names: not a silent reset
        other.load_state_dict({"state.foo.bar.exp_avg": torch.zeros(2)})
    assert other.state  # nothing was changed
    # names as torch.distributed.checkpoint gives them, without torch.compile's wrapper prefix
    compiled = PipelineOptimizer(torch.compile(copy.deepcopy(mine)), FusedAdamW)
    assert "state.tok.weight.step" in compiled.state_dict()
    # fusedopt.GradScaler starts a missing scale only for a pipeline stage; elsewhere torch's error stands
    plain = torch.nn.Linear(2, 2)
    plain(torch.ones(1, 2)).sum().backward()
    with pytest.raises(AssertionError, match="scale"):
        fusedopt.GradScaler("cpu").unscale_(FusedAdamW(plain.parameters()))
    with pytest.raises(TypeError, match="fusedopt optimizer"):
        PipelineOptimizer(mine, torch.optim.AdamW)

    # FusedMuon in one stage under GradScaler (which hands it the scale and flag): the plain FusedMuon's
    # steps without a scaler (a power-of-two scale is exact), an inf step skipped; its flat state_dict
    kwargs = KWARGS[FusedMuon]
    want_norms, whole = reference(model(), FusedMuon, STEPS, **kwargs)
    mine = model()
    opt = PipelineOptimizer(mine, FusedMuon, **kwargs)
    scaler = fusedopt.GradScaler("cpu", init_scale=2.0**10)
    for step in range(STEPS + 1):
        x, y = batch(min(step, STEPS - 1), BATCH)
        scaler.scale(loss_fn(mine(x), y)).backward()
        if step == STEPS:  # an inf: skipped, nothing moves
            before = {n: p.detach().clone() for n, p in mine.named_parameters()}
            mine.head.weight.grad[0, 0] = math.inf
        with pytest.warns(FutureWarning, match="GradScaler"):
            scaler.step(opt)
        scaler.update()
        if step < STEPS:
            close(opt.last_grad_norm, want_norms[step], f"FusedMuon under GradScaler: norm of step {step}")
        opt.zero_grad()
    check_params(mine, whole, "FusedMuon under GradScaler")
    assert all(torch.equal(before[n], p) for n, p in mine.named_parameters())
    assert scaler.get_scale() == 2.0**9
    sd = opt.state_dict()
    assert {"state.layers.0.up.weight.momentum_buffer", "state.tok.weight.momentum_buffer",
            "state.layers.0.norm.weight.exp_avg", "state.layers.0.up.bias.step"} <= set(sd), sorted(sd)[:8]
    fresh = PipelineOptimizer(model(), FusedMuon, **kwargs)  # a template: every state exists before a step
    assert set(fresh.state_dict()) == set(sd)
    fresh.load_state_dict({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()})
    for key, value in fresh.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sd[key]), key
    with pytest.raises(TypeError, match="model_parts"):
        PipelineOptimizer([], FusedAdamW)
    with pytest.raises(ValueError, match="different params named"):
        PipelineOptimizer([model(), model()], FusedAdamW)
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})


# --- the 3-D example, killed and resumed -------------------------------------------


def run_example(directory, *extra):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "--max-restarts=1",
           example.__file__, "--dir", str(directory), "--pp", "2", "--dp", "2", "--tp", "1", "--steps", "6",
           "--every", "2", "--fp16", *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_3d_example_resumes_after_a_killed_rank(tmp_path):
    """bench/examples/pipeline_3d.py at a 4-rank cut (PP=2 x FSDP2=2), fp16
    autocast with fusedopt.GradScaler (its state checkpointed too), under
    torchrun --max-restarts=1: the last rank is killed at step 3; the
    restarted job resumes from the step-2 DCP checkpoint and ends with the
    weights of an uninterrupted run, bit for bit."""
    plain, crashed = tmp_path / "plain", tmp_path / "crashed"
    log = run_example(plain)
    assert "step   5 loss" in log and "optimizer states" in log
    log = run_example(crashed, "--crash-at", "3")
    assert "resumed from step_2 at step 2" in log
    want = torch.load(plain / "final.pt", weights_only=True)
    got = torch.load(crashed / "final.pt", weights_only=True)
    assert want.keys() == got.keys() and len(want) == len(dict(TinyGPT(LAYERS).named_parameters()))
    for k in want:
        assert torch.equal(want[k], got[k]), k
