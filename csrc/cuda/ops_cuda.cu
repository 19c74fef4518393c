// CUDA kernels of the fused ops (the `cuda` backend). Formulas: fdm_fast/ops/reference.py.
// No torch headers here (the CPU torch wheel has none for CUDA): raw pointers and a stream come in
// through the argument structs of fdm_ops.h, bindings.cpp does the rest.
//
// Each thread handles groups of 4 consecutive logical elements of one sample, so one Philox call
// (randn4) feeds the four; contiguous tensors with a sample size divisible by 4 and aligned pointers
// use one wide access per group (16 bytes for fp32, 8 for bf16/fp16); channels_last tensors walk
// groups in memory order (see group_start). Indexing is 64-bit. The grid
// is sized to the device: blockIdx.y strides over samples, blockIdx.x over a sample's groups, with
// grid-stride loops in both, so per-sample coefficients are computed once per (block, sample) and
// the forward loss reduces each block's share of a sample into one partial sum (no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fdm_cuda.h"

namespace fdm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWaves = 8;  // resident blocks per SM the grid aims for

template <class T>
struct Conv;
template <>
struct Conv<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Conv<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};

// Four elements as one aligned access (16 bytes for float, 8 for 16-bit types).
template <class T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// channels_last: the divide and modulo are 32-bit (bindings.cpp checks P < 2^31), about a quarter
// of the cost of 64-bit ones; only the sample base is 64-bit.
__device__ __forceinline__ int64_t address(const Geometry& g, int64_t b, int64_t j) {
  if (!g.channels_last) return b * g.P + j;
  const uint32_t jj = static_cast<uint32_t>(j), hw = static_cast<uint32_t>(g.HW);
  const uint32_t c = jj / hw;
  return b * g.P + static_cast<int64_t>(jj - c * hw) * g.C + c;
}

// channels_last with HW % 4 == 0: a group's 4 logical elements are 4 consecutive pixels of one channel.
__device__ __forceinline__ bool cl_groups(const Geometry& g) { return g.channels_last && g.HW % 4 == 0; }

// Logical index of the first element of group q. Contiguous: 4q. channels_last (HW % 4 == 0): groups
// walk memory order, channel fastest (q = pixel_block * C + c), so the threads of a warp touch
// neighbouring addresses (coalesced) instead of addresses C elements apart; the noise contract only
// needs the logical index, c * HW + 4 * pixel_block. 32-bit division, once per group.
__device__ __forceinline__ int64_t group_start(const Geometry& g, int64_t q) {
  if (!cl_groups(g)) return 4 * q;
  const uint32_t qq = static_cast<uint32_t>(q), C = static_cast<uint32_t>(g.C);
  const uint32_t blk = qq / C;
  return static_cast<int64_t>(qq - blk * C) * g.HW + 4 * static_cast<int64_t>(blk);
}

// Memory offset of logical element j + k, k = 0..3, of sample b into off[]; valid[] false past the end.
__device__ __forceinline__ void addresses4(const Geometry& g, int64_t b, int64_t j, int64_t off[4], bool valid[4]) {
  if (cl_groups(g)) {  // one channel, 4 consecutive pixels: one division for the group
    const uint32_t jj = static_cast<uint32_t>(j), hw = static_cast<uint32_t>(g.HW);
    const uint32_t c = jj / hw, p0 = jj - c * hw;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      off[k] = b * g.P + static_cast<int64_t>(p0 + k) * g.C + c;
      valid[k] = true;
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    valid[k] = j + k < g.P;
    off[k] = valid[k] ? address(g, b, j + k) : 0;
  }
}

template <class T>
__device__ __forceinline__ void load4(const T* __restrict__ p, const Geometry& g, int64_t b, int64_t j, bool vec,
                                      float v[4]) {
  if (vec) {
    const Pack4<T> pk = *reinterpret_cast<const Pack4<T>*>(p + b * g.P + j);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = Conv<T>::to(pk.v[k]);
  } else {
    int64_t off[4];
    bool ok[4];
    addresses4(g, b, j, off, ok);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = ok[k] ? Conv<T>::to(p[off[k]]) : 0.0f;
  }
}

