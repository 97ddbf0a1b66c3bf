// predictor_index.cpp: the index of the approximate top-k predictors (page min/max bounds,
// sign-bit signatures), built incrementally from the KV cache, and the kernels that score it.
#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "core/budget.hpp"
#include "core/dtype.hpp"
#include "core/kv_access.hpp"
#include "core/sampler.hpp"
#include "core/validate.hpp"
#include "cpu/avx2_util.hpp"
#include "cpu/avx512_util.hpp"
#include "cpu/predictors.hpp"
#include "cpu/simd.hpp"
#include "vattn/safetensors.hpp"

#if VATTN_HAVE_OPENMP
#include <omp.h>
#endif
#if VATTN_X86
#define VATTN_POPCNT __attribute__((target("popcnt")))
#endif

namespace vattn {

using namespace vattn::detail;

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw error(msg);
}
std::string str(int64_t x) {
  return std::to_string(x);
}

using impl = predictor_index::impl;

impl& checked(impl* ix) {
  if (!ix) fail("predictor_index: the object was moved from");
  return *ix;
}

constexpr int32_t k_max_head_dim = 4096;     // validate_plan_params' limit
constexpr int64_t k_chunk_tokens = 1024;     // tokens of one slot per parallel unit
constexpr double k_parallel_work = 1 << 20;  // estimated element operations worth threads

int64_t bounds_offset(const impl& ix, int32_t slot, int32_t kvh, int64_t page) {
  return ((int64_t(slot) * ix.p.n_head_kv + kvh) * ix.pages_max + page) * ix.p.head_dim *
         int64_t(dtype_size(ix.p.kv_type));
}
int64_t sig_offset(const impl& ix, int32_t slot, int32_t kvh, int64_t t) {
  return ((int64_t(slot) * ix.p.n_head_kv + kvh) * ix.p.n_tokens_max + t) * ix.words;
}

// Gaussian projections from the seed: splitmix64 stream -> uniform in (0, 1) -> inverse normal
// CDF. Integer hashing and one quantile function, so every platform draws the same values.
void draw_projections(impl& ix) {
  const uint64_t key = mix64(ix.cfg.seed ^ 0x7369676e70726f6aull);
  for (size_t i = 0; i < ix.proj.size(); ++i) {
    const uint64_t z = mix64(key + uint64_t(i) * 0x9e3779b97f4a7c15ull);
    const double u = (double(z >> 11) + 0.5) * 0x1p-53;
    ix.proj[i] = float(normal_quantile(u));
  }
}

// Replaces the projections; `what` names the source in error messages.
void assign_projections(impl& ix, const float* w, size_t count, const std::string& what) {
  if (ix.cfg.pred != predictor::sign_bits)
    fail(what + ": projections apply to predictor=signs only, this index is predictor=" +
         predictor_name(ix.cfg.pred));
  const size_t want = ix.proj.size();
  if (count != want)
    fail(what + ": count is " + std::to_string(count) + ", expected n_head_kv * pred_bits * " +
         "head_dim = " + std::to_string(want));
  if (!w) fail(what + ": w is null");
  for (size_t i = 0; i < count; ++i)
    if (!std::isfinite(w[i]))
      fail(what + ": w[" + std::to_string(i) + "] is NaN/Inf (kv head " +
           str(int64_t(i) / (int64_t(ix.cfg.pred_bits) * ix.p.head_dim)) + ", bit " +
           str(int64_t(i) / ix.p.head_dim % ix.cfg.pred_bits) + ")");
  std::copy(w, w + count, ix.proj.begin());
  std::fill(ix.count.begin(), ix.count.end(), 0);
}

// --- Building -------------------------------------------------------------------------------

// A stored value as a signed integer in the order of the float it encodes (-0 just below +0).
// The map is its own inverse, so page min and max are integer min and max that vectorise.
inline int32_t order_key(float x) {
  const int32_t s = std::bit_cast<int32_t>(x);
  return s ^ ((s >> 31) & 0x7fffffff);
}
inline float from_key(int32_t k) {
  return std::bit_cast<float>(k ^ ((k >> 31) & 0x7fffffff));
}
inline int16_t order_key(uint16_t x) {
  const int16_t s = int16_t(x);
  return int16_t(s ^ ((s >> 15) & 0x7fff));
}
inline uint16_t from_key(int16_t k) {
  return uint16_t(order_key(uint16_t(k)));
}

