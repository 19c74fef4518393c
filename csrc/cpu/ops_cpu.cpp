// CPU kernels of the fused ops (the `cpu` backend). Formulas: fdm_fast/ops/reference.py.
//
// Work is split into tasks of kChunk logical elements of one sample, run by at::parallel_for, so a
// sample's sigma and coefficients are scalars and each task owns its slice of the per-sample loss
// partial sums (deterministic, no atomics). A task first fills a stack buffer with its noise (the
// noise contract, four normals per Philox call, in vectorised stages), then runs one elementwise loop
// over the data: contiguous tensors get unit-stride loops the compiler vectorises; channels_last ones
// compute addresses. Each task is compiled for AVX-512, AVX2 and baseline x86-64 (Isa below).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "fdm_ops.h"

namespace fdm {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;  // elements per task, a multiple of 4 (and of the 64-lane noise stage)

// Instruction sets. Every task (run_chunk_* below) is compiled three times, for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2, FMA, F16C) and baseline x86-64, with its body inlined, so the elementwise loops get
// the wide vectors. bf16 conversions are integer operations and vectorise in each; fp16 ones go through
// c10::Half's portable code in all three, since c10 uses F16C only when __F16C__ is defined at compile
// time, which a target attribute does not do (the fp16 loss fwd+bwd is ~1.24x the bf16 one's time
// at 512x3x32x32 on the Xeon VM, the Euler step 1.04x). The noise block has its own three
// builds (randn_block_*). One variant is chosen at load time: the best this CPU has, capped by the
// environment variable FDM_FAST_CPU_ISA=avx512|avx2|base (the suite runs the cpu-backend op tests
// under every cap the machine has). Results agree across variants to rounding (the v3/v4 builds
// contract a*b+c into FMAs); within one variant they are deterministic. Clang, or -DFDM_NO_ISA_VARIANTS,
// builds the baseline only (the AVX-512 and AVX2 Philox are still used where the CPU has them).
enum Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FDM_NO_ISA_VARIANTS)
#define FDM_X86_VARIANTS 1
#endif

