// simd.cpp: SIMD level detection and the scalar and AVX2 row kernels. The AVX2 functions are
// compiled for that target alone (function attributes), so the rest of the library stays
// portable and the dispatcher picks them only on CPUs that have AVX2, FMA and F16C.
#include "cpu/simd.hpp"

#include <cstdlib>
#include <cstring>

#include "core/dtype.hpp"
#include "cpu/row_kernels.hpp"

#include "cpu/avx2_util.hpp"

#if VATTN_X86
#include <cpuid.h>
#endif

namespace vattn::detail {

const char* simd_level_str(simd_level l) {
  return l == simd_level::avx2 ? "avx2" : "scalar";
}

bool parse_simd_level(const char* s, simd_level* out) {
  if (!s) return false;
  if (std::strcmp(s, "scalar") == 0) return *out = simd_level::scalar, true;
  if (std::strcmp(s, "avx2") == 0) return *out = simd_level::avx2, true;
  return false;
}

bool cpu_has_f16c() {
#if VATTN_X86
  // CPUID leaf 1, ECX bit 29 (clang 14's __builtin_cpu_supports does not know "f16c").
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
#else
  return false;
#endif
}

simd_level detected_simd_level() {
#if VATTN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c())
    return simd_level::avx2;
#endif
  return simd_level::scalar;
}

simd_level active_simd_level() {
  static const simd_level level = [] {
    const simd_level best = detected_simd_level();
    simd_level want = best;
    if (parse_simd_level(std::getenv("VATTN_SIMD"), &want) && int(want) <= int(best)) return want;
    return best;
  }();
  return level;
}

namespace {

float dot_f32_scalar(const float* q, const float* r, int32_t d) {
  return row_dot<dtype::f32>(q, r, d);
}
float dot_f16_scalar(const float* q, const uint16_t* r, int32_t d) {
  return row_dot<dtype::f16>(q, r, d);
}
float dot_bf16_scalar(const float* q, const uint16_t* r, int32_t d) {
  return row_dot<dtype::bf16>(q, r, d);
}

#if VATTN_X86
using avx2::hsum;

// Two independent FMA chains of 8 lanes; the tail (d % 8) in scalar.
template <dtype T>
VATTN_AVX2 float dot_avx2(const float* q, const typename storage<T>::type* r, int32_t d) {
  using L = avx2::load8<T>;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int32_t j = 0;
  for (; j + 16 <= d; j += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), L::at(r + j), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8), L::at(r + j + 8), a1);
  }
  if (j + 8 <= d) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), L::at(r + j), a0);
    j += 8;
  }
  float tail = 0;
  for (; j < d; ++j) tail += q[j] * storage<T>::load(r[j]);
  return hsum(_mm256_add_ps(a0, a1)) + tail;
}

VATTN_AVX2 float dot_f32_avx2(const float* q, const float* r, int32_t d) {
  return dot_avx2<dtype::f32>(q, r, d);
}
VATTN_AVX2 float dot_f16_avx2(const float* q, const uint16_t* r, int32_t d) {
  return dot_avx2<dtype::f16>(q, r, d);
}
VATTN_AVX2 float dot_bf16_avx2(const float* q, const uint16_t* r, int32_t d) {
  return dot_avx2<dtype::bf16>(q, r, d);
}
#endif

const row_ops k_scalar{dot_f32_scalar, dot_f16_scalar, dot_bf16_scalar};
#if VATTN_X86
const row_ops k_avx2{dot_f32_avx2, dot_f16_avx2, dot_bf16_avx2};
#endif

}  // namespace

const row_ops& row_ops_for(simd_level l) {
#if VATTN_X86
  if (l == simd_level::avx2) return k_avx2;
#endif
  (void)l;
  return k_scalar;
}

}  // namespace vattn::detail
