// gqa_kernels_avx512.cpp: AVX-512 versions of the row-list kernels (gqa_kernels.hpp). Same
// algorithms and summation order as the AVX2 ones with 16 lanes; row tails use masked loads
// and stores. Compiled for that target alone (function attributes): gqa_kernels.cpp calls
// them only on CPUs with AVX-512 F, BW, VL and DQ.
#include "cpu/gqa_kernels_avx512.hpp"

#include <algorithm>

#include "cpu/avx512_util.hpp"

#if defined(__x86_64__) || defined(__i386__)
VATTN_AVX512_CODE_BEGIN

namespace vattn::detail::avx512 {

namespace {

// Every line of a row, into L1 (T0) or L2 (T2). Always inlined: a call to a function that only
// prefetches is dead code to GCC (it finds the function pure and drops the call).
template <int Hint = _MM_HINT_T0, typename E>
[[gnu::always_inline]] VATTN_AVX512 inline void prefetch_row(const E* r, int32_t d) {
  const char* p = reinterpret_cast<const char*>(r);
  const int64_t bytes = int64_t(d) * int64_t(sizeof(E));
  for (int64_t b = 0; b < bytes; b += 64) {
    if constexpr (Hint == _MM_HINT_T2)
      _mm_prefetch(p + b, _MM_HINT_T2);
    else
      _mm_prefetch(p + b, _MM_HINT_T0);
  }
}

// Sparse lists, as the AVX2 kernels (gqa_kernels.cpp): each row is asked for into L2 k_far rows
// ahead and into L1 `near` rows ahead.
constexpr int64_t k_far = 16, k_near = 4, k_wsum_block = 8;

template <int64_t near, typename E>
[[gnu::always_inline]] VATTN_AVX512 inline void prefetch_ahead(const E* base, const int64_t* off,
                                                               int64_t i, int64_t cnt, int32_t d) {
  if (i + k_far < cnt) prefetch_row<_MM_HINT_T2>(base + off[i + k_far], d);
  if (i + near < cnt) prefetch_row(base + off[i + near], d);
}

// Thirty-two row elements at r as two f32 vectors: bf16 in perm32's order (one 512-bit load,
// the even elements by a shift, the odd ones by a mask), f16 and f32 in storage order.
template <dtype T>
struct load32x2 {
  static constexpr bool permuted = false;
  VATTN_AVX512 static void at(const typename storage<T>::type* r, __m512& lo, __m512& hi) {
    lo = load16<T>::at(r), hi = load16<T>::at(r + 16);
  }
};
template <>
struct load32x2<dtype::bf16> {
  static constexpr bool permuted = true;
  VATTN_AVX512 static void at(const uint16_t* r, __m512& even, __m512& odd) {
    const __m512i x = _mm512_loadu_si512(r);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int32_t(0xffff0000u))));
  }
};

// load32x2<bf16>'s order on each group of 32 floats of x[0, n32): even elements, then odd ones
// (forward), and back (inverse).
VATTN_AVX512 inline void perm32(float* x, int32_t n32, bool inverse) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int32_t j = 0; j < n32; j += 32) {
    const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
    const __m512 u = _mm512_permutex2var_ps(a, inverse ? lo : ev, b);
    const __m512 v = _mm512_permutex2var_ps(a, inverse ? hi : od, b);
    _mm512_storeu_ps(x + j, u), _mm512_storeu_ps(x + j + 16, v);
  }
}

// H heads (1..4) against one row: two FMA chains per head; the tail (d % 16) masked.
template <dtype T, int H>
VATTN_AVX512 inline void dot_heads(const float* q, int32_t d, const typename storage<T>::type* r,
                                   float* res) {
  using L = load16<T>;
  __m512 a[H][2];
  for (int h = 0; h < H; ++h) a[h][0] = a[h][1] = _mm512_setzero_ps();
  int32_t j = 0;
  for (; j + 32 <= d; j += 32) {
    const __m512 k0 = L::at(r + j), k1 = L::at(r + j + 16);
    for (int h = 0; h < H; ++h) {
      a[h][0] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * d + j), k0, a[h][0]);
      a[h][1] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * d + j + 16), k1, a[h][1]);
    }
  }
  if (j + 16 <= d) {
    const __m512 k0 = L::at(r + j);
    for (int h = 0; h < H; ++h)
      a[h][0] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * d + j), k0, a[h][0]);
    j += 16;
  }
  if (j < d) {
    const __mmask16 m = first_lanes(d - j);
    const __m512 k1 = L::masked(r + j, m);
    for (int h = 0; h < H; ++h)
      a[h][1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + h * d + j), k1, a[h][1]);
  }
  for (int h = 0; h < H; ++h) res[h] = hsum(_mm512_add_ps(a[h][0], a[h][1]));
}