Isa detect_isa() {
  Isa best = kBase;
#if defined(__x86_64__) && defined(__GNUC__)  // (without FDM_X86_VARIANTS only the Philox stage uses it)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")) best = kAvx2;
  if (best == kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd"))
    best = kAvx512;
#endif
  const char* cap = std::getenv("FDM_FAST_CPU_ISA");  // checked by fdm_fast/ops/extension.py on import
  if (cap && std::strcmp(cap, "base") == 0) return kBase;
  if (cap && std::strcmp(cap, "avx2") == 0) return std::min(best, kAvx2);
  return best;
}

const Isa cpu_isa = detect_isa();

constexpr int kLanes = 128;  // counters per noise block (a multiple of kStep)
constexpr int kStep = 32;    // counters per Philox step (one prefetch step, below)

// The lines a task reads or writes after drawing its noise, fetched while the noise is computed.
// A task is memory-bound in its elementwise loop and compute-bound while it draws: on its own a core
// does one, then the other. In a one-thread model of the loss forward (fp32, 2-core Xeon VM,
// 2026-12-07) the memory alone took 1.18 ns per element, the noise alone 0.64, both 2.0; with a few
// prefetches per Philox step, spread over the whole draw so that the core's line fill buffers stay busy
// during the arithmetic, 1.36. Issued in bursts they stall on those buffers and gain little.
// Contiguous tensors only: a channels_last task's elements are scattered, and it passes none.
struct Prefetch {
  static constexpr int kMax = 3;
  const char* base[kMax] = {};  // first line of each stream (64-byte aligned)
  int64_t lines[kMax] = {};
  bool writes[kMax] = {};
  int streams = 0;
  int64_t i0 = 0, n = 0;  // the task's elements: i0 .. i0 + n - 1 of every stream
  int64_t most = 0;       // lines of the longest stream
  int64_t next = 0;       // next line index, the same in every stream (round robin)
  int64_t per_step = 0;

  template <class T>
  Prefetch& read(const T* p) {
    add(p, sizeof(T), false);
    return *this;
  }
  template <class T>
  Prefetch& write(T* p) {
    add(p, sizeof(T), true);
    return *this;
  }
  void add(const void* p, int64_t size, bool is_write) {
    if (!p || n <= 0 || streams == kMax) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(static_cast<const char*>(p) + i0 * size);
    const uintptr_t lo = a & ~uintptr_t{63};
    base[streams] = reinterpret_cast<const char*>(lo);
    lines[streams] = static_cast<int64_t>((a + static_cast<uintptr_t>(n * size) + 63 - lo) / 64);
    writes[streams] = is_write;
    most = std::max(most, lines[streams]);
    ++streams;
  }
  // Spread the lines over `steps` Philox steps.
  void plan(int64_t steps) { per_step = steps > 0 ? (most + steps - 1) / steps : most; }
  void step() {
    for (int64_t q = 0; q < per_step && next < most; ++q, ++next)
      for (int k = 0; k < streams; ++k) {
        if (next >= lines[k]) continue;
        const char* line = base[k] + 64 * next;
        if (writes[k]) __builtin_prefetch(line, 1, 3);
        else __builtin_prefetch(line, 0, 3);
      }
  }
};

// The prefetch streams of task (b, j0, n): none for channels_last (add() then ignores every stream).
inline Prefetch task_lines(const Geometry& g, int64_t b, int64_t j0, int64_t n) {
  Prefetch pf;
  if (!g.channels_last) {
    pf.i0 = b * g.P + j0;
    pf.n = n;
  }
  return pf;
}

// Stage 1: Philox4x32-10 of counters c0 .. c0 + kLanes - 1 into r0..r3, one prefetch step per kStep
// counters. Portable version, vectorised by the compiler in the AVX2 and baseline builds of a task.
inline void philox_generic(uint64_t c0, uint32_t k0, uint32_t k1, uint32_t* __restrict r0,
                           uint32_t* __restrict r1, uint32_t* __restrict r2, uint32_t* __restrict r3,
                           Prefetch* pf) {
  for (int i0 = 0; i0 < kLanes; i0 += kStep) {
    if (pf) pf->step();
    for (int i = i0; i < i0 + kStep; ++i) {
      const uint64_t c = c0 + static_cast<uint64_t>(i);
      const U4 r = philox4x32_10(U4{static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u, 0u}, k0, k1);
      r0[i] = r.x;
      r1[i] = r.y;
      r2[i] = r.z;
      r3[i] = r.w;
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FDM_HAVE_X86_PHILOX 1
// GCC 12's avx512fintrin.h trips -Wuninitialized on its own _mm512_undefined_* placeholders.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#ifndef __clang__  // a GCC-only warning, unknown to Clang
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// AVX-512 Philox with one counter per 64-bit lane, four vectors (kStep counters) at a time: vpmuludq
// gives each lane's whole 32x32->64 product, its low word is the next lo and a vpshufd brings the high
// word down; the upper words carry garbage that vpmuludq ignores and the final vpmovqd drops. Per round
// and 16 counters that is 4 multiplies, 4 shuffles and 4 three-way xors on two ports, against 16 operations
// (shifts and blends on the multiply's port) with one counter per 32-bit lane: 0.355 vs 0.48 ns per
// normal on one core of the Xeon VM. GCC's own vectorisation of philox_generic picks vpmullq, a 3-uop
// instruction (0.86 ms vs 0.35 ms of the 32-bit-lane version for 196,608 counters).
__attribute__((target("avx512f"))) void philox_avx512(uint64_t c0, uint32_t k0, uint32_t k1, uint32_t* __restrict r0,
                                                       uint32_t* __restrict r1, uint32_t* __restrict r2,
                                                       uint32_t* __restrict r3, Prefetch* pf) {
  constexpr int V = kStep / 8;
  const __m512i M0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i M1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (int i = 0; i < kLanes; i += kStep) {
    if (pf) pf->step();
    __m512i x[V], y[V], z[V], w[V];
    for (int v = 0; v < V; ++v) {  // the 64-bit counter: low word in x, high word in y
      x[v] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(c0 + static_cast<uint64_t>(i + 8 * v))), lane);
      y[v] = _mm512_srli_epi64(x[v], 32);
      z[v] = _mm512_setzero_si512();
      w[v] = _mm512_setzero_si512();
    }
    uint32_t a0 = k0, a1 = k1;
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      const __m512i K0 = _mm512_set1_epi32(static_cast<int>(a0)), K1 = _mm512_set1_epi32(static_cast<int>(a1));
      for (int v = 0; v < V; ++v) {
        const __m512i p0 = _mm512_mul_epu32(x[v], M0);
        const __m512i p1 = _mm512_mul_epu32(z[v], M1);
        x[v] = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p1, _MM_PERM_DDBB), y[v], K0, 0x96);  // 3-way xor
        z[v] = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p0, _MM_PERM_DDBB), w[v], K1, 0x96);
        y[v] = p1;
        w[v] = p0;
      }
      a0 += kPhiloxW0;
      a1 += kPhiloxW1;
    }
    for (int v = 0; v < V; ++v) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(r0 + i + 8 * v), _mm512_cvtepi64_epi32(x[v]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(r1 + i + 8 * v), _mm512_cvtepi64_epi32(y[v]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(r2 + i + 8 * v), _mm512_cvtepi64_epi32(z[v]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(r3 + i + 8 * v), _mm512_cvtepi64_epi32(w[v]));
    }
  }
}
#pragma GCC diagnostic pop

