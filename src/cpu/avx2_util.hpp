// avx2_util.hpp: AVX2 helpers shared by the CPU kernels: the target attribute, a horizontal sum,
// a register pin, and loads of eight row elements (f32, f16, bf16) as f32. Functions carry the AVX2
// target attribute, so including this header keeps the translation unit portable.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstdint>

#include "core/dtype.hpp"

#define VATTN_X86 1
#define VATTN_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace vattn::detail::avx2 {

VATTN_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x, held in a register: the compiler may not fold its load into each instruction that uses it.
// This machine's cores issue about one 256-bit load per cycle and two FMAs: a vector used by two
// FMAs and loaded twice (folded) makes a dot-product loop load-bound.
VATTN_AVX2 inline __m256 pinned(__m256 x) {
  asm("" : "+x"(x));
  return x;
}

template <dtype T>
struct load8;
template <>
struct load8<dtype::f32> {
  VATTN_AVX2 static __m256 at(const float* r) { return _mm256_loadu_ps(r); }
};
template <>
struct load8<dtype::f16> {
  VATTN_AVX2 static __m256 at(const uint16_t* r) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r)));
  }
};
template <>
struct load8<dtype::bf16> {  // bf16 is the top half of an f32: widen and shift
  VATTN_AVX2 static __m256 at(const uint16_t* r) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
};

}  // namespace vattn::detail::avx2
#endif
