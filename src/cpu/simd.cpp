// simd.cpp: SIMD level detection and the scalar, AVX2 and AVX-512 row kernels. The SIMD
// functions are compiled for their target alone (function attributes), so the rest of the
// library stays portable and the dispatcher picks them only on CPUs that have that level.
#include "cpu/simd.hpp"

#include <cstdlib>
#include <cstring>

#include "core/dtype.hpp"
#include "cpu/row_kernels.hpp"

#include "cpu/avx2_util.hpp"
#include "cpu/avx512_util.hpp"

#if VATTN_X86
#include <cpuid.h>
#endif

namespace vattn::detail {

const char* simd_level_str(simd_level l) {
  switch (l) {
    case simd_level::avx2:
      return "avx2";
    case simd_level::avx512: {
      static const bool bf16 = cpu_has_avx512bf16();
      return bf16 ? "avx512+bf16" : "avx512";
    }
    default:
      return "scalar";
  }
}

bool parse_simd_level(const char* s, simd_level* out) {
  if (!s) return false;
  if (std::strcmp(s, "scalar") == 0) return *out = simd_level::scalar, true;
  if (std::strcmp(s, "avx2") == 0) return *out = simd_level::avx2, true;
  if (std::strcmp(s, "avx512") == 0) return *out = simd_level::avx512, true;
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

#if VATTN_X86
namespace {

// XCR0: the register state the OS saves; 0 where XGETBV is unavailable (CPUID 1, ECX bit 27).
uint64_t os_xcr0() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || (c & (1u << 27)) == 0) return 0;
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return uint64_t(hi) << 32 | lo;
}

}  // namespace
#endif

bool cpu_has_avx512() {
#if VATTN_X86
  // CPUID leaf 7 subleaf 0, EBX: F (bit 16), DQ (17), BW (30), VL (31); XCR0: SSE and AVX
  // state (bits 1, 2), opmask and ZMM state (5, 6, 7).
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const unsigned need = 1u << 16 | 1u << 17 | 1u << 30 | 1u << 31;
  const uint64_t xcr0 = 0x2 | 0x4 | 0x20 | 0x40 | 0x80;
  return (b & need) == need && (os_xcr0() & xcr0) == xcr0;
#else
  return false;
#endif
}

bool cpu_has_avx512bf16() {
#if VATTN_X86
  // CPUID leaf 7 subleaf 1 (present where subleaf 0's EAX is at least 1), EAX bit 5.
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!cpu_has_avx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || a < 1) return false;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5)) != 0;
#else
  return false;
#endif
}

bool cpu_has_avx512vpopcntdq() {
#if VATTN_X86
  // CPUID leaf 7 subleaf 0, ECX bit 14.
  unsigned a = 0, b = 0, c = 0, d = 0;
  return cpu_has_avx512() && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (c & (1u << 14)) != 0;
#else
  return false;
#endif
}

simd_level detected_simd_level() {
#if VATTN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c())
    return cpu_has_avx512() ? simd_level::avx512 : simd_level::avx2;
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

VATTN_AVX512_CODE_BEGIN
// Two independent FMA chains of 16 lanes; the tail (d % 16) masked into the second.
template <dtype T>
VATTN_AVX512 float dot_avx512(const float* q, const typename storage<T>::type* r, int32_t d) {
  using L = avx512::load16<T>;
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int32_t j = 0;
  for (; j + 32 <= d; j += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), L::at(r + j), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + j + 16), L::at(r + j + 16), a1);
  }
  if (j + 16 <= d) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), L::at(r + j), a0);
    j += 16;
  }
  if (j < d) {
    const __mmask16 m = avx512::first_lanes(d - j);
    a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + j), L::masked(r + j, m), a1);
  }
  return avx512::hsum(_mm512_add_ps(a0, a1));
}

VATTN_AVX512 float dot_f32_avx512(const float* q, const float* r, int32_t d) {
  return dot_avx512<dtype::f32>(q, r, d);
}
VATTN_AVX512 float dot_f16_avx512(const float* q, const uint16_t* r, int32_t d) {
  return dot_avx512<dtype::f16>(q, r, d);
}
VATTN_AVX512 float dot_bf16_avx512(const float* q, const uint16_t* r, int32_t d) {
  return dot_avx512<dtype::bf16>(q, r, d);
}
VATTN_AVX512_CODE_END
#endif

const row_ops k_scalar{dot_f32_scalar, dot_f16_scalar, dot_bf16_scalar};
#if VATTN_X86
const row_ops k_avx2{dot_f32_avx2, dot_f16_avx2, dot_bf16_avx2};
const row_ops k_avx512{dot_f32_avx512, dot_f16_avx512, dot_bf16_avx512};
#endif

}  // namespace

const row_ops& row_ops_for(simd_level l) {
#if VATTN_X86
  if (l == simd_level::avx2) return k_avx2;
  if (l == simd_level::avx512) return k_avx512;
#endif
  (void)l;
  return k_scalar;
}

}  // namespace vattn::detail
