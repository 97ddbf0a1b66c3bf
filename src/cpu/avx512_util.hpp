// avx512_util.hpp: AVX-512 helpers shared by the CPU kernels: the target attribute, a horizontal
// sum, and loads of sixteen row elements (f32, f16, bf16) as f32, whole or masked (lanes off the
// mask read no memory and are zero, so row tails never touch bytes past the row). Functions
// carry the target attribute, so including this header keeps the translation unit portable.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstdint>

#include "core/dtype.hpp"

// F, BW, VL and DQ: the level simd_level::avx512 stands for (every such CPU has FMA and F16C).
#define VATTN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))

// GCC 12 reports its own AVX-512 headers' deliberately undefined placeholders (_mm512_undefined_*)
// as uninitialised where their intrinsics are inlined; code using them sits between these.
#if defined(__GNUC__) && !defined(__clang__)
#define VATTN_AVX512_CODE_BEGIN                                                        \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"") \
      _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define VATTN_AVX512_CODE_END _Pragma("GCC diagnostic pop")
#else
#define VATTN_AVX512_CODE_BEGIN
#define VATTN_AVX512_CODE_END
#endif

VATTN_AVX512_CODE_BEGIN

namespace vattn::detail::avx512 {

// The first n of 16 lanes, 0 <= n <= 16.
VATTN_AVX512 inline __mmask16 first_lanes(int32_t n) {
  return __mmask16((1u << n) - 1u);
}

VATTN_AVX512 inline float hsum(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <dtype T>
struct load16;
template <>
struct load16<dtype::f32> {
  VATTN_AVX512 static __m512 at(const float* r) { return _mm512_loadu_ps(r); }
  VATTN_AVX512 static __m512 masked(const float* r, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, r);
  }
};
template <>
struct load16<dtype::f16> {
  VATTN_AVX512 static __m512 at(const uint16_t* r) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r)));
  }
  VATTN_AVX512 static __m512 masked(const uint16_t* r, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, r));
  }
};
template <>
struct load16<dtype::bf16> {  // bf16 is the top half of an f32: widen and shift
  VATTN_AVX512 static __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  VATTN_AVX512 static __m512 at(const uint16_t* r) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r)));
  }
  VATTN_AVX512 static __m512 masked(const uint16_t* r, __mmask16 m) {
    return widen(_mm256_maskz_loadu_epi16(m, r));
  }
};

}  // namespace vattn::detail::avx512

VATTN_AVX512_CODE_END
#endif