// 1 when a stored value is NaN or Inf (exponent bits all set).
template <dtype T>
inline uint32_t non_finite(typename storage<T>::type x) {
  if constexpr (T == dtype::f32)
    return (std::bit_cast<uint32_t>(x) & 0x7f800000u) == 0x7f800000u;
  else if constexpr (T == dtype::f16)
    return (x & 0x7c00u) == 0x7c00u;
  else
    return (x & 0x7f80u) == 0x7f80u;
}

// Folds key row k into a page's bounds (`first`: the page's first token sets them). False on a
// non-finite element.
template <dtype T>
bool merge_bounds(const typename storage<T>::type* k, typename storage<T>::type* lo,
                  typename storage<T>::type* hi, int32_t d, bool first) {
  uint32_t bad = 0;
  if (first) {
    for (int32_t j = 0; j < d; ++j) {
      bad |= non_finite<T>(k[j]);
      lo[j] = hi[j] = k[j];
    }
  } else {
    for (int32_t j = 0; j < d; ++j) {
      const auto kx = order_key(k[j]);
      bad |= non_finite<T>(k[j]);
      lo[j] = from_key(std::min(kx, order_key(lo[j])));
      hi[j] = from_key(std::max(kx, order_key(hi[j])));
    }
  }
  return bad == 0;
}

// A key that update rejects.
struct bad_key {
  int64_t t = -1;
  int32_t h = -1;
};

// Tokens [t0, t1) of slot s, every kv head of a token before the next token (K rows are read in
// memory order); the first token may continue a page. Stops at the first non-finite key.
template <dtype T>
bad_key build_unit(impl& ix, const kv_cache& kv, int64_t row0, int32_t s, int64_t t0, int64_t t1) {
  using E = typename storage<T>::type;
  const E* k = static_cast<const E*>(kv.k);
  const int32_t d = ix.p.head_dim, H = ix.p.n_head_kv;
  if (ix.cfg.pred == predictor::page_bounds) {
    const int64_t P = ix.cfg.pred_page, head_stride = ix.pages_max * d;
    E* lo = reinterpret_cast<E*>(ix.lo.data() + bounds_offset(ix, s, 0, 0));
    E* hi = reinterpret_cast<E*>(ix.hi.data() + bounds_offset(ix, s, 0, 0));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t at = t / P * d;
      for (int32_t h = 0; h < H; ++h) {
        const E* row = k + row_offset(kv, row0, s, t, h);
        if (!merge_bounds<T>(row, lo + h * head_stride + at, hi + h * head_stride + at, d,
                             t % P == 0))
          return {t, h};
      }
    }
    return {};
  }
  // sign_bits: the key is widened to f32 once (exactly) and dotted with every projection row;
  // the f32 row kernel gives the same value as the f16/bf16 one on the stored key.
  const row_ops& ops = active_row_ops();
  const int32_t R = ix.cfg.pred_bits;
  float kf[k_max_head_dim];
  for (int64_t t = t0; t < t1; ++t) {
    for (int32_t h = 0; h < H; ++h) {
      const E* row = k + row_offset(kv, row0, s, t, h);
      uint32_t bad = 0;
      for (int32_t j = 0; j < d; ++j) {
        bad |= non_finite<T>(row[j]);
        kf[j] = storage<T>::load(row[j]);
      }
      if (bad) return {t, h};
      const float* w = ix.proj.data() + int64_t(h) * R * d;
      const float* bias = ix.bias.data() + (int64_t(s) * H + h) * R;
      uint32_t* sig = ix.sig.data() + sig_offset(ix, s, h, t);
      for (int32_t i = 0; i < ix.words; ++i) {
        uint32_t word = 0;
        for (int32_t b = 0; b < 32; ++b)
          word |= uint32_t(ops.dot_f32(w + int64_t(32 * i + b) * d, kf, d) >= bias[32 * i + b])
                  << b;
        sig[i] = word;
      }
    }
  }
  return {};
}

// First row of sequence s in the contiguous layout (0 when paged).
int64_t seq_row0(const kv_cache& kv, int32_t s) {
  if (kv.layout != kv_layout::contiguous) return 0;
  if (kv.seq_start) return kv.seq_start[s];
  int64_t r = 0;
  for (int32_t i = 0; i < s; ++i) r += kv.seq_len[i];
  return r;
}

// Whether an update rebuilds slot s: it got shorter (a new sequence), or its sign-bit keys get
// centred now.
bool rebuilds(const impl& ix, const kv_cache& kv, int32_t s) {
  const int64_t had = ix.count[s], n = kv.seq_len[s];
  if (had > n) return true;
  return ix.cfg.pred == predictor::sign_bits && had < k_center_tokens && n >= k_center_tokens;
}

