"""Backend registry: which implementations exist, which can run here, and the
choice for a device.

A backend is a module of this package with:

* ``NAME`` and ``DEVICE_TYPES`` (the tensor device types it can run on),
* ``unavailable_reason(device_type) -> str | None``: a cheap check (imports,
  toolchain, environment) that says why it cannot run, or None,
* ``load()``: whatever has to happen before the first launch (JIT build,
  importing triton); raises with the reason on failure,
* one function per optimizer op (``lamb(bucket, ...)``, ...; Adafactor also
  ``adafactor_sharded``, its phases for DTensor params) and the shared
  reductions (``power_sums``, ``scale_``); a backend without an op's function
  is not a candidate for it. The element-wise ops declared in _moment_ops.py
  (``adamw``, ``sophia``) are not written per backend: each backend's
  ``_moment_launch`` launches them all, bound as ``<backend>.<op>`` by its
  module ``__getattr__``,
* optionally ``fp8_update_(copies, amax, found_inf, recipe)``: the delayed
  scaling after a step with FP8 copies in one call (else
  ``Float8Recipe.update_``, its spec, runs as torch ops),
* optionally ``TRACEABLE = True``: every launch is a registered custom op or
  plain torch ops, so torch.compile can trace a step into its graph
  (FusedOptimizer._traced_plans); without it a compiled step runs eagerly.

Choice for a device: the ``backend=`` argument, else ``$FUSEDOPT_BACKEND``,
else automatic: on CUDA ``cuda`` if it builds, else ``triton``; on CPU ``cpu``
if it builds, else ``reference``. An explicit choice that cannot run raises; an
automatic one that fails warns once and takes the next in line.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

NAMES = ("reference", "cpu", "triton", "cuda")

#: automatic order per device type; "reference" always runs, so it ends each list
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_warned: set[tuple[str, str]] = set()


def validate_name(name: str | None) -> str | None:
    if name is not None and name not in NAMES:
        raise ValueError(f"unknown fusedopt backend {name!r}; valid backends: {', '.join(NAMES)}")
    return name


_modules: dict[str, ModuleType] = {}


def get(name: str) -> ModuleType:
    """The backend module (imports nothing heavy: triton/extensions load in load()).
    A dict lookup after the first call: a compiled step traces through it."""
    module = _modules.get(name)
    if module is None:
        module = _modules[name] = importlib.import_module(f"{__name__}.{validate_name(name)}")
    return module


def _device_type(device) -> str:
    return torch.device(device).type


def unavailable_reason(name: str, device, op: str = "") -> str | None:
    module = get(name)
    device_type = _device_type(device)
    if device_type not in module.DEVICE_TYPES:
        return f"runs on {' and '.join(module.DEVICE_TYPES)} tensors, not {device_type}"
    if op and not hasattr(module, op):
        return f"does not implement {op}"
    return module.unavailable_reason(device_type)


_resolved: dict[tuple, str] = {}


def resolve(requested: str | None, device, op: str = "") -> str:
    """The backend for tensors on `device` (that implements `op`, if given),
    loaded and ready to launch.

    A successful choice is remembered per (request, environment, device type):
    the checks behind it (toolchain on PATH, builds) are not free, and
    clip_grad_norm_ asks on every call."""
    device_type = _device_type(device)
    explicit = requested or os.environ.get("FUSEDOPT_BACKEND") or None
    key = (explicit, device_type, op)
    if key not in _resolved:
        _resolved[key] = _resolve(explicit, requested, device_type, op)
    return _resolved[key]


def resolved(requested: str | None, device) -> ModuleType | None:
    """The module resolve() chose for (requested, device) if it already chose
    one, else None: a lookup Dynamo traces (resolve's first call runs checks,
    builds and imports that it cannot)."""
    explicit = requested or os.environ.get("FUSEDOPT_BACKEND") or None
    name = _resolved.get((explicit, _device_type(device), ""))
    return None if name is None else _modules.get(name)


def _resolve(explicit: str | None, requested: str | None, device_type: str, op: str) -> str:
    if explicit:
        validate_name(explicit)
        reason = unavailable_reason(explicit, device_type, op)
        if reason:
            source = "backend=" if requested else "FUSEDOPT_BACKEND="
            raise ValueError(f"fusedopt backend {explicit!r} ({source}{explicit}) cannot run here: {reason}")
        get(explicit).load()  # raises (BuildError is a RuntimeError) with the reason
        return explicit
    for name in AUTO_ORDER.get(device_type, ("reference",)):
        reason = unavailable_reason(name, device_type, op)
        if reason is None:
            try:
                get(name).load()
                return name
            except Exception as exc:  # noqa: BLE001  (any build failure: fall back, loudly)
                reason = str(exc)
        if name in ("cpu", "cuda") and (name, device_type) not in _warned:
            _warned.add((name, device_type))
            warnings.warn(f"fusedopt: the {name} backend is not available ({reason}); "
                          f"falling back to the next backend for {device_type} tensors", RuntimeWarning,
                          stacklevel=3)
    raise AssertionError("unreachable: the reference backend always runs")


def available_backends(device="cpu") -> list[str]:
    """Names of the backends that run for `device`'s type here (building them if needed)."""
    device_type = _device_type(device)
    names = []
    for name in NAMES:
        if unavailable_reason(name, device_type) is not None:
            continue
        try:
            get(name).load()
        except Exception:  # noqa: BLE001  (does not run: not listed; `fusedopt info` says why)
            continue
        names.append(name)
    return names