// The same scheme in AVX2, four counters per vector, two vectors (8 counters) through all ten rounds at a
// time, so that state, keys and multipliers fit the 16 ymm registers. GCC's own AVX2 vectorisation of
// philox_generic also multiplies with vpmuludq but keeps the words in 32-bit lanes, moving them around
// with about six shuffles per multiply (vpshufd, vperm2i128, vpunpcklqdq): 2.4 ns per normal on one
// core of a Zen 3 EPYC VM, slower than its scalar baseline build (2.0-2.6); this takes 0.79, and
// randn 1.8 instead of 3.6 (tests/test_extension.py compares every build's noise with the reference).
__attribute__((target("avx2"))) void philox_avx2(uint64_t c0, uint32_t k0, uint32_t k1, uint32_t* __restrict r0,
                                                  uint32_t* __restrict r1, uint32_t* __restrict r2,
                                                  uint32_t* __restrict r3, Prefetch* pf) {
  constexpr int V = 2;
  const __m256i M0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i M1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  const __m256i low_words = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // each lane's low word to the low half
  for (int i0 = 0; i0 < kLanes; i0 += kStep) {
    if (pf) pf->step();
    for (int i = i0; i < i0 + kStep; i += 4 * V) {
      __m256i x[V], y[V], z[V], w[V];
      for (int v = 0; v < V; ++v) {  // the 64-bit counter: low word in x, high word in y
        x[v] = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(c0 + static_cast<uint64_t>(i + 4 * v))),
                                lane);
        y[v] = _mm256_srli_epi64(x[v], 32);
        z[v] = _mm256_setzero_si256();
        w[v] = _mm256_setzero_si256();
      }
      uint32_t a0 = k0, a1 = k1;
#pragma GCC unroll 10
      for (int r = 0; r < 10; ++r) {
        const __m256i K0 = _mm256_set1_epi32(static_cast<int>(a0)), K1 = _mm256_set1_epi32(static_cast<int>(a1));
        for (int v = 0; v < V; ++v) {
          const __m256i p0 = _mm256_mul_epu32(x[v], M0);
          const __m256i p1 = _mm256_mul_epu32(z[v], M1);
          x[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(p1, 0xF5), y[v]), K0);  // hi1 ^ y ^ k0
          z[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(p0, 0xF5), w[v]), K1);  // hi0 ^ w ^ k1
          y[v] = p1;
          w[v] = p0;
        }
        a0 += kPhiloxW0;
        a1 += kPhiloxW1;
      }
      for (int v = 0; v < V; ++v) {
        uint32_t* const dst[4] = {r0, r1, r2, r3};
        const __m256i src[4] = {x[v], y[v], z[v], w[v]};
        for (int k = 0; k < 4; ++k)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst[k] + i + 4 * v),
                           _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(src[k], low_words)));
      }
    }
  }
}
#endif

// Stage 2: uniforms -> Box-Muller, interleaved into out[4i .. 4i+3] for i < m. Separate simple loops
// vectorise; one fused loop does not (too much if-converted code).
inline void box_muller_stage(const uint32_t* __restrict r0, const uint32_t* __restrict r1,
                                 const uint32_t* __restrict r2, const uint32_t* __restrict r3, int m,
                                 float* __restrict o) {
  alignas(64) float rad0[kLanes], rad1[kLanes];
  for (int i = 0; i < kLanes; ++i) rad0[i] = sqrtf(-2.0f * log_poly(clamp_uniform(u32_to_uniform(r0[i]))));
  for (int i = 0; i < kLanes; ++i) rad1[i] = sqrtf(-2.0f * log_poly(clamp_uniform(u32_to_uniform(r2[i]))));
  for (int i = 0; i < m; ++i) {
    const SinCos a = sincos_2pi_poly(u32_to_uniform(r1[i]));
    const SinCos b = sincos_2pi_poly(u32_to_uniform(r3[i]));
    o[4 * i] = rad0[i] * a.c;
    o[4 * i + 1] = rad0[i] * a.s;
    o[4 * i + 2] = rad1[i] * b.c;
    o[4 * i + 3] = rad1[i] * b.s;
  }
}

