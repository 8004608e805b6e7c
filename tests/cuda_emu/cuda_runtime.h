// The emulator stands in for the CUDA runtime header (tests/cuda_emu/cuda_emu.h).
#pragma once
#include "cuda_emu.h"
