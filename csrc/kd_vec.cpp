// Vectorised dense kernels of the distillation-loss ops (declared in kd_common.h).
//
// Why not at::vec::Vectorized: an extension is compiled without torch's per-CPU-capability flags, so
// Vectorized<float> falls back to its scalar default here. Instead the loops are plain `omp simd` loops over
// an inline polynomial exp, and GCC's function multi-versioning (target_clones) compiles each kernel for
// AVX-512, AVX2+FMA and baseline x86-64, picking one at load time: fast on the build machine's CPU family
// without -march=native, and still portable to any x86-64 (other architectures get the default build).
#include "kd_common.h"

#include <cstring>

// (the "arch=x86-64-vN" names need GCC >= 12; older compilers build the portable default only)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define PRMKD_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PRMKD_MULTIVERSION
#endif

#if defined(__GNUC__)
#define PRMKD_INLINE inline __attribute__((always_inline))
#else
#define PRMKD_INLINE inline
#endif

namespace prmkd {
namespace {

// exp(x) for x <= 88 in float32, ~2 ulp: exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2,
// exp(r) by its degree-6 Taylor polynomial (truncation error < 1.3e-7 relative on that interval).
// Arguments below -87 give ~1e-38 instead of 0: every caller adds such a term to something >= 1e-7 or
// writes it as a gradient entry, where 1e-38 is zero for all practical purposes.
PRMKD_INLINE float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // round-to-nearest through the 1.5 * 2^23 shifter: branch-free and vectorisable on every x86-64 level
  const float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  int32_t n_bits;
  std::memcpy(&n_bits, &t, sizeof(n_bits));
  n_bits -= 0x4B400000;  // bit pattern of the shifter: what remains is the integer n
  // r = x - n ln2 with ln2 split in two so that n * ln2_hi is exact
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t scale_bits = (n_bits + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}

// log1p(u) for u in [0, 1], ~2 ulp: log(1 + u) = 2 atanh(f) with f = u / (2 + u) in [0, 1/3] (no cancellation
// for small u), atanh by its odd series to f^13 (truncation < 2e-8 relative at f = 1/3).
PRMKD_INLINE float fast_log1p_unit(float u) {
  const float f = u / (2.0f + u);
  const float f2 = f * f;
  float q = 1.0f / 13.0f;
  q = q * f2 + 1.0f / 11.0f;
  q = q * f2 + 1.0f / 9.0f;
  q = q * f2 + 1.0f / 7.0f;
  q = q * f2 + 1.0f / 5.0f;
  q = q * f2 + 1.0f / 3.0f;
  q = q * f2 + 1.0f;
  return 2.0f * f * q;
}

}  // namespace

PRMKD_MULTIVERSION float vec_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

PRMKD_MULTIVERSION void vec_sumexp2(const float* x, int64_t n, float shift, float inv_tau, bool same_tau, double* s1,
                                    double* s_tau) {
  // float partial sums are exact enough for one run (<= a few thousand terms each <= 1); runs add in double
  float a = 0.0f, b = 0.0f;
  if (same_tau) {
#pragma omp simd reduction(+ : a)
    for (int64_t j = 0; j < n; ++j) a += fast_exp(x[j] - shift);
    b = a;
  } else {
#pragma omp simd reduction(+ : a, b)
    for (int64_t j = 0; j < n; ++j) {
      const float d = x[j] - shift;
      a += fast_exp(d);
      b += fast_exp(d * inv_tau);
    }
  }
  *s1 += a;
  *s_tau += b;
}

PRMKD_MULTIVERSION void vec_softmax_mix(const float* x, int64_t n, float a, float lse1, float c, float inv_tau,
                                        float lse_tau, bool same_tau, float* out) {
  if (same_tau || c == 0.0f) {
    const float coef = same_tau ? a + c : a;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = coef * fast_exp(x[j] - lse1);
  } else if (a == 0.0f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = c * fast_exp(x[j] * inv_tau - lse_tau);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = a * fast_exp(x[j] - lse1) + c * fast_exp(x[j] * inv_tau - lse_tau);
  }
}

PRMKD_MULTIVERSION bool vec_teacher_softmax(const int64_t* ids, const float* scores, int64_t K, float inv_tau,
                                            float* p, double* lse) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float m = neg_inf;
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < K; ++k) {
    const float x = ids[k] >= 0 ? scores[k] * inv_tau : neg_inf;
    m = x > m ? x : m;
  }
  if (m == neg_inf) return false;
  // a select, not a multiply, masks the empty slots: their scores are not read as numbers
  float z = 0.0f;
#pragma omp simd reduction(+ : z)
  for (int64_t k = 0; k < K; ++k) {
    const float e = ids[k] >= 0 ? fast_exp(scores[k] * inv_tau - m) : 0.0f;
    p[k] = e;
    z += e;
  }
  const float inv_z = 1.0f / z;  // z >= 1: the max slot contributes exp(0)
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) p[k] *= inv_z;
  *lse = double(m) + std::log(double(z));
  return true;
}

PRMKD_MULTIVERSION double vec_rank_logsig(const int64_t* ids, const float* rank, const float* s, int64_t K) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < K; ++k) {
    const float x = s[k];
    const float ax = x < 0.0f ? -x : x;
    // log sigmoid(x) = min(x, 0) - log1p(exp(-|x|)), exp(-|x|) in (0, 1]
    const float ls = (x < 0.0f ? x : 0.0f) - fast_log1p_unit(fast_exp(-ax));
    acc += ids[k] >= 0 ? rank[k] * ls : 0.0f;
  }
  return double(acc);
}

PRMKD_MULTIVERSION void vec_sigmoid_neg(const float* s, int64_t K, float* out) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    // sigmoid(-x) = e / (1 + e) with e = exp(-|x|) for x > 0, 1 / (1 + e) for x <= 0: no overflow either side
    const float x = s[k];
    const float e = fast_exp(x < 0.0f ? x : -x);
    out[k] = (x > 0.0f ? e : 1.0f) / (1.0f + e);
  }
}

PRMKD_MULTIVERSION void vec_add(float* dst, const float* src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
}

PRMKD_MULTIVERSION void bf16_to_float(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = uint32_t(src[j]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    dst[j] = f;
  }
}

PRMKD_MULTIVERSION void float_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  // round to nearest even; inputs are finite gradients (no NaN handling needed)
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, &src[j], sizeof(bits));
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    dst[j] = uint16_t(bits >> 16);
  }
}

}  // namespace prmkd
