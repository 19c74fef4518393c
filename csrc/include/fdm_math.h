// fdm_fast math shared by the CPU and CUDA kernels (host + device inline functions, no torch).
//
// 1. The coefficients of docs/design.md section 1 (c_skip, c_out, c_in, lambda) for the base
//    preconditionings vp / ve / edm and their FDM variants, in float32 (the fused kernels' precision).
// 2. The noise contract of docs/design.md 2.1: Philox4x32-10 (Salmon et al. 2011) keyed by the 64-bit
//    seed, counter (c_lo, c_hi, 0, 0), outputs folded to uniforms exactly as Triton's
//    uint_to_uniform_float, then Box-Muller as Triton's randn4x. Element i of the logical tensor is
//    component i % 4 of counter offset + i / 4.
//
// Must stay in sync with fdm_fast/schedules.py (the spec) and fdm_fast/ops/triton_common.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FDM_HD __host__ __device__ __forceinline__
#else
#define FDM_HD inline
#endif

namespace fdm {

// ------------------------------------------------------------------------------------------------
// Preconditionings (schedules.KIND_*; the params layout of Precond.kernel_spec()).

enum Kind : int { kVP = 0, kVE = 1, kEDM = 2 };

struct Spec {
  int kind;
  int fdm;      // FDM variant: c_in = exp(-m B)(1 + m B)
  float sd;     // sigma_data (edm)
  float smin;   // supported sigma range (FDM's tau)
  float smax;
  float m;      // fdm_multiplier
  float fbm;    // FDM beta_min
  float fbd;    // FDM beta_d
};

struct Coeffs {
  float c_skip, c_out, c_in, weight;
};

FDM_HD float fdm_c_in(const Spec& sp, float s) {
  const float tau = (s - sp.smin) / (sp.smax - sp.smin);
  const float mb = sp.m * (sp.fbm * tau + 0.5f * sp.fbd * tau * tau);
  return expf(-mb) * (1.0f + mb);
}

FDM_HD Coeffs coefficients(const Spec& sp, float s) {
  const float s2 = s * s;
  Coeffs c;
  if (sp.kind == kVP) {
    c.c_skip = 1.0f;
    c.c_out = -s;
    c.c_in = 1.0f / sqrtf(s2 + 1.0f);
    c.weight = 1.0f / s2;
  } else if (sp.kind == kVE) {
    c.c_skip = 1.0f;
    c.c_out = s;
    c.c_in = 1.0f;
    c.weight = 1.0f / s2;
  } else {
    const float sd2 = sp.sd * sp.sd;
    c.c_skip = sd2 / (s2 + sd2);
    c.c_out = s * sp.sd / sqrtf(s2 + sd2);
    c.c_in = 1.0f / sqrtf(s2 + sd2);
    c.weight = (s2 + sd2) / (s2 * sd2);
  }
  if (sp.fdm) c.c_in = fdm_c_in(sp, s);
  return c;
}

FDM_HD float c_in(const Spec& sp, float s) { return coefficients(sp, s).c_in; }

// ------------------------------------------------------------------------------------------------
// Philox4x32-10.

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

struct U4 {
  uint32_t x, y, z, w;
};

FDM_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

FDM_HD U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kPhiloxM0, c.x, hi0, lo0);
    mulhilo(kPhiloxM1, c.z, hi1, lo1);
    c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

// uint32 -> float in [0, 1) as Triton's uint_to_uniform_float: bit-cast to int32, fold negatives
// with ~x, scale by the largest float with INT32_MAX * scale < 1.
FDM_HD float u32_to_uniform(uint32_t v) {
  int32_t x = static_cast<int32_t>(v);  // two's complement bit-cast
  x ^= x >> 31;  // x < 0 ? ~x : x, without a branch (arithmetic shift)
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// ------------------------------------------------------------------------------------------------
// log and sin/cos(2 pi u) for Box-Muller: branch-free polynomials (|error| < 2e-7 on the inputs
// Box-Muller feeds them), on the host and the device alike, and in the Triton kernels
// (fdm_fast/ops/triton_common.py). On the host the compiler vectorises them without -ffast-math; on
// the device they replace logf and sincospif, whose general range handling Box-Muller never needs.
// The same formulas in every backend: without FMA contraction (the CPU's baseline build, Triton's
// interpreter) CPU and Triton noise are bit for bit equal; with it they agree to rounding.

// Bit casts; __builtin_bit_cast (not memcpy) keeps values in registers so loops vectorise.
FDM_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}