// The first token an update appends to slot s (0 when the slot is rebuilt).
int64_t first_new(const impl& ix, const kv_cache& kv, int32_t s) {
  return rebuilds(ix, kv, s) ? 0 : ix.count[s];
}

// Sign bits: the per-bit thresholds w_r . mu of a slot being rebuilt, mu the mean of its first
// k_center_tokens keys per kv head (0 while the slot is shorter).
template <dtype T>
void center_slot(impl& ix, const kv_cache& kv, int32_t s) {
  using E = typename storage<T>::type;
  const int32_t d = ix.p.head_dim, H = ix.p.n_head_kv, R = ix.cfg.pred_bits;
  float* bias = ix.bias.data() + int64_t(s) * H * R;
  if (kv.seq_len[s] < k_center_tokens) {
    std::fill(bias, bias + int64_t(H) * R, 0.0f);
    return;
  }
  const E* k = static_cast<const E*>(kv.k);
  const int64_t row0 = seq_row0(kv, s);
  std::vector<double> sum(static_cast<size_t>(d), 0.0);
  float mu[k_max_head_dim];
  for (int32_t h = 0; h < H; ++h) {
    std::fill(sum.begin(), sum.end(), 0.0);
    for (int64_t t = 0; t < k_center_tokens; ++t) {
      const E* row = k + row_offset(kv, row0, s, t, h);
      for (int32_t j = 0; j < d; ++j) sum[j] += double(storage<T>::load(row[j]));
    }
    for (int32_t j = 0; j < d; ++j) mu[j] = float(sum[j] / double(k_center_tokens));
    const float* w = ix.proj.data() + int64_t(h) * R * d;
    for (int32_t r = 0; r < R; ++r)
      bias[h * R + r] = active_row_ops().dot_f32(w + int64_t(r) * d, mu, d);
  }
}

template <dtype T>
void update_typed(impl& ix, const kv_cache& kv) {
  const int32_t H = ix.p.n_head_kv;
  // Units are (slot, chunk of tokens); chunk boundaries are multiples of a whole number of pages,
  // so no two units touch one page and every value is computed as in a serial pass.
  const int64_t P = ix.cfg.pred == predictor::page_bounds ? ix.cfg.pred_page : 1;
  const int64_t chunk = P * std::max<int64_t>(1, (k_chunk_tokens + P - 1) / P);
  int64_t n_chunks = 0, work = 0;
  for (int32_t s = 0; s < kv.n_seq; ++s) {
    const int64_t t0 = first_new(ix, kv, s), base = t0 / chunk * chunk;
    n_chunks = std::max(n_chunks, (kv.seq_len[s] - base + chunk - 1) / chunk);
    work += kv.seq_len[s] - t0;
  }
  const int64_t n_units = int64_t(kv.n_seq) * n_chunks;
  if (ix.cfg.pred == predictor::sign_bits)
    for (int32_t s = 0; s < kv.n_seq; ++s)
      if (rebuilds(ix, kv, s) || ix.count[s] == 0) center_slot<T>(ix, kv, s);
  const double per_token =
      double(ix.p.head_dim) * H * (ix.cfg.pred == predictor::sign_bits ? ix.cfg.pred_bits : 1);

  // The first bad key in (seq, token, kv head) order, whatever the thread count.
  std::mutex bad_mu;
  int64_t bad_s = -1, bad_t = -1, bad_h = -1;
  auto body = [&](int64_t u) {
    const int32_t s = int32_t(u / n_chunks);
    const int64_t c = u % n_chunks;
    const int64_t start = first_new(ix, kv, s), base = start / chunk * chunk;
    const int64_t t0 = std::max(start, base + c * chunk);
    const int64_t t1 = std::min<int64_t>(kv.seq_len[s], base + (c + 1) * chunk);
    if (t0 >= t1) return;
    const bad_key b = build_unit<T>(ix, kv, seq_row0(kv, s), s, t0, t1);
    if (b.t < 0) return;
    std::lock_guard<std::mutex> lock(bad_mu);
    if (bad_s < 0 || s < bad_s || (s == bad_s && b.t < bad_t)) bad_s = s, bad_t = b.t, bad_h = b.h;
  };
#if VATTN_HAVE_OPENMP
  const int32_t n_threads = ix.p.n_threads;
  if (n_threads > 1 && n_units > 1 && double(work) * per_token >= k_parallel_work) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (int64_t u = 0; u < n_units; ++u) body(u);
  } else {
    for (int64_t u = 0; u < n_units; ++u) body(u);
  }
#else
  (void)work, (void)per_token;
  for (int64_t u = 0; u < n_units; ++u) body(u);
