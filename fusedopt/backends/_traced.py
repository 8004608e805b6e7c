"""The triton and cuda backends' launches as torch.library custom ops, so that
torch.compile traces a step into its graph (``TRACEABLE``).

Those backends launch over device tables of tensor addresses (_tables.py),
which fake tensors do not have: under torch.compile each backend function
becomes one opaque op over the bucket's tensor lists, whose implementation
rebuilds the bucket and calls the same function eagerly. Outside torch.compile
the functions are called directly (an op call costs host time a step).

One schema serves every optimizer op (``bucket_op``): the bucket's lists, its
storage and the function's keyword arguments, each either a scalar or a tensor,
in the function's own order. The ops say they write params, states, masters,
steps and FP8 copies; they return the FP8 copies' absmax (AdamW with FP8
copies) or an empty tensor. They are tagged cudagraph_unsafe where torch knows
the tag: the step's tables of addresses are not valid in another graph's
static buffers, so mode="reduce-overhead" runs them outside the CUDA graph.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor

from ._bucket import Bucket, Fp8Copies

NAMESPACE = "fusedopt_traced"

_BUCKET_SCHEMA = ("(Tensor(a!)[] params, Tensor[] grads, str[] state_names, Tensor(b!)[] states, "
                  "Tensor(c!)[] masters, bool remainders, Tensor(d!)[] steps, Tensor(e!)[] fp8_weights, "
                  "Tensor[] fp8_scales, ScalarType state_dtype, bool? kind, int? sr_seed, Scalar?[] scalars, "
                  "Tensor?[] tensors) -> Tensor")
_BUCKET_WRITES = ("params", "states", "masters", "steps", "fp8_weights")


def _through_op() -> bool:
    """Whether a launch goes through its custom op: while Dynamo traces
    (tests/test_custom_ops.py also routes eager launches through them)."""
    return torch.compiler.is_compiling()


def _define(name: str, impl, schema: str, writes: tuple[str, ...], fake):
    tags = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=writes, schema=schema,
                                 **({"tags": tags} if tags else {}))
    op.register_fake(fake)
    return getattr(torch.ops.fusedopt_traced, name)


def _bucket_fake(params, grads, state_names, states, masters, remainders, steps, fp8_weights, fp8_scales,
                 state_dtype, kind, sr_seed, scalars, tensors):
    return params[0].new_empty(len(params) if fp8_weights else 0, dtype=torch.float64)


def bucket_op(backend: str):
    """Decorator for a backend function ``f(bucket, *, hyperparameters)``:
    registers ``fusedopt_traced::<backend>_<f>`` and returns f, called through
    the op while Dynamo traces."""
    def wrap(function):
        names = tuple(inspect.signature(function).parameters)[1:]

        def impl(params, grads, state_names, states, masters, remainders, steps, fp8_weights, fp8_scales,
                 state_dtype, kind, sr_seed, scalars, tensors):
            n = len(params)
            if n == 0:
                raise ValueError(f"{op_name}: a launch needs at least one param")
            if len(states) != n * len(state_names):
                raise RuntimeError(f"{op_name}: {len(states)} state tensors for {len(state_names)} states of "
                                   f"{n} params")
            bucket = Bucket(params[0].device, params[0].dtype, state_dtype, kind, list(params), list(grads),
                            {name: list(states[i * n:(i + 1) * n]) for i, name in enumerate(state_names)},
                            list(masters) or None, remainders, list(steps), sr_seed,
                            Fp8Copies(list(fp8_weights), list(fp8_scales), None, None, None) if fp8_weights else None)
            hyper = {name: t if t is not None else s for name, s, t in zip(names, scalars, tensors)}
            out = function(bucket, **hyper)
            return out if isinstance(out, Tensor) else params[0].new_empty(0, dtype=torch.float64)

        op_name = f"{backend}_{function.__name__}"
        op = _define(op_name, impl, _BUCKET_SCHEMA, _BUCKET_WRITES, _bucket_fake)

        @functools.wraps(function)
        def launch(bucket, **hyper):
            if not _through_op():
                return function(bucket, **hyper)
            if bucket.stats is not None or not bucket.params:
                raise RuntimeError(f"{op_name}: DTensor buckets are not traced (their statistics make collectives)")
            values = [hyper[name] for name in names]
            fp8 = bucket.fp8
            out = op(bucket.params, bucket.grads, list(bucket.states), [t for ts in bucket.states.values() for t in ts],
                     bucket.masters or [], bucket.remainders, bucket.steps, fp8.weights if fp8 else [],
                     fp8.scales if fp8 else [], bucket.state_dtype, bucket.kind, bucket.sr_seed,
                     [None if isinstance(v, Tensor) else v for v in values],
                     [v if isinstance(v, Tensor) else None for v in values])
            return out if fp8 else None

        return launch

    return wrap


#: the reductions and the FP8 cast each backend has, by function name: (schema, written arguments, fake)
_TENSOR_OPS = {
    "power_sums": ("(Tensor[] tensors, float p) -> Tensor", (),
                   lambda tensors, p: tensors[0].new_empty(len(tensors), dtype=torch.float64)),
    "scale_": ("(Tensor(a!)[] tensors, Tensor factor) -> ()", ("tensors",), lambda tensors, factor: None),
    "cast_fp8": ("(Tensor[] inputs, Tensor(a!)[] outputs, Tensor scales) -> Tensor", ("outputs",),
                 lambda inputs, outputs, scales: inputs[0].new_empty(len(inputs), dtype=torch.float64)),
    "fp8_scales_update_": ("(Tensor amax, Tensor(a!) history, Tensor(b!) scales, Tensor(c!) scale_inv, "
                           "Tensor? found_inf, float fp8_max, int margin) -> ()", ("history", "scales", "scale_inv"),
                           lambda amax, history, scales, scale_inv, found_inf, fp8_max, margin: None),
}


def tensor_op(backend: str):
    """Decorator for a backend function of tensors and scalars named in
    _TENSOR_OPS: registers ``fusedopt_traced::<backend>_<name>`` and returns
    the function, called through the op while Dynamo traces."""
    def wrap(function):
        schema, writes, fake = _TENSOR_OPS[function.__name__]
        op = _define(f"{backend}_{function.__name__}", function, schema, writes, fake)

        @functools.wraps(function)
        def launch(*args):
            return (op if _through_op() else function)(*args)

        return launch

    return wrap
