"""torch.optim-compatible optimizers, one module per optimizer over a shared base."""
from .adamw import FusedAdamW
from .base import FusedOptimizer

__all__ = ["FusedAdamW", "FusedOptimizer"]
