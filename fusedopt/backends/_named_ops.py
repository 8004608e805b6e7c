"""Extension ops called by name: every argument of a backend's launch is
given by keyword and checked against the op's schema (declared once, in its
bindings file), so no argument can land in another's place."""
from __future__ import annotations

import operator

import torch


def op_names(namespace: str) -> set[str]:
    """The ops registered under torch.ops.<namespace> (loaded extensions, torch.library)."""
    return {q.split("::")[1].split(".")[0] for q in torch._C._dispatch_get_all_op_names()
            if q.startswith(namespace + "::")}


class NamedOps:
    """torch.ops.<namespace> with each op's arguments given by name and
    passed on positionally: the names are checked against the op's schema,
    all of them and no other, without the dispatcher's keyword parsing
    (~15 us a call for AdamW's 25 arguments)."""

    def __init__(self, namespace: str):
        self._namespace = namespace

    def resolve(self) -> None:
        """Every registered op of the namespace resolved now, on load: not
        while Dynamo traces a step (an attribute set then would fail a guard
        and recompile the step)."""
        for name in op_names(self._namespace):
            getattr(self, name)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        overload = getattr(getattr(torch.ops, self._namespace), name).default
        names = tuple(a.name for a in overload._schema.arguments)
        expected = frozenset(names)
        in_order = operator.itemgetter(*names) if len(names) > 1 else lambda kwargs: (kwargs[names[0]],)

        def call(**kwargs):
            if kwargs.keys() != expected:
                raise TypeError(f"{self._namespace}.{name} takes {names}, got {tuple(kwargs)}")
            if torch.compiler.is_compiling():  # (Dynamo traces neither itemgetter nor the OpOverload's _op)
                return overload(*[kwargs[n] for n in names])
            return overload._op(*in_order(kwargs))  # the C++ callable behind the OpOverload: a Python frame less

        setattr(self, name, call)  # resolved once per op
        return call