template <class T>
__device__ __forceinline__ void store4(T* __restrict__ p, const Geometry& g, int64_t b, int64_t j, bool vec,
                                       const float v[4]) {
  if (vec) {
    Pack4<T> pk;
#pragma unroll
    for (int k = 0; k < 4; ++k) pk.v[k] = Conv<T>::from(v[k]);
    *reinterpret_cast<Pack4<T>*>(p + b * g.P + j) = pk;
  } else {
    int64_t off[4];
    bool ok[4];
    addresses4(g, b, j, off, ok);
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (ok[k]) p[off[k]] = Conv<T>::from(v[k]);
  }
}

// Noise of logical elements j .. j+3 of sample b (noise contract; docs/design.md 2.1).
__device__ __forceinline__ void noise4(const Noise& nz, const Geometry& g, int64_t b, int64_t j, bool vec,
                                       float n[4]) {
  if (nz.explicit_noise) {
    load4(nz.explicit_noise, g, b, j, vec, n);
    return;
  }
  const int64_t row = nz.per_sample ? b : 0;
  const uint64_t seed = static_cast<uint64_t>(nz.rng[2 * row]);
  const uint64_t off = static_cast<uint64_t>(nz.rng[2 * row + 1]);
  const int64_t i0 = (nz.per_sample ? 0 : b * g.P) + j;
  const uint64_t c = off + static_cast<uint64_t>(i0 / 4);
  const int s = static_cast<int>(i0 & 3);
  if (s == 0) {
    randn4(seed, c, n);
  } else {  // a shared row and a sample size not divisible by 4: the group straddles two counters
    float lo[4], hi[4];
    randn4(seed, c, lo);
    randn4(seed, c + 1, hi);
#pragma unroll
    for (int k = 0; k < 4; ++k) n[k] = s + k < 4 ? lo[s + k] : hi[s + k - 4];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

#define FDM_SAMPLES for (int64_t b = blockIdx.y; b < g.B; b += gridDim.y)
#define FDM_GROUPS                                                                                  \
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < (g.P + 3) / 4; \
       q += static_cast<int64_t>(gridDim.x) * blockDim.x)

// ------------------------------------------------------------------------------------------------

template <class TY, class TO>
__global__ void __launch_bounds__(kThreads) perturb_kernel(PerturbArgs a, bool vec) {
  const Geometry& g = a.g;
  FDM_SAMPLES {
    const float s = a.sigma[b], cin = c_in(a.sp, s);
    FDM_GROUPS {
      const int64_t j = group_start(g, q);
      float y[4], n[4], x[4], o[4];
      load4(static_cast<const TY*>(a.y), g, b, j, vec, y);
      noise4(a.noise, g, b, j, vec, n);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        x[k] = y[k] + s * n[k];
        o[k] = cin * x[k];
      }
      store4(static_cast<TO*>(a.net_in), g, b, j, vec, o);
      if (a.x) store4(a.x, g, b, j, vec, x);
    }
  }
}

template <class TF, class TY>
__device__ __forceinline__ void loss_diff4(const LossArgs& a, const Coeffs& c, float s, int64_t b, int64_t j,
                                           bool vec, float d[4]) {
  float y[4], f[4], n[4];
  load4(static_cast<const TY*>(a.y), a.g, b, j, vec, y);
  load4(static_cast<const TF*>(a.F), a.g, b, j, vec, f);
  noise4(a.noise, a.g, b, j, vec, n);
#pragma unroll
  for (int k = 0; k < 4; ++k) d[k] = j + k < a.g.P ? c.c_skip * (y[k] + s * n[k]) + c.c_out * f[k] - y[k] : 0.0f;
}

