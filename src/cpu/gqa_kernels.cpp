// gqa_kernels.cpp: scalar and AVX2 versions of the row-list kernels (gqa_kernels.hpp). The
// scalar ones are the portable baseline and the test oracle of the AVX2 ones.
#include "cpu/gqa_kernels.hpp"

#include <algorithm>
#include <cmath>

#include "cpu/avx2_util.hpp"
#include "cpu/gqa_kernels_avx512.hpp"

namespace vattn::detail {

namespace {

constexpr int64_t k_dense_ahead = 4;  // dense: tokens ahead

// ---- scalar ----------------------------------------------------------------------------------

template <dtype T>
void logits_scalar(const float* q, int32_t G, int32_t d, const typename storage<T>::type* base,
                   const int64_t* off, int64_t cnt, float* out, int64_t ld) {
  for (int64_t i = 0; i < cnt; ++i) {
    const auto* r = base + off[i];
    for (int32_t g = 0; g < G; ++g) {
      const float* qg = q + int64_t(g) * d;
      float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      int32_t j = 0;
      for (; j + 4 <= d; j += 4) {
        a0 += qg[j] * storage<T>::load(r[j]);
        a1 += qg[j + 1] * storage<T>::load(r[j + 1]);
        a2 += qg[j + 2] * storage<T>::load(r[j + 2]);
        a3 += qg[j + 3] * storage<T>::load(r[j + 3]);
      }
      for (; j < d; ++j) a0 += qg[j] * storage<T>::load(r[j]);
      out[g * ld + i] = (a0 + a1) + (a2 + a3);
    }
  }
}

template <dtype T>
void wsum_scalar(const float* w, int64_t ldw, int32_t G, int32_t d,
                 const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                 float* acc) {
  for (int64_t i = 0; i < cnt; ++i) {
    const auto* r = base + off[i];
    for (int32_t g = 0; g < G; ++g) {
      const float e = w[g * ldw + i];
      float* a = acc + int64_t(g) * d;
      for (int32_t j = 0; j < d; ++j) a[j] += e * storage<T>::load(r[j]);
    }
  }
}

template <dtype T>
void moments_scalar(const float* w, int64_t ldw, int32_t G, int32_t d,
                    const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                    double* s1, double* s2, double* s3) {
  for (int64_t i = 0; i < cnt; ++i) {
    const auto* r = base + off[i];
    for (int32_t g = 0; g < G; ++g) {
      const double e = w[g * ldw + i];
      const int64_t o = int64_t(g) * d;
      for (int32_t j = 0; j < d; ++j) {
        const double x = e * double(storage<T>::load(r[j]));
        s1[o + j] += x;
        s2[o + j] += x * x;
        s3[o + j] += e * x;
      }
    }
  }
}

template <dtype T>
void dense_logits_scalar(const float* q, int32_t H, int32_t G, int32_t d,
                         const typename storage<T>::type* base, const int64_t* off, int64_t hs,
                         int64_t cnt, float* out, int64_t ld) {
  for (int64_t i = 0; i < cnt; ++i)
    for (int32_t h = 0; h < H; ++h) {
      const int64_t o = off[i] + h * hs;
      logits_scalar<T>(q + int64_t(h) * G * d, G, d, base, &o, 1, out + int64_t(h) * G * ld + i,
                       ld);
    }
}

template <dtype T>
void dense_wsum_scalar(const float* w, int64_t ldw, int32_t H, int32_t G, int32_t d,
                       const typename storage<T>::type* base, const int64_t* off, int64_t hs,
                       int64_t cnt, float* acc) {
  for (int64_t i = 0; i < cnt; ++i)
    for (int32_t h = 0; h < H; ++h) {
      const int64_t o = off[i] + h * hs;
      wsum_scalar<T>(w + int64_t(h) * G * ldw + i, ldw, G, d, base, &o, 1,
                     acc + int64_t(h) * G * d);
    }
}

void exp_scalar(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] < -87.0f ? 0.0f : std::exp(x[i]);
}

bool shift_exp_sum_scalar(float* x, int64_t n, float* m, double* sum) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) return false;
    mx = std::max(mx, x[i]);
  }
  for (int64_t i = 0; i < n; ++i) x[i] -= mx;
  exp_scalar(x, n);
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(x[i]);
  *m = mx, *sum = s;
  return true;
}

// ---- AVX2 ------------------------------------------------------------------------------------
#if VATTN_X86

