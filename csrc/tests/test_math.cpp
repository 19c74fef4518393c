// ctest target: the shared math header against known answers, no torch needed.
// Philox4x32-10 known-answer vectors (Random123), the host log / sincos polynomials against libm,
// the coefficients against double-precision formulas, and the noise contract's element mapping.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>

#include "fdm_math.h"

static int failures = 0;
#define CHECK(cond, ...)                    \
  do {                                      \
    if (!(cond)) {                          \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);             \
      std::printf("\n");                    \
      ++failures;                           \
    }                                       \
  } while (0)

static void philox_kat() {
  struct Kat { fdm::U4 ctr; uint32_t k0, k1; fdm::U4 want; };
  const Kat kats[] = {
      {{0, 0, 0, 0}, 0, 0, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, 0xffffffffu, 0xffffffffu,
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0xa4093822u, 0x299f31d0u,
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const auto& k : kats) {
    const fdm::U4 r = fdm::philox4x32_10(k.ctr, k.k0, k.k1);
    CHECK(r.x == k.want.x && r.y == k.want.y && r.z == k.want.z && r.w == k.want.w,
          "philox: got %08x %08x %08x %08x want %08x %08x %08x %08x", r.x, r.y, r.z, r.w, k.want.x, k.want.y,
          k.want.z, k.want.w);
  }
}

static void polynomials() {
  double worst_log = 0, worst_sc = 0;
  for (int i = 0; i <= 2000000; ++i) {
    const float u = i == 0 ? 1e-7f : static_cast<float>(i) / 2000001.0f;
    const double want = std::log(static_cast<double>(u));
    worst_log = std::fmax(worst_log, std::fabs(fdm::log_poly(u) - want) / std::fmax(1.0, std::fabs(want)));
    const fdm::SinCos sc = fdm::sincos_2pi_poly(u);
    const float s = sc.s, c = sc.c;
    const double th = 6.283185307179586 * u;
    worst_sc = std::fmax(worst_sc, std::fmax(std::fabs(s - std::sin(th)), std::fabs(c - std::cos(th))));
  }
  CHECK(worst_log < 5e-7, "log_poly relative error %.3g", worst_log);
  CHECK(worst_sc < 5e-7, "sincos_2pi_poly error %.3g", worst_sc);
  std::printf("log_poly max rel error %.3g, sincos_2pi_poly max abs error %.3g\n", worst_log, worst_sc);
}

static void coefficients() {
  // edm with sigma_data 0.5 and its FDM variant (m = 2, range [0.002, 80]) at a few sigma.
  const fdm::Spec edm{fdm::kEDM, 0, 0.5f, 0.002f, 80.0f, 2.0f, 0.1f, 19.9f};
  fdm::Spec fdm_edm = edm;
  fdm_edm.fdm = 1;
  for (double s : {0.002, 0.1, 1.0, 10.0, 80.0}) {
    const double sd = 0.5, s2 = s * s;
    const fdm::Coeffs c = fdm::coefficients(edm, static_cast<float>(s));
    const double want[4] = {sd * sd / (s2 + sd * sd), s * sd / std::sqrt(s2 + sd * sd), 1 / std::sqrt(s2 + sd * sd),
                            (s2 + sd * sd) / (s2 * sd * sd)};
    const float got[4] = {c.c_skip, c.c_out, c.c_in, c.weight};
    for (int k = 0; k < 4; ++k) CHECK(std::fabs(got[k] - want[k]) <= 3e-7 * std::fabs(want[k]), "edm coef %d at %g", k, s);
    const double tau = (s - 0.002) / (80 - 0.002), mb = 2 * (0.1 * tau + 0.5 * 19.9 * tau * tau);
    const double want_cin = std::exp(-mb) * (1 + mb);
    const float got_cin = fdm::coefficients(fdm_edm, static_cast<float>(s)).c_in;
    CHECK(std::fabs(got_cin - want_cin) <= 5e-6 * want_cin, "fdm c_in at %g: %g vs %g", s, got_cin, want_cin);
  }
  const fdm::Spec vp{fdm::kVP, 0, 0, 0, 0, 0, 0, 0};
  const fdm::Coeffs v = fdm::coefficients(vp, 2.0f);
  CHECK(v.c_skip == 1.0f && v.c_out == -2.0f && std::fabs(v.c_in - 1 / std::sqrt(5.0)) < 1e-7 && v.weight == 0.25f, "vp");
}

static void contract_mapping() {
  // element i of the logical tensor is component i % 4 of counter offset + i / 4; normals look normal
  const uint64_t seed = 12345678901ull, off = 7;
  double sum = 0, sq = 0;
  const int n = 400000;
  for (int g = 0; g < n / 4; ++g) {
    float o[4];
    fdm::randn4(seed, off + g, o);
    for (float v : o) { sum += v; sq += v * v; }
  }
  const double mean = sum / n, var = sq / n - mean * mean;
  CHECK(std::fabs(mean) < 5 / std::sqrt(n) && std::fabs(var - 1) < 5 * std::sqrt(2.0 / n), "moments %g %g", mean, var);
}

int main() {
  philox_kat();
  polynomials();
  coefficients();
  contract_mapping();
  if (failures) {
    std::printf("%d failed\n", failures);
    return 1;
  }
  std::printf("all math checks passed\n");
  return 0;
}