template <class TF, class TY>
__global__ void __launch_bounds__(kThreads) loss_fwd_kernel(LossArgs a, bool vec) {
  __shared__ float warp_sums[kThreads / 32];
  const Geometry& g = a.g;
  FDM_SAMPLES {
    const float s = a.sigma[b];
    const Coeffs c = coefficients(a.sp, s);
    const float w = fminf(c.weight, a.clamp[0]);
    const float gscale = w * 2.0f * c.c_out;
    float acc = 0.0f;
    FDM_GROUPS {
      float d[4];
      loss_diff4<TF, TY>(a, c, s, b, group_start(g, q), vec, d);
      acc += d[0] * d[0] + d[1] * d[1] + d[2] * d[2] + d[3] * d[3];
      if (a.G) {  // the unscaled gradient, so the backward is a scale (no second noise pass)
        float gr[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) gr[k] = gscale * d[k];
        store4(static_cast<TF*>(a.G), g, b, group_start(g, q), vec, gr);
      }
    }
    acc = warp_sum(acc);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
      float v = lane < kThreads / 32 ? warp_sums[lane] : 0.0f;
      v = warp_sum(v);
      if (lane == 0) a.partial[b * a.parts + blockIdx.x] = w * v;
    }
    __syncthreads();
  }
}

template <class TF, class TY>
__global__ void __launch_bounds__(kThreads) loss_bwd_kernel(LossArgs a, bool vec) {
  const Geometry& g = a.g;
  FDM_SAMPLES {
    const float s = a.sigma[b];
    const Coeffs c = coefficients(a.sp, s);
    const float scale = a.grad[b] * fminf(c.weight, a.clamp[0]) * 2.0f * c.c_out;
    FDM_GROUPS {
      float d[4];
      loss_diff4<TF, TY>(a, c, s, b, group_start(g, q), vec, d);
#pragma unroll
      for (int k = 0; k < 4; ++k) d[k] *= scale;
      store4(static_cast<TF*>(a.dF), g, b, group_start(g, q), vec, d);
    }
  }
}

template <class TF>
__global__ void __launch_bounds__(kThreads) scale_grad_kernel(LossArgs a, bool vec) {
  const Geometry& g = a.g;
  FDM_SAMPLES {
    const float gs = a.grad[b];
    FDM_GROUPS {
      float v[4];
      load4(static_cast<const TF*>(a.F), g, b, group_start(g, q), vec, v);
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] *= gs;
      store4(static_cast<TF*>(a.dF), g, b, group_start(g, q), vec, v);
    }
  }
}

template <class TO>
__global__ void __launch_bounds__(kThreads) churn_kernel(ChurnArgs a, bool vec) {
  const Geometry& g = a.g;
  FDM_SAMPLES {
    const float t = a.t_cur[b], th = a.t_hat[b];
    const float scale = sqrtf(fmaxf(th * th - t * t, 0.0f)) * a.S_noise, cin = c_in(a.sp, th);
    FDM_GROUPS {
      const int64_t j = group_start(g, q);
      float x[4], n[4] = {0.0f, 0.0f, 0.0f, 0.0f}, o[4];
      load4(a.x, g, b, j, vec, x);
      if (scale != 0.0f) noise4(a.noise, g, b, j, vec, n);  // t_hat = t_cur: no Philox
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        x[k] += scale * n[k];
        o[k] = cin * x[k];
      }
      store4(a.x_out, g, b, j, vec, x);
      store4(static_cast<TO*>(a.net_in), g, b, j, vec, o);
    }
  }
}

template <class TF, class TO>
__global__ void __launch_bounds__(kThreads) euler_kernel(EulerArgs a, bool vec) {
  const Geometry& g = a.g;
  FDM_SAMPLES {
    const float t = a.t_cur[b], tn = a.t_next[b], h = tn - t;
    const Coeffs c = coefficients(a.sp, t);
    const float cin = c_in(a.sp, tn);
    FDM_GROUPS {
      const int64_t j = group_start(g, q);
      float x[4], f[4], d[4], o[4];
      load4(a.x, g, b, j, vec, x);
      load4(static_cast<const TF*>(a.F), g, b, j, vec, f);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        d[k] = (x[k] - (c.c_skip * x[k] + c.c_out * f[k])) / t;
        x[k] += h * d[k];
        o[k] = cin * x[k];
      }
      if (a.d_out) store4(a.d_out, g, b, j, vec, d);  // null: the caller does not want it
      if (a.x_out) store4(a.x_out, g, b, j, vec, x);
      store4(static_cast<TO*>(a.net_in), g, b, j, vec, o);
    }
  }
}

