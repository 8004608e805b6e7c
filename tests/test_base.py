"""What every fusedopt optimizer shares (fusedopt/optim/base.py): bad input
raises before anything changes, in any group; param groups edited between
steps are stepped as torch steps them; load_state_dict is all-or-nothing and
honours load hooks; add_param_group adds only groups it can step."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import backend_params

import fusedopt
from helpers import grads_for, make_params
from optim_db import optimizers

OPTIMIZERS = optimizers(fused=True)
BACKENDS = backend_params(["reference", "cpu"])  # the checks run before any backend is called


def two_groups(name, backend, **extra):
    cls, kwargs = OPTIMIZERS[name]
    a, b = make_params([(3, 4), (5,)], seed=1), make_params([(2, 3), (6,)], seed=2)
    opt = cls([{"params": a}, {"params": b}], backend=backend, **kwargs, **extra)
    return opt, a + b


def step(opt, params, k):
    for p, g in zip(params, grads_for(params, k)):
        p.grad = g
    opt.step()


def snapshot(opt, params):
    """Copies of every param and every state entry, to compare after a failed call."""
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for p in params if p in opt.state})


def assert_unchanged(opt, params, snap):
    old_params, old_states = snap
    for p, old in zip(params, old_params):
        torch.testing.assert_close(p.detach(), old, atol=0, rtol=0)
    assert {id(p) for p in params if opt.state.get(p)} == set(old_states)
    for p in params:
        if id(p) not in old_states:
            continue
        state = opt.state[p]
        assert state.keys() == old_states[id(p)].keys()
        for k, v in state.items():
            if torch.is_tensor(v):
                torch.testing.assert_close(v, old_states[id(p)][k], atol=0, rtol=0, equal_nan=True)


GROUP_EDITS = {
    "lr nan": ("lr", float("nan")),
    "lr negative": ("lr", -1.0),
    "lr two-element tensor": ("lr", torch.tensor([0.1, 0.2])),
    "weight_decay not a number": ("weight_decay", "x"),
    "weight_decay negative": ("weight_decay", -5.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("edit", GROUP_EDITS)
def test_bad_hyperparameter_in_a_later_group_changes_nothing(name, backend, edit):
    opt, params = two_groups(name, backend)
    step(opt, params, 0)
    key, value = GROUP_EDITS[edit]
    opt.param_groups[1][key] = value
    for p, g in zip(params, grads_for(params, 1)):
        p.grad = g
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=f"param group 1: {key}="):
        opt.step()
    assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("name, key, value", [
    ("adamw", "betas", (0.9, 0.99, 0.5)), ("adamw", "betas", (0.9, 1.0)), ("adamw", "eps", -1.0),
    ("lamb", "betas", (0.9,)), ("sophia", "betas", (0.9,)), ("sophia", "rho", -1.0), ("sophia", "bs", 0),
    ("adafactor", "d", 0.5), ("adafactor", "beta2_decay", 0.5), ("adafactor", "eps", (None,)),
    ("adafactor", "eps", (-1.0, 1e-3)),
])
def test_each_optimizers_own_hyperparameters_are_checked_at_every_step(name, key, value):
    opt, params = two_groups(name, "cpu")
    step(opt, params, 0)
    opt.param_groups[1][key] = value
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=f"param group 1: {key}="):
        opt.step()
    assert_unchanged(opt, params, snap)
    if name == "sophia" and key == "betas":  # update_hessian reads betas[1] of every group too
        with pytest.raises(ValueError, match="param group 1: betas="):
            opt.update_hessian()
        assert_unchanged(opt, params, snap)


def test_sophia_step_checks_its_bs_argument():
    opt, params = two_groups("sophia", "cpu")
    step(opt, params, 0)
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match="Invalid bs"):
        opt.step(bs=-5)
    assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_param_resized_through_data_raises_before_anything_changes(name, backend):
    """torch keeps a .grad of the old shape when .data is swapped: the kernels
    would index it (and the old states) with the new sizes."""
    opt, params = two_groups(name, backend)
    step(opt, params, 0)
    for p, g in zip(params, grads_for(params, 1)):
        p.grad = g
    params[2].data = torch.randn(4, 2)  # its grad keeps the old (2, 3)
    snap = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"grad of shape \(2, 3\).*param of shape \(4, 2\)"):
        opt.step()
    assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("backend", backend_params())
def test_state_of_another_shape_raises_before_any_kernel_runs(backend):
    """A state tensor replaced by one of another size would be read and written
    out of bounds by the kernels (Triton and CUDA do not check): refused first."""
    opt, params = two_groups("adamw", backend)
    step(opt, params, 0)
    buffer = torch.zeros(1000)
    opt.state[params[2]]["exp_avg"] = buffer[:7]  # the param has 6 elements
    snap = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' .* has shape \(7,\)"):
        step(opt, params, 1)
    assert_unchanged(opt, params, snap)
    assert torch.count_nonzero(buffer) == 0


@pytest.mark.parametrize("backend", backend_params())
def test_grad_resized_through_data_is_refused_by_a_cached_plan(backend):
    """The plan cached from the last step would hand the kernels a grad whose
    size changed under it (``.grad.data = ...`` skips torch's check)."""
    opt, params = two_groups("adamw", backend)
    step(opt, params, 0)
    step(opt, params, 1)  # the plan is cached now
    for p, g in zip(params, grads_for(params, 2)):
        p.grad = g
    params[3].grad.data = torch.ones(2)  # the param has 6 elements
    snap = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"grad of shape \(2,\) on cpu for a param of shape \(6,\)"):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_no_state_is_created_when_a_later_param_fails_its_check():
    opt, params = two_groups("adamw", "cpu")
    opt.state[params[3]]["exp_avg"] = torch.zeros(6, dtype=torch.float64)  # hand-set, wrong dtype
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    with pytest.raises(RuntimeError, match="is torch.float64, but this optimizer stores it as torch.float32"):
        opt.step()
    assert [set(opt.state[p]) for p in params] == [set(), set(), set(), {"exp_avg"}]