// Normals of counters c0 .. c0 + G - 1 (4 each) into out[0 .. 4G), prefetching pf's lines on the way.
inline void randn_block_body(uint64_t seed, uint64_t c0, int64_t G, float* __restrict out, Prefetch* pf) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  alignas(64) uint32_t r0[kLanes], r1[kLanes], r2[kLanes], r3[kLanes];
  if (pf && pf->streams == 0) pf = nullptr;
  if (pf) pf->plan((G + kLanes - 1) / kLanes * (kLanes / kStep));
  for (int64_t g0 = 0; g0 < G; g0 += kLanes) {
#ifdef FDM_HAVE_X86_PHILOX
    if (cpu_isa == kAvx512) {
      philox_avx512(c0 + static_cast<uint64_t>(g0), k0, k1, r0, r1, r2, r3, pf);
    } else if (cpu_isa == kAvx2) {
      philox_avx2(c0 + static_cast<uint64_t>(g0), k0, k1, r0, r1, r2, r3, pf);
    } else {
      philox_generic(c0 + static_cast<uint64_t>(g0), k0, k1, r0, r1, r2, r3, pf);
    }
#else
    philox_generic(c0 + static_cast<uint64_t>(g0), k0, k1, r0, r1, r2, r3, pf);
#endif
    box_muller_stage(r0, r1, r2, r3, static_cast<int>(std::min<int64_t>(kLanes, G - g0)), out + 4 * g0);
  }
}

// The noise stages in the three builds of Isa, kept out of line (noinline): inlined into every task
// variant they tripled the library's size for no measurable gain.
__attribute__((noinline, flatten)) void randn_block_base(uint64_t seed, uint64_t c0, int64_t G, float* __restrict out,
                                                       Prefetch* pf) {
  randn_block_body(seed, c0, G, out, pf);
}

#ifdef FDM_X86_VARIANTS
__attribute__((noinline, flatten, target("arch=x86-64-v3"))) void randn_block_v3(uint64_t seed, uint64_t c0, int64_t G,
                                                                                 float* __restrict out, Prefetch* pf) {
  randn_block_body(seed, c0, G, out, pf);
}

__attribute__((noinline, flatten, target("arch=x86-64-v4"))) void randn_block_v4(uint64_t seed, uint64_t c0, int64_t G,
                                                                                 float* __restrict out, Prefetch* pf) {
  randn_block_body(seed, c0, G, out, pf);
}
#endif

inline void randn_block(uint64_t seed, uint64_t c0, int64_t G, float* __restrict out, Prefetch* pf = nullptr) {
#ifdef FDM_X86_VARIANTS
  if (cpu_isa == kAvx512) return randn_block_v4(seed, c0, G, out, pf);
  if (cpu_isa == kAvx2) return randn_block_v3(seed, c0, G, out, pf);
#endif
  randn_block_base(seed, c0, G, out, pf);
}

inline int64_t address(const Geometry& g, int64_t b, int64_t j) {
  return b * g.P + (g.channels_last ? (j % g.HW) * g.C + j / g.HW : j);
}