// Every line of a row, into L1 (T0) or L2 (T2). Always inlined: a call to a function that only
// prefetches is dead code to GCC (it finds the function pure and drops the call).
template <int Hint = _MM_HINT_T0, typename E>
[[gnu::always_inline]] VATTN_AVX2 inline void prefetch_row(const E* r, int32_t d) {
  const char* p = reinterpret_cast<const char*>(r);
  const int64_t bytes = int64_t(d) * int64_t(sizeof(E));
  for (int64_t b = 0; b < bytes; b += 64) {
    if constexpr (Hint == _MM_HINT_T2)
      _mm_prefetch(p + b, _MM_HINT_T2);
    else
      _mm_prefetch(p + b, _MM_HINT_T0);
  }
}

// H heads (1..4) against one row: two FMA chains per head.
template <dtype T, int H>
VATTN_AVX2 inline void dot_heads(const float* q, int32_t d, const typename storage<T>::type* r,
                                 float* res) {
  using L = avx2::load8<T>;
  __m256 a[H][2];
  for (int h = 0; h < H; ++h) a[h][0] = a[h][1] = _mm256_setzero_ps();
  int32_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m256 k0 = L::at(r + j), k1 = L::at(r + j + 8);
    for (int h = 0; h < H; ++h) {
      a[h][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + j), k0, a[h][0]);
      a[h][1] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + j + 8), k1, a[h][1]);
    }
  }
  if (j + 8 <= d) {
    const __m256 k0 = L::at(r + j);
    for (int h = 0; h < H; ++h)
      a[h][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * d + j), k0, a[h][0]);
    j += 8;
  }
  for (int h = 0; h < H; ++h) {
    float tail = 0;
    for (int32_t t = j; t < d; ++t) tail += q[h * d + t] * storage<T>::load(r[t]);
    res[h] = avx2::hsum(_mm256_add_ps(a[h][0], a[h][1])) + tail;
  }
}

// Sparse lists: rows are far apart (one kv head's row of a token-major cache every 2 KB), so the
// hardware prefetchers do not help and each row's lines are asked for twice: into L2 k_far rows
// ahead, into L1 `near` rows ahead (the logits: k_near; the weighted sums: one block of rows). A
// single L1 prefetch far enough ahead to cover the memory latency keeps more rows in L1 than the
// few sets one kv head's rows map to can hold (all rows of a kv head share address bits 8-10), and
// a near one alone leaves too few lines in flight.
constexpr int64_t k_far = 16, k_near = 4;

// Row i of a list is needed soon: ask for rows i + k_far (into L2) and i + near (into L1).
template <int64_t near, typename E>
[[gnu::always_inline]] VATTN_AVX2 inline void prefetch_ahead(const E* base, const int64_t* off,
                                                             int64_t i, int64_t cnt, int32_t d) {
  if (i + k_far < cnt) prefetch_row<_MM_HINT_T2>(base + off[i + k_far], d);
  if (i + near < cnt) prefetch_row(base + off[i + near], d);
}

// Sixteen row elements at r as two f32 vectors in the order of perm16 (bf16: one 256-bit load,
// the even elements by a shift, the odd ones by a mask; no conversion shuffles), or in storage
// order (f16, f32).
template <dtype T>
struct load16x2 {
  static constexpr bool permuted = false;
  VATTN_AVX2 static void at(const typename storage<T>::type* r, __m256& lo, __m256& hi) {
    lo = avx2::load8<T>::at(r), hi = avx2::load8<T>::at(r + 8);
  }
};
template <>
struct load16x2<dtype::bf16> {
  static constexpr bool permuted = true;
  VATTN_AVX2 static void at(const uint16_t* r, __m256& even, __m256& odd) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int32_t(0xffff0000u))));
  }
};

// The order load16x2<bf16> gives, on each group of 16 floats of x[0, n16): even elements, then
// odd ones (forward), and back (inverse).
VATTN_AVX2 inline void perm16(float* x, int32_t n16, bool inverse) {
  for (int32_t j = 0; j < n16; j += 16) {
    const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + 8);
    __m256 lo, hi;
    if (!inverse) {  // a = x0..x7, b = x8..x15 -> (x0 x2 .. x14), (x1 x3 .. x15)
      // e = x0 x2 x8 x10 | x4 x6 x12 x14: its 64-bit pairs in the order 0 2 1 3
      const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
      const __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
      lo = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
      hi = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
    } else {  // a = evens, b = odds -> natural order
      const __m256 l = _mm256_unpacklo_ps(a, b), h = _mm256_unpackhi_ps(a, b);
      lo = _mm256_permute2f128_ps(l, h, 0x20), hi = _mm256_permute2f128_ps(l, h, 0x31);
    }
    _mm256_storeu_ps(x + j, lo), _mm256_storeu_ps(x + j + 8, hi);
  }
}