def test_a_hand_set_step_of_another_dtype_is_refused():
    opt, params = two_groups("adamw", "cpu")
    step(opt, params, 0)
    opt.state[params[0]]["step"] = torch.tensor(1)  # int64: the kernels advance a float32 in place
    with pytest.raises(RuntimeError, match="state 'step'.*one float32"):
        step(opt, params, 1)


# --- param groups edited between steps ------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", ["replace", "swap", "new list"])
def test_params_replaced_or_reordered_in_a_group_are_stepped_like_torch(backend, edit):
    """The cached step plan holds the group's tensors: editing group["params"]
    must not leave it stepping the old ones with the new ones' grads."""
    def build(cls, **kw):
        params = make_params([(3,), (3,), (2, 2)], seed=3)
        return cls(params, lr=0.1, **kw), params

    fused, fp = build(fusedopt.FusedAdamW, backend=backend)
    ref, rp = build(torch.optim.AdamW)
    for opt, params in ((fused, fp), (ref, rp)):
        params[0].grad, params[1].grad, params[2].grad = torch.zeros(3), torch.full((3,), 100.0), torch.ones(2, 2)
        opt.step()
        group = opt.param_groups[0]
        if edit == "replace":
            group["params"][0] = torch.nn.Parameter(torch.ones(3))
        elif edit == "swap":
            group["params"][0], group["params"][1] = group["params"][1], group["params"][0]
        else:
            group["params"] = [group["params"][1], group["params"][0], group["params"][2]]
        for i, p in enumerate(group["params"]):
            p.grad = torch.full(p.shape, float(i + 1))
        opt.step()
    for pf, pr in zip(fused.param_groups[0]["params"], ref.param_groups[0]["params"]):
        torch.testing.assert_close(pf.detach(), pr.detach(), atol=1e-6, rtol=1e-5)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused.state[pf][key], ref.state[pr][key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("edit", ["new grads", "param storage", "hyperparameters", "state tensor", "state dict"])
def test_a_cached_plan_sees_every_edit_between_steps(edit):
    """The plan cached from the last step (its tensor tables) must not go
    stale: each edit a training script may make between steps takes effect
    as it does in torch.optim.AdamW."""
    def build(cls, **kw):
        params = make_params([(5,), (3, 4), (7,)], seed=4)
        return cls(params, lr=0.1, weight_decay=0.1, **kw), params

    fused, fp = build(fusedopt.FusedAdamW, backend="cpu")
    ref, rp = build(torch.optim.AdamW, foreach=False)
    for opt, params in ((fused, fp), (ref, rp)):
        for k in range(2):
            for p, g in zip(params, grads_for(params, k)):
                p.grad = g
            opt.step()  # the plan is cached after the first
        if edit == "new grads":
            params[1].grad = torch.full((3, 4), 3.0)  # a new tensor; the others keep theirs, edited in place
            params[0].grad.mul_(-2.0)
        elif edit == "param storage":
            params[2].data = torch.full((7,), 0.5)
        elif edit == "hyperparameters":
            opt.param_groups[0].update(lr=0.03, betas=(0.5, 0.75), weight_decay=0.0, eps=1e-3)
        elif edit == "state tensor":
            opt.state[params[0]]["exp_avg"] = torch.full((5,), 0.25)
        else:
            opt.state[params[1]] = {k: v.clone().fill_(0.5) if k != "step" else v.clone()
                                    for k, v in opt.state[params[1]].items()}
        opt.step()
    for pf, pr in zip(fp, rp):
        torch.testing.assert_close(pf.detach(), pr.detach(), atol=1e-6, rtol=1e-5)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused.state[pf][key], ref.state[pr][key], atol=1e-6, rtol=1e-5)


