"""A CPU stand-in for the CUDA runtime, enough to run csrc/cuda/*.cu (see cuda_emu.h)."""