// Two rows against two heads, sixteen elements a step (d % 16 == 0); q is [2, d] in load16x2's
// order. Each (row, head) keeps one accumulator chain per vector of load16x2, so every element
// goes to the lane and in the order of the one-row kernel (dot_heads: 16 lanes, element j in lane
// j % 16), and the sums equal its sums bit for bit: f16/f32 reduce as it does, hsum(a0 + a1); the
// bf16 even/odd chains hold lanes 0, 2, .., 14 and 1, 3, .., 15 of that sum, and hsum of each, then
// their sum, is the same tree of additions. The CUDA backend reproduces this order (select_math.hpp
// dot_order), so the logits must not change by a rounding. res[r * 2 + h] = <q_h, row_r>.
template <dtype T>
VATTN_AVX2 inline void dot_rows2_heads2_16(const float* q, int32_t d,
                                           const typename storage<T>::type* r0,
                                           const typename storage<T>::type* r1, float* res) {
  __m256 a[2][2][2];  // [row][head][chain]
  for (auto& r : a)
    for (auto& h : r) h[0] = h[1] = _mm256_setzero_ps();
  for (int32_t j = 0; j < d; j += 16) {
    __m256 k0[2], k1[2];
    load16x2<T>::at(r0 + j, k0[0], k0[1]);
    load16x2<T>::at(r1 + j, k1[0], k1[1]);
    for (int x = 0; x < 2; ++x)
      for (int h = 0; h < 2; ++h) {
        const __m256 qh = avx2::pinned(_mm256_loadu_ps(q + h * d + j + 8 * x));
        a[0][h][x] = _mm256_fmadd_ps(qh, k0[x], a[0][h][x]);
        a[1][h][x] = _mm256_fmadd_ps(qh, k1[x], a[1][h][x]);
      }
  }
  const float tail = 0;  // dot_heads adds its (empty) scalar tail
  for (int r = 0; r < 2; ++r)
    for (int h = 0; h < 2; ++h) {
      const float s = load16x2<T>::permuted ? avx2::hsum(a[r][h][0]) + avx2::hsum(a[r][h][1])
                                            : avx2::hsum(_mm256_add_ps(a[r][h][0], a[r][h][1]));
      res[r * 2 + h] = s + tail;
    }
}

