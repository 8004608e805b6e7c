"""Every fusedopt optimizer on DTensor params, against the same optimizer in
one process on the whole model: tensor parallel (TP=2), FSDP2 (2 ranks) and
FSDP2 x TP on a 2x2 mesh, on gloo ranks (one spawn per layout, every case
inside it).

The model has dims that do not divide evenly over the ranks (10 and 7 rows,
10 columns), a LayerNorm left plain between the parallel layers (a param
group mixing DTensors and plain tensors under TP), and a head whose single
row leaves some ranks an empty shard under FSDP2.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from dist_helpers import spawn
from optim_db import optimizers

import fusedopt
from fusedopt import FusedAdafactor, FusedAdamW, FusedLAMB, FusedMuon, FusedSophia

pytestmark = pytest.mark.distributed

#: name -> (class, kwargs, backends): every optimizer of optim_db (each of its states switched on), then variants;
#: max_grad_norm small enough to clip at every step
CASES = {name: (cls, {**kwargs, "lr": 0.02, "max_grad_norm": 0.05}, ("cpu", "reference"))
         for name, (cls, kwargs) in optimizers(dtensor=True).items()}
CASES["lamb"] = (*CASES["lamb"][:2], ("cpu", "reference", "triton"))
CASES.update({
    "adamw_master": (FusedAdamW, dict(lr=0.02, weight_decay=0.1, max_grad_norm=0.05, amsgrad=True,
                                      state_dtype=torch.bfloat16), ("cpu",)),
    # the head in a group of its own: under FSDP2 one rank holds only empty shards of it (a bucket with no
    # launch that still joins LAMB's collective)
    "lamb_head_group": (FusedLAMB, dict(lr=0.02, weight_decay=0.01, max_grad_norm=0.05), ("cpu",)),
    "adafactor_no_beta1": (FusedAdafactor, dict(lr=0.02, max_grad_norm=0.05), ("cpu", "reference", "triton")),
})
STEPS = 3
BATCH = 8


class Net(torch.nn.Module):
    """Under FSDP2 x TP the LayerNorm is sequence-parallel over the batch dim
    (its weights Replicate over TP with Partial grads), as torchtitan's norms."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 10)   # colwise under TP: 10 rows
        self.norm = torch.nn.LayerNorm(10)  # stays a plain module under TP
        self.b = torch.nn.Linear(10, 7)   # rowwise under TP: 10 columns
        self.c = torch.nn.Linear(7, 7)    # colwise: 7 rows
        self.head = torch.nn.Linear(7, 1)  # plain; one row: an empty shard under FSDP2

    def forward(self, x):
        x = self.norm(torch.relu(self.a(x)))
        x = self.c(torch.tanh(self.b(x)))
        return self.head(torch.relu(x)).square().mean()


def batch(step):
    return torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(1000 + step))


class Layout:
    """A model on `name`'s layout (its twin in one process beside it)."""

    def __init__(self, name: str, world: int):
        from torch.distributed.device_mesh import init_device_mesh

        self.name = name
        if name == "tp":
            self.mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
            self.tp, self.dp = self.mesh, None
        elif name == "fsdp":
            self.mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
            self.tp, self.dp = None, self.mesh
        else:
            self.mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
            self.tp, self.dp = self.mesh["tp"], self.mesh["dp"]

    def models(self, seed: int = 0, fsdp: bool = True, dtype: torch.dtype = torch.float32):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                       parallelize_module)

        torch.manual_seed(seed)
        single = Net().to(dtype)
        model = copy.deepcopy(single)
        if self.name == "tp":  # the LayerNorm a plain module: groups mix DTensors and plain tensors
            parallelize_module(model, self.tp, {
                "a": ColwiseParallel(output_layouts=Replicate()),
                "b": RowwiseParallel(input_layouts=Replicate()),
                "c": ColwiseParallel(output_layouts=Replicate()),
            })
        elif self.tp is not None:  # as torchtitan: the LayerNorm sequence-parallel (its grads Partial)
            parallelize_module(model, self.tp, {
                "a": ColwiseParallel(output_layouts=Shard(0)),
                "norm": SequenceParallel(sequence_dim=0),
                "b": RowwiseParallel(input_layouts=Shard(0)),
                "c": ColwiseParallel(output_layouts=Replicate()),
            })
        if self.dp is not None and fsdp:
            for module in (model.a, model.norm, model.b, model.c, model.head):
                fully_shard(module, mesh=self.dp)
            fully_shard(model, mesh=self.dp)
        return model, single

    def local_batch(self, step):
        x = batch(step)
        if self.dp is None:
            return x
        return x.chunk(self.dp.size())[self.dp.get_local_rank()]

    def train(self, model, opt, steps, start=0, single=False, hessian=False, dtype=torch.float32):
        for step in range(start, start + steps):
            opt.zero_grad(set_to_none=True)
            model((batch(step) if single else self.local_batch(step)).to(dtype)).backward()
            if hessian and step % 2 == 0:
                opt.update_hessian()
            opt.step()