HELD_EDITS = {
    "none": lambda params: None,
    "a grad appears": lambda params: setattr(params[3], "grad", torch.full((6,), 2.0)),
    "a grad is gone": lambda params: setattr(params[0], "grad", None),
    "a grad not contiguous": lambda params: setattr(params[1], "grad", params[1].grad.t().contiguous().t()),
    "param storage": lambda params: setattr(params[2], "data", torch.full((7,), 0.5)),
    "state tensor": None,  # (the optimizer's: below)
}


@pytest.mark.parametrize("edit", HELD_EDITS)
def test_held_steps_check_the_grads_and_fall_back_to_the_full_path(edit, monkeypatch):
    """Steady-state cpu steps launch from the tables held in the extension,
    which reads and checks the grads there (backends/_held.py) instead of
    Python checking each one; an edit it cannot vouch for sends the step down
    the full path: the step equals torch.optim.AdamW's either way."""
    full_paths = []
    plans_of_this_step = fusedopt.FusedAdamW._plans_of_this_step
    monkeypatch.setattr(fusedopt.FusedAdamW, "_plans_of_this_step",
                        lambda self, *a, **k: full_paths.append(1) or plans_of_this_step(self, *a, **k))

    def build(cls, **kw):
        params = make_params([(5,), (3, 4), (7,), (6,)], seed=4)
        return cls(params, lr=0.1, weight_decay=0.1, **kw), params

    fused, fp = build(fusedopt.FusedAdamW, backend="cpu")
    ref, rp = build(torch.optim.AdamW, foreach=False)
    for opt, params in ((fused, fp), (ref, rp)):
        for k in range(3):
            for p, g in zip(params[:3], grads_for(params[:3], k)):  # params[3] has no grad
                p.grad = g
            if k == 2:
                if edit == "state tensor":
                    opt.state[params[0]]["exp_avg"] = torch.full((5,), 0.25)
                else:
                    HELD_EDITS[edit](params)
            opt.step()
    assert full_paths == ([1] if edit == "none" else [1, 1])  # the first step's, and the edited one's
    for pf, pr in zip(fp, rp):
        torch.testing.assert_close(pf.detach(), pr.detach(), atol=1e-6, rtol=1e-5)
        if pr in ref.state:
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(fused.state[pf][key], ref.state[pr][key], atol=1e-6, rtol=1e-5)