#endif
  if (bad_s >= 0) {
    // Some slots were partly rewritten: empty all of them so the next update rebuilds them.
    for (int32_t s = 0; s < kv.n_seq; ++s) ix.count[s] = 0;
    fail("kv.k holds NaN/Inf at seq " + str(bad_s) + ", token " + str(bad_t) + ", kv head " +
         str(bad_h) + " (the index of every sequence of this update was emptied)");
  }
  for (int32_t s = 0; s < kv.n_seq; ++s) ix.count[s] = kv.seq_len[s];
}

// --- Scoring ---------------------------------------------------------------------------------

template <dtype T>
void bounds_scalar(const uint8_t* lo_bytes, const uint8_t* hi_bytes, const float* q, int64_t n,
                   int32_t d, float* out) {
  using E = typename storage<T>::type;
  const E* lo = reinterpret_cast<const E*>(lo_bytes);
  const E* hi = reinterpret_cast<const E*>(hi_bytes);
  for (int64_t p = 0; p < n; ++p, lo += d, hi += d) {
    float a0 = 0, a1 = 0;
    int32_t j = 0;
    for (; j + 2 <= d; j += 2) {
      a0 += std::max(q[j] * storage<T>::load(lo[j]), q[j] * storage<T>::load(hi[j]));
      a1 +=
          std::max(q[j + 1] * storage<T>::load(lo[j + 1]), q[j + 1] * storage<T>::load(hi[j + 1]));
    }
    if (j < d) a0 += std::max(q[j] * storage<T>::load(lo[j]), q[j] * storage<T>::load(hi[j]));
    out[p] = a0 + a1;
  }
}

#if VATTN_X86
template <dtype T>
VATTN_AVX2 void bounds_avx2(const uint8_t* lo_bytes, const uint8_t* hi_bytes, const float* q,
                            int64_t n, int32_t d, float* out) {
  using E = typename storage<T>::type;
  const E* lo = reinterpret_cast<const E*>(lo_bytes);
  const E* hi = reinterpret_cast<const E*>(hi_bytes);
  for (int64_t p = 0; p < n; ++p, lo += d, hi += d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int32_t j = 0;
    for (; j + 16 <= d; j += 16) {
      const __m256 q0 = _mm256_loadu_ps(q + j), q1 = _mm256_loadu_ps(q + j + 8);
      a0 = _mm256_add_ps(a0, _mm256_max_ps(_mm256_mul_ps(q0, avx2::load8<T>::at(lo + j)),
                                           _mm256_mul_ps(q0, avx2::load8<T>::at(hi + j))));
      a1 = _mm256_add_ps(a1, _mm256_max_ps(_mm256_mul_ps(q1, avx2::load8<T>::at(lo + j + 8)),
                                           _mm256_mul_ps(q1, avx2::load8<T>::at(hi + j + 8))));
    }
    if (j + 8 <= d) {
      const __m256 q0 = _mm256_loadu_ps(q + j);
      a0 = _mm256_add_ps(a0, _mm256_max_ps(_mm256_mul_ps(q0, avx2::load8<T>::at(lo + j)),
                                           _mm256_mul_ps(q0, avx2::load8<T>::at(hi + j))));
      j += 8;
    }
    float tail = 0;
    for (; j < d; ++j)
      tail += std::max(q[j] * storage<T>::load(lo[j]), q[j] * storage<T>::load(hi[j]));
    out[p] = avx2::hsum(_mm256_add_ps(a0, a1)) + tail;
  }
}
#endif

// Matches of W-word signatures: pred_bits minus the popcount of the XOR; pairs of words are
// counted as one 64-bit value.
template <int W>
inline void matches_w(const uint32_t* qsig, const uint32_t* ks, int64_t n, int32_t bits,
                      uint16_t* out) {
  uint64_t q[(W + 1) / 2];
  for (int i = 0; i < W / 2; ++i) q[i] = uint64_t(qsig[2 * i]) | uint64_t(qsig[2 * i + 1]) << 32;
  if constexpr (W % 2 == 1) q[W / 2] = qsig[W - 1];
  for (int64_t t = 0; t < n; ++t, ks += W) {
    int c = 0;
    for (int i = 0; i < W / 2; ++i) {
      uint64_t k;
      std::memcpy(&k, ks + 2 * i, 8);
      c += std::popcount(q[i] ^ k);
    }
    if constexpr (W % 2 == 1) c += std::popcount(uint32_t(q[W / 2]) ^ ks[W - 1]);
    out[t] = uint16_t(bits - c);
  }
}