template <class TF, class TO>
__global__ void __launch_bounds__(kThreads) heun_kernel(HeunArgs a, bool vec) {
  const Geometry& g = a.g;
  const bool churning = a.t_hat_next != nullptr;
  FDM_SAMPLES {
    const float t = a.t_cur[b], tn = a.t_next[b], h = tn - t;
    const Coeffs c = coefficients(a.sp, tn);
    const float t_out = churning ? a.t_hat_next[b] : tn;
    const float scale = churning ? sqrtf(fmaxf(t_out * t_out - tn * tn, 0.0f)) * a.S_noise : 0.0f;
    const float cin = c_in(a.sp, t_out);
    FDM_GROUPS {
      const int64_t j = group_start(g, q);
      float x[4], d[4], f[4], n[4] = {0.0f, 0.0f, 0.0f, 0.0f}, o[4];
      load4(a.x, g, b, j, vec, x);
      load4(a.d, g, b, j, vec, d);
      load4(static_cast<const TF*>(a.F), g, b, j, vec, f);
      if (scale != 0.0f) noise4(a.noise, g, b, j, vec, n);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float xe = x[k] + h * d[k];
        const float d2 = (xe - (c.c_skip * xe + c.c_out * f[k])) / tn;
        x[k] = x[k] + h * (0.5f * d[k] + 0.5f * d2) + scale * n[k];
        o[k] = cin * x[k];
      }
      store4(a.x_out, g, b, j, vec, x);
      store4(static_cast<TO*>(a.net_in), g, b, j, vec, o);
    }
  }
}