// The n normals of logical elements j0 .. j0 + n - 1 of sample b into buf (kChunk + 8 floats), fetching
// pf's lines meanwhile (see Prefetch).
void fill_noise(const Noise& nz, const Geometry& g, int64_t b, int64_t j0, int64_t n, float* __restrict buf,
                Prefetch* pf = nullptr) {
  if (nz.explicit_noise) {
    for (int64_t k = 0; k < n; ++k) buf[k] = nz.explicit_noise[address(g, b, j0 + k)];
    return;
  }
  const int64_t row = nz.per_sample ? b : 0;
  const uint64_t seed = static_cast<uint64_t>(nz.rng[2 * row]);
  const uint64_t off = static_cast<uint64_t>(nz.rng[2 * row + 1]);
  const int64_t i0 = (nz.per_sample ? 0 : b * g.P) + j0;
  const int64_t skip = i0 % 4;
  const int64_t G = (skip + n + 3) / 4;
  if (skip == 0) {
    randn_block(seed, off + static_cast<uint64_t>(i0 / 4), G, buf, pf);  // 4G <= n + 3 fits the buffer
  } else {  // a sample size not divisible by 4 with one shared row: groups straddle samples
    alignas(64) float tmp[kChunk + 8];
    randn_block(seed, off + static_cast<uint64_t>(i0 / 4), G, tmp, pf);
    std::copy(tmp + skip, tmp + skip + n, buf);
  }
}

// One task in the three builds (see Isa above); flatten inlines the body (a lambda) and all it calls.
template <class Body>
__attribute__((flatten)) void run_chunk_base(const Body& body, int64_t b, int64_t c, int64_t j0, int64_t n,
                                             float* __restrict buf) {
  body(b, c, j0, n, buf);
}

#ifdef FDM_X86_VARIANTS
template <class Body>
__attribute__((flatten, target("arch=x86-64-v3"))) void run_chunk_v3(const Body& body, int64_t b, int64_t c,
                                                                     int64_t j0, int64_t n, float* __restrict buf) {
  body(b, c, j0, n, buf);
}

template <class Body>
__attribute__((flatten, target("arch=x86-64-v4"))) void run_chunk_v4(const Body& body, int64_t b, int64_t c,
                                                                     int64_t j0, int64_t n, float* __restrict buf) {
  body(b, c, j0, n, buf);
}
#endif

// Run body(b, chunk, j0, n, buf) over all (sample, chunk) tasks in parallel.
template <class Body>
void for_chunks(const Geometry& g, const Body& body) {
  const int64_t nch = (g.P + kChunk - 1) / kChunk;
  at::parallel_for(0, g.B * nch, 1, [&](int64_t lo, int64_t hi) {
    alignas(64) float buf[kChunk + 8];
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / nch, c = t % nch, j0 = c * kChunk;
      const int64_t n = std::min(kChunk, g.P - j0);
#ifdef FDM_X86_VARIANTS
      if (cpu_isa == kAvx512) {
        run_chunk_v4(body, b, c, j0, n, buf);
        continue;
      }
      if (cpu_isa == kAvx2) {
        run_chunk_v3(body, b, c, j0, n, buf);
        continue;
      }
#endif
      run_chunk_base(body, b, c, j0, n, buf);
    }
  });
}

// Element access in logical order: unit stride for contiguous tensors (vectorisable loops),
// computed addresses for channels_last.
template <class T>
inline float ld(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}
template <class T>
inline void st(T* p, int64_t i, float v) {
  p[i] = static_cast<T>(v);
}

template <class Fn>
inline void for_elements(const Geometry& g, int64_t b, int64_t j0, int64_t n, const Fn& fn) {
  if (!g.channels_last) {
    const int64_t base = b * g.P + j0;
    for (int64_t k = 0; k < n; ++k) fn(k, base + k);
  } else {
    for (int64_t k = 0; k < n; ++k) fn(k, address(g, b, j0 + k));
  }
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
    FDM_CASE(BF16, c10::BFloat16, NAME, __VA_ARGS__)     \
    FDM_CASE(F16, c10::Half, NAME, __VA_ARGS__)          \
  }

// ------------------------------------------------------------------------------------------------

template <class TY, class TO>
void perturb_impl(const PerturbArgs& a) {
  const TY* __restrict y = static_cast<const TY*>(a.y);
  TO* __restrict net = static_cast<TO*>(a.net_in);
  float* __restrict x = a.x;
  for_chunks(a.g, [&](int64_t b, int64_t, int64_t j0, int64_t n, float* __restrict nz) {
    Prefetch pf = task_lines(a.g, b, j0, n);
    pf.read(y).write(net).write(x);
    fill_noise(a.noise, a.g, b, j0, n, nz, &pf);
    const float s = a.sigma[b], cin = c_in(a.sp, s);
    if (x) {
      for_elements(a.g, b, j0, n, [&](int64_t k, int64_t i) {
        const float xv = ld(y, i) + s * nz[k];
        x[i] = xv;
        st(net, i, cin * xv);
      });
    } else {
      for_elements(a.g, b, j0, n, [&](int64_t k, int64_t i) { st(net, i, cin * (ld(y, i) + s * nz[k])); });
    }
  });
}