// One row against every head of the group.
template <dtype T>
VATTN_AVX2 inline void logits_row(const float* q, int32_t G, int32_t d,
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

// Rows two at a time for pairs of heads with d % 16 == 0 and G d <= k_qmax (q copied into
// load16x2's order when it permutes). Returns how many rows it did (an even number). D as in
// wsum_slice.
constexpr int32_t k_qmax = 2048;  // floats of the permuted q copy

template <dtype T, int32_t D>
VATTN_AVX2 int64_t logits_pairs(const float* q, int32_t G, int32_t d,
                                const typename storage<T>::type* base, const int64_t* off,
                                int64_t cnt, float* out, int64_t ld) {
  if constexpr (D > 0) d = D;
  alignas(32) float qp[k_qmax];
  const float* qs = q;
  if constexpr (load16x2<T>::permuted) {
    std::copy(q, q + int64_t(G) * d, qp);
    for (int32_t g = 0; g < G; ++g) perm16(qp + int64_t(g) * d, d, false);
    qs = qp;
  }
  float res[8];
  int64_t i = 0;
  for (; i + 2 <= cnt; i += 2) {
    prefetch_ahead<k_near>(base, off, i, cnt, d);
    prefetch_ahead<k_near>(base, off, i + 1, cnt, d);
    const auto *r0 = base + off[i], *r1 = base + off[i + 1];
    for (int32_t g = 0; g < G; g += 2) {
      dot_rows2_heads2_16<T>(qs + int64_t(g) * d, d, r0, r1, res);
      float* o = out + int64_t(g) * ld + i;
      for (int x = 0; x < 2; ++x) o[x * ld] = res[x], o[x * ld + 1] = res[2 + x];
    }
  }
  return i;
}

// Pairs of rows where logits_pairs applies; other shapes, and an odd last row, one at a time.
template <dtype T>
VATTN_AVX2 void logits_avx2(const float* q, int32_t G, int32_t d,
                            const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                            float* out, int64_t ld) {
  int64_t i = 0;
  if (G % 2 == 0 && d % 16 == 0 && int64_t(G) * d <= k_qmax && cnt >= 2)
    i = d == 128 ? logits_pairs<T, 128>(q, G, d, base, off, cnt, out, ld)
                 : logits_pairs<T, 0>(q, G, d, base, off, cnt, out, ld);
  for (; i < cnt; ++i) {
    prefetch_ahead<k_near>(base, off, i, cnt, d);
    logits_row<T>(q, G, d, base + off[i], out + i, ld);
  }
}

// The rows of a sparse list to prefetch while a block is read (prefetch_ahead for each of its
// rows, issued during the block's first slice): the whole list, and where the block starts in it.
constexpr int64_t k_wsum_block = 8;  // rows per block of the weighted sums

template <typename E>
struct list_ahead {
  const E* base;
  const int64_t* off;
  int64_t at, cnt;
};

// H heads (1..4) over a block of rows for one 16-float slice of d: the accumulators stay in
// registers while the block's rows (in L1 after the first slice) stream past. With PERM, the
// rows load in load16x2's order and acc holds the slice in that order. D > 0: d == D, known to
// the compiler (loops unrolled).
template <dtype T, int H, bool PERM, int32_t D>
VATTN_AVX2 inline void wsum_slice(const float* w, int64_t ldw, int32_t d, int32_t j,
                                  const typename storage<T>::type* base, const int64_t* off,
                                  int64_t cnt, float* acc,
                                  const list_ahead<typename storage<T>::type>* pf) {
  using L = avx2::load8<T>;
  if constexpr (D > 0) d = D;
  __m256 a[H][2];
  for (int h = 0; h < H; ++h) {
    a[h][0] = _mm256_loadu_ps(acc + h * d + j);
    a[h][1] = _mm256_loadu_ps(acc + h * d + j + 8);
  }
  for (int64_t i = 0; i < cnt; ++i) {
    if (pf) prefetch_ahead<k_wsum_block>(pf->base, pf->off, pf->at + i, pf->cnt, d);
    const auto* r = base + off[i] + j;
    __m256 v0, v1;
    if constexpr (PERM) {
      load16x2<T>::at(r, v0, v1);
    } else {
      v0 = L::at(r), v1 = L::at(r + 8);
    }
    for (int h = 0; h < H; ++h) {
      const __m256 e = _mm256_broadcast_ss(w + h * ldw + i);
      a[h][0] = _mm256_fmadd_ps(e, v0, a[h][0]);
      a[h][1] = _mm256_fmadd_ps(e, v1, a[h][1]);
    }
  }
  for (int h = 0; h < H; ++h) {
    _mm256_storeu_ps(acc + h * d + j, a[h][0]);
    _mm256_storeu_ps(acc + h * d + j + 8, a[h][1]);
  }
}

template <dtype T, int H, bool PERM = false, int32_t D = 0>
VATTN_AVX2 void wsum_heads(const float* w, int64_t ldw, int32_t d,
                           const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                           float* acc, const list_ahead<typename storage<T>::type>* pf) {
  using L = avx2::load8<T>;
  if constexpr (D > 0) d = D;
  const int32_t d16 = d / 16 * 16;
  for (int32_t j = 0; j < d16; j += 16)
    wsum_slice<T, H, PERM, D>(w, ldw, d, j, base, off, cnt, acc, j == 0 ? pf : nullptr);
  if (d16 == 0 && pf)  // no slice issued the prefetches
    for (int64_t i = 0; i < cnt; ++i)
      prefetch_ahead<k_wsum_block>(pf->base, pf->off, pf->at + i, pf->cnt, d);
  for (int64_t i = 0; i < cnt; ++i) {
    const auto* r = base + off[i];
    int32_t j = d16;
    if (j + 8 <= d) {
      const __m256 v = L::at(r + j);
      for (int h = 0; h < H; ++h) {
        float* a = acc + h * d + j;
        _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(w[h * ldw + i]), v, _mm256_loadu_ps(a)));
      }
      j += 8;
    }
    for (; j < d; ++j) {
      const float v = storage<T>::load(r[j]);
      for (int h = 0; h < H; ++h) acc[h * d + j] += w[h * ldw + i] * v;
    }
  }
}