// One row against every head of the group.
template <dtype T>
VATTN_AVX512 inline void logits_row(const float* q, int32_t G, int32_t d,
                                    const typename storage<T>::type* r, float* out, int64_t ld) {
  float res[4];
  int32_t g = 0;
  for (; g + 4 <= G; g += 4) {
    dot_heads<T, 4>(q + int64_t(g) * d, d, r, res);
    for (int h = 0; h < 4; ++h) out[(g + h) * ld] = res[h];
  }
  switch (G - g) {
    case 3:
      dot_heads<T, 3>(q + int64_t(g) * d, d, r, res);
      break;
    case 2:
      dot_heads<T, 2>(q + int64_t(g) * d, d, r, res);
      break;
    case 1:
      dot_heads<T, 1>(q + int64_t(g) * d, d, r, res);
      break;
    default:
      break;
  }
  for (int h = 0; g + h < G; ++h) out[(g + h) * ld] = res[h];
}

// Two rows against four heads, 32 elements a step (d % 32 == 0); q is [4, d] in load32x2's
// order. Each (row, head) keeps one accumulator chain per vector of load32x2, so the sums equal
// the one-row kernel's (dot_heads: 32 lanes, element j in lane j % 32) bit for bit: f16/f32
// reduce as it does, hsum(a0 + a1); the bf16 even/odd chains hold its lanes 0, 2, .., 30 and
// 1, 3, .., 31, and hsum of each, then their sum, is the same tree of additions. The CUDA backend
// reproduces this order (select_math.hpp dot_order). res[r * 4 + h] = <q_h, row_r>.
template <dtype T>
VATTN_AVX512 inline void dot_rows2_heads4(const float* q, int32_t d,
                                          const typename storage<T>::type* r0,
                                          const typename storage<T>::type* r1, float* res) {
  __m512 a[2][4][2];  // [row][head][chain]
  for (auto& r : a)
    for (auto& h : r) h[0] = h[1] = _mm512_setzero_ps();
  for (int32_t j = 0; j < d; j += 32) {
    __m512 k0[2], k1[2];
    load32x2<T>::at(r0 + j, k0[0], k0[1]);
    load32x2<T>::at(r1 + j, k1[0], k1[1]);
    for (int x = 0; x < 2; ++x)
      for (int h = 0; h < 4; ++h) {
        const __m512 qh = _mm512_loadu_ps(q + h * d + j + 16 * x);
        a[0][h][x] = _mm512_fmadd_ps(qh, k0[x], a[0][h][x]);
        a[1][h][x] = _mm512_fmadd_ps(qh, k1[x], a[1][h][x]);
      }
  }
  for (int r = 0; r < 2; ++r)
    for (int h = 0; h < 4; ++h)
      res[r * 4 + h] = load32x2<T>::permuted ? hsum(a[r][h][0]) + hsum(a[r][h][1])
                                             : hsum(_mm512_add_ps(a[r][h][0], a[r][h][1]));
}

constexpr int32_t k_qmax = 2048;  // floats of the permuted q copy

// Rows two at a time (groups of four heads, d % 32 == 0, G d <= k_qmax); returns how many rows
// it did (an even number). D > 0: d == D, known to the compiler.
template <dtype T, int32_t D>
VATTN_AVX512 int64_t logits_pairs(const float* q, int32_t G, int32_t d,
                                  const typename storage<T>::type* base, const int64_t* off,
                                  int64_t cnt, float* out, int64_t ld) {
  if constexpr (D > 0) d = D;
  alignas(64) float qp[k_qmax];
  const float* qs = q;
  if constexpr (load32x2<T>::permuted) {
    std::copy(q, q + int64_t(G) * d, qp);
    for (int32_t g = 0; g < G; ++g) perm32(qp + int64_t(g) * d, d, false);
    qs = qp;
  }
  float res[8];
  int64_t i = 0;
  for (; i + 2 <= cnt; i += 2) {
    prefetch_ahead<k_near>(base, off, i, cnt, d);
    prefetch_ahead<k_near>(base, off, i + 1, cnt, d);
    const auto *r0 = base + off[i], *r1 = base + off[i + 1];
    for (int32_t g = 0; g < G; g += 4) {
      dot_rows2_heads4<T>(qs + int64_t(g) * d, d, r0, r1, res);
      float* o = out + int64_t(g) * ld + i;
      for (int x = 0; x < 4; ++x) o[x * ld] = res[x], o[x * ld + 1] = res[4 + x];
    }
  }
  return i;
}

