"""fusedopt.distributed.GradBuckets on 2 and 3 gloo ranks, against plain
dist.all_reduce of each grad: odd param sizes, buckets smaller than one param,
a param no rank uses, a param only rank 0 uses, no_sync accumulation, the
reduce_scatter shards and bf16 transfers."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_helpers import spawn

from fusedopt.distributed import GradBuckets

pytestmark = pytest.mark.distributed


class Net(torch.nn.Module):
    """Odd sizes; `unused` never takes part; `rank0_only` only on rank 0."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(7, 13)
        self.unused = torch.nn.Linear(3, 3)
        self.b = torch.nn.Linear(13, 5)
        self.rank0_only = torch.nn.Parameter(torch.randn(11))

    def forward(self, x, rank):
        y = self.b(torch.tanh(self.a(x)))
        if rank == 0:
            y = y + self.rank0_only[:5].sum()
        return y.square().mean()


def make_net():
    torch.manual_seed(0)
    return Net()


def local_grads(net, rank, batches):
    """The grads of `batches` (accumulated) on this rank, without any hooks."""
    net.zero_grad(set_to_none=True)
    for b in batches:
        net(data(rank, b), rank).backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}


def data(rank, batch):
    return torch.randn(4, 7, generator=torch.Generator().manual_seed(100 * rank + batch))


def expected_all_reduce(grads, world):
    """Plain dist.all_reduce per grad (None where no rank has one), then / world."""
    out = {}
    for name, g in grads.items():
        flag = torch.tensor([0.0 if g is None else 1.0])
        dist.all_reduce(flag)
        if flag.item() == 0:
            out[name] = None
            continue
        t = torch.zeros_like(dict(make_net().named_parameters())[name]) if g is None else g.clone()
        dist.all_reduce(t)
        out[name] = t / world
    return out


def expected_low_precision(grads, world, dtype):
    """reduce_dtype's rule: the fp32 sum of every rank's dtype-rounded grad,
    / world, rounded to dtype (unused params as in expected_all_reduce)."""
    out = expected_all_reduce(grads, world)
    for name, g in grads.items():
        if out[name] is None:
            continue
        mine = (torch.zeros_like(out[name]) if g is None else g).to(dtype)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        out[name] = (torch.stack(every).float().sum(0) / world).to(dtype).float()
    return out


def check_all_reduce(rank, world, bucket_cap_mb, reduce_dtype=None, accumulate=False):
    net = make_net()
    batches = [0, 1] if accumulate else [0]
    grads = local_grads(make_net(), rank, batches)
    want = (expected_all_reduce(grads, world) if reduce_dtype is None
            else expected_low_precision(grads, world, reduce_dtype))
    buckets = GradBuckets(net, bucket_cap_mb=bucket_cap_mb, first_bucket_mb=bucket_cap_mb / 2,
                          reduce_dtype=reduce_dtype)
    if accumulate:
        with buckets.no_sync():
            net(data(rank, 0), rank).backward()
        net(data(rank, 1), rank).backward()
    else:
        net(data(rank, 0), rank).backward()
    buckets.wait()
    # the order gloo sums 3 ranks in depends on the buffer's chunking: an ulp or so
    tol = {"rtol": 1e-6, "atol": 1e-8} if reduce_dtype is None else {"rtol": 2**-7, "atol": 1e-30}
    for name, p in net.named_parameters():
        if want[name] is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, want[name], **tol, msg=name)
    assert net.unused.weight.grad is None and net.rank0_only.grad is not None
    return net, buckets


def check_reduce_scatter(rank, world):
    net = make_net()
    want = expected_all_reduce(local_grads(make_net(), rank, [0]), world)
    params = dict(net.named_parameters())
    names = {id(p): n for n, p in params.items()}
    buckets = GradBuckets(net, bucket_cap_mb=200 / 2**20, first_bucket_mb=100 / 2**20, mode="reduce_scatter")
    net(data(rank, 0), rank).backward()
    buckets.wait()
    assert len(buckets.buckets) > 2
    for bucket, shard in zip(buckets.buckets, buckets.shards()):
        flat = torch.zeros(bucket.buffer.numel())
        for p, offset in zip(bucket.params, bucket.offsets):
            g = want[names[id(p)]]
            if g is not None:
                flat[offset:offset + p.numel()] = g.reshape(-1)
        assert shard.numel() * world == bucket.buffer.numel()
        torch.testing.assert_close(shard, flat[bucket.shard_start:bucket.shard_end], rtol=1e-6, atol=1e-8)