// D - y into buf (over the noise), returns (w, c_out) of the sample.
template <class TF, class TY>
inline void loss_diff(const LossArgs& a, int64_t b, int64_t j0, int64_t n, float* __restrict buf, float& w,
                      float& c_out) {
  const TF* __restrict F = static_cast<const TF*>(a.F);
  const TY* __restrict y = static_cast<const TY*>(a.y);
  Prefetch pf = task_lines(a.g, b, j0, n);
  pf.read(F).read(y).write(static_cast<TF*>(a.G ? a.G : a.dF));  // the forward's G or the backward's dF
  fill_noise(a.noise, a.g, b, j0, n, buf, &pf);
  const float s = a.sigma[b];
  const Coeffs c = coefficients(a.sp, s);
  w = std::min(c.weight, a.clamp[0]);
  c_out = c.c_out;
  const float c_skip = c.c_skip, co = c.c_out;
  for_elements(a.g, b, j0, n, [&](int64_t k, int64_t i) {
    const float yv = ld(y, i);
    buf[k] = c_skip * (yv + s * buf[k]) + co * ld(F, i) - yv;
  });
}

template <class TF, class TY>
void loss_fwd_impl(const LossArgs& a) {
  for_chunks(a.g, [&](int64_t b, int64_t chunk, int64_t j0, int64_t n, float* __restrict buf) {
    float w, c_out;
    loss_diff<TF, TY>(a, b, j0, n, buf, w, c_out);
    if (a.G) {  // the unscaled gradient, so the backward is a scale (no second noise pass)
      TF* __restrict G = static_cast<TF*>(a.G);
      const float scale = w * 2.0f * c_out;
      for_elements(a.g, b, j0, n, [&](int64_t k, int64_t i) { st(G, i, scale * buf[k]); });
    }
    // 16 float32 lanes, then a double sum of the lanes: vectorises without reassociation flags.
    float acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
      for (int l = 0; l < 16; ++l) acc[l] += buf[k + l] * buf[k + l];
    double sum = 0;
    for (; k < n; ++k) sum += static_cast<double>(buf[k]) * buf[k];
    for (int l = 0; l < 16; ++l) sum += acc[l];
    a.partial[b * a.parts + chunk] = w * static_cast<float>(sum);
  });
}

template <class TF, class TY>
void loss_bwd_impl(const LossArgs& a) {
  TF* __restrict dF = static_cast<TF*>(a.dF);
  for_chunks(a.g, [&](int64_t b, int64_t, int64_t j0, int64_t n, float* __restrict buf) {
    float w, c_out;
    loss_diff<TF, TY>(a, b, j0, n, buf, w, c_out);
    const float scale = a.grad[b] * w * 2.0f * c_out;
    for_elements(a.g, b, j0, n, [&](int64_t k, int64_t i) { st(dF, i, scale * buf[k]); });
  });
}

template <class TF>
void scale_grad_impl(const LossArgs& a) {
  const TF* __restrict G = static_cast<const TF*>(a.F);
  TF* __restrict dF = static_cast<TF*>(a.dF);
  for_chunks(a.g, [&](int64_t b, int64_t, int64_t j0, int64_t n, float*) {
    const float g = a.grad[b];
    for_elements(a.g, b, j0, n, [&](int64_t, int64_t i) { st(dF, i, g * ld(G, i)); });
  });
}

template <class TO>
void churn_impl(const ChurnArgs& a) {
  TO* __restrict net = static_cast<TO*>(a.net_in);
  for_chunks(a.g, [&](int64_t b, int64_t, int64_t j0, int64_t n, float* __restrict nz) {
    const float t = a.t_cur[b], th = a.t_hat[b];
    const float scale = sqrtf(std::max(th * th - t * t, 0.0f)) * a.S_noise;
    const float cin = c_in(a.sp, th);
    if (scale != 0.0f) {
      Prefetch pf = task_lines(a.g, b, j0, n);
      pf.read(a.x).write(a.x_out).write(net);
      fill_noise(a.noise, a.g, b, j0, n, nz, &pf);
      for_elements(a.g, b, j0, n, [&](int64_t k, int64_t i) {
        const float xv = a.x[i] + scale * nz[k];
        a.x_out[i] = xv;
        st(net, i, cin * xv);
      });
    } else {  // t_hat = t_cur: no noise drawn
      for_elements(a.g, b, j0, n, [&](int64_t, int64_t i) {
        const float xv = a.x[i];
        a.x_out[i] = xv;
        st(net, i, cin * xv);
      });
    }
  });
}