template <class TF, class TG, class TO>
__global__ void __launch_bounds__(kThreads) multistep_kernel(MultistepArgs a, bool vec) {
  const Geometry& g = a.g;
  const int K = a.K;
  FDM_SAMPLES {
    const float* row = a.coef + b * a.coef_stride;  // c_skip, w_F, w_G, a, b, h_1..h_K, s, c_in_next, p, q
    const float c_skip = row[0], w_f = row[1], w_g = row[2], ca = row[3], cb = row[4];
    const float s = row[5 + K], cin = row[6 + K], p = row[7 + K], qq = row[8 + K];
    const bool noisy = a.draws && s != 0.0f;
    FDM_GROUPS {
      const int64_t j = group_start(g, q);
      float x[4], D[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc[4], o[4], n[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      load4(a.x, g, b, j, vec, x);
      if (a.F) {
        float f[4];
        load4(static_cast<const TF*>(a.F), g, b, j, vec, f);
#pragma unroll
        for (int k = 0; k < 4; ++k) D[k] = c_skip * x[k] + w_f * f[k];
        if (a.G) {
          load4(static_cast<const TG*>(a.G), g, b, j, vec, f);
#pragma unroll
          for (int k = 0; k < 4; ++k) D[k] += w_g * f[k];
        }
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[k] = ca * x[k] + cb * D[k];
      for (int m = 0; m < K; ++m) {
        float hv[4];
        load4(a.H[m], g, b, j, vec, hv);
        const float hm = row[5 + m];
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[k] += hm * hv[k];
      }
      if (noisy) noise4(a.noise, g, b, j, vec, n);  // no Philox for a sample that adds no noise
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        acc[k] += s * n[k];
        o[k] = cin * acc[k];
      }
      store4(a.x_out, g, b, j, vec, acc);
      if (a.net_in) store4(static_cast<TO*>(a.net_in), g, b, j, vec, o);
      if (a.keep) {
#pragma unroll
        for (int k = 0; k < 4; ++k) o[k] = p * x[k] + qq * D[k];
        store4(a.keep, g, b, j, vec, o);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) randn_kernel(RandnArgs a, bool vec) {
  const Geometry& g = a.g;
  FDM_SAMPLES {
    FDM_GROUPS {
      float n[4];
      noise4(a.noise, g, b, group_start(g, q), vec, n);
      store4(a.out, g, b, group_start(g, q), vec, n);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("fdm_fast CUDA ") + what + ": " + cudaGetErrorString(e));
}

int sm_count() {
  int dev = 0, sms = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return sms > 0 ? sms : 1;
}

dim3 grid_for(const Geometry& g) {
  const int64_t groups = (g.P + 3) / 4;
  const int64_t gy = g.B < 65535 ? g.B : 65535;
  const int64_t target = static_cast<int64_t>(sm_count()) * kWaves;  // blocks in flight we aim for
  int64_t gx = (groups + kThreads - 1) / kThreads;
  const int64_t per_sample = (target + gy - 1) / gy;
  if (gx > per_sample) gx = per_sample;
  if (gx < 1) gx = 1;
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

bool aligned(const void* p, int bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int size_of(DType t) { return t == DType::F32 ? 4 : 2; }

// Wide accesses: contiguous, whole groups, and every pointer aligned to 4 elements.
bool wide(const Geometry& g, std::initializer_list<std::pair<const void*, int>> ptrs) {
  if (g.channels_last || g.P % 4 != 0) return false;
  for (const auto& p : ptrs)
    if (!aligned(p.first, 4 * p.second)) return false;
  return true;
}

#define FDM_CASE(ENUM, TYPE, NAME, ...) \
  case DType::ENUM: {                   \
    using NAME = TYPE;                  \
    __VA_ARGS__();                      \
    break;                              \
  }
#define FDM_DISPATCH(DT, NAME, ...)                      \
  switch (DT) {                                          \
    FDM_CASE(F32, float, NAME, __VA_ARGS__)              \
    FDM_CASE(BF16, __nv_bfloat16, NAME, __VA_ARGS__)     \
    FDM_CASE(F16, __half, NAME, __VA_ARGS__)             \
  }

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

}  // namespace

int64_t loss_parts(const Geometry& g) { return grid_for(g).x; }

void perturb(const PerturbArgs& a, void* stream) {
  const bool vec = wide(a.g, {{a.y, size_of(a.y_t)}, {a.net_in, size_of(a.net_t)}, {a.x, 4},
                              {a.noise.explicit_noise, 4}});
  FDM_DISPATCH(a.y_t, TY, [&] {
    FDM_DISPATCH(a.net_t, TO, [&] {
      perturb_kernel<TY, TO><<<grid_for(a.g), kThreads, 0, as_stream(stream)>>>(a, vec);
    });
  });
  check(cudaGetLastError(), "perturb launch");
}

void loss_fwd(const LossArgs& a, void* stream) {
  const bool vec = wide(a.g, {{a.F, size_of(a.F_t)}, {a.y, size_of(a.y_t)}, {a.G, size_of(a.F_t)},
                              {a.noise.explicit_noise, 4}});
  const dim3 grid = grid_for(a.g);
  if (static_cast<int64_t>(grid.x) != a.parts) throw std::runtime_error("fdm_fast CUDA loss_fwd: partial-sum buffer "
                                                                        "does not match the grid");
  FDM_DISPATCH(a.F_t, TF, [&] {
    FDM_DISPATCH(a.y_t, TY, [&] { loss_fwd_kernel<TF, TY><<<grid, kThreads, 0, as_stream(stream)>>>(a, vec); });
  });
  check(cudaGetLastError(), "loss_fwd launch");
}

void loss_bwd(const LossArgs& a, void* stream) {
  const bool vec = wide(a.g, {{a.F, size_of(a.F_t)}, {a.y, size_of(a.y_t)}, {a.dF, size_of(a.F_t)},
                              {a.noise.explicit_noise, 4}});
  FDM_DISPATCH(a.F_t, TF, [&] {
    FDM_DISPATCH(a.y_t, TY, [&] {
      loss_bwd_kernel<TF, TY><<<grid_for(a.g), kThreads, 0, as_stream(stream)>>>(a, vec);
    });
  });
  check(cudaGetLastError(), "loss_bwd launch");
}

void scale_grad(const LossArgs& a, void* stream) {
  const bool vec = wide(a.g, {{a.F, size_of(a.F_t)}, {a.dF, size_of(a.F_t)}});
  FDM_DISPATCH(a.F_t, TF, [&] { scale_grad_kernel<TF><<<grid_for(a.g), kThreads, 0, as_stream(stream)>>>(a, vec); });
  check(cudaGetLastError(), "scale_grad launch");
}

void churn(const ChurnArgs& a, void* stream) {
  const bool vec = wide(a.g, {{a.x, 4}, {a.x_out, 4}, {a.net_in, size_of(a.net_t)}, {a.noise.explicit_noise, 4}});
  FDM_DISPATCH(a.net_t, TO, [&] { churn_kernel<TO><<<grid_for(a.g), kThreads, 0, as_stream(stream)>>>(a, vec); });
  check(cudaGetLastError(), "churn launch");
}

void euler_step(const EulerArgs& a, void* stream) {
  const bool vec = wide(a.g, {{a.x, 4}, {a.F, size_of(a.F_t)}, {a.x_out, 4}, {a.d_out, 4},
                              {a.net_in, size_of(a.net_t)}});
  FDM_DISPATCH(a.F_t, TF, [&] {
    FDM_DISPATCH(a.net_t, TO, [&] {
      euler_kernel<TF, TO><<<grid_for(a.g), kThreads, 0, as_stream(stream)>>>(a, vec);
    });
  });
  check(cudaGetLastError(), "euler_step launch");
}

void heun_step(const HeunArgs& a, void* stream) {
  const bool vec = wide(a.g, {{a.x, 4}, {a.d, 4}, {a.F, size_of(a.F_t)}, {a.x_out, 4},
                              {a.net_in, size_of(a.net_t)}, {a.noise.explicit_noise, 4}});
  FDM_DISPATCH(a.F_t, TF, [&] {
    FDM_DISPATCH(a.net_t, TO, [&] {
      heun_kernel<TF, TO><<<grid_for(a.g), kThreads, 0, as_stream(stream)>>>(a, vec);
    });
  });
  check(cudaGetLastError(), "heun_step launch");
}

void multistep(const MultistepArgs& a, void* stream) {
  const bool vec = wide(a.g, {{a.x, 4}, {a.F, a.F ? size_of(a.F_t) : 4}, {a.G, a.G ? size_of(a.G_t) : 4},
                              {a.H[0], 4}, {a.H[1], 4}, {a.H[2], 4}, {a.H[3], 4}, {a.x_out, 4},
                              {a.net_in, a.net_in ? size_of(a.net_t) : 4}, {a.keep, 4}, {a.noise.explicit_noise, 4}});
  FDM_DISPATCH(a.F ? a.F_t : DType::F32, TF, [&] {
    FDM_DISPATCH(a.G ? a.G_t : DType::F32, TG, [&] {
      FDM_DISPATCH(a.net_in ? a.net_t : DType::F32, TO, [&] {
        multistep_kernel<TF, TG, TO><<<grid_for(a.g), kThreads, 0, as_stream(stream)>>>(a, vec);
      });
    });
  });
  check(cudaGetLastError(), "multistep launch");
}

void randn(const RandnArgs& a, void* stream) {
  const bool vec = wide(a.g, {{a.out, 4}});
  randn_kernel<<<grid_for(a.g), kThreads, 0, as_stream(stream)>>>(a, vec);
  check(cudaGetLastError(), "randn launch");
}

}  // namespace cuda
}  // namespace fdm