// Blocks of 8 rows (a block and the rows prefetched into L1 ahead of it fit the L1 sets one kv
// head's rows share). For bf16 the accumulators' 16-float groups are kept in load16x2's order
// during the call (each sum is still taken over the rows in list order).
template <dtype T, int32_t D>
VATTN_AVX2 void wsum_blocks(const float* w, int64_t ldw, int32_t G, int32_t d,
                            const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                            float* acc) {
  constexpr int64_t block = k_wsum_block;
  constexpr bool perm = load16x2<T>::permuted;
  using E = typename storage<T>::type;
  if constexpr (D > 0) d = D;
  const int32_t d16 = d / 16 * 16;
  if constexpr (perm)
    for (int32_t g = 0; g < G; ++g) perm16(acc + int64_t(g) * d, d16, false);
  for (int64_t i0 = 0; i0 < cnt; i0 += block) {
    const int64_t n = std::min(block, cnt - i0);
    const list_ahead<E> ahead{base, off, i0, cnt};
    for (int32_t g = 0; g < G; g += 4) {
      const float* wg = w + g * ldw + i0;
      float* ag = acc + int64_t(g) * d;
      const list_ahead<E>* p = g == 0 ? &ahead : nullptr;
      switch (std::min(4, G - g)) {
        case 4:
          wsum_heads<T, 4, perm, D>(wg, ldw, d, base, off + i0, n, ag, p);
          break;
        case 3:
          wsum_heads<T, 3, perm, D>(wg, ldw, d, base, off + i0, n, ag, p);
          break;
        case 2:
          wsum_heads<T, 2, perm, D>(wg, ldw, d, base, off + i0, n, ag, p);
          break;
        default:
          wsum_heads<T, 1, perm, D>(wg, ldw, d, base, off + i0, n, ag, p);
          break;
      }
    }
  }
  if constexpr (perm)
    for (int32_t g = 0; g < G; ++g) perm16(acc + int64_t(g) * d, d16, true);
}

// head_dim 128 (most models) gets a copy with the row length known to the compiler.
template <dtype T>
VATTN_AVX2 void wsum_avx2(const float* w, int64_t ldw, int32_t G, int32_t d,
                          const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                          float* acc) {
  if (d == 128) return wsum_blocks<T, 128>(w, ldw, G, d, base, off, cnt, acc);
  wsum_blocks<T, 0>(w, ldw, G, d, base, off, cnt, acc);
}

// Four row elements at r as doubles.
template <dtype T>
VATTN_AVX2 inline __m256d load4d(const typename storage<T>::type* r) {
  if constexpr (T == dtype::f32) {
    return _mm256_cvtps_pd(_mm_loadu_ps(r));
  } else {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r));
    if constexpr (T == dtype::f16) return _mm256_cvtps_pd(_mm_cvtph_ps(h));
    return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
  }
}

// H heads (1..4) over a block of rows for one 4-double slice of d: the twelve sums stay in
// registers while the block's rows stream past; e holds the block's weights as doubles
// ([H][k_wsum_block]). Each sum takes the rows in order with the operations of the row-by-row
// loop (x = e v; s1 + x; fma(x, x, s2); fma(e, x, s3)), so the results are unchanged.
template <dtype T, int H>
VATTN_AVX2 inline void moments_slice(const double* e, int32_t d, int32_t j,
                                     const typename storage<T>::type* base, const int64_t* off,
                                     int64_t cnt, double* s1, double* s2, double* s3,
                                     const list_ahead<typename storage<T>::type>* pf) {
  __m256d a1[H], a2[H], a3[H];
  for (int h = 0; h < H; ++h) {
    a1[h] = _mm256_loadu_pd(s1 + h * d + j);
    a2[h] = _mm256_loadu_pd(s2 + h * d + j);
    a3[h] = _mm256_loadu_pd(s3 + h * d + j);
  }
  for (int64_t i = 0; i < cnt; ++i) {
    if (pf) prefetch_ahead<k_wsum_block>(pf->base, pf->off, pf->at + i, pf->cnt, d);
    const __m256d v = load4d<T>(base + off[i] + j);
    for (int h = 0; h < H; ++h) {
      const __m256d eh = _mm256_broadcast_sd(e + h * k_wsum_block + i);
      const __m256d x = _mm256_mul_pd(eh, v);
      a1[h] = _mm256_add_pd(a1[h], x);
      a2[h] = _mm256_fmadd_pd(x, x, a2[h]);
      a3[h] = _mm256_fmadd_pd(eh, x, a3[h]);
    }
  }
  for (int h = 0; h < H; ++h) {
    _mm256_storeu_pd(s1 + h * d + j, a1[h]);
    _mm256_storeu_pd(s2 + h * d + j, a2[h]);
    _mm256_storeu_pd(s3 + h * d + j, a3[h]);
  }
}

