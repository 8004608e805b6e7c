"""What ZeroOptimizer and PipelineOptimizer share: a torch.optim.Optimizer
whose param groups and state are those of an inner fusedopt optimizer
(``self.optimizer``), which it steps with GradScaler's flags handed over."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor


class WrappingOptimizer(torch.optim.Optimizer):
    # GradScaler hands the flags over instead of unscaling: the inner kernels unscale
    _step_supports_amp_scaling = True

    def _wrap(self, optimizer) -> None:
        """Take `optimizer` as the inner one, and set what
        torch.optim.Optimizer.__init__ would (not called: the groups are the
        inner optimizer's), so that step() runs the step pre/post hooks and
        LR schedulers take this object, as any torch optimizer."""
        self.optimizer = optimizer
        for hooks in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                      "load_state_dict_post"):
            setattr(self, f"_optimizer_{hooks}_hooks", OrderedDict())
        self._patch_step_function()

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def defaults(self):
        return self.optimizer.defaults

    @property
    def state(self):
        return self.optimizer.state

    def _inner_step(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The inner optimizer's step with GradScaler's scale and flag (None: not in use)."""
        inner = self.optimizer
        if grad_scale is not None:
            inner.grad_scale = grad_scale
        if found_inf is not None:
            inner.found_inf = found_inf
        try:
            inner.step()
        finally:
            for name in ("grad_scale", "found_inf"):
                if hasattr(inner, name):
                    delattr(inner, name)
