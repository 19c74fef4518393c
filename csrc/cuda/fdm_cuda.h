// CUDA launchers of the fused ops (csrc/cuda/ops_cuda.cu). Torch-free: raw-pointer argument structs
// in, the stream as an opaque cudaStream_t pointer, so this header is usable from a CPU-only build.
#pragma once

#include "../include/fdm_ops.h"

namespace fdm {
namespace cuda {
int64_t loss_parts(const Geometry& g);  // per-sample partial sums the forward loss writes
void perturb(const PerturbArgs& a, void* stream);
void loss_fwd(const LossArgs& a, void* stream);
void loss_bwd(const LossArgs& a, void* stream);
void scale_grad(const LossArgs& a, void* stream);
void churn(const ChurnArgs& a, void* stream);
void euler_step(const EulerArgs& a, void* stream);
void heun_step(const HeunArgs& a, void* stream);
void multistep(const MultistepArgs& a, void* stream);
void randn(const RandnArgs& a, void* stream);
}  // namespace cuda
}  // namespace fdm
