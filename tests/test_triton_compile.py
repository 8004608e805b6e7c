"""The Triton kernels compile for the GPUs, here, without a GPU.

The interpreter (``TRITON_INTERPRET=1``, how every other triton test runs)
executes a kernel's Python with numpy: it accepts code the compiler rejects and
never contracts a multiply and an add into an FMA. So a workload runs every
optimizer, the clipping and the FP8 cast through the triton backend under the
interpreter, with a recorder on the launches: each launch gives a kernel, its
argument types, its constexpr values and its launch options. A subprocess
without the interpreter then compiles each one with ``triton.compile`` for
sm_90 (PTX and cubin: Triton's own ptxas, no driver needed).

It also checks that every launch turns FP contraction off
(``kernels._numeric.EXACT``), and that this matters: with the default the
compiler forms more FMAs than the kernels ask for.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import grads_for
from optim_db import optimizers

import fusedopt
from fusedopt import FusedAdafactor, FusedAdamW, FusedLAMB

triton = pytest.importorskip("triton")
interpreter = pytest.importorskip("triton.runtime.interpreter")

pytestmark = [pytest.mark.triton, pytest.mark.skipif(
    "triton" not in fusedopt.available_backends("cpu"), reason="needs the Triton interpreter (TRITON_INTERPRET=1)")]

ARCHS = (90,)  # the GPU machines are H100/H200 (sm_80 dropped for suite time: the suite neared 15 min)
_POINTEE = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
            torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}


_ANNOTATED = {"int64": "i64"}  # str(tl.int64): the signature type of a parameter annotated with it


def _arg_type(value) -> str:
    """Triton's signature type of a runtime argument, as its JIT specialises it
    (but for the int 1: _launch_spec)."""
    if isinstance(value, torch.Tensor):
        return "*" + _POINTEE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a {type(value).__name__} argument")


def _launch_spec(fn, args, kwargs) -> dict:
    """kernel, signature, constexprs and launch options of one launch."""
    sig = inspect.signature(fn)
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    signature, constexprs = {}, {}
    for name, param in sig.parameters.items():
        value = bound.arguments.get(name, param.default)
        # the JIT also makes an int argument equal to 1 a constexpr (triton 3.6 and 3.9), unless the
        # parameter is annotated with a type (the f64_bits scalars: tl.int64), which it then takes
        if "constexpr" in str(param.annotation):
            signature[name], constexprs[name] = "constexpr", value
        elif param.annotation is not inspect.Parameter.empty:
            signature[name] = _ANNOTATED[str(param.annotation)]
        elif value is None or (type(value) is int and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = _arg_type(value)
    options = {k: v for k, v in kwargs.items() if k not in sig.parameters}
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}


def _params(dtype, shapes=((70, 3), (5,), ())):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _steps(opt, params, n=2):
    for s in range(n):
        for p, g in zip(params, grads_for(params, s)):
            p.grad = g
        opt.step()


def _with_seed_one(opt, params) -> None:
    """One more step whose stochastic-rounding seed is 1 (once in 2^31 launches
    in real use): the JIT compiles that launch with the seed as a constexpr."""
    draw = opt._stochastic_rounding_seed
    opt._stochastic_rounding_seed = lambda bucket: None if draw(bucket) is None else 1
    _steps(opt, params, 1)


def _workload() -> None:
    """Each entry point of the triton backend, with each switch of its kernels
    on at least once: param dtypes, master weights, state dtypes, amsgrad,
    maximize, tensor lr, stochastic rounding, FP8 copies, clipping, GradScaler."""
    fp8 = torch.float8_e4m3fn
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        ps = _params(dtype)
        _steps(FusedAdamW(ps, backend="triton", amsgrad=True, maximize=True, lr=torch.tensor(1e-3)), ps)
    for dtype in (torch.bfloat16, torch.float16):
        ps = _params(dtype)
        _steps(FusedAdamW(ps, backend="triton", master_weights=True, max_grad_norm=1.0), ps)
    ps = _params(torch.bfloat16)
    opt = FusedAdamW(ps, backend="triton", stochastic_rounding=True, state_dtype=torch.bfloat16)
    _steps(opt, ps)
    _with_seed_one(opt, ps)
    for state_dtype in (torch.bfloat16, fp8):
        ps = _params(torch.float32)
        _steps(FusedAdamW(ps, backend="triton", amsgrad=True, state_dtype=state_dtype), ps)
    for fmt in (fp8, torch.float8_e5m2):
        ps = _params(torch.bfloat16)
        _steps(FusedAdamW(ps, backend="triton", master_weights=True, fp8=fusedopt.Float8Recipe(dtype=fmt)), ps)
    ps = _params(torch.float32)  # GradScaler: grad_scale and found_inf reach the kernels
    opt = FusedAdamW(ps, backend="triton")
    opt.grad_scale, opt.found_inf = torch.tensor([2.0]), torch.tensor([0.0])
    _steps(opt, ps)

    for kw in ({}, {"master_weights": True, "state_dtype": fp8}, {"stochastic_rounding": True, "use_nvlamb": True,
                                                                  "adam_w_mode": False, "maximize": True}):
        ps = _params(torch.bfloat16)
        _steps(FusedLAMB(ps, backend="triton", **kw), ps)
    ps = _params(torch.float32)
    _steps(FusedLAMB(ps, backend="triton", lr=torch.tensor(1e-3)), ps)

    shapes = ((70, 3), (2, 5, 9), (5,), ())
    for dtype, kw in ((torch.float32, {}), (torch.float32, {"beta1": 0.9, "maximize": True, "max_grad_norm": 1.0}),
                      (torch.bfloat16, {"beta1": 0.9, "master_weights": True, "state_dtype": fp8}),
                      (torch.bfloat16, {"stochastic_rounding": True, "state_dtype": torch.bfloat16, "beta1": 0.9})):
        ps = _params(dtype, shapes)
        _steps(FusedAdafactor(ps, backend="triton", **kw), ps)

    # Adafactor's phases for DTensor params (RAW row/column sums, _sharded_factors), here over whole tensors
    from test_adafactor_sharded import phased_step

    from fusedopt.backends import triton as triton_backend
    for dtype, kw, flags in ((torch.float32, {}, {}),
                             (torch.bfloat16, {"beta1": 0.9, "master_weights": True},
                              {"grad_mult": torch.ones(1, dtype=torch.float64), "found_inf": torch.zeros(1)})):
        ps = _params(dtype, shapes)
        opt = FusedAdafactor(ps, backend="triton", **kw)
        for s in range(2):
            for p, g in zip(ps, grads_for(ps, s)):
                p.grad = g
            phased_step(opt, triton_backend.adafactor_sharded, **flags)

    # every other fused optimizer of optim_db (Sophia, and a new one with no section of its own)
    for name, (cls, db_kwargs) in optimizers(fused=True).items():
        if name in ("adamw", "lamb", "adafactor"):
            continue
        for dtype, kw in ((torch.float32, {"maximize": True}), (torch.bfloat16, {"master_weights": True}),
                          (torch.bfloat16, {"stochastic_rounding": True, "state_dtype": fp8})):
            ps = _params(dtype)
            opt = cls(ps, backend="triton", **db_kwargs, **kw)
            _steps(opt, ps)
            if hasattr(opt, "update_hessian"):
                opt.update_hessian()

    for norm_type in (2.0, float("inf"), 1.0, 3.0):
        ps = _params(torch.bfloat16)
        for p, g in zip(ps, grads_for(ps, 0)):
            p.grad = g
        fusedopt.clip_grad_norm_(ps, 0.1, norm_type, backend="triton")
    for fmt in (fp8, torch.float8_e5m2):
        xs = _params(torch.float32) + _params(torch.bfloat16)
        fusedopt.cast_to_fp8(xs, torch.ones(len(xs)), fmt, backend="triton")


#: fp32 PTX instructions that are approximations, which the interpreter (numpy,
#: IEEE) does not reproduce: fp32 `/` (div.full), tl.sqrt, tl.rsqrt, tl.exp,
#: tl.log. The kernels use div_ieee / sqrt_ieee and take exp/log in fp64.
APPROXIMATE_FP32 = r"\b(?:div\.(?:full|approx)|(?:sqrt|rsqrt|rcp|ex2|lg2)\.approx)(?:\.ftz)?\.f32\b"


def _compile_script(specs_path: str, arch: int) -> str:
    """Compiles each recorded launch; prints a line per failure or per kernel
    whose PTX holds an approximate fp32 instruction, and exits 1 if any."""
    return textwrap.dedent(f"""
        import json, re
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fusedopt._resources import shipped_module
        failures = []
        for s in json.load(open({specs_path!r})):
            fn = getattr(shipped_module("kernels", s["module"].rsplit(".", 1)[1]), s["kernel"])
            try:
                k = triton.compile(ASTSource(fn=fn, signature=s["signature"], constexprs=s["constexprs"]),
                                   target=GPUTarget("cuda", {arch}, 32), options=s["options"])
            except Exception as e:  # report them all, not the first
                failures.append(f"{{s['kernel']}} {{s['constexprs']}}: {{type(e).__name__}}: {{e}}")
                continue
            approx = sorted(set(re.findall({APPROXIMATE_FP32!r}, k.asm["ptx"])))
            if approx:
                failures.append(f"{{s['kernel']}} {{s['constexprs']}}: approximate fp32 math {{approx}}")
        print("\\n".join(failures))
        raise SystemExit(1 if failures else 0)
    """)


def _compile_env(cache_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the same fusedopt as this process
    return env


@contextlib.contextmanager
def _recording():
    """The launches of Triton kernels inside the block, as _launch_spec dicts."""
    specs = []
    real_run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        specs.append(_launch_spec(self.fn, args, kwargs))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run
    try:
        yield specs
    finally:
        interpreter.InterpretedFunction.run = real_run


@pytest.fixture(scope="module")
def recorded_launches(tmp_path_factory):
    """(distinct launches of the workload, a JSON file holding them)."""
    with _recording() as launched:
        _workload()
    specs = list({json.dumps(s, sort_keys=True, default=str): s for s in launched}.values())
    path = tmp_path_factory.mktemp("triton_aot") / "launches.json"
    path.write_text(json.dumps(specs, default=str))
    return specs, path


def test_the_workload_launches_every_kernel(recorded_launches):
    """Every @triton.jit function that some code launches (``name[grid](...)``,
    in kernels/ or the backend) was launched by the workload, so the compile
    test covers all of them."""
    from fusedopt._resources import shipped_module, shipped_names

    launched = {(s["module"], s["kernel"]) for s in recorded_launches[0]}
    modules = [shipped_module("kernels", name) for name in shipped_names("kernels")]
    sources = "".join(inspect.getsource(m) for m in [*modules, sys.modules["fusedopt.backends.triton"]])
    kernels = {(m.__name__, attr) for m in modules for attr, value in vars(m).items()
               if isinstance(value, interpreter.InterpretedFunction) and value.fn.__module__ == m.__name__
               and re.search(rf"\b{attr}\[", sources)}
    assert len(kernels) >= 10 and kernels <= launched, sorted(kernels - launched)


def test_every_launch_turns_fp_contraction_off(recorded_launches):
    specs, _ = recorded_launches
    loose = [s["kernel"] for s in specs if s["options"].get("enable_fp_fusion") is not False]
    assert not loose, f"launched without kernels._numeric.EXACT: {sorted(set(loose))}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launched_kernel_compiles_for_gpus(recorded_launches, arch, tmp_path):
    """...to cubin, with no approximate fp32 division, sqrt, exp or log in its PTX."""
    specs, path = recorded_launches
    assert len(specs) >= 30  # the workload's specialisations, not a handful
    done = subprocess.run([sys.executable, "-c", _compile_script(str(path), arch)], env=_compile_env(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"sm_{arch}:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"


def test_default_fp_fusion_would_add_fmas(tmp_path):
    """Why EXACT exists: the AdamW kernel compiled with Triton's default forms
    more FMAs than it asks for (explicit tl.fma), which would change results."""
    from fusedopt._resources import shipped_module

    ps = _params(torch.float32)
    with _recording() as specs:
        _steps(FusedAdamW(ps, backend="triton"), ps, n=1)
    (spec,) = [s for s in specs if s["kernel"] == "_adamw_kernel"]
    assert shipped_module("kernels", "_numeric").EXACT == {"enable_fp_fusion": False}
    script = textwrap.dedent(f"""
        import json, re, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fusedopt._resources import shipped_module
        s = json.loads({json.dumps(json.dumps(spec, default=str))})
        fn = shipped_module("kernels", "adamw")._adamw_kernel
        for fusion in (False, True):
            k = triton.compile(ASTSource(fn=fn, signature=s["signature"], constexprs=s["constexprs"]),
                               target=GPUTarget("cuda", 90, 32), options={{"enable_fp_fusion": fusion}})
            print(len(re.findall(r"\\bfma\\.rn", k.asm["ptx"])))
    """)
    done = subprocess.run([sys.executable, "-c", script], env=_compile_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    exact, fused = (int(x) for x in done.stdout.split())
    assert 0 < exact < fused