template <dtype T, int H, int32_t D>
VATTN_AVX2 void moments_heads(const double* e, int32_t d, const typename storage<T>::type* base,
                              const int64_t* off, int64_t cnt, double* s1, double* s2, double* s3,
                              const list_ahead<typename storage<T>::type>* pf) {
  if constexpr (D > 0) d = D;
  const int32_t d4 = d / 4 * 4;
  for (int32_t j = 0; j < d4; j += 4)
    moments_slice<T, H>(e, d, j, base, off, cnt, s1, s2, s3, j == 0 ? pf : nullptr);
  if (d4 == 0 && pf)  // no slice issued the prefetches
    for (int64_t i = 0; i < cnt; ++i)
      prefetch_ahead<k_wsum_block>(pf->base, pf->off, pf->at + i, pf->cnt, d);
  for (int64_t i = 0; i < cnt; ++i) {
    const auto* r = base + off[i];
    for (int32_t j = d4; j < d; ++j) {
      const double v = storage<T>::load(r[j]);
      for (int h = 0; h < H; ++h) {
        const double eh = e[h * k_wsum_block + i], x = eh * v;
        const int64_t o = int64_t(h) * d + j;
        s1[o] += x;
        s2[o] += x * x;
        s3[o] += eh * x;
      }
    }
  }
}

// Blocks of rows as wsum_blocks, up to four heads a pass.
template <dtype T, int32_t D>
VATTN_AVX2 void moments_blocks(const float* w, int64_t ldw, int32_t G, int32_t d,
                               const typename storage<T>::type* base, const int64_t* off,
                               int64_t cnt, double* s1, double* s2, double* s3) {
  using E = typename storage<T>::type;
  constexpr int64_t block = k_wsum_block;
  if constexpr (D > 0) d = D;
  double e[4 * block];
  for (int64_t i0 = 0; i0 < cnt; i0 += block) {
    const int64_t n = std::min(block, cnt - i0);
    const list_ahead<E> ahead{base, off, i0, cnt};
    for (int32_t g = 0; g < G; g += 4) {
      const int32_t H = std::min(4, G - g);
      for (int32_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < n; ++i) e[h * block + i] = double(w[(g + h) * ldw + i0 + i]);
      const int64_t o = int64_t(g) * d;
      const list_ahead<E>* p = g == 0 ? &ahead : nullptr;
      switch (H) {
        case 4:
          moments_heads<T, 4, D>(e, d, base, off + i0, n, s1 + o, s2 + o, s3 + o, p);
          break;
        case 3:
          moments_heads<T, 3, D>(e, d, base, off + i0, n, s1 + o, s2 + o, s3 + o, p);
          break;
        case 2:
          moments_heads<T, 2, D>(e, d, base, off + i0, n, s1 + o, s2 + o, s3 + o, p);
          break;
        default:
          moments_heads<T, 1, D>(e, d, base, off + i0, n, s1 + o, s2 + o, s3 + o, p);
          break;
      }
    }
  }
}

template <dtype T>
VATTN_AVX2 void moments_avx2(const float* w, int64_t ldw, int32_t G, int32_t d,
                             const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                             double* s1, double* s2, double* s3) {
  if (d == 128) return moments_blocks<T, 128>(w, ldw, G, d, base, off, cnt, s1, s2, s3);
  moments_blocks<T, 0>(w, ldw, G, d, base, off, cnt, s1, s2, s3);
}

// Two rows against four heads: eight single-chain accumulators share every q load; the eight
// sums come out of one horizontal-add tree. res[r * 4 + h] = <q_h, row_r>.
template <dtype T>
VATTN_AVX2 inline void dot_rows2_heads4(const float* q, int32_t d,
                                        const typename storage<T>::type* r0,
                                        const typename storage<T>::type* r1, float* res) {
  using L = avx2::load8<T>;
  __m256 a[8];
  for (auto& x : a) x = _mm256_setzero_ps();
  for (int32_t j = 0; j < d; j += 8) {
    const __m256 k0 = L::at(r0 + j), k1 = L::at(r1 + j);
    for (int h = 0; h < 4; ++h) {
      const __m256 qh = avx2::pinned(_mm256_loadu_ps(q + h * d + j));  // one load, two FMAs
      a[h] = _mm256_fmadd_ps(qh, k0, a[h]);
      a[4 + h] = _mm256_fmadd_ps(qh, k1, a[4 + h]);
    }
  }
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  _mm256_storeu_ps(res, _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20),
                                      _mm256_permute2f128_ps(s0, s1, 0x31)));
}