template <dtype T>
VATTN_AVX512 void logits(const float* q, int32_t G, int32_t d,
                         const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                         float* out, int64_t ld) {
  int64_t i = 0;
  if (G % 4 == 0 && d % 32 == 0 && int64_t(G) * d <= k_qmax && cnt >= 2)
    i = d == 128 ? logits_pairs<T, 128>(q, G, d, base, off, cnt, out, ld)
                 : logits_pairs<T, 0>(q, G, d, base, off, cnt, out, ld);
  for (; i < cnt; ++i) {
    prefetch_ahead<k_near>(base, off, i, cnt, d);
    logits_row<T>(q, G, d, base + off[i], out + i, ld);
  }
}

// H heads (1..4) over a block of rows for one 32-float slice of d, the accumulators in
// registers (acc holds the slice in load32x2's order); during the first slice each row step
// prefetches ahead in the list (pf: the whole list and where the block starts in it).
template <dtype T, int H, int32_t D>
VATTN_AVX512 inline void wsum_slice(const float* w, int64_t ldw, int32_t d, int32_t j,
                                    const typename storage<T>::type* base, const int64_t* off,
                                    int64_t cnt, float* acc, const int64_t* pf_off, int64_t pf_at,
                                    int64_t pf_cnt) {
  if constexpr (D > 0) d = D;
  __m512 a[H][2];
  for (int h = 0; h < H; ++h) {
    a[h][0] = _mm512_loadu_ps(acc + h * d + j);
    a[h][1] = _mm512_loadu_ps(acc + h * d + j + 16);
  }
  for (int64_t i = 0; i < cnt; ++i) {
    if (pf_off) prefetch_ahead<k_wsum_block>(base, pf_off, pf_at + i, pf_cnt, d);
    __m512 v0, v1;
    load32x2<T>::at(base + off[i] + j, v0, v1);
    for (int h = 0; h < H; ++h) {
      const __m512 e = _mm512_set1_ps(w[h * ldw + i]);
      a[h][0] = _mm512_fmadd_ps(e, v0, a[h][0]);
      a[h][1] = _mm512_fmadd_ps(e, v1, a[h][1]);
    }
  }
  for (int h = 0; h < H; ++h) {
    _mm512_storeu_ps(acc + h * d + j, a[h][0]);
    _mm512_storeu_ps(acc + h * d + j + 16, a[h][1]);
  }
}

// The elements [d32, d) of G heads, row by row (tails masked).
template <dtype T>
VATTN_AVX512 void wsum_tail(const float* w, int64_t ldw, int32_t G, int32_t d, int32_t d32,
                            const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                            float* acc) {
  using L = load16<T>;
  for (int64_t i = 0; i < cnt; ++i) {
    const auto* r = base + off[i];
    for (int32_t j = d32; j < d; j += 16) {
      const __mmask16 m = first_lanes(std::min(16, d - j));
      const __m512 v = L::masked(r + j, m);
      for (int32_t g = 0; g < G; ++g) {
        float* a = acc + int64_t(g) * d + j;
        const __m512 s = _mm512_maskz_loadu_ps(m, a);
        _mm512_mask_storeu_ps(a, m, _mm512_fmadd_ps(_mm512_set1_ps(w[g * ldw + i]), v, s));
      }
    }
  }
}