template <int W>
void matches_portable(const uint32_t* qsig, const uint32_t* ks, int64_t n, int32_t bits,
                      uint16_t* out) {
  matches_w<W>(qsig, ks, n, bits, out);
}
#if VATTN_X86
template <int W>
VATTN_POPCNT void matches_popcnt(const uint32_t* qsig, const uint32_t* ks, int64_t n, int32_t bits,
                                 uint16_t* out) {
  matches_w<W>(qsig, ks, n, bits, out);
}

VATTN_AVX512_CODE_BEGIN
// Eight tokens a step with AVX-512 vector popcounts (W = 2, 4 or 8 words): the XOR of each token's
// signature with the query's, a popcount per 64-bit word, the words of a token summed by folding
// pairs of vectors (even words + odd words), pred_bits minus the count narrowed to 16 bits. The
// counts are exact integers: the scores equal matches_w's.
#define VATTN_VPOPCNT \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,popcnt")))
// The popcounts of the 8 words at `at` XOR q.
VATTN_VPOPCNT inline __m512i count_words(const uint32_t* at, __m512i q) {
  return _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(at), q));
}
VATTN_VPOPCNT inline __m512i fold_words(__m512i a, __m512i b) {
  const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
  return _mm512_add_epi64(_mm512_permutex2var_epi64(a, even, b),
                          _mm512_permutex2var_epi64(a, odd, b));
}
template <int W>
VATTN_VPOPCNT void matches_vpopcnt(const uint32_t* qsig, const uint32_t* ks, int64_t n,
                                   int32_t bits, uint16_t* out) {
  static_assert(W == 2 || W == 4 || W == 8, "vector popcounts: 2, 4 or 8 words");
  __m512i q;  // the query's words repeated across the vector, one copy per token slot
  if constexpr (W == 2) q = _mm512_set1_epi64(int64_t(uint64_t(qsig[0]) | uint64_t(qsig[1]) << 32));
  if constexpr (W == 4)
    q = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qsig)));
  if constexpr (W == 8)
    q = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qsig)));
  const __m512i b = _mm512_set1_epi64(bits);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8, ks += 8 * W) {
    __m512i c;
    if constexpr (W == 2) c = count_words(ks, q);
    if constexpr (W == 4) c = fold_words(count_words(ks, q), count_words(ks + 16, q));
    if constexpr (W == 8)
      c = fold_words(fold_words(count_words(ks, q), count_words(ks + 16, q)),
                     fold_words(count_words(ks + 32, q), count_words(ks + 48, q)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + t),
                     _mm512_cvtepi64_epi16(_mm512_sub_epi64(b, c)));
  }
  if (t < n) matches_w<W>(qsig, ks, n - t, bits, out + t);
}
VATTN_AVX512_CODE_END
#endif

using matches_fn = void (*)(const uint32_t*, const uint32_t*, int64_t, int32_t, uint16_t*);

template <int W>
matches_fn pick_matches() {
#if VATTN_X86
  if constexpr (W == 2 || W == 4 || W == 8)
    if (active_simd_level() >= simd_level::avx512 && cpu_has_avx512vpopcntdq())
      return matches_vpopcnt<W>;
  // every CPU with AVX2 has POPCNT; VATTN_SIMD=scalar exercises the portable count
  if (active_simd_level() >= simd_level::avx2) return matches_popcnt<W>;
#endif
  return matches_portable<W>;
}

matches_fn matches_for(int32_t words) {
  switch (words) {
    case 1:
      return pick_matches<1>();
    case 2:
      return pick_matches<2>();
    case 3:
      return pick_matches<3>();
    case 4:
      return pick_matches<4>();
    case 5:
      return pick_matches<5>();
    case 6:
      return pick_matches<6>();
    case 7:
      return pick_matches<7>();
    case 8:
      return pick_matches<8>();
    default:
      fail("sign_matches: signatures of " + str(words) + " words are not supported (1 to 8)");
  }
}

}  // namespace

// --- impl --------------------------------------------------------------------------------------

const uint8_t* predictor_index::impl::lo_row(int32_t slot, int32_t kvh, int64_t page) const {
  return lo.data() + bounds_offset(*this, slot, kvh, page);
}
const uint8_t* predictor_index::impl::hi_row(int32_t slot, int32_t kvh, int64_t page) const {
  return hi.data() + bounds_offset(*this, slot, kvh, page);
}
const uint32_t* predictor_index::impl::sig_row(int32_t slot, int32_t kvh, int64_t t) const {
  return sig.data() + sig_offset(*this, slot, kvh, t);
}

// --- predictor_index -------------------------------------------------------------------------