// Dense, token by token: every kv head's row of a token before the next token. Prefetches are
// spread over the work, one kv head's rows of the tokens ahead per head step: a whole token (32
// lines for 8 heads of 128 bf16) issued at once overflows the core's miss buffers, and measured
// 30-40% slower at 128K on the 2-core machine (docs/benchmarks.md, "Dense with spread
// prefetches").
template <dtype T>
VATTN_AVX2 void dense_logits_avx2(const float* q, int32_t H, int32_t G, int32_t d,
                                  const typename storage<T>::type* base, const int64_t* off,
                                  int64_t hs, int64_t cnt, float* out, int64_t ld) {
  int64_t i = 0;
  if (G == 4 && d % 8 == 0) {
    float res[8];
    for (; i + 2 <= cnt; i += 2) {
      const int64_t ahead = std::min(cnt, i + k_dense_ahead + 2);
      for (int32_t h = 0; h < H; ++h) {
        for (int64_t t = i + k_dense_ahead; t < ahead; ++t) prefetch_row(base + off[t] + h * hs, d);
        dot_rows2_heads4<T>(q + int64_t(h) * 4 * d, d, base + off[i] + h * hs,
                            base + off[i + 1] + h * hs, res);
        float* o = out + int64_t(h) * 4 * ld + i;
        for (int x = 0; x < 4; ++x) o[x * ld] = res[x], o[x * ld + 1] = res[4 + x];
      }
    }
  }
  for (; i < cnt; ++i)
    for (int32_t h = 0; h < H; ++h) {
      const int64_t o = off[i] + h * hs;
      logits_avx2<T>(q + int64_t(h) * G * d, G, d, base, &o, 1, out + int64_t(h) * G * ld + i, ld);
    }
}

// Blocks of 8 tokens: each kv head's 8 rows (8 rows at a token stride share no L1 set) feed
// register-blocked sums, after prefetching that head's rows of the next block (spread as in
// dense_logits_avx2).
template <dtype T>
VATTN_AVX2 void dense_wsum_avx2(const float* w, int64_t ldw, int32_t H, int32_t G, int32_t d,
                                const typename storage<T>::type* base, const int64_t* off,
                                int64_t hs, int64_t cnt, float* acc) {
  constexpr int64_t block = 8;
  int64_t oh[block];
  for (int64_t i0 = 0; i0 < cnt; i0 += block) {
    const int64_t n = std::min(block, cnt - i0);
    const int64_t ahead = std::min(cnt, i0 + 2 * block);
    for (int32_t h = 0; h < H; ++h) {
      for (int64_t i = i0 + block; i < ahead; ++i) prefetch_row(base + off[i] + h * hs, d);
      for (int64_t i = 0; i < n; ++i) oh[i] = off[i0 + i] + h * hs;
      for (int32_t g = 0; g < G; g += 4) {
        const float* wg = w + int64_t(h * G + g) * ldw + i0;
        float* ag = acc + int64_t(h * G + g) * d;
        switch (std::min(4, G - g)) {
          case 4:
            wsum_heads<T, 4>(wg, ldw, d, base, oh, n, ag, nullptr);
            break;
          case 3:
            wsum_heads<T, 3>(wg, ldw, d, base, oh, n, ag, nullptr);
            break;
          case 2:
            wsum_heads<T, 2>(wg, ldw, d, base, oh, n, ag, nullptr);
            break;
          default:
            wsum_heads<T, 1>(wg, ldw, d, base, oh, n, ag, nullptr);
            break;
        }
      }
    }
  }
}

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (two-part ln 2),
// exp(r) by its Taylor polynomial of degree 7 (truncation below 6e-9 relative).
VATTN_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  // max/min return their second operand for NaN: x last keeps a NaN argument NaN.
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(lo, x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Vector maxima, and x * 0 summed (0 unless some x is NaN or infinite); then exp8(x - m) with
// its sum in two double accumulators. The tail runs through one padded vector (-inf pads leave
// the max alone and give exp 0; the finiteness sum masks them by lane).
VATTN_AVX2 bool shift_exp_sum_avx2(float* x, int64_t n, float* m, double* sum) {
  const int64_t n8 = n / 8 * 8;
  __m256 mx = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    mx = _mm256_max_ps(mx, v);
    bad = _mm256_add_ps(bad, _mm256_mul_ps(v, zero));
  }
  float tail[8];
  for (int64_t j = 0; j < 8; ++j) tail[j] = n8 + j < n ? x[n8 + j] : -INFINITY;
  {
    const __m256 v = _mm256_loadu_ps(tail);
    mx = _mm256_max_ps(mx, v);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 real =
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(n - n8)), lane));
    bad = _mm256_add_ps(bad, _mm256_and_ps(real, _mm256_mul_ps(v, zero)));
  }
  float b[8], mm[8];
  _mm256_storeu_ps(b, bad);
  _mm256_storeu_ps(mm, mx);
  float mxs = mm[0];
  bool finite = true;
  for (int j = 0; j < 8; ++j) finite = finite && b[j] == 0.0f, mxs = std::max(mxs, mm[j]);
  if (!finite) return false;
  const __m256 ms = _mm256_set1_ps(mxs);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  auto step = [&](float* p) VATTN_AVX2 {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), ms));
    _mm256_storeu_ps(p, e);
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  };
  for (int64_t i = 0; i < n8; i += 8) step(x + i);
  if (n8 < n) {
    step(tail);
    for (int64_t j = n8; j < n; ++j) x[j] = tail[j - n8];
  }
  double sd[4];
  _mm256_storeu_pd(sd, _mm256_add_pd(s0, s1));
  *m = mxs, *sum = (sd[0] + sd[1]) + (sd[2] + sd[3]);
  return true;
}

