// tests/cuda_on_cpu: what a test build links besides bindings.cpp and its kernels: the emulator's
// controls, and in the CUDA build stand-ins for the CPU kernels, which that build never calls
// (bindings.cpp under FDM_CUDA_ON_CPU sends CPU tensors to the CUDA launchers).
#include <stdexcept>

#include "fdm_cuda_emu.h"
#include "fdm_ops.h"

extern "C" {
void fdm_emu_set_sm_count(int n) { fdm_emu::g_sm_count = n > 0 ? n : 1; }
long fdm_emu_launches() { return fdm_emu::g_launches.load(); }
}

#if !FDM_EMU_CPU_KERNELS  // the CUDA build: ops_cpu.cpp is not linked
namespace fdm {
namespace cpu {
namespace {
[[noreturn]] void absent() { throw std::logic_error("cuda_on_cpu: a CPU kernel was called in the CUDA test build"); }
}  // namespace
int64_t loss_parts(const Geometry&) { absent(); }
void perturb(const PerturbArgs&) { absent(); }
void loss_fwd(const LossArgs&) { absent(); }
void loss_bwd(const LossArgs&) { absent(); }
void scale_grad(const LossArgs&) { absent(); }
void churn(const ChurnArgs&) { absent(); }
void euler_step(const EulerArgs&) { absent(); }
void heun_step(const HeunArgs&) { absent(); }
void multistep(const MultistepArgs&) { absent(); }
void randn(const RandnArgs&) { absent(); }
}  // namespace cpu
}  // namespace fdm
#endif