FDM_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

// Natural log for positive normal floats: u = 2^e m with m in [sqrt(1/2), sqrt(2)) found by integer
// arithmetic on the bits (no branches, so loops vectorise), then log m = f q(f), f = m - 1, with q a
// degree-8 least-squares fit of log1p(f)/f on Chebyshev nodes of [sqrt(1/2) - 1, sqrt(2) - 1]
// (|error| < 5e-8 there; no division, which costs more than the 8 FMAs in a vector loop).
FDM_HD float log_poly(float u) {
  const int32_t ix = static_cast<int32_t>(float_to_bits(u)) - 0x3F3504F3;  // bits of sqrt(1/2)
  const int32_t e = ix >> 23;                                               // arithmetic shift
  const float f = bits_to_float(static_cast<uint32_t>((ix & 0x7FFFFF) + 0x3F3504F3)) - 1.0f;
  constexpr float c1 = -4.999998808e-01f, c2 = 3.333418369e-01f, c3 = -2.500215471e-01f, c4 = 1.995697767e-01f;
  constexpr float c5 = -1.656069607e-01f, c6 = 1.494909525e-01f, c7 = -1.437733024e-01f, c8 = 8.743945509e-02f;
  const float q = 1.0f + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * (c5 + f * (c6 + f * (c7 + f * c8)))))));
  return static_cast<float>(e) * 0.693147180559945f + f * q;
}

// sin(2 pi u) and cos(2 pi u) for u in [0, 1): reduce to the nearest quarter turn q, so that
// x = 2 pi (u - q/4) is in [-pi/4, pi/4], then Taylor series (errors < 1e-9 there) and a rotation.
struct SinCos {
  float s, c;
};

FDM_HD SinCos sincos_2pi_poly(float u) {
  const int q = static_cast<int>(4.0f * u + 0.5f);  // truncation is floor here (u >= 0); floorf would
  const float qf = static_cast<float>(q);            // block vectorisation under -ftrapping-math
  const float x = (u - 0.25f * qf) * 6.28318530717958647f;
  const float x2 = x * x;
  const float s = x * (1.0f + x2 * (-1.0f / 6 + x2 * (1.0f / 120 + x2 * (-1.0f / 5040 + x2 * (1.0f / 362880 +
                  x2 * (-1.0f / 39916800))))));
  const float c = 1.0f + x2 * (-0.5f + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (1.0f / 40320 + x2 * (
                  -1.0f / 3628800 + x2 * (1.0f / 479001600))))));
  // rotate by q quarter turns, (sin, cos)(x + q pi/2), with single-level selects so loops vectorise:
  // odd q swaps sin and cos; q = 2, 3 negate the sine; q = 1, 2 negate the cosine.
  const float a = (q & 1) ? c : s;
  const float b = (q & 1) ? s : c;
  return SinCos{(q & 2) ? -a : a, ((q + 1) & 2) ? -b : b};
}

// max(u, 1e-7) for u >= 0, as an integer max on the bits (order-preserving for non-negative floats):
// a float select here stops GCC from vectorising the loop under the default -ftrapping-math.
FDM_HD float clamp_uniform(float u) {
  const uint32_t b = float_to_bits(u), lo = float_to_bits(1.0e-7f);
  return bits_to_float(b > lo ? b : lo);
}

FDM_HD void box_muller(float u1, float u2, float& n1, float& n2) {
  u1 = clamp_uniform(u1);
  const float r = sqrtf(-2.0f * log_poly(u1));
  const SinCos sc = sincos_2pi_poly(u2);
  n1 = r * sc.c;
  n2 = r * sc.s;
}

// The four normals of counter `counter` under key `seed`.
FDM_HD void randn4(uint64_t seed, uint64_t counter, float out[4]) {
  const U4 r = philox4x32_10(U4{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u},
                             static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(u32_to_uniform(r.x), u32_to_uniform(r.y), out[0], out[1]);
  box_muller(u32_to_uniform(r.z), u32_to_uniform(r.w), out[2], out[3]);
}

}  // namespace fdm