predictor_index::predictor_index(const config& cfg, const plan_params& params) {
  cfg.validate();
  if (cfg.pred != predictor::page_bounds && cfg.pred != predictor::sign_bits)
    fail(std::string("cfg.pred is ") + predictor_name(cfg.pred) +
         ": a predictor_index needs predictor=pages or predictor=signs");
  validate_plan_params(params);
  auto ix = std::make_unique<impl>();
  ix->cfg = cfg;
  ix->p = params;
  if (ix->p.n_threads == 0) ix->p.n_threads = hardware_threads();
  const plan_params& p = ix->p;
  const int64_t heads = int64_t(p.n_seq_max) * p.n_head_kv;
  ix->pages_max = (p.n_tokens_max + cfg.pred_page - 1) / cfg.pred_page;
  ix->words = cfg.pred_bits / 32;
  const double bytes =
      cfg.pred == predictor::page_bounds
          ? 2.0 * double(heads) * double(ix->pages_max) * p.head_dim * double(dtype_size(p.kv_type))
          : double(heads) * double(p.n_tokens_max) * ix->words * 4.0;
  if (bytes > double(int64_t(1) << 46))
    fail("plan_params: a predictor index for n_seq_max " + str(p.n_seq_max) + " x n_head_kv " +
         str(p.n_head_kv) + " x n_tokens_max " + str(p.n_tokens_max) + " exceeds 64 TiB");
  ix->count.assign(size_t(p.n_seq_max), 0);
  if (cfg.pred == predictor::page_bounds) {
    const size_t n =
        size_t(heads) * size_t(ix->pages_max) * size_t(p.head_dim) * dtype_size(p.kv_type);
    ix->lo.assign(n, 0);
    ix->hi.assign(n, 0);
  } else {
    ix->sig.assign(size_t(heads) * size_t(p.n_tokens_max) * size_t(ix->words), 0);
    ix->proj.resize(size_t(p.n_head_kv) * size_t(cfg.pred_bits) * size_t(p.head_dim));
    ix->bias.assign(size_t(heads) * size_t(cfg.pred_bits), 0.0f);
    draw_projections(*ix);
  }
  impl_ = ix.release();
}

predictor_index::predictor_index(predictor_index&& o) noexcept : impl_(o.impl_) {
  o.impl_ = nullptr;
}
predictor_index& predictor_index::operator=(predictor_index&& o) noexcept {
  if (this != &o) {
    delete impl_;
    impl_ = o.impl_;
    o.impl_ = nullptr;
  }
  return *this;
}
predictor_index::~predictor_index() {
  delete impl_;
}

void predictor_index::set_projections(const float* w, size_t count) {
  assign_projections(checked(impl_), w, count, "predictor_index::set_projections");
}

void predictor_index::load_projections(const std::string& path) {
  impl& ix = checked(impl_);
  const std::string what = "predictor_index::load_projections(" + path + ")";
  if (ix.cfg.pred != predictor::sign_bits)
    fail(what + ": projections apply to predictor=signs only, this index is predictor=" +
         predictor_name(ix.cfg.pred));
  const io::safetensors f = io::safetensors::load(path);
  const io::tensor_view* t = f.find("sign_projections");
  if (!t) fail(what + ": the file has no tensor 'sign_projections'");
  const std::vector<int64_t> want = {ix.p.n_head_kv, ix.cfg.pred_bits, ix.p.head_dim};
  if (t->shape != want) {
    std::string got;
    for (int64_t x : t->shape) got += (got.empty() ? "" : ", ") + str(x);
    fail(what + ": 'sign_projections' has shape [" + got + "], expected [n_head_kv, pred_bits, " +
         "head_dim] = [" + str(want[0]) + ", " + str(want[1]) + ", " + str(want[2]) + "]");
  }
  const std::vector<float> w = io::to_f32(*t);
  assign_projections(ix, w.data(), w.size(), what);
}

void predictor_index::update(const kv_cache& kv_in) {
  impl& ix = checked(impl_);
  validate_kv_cache(ix.p, kv_in, nullptr, /*needs_v=*/false);
  const kv_cache kv = with_default_strides(kv_in);
  switch (kv.type) {
    case dtype::f32:
      return update_typed<dtype::f32>(ix, kv);
    case dtype::f16:
      return update_typed<dtype::f16>(ix, kv);
    case dtype::bf16:
      return update_typed<dtype::bf16>(ix, kv);
  }
}

void predictor_index::clear() {
  impl& ix = checked(impl_);
  std::fill(ix.count.begin(), ix.count.end(), 0);
}

