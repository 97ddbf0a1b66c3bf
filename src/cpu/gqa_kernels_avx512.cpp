// gqa_kernels_avx512.cpp: AVX-512 versions of the row-list kernels (gqa_kernels.hpp). Same
// algorithms and summation order as the AVX2 ones with 16 lanes; row tails use masked loads
// and stores. Compiled for that target alone (function attributes): gqa_kernels.cpp calls
// them only on CPUs with AVX-512 F, BW, VL and DQ.
#include "cpu/gqa_kernels_avx512.hpp"

#include "cpu/avx512_util.hpp"

#if defined(__x86_64__) || defined(__i386__)
VATTN_AVX512_CODE_BEGIN

namespace vattn::detail::avx512 {

namespace {

constexpr int64_t k_prefetch = 8;  // rows ahead

template <typename E>
VATTN_AVX512 inline void prefetch_row(const E* r, int32_t d) {
  const char* p = reinterpret_cast<const char*>(r);
  const int64_t bytes = int64_t(d) * int64_t(sizeof(E));
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
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

template <dtype T>
VATTN_AVX512 void logits(const float* q, int32_t G, int32_t d,
                         const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                         float* out, int64_t ld) {
  float res[4];
  for (int64_t i = 0; i < cnt; ++i) {
    if (i + k_prefetch < cnt) prefetch_row(base + off[i + k_prefetch], d);
    const auto* r = base + off[i];
    int32_t g = 0;
    for (; g + 4 <= G; g += 4) {
      dot_heads<T, 4>(q + int64_t(g) * d, d, r, res);
      for (int h = 0; h < 4; ++h) out[(g + h) * ld + i] = res[h];
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
    for (int h = 0; g + h < G; ++h) out[(g + h) * ld + i] = res[h];
  }
}

template <dtype T>
VATTN_AVX512 void wsum(const float* w, int64_t ldw, int32_t G, int32_t d,
                       const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                       float* acc) {
  using L = load16<T>;
  const int32_t d16 = d / 16 * 16;
  const __mmask16 mt = first_lanes(d - d16);
  for (int64_t i = 0; i < cnt; ++i) {
    if (i + k_prefetch < cnt) prefetch_row(base + off[i + k_prefetch], d);
    const auto* r = base + off[i];
    for (int32_t j = 0; j < d16; j += 16) {
      const __m512 v = L::at(r + j);
      for (int32_t g = 0; g < G; ++g) {
        float* a = acc + int64_t(g) * d + j;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(w[g * ldw + i]), v, _mm512_loadu_ps(a)));
      }
    }
    if (mt != 0) {
      const __m512 v = L::masked(r + d16, mt);
      for (int32_t g = 0; g < G; ++g) {
        float* a = acc + int64_t(g) * d + d16;
        const __m512 s = _mm512_maskz_loadu_ps(mt, a);
        _mm512_mask_storeu_ps(a, mt, _mm512_fmadd_ps(_mm512_set1_ps(w[g * ldw + i]), v, s));
      }
    }
  }
}

// s1 += x, s2 += x^2, s3 += e x on the lanes of m (8 doubles at s + o).
VATTN_AVX512 inline void moments8(__m512d e, __m512d v, __mmask8 m, int64_t o, double* s1,
                                  double* s2, double* s3) {
  const __m512d x = _mm512_mul_pd(e, v);
  if (m == 0xff) {
    _mm512_storeu_pd(s1 + o, _mm512_add_pd(_mm512_loadu_pd(s1 + o), x));
    _mm512_storeu_pd(s2 + o, _mm512_fmadd_pd(x, x, _mm512_loadu_pd(s2 + o)));
    _mm512_storeu_pd(s3 + o, _mm512_fmadd_pd(e, x, _mm512_loadu_pd(s3 + o)));
  } else {
    _mm512_mask_storeu_pd(s1 + o, m, _mm512_add_pd(_mm512_maskz_loadu_pd(m, s1 + o), x));
    _mm512_mask_storeu_pd(s2 + o, m, _mm512_fmadd_pd(x, x, _mm512_maskz_loadu_pd(m, s2 + o)));
    _mm512_mask_storeu_pd(s3 + o, m, _mm512_fmadd_pd(e, x, _mm512_maskz_loadu_pd(m, s3 + o)));
  }
}

template <dtype T>
VATTN_AVX512 void moments(const float* w, int64_t ldw, int32_t G, int32_t d,
                          const typename storage<T>::type* base, const int64_t* off, int64_t cnt,
                          double* s1, double* s2, double* s3) {
  using L = load16<T>;
  const int32_t d16 = d / 16 * 16;
  const __mmask16 mt = first_lanes(d - d16);
  const __mmask8 mlo = __mmask8(mt & 0xffu), mhi = __mmask8(mt >> 8);
  for (int64_t i = 0; i < cnt; ++i) {
    if (i + k_prefetch < cnt) prefetch_row(base + off[i + k_prefetch], d);
    const auto* r = base + off[i];
    for (int32_t j = 0; j < d16; j += 16) {
      const __m512 v = L::at(r + j);
      const __m512d vl = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d vh = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
      for (int32_t g = 0; g < G; ++g) {
        const __m512d e = _mm512_set1_pd(double(w[g * ldw + i]));
        const int64_t o = int64_t(g) * d + j;
        moments8(e, vl, 0xff, o, s1, s2, s3);
        moments8(e, vh, 0xff, o + 8, s1, s2, s3);
      }
    }
    if (mt != 0) {
      const __m512 v = L::masked(r + d16, mt);
      const __m512d vl = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d vh = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
      for (int32_t g = 0; g < G; ++g) {
        const __m512d e = _mm512_set1_pd(double(w[g * ldw + i]));
        const int64_t o = int64_t(g) * d + d16;
        moments8(e, vl, mlo, o, s1, s2, s3);
        if (mhi != 0) moments8(e, vh, mhi, o + 8, s1, s2, s3);
      }
    }
  }
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
