"""fusedopt: fused multi-tensor optimizers for PyTorch.

    from fusedopt import FusedAdamW
    opt = FusedAdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

Importing fusedopt imports neither triton nor any compiled extension: kernels
are loaded (and JIT-compiled, once, cached) when an optimizer first needs them.
"""
from ._jit import BuildError
from .amp import GradScaler
from .backends import available_backends
from .fp8 import Float8Recipe, cast_to_fp8
from .norms import clip_grad_norm_, grad_norm
from .optim import *  # noqa: F403  (every optimizer: fusedopt/optim/__init__.py lists them once)
from .optim import __all__ as _optimizers

__version__ = "0.1.0"

__all__ = ["BuildError", "Float8Recipe", "GradScaler", "available_backends", "cast_to_fp8", "clip_grad_norm_",
           "grad_norm", "__version__", *_optimizers]