int64_t predictor_index::tokens(int32_t slot) const {
  const impl& ix = checked(impl_);
  if (slot < 0 || slot >= ix.p.n_seq_max)
    fail("predictor_index::tokens: slot " + str(slot) +
         " outside [0, n_seq_max = " + str(ix.p.n_seq_max) + ")");
  return ix.count[size_t(slot)];
}

size_t predictor_index::memory_bytes() const {
  const impl& ix = checked(impl_);
  return ix.lo.size() + ix.hi.size() + ix.sig.size() * sizeof(uint32_t) +
         (ix.proj.size() + ix.bias.size()) * sizeof(float) + ix.count.size() * sizeof(int64_t);
}

const config& predictor_index::cfg() const {
  return checked(impl_).cfg;
}
const plan_params& predictor_index::params() const {
  return checked(impl_).p;
}

// --- kernels -----------------------------------------------------------------------------------

namespace detail {

// A bound that overflows to inf - inf is NaN: it becomes +inf, so the page is taken and its
// keys meet the logit check (and the orderings of the selection stay strict weak orders).
void bound_pages(const pred_impl& ix, int32_t slot, int32_t kvh, const float* q, int64_t p0,
                 int64_t p1, float* out);

void page_upper_bounds(const pred_impl& ix, int32_t slot, int32_t kvh, const float* q, int64_t p0,
                       int64_t p1, float* out) {
  bound_pages(ix, slot, kvh, q, p0, p1, out);
  for (int64_t i = 0; i < p1 - p0; ++i)
    if (std::isnan(out[i])) out[i] = INFINITY;
}

void bound_pages(const pred_impl& ix, int32_t slot, int32_t kvh, const float* q, int64_t p0,
                 int64_t p1, float* out) {
  if (p1 <= p0) return;
  const uint8_t* lo = ix.lo_row(slot, kvh, p0);
  const uint8_t* hi = ix.hi_row(slot, kvh, p0);
  const int64_t n = p1 - p0;
  const int32_t d = ix.p.head_dim;
#if VATTN_X86
  if (active_simd_level() >= simd_level::avx2) {  // avx512 too: its CPUs have AVX2
    switch (ix.p.kv_type) {
      case dtype::f32:
        return bounds_avx2<dtype::f32>(lo, hi, q, n, d, out);
      case dtype::f16:
        return bounds_avx2<dtype::f16>(lo, hi, q, n, d, out);
      case dtype::bf16:
        return bounds_avx2<dtype::bf16>(lo, hi, q, n, d, out);
    }
  }
#endif
  switch (ix.p.kv_type) {
    case dtype::f32:
      return bounds_scalar<dtype::f32>(lo, hi, q, n, d, out);
    case dtype::f16:
      return bounds_scalar<dtype::f16>(lo, hi, q, n, d, out);
    case dtype::bf16:
      return bounds_scalar<dtype::bf16>(lo, hi, q, n, d, out);
  }
}

void query_signature(const pred_impl& ix, int32_t kvh, const float* q, uint32_t* sig) {
  const row_ops& ops = active_row_ops();
  const int32_t d = ix.p.head_dim;
  const float* w = ix.proj.data() + int64_t(kvh) * ix.cfg.pred_bits * d;
  for (int32_t i = 0; i < ix.words; ++i) {
    uint32_t word = 0;
    for (int32_t b = 0; b < 32; ++b)
      word |= uint32_t(ops.dot_f32(w + int64_t(32 * i + b) * d, q, d) >= 0.0f) << b;
    sig[i] = word;
  }
}

void sign_matches(const pred_impl& ix, int32_t slot, int32_t kvh, const uint32_t* qsig, int64_t t0,
                  int64_t t1, uint16_t* out) {
  if (t1 <= t0) return;
  static const matches_fn fns[9] = {nullptr,        matches_for(1), matches_for(2),
                                    matches_for(3), matches_for(4), matches_for(5),
                                    matches_for(6), matches_for(7), matches_for(8)};
  fns[ix.words](qsig, ix.sig_row(slot, kvh, t0), t1 - t0, ix.cfg.pred_bits, out);
}

// Blocks small enough to stay in L1 while every head of the group scores them: the index is read
// from memory once per kv group instead of once per query head.
void page_upper_bounds_heads(const pred_impl& ix, int32_t slot, int32_t kvh, const float* q,
                             int32_t G, int64_t p0, int64_t p1, float* out, int64_t ld) {
  const int64_t block =
      std::max<int64_t>(1, 8192 / (ix.p.head_dim * int64_t(dtype_size(ix.p.kv_type))));
  for (int64_t b = p0; b < p1; b += block)
    for (int32_t x = 0; x < G; ++x)
      page_upper_bounds(ix, slot, kvh, q + int64_t(x) * ix.p.head_dim, b, std::min(p1, b + block),
                        out + x * ld + (b - p0));
}

namespace {

// Lines of the next block asked into L2 while the present block is scored, spread over the
// block's score calls. The present block's later passes (heads 1 to G-1) compute from L1 with no
// load from memory in flight; without these requests, memory idles while they run and the next
// block's first pass waits for every line (the hardware streamer stops at each 4 KB page).
class next_block_lines {
 public:
  // The lines holding bytes [next, next + bytes), from the one containing next.
  next_block_lines(const void* next, int64_t bytes, int64_t calls)
      : p_(static_cast<const char*>(next) - reinterpret_cast<uintptr_t>(next) % 64),
        lines_(bytes > 0 ? (int64_t(reinterpret_cast<uintptr_t>(next) % 64) + bytes + 63) / 64 : 0),
        calls_(std::max<int64_t>(1, calls)) {}
  void after_call() {
    const int64_t to = lines_ * ++done_ / calls_;
    for (; line_ < to; ++line_) __builtin_prefetch(p_ + line_ * 64, 0, 2);
  }