// x_out / d_out may be null: the caller does not want that output.
template <class TF, class TO, bool WX, bool WD>
void euler_impl(const EulerArgs& a) {
  const TF* __restrict F = static_cast<const TF*>(a.F);
  TO* __restrict net = static_cast<TO*>(a.net_in);
  const float* __restrict x = a.x;
  float* __restrict xo = a.x_out;
  float* __restrict d = a.d_out;
  for_chunks(a.g, [&](int64_t b, int64_t, int64_t j0, int64_t n, float*) {
    const float t = a.t_cur[b], tn = a.t_next[b];
    const Coeffs c = coefficients(a.sp, t);
    const float c_skip = c.c_skip, c_out = c.c_out, cin = c_in(a.sp, tn), h = tn - t;
    for_elements(a.g, b, j0, n, [&](int64_t, int64_t i) {
      const float xv = x[i];
      const float dv = (xv - (c_skip * xv + c_out * ld(F, i))) / t;
      const float xn = xv + h * dv;
      if (WD) d[i] = dv;
      if (WX) xo[i] = xn;
      st(net, i, cin * xn);
    });
  });
}

template <class TF, class TO>
void euler_impl(const EulerArgs& a) {
  const bool wx = a.x_out != nullptr, wd = a.d_out != nullptr;
  if (wx && wd) euler_impl<TF, TO, true, true>(a);
  else if (wx) euler_impl<TF, TO, true, false>(a);
  else if (wd) euler_impl<TF, TO, false, true>(a);
  else euler_impl<TF, TO, false, false>(a);
}

template <class TF, class TO>
void heun_impl(const HeunArgs& a) {
  const TF* __restrict F = static_cast<const TF*>(a.F);
  TO* __restrict net = static_cast<TO*>(a.net_in);
  const float* __restrict x = a.x;
  const float* __restrict d = a.d;
  float* __restrict xo = a.x_out;
  const bool churning = a.t_hat_next != nullptr;
  for_chunks(a.g, [&](int64_t b, int64_t, int64_t j0, int64_t n, float* __restrict nz) {
    const float t = a.t_cur[b], tn = a.t_next[b], h = tn - t;
    const Coeffs c = coefficients(a.sp, tn);
    const float c_skip = c.c_skip, c_out = c.c_out;
    float t_out = tn, scale = 0.0f;
    if (churning) {
      t_out = a.t_hat_next[b];
      scale = sqrtf(std::max(t_out * t_out - tn * tn, 0.0f)) * a.S_noise;
    }
    if (scale != 0.0f) {
      Prefetch pf = task_lines(a.g, b, j0, n);
      pf.read(x).read(d).read(F);
      fill_noise(a.noise, a.g, b, j0, n, nz, &pf);
    } else {  // no churn for this sample: no noise drawn
      std::fill(nz, nz + n, 0.0f);
    }
    const float cin = c_in(a.sp, t_out);
    for_elements(a.g, b, j0, n, [&](int64_t k, int64_t i) {
      const float xv = x[i], dv = d[i];
      const float xe = xv + h * dv;
      const float d2 = (xe - (c_skip * xe + c_out * ld(F, i))) / tn;
      const float xn = xv + h * (0.5f * dv + 0.5f * d2) + scale * nz[k];
      xo[i] = xn;
      st(net, i, cin * xn);
    });
  });
}

