"""Storage dtype codes shared with the kernels (kernels/_numeric.py) and the C++
headers (csrc/include/fusedopt/common.h: enum class DType)."""
import torch

F32, F64, BF16, F16, FP8_BLOCKED = 0, 1, 2, 3, 4

CODES = {torch.float32: F32, torch.float64: F64, torch.bfloat16: BF16, torch.float16: F16}
#: the codes of state storage dtypes: FP8_BLOCKED is block-scaled e4m3fn (fusedopt/reference/fp8_states.py)
STATE_CODES = {**CODES, torch.float8_e4m3fn: FP8_BLOCKED}

#: param dtypes every fusedopt optimizer takes
SUPPORTED_PARAM_DTYPES = tuple(CODES)
LOW_PRECISION = (torch.bfloat16, torch.float16)

#: what the ``state_dtype`` optimizer argument takes besides None (the default:
#: the param's dtype, or fp32 with master weights)
STATE_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)
#: block-scaled FP8 states (fusedopt/reference/fp8_states.py): kernels pass code FP8_STATES
FP8_STATE_DTYPE = torch.float8_e4m3fn


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the update is computed in: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fp32_scalar(t, device):
    """A 1-element fp32 tensor on `device` holding scalar tensor `t` (None stays
    None): how a tensor lr and found_inf reach a kernel. No copy, and no host
    sync, when `t` already is one."""
    return None if t is None else t.detach().to(device=device, dtype=torch.float32).reshape(1)


#: fp8 formats by dtype: the codes of Fp8Format (csrc/include/fusedopt/fp8.h) and kernels/fp8.py
FP8_FORMATS = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}