def full(t):
    return t.full_tensor() if fusedopt.dtensor.is_dtensor(t) else t


def assert_same(model, single, opt=None, single_opt=None, rtol=1e-5, atol=1e-6, what=""):
    """Params (and every state of `opt`) gathered equal the single-process ones."""
    for (name, p), (_, q) in zip(model.named_parameters(), single.named_parameters()):
        torch.testing.assert_close(full(p).detach(), q.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what} {name}: {m}")
        if opt is None:
            continue
        mine, want = opt.state[p], single_opt.state[q]
        assert mine.keys() == want.keys(), (what, name, mine.keys(), want.keys())
        for key, value in want.items():
            got = mine[key]
            if key != "step":
                assert fusedopt.dtensor.is_dtensor(got) == fusedopt.dtensor.is_dtensor(p), (what, name, key)
            torch.testing.assert_close(full(got).float(), value.float(), rtol=rtol, atol=atol,
                                       msg=lambda m: f"{what} {name} {key}: {m}")


def param_groups(model: Net, case: str):
    if not case.endswith("_head_group"):
        return model.parameters()
    head = list(model.head.parameters())
    return [{"params": head}, {"params": [p for p in model.parameters() if all(p is not q for q in head)]}]


def check_optimizers(layout: Layout):
    for case, (cls, kwargs, backends) in CASES.items():
        for backend in backends:
            if backend == "triton" and layout.name != "tp":
                continue  # the interpreter is slow: TP takes it (its local shards are not the whole tensors)
            model, single = layout.models()
            opt = cls(param_groups(model, case), backend=backend, **kwargs)
            single_opt = cls(param_groups(single, case), backend=backend, **kwargs)
            hessian = cls is FusedSophia
            layout.train(model, opt, STEPS, hessian=hessian)
            layout.train(single, single_opt, STEPS, single=True, hessian=hessian)
            assert_same(model, single, opt, single_opt, what=f"{layout.name} {case} {backend}")
            torch.testing.assert_close(opt.last_grad_norm, single_opt.last_grad_norm, rtol=1e-5, atol=0)


def check_remainders(layout: Layout):
    """master_weights="remainder" on the layout's DTensor (and plain) bf16
    params: the remainders are DTensors of the params' layout, and the masters
    they rebuild are those of master_weights=True on the same layout, bit for
    bit (nothing mistakes the layout's own writes for outside changes)."""
    bf16 = torch.bfloat16
    for cls, kwargs in ((FusedAdamW, CASES["adamw"][1]), (FusedLAMB, CASES["lamb"][1]),
                        (FusedAdafactor, CASES["adafactor"][1])):
        (model, _), (twin, _) = layout.models(dtype=bf16), layout.models(dtype=bf16)
        opt = cls(model.parameters(), backend="cpu", master_weights="remainder", **kwargs)
        ref = cls(twin.parameters(), backend="cpu", master_weights=True, **kwargs)
        layout.train(model, opt, STEPS, dtype=bf16)
        layout.train(twin, ref, STEPS, dtype=bf16)
        for p, q in zip(model.parameters(), twin.parameters()):
            rem = opt.state[p]["master_remainder"]
            assert rem.dtype == torch.int16 and fusedopt.dtensor.is_dtensor(rem) == fusedopt.dtensor.is_dtensor(p)
            mine, want = full(opt.master_param(p)), full(ref.state[q]["master_param"])
            assert torch.equal(mine.view(torch.int32), want.view(torch.int32)), (layout.name, cls.__name__)