def check_released_buckets(rank, world):
    """keep_grads=False: a bucket's full-size buffer goes once its reduction is
    done (at most MAX_IN_FLIGHT reductions at once), and a bucket still
    filling keeps its grads while an earlier one is released."""
    from fusedopt.distributed.grad_buckets import MAX_IN_FLIGHT
    params = [torch.zeros(5, requires_grad=True) for _ in range(4)]
    grads = [torch.randn(5, generator=torch.Generator().manual_seed(10 * rank + i)) for i in range(4)]
    buckets = GradBuckets(params, mode="reduce_scatter", keep_grads=False,
                          layout=[[params[3]], [params[2]], [params[1], params[0]]])
    assert all(b.buffer is None for b in buckets.buckets)
    live = []
    for i in (0, 3, 2, 1):  # the last bucket half filled before the first two launch
        params[i].grad = grads[i].clone()
        buckets._on_grad(params[i])  # what the post-accumulate-grad hook calls
        live.append(sum(b.buffer is not None for b in buckets.buckets))
    assert live == [1, 2, 3, 3 if MAX_IN_FLIGHT >= 3 else 2], live
    buckets.wait()
    assert all(p.grad is None for p in params) and all(b.buffer is None for b in buckets.buckets)
    total = [sum(torch.randn(5, generator=torch.Generator().manual_seed(10 * r + i)) for r in range(world)) / world
             for i in range(4)]
    for bucket, shard in zip(buckets.buckets, buckets.shards()):
        flat = torch.cat([total[next(i for i, q in enumerate(params) if q is p)] for p in bucket.params])
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % world)])
        torch.testing.assert_close(shard, flat[bucket.shard_start:bucket.shard_end], rtol=1e-6, atol=1e-7)


def worker(rank, world):
    check_released_buckets(rank, world)
    # every bucket smaller than one param (each param alone), then a few params per bucket
    check_all_reduce(rank, world, bucket_cap_mb=16 / 2**20)
    net, buckets = check_all_reduce(rank, world, bucket_cap_mb=400 / 2**20)
    # grads live in the buffers: no second copy
    assert any(net.a.weight.grad.data_ptr() == b.buffer.data_ptr() + o * 4
               for b in buckets.buckets for p, o in zip(b.params, b.offsets) if p is net.a.weight)
    # a second round (grads set to None in between) reduces the new grads only
    net.zero_grad(set_to_none=True)
    net(data(rank, 5), rank).backward()
    buckets.wait()
    want = expected_all_reduce(local_grads(make_net(), rank, [5]), world)
    torch.testing.assert_close(net.b.weight.grad, want["b.weight"], rtol=1e-6, atol=1e-8)
    check_all_reduce(rank, world, bucket_cap_mb=400 / 2**20, accumulate=True)
    check_all_reduce(rank, world, bucket_cap_mb=1.0, reduce_dtype=torch.bfloat16)
    check_reduce_scatter(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_grad_buckets(world):
    spawn(worker, world)


def bucket_layout(rank, world):
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 300, 5, 7)]
    buckets = GradBuckets(params, bucket_cap_mb=1250 / 2**20, first_bucket_mb=40 / 2**20)
    # reverse order; the first bucket capped at 40 B (10 fp32), the others at 1250 B
    assert [[p.numel() for p in b.params] for b in buckets.buckets] == [[7], [5, 300], [10]]
    assert all(b.buffer.numel() % world == 0 for b in buckets.buckets)
    # every grad used: each bucket is launched during backward, before wait()
    sum((p * (rank + 1)).sum() for p in params).backward()
    assert all(b.launched for b in buckets.buckets)
    buckets.wait()
    mean = sum(range(1, world + 1)) / world
    assert all(torch.equal(p.grad, torch.full_like(p, mean)) for p in params)
    with pytest.raises(RuntimeError, match="inside no_sync"):
        with buckets.no_sync():
            buckets.wait()


def test_bucket_layout_and_errors():
    spawn(bucket_layout, 2)