// Blocks of 8 rows, 32-float slices of d (as the AVX2 kernel's 16-float ones); bf16 keeps acc's
// 32-float groups in load32x2's order during the call (each sum still runs over the rows in
// list order).
template <dtype T, int32_t D>
VATTN_AVX512 void wsum_blocks(const float* w, int64_t ldw, int32_t G, int32_t d,
                              const typename storage<T>::type* base, const int64_t* off,
                              int64_t cnt, float* acc) {
  if constexpr (D > 0) d = D;
  const int32_t d32 = d / 32 * 32;
  constexpr bool perm = load32x2<T>::permuted;
  if constexpr (perm)
    for (int32_t g = 0; g < G; ++g) perm32(acc + int64_t(g) * d, d32, false);
  for (int64_t i0 = 0; i0 < cnt; i0 += k_wsum_block) {
    const int64_t n = std::min(k_wsum_block, cnt - i0);
    if (d32 == 0)
      for (int64_t i = 0; i < n; ++i) prefetch_ahead<k_wsum_block>(base, off, i0 + i, cnt, d);
    for (int32_t g = 0; g < G; g += 4) {
      const float* wg = w + g * ldw + i0;
      float* ag = acc + int64_t(g) * d;
      for (int32_t j = 0; j < d32; j += 32) {
        const int64_t* pf = g == 0 && j == 0 ? off : nullptr;
        switch (std::min(4, G - g)) {
          case 4:
            wsum_slice<T, 4, D>(wg, ldw, d, j, base, off + i0, n, ag, pf, i0, cnt);
            break;
          case 3:
            wsum_slice<T, 3, D>(wg, ldw, d, j, base, off + i0, n, ag, pf, i0, cnt);
            break;
          case 2:
            wsum_slice<T, 2, D>(wg, ldw, d, j, base, off + i0, n, ag, pf, i0, cnt);
            break;
          default:
            wsum_slice<T, 1, D>(wg, ldw, d, j, base, off + i0, n, ag, pf, i0, cnt);
            break;
        }
      }
    }
    if (d32 < d) wsum_tail<T>(w + i0, ldw, G, d, d32, base, off + i0, n, acc);
  }
  if constexpr (perm)
    for (int32_t g = 0; g < G; ++g) perm32(acc + int64_t(g) * d, d32, true);
}

template <dtype T>
VATTN_AVX512 void wsum(const float* w, int64_t ldw, int32_t G, int32_t d,
                       const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                       float* acc) {
  if (d == 128) return wsum_blocks<T, 128>(w, ldw, G, d, base, off, cnt, acc);
  wsum_blocks<T, 0>(w, ldw, G, d, base, off, cnt, acc);
}

// Eight row elements at r as doubles; lanes off m read no memory (zero).
template <dtype T>
VATTN_AVX512 inline __m512d load8d(const typename storage<T>::type* r, __mmask8 m) {
  if constexpr (T == dtype::f32) {
    return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, r));
  } else {
    const __m128i h = _mm_maskz_loadu_epi16(m, r);
    if constexpr (T == dtype::f16) return _mm512_cvtps_pd(_mm256_cvtph_ps(h));
    return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
}

// H heads (1..4) over a block of rows for one slice of d (the 8 doubles at j, the lanes of m):
// the twelve sums stay in registers while the block's rows stream past; e holds the block's
// weights as doubles ([H][k_wsum_block]). Each sum takes the rows in order with the operations
// of the row-by-row loop (x = e v; s1 + x; fma(x, x, s2); fma(e, x, s3)).
template <dtype T, int H>
VATTN_AVX512 inline void moments_slice(const double* e, int32_t d, int32_t j, __mmask8 m,
                                       const typename storage<T>::type* base, const int64_t* off,
                                       int64_t cnt, double* s1, double* s2, double* s3,
                                       const int64_t* pf_off, int64_t pf_at, int64_t pf_cnt) {
  __m512d a1[H], a2[H], a3[H];
  for (int h = 0; h < H; ++h) {
    a1[h] = _mm512_maskz_loadu_pd(m, s1 + h * d + j);
    a2[h] = _mm512_maskz_loadu_pd(m, s2 + h * d + j);
    a3[h] = _mm512_maskz_loadu_pd(m, s3 + h * d + j);
  }
  for (int64_t i = 0; i < cnt; ++i) {
    if (pf_off) prefetch_ahead<k_wsum_block>(base, pf_off, pf_at + i, pf_cnt, d);
    const __m512d v = load8d<T>(base + off[i] + j, m);
    for (int h = 0; h < H; ++h) {
      const __m512d eh = _mm512_set1_pd(e[h * k_wsum_block + i]);
      const __m512d x = _mm512_mul_pd(eh, v);
      a1[h] = _mm512_add_pd(a1[h], x);
      a2[h] = _mm512_fmadd_pd(x, x, a2[h]);
      a3[h] = _mm512_fmadd_pd(eh, x, a3[h]);
    }
  }
  for (int h = 0; h < H; ++h) {
    _mm512_mask_storeu_pd(s1 + h * d + j, m, a1[h]);
    _mm512_mask_storeu_pd(s2 + h * d + j, m, a2[h]);
    _mm512_mask_storeu_pd(s3 + h * d + j, m, a3[h]);
  }
}

