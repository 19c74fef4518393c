// The fused ops' arguments as raw pointers and sizes (no torch), shared by bindings.cpp, the CPU
// kernels (csrc/cpu) and the CUDA launchers (csrc/cuda). bindings.cpp validates tensors and fills
// these structs; a kernel never sees a torch type. Formulas: fdm_fast/ops/reference.py.
#pragma once

#include <cstdint>

#include "fdm_math.h"

namespace fdm {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Logical [B, P] view of an NCHW tensor: contiguous (element j of sample b at b*P + j) or
// channels_last (at b*P + (j % HW) * C + j / HW).
struct Geometry {
  int64_t B, P, HW, C;
  bool channels_last;
};

// Noise source: rows of (seed, offset), one shared row (logical index over the whole tensor) or one
// per sample (index restarts at 0 in each sample); or an explicit float32 noise tensor.
struct Noise {
  const int64_t* rng;
  bool per_sample;
  const float* explicit_noise;  // nullptr: regenerate from rng (same layout as the data otherwise)
};

struct PerturbArgs {
  Geometry g;
  Spec sp;
  const void* y;
  DType y_t;
  const float* sigma;  // [B]
  Noise noise;
  void* net_in;
  DType net_t;
  float* x;  // nullable
};

struct LossArgs {
  Geometry g;
  Spec sp;
  const void* F;
  DType F_t;
  const void* y;
  DType y_t;
  const float* sigma;  // [B]
  Noise noise;
  const float* clamp;  // [1], +inf for none
  // forward
  float* partial;  // [B, parts]
  int64_t parts;
  void* G;  // nullable: also write the unscaled gradient 2 w c_out (D - y) (F's dtype)
  // backward (loss_bwd regenerates the noise; scale_grad reads G from the forward: F = G there)
  const float* grad;  // [B]
  void* dF;           // F's dtype
};

struct ChurnArgs {
  Geometry g;
  Spec sp;
  const float* x;
  const float* t_cur;  // [B]
  const float* t_hat;  // [B]
  Noise noise;
  float S_noise;
  float* x_out;
  void* net_in;
  DType net_t;
};

struct EulerArgs {
  Geometry g;
  Spec sp;
  const float* x;
  const void* F;
  DType F_t;
  const float* t_cur;
  const float* t_next;
  float* x_out;  // nullable: not written
  float* d_out;  // nullable: not written
  void* net_in;
  DType net_t;
};

struct HeunArgs {
  Geometry g;
  Spec sp;
  const float* x;
  const float* d;
  const void* F;
  DType F_t;
  const float* t_cur;
  const float* t_next;
  const float* t_hat_next;  // nullable: no churn
  Noise noise;
  float S_noise;
  float* x_out;
  void* net_in;
  DType net_t;
};

// The solvers' step (fdm_fast.ops.multistep): per-sample coefficient rows, columns
// c_skip, w_F, w_G, a, b, h_1..h_K, s, c_in_next, p, q (coef_stride 0: one shared row).
constexpr int kMaxHistory = 4;
struct MultistepArgs {
  Geometry g;
  const float* x;
  const void* F;  // nullable: no network output (b must be 0)
  DType F_t;
  const void* G;  // nullable: no guiding output
  DType G_t;
  const float* H[kMaxHistory];
  int K;
  const float* coef;
  int64_t coef_stride;
  Noise noise;
  bool draws;  // add the noise column's term (the kernels skip samples whose column is 0)
  float* x_out;
  void* net_in;  // nullable: not written
  DType net_t;
  float* keep;  // nullable: not written
};

struct RandnArgs {
  Geometry g;  // B samples of P elements, contiguous
  Noise noise;
  float* out;
};

namespace cpu {
int64_t loss_parts(const Geometry& g);
void perturb(const PerturbArgs& a);
void loss_fwd(const LossArgs& a);
void loss_bwd(const LossArgs& a);
void scale_grad(const LossArgs& a);
void churn(const ChurnArgs& a);
void euler_step(const EulerArgs& a);
void heun_step(const HeunArgs& a);
void multistep(const MultistepArgs& a);
void randn(const RandnArgs& a);
}  // namespace cpu

}  // namespace fdm