def test_held_steps_resume_after_a_param_storage_swap(monkeypatch):
    """A swap the plan survives (p.data = a tensor of the same shape) fails the
    guard once: the full path takes a new one and the next step is held again."""
    full_paths = []
    plans_of_this_step = fusedopt.FusedAdamW._plans_of_this_step
    monkeypatch.setattr(fusedopt.FusedAdamW, "_plans_of_this_step",
                        lambda self, *a, **k: full_paths.append(1) or plans_of_this_step(self, *a, **k))
    params = make_params([(5,), (3, 4)], seed=4)
    ref = [p.detach().clone().requires_grad_() for p in params]
    fused, torch_opt = fusedopt.FusedAdamW(params, backend="cpu"), torch.optim.AdamW(ref, foreach=False)
    for k in range(5):
        for opt, ps in ((fused, params), (torch_opt, ref)):
            if k == 2:
                ps[1].data = torch.full((3, 4), 0.5)
            for p, g in zip(ps, grads_for(ps, k)):
                p.grad = g
            opt.step()
        assert len(full_paths) == (1 if k < 2 else 2), k
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("held_ops", [True, False])
def test_a_group_without_grads_is_held_only_where_the_held_ops_are(held_ops, monkeypatch):
    """A frozen group (no grads: no bucket) keeps the held path for the other
    groups on cpu; without the cpu extension's held ops (a GPU-only or
    reference run) it takes no guard and the steps take the full path."""
    from fusedopt.backends import _held

    monkeypatch.setattr(_held, "loaded", lambda: held_ops)
    frozen, live = make_params([(3, 4)], seed=1), make_params([(5,)], seed=2)
    opt = fusedopt.FusedAdamW([{"params": frozen}, {"params": live}], backend="cpu" if held_ops else "reference")
    for k in range(3):
        live[0].grad = grads_for(live, k)[0]
        opt.step()
    assert [plan.guard is not None for plan in opt._plans.values()] == [held_ops, held_ops]
    assert (opt._held_plans() is not None) == held_ops


def test_a_held_step_refuses_a_grad_of_another_dtype_before_anything_changes():
    opt, params = two_groups("adamw", "cpu")
    step(opt, params, 0)
    step(opt, params, 1)  # a held step
    for p, g in zip(params, grads_for(params, 2)):
        p.grad = g
    params[1].grad.data = params[1].grad.double()  # (.data: torch refuses to assign it)
    snap = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="a grad must have its param's dtype"):
        opt.step()
    assert_unchanged(opt, params, snap)


# --- add_param_group ----------------------------------------------------------------


def test_add_param_group_that_cannot_be_stepped_is_not_added():
    opt = fusedopt.FusedAdamW(make_params([(3,)]), backend="cpu", master_weights=False,
                              fp8=fusedopt.Float8Recipe())
    bf16 = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="need master_weights=True"):
        opt.add_param_group({"params": [bf16]})
    with pytest.raises(ValueError, match="param group 1: lr=-1"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "lr": -1.0})
    with pytest.raises(ValueError, match="param group 1: betas="):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "betas": (0.9, 0.99, 0.5)})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": (p for p in make_params([(2,)], seed=5)), "lr": 0.5})  # a generator
    assert len(opt.param_groups) == 2 and len(opt.param_groups[1]["params"]) == 1
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["betas"] == (0.9, 0.999)


# --- load_state_dict ------------------------------------------------------------------


def _trained(name="adamw", backend="cpu"):
    opt, params = two_groups(name, backend)
    step(opt, params, 0)
    step(opt, params, 1)
    return opt, params