template <dtype T, int H, int32_t D>
VATTN_AVX512 void moments_heads(const double* e, int32_t d, const typename storage<T>::type* base,
                                const int64_t* off, int64_t cnt, double* s1, double* s2, double* s3,
                                const int64_t* pf_off, int64_t pf_at, int64_t pf_cnt) {
  if constexpr (D > 0) d = D;
  for (int32_t j = 0; j < d; j += 8) {
    const __mmask8 m = __mmask8(first_lanes(std::min(8, d - j)));
    const int64_t* pf = j == 0 ? pf_off : nullptr;
    moments_slice<T, H>(e, d, j, m, base, off, cnt, s1, s2, s3, pf, pf_at, pf_cnt);
  }
}

// Blocks of rows as wsum_blocks, up to four heads a pass.
template <dtype T, int32_t D>
VATTN_AVX512 void moments_blocks(const float* w, int64_t ldw, int32_t G, int32_t d,
                                 const typename storage<T>::type* base, const int64_t* off,
                                 int64_t cnt, double* s1, double* s2, double* s3) {
  constexpr int64_t block = k_wsum_block;
  if constexpr (D > 0) d = D;
  double e[4 * block];
  for (int64_t i0 = 0; i0 < cnt; i0 += block) {
    const int64_t n = std::min(block, cnt - i0);
    for (int32_t g = 0; g < G; g += 4) {
      const int32_t H = std::min(4, G - g);
      for (int32_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < n; ++i) e[h * block + i] = double(w[(g + h) * ldw + i0 + i]);
      const int64_t o = int64_t(g) * d;
      const int64_t* pf = g == 0 ? off : nullptr;
      switch (H) {
        case 4:
          moments_heads<T, 4, D>(e, d, base, off + i0, n, s1 + o, s2 + o, s3 + o, pf, i0, cnt);
          break;
        case 3:
          moments_heads<T, 3, D>(e, d, base, off + i0, n, s1 + o, s2 + o, s3 + o, pf, i0, cnt);
          break;
        case 2:
          moments_heads<T, 2, D>(e, d, base, off + i0, n, s1 + o, s2 + o, s3 + o, pf, i0, cnt);
          break;
        default:
          moments_heads<T, 1, D>(e, d, base, off + i0, n, s1 + o, s2 + o, s3 + o, pf, i0, cnt);
          break;
      }
    }
  }
}

template <dtype T>
VATTN_AVX512 void moments(const float* w, int64_t ldw, int32_t G, int32_t d,
                          const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                          double* s1, double* s2, double* s3) {
  if (d == 128) return moments_blocks<T, 128>(w, ldw, G, d, base, off, cnt, s1, s2, s3);
  moments_blocks<T, 0>(w, ldw, G, d, base, off, cnt, s1, s2, s3);
}

// exp as in the AVX2 kernel: 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (two-part ln 2),
// exp(r) by its degree-7 Taylor polynomial. The clamps keep NaN (it is the second operand of
// max and min), and the under-flow mask is false for NaN, so NaN stays NaN.
VATTN_AVX512 inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(lo, x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i e =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
}

VATTN_AVX512 void exp_kernel(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, exp16(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 m = first_lanes(int32_t(n - i));
    _mm512_mask_storeu_ps(x + i, m, exp16(_mm512_maskz_loadu_ps(m, x + i)));
  }
}

template <dtype T>
struct tables {
  static constexpr gqa_ops<T> ops{logits<T>, wsum<T>, moments<T>};
};

}  // namespace

template <dtype T>
const gqa_ops<T>& gqa_ops_table() {
  return tables<T>::ops;
}
template const gqa_ops<dtype::f32>& gqa_ops_table<dtype::f32>();
template const gqa_ops<dtype::f16>& gqa_ops_table<dtype::f16>();
template const gqa_ops<dtype::bf16>& gqa_ops_table<dtype::bf16>();

void exp_inplace(float* x, int64_t n) {
  exp_kernel(x, n);
}

}  // namespace vattn::detail::avx512

VATTN_AVX512_CODE_END
#endif