 private:
  const char* p_;
  int64_t lines_, calls_, done_ = 0, line_ = 0;
};

constexpr int64_t k_score_chunk = 128;  // tokens a score call; 4 KB of 256-bit signatures

// Scores of tokens [b, b + len) for the query heads x of the group in chunks (one per
// k_score_chunk tokens), then the prefetch step; out(x) gives head x's destination.
template <typename Out, typename Pass>
void score_block(const pred_impl& ix, int32_t slot, int32_t kvh, const uint32_t* qsig, int32_t G,
                 int64_t b, int64_t len, int64_t t1, Out out, Pass after_pass) {
  const int64_t next = std::min(t1 - (b + len), len);
  const int64_t chunks = (len + k_score_chunk - 1) / k_score_chunk;
  next_block_lines pf(ix.sig_row(slot, kvh, b + len), next * ix.words * 4, G * chunks);
  for (int32_t x = 0; x < G; ++x) {
    uint16_t* o = out(x);
    for (int64_t c = 0; c < len; c += k_score_chunk) {
      sign_matches(ix, slot, kvh, qsig + x * ix.words, b + c, b + std::min(len, c + k_score_chunk),
                   o + c);
      pf.after_call();
    }
    after_pass(x);
  }
}

}  // namespace

void sign_matches_heads(const pred_impl& ix, int32_t slot, int32_t kvh, const uint32_t* qsig,
                        int32_t G, int64_t t0, int64_t t1, uint16_t* out, int64_t ld) {
  const int64_t block = std::max<int64_t>(64, 16384 / (4 * ix.words));
  for (int64_t b = t0; b < t1; b += block)
    score_block(
        ix, slot, kvh, qsig, G, b, std::min(t1, b + block) - b, t1,
        [&](int32_t x) { return out + x * ld + (b - t0); }, [](int32_t) {});
}

void sign_max_matches_heads(const pred_impl& ix, int32_t slot, int32_t kvh, const uint32_t* qsig,
                            int32_t G, int64_t t0, int64_t t1, uint16_t* out, int64_t* counts) {
  constexpr int64_t k_block = 1024;  // 2 KB of scores per head, 32 KB of 256-bit signatures
  uint16_t other[k_block];
  score_counts local;
  for (int64_t b = t0; b < t1; b += k_block) {
    const int64_t len = std::min(t1, b + k_block) - b;
    uint16_t* o = out + (b - t0);
    score_block(
        ix, slot, kvh, qsig, G, b, len, t1, [&](int32_t x) { return x == 0 ? o : other; },
        [&](int32_t x) {
          if (x > 0)
            for (int64_t i = 0; i < len; ++i) o[i] = std::max(o[i], other[i]);
        });
    local.add(o, len);
  }
  for (int32_t v = 0; v <= ix.cfg.pred_bits; ++v) {
    const int64_t c = local.at(v);
    if (c) std::atomic_ref<int64_t>(counts[v]).fetch_add(c, std::memory_order_relaxed);
  }
}

int64_t predictor_read_bytes(const pred_impl& ix, int64_t n) {
  if (ix.cfg.pred == predictor::page_bounds) {
    const int64_t pages = (n + ix.cfg.pred_page - 1) / ix.cfg.pred_page;
    return 2 * pages * ix.p.head_dim * int64_t(dtype_size(ix.p.kv_type));
  }
  return n * ix.cfg.pred_bits / 8;
}

}  // namespace detail
}  // namespace vattn