@pytest.mark.parametrize("damage", ["exp_avg shape", "step of two", "betas", "lr nan"])
def test_load_state_dict_that_fails_leaves_the_optimizer_as_it_was(damage):
    opt, params = _trained()
    twin, twin_params = _trained()
    sd = copy.deepcopy(opt.state_dict())  # its per-param dicts are the optimizer's own (as in torch)
    if damage == "exp_avg shape":
        sd["state"][2]["exp_avg"] = torch.zeros(7)
    elif damage == "step of two":
        sd["state"][0]["step"] = torch.zeros(2)
    elif damage == "betas":
        sd["param_groups"][1]["betas"] = (0.9,)
    else:
        sd["param_groups"][0]["lr"] = float("nan")
    before_state, before_groups = opt.state, opt.param_groups
    snap = snapshot(opt, params)
    # (with step of two, torch's own reshape fails first: still all-or-nothing)
    with pytest.raises((ValueError, RuntimeError)):
        opt.load_state_dict(sd)
    assert opt.state is before_state and opt.param_groups is before_groups
    assert_unchanged(opt, params, snap)
    step(opt, params, 2)  # and it goes on as if nothing had happened
    step(twin, twin_params, 2)
    for a, b in zip(params, twin_params):
        torch.testing.assert_close(a.detach(), b.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("cls", [fusedopt.FusedAdamW, torch.optim.AdamW])
def test_load_hooks_act_as_on_torch_optimizers(cls):
    """A pre-hook's returned state_dict is what gets loaded; a post-hook's
    edits of the loaded state stay (the same outcome for torch's AdamW)."""
    def make():
        params = make_params([(3,)], seed=4)
        opt = cls(params, lr=0.1)
        params[0].grad = torch.ones(3)
        opt.step()
        return opt, params

    source, _ = make()
    opt, params = make()

    def pre(optimizer, state_dict):
        state_dict = {**state_dict, "state": {0: {**state_dict["state"][0], "step": torch.tensor(100.0)}}}
        return state_dict

    def post(optimizer):
        optimizer.state[params[0]]["exp_avg_sq"] = torch.full((3,), 7.0)

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(source.state_dict())
    assert float(opt.state[params[0]]["step"]) == 100.0
    assert torch.equal(opt.state[params[0]]["exp_avg_sq"], torch.full((3,), 7.0))


# --- the free functions ----------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [-1.0, float("nan")])
def test_clip_grad_norm_refuses_a_negative_or_nan_max_norm(max_norm):
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="max_norm"):
        fusedopt.clip_grad_norm_([p], max_norm, backend="cpu")
    assert torch.equal(p.grad, torch.ones(3))


@pytest.mark.parametrize("scales, error, match", [
    (None, TypeError, "scales must be"),
    ([torch.tensor([1.0, 2.0]), 3.0], ValueError, r"scales\[0\] must be one real number"),
    (["a", 1.0], TypeError, r"scales\[0\] must be a number"),
    (torch.tensor([1 + 1j, 2 + 0j]), TypeError, "scales must be real"),
])
def test_cast_to_fp8_says_what_is_wrong_with_the_scales(scales, error, match):
    with pytest.raises(error, match=match):
        fusedopt.cast_to_fp8([torch.ones(3), torch.ones(2)], scales, backend="cpu")


def test_every_optimizer_is_exported_and_in_optim_db():
    """A class defined in fusedopt.optim reaches `from fusedopt import ...` (optim/__init__.py's
    __all__, which fusedopt/__init__.py re-exports) and has an optim_db entry, so the shared tests take it."""
    import importlib
    import inspect
    import pkgutil

    from optim_db import OPTIM_DB

    modules = [importlib.import_module(f"fusedopt.optim.{m.name}") for m in pkgutil.iter_modules(fusedopt.optim.__path__)]
    defined = {cls for module in modules for _, cls in inspect.getmembers(module, inspect.isclass)
               if issubclass(cls, torch.optim.Optimizer) and cls.__module__ == module.__name__}
    assert {info.cls for info in OPTIM_DB} == defined - {fusedopt.optim.FusedOptimizer}
    assert all(getattr(fusedopt, cls.__name__) is cls for cls in defined)
