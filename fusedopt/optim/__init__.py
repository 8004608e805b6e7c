"""torch.optim-compatible optimizers, one module per optimizer over a shared base."""
from .adafactor import FusedAdafactor
from .adamw import FusedAdamW
from .base import FusedOptimizer
from .lamb import FusedLAMB
from .muon import FusedMuon
from .sophia import FusedSophia, gnb_hessian_loss

__all__ = ["FusedAdafactor", "FusedAdamW", "FusedLAMB", "FusedMuon", "FusedOptimizer", "FusedSophia", "gnb_hessian_loss"]
