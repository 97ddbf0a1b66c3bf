// select_kernels.cpp: see select_kernels.hpp.
#include "cpu/select_kernels.hpp"

#include "cpu/avx2_util.hpp"
#include "cpu/avx512_util.hpp"

namespace vattn::detail {
namespace {

int64_t nonzero_positions_scalar(const uint8_t* flags, int64_t n, int32_t* out) {
  int64_t c = 0;  // a store per position and no branch: the flag decides whether it is kept
  for (int64_t i = 0; i < n; ++i) {
    out[c] = int32_t(i);
    c += flags[i] != 0;
  }
  return c;
}

int64_t positions_above_scalar(const uint16_t* sc, int64_t n, uint16_t thr, int64_t ties,
                               int32_t base, int32_t* out) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool tie = sc[i] == thr && ties > 0;
    ties -= tie;
    out[c] = base + int32_t(i);
    c += sc[i] > thr || tie;
  }
  return c;
}

#if VATTN_X86
VATTN_AVX512_CODE_BEGIN
#define VATTN_SELECT512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,popcnt")))

// The positions first + j of the set bits j of a 16-bit mask, appended at out + c.
VATTN_SELECT512 inline int64_t append16(uint32_t m, int32_t first, int32_t* out, int64_t c) {
  if (m == 0) return c;
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i pos = _mm512_add_epi32(_mm512_set1_epi32(first), lanes);
  _mm512_mask_compressstoreu_epi32(out + c, __mmask16(m), pos);
  return c + _mm_popcnt_u32(m);
}

VATTN_SELECT512 int64_t nonzero_positions_avx512(const uint8_t* flags, int64_t n, int32_t* out) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; i += 64) {
    const int64_t left = n - i;
    const __mmask64 in = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
    const __m512i v = _mm512_maskz_loadu_epi8(in, flags + i);
    const uint64_t m = _mm512_test_epi8_mask(v, v);
    if (m == 0) continue;
    for (int32_t part = 0; part < 4; ++part)
      c = append16(uint32_t(m >> (16 * part)) & 0xffff, int32_t(i) + 16 * part, out, c);
  }
  return c;
}

VATTN_SELECT512 int64_t positions_above_avx512(const uint16_t* sc, int64_t n, uint16_t thr,
                                               int64_t ties, int32_t base, int32_t* out) {
  const __m512i t = _mm512_set1_epi16(int16_t(thr));
  int64_t c = 0;
  for (int64_t i = 0; i < n; i += 32) {
    const int64_t left = n - i;
    const __mmask32 in = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
    const __m512i v = _mm512_maskz_loadu_epi16(in, sc + i);
    uint32_t m = _mm512_mask_cmpgt_epu16_mask(in, v, t);
    if (ties > 0) {
      uint32_t eq = _mm512_mask_cmpeq_epu16_mask(in, v, t);
      const int64_t k = _mm_popcnt_u32(eq);
      if (k <= ties) {
        ties -= k;
      } else {  // the lowest `ties` of them, once per call
        uint32_t keep = 0;
        for (; ties > 0; --ties, eq &= eq - 1) keep |= eq & (0u - eq);
        eq = keep;
      }
      m |= eq;
    }
    if (m == 0) continue;
    c = append16(m & 0xffff, base + int32_t(i), out, c);
    c = append16(m >> 16, base + int32_t(i) + 16, out, c);
  }
  return c;
}
#undef VATTN_SELECT512
VATTN_AVX512_CODE_END
#endif

constexpr select_ops k_scalar{nonzero_positions_scalar, positions_above_scalar};
#if VATTN_X86
constexpr select_ops k_avx512{nonzero_positions_avx512, positions_above_avx512};
#endif

}  // namespace

const select_ops& select_ops_for(simd_level l) {
#if VATTN_X86
  if (l == simd_level::avx512) return k_avx512;
#endif
  (void)l;
  return k_scalar;
}

}  // namespace vattn::detail