def test_errors_without_a_process_group():
    with pytest.raises(ValueError, match="mode"):
        GradBuckets([torch.nn.Parameter(torch.zeros(2))], mode="broadcast")
    with pytest.raises(ValueError, match="reduce_dtype"):
        GradBuckets([torch.nn.Parameter(torch.zeros(2))], reduce_dtype=torch.int8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        GradBuckets([torch.nn.Parameter(torch.zeros(2))])


# --- ZeroOptimizer ---------------------------------------------------------------


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(7, 13)
        self.b = torch.nn.Linear(13, 5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).square().mean()


def small():
    torch.manual_seed(0)
    return Small()


def global_batch(step, world):
    """12 rows: equal shares for 1, 2 and 3 ranks (the mean of the ranks' mean
    losses is then the global batch's mean loss)."""
    return torch.randn(12, 7, generator=torch.Generator().manual_seed(step))


def zero_worker(rank, world, stage, bucket_cap_mb=25):
    from fusedopt import FusedAdamW
    from fusedopt.distributed import ZeroOptimizer

    kwargs = {"lr": 0.05, "weight_decay": 0.1, "max_grad_norm": 0.05}
    single, model = small(), small()
    ref = FusedAdamW(single.parameters(), **kwargs)
    opt = ZeroOptimizer(model.parameters(), stage=stage, bucket_cap_mb=bucket_cap_mb, **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    live = []  # during backward (hooks after the optimizer's): full-size grad buffers that exist
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(
            lambda p: live.append(sum(b.buffer is not None for b in opt.grads.buckets)))
    for step in range(4):
        x = global_batch(step, world)
        single(x).backward()  # the global batch's mean loss
        ref.step()
        ref.zero_grad()
        ref_sched.step()
        model(x.chunk(world)[rank]).backward()  # this rank's equal share of it
        opt.step()
        opt.zero_grad()
        sched.step()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.05 * 0.25
    assert (len(opt.grads.buckets) > 2) == (bucket_cap_mb < 1)
    if stage == 2:  # only the shards of the grads are kept between steps
        assert all(p.grad is None for p in model.parameters())
        assert all(b.buffer is None for b in opt.grads.buckets)
        # and during backward each bucket's full-size buffer goes once its reduction is done:
        # at most MAX_IN_FLIGHT being reduced plus the one filling
        from fusedopt.distributed.grad_buckets import MAX_IN_FLIGHT
        n_buckets = len(opt.grads.buckets)
        assert max(live) <= min(n_buckets, MAX_IN_FLIGHT + 1), (live, n_buckets)
        if n_buckets > MAX_IN_FLIGHT + 1:
            assert min(live) < n_buckets
    assert opt.last_grad_norm is not None
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # this rank holds 1/N of the state: its shard of the zero-padded flat buffer
    total = sum(p.numel() for p in model.parameters())
    local = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
    assert local == 2 * (-(-total // world))
    # GradScaler's found_inf on one rank only: every rank skips the step
    before = [p.detach().clone() for p in model.parameters()]
    model(global_batch(9, world).chunk(world)[rank]).backward()
    opt.found_inf = torch.tensor(1.0 if rank == 0 else 0.0)
    opt.step()
    del opt.found_inf
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # a same-world-size checkpoint continues identically
    saved = opt.state_dict()
    again_model = small()
    with torch.no_grad():
        for p, q in zip(again_model.parameters(), model.parameters()):
            p.copy_(q)
    again = ZeroOptimizer(again_model.parameters(), stage=stage, **kwargs)
    again.load_state_dict(saved)
    for m, o in ((model, opt), (again_model, again)):
        o.zero_grad()
        m(global_batch(11, world).chunk(world)[rank]).backward()
        o.step()
    for p, q in zip(model.parameters(), again_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_matches_single_process(world, stage):
    spawn(zero_worker, world, stage)


def train_side_by_side(single, ref, model, opt, rank, world, batch=lambda x: x, steps=4):
    """`steps` steps of the single process (the global batch) and of this rank
    (its share), each optimizer stepping and zeroing its own model."""
    for step in range(steps):
        x = batch(global_batch(step, world))
        single(x).backward()
        ref.step()
        ref.zero_grad()
        model(x.chunk(world)[rank]).backward()
        opt.step()
        opt.zero_grad()


def zero_fp64_worker(rank, world):
    """fp64 params: the clip coefficient stays fp64 through ZeRO's global norm
    (a review found it rounded to fp32 there: 4e-8 from the single process)."""
    from fusedopt import FusedAdamW
    from fusedopt.distributed import ZeroOptimizer

    single, model = small().double(), small().double()
    ref = FusedAdamW(single.parameters(), **KW)
    opt = ZeroOptimizer(model.parameters(), stage=2, **KW)
    train_side_by_side(single, ref, model, opt, rank, world, batch=torch.Tensor.double)
    assert opt.last_grad_norm.dtype == torch.float64
    torch.testing.assert_close(opt.last_grad_norm, ref.last_grad_norm, rtol=1e-12, atol=0)
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_zero_fp64():
    spawn(zero_fp64_worker, 2)


def zero_nccl_worker(rank, world):
    """ZeRO stage 1 and 2 on NCCL (one GPU per rank) == single-process FusedAdamW on the GPU."""
    from fusedopt import FusedAdamW
    from fusedopt.distributed import ZeroOptimizer

    device = torch.device("cuda", rank)
    kwargs = {"lr": 0.05, "weight_decay": 0.1, "max_grad_norm": 0.05}
    for stage in (1, 2):
        single, model = small().to(device), small().to(device)
        ref = FusedAdamW(single.parameters(), **kwargs)
        opt = ZeroOptimizer(model.parameters(), stage=stage, bucket_cap_mb=200 / 2**20, **kwargs)
        assert opt.optimizer.backend == "cuda"
        train_side_by_side(single, ref, model, opt, rank, world, batch=lambda x: x.to(device))
        for (name, p), q in zip(model.named_parameters(), single.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, one per rank)")
def test_zero_on_nccl():
    spawn(zero_nccl_worker, 2, backend="nccl")


@pytest.mark.parametrize("world,stage", [(3, 2), (2, 1)])
def test_zero_small_buckets(world, stage):
    """Buckets of ~200 B (a bias, or part of a layer: pieces that straddle
    shard boundaries, reduced with uneven splits in stage 2)."""
    spawn(zero_worker, world, stage, 200 / 2**20)


def zero_master_worker(rank, world):
    """bf16 params with fp32 masters: each rank holds 1/N of the masters too,
    and the run matches a single-process FusedAdamW(master_weights=True).
    With master_weights="remainder" the shards keep int16 remainders that
    rebuild the same masters bit for bit (the all-gather that rewrites the
    params is not taken for an outside change)."""
    from fusedopt import FusedAdamW
    from fusedopt.distributed import ZeroOptimizer

    single, net, twin = small().bfloat16(), small().bfloat16(), small().bfloat16()
    ref = FusedAdamW(single.parameters(), lr=0.05, master_weights=True)
    opt = ZeroOptimizer(net.parameters(), stage=2, lr=0.05, master_weights=True)
    rem = ZeroOptimizer(twin.parameters(), stage=2, lr=0.05, master_weights="remainder")
    for step in range(3):
        x = global_batch(step, world).bfloat16()
        single(x).float().backward()
        ref.step()
        ref.zero_grad()
        for model, zero in ((net, opt), (twin, rem)):
            model(x.chunk(world)[rank]).float().backward()
            zero.step()
            zero.zero_grad()
    shards = [(a, b) for ga, gb in zip(opt.optimizer.param_groups, rem.optimizer.param_groups)
              for a, b in zip(ga["params"], gb["params"])]
    assert shards
    for a, b in shards:
        assert rem.optimizer.state[b]["master_remainder"].dtype == torch.int16
        assert torch.equal(rem.optimizer.master_param(b).view(torch.int32),
                           opt.optimizer.state[a]["master_param"].view(torch.int32))
    full, twin_full = opt.full_state_dict(), rem.full_state_dict()  # (int16 states gathered as bytes on gloo)
    if rank == 0:
        from fusedopt.reference import remainder
        for i, p in enumerate(twin.parameters()):
            assert torch.equal(remainder.join(p.detach(), twin_full["state"][i]["master_remainder"]).view(torch.int32),
                               full["state"][i]["master_param"].view(torch.int32)), i
    for p, q in zip(net.parameters(), single.parameters()):
        # the mean over ranks of bf16 grads is not the bf16 grad of the mean: a bf16 ulp or two
        torch.testing.assert_close(p.float(), q.float(), rtol=2**-6, atol=2**-8)
    total = sum(p.numel() for p in net.parameters())
    masters = sum(s["master_param"].numel() for s in opt.state.values())
    assert masters == -(-total // world)


@pytest.mark.parametrize("world", [2, 3])
def test_zero_shards_master_weights(world):
    spawn(zero_master_worker, world)


def zero_scaler_worker(rank, world):
    """GradScaler with ZeroOptimizer: the same weights and scales as a
    single-process FusedAdamW with GradScaler; an inf on one rank only makes
    every rank skip the step and halve its scale."""
    import warnings

    from fusedopt import FusedAdamW
    from fusedopt.distributed import ZeroOptimizer

    warnings.filterwarnings("ignore", "GradScaler is going to stop", FutureWarning)
    single, net = small(), small()
    ref = FusedAdamW(single.parameters(), lr=0.05, max_grad_norm=0.05)
    opt = ZeroOptimizer(net.parameters(), stage=2, lr=0.05, max_grad_norm=0.05)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    for step in range(4):
        x = global_batch(step, world)
        ref_scaler.scale(single(x)).backward()
        ref_scaler.step(ref)
        ref_scaler.update()
        ref.zero_grad()
        scaler.scale(net(x.chunk(world)[rank])).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert scaler.get_scale() == ref_scaler.get_scale() == 2.0**14
    for p, q in zip(net.parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in net.parameters()]
    x = global_batch(7, world).chunk(world)[rank].clone()
    if rank == 0:
        x[0, 0] = float("inf")
    scaler.scale(net(x)).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**13  # on every rank
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("world", [2, 3])
def test_zero_with_grad_scaler(world):
    spawn(zero_scaler_worker, world)


# --- ZeroOptimizer checkpoints: save at 2 ranks, load at 3 and at 1 ----------------

KW = {"lr": 0.05, "weight_decay": 0.1, "max_grad_norm": 0.05}


def train(model, opt, world, rank, steps, start=0):
    for step in range(start, start + steps):
        x = global_batch(step, world)
        loss = model(x) if rank is None else model(x.chunk(world)[rank])
        loss.backward()
        opt.step()
        opt.zero_grad()


def reference_after(steps, world):
    """Single-process FusedAdamW on the same global batches."""
    from fusedopt import FusedAdamW

    model = small()
    opt = FusedAdamW(model.parameters(), **KW)
    train(model, opt, world, None, steps)
    return model, opt


def save_worker(rank, world, path):
    import torch.distributed.checkpoint as dcp

    from fusedopt.distributed import ZeroOptimizer

    model = small()
    opt = ZeroOptimizer(model.parameters(), stage=2, **KW)
    train(model, opt, world, rank, 3)
    dcp.save({"optimizer": opt.state_dict()}, checkpoint_id=f"{path}/dcp")
    full = opt.full_state_dict()
    if rank == 0:
        torch.save({"model": model.state_dict(), "full": full}, f"{path}/full.pt")
        _, ref = reference_after(3, world)
        mine = dict(enumerate(model.parameters()))
        for i, p in mine.items():  # full_state_dict: the single-process optimizer's state, its layout
            want = ref.state[list(ref.param_groups[0]["params"])[i]]
            assert full["state"][i]["exp_avg"].shape == p.shape
            for name in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(full["state"][i][name], want[name], rtol=1e-5, atol=1e-7)
        assert full["param_groups"][0]["params"] == [0, 1, 2, 3] and full["param_groups"][0]["lr"] == KW["lr"]
    else:
        assert full is None


def load_worker(rank, world, path, saved_world, source):
    import torch.distributed.checkpoint as dcp

    from fusedopt.distributed import ZeroOptimizer

    saved = torch.load(f"{path}/full.pt", weights_only=True)
    model = small()
    model.load_state_dict(saved["model"])
    opt = ZeroOptimizer(model.parameters(), stage=2, **KW)
    if source == "sharded":
        template = {"optimizer": opt.state_dict()}  # exists before the first step
        dcp.load(template, checkpoint_id=f"{path}/dcp")
        opt.load_state_dict(template["optimizer"])
    else:
        opt.load_state_dict(saved["full"])
    # the global batch is the same whatever the world size: continue on it
    for step in range(3, 5):
        x = global_batch(step, saved_world)
        model(x.chunk(world)[rank]).backward()
        opt.step()
        opt.zero_grad()
    ref, _ = reference_after(5, saved_world)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_zero_checkpoints_reshard(tmp_path):
    """Saved at 2 ranks (sharded through torch.distributed.checkpoint, and
    full), loaded at 3 and at 1 rank: training continues as if uninterrupted;
    the full state_dict equals the single-process optimizer's, and a plain
    torch.optim.AdamW continues from it too."""
    spawn(save_worker, 2, str(tmp_path))
    for world in (3, 1):
        for source in ("sharded", "full"):
            spawn(load_worker, world, str(tmp_path), 2, source)
    # the full dict in a plain torch.optim.AdamW (the global batch of 2 ranks, in one process)
    saved = torch.load(tmp_path / "full.pt", weights_only=True)
    model = small()
    model.load_state_dict(saved["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=KW["lr"], weight_decay=KW["weight_decay"])
    opt.load_state_dict(saved["full"])
    for step in range(3, 5):
        model(global_batch(step, 2)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), KW["max_grad_norm"])
        opt.step()
        opt.zero_grad()
    ref, _ = reference_after(5, 2)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# --- ZeroOptimizer(FusedMuon): whole matrices on owner ranks --------------------------


class MuonNet(torch.nn.Module):
    """Tall, square, wide and 3-D matrices (Muon), biases and an embedding (AdamW)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 8)
        self.a = torch.nn.Linear(8, 13)
        self.b = torch.nn.Linear(13, 13)
        self.c = torch.nn.Linear(13, 5, bias=False)
        self.experts = torch.nn.Parameter(torch.randn(3, 4, 6) * 0.3)

    def forward(self, idx):
        h = torch.tanh(self.b(torch.tanh(self.a(self.emb(idx).mean(1)))))
        mixed = torch.einsum("bi,eij->bej", h[:, :4], self.experts)
        return self.c(h).square().mean() + mixed.square().mean()


def muon_net():
    torch.manual_seed(0)
    return MuonNet()


def muon_groups(net, lr=0.02):
    return [{"params": [net.emb.weight], "use_muon": False, "lr": lr / 2},
            {"params": [p for n, p in net.named_parameters() if n != "emb.weight"]}]


def muon_batch(step):
    return torch.randint(0, 11, (12, 5), generator=torch.Generator().manual_seed(step))


MUON_KW = {"lr": 0.02, "weight_decay": 0.1, "max_grad_norm": 0.3}


def muon_steps(net, opt, rank, world, steps, scaler=None, start=0):
    for step in range(start, start + steps):
        x = muon_batch(step)
        loss = net(x) if rank is None else net(x.chunk(world)[rank])
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()


def zero_muon_worker(rank, world, path):
    """ZeroOptimizer(FusedMuon), stages 1 and 2, == one process's FusedMuon:
    each matrix stepped on one owner, the rest in element-wise shards; the
    clip norm, GradScaler, a skipped step; full and sharded (DCP, resharded
    to world - 1 ranks) checkpoints."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from fusedopt import FusedMuon
    from fusedopt.distributed import ZeroOptimizer

    warnings.filterwarnings("ignore", "GradScaler is going to stop", FutureWarning)
    for ns_dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-4)):
        single = muon_net()
        ref = FusedMuon(muon_groups(single), ns_dtype=ns_dtype, **MUON_KW)
        muon_steps(single, ref, None, world, 4)
        for stage in (1, 2):
            net = muon_net()
            opt = ZeroOptimizer(muon_groups(net), FusedMuon, stage=stage, ns_dtype=ns_dtype, bucket_cap_mb=0.0005,
                                **MUON_KW)
            muon_steps(net, opt, rank, world, 4)
            for (name, p), q in zip(net.named_parameters(), single.parameters()):
                torch.testing.assert_close(p, q, rtol=0, atol=tol, msg=f"{name} {ns_dtype} stage {stage}")
            torch.testing.assert_close(opt.last_grad_norm, ref.last_grad_norm, rtol=1e-6, atol=0)
    # every matrix has its momentum on exactly one rank; the work is spread
    matrices = [p for n, p in net.named_parameters() if p.ndim >= 2 and n != "emb.weight"]
    held = torch.tensor([sum("momentum_buffer" in s for s in opt.state.values())])
    counts = [torch.zeros(1, dtype=held.dtype) for _ in range(world)]
    dist.all_gather(counts, held)
    assert sum(int(c) for c in counts) == len(matrices) and min(int(c) for c in counts) >= 1, counts
    # the full state_dict is the single process's, loadable by it
    full = opt.full_state_dict()
    if rank == 0:
        want = ref.state_dict()
        assert full["param_groups"][0]["use_muon"] is False
        for i, state in want["state"].items():
            assert set(full["state"][i]) == set(state), (i, set(full["state"][i]), set(state))
            for name, value in state.items():
                torch.testing.assert_close(full["state"][i][name], value, rtol=0, atol=1e-4, msg=f"{i} {name}")
        FusedMuon(muon_groups(muon_net())).load_state_dict(full)
    # an inf on one rank: every rank skips
    before = [p.detach().clone() for p in net.parameters()]
    net(muon_batch(9).chunk(world)[rank]).backward()
    opt.found_inf = torch.tensor(1.0 if rank == 0 else 0.0)
    opt.step()
    del opt.found_inf
    opt.zero_grad()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    # bf16 params with fp32 masters (matrices' whole on their owners, the rest in shards): every bf16 param is
    # its master rounded, and the masters stay within a step's size (lr) of one process's: the bf16 grads are
    # averaged over the ranks in another order, and both Newton-Schulz (small singular directions) and AdamW's
    # normalised step (small grads) make those last-bit differences large (the fp32 cases above are exact)
    single, net, twin = muon_net().bfloat16(), muon_net().bfloat16(), muon_net().bfloat16()
    ref = FusedMuon(muon_groups(single), master_weights=True, **MUON_KW)
    opt = ZeroOptimizer(muon_groups(net), FusedMuon, master_weights=True, **MUON_KW)
    rem = ZeroOptimizer(muon_groups(twin), FusedMuon, master_weights="remainder", **MUON_KW)
    muon_steps(single, ref, None, world, 3)
    muon_steps(net, opt, rank, world, 3)
    muon_steps(twin, rem, rank, world, 3)
    full, twin_full = opt.full_state_dict(), rem.full_state_dict()
    if rank == 0:
        ours, theirs = ([p for g in muon_groups(m) for p in g["params"]] for m in (net, single))  # numbering order
        for i, (p, q) in enumerate(zip(ours, theirs)):
            master = full["state"][i]["master_param"]
            assert master.dtype == torch.float32 and torch.equal(p.detach(), master.to(torch.bfloat16)), i
            torch.testing.assert_close(master, ref.state[q]["master_param"], rtol=0, atol=MUON_KW["lr"],
                                       msg=lambda m, i=i: f"master of param {i}: {m}")
        # master_weights="remainder" under ZeRO: int16 remainders that rebuild the same masters bit for bit
        for i, (p, t) in enumerate(zip(ours, [p for g in muon_groups(twin) for p in g["params"]])):
            low = twin_full["state"][i]["master_remainder"]
            assert low.dtype == torch.int16 and "master_param" not in twin_full["state"][i], i
            from fusedopt.reference import remainder
            assert torch.equal(remainder.join(t.detach(), low).view(torch.int32),
                               full["state"][i]["master_param"].view(torch.int32)), i
    # GradScaler (power-of-two scale, no overflow): the unscaled run's bits
    plain, scaled = muon_net(), muon_net()
    plain_opt = ZeroOptimizer(muon_groups(plain), FusedMuon, **MUON_KW)
    scaled_opt = ZeroOptimizer(muon_groups(scaled), FusedMuon, **MUON_KW)
    muon_steps(plain, plain_opt, rank, world, 2)
    muon_steps(scaled, scaled_opt, rank, world, 2, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), scaled.parameters()))
    # a full state_dict loads on every rank (each owner takes its matrices), and training goes on as one process
    single = muon_net()
    ref = FusedMuon(muon_groups(single), **MUON_KW)
    muon_steps(single, ref, None, world, 3)
    net = muon_net()
    net.load_state_dict(single.state_dict())
    opt = ZeroOptimizer(muon_groups(net), FusedMuon, **MUON_KW)
    opt.load_state_dict(ref.state_dict())
    muon_steps(single, ref, None, world, 2, start=3)
    muon_steps(net, opt, rank, world, 2, start=3)
    for (name, p), q in zip(net.named_parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4, msg=f"full checkpoint: {name}")
    # sharded through DCP at `world` ranks, loaded at world - 1 (other owners, other cuts)
    dcp.save({"optimizer": opt.state_dict()}, checkpoint_id=f"{path}/muon")
    model_state = {k: v.clone() for k, v in net.state_dict().items()}
    muon_steps(net, opt, rank, world, 2, start=5)
    sub = dist.new_group(list(range(world - 1)))
    if rank < world - 1:
        again = muon_net()
        again.load_state_dict(model_state)
        resumed = ZeroOptimizer(muon_groups(again), FusedMuon, process_group=sub, **MUON_KW)
        template = {"optimizer": resumed.state_dict()}
        dcp.load(template, checkpoint_id=f"{path}/muon", process_group=sub)
        resumed.load_state_dict(template["optimizer"])
        # the global batch is the same whatever the world size
        for step in (5, 6):
            again(muon_batch(step).chunk(world - 1)[rank]).backward()
            resumed.step()
            resumed.zero_grad()
        for (name, p), q in zip(again.named_parameters(), net.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-4, msg=f"resharded checkpoint: {name}")
    dist.barrier()


@pytest.mark.parametrize("world", [2, 3])
def test_zero_muon(world, tmp_path):
    spawn(zero_muon_worker, world, str(tmp_path))


# --- ZeroOptimizer: the edges a review found ----------------------------------------


def zero_edges_worker(rank, world):
    import gc

    from fusedopt import FusedAdafactor, FusedAdamW, FusedLAMB
    from fusedopt.distributed import ZeroOptimizer

    # inner optimizers that are not elementwise are refused (one shard mixes several params)
    for cls in (FusedLAMB, FusedAdafactor):
        with pytest.raises(TypeError, match="not elementwise"):
            ZeroOptimizer(small().parameters(), cls, lr=0.1)
    from fusedopt import FusedMuon

    with pytest.raises(ValueError, match="FP8 momentum"):
        ZeroOptimizer(small().parameters(), FusedMuon, lr=0.1, state_dtype=torch.float8_e4m3fn)

    # max_grad_norm with a rank whose shard is all padding (2 elements over 3 ranks), after zero_grad
    torch.manual_seed(0)
    tiny, ref_tiny = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    ref_tiny.load_state_dict(tiny.state_dict())
    opt = ZeroOptimizer(tiny.parameters(), stage=2, lr=0.1, max_grad_norm=0.01)
    ref = FusedAdamW(ref_tiny.parameters(), lr=0.1, max_grad_norm=0.01)
    for step in range(3):
        x = global_batch(step, world)[:, :1]
        ref_tiny(x).square().mean().backward()
        ref.step()
        ref.zero_grad()
        tiny(x.chunk(world)[rank]).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip(tiny.parameters(), ref_tiny.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    # step hooks run; add_param_group is refused
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    tiny(global_batch(5, world)[:, :1].chunk(world)[rank]).square().mean().backward()
    opt.step()
    assert calls == ["pre", "post"]
    with pytest.raises(NotImplementedError, match="build a new ZeroOptimizer"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    del opt
    gc.collect()  # its grad hooks go with it

    for stage in (1, 2):
        model, single = small(), small()
        opt = ZeroOptimizer(model.parameters(), stage=stage, **KW)
        ref = FusedAdamW(single.parameters(), **KW)
        # a backward whose grads are discarded (zero_grad without step), then a normal step
        model(global_batch(0, world).chunk(world)[rank]).backward()
        opt.zero_grad()
        # a bad lr raises before the grads are reduced and freed: fixed, the step goes on
        model(global_batch(1, world).chunk(world)[rank]).backward()
        opt.param_groups[0]["lr"] = float("nan")
        with pytest.raises(ValueError, match="lr=nan"):
            opt.step()
        opt.param_groups[0]["lr"] = KW["lr"]
        opt.step()
        opt.zero_grad()
        single(global_batch(1, world)).backward()
        ref.step()
        ref.zero_grad()
        for p, q in zip(model.parameters(), single.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        # a full state_dict loaded back gives itself back, whatever order each rank keeps its states in
        full = opt.full_state_dict()
        full = [full] if rank == 0 else [None]
        dist.broadcast_object_list(full, src=0)
        opt.load_state_dict(full[0])
        if rank == 1:  # another rank, another order of its states
            for state in opt.optimizer.state.values():
                items = list(state.items())
                state.clear()
                state.update(reversed(items))
        again = opt.full_state_dict()
        if rank == 0:
            for i, entry in full[0]["state"].items():
                for name, value in entry.items():
                    torch.testing.assert_close(again["state"][i][name], value, rtol=0, atol=0, msg=name)
        opt.remove_hooks()  # the next ZeroOptimizer on these params has the hooks to itself
        second = ZeroOptimizer(model.parameters(), stage=stage, **KW)
        model(global_batch(2, world).chunk(world)[rank]).backward()
        second.step()


def test_zero_edges():
    """LAMB/Adafactor refused; max_grad_norm with an all-padding shard; step
    hooks; add_param_group refused; zero_grad after a discarded backward; a
    bad lr raises before the grads are consumed; full_state_dict with states
    held in another order on each rank; hooks removed for a second wrapper."""
    spawn(zero_edges_worker, 3)


# --- fault tolerance ----------------------------------------------------------------


def run_elastic(directory, *extra):
    import os
    import subprocess
    import sys

    from fusedopt._resources import shipped_module

    script = shipped_module("bench", "examples.zero_elastic").__file__
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           script, "--dir", str(directory), "--steps", "10", "--every", "4", *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_killed_rank_resumes_from_the_last_checkpoint(tmp_path):
    """bench/examples/zero_elastic.py under torchrun --max-restarts=1: rank 1
    is killed at step 6; the restarted job resumes from the step-4 checkpoint
    and ends with the weights of an uninterrupted run, bit for bit."""
    plain, crashed = tmp_path / "plain", tmp_path / "crashed"
    run_elastic(plain)
    log = run_elastic(crashed, "--crash-at", "6")
    assert "resumed from step_4 at step 4" in log
    want = torch.load(plain / "final.pt", weights_only=True)
    got = torch.load(crashed / "final.pt", weights_only=True)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