// One row of the coefficient table: x_next = a x + b D + sum_k h_k H_k + s n, D = c_skip x + w_F F + w_G G.
template <class TF, class TG, class TO>
void multistep_impl(const MultistepArgs& a) {
  const TF* __restrict F = static_cast<const TF*>(a.F);
  const TG* __restrict G = static_cast<const TG*>(a.G);
  TO* __restrict net = static_cast<TO*>(a.net_in);
  const float* __restrict x = a.x;
  float* __restrict xo = a.x_out;
  float* __restrict kp = a.keep;
  const int K = a.K;
  for_chunks(a.g, [&](int64_t b, int64_t, int64_t j0, int64_t n, float* __restrict nz) {
    const float* row = a.coef + b * a.coef_stride;
    const float c_skip = row[0], w_f = row[1], w_g = row[2], ca = row[3], cb = row[4];
    float h[kMaxHistory] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k = 0; k < K; ++k) h[k] = row[5 + k];
    const float s = row[5 + K], cin = row[6 + K], p = row[7 + K], q = row[8 + K];
    const bool noisy = a.draws && s != 0.0f;
    if (noisy) {
      Prefetch pf = task_lines(a.g, b, j0, n);
      pf.read(x).read(F).write(xo);
      fill_noise(a.noise, a.g, b, j0, n, nz, &pf);
    }
    const float* H0 = a.H[0];
    const float* H1 = a.H[1];
    const float* H2 = a.H[2];
    const float* H3 = a.H[3];
    for_elements(a.g, b, j0, n, [&](int64_t k, int64_t i) {
      const float xv = x[i];
      float D = 0.0f;
      if (F) {
        D = c_skip * xv + w_f * ld(F, i);
        if (G) D += w_g * ld(G, i);
      }
      float acc = ca * xv + cb * D;
      if (K > 0) acc += h[0] * H0[i];
      if (K > 1) acc += h[1] * H1[i];
      if (K > 2) acc += h[2] * H2[i];
      if (K > 3) acc += h[3] * H3[i];
      if (noisy) acc += s * nz[k];
      xo[i] = acc;
      if (net) st(net, i, cin * acc);
      if (kp) kp[i] = p * xv + q * D;
    });
  });
}

}  // namespace

int64_t loss_parts(const Geometry& g) { return (g.P + kChunk - 1) / kChunk; }

void perturb(const PerturbArgs& a) {
  FDM_DISPATCH(a.y_t, TY, [&] { FDM_DISPATCH(a.net_t, TO, [&] { perturb_impl<TY, TO>(a); }); });
}

void loss_fwd(const LossArgs& a) {
  FDM_DISPATCH(a.F_t, TF, [&] { FDM_DISPATCH(a.y_t, TY, [&] { loss_fwd_impl<TF, TY>(a); }); });
}

void loss_bwd(const LossArgs& a) {
  FDM_DISPATCH(a.F_t, TF, [&] { FDM_DISPATCH(a.y_t, TY, [&] { loss_bwd_impl<TF, TY>(a); }); });
}

void scale_grad(const LossArgs& a) {
  FDM_DISPATCH(a.F_t, TF, [&] { scale_grad_impl<TF>(a); });
}

void churn(const ChurnArgs& a) {
  FDM_DISPATCH(a.net_t, TO, [&] { churn_impl<TO>(a); });
}

void euler_step(const EulerArgs& a) {
  FDM_DISPATCH(a.F_t, TF, [&] { FDM_DISPATCH(a.net_t, TO, [&] { euler_impl<TF, TO>(a); }); });
}

void heun_step(const HeunArgs& a) {
  FDM_DISPATCH(a.F_t, TF, [&] { FDM_DISPATCH(a.net_t, TO, [&] { heun_impl<TF, TO>(a); }); });
}

void multistep(const MultistepArgs& a) {
  // an absent F / G / net_in is dispatched as float (its pointer is null and never read)
  FDM_DISPATCH(a.F ? a.F_t : DType::F32, TF, [&] {
    FDM_DISPATCH(a.G ? a.G_t : DType::F32, TG, [&] {
      FDM_DISPATCH(a.net_in ? a.net_t : DType::F32, TO, [&] { multistep_impl<TF, TG, TO>(a); });
    });
  });
}

void randn(const RandnArgs& a) {
  for_chunks(a.g, [&](int64_t b, int64_t, int64_t j0, int64_t n, float* __restrict buf) {
    Prefetch pf = task_lines(a.g, b, j0, n);
    pf.write(a.out);
    fill_noise(a.noise, a.g, b, j0, n, buf, &pf);
    std::copy(buf, buf + n, a.out + b * a.g.P + j0);
  });
}

}  // namespace cpu
}  // namespace fdm

// The task build in use: "avx512", "avx2" or "base" (fdm_fast._C.cpu_isa()).
extern "C" const char* fdm_fast_cpu_isa() {
  using namespace fdm::cpu;
  return cpu_isa == kAvx512 ? "avx512" : cpu_isa == kAvx2 ? "avx2" : "base";
}