def check_muon_owners(layout: Layout):
    """FusedMuon's batched path orthogonalises each DTensor matrix on one
    owner rank of its mesh: over the world, a matrix on a mesh of s ranks is
    computed world/s times (once per copy of the mesh), a plain one on every
    rank. Where a process group spans the mesh (every layout here) the owners
    gather only their matrices' shards (no rank gathers a whole DTensor) and
    scatter the results back: the same bits as the fallback path (every rank
    gathers everything, owners broadcast). The result is the one process's
    (check_optimizers)."""
    import torch.distributed as dist

    import fusedopt.optim.muon as muon_module

    computed, gathered = [0], [0]
    original_ns, original_whole, original_plan = (muon_module.newton_schulz_batched, muon_module.dtensor.whole,
                                                  muon_module._OwnerPlan.of)

    def counting_ns(x, *args, **kwargs):
        computed[0] += x.shape[0]
        return original_ns(x, *args, **kwargs)

    def counting_whole(t):
        gathered[0] += fusedopt.dtensor.is_dtensor(t)
        return original_whole(t)

    runs = []
    for fallback in (False, True):
        model, _ = layout.models()
        opt = FusedMuon(model.parameters(), backend="cpu", lr=0.02)
        muon_module.newton_schulz_batched, muon_module.dtensor.whole = counting_ns, counting_whole
        if fallback:
            muon_module._OwnerPlan.of = staticmethod(lambda mesh, updates: None)
        computed[0] = gathered[0] = 0
        try:
            layout.train(model, opt, 2)
        finally:
            muon_module.newton_schulz_batched, muon_module.dtensor.whole = original_ns, original_whole
            muon_module._OwnerPlan.of = original_plan
        world = dist.get_world_size()
        matrices = [p for p in model.parameters() if p.ndim >= 2]
        want = 2 * sum(world // p.device_mesh.size() if fusedopt.dtensor.is_dtensor(p) else world for p in matrices)
        total = torch.tensor([computed[0]])
        dist.all_reduce(total)
        assert total.item() == want, (layout.name, total.item(), want)
        assert want < 2 * world * len(matrices)  # less than every rank computing every matrix
        assert (gathered[0] > 0) == fallback, (layout.name, fallback, gathered[0])
        runs.append([full(p) for p in model.parameters()])
    for p, q in zip(*runs):
        assert torch.equal(p, q), layout.name
    if layout.name in ("tp", "fsdp"):  # (one mesh over every rank: all of them take part in the exchange)
        # ranks that disagree on what they exchange raise together: gloo would write past a buffer
        model, _ = layout.models()
        opt = FusedMuon(model.parameters(), backend="cpu", lr=0.02)
        original_init = muon_module._OwnerPlan.__init__

        def skewed(self, mesh, group, updates):
            original_init(self, mesh, group, updates)
            if dist.get_rank() == 0:
                self.owner = [(o + 1) % self.size for o in self.owner]

        muon_module._OwnerPlan.__init__ = skewed
        try:
            with pytest.raises(RuntimeError, match="disagree on the DTensor shards"):
                layout.train(model, opt, 1)
        finally:
            muon_module._OwnerPlan.__init__ = original_init


def check_clip(layout: Layout):
    """clip_grad_norm_ and grad_norm: the single-process norm on every rank, and its grads."""
    model, single = layout.models(seed=1)
    for norm_type in (2.0, math.inf, 1.5):
        for m, x in ((model, layout.local_batch(0)), (single, batch(0))):
            m.zero_grad(set_to_none=True)
            m(x).backward()
        total, per_tensor = fusedopt.grad_norm(model.parameters(), norm_type, per_tensor=True)
        want_total, want_per_tensor = fusedopt.grad_norm(single.parameters(), norm_type, per_tensor=True)
        torch.testing.assert_close(total, want_total, rtol=1e-6, atol=0)
        torch.testing.assert_close(per_tensor, want_per_tensor, rtol=1e-6, atol=1e-9)
        total = fusedopt.clip_grad_norm_(model.parameters(), 0.01, norm_type)
        want = torch.nn.utils.clip_grad_norm_(single.parameters(), 0.01, norm_type)
        assert not fusedopt.dtensor.is_dtensor(total)
        torch.testing.assert_close(total, want, rtol=1e-6, atol=0)
        for (name, p), q in zip(model.named_parameters(), single.parameters()):
            torch.testing.assert_close(full(p.grad), q.grad, rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")


def check_full_state_dict(layout: Layout):
    """get_optimizer_state_dict(full_state_dict=True) is the single-process optimizer's state, by FQN."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    for cls, kwargs in ((FusedAdamW, CASES["adamw"][1]), (FusedAdafactor, CASES["adafactor"][1]),
                        (FusedLAMB, CASES["lamb"][1]), (FusedSophia, CASES["sophia"][1])):
        model, single = layout.models()
        opt, single_opt = cls(model.parameters(), **kwargs), cls(single.parameters(), **kwargs)
        layout.train(model, opt, 2)
        layout.train(single, single_opt, 2, single=True)
        saved = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
        for name, q in single.named_parameters():
            want = single_opt.state[q]
            assert saved["state"][name].keys() == want.keys(), name
            for key, value in want.items():
                got = saved["state"][name][key]
                assert not fusedopt.dtensor.is_dtensor(got)
                torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {key}: {m}")


def check_load_state_dict(layout: Layout):
    """opt.load_state_dict moves states between one process and a sharded
    optimizer: whole states are cut into shards, sharded ones gathered; then
    training goes on as if uninterrupted."""
    for cls, kwargs in ((FusedAdamW, CASES["adamw_master"][1]), (FusedAdafactor, CASES["adafactor"][1]),
                        (FusedLAMB, CASES["lamb"][1])):
        model, single = layout.models()
        single_opt = cls(single.parameters(), **kwargs)
        layout.train(model, cls(model.parameters(), **kwargs), 2)
        layout.train(single, single_opt, 2, single=True)
        opt = cls(model.parameters(), **kwargs)
        opt.load_state_dict(single_opt.state_dict())  # plain, whole states -> this rank's shards
        for p in model.parameters():
            assert all(fusedopt.dtensor.is_dtensor(v) == fusedopt.dtensor.is_dtensor(p)
                       for k, v in opt.state[p].items() if k != "step")
        back = cls(copy.deepcopy(single).parameters(), **kwargs)
        back.load_state_dict(opt.state_dict())  # sharded -> whole (gathered)
        for q, r in zip(single_opt.param_groups[0]["params"], back.param_groups[0]["params"]):
            assert back.state[r].keys() == single_opt.state[q].keys()
            for key, value in back.state[r].items():
                assert not fusedopt.dtensor.is_dtensor(value)
                torch.testing.assert_close(value, single_opt.state[q][key], rtol=1e-5, atol=1e-6)
        layout.train(model, opt, 2, start=2)
        layout.train(single, single_opt, 2, start=2, single=True)
        assert_same(model, single, opt, single_opt, what=f"loaded {cls.__name__}")


def check_grad_scaler(layout: Layout):
    """An inf in one rank's shard: every rank skips the step and backs off
    the scale. torch.amp.GradScaler refuses a group mixing DTensors and plain
    tensors (TP's plain LayerNorm) and reduces its flag over the first grad's
    mesh dims only: fusedopt.GradScaler takes both; fusedopt's own OR still
    makes every rank skip under torch's when a replicated param comes first."""
    import torch.distributed as dist

    cases = [(fusedopt.GradScaler, False, False), (fusedopt.GradScaler, True, False),
             (torch.amp.GradScaler, False, True), (torch.amp.GradScaler, True, True)]
    for scaler_class, replicate_first, dtensors_only in cases:
        model, _ = layout.models()
        params = [p for p in model.parameters() if fusedopt.dtensor.is_dtensor(p) or not dtensors_only]
        if replicate_first:
            if not any(p.placements[-1].is_replicate() for p in params if fusedopt.dtensor.is_dtensor(p)):
                continue
            params.sort(key=lambda p: not (fusedopt.dtensor.is_dtensor(p) and p.placements[-1].is_replicate()))
        opt = FusedAdamW(params, lr=0.1)
        scaler = scaler_class("cpu", init_scale=2.0**8)
        scaler.scale(model(layout.local_batch(0))).backward()
        scaler.step(opt)
        scaler.update()
        before = {n: full(p).detach().clone() for n, p in model.named_parameters()}
        steps = [float(s["step"]) for s in opt.state.values()]
        opt.zero_grad()
        scaler.scale(model(layout.local_batch(1))).backward()
        if dist.get_rank() == dist.get_world_size() - 1:
            model.a.weight.grad._local_tensor.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        # torch's scaler, a replicated param first: its flag misses ranks, only fusedopt's skip holds
        if scaler_class is fusedopt.GradScaler or not replicate_first:
            assert scaler.get_scale() == 2.0**7, (scaler_class, replicate_first)
        assert [float(s["step"]) for s in opt.state.values()] == steps
        for n, p in model.named_parameters():
            torch.testing.assert_close(full(p).detach(), before[n], rtol=0, atol=0)


def check_refusals(layout: Layout):
    """What the kernels cannot take raises a clear error before anything changes."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    model, _ = layout.models()
    p = model.a.weight
    partial = torch.nn.Parameter(DTensor.from_local(torch.zeros(3), layout.mesh, [Partial()] * layout.mesh.ndim))
    with pytest.raises(TypeError, match="Partial"):
        FusedAdamW([partial])
    with pytest.raises(ValueError, match="FP8 states"):
        FusedAdamW([p], state_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="FP8 momentum"):
        FusedMuon([p], state_dtype=torch.float8_e4m3fn)
    opt = FusedAdamW(model.parameters(), lr=0.1)
    model(layout.local_batch(0)).backward()
    good = p.grad
    p.grad = good.redistribute(p.device_mesh, [Replicate()] * p.device_mesh.ndim)
    before = full(p).detach().clone()
    with pytest.raises(RuntimeError, match="placements"):
        opt.step()
    torch.testing.assert_close(full(p).detach(), before, rtol=0, atol=0)
    assert not opt.state
    p.grad = good
    opt.step()


def check_sequence_parallel(layout: Layout):
    """TP with a sequence-parallel LayerNorm and no FSDP: the norm's grads are
    Partial (pending sums over TP); the optimizers and clip_grad_norm_ reduce
    them. Every rank trains on the whole batch (no data parallelism)."""
    for cls, kwargs in ((FusedAdamW, CASES["adamw"][1]), (FusedLAMB, CASES["lamb"][1]),
                        (FusedAdafactor, CASES["adafactor"][1])):
        model, single = layout.models(fsdp=False)
        opt, single_opt = cls(model.parameters(), **kwargs), cls(single.parameters(), **kwargs)
        layout.train(model, opt, STEPS, single=True)
        layout.train(single, single_opt, STEPS, single=True)
        assert_same(model, single, opt, single_opt, what=f"sequence parallel {cls.__name__}")
    for m in (model, single):
        m.zero_grad(set_to_none=True)
        m(batch(0)).backward()
    assert model.norm.weight.grad.placements[-1].is_partial()
    total = fusedopt.clip_grad_norm_(model.parameters(), 0.01)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(single.parameters(), 0.01), rtol=1e-6, atol=0)
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        torch.testing.assert_close(full(p.grad), q.grad, rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")


#: DTensor params made by hand on the 2x2 mesh: 3-d, sharded on any dim and on two dims at once, size-1
#: dims (local shards whose strides there differ from a fresh tensor's), a whole empty tensor, replicated
DIRECT = [((3, 5, 6), "S0 S1"), ((4, 3, 7), "S2 R"), ((1, 8, 6), "R S1"), ((2, 9, 4), "S1 S2"), ((5,), "S0 R"),
          ((0, 4), "S0 S1"), ((7, 3), "R R"), ((6, 1, 5), "S0 S2")]


def check_direct_params(layout: Layout):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def placements(spec):
        return [Replicate() if s == "R" else Shard(int(s[1])) for s in spec.split()]

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(shape, generator=g) for shape, _ in DIRECT]

    for cls, kwargs, backends in (CASES["adamw"], CASES["lamb"], CASES["adafactor"]):
        for backend in backends[:2]:
            whole = draw(0)
            single = [w.clone().requires_grad_() for w in whole]
            params = [torch.nn.Parameter(distribute_tensor(w.clone(), layout.mesh, placements(spec),
                                                           src_data_rank=None))
                      for w, (_, spec) in zip(whole, DIRECT)]
            opt, single_opt = cls(params, backend=backend, **kwargs), cls(single, backend=backend, **kwargs)
            for step in range(STEPS):
                for p, q, g, (_, spec) in zip(params, single, draw(step + 1), DIRECT):
                    p.grad = distribute_tensor(g.clone(), layout.mesh, placements(spec), src_data_rank=None)
                    q.grad = g.clone()
                opt.step()
                single_opt.step()
            for p, q, (shape, spec) in zip(params, single, DIRECT):
                what = f"{cls.__name__} {backend} {shape} {spec}"
                torch.testing.assert_close(full(p).detach(), q.detach(), rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{what}: {m}")
                for key, value in single_opt.state[q].items():
                    torch.testing.assert_close(full(opt.state[p][key]), value, rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"{what} {key}: {m}")


def check_zero_tp(layout: Layout):
    """ZeroOptimizer over the data-parallel group of a TP model (DP x TP):
    the single-process weights, the global norm counted once, every rank
    skipping an inf together, the full state_dict as DTensors."""
    import torch.distributed as dist

    from fusedopt.distributed import ZeroOptimizer

    kwargs = CASES["adamw"][1]
    for stage in (1, 2):
        model, single = layout.models(fsdp=False)
        opt = ZeroOptimizer(model.parameters(), stage=stage, process_group=layout.dp.get_group(), **kwargs)
        single_opt = FusedAdamW(single.parameters(), **kwargs)
        layout.train(model, opt, STEPS)
        layout.train(single, single_opt, STEPS, single=True)
        assert_same(model, single, what=f"zero{stage} x tp")
        torch.testing.assert_close(opt.last_grad_norm, single_opt.last_grad_norm, rtol=1e-5, atol=0)
        saved = opt.full_state_dict()
        if layout.dp.get_local_rank() == 0:
            for i, (p, q) in enumerate(zip(model.parameters(), single.parameters())):
                for key in ("exp_avg", "exp_avg_sq"):
                    got = saved["state"][i][key]
                    assert fusedopt.dtensor.is_dtensor(got) == fusedopt.dtensor.is_dtensor(p)
                    torch.testing.assert_close(full(got), single_opt.state[q][key], rtol=1e-5, atol=1e-6)
        else:
            assert saved is None
        with pytest.raises(NotImplementedError, match="tensor-parallel"):
            opt.state_dict()
        opt.remove_hooks()
    model, _ = layout.models(fsdp=False)
    opt = ZeroOptimizer(model.parameters(), stage=2, process_group=layout.dp.get_group(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = {n: full(p).detach().clone() for n, p in model.named_parameters()}

    def poison(g):  # an inf in this rank's TP shard of one replica's grad, before ZeRO reduces it
        g = g.clone()
        g._local_tensor.view(-1)[-1] = float("inf")
        return g

    if dist.get_rank() == dist.get_world_size() - 1:
        model.c.weight.register_hook(poison)
    scaler.scale(model(layout.local_batch(0))).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**7
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    for n, p in model.named_parameters():
        torch.testing.assert_close(full(p).detach(), before[n], rtol=0, atol=0)
    opt.remove_hooks()


def layout_worker(rank, world, name, path):
    torch.set_num_threads(1)
    layout = Layout(name, world)
    check_optimizers(layout)
    check_remainders(layout)
    check_muon_owners(layout)
    check_clip(layout)
    check_full_state_dict(layout)
    check_load_state_dict(layout)
    check_grad_scaler(layout)
    check_refusals(layout)
    if name == "fsdp":
        save_checkpoint(layout, path)
    elif name == "2d":
        check_direct_params(layout)
        check_sequence_parallel(layout)
        check_zero_tp(layout)
        load_checkpoint(layout, path)


CHECKPOINTED = {"adamw": CASES["adamw"], "lamb": CASES["lamb"], "adafactor": CASES["adafactor"]}


def save_checkpoint(layout: Layout, path: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    for case, (cls, kwargs, _) in CHECKPOINTED.items():
        model, _ = layout.models()
        opt = cls(model.parameters(), **kwargs)
        layout.train(model, opt, STEPS)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{path}/{case}")


def load_checkpoint(layout: Layout, path: str):
    """FSDP2=2's checkpoint in FSDP2 x TP: training goes on as if uninterrupted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    for case, (cls, kwargs, _) in CHECKPOINTED.items():
        model, single = layout.models(seed=5)  # other weights: the checkpoint must replace them
        opt = cls(model.parameters(), **kwargs)
        model_sd, optim_sd = get_state_dict(model, opt)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=f"{path}/{case}")
        set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        layout.train(model, opt, 2, start=STEPS)
        torch.manual_seed(0)
        single = Net()
        single_opt = cls(single.parameters(), **kwargs)
        layout.train(single, single_opt, STEPS + 2, single=True)
        assert_same(model, single, opt, single_opt, what=f"resumed {case}")


class OneProcess(Layout):
    """No mesh: the model whole in this process."""

    def __init__(self):
        self.name, self.tp, self.dp = "one process", None, None


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dtensor_layouts(tmp_path):
    """TP=2, FSDP2=2 (which saves a checkpoint), FSDP2 x TP on 2x2 (which
    resumes from it); then the checkpoint resumes in this one process too."""
    spawn(layout_worker, 2, "tp", str(tmp_path))
    spawn(layout_worker, 2, "fsdp", str(tmp_path))
    spawn(layout_worker, 4, "2d", str(tmp_path))
    load_checkpoint(OneProcess(), str(tmp_path))
