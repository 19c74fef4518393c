// tests/cuda_on_cpu: the host stand-in for <cuda_runtime.h>
#pragma once
#include "fdm_cuda_emu.h"