VATTN_AVX2 void exp_avx2(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
  if (i < n) {
    float tmp[8] = {-100, -100, -100, -100, -100, -100, -100, -100};
    for (int64_t j = i; j < n; ++j) tmp[j - i] = x[j];
    _mm256_storeu_ps(tmp, exp8(_mm256_loadu_ps(tmp)));
    for (int64_t j = i; j < n; ++j) x[j] = tmp[j - i];
  }
}
#endif

template <dtype T>
struct tables {
  static constexpr gqa_ops<T> scalar{logits_scalar<T>, wsum_scalar<T>, moments_scalar<T>};
#if VATTN_X86
  static constexpr gqa_ops<T> avx2{logits_avx2<T>, wsum_avx2<T>, moments_avx2<T>};
#endif
};

template <dtype T>
struct dense_tables {
  static constexpr dense_ops<T> scalar{dense_logits_scalar<T>, dense_wsum_scalar<T>};
#if VATTN_X86
  static constexpr dense_ops<T> avx2{dense_logits_avx2<T>, dense_wsum_avx2<T>};
#endif
};

}  // namespace

// AVX-512 CPUs run the AVX2 dense loops: they are bound by memory, not by vector width.
template <dtype T>
const dense_ops<T>& dense_ops_for(simd_level l) {
#if VATTN_X86
  if (l >= simd_level::avx2) return dense_tables<T>::avx2;
#endif
  (void)l;
  return dense_tables<T>::scalar;
}
template const dense_ops<dtype::f32>& dense_ops_for<dtype::f32>(simd_level);
template const dense_ops<dtype::f16>& dense_ops_for<dtype::f16>(simd_level);
template const dense_ops<dtype::bf16>& dense_ops_for<dtype::bf16>(simd_level);

template <dtype T>
const gqa_ops<T>& gqa_ops_for(simd_level l) {
#if VATTN_X86
  if (l == simd_level::avx2) return tables<T>::avx2;
  if (l == simd_level::avx512) return avx512::gqa_ops_table<T>();
#endif
  (void)l;
  return tables<T>::scalar;
}
template const gqa_ops<dtype::f32>& gqa_ops_for<dtype::f32>(simd_level);
template const gqa_ops<dtype::f16>& gqa_ops_for<dtype::f16>(simd_level);
template const gqa_ops<dtype::bf16>& gqa_ops_for<dtype::bf16>(simd_level);

bool shift_exp_sum(simd_level l, float* x, int64_t n, float* m, double* sum) {
#if VATTN_X86
  if (l >= simd_level::avx2) return shift_exp_sum_avx2(x, n, m, sum);
#endif
  (void)l;
  return shift_exp_sum_scalar(x, n, m, sum);
}

void exp_inplace(simd_level l, float* x, int64_t n) {
#if VATTN_X86
  if (l == simd_level::avx2) return exp_avx2(x, n);
  if (l == simd_level::avx512) return avx512::exp_inplace(x, n);
#endif
  (void)l;
  exp_scalar(x, n);
}

}  // namespace vattn::detail
