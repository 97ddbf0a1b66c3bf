// test_predictors.cpp: the predictor index (page bounds, sign-bit signatures): incremental
// updates equal a rebuild byte for byte on every dtype and layout, thread counts agree, bounds
// bound, signatures match a double computation, recall beats random, projections load, and bad
// input is rejected with a message naming the argument.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include <unistd.h>

#include "core/dtype.hpp"
#include "core/sampler.hpp"
#include "cpu/predictors.hpp"
#include "cpu/simd.hpp"
#include "test_util.hpp"
#include "vattn/safetensors.hpp"
#include "vattn/synth.hpp"
#include "vattn/vattn.hpp"

using namespace vattn;

namespace {

config pred_config(predictor p, int32_t page = 16, int32_t bits = 64, uint64_t seed = 1) {
  config c;
  c.select = selector::topk;
  c.topk = {0.05, true};
  c.pred = p;
  c.pred_page = page;
  c.pred_bits = bits;
  c.seed = seed;
  return c;
}

plan_params index_params(int32_t n_seq_max, int32_t n_head_kv, int32_t d, int64_t n_max, dtype t,
                         int32_t threads = 1) {
  plan_params pp;
  pp.n_seq_max = n_seq_max;
  pp.n_head_q = 2 * n_head_kv;
  pp.n_head_kv = n_head_kv;
  pp.head_dim = d;
  pp.n_tokens_max = n_max;
  pp.kv_type = t;
  pp.n_threads = threads;
  return pp;
}

// Uniform in [-1, 1) from a hash of (seed, i).
float hashed_uniform(uint64_t seed, uint64_t i) {
  const uint64_t z = detail::mix64(detail::mix64(seed) ^ i);
  return float(double(z >> 11) * 0x1p-52 - 1.0);
}

// K alone (V is not needed by the index) for sequences of up to n_max[s] tokens, contiguous with
// gaps between sequences or on shuffled pages, optionally with padded strides. Padding holds NaN,
// so a read outside the rows makes update throw. view() exposes prefixes of the same storage.
struct key_cache {
  dtype type = dtype::f32;
  kv_layout layout = kv_layout::contiguous;
  int32_t n_head_kv = 0, d = 0, page_size = 0;
  int64_t stride_token = 0, stride_head = 0, stride_page = 0, n_rows = 0, n_pages = 0;
  std::vector<int32_t> n_max, len;
  std::vector<int64_t> seq_start, page_start;
  std::vector<int32_t> page_table;
  std::vector<uint8_t> k;

  int64_t offset(int32_t s, int64_t t, int32_t h) const {
    if (layout == kv_layout::contiguous) return (seq_start[s] + t) * stride_token + h * stride_head;
    const int64_t page = page_table[page_start[s] + t / page_size];
    return page * stride_page + (t % page_size) * stride_token + h * stride_head;
  }
  const uint8_t* row(int32_t s, int64_t t, int32_t h) const {
    return k.data() + offset(s, t, h) * int64_t(dtype_size(type));
  }
  float get(int32_t s, int64_t t, int32_t h, int32_t j) const {
    return detail::load_as_f32(k.data(), type, offset(s, t, h) + j);
  }
  void set(int32_t s, int64_t t, int32_t h, int32_t j, float x) {
    test::store(k, size_t(offset(s, t, h) + j), x, type);
  }

  kv_cache view(const std::vector<int32_t>& lens) {
    len = lens;
    kv_cache kv;
    kv.layout = layout;
    kv.type = type;
    kv.n_head_kv = n_head_kv;
    kv.head_dim = d;
    kv.k = k.data();
    kv.stride_token = stride_token;
    kv.stride_head = stride_head;
    kv.n_seq = int32_t(len.size());
    kv.seq_len = len.data();
    if (layout == kv_layout::contiguous) {
      kv.seq_start = seq_start.data();
      kv.n_rows = n_rows;
    } else {
      kv.stride_page = stride_page;
      kv.page_size = page_size;
      kv.page_table = page_table.data();
      kv.page_start = page_start.data();
      kv.n_pages = n_pages;
    }
    return kv;
  }
  kv_cache full() { return view(n_max); }
};

// Sequence s holds values drawn from seeds[s]: uniform with a few wide channels and per-channel
// offsets, and some exact +0 and -0 (they order differently as integers and as floats).
key_cache make_keys(dtype type, kv_layout layout, const std::vector<int32_t>& n_max,
                    const std::vector<uint64_t>& seeds, int32_t n_head_kv, int32_t d, bool padded,
                    int32_t page_size = 7) {
  key_cache c;
  c.type = type, c.layout = layout, c.n_head_kv = n_head_kv, c.d = d, c.n_max = n_max;
  c.stride_head = d + (padded ? 3 : 0);
  c.stride_token = n_head_kv * c.stride_head + (padded ? 5 : 0);
  int64_t elems = 0;
  if (layout == kv_layout::contiguous) {
    int64_t row = padded ? 2 : 0;
    for (int32_t n : n_max) c.seq_start.push_back(row), row += n + (padded ? 3 : 0);
    c.n_rows = row;
    elems = c.n_rows * c.stride_token;
  } else {
    c.page_size = page_size;
    c.stride_page = page_size * c.stride_token + (padded ? 11 : 0);
    for (int32_t n : n_max) {
      c.page_start.push_back(int64_t(c.page_table.size()));
      for (int64_t p = 0; p < (n + page_size - 1) / page_size; ++p)
        c.page_table.push_back(int32_t(c.page_table.size()));
    }
    uint64_t st = seeds[0] * 31 + 7;
    for (size_t i = c.page_table.size(); i > 1; --i) {
      st = detail::mix64(st);
      std::swap(c.page_table[i - 1], c.page_table[st % i]);
    }
    c.n_pages = int64_t(c.page_table.size()) + 1;
    elems = c.n_pages * c.stride_page;
  }
  c.k.assign(size_t(elems) * dtype_size(type), 0);
  for (int64_t i = 0; i < elems; ++i)
    test::store(c.k, size_t(i), std::numeric_limits<float>::quiet_NaN(), type);
  for (size_t s = 0; s < n_max.size(); ++s) {
    for (int64_t t = 0; t < n_max[s]; ++t) {
      for (int32_t h = 0; h < n_head_kv; ++h) {
        for (int32_t j = 0; j < d; ++j) {
          const uint64_t i = ((uint64_t(t) * n_head_kv + h) * d + j);
          const uint64_t z = detail::mix64(seeds[s] * 0x51ed27ull + i);
          float x = hashed_uniform(seeds[s], i) * (j % 5 == 0 ? 3.0f : 1.0f) + 0.5f * (j % 3 - 1);
          if (z % 23 == 0) x = 0.0f;
          if (z % 29 == 0) x = -0.0f;
          c.set(int32_t(s), t, h, j, x);
        }
      }
    }
  }
  return c;
}

// Compares every slot of `lens` (tokens and the bytes of the index over them).
void expect_same_index(const predictor_index& a, const predictor_index& b,
                       const std::vector<int32_t>& lens, const std::string& what) {
  const auto& x = a.data();
  const auto& y = b.data();
  const int32_t H = a.params().n_head_kv, d = a.params().head_dim;
  const size_t es = dtype_size(a.params().kv_type);
  for (int32_t s = 0; s < int32_t(lens.size()); ++s) {
    ASSERT_EQ(a.tokens(s), lens[s]) << what << " slot " << s;
    ASSERT_EQ(b.tokens(s), lens[s]) << what << " slot " << s;
    for (int32_t h = 0; h < H; ++h) {
      if (a.cfg().pred == predictor::page_bounds) {
        const int64_t pages = (lens[s] + a.cfg().pred_page - 1) / a.cfg().pred_page;
        for (int64_t p = 0; p < pages; ++p) {
          ASSERT_EQ(std::memcmp(x.lo_row(s, h, p), y.lo_row(s, h, p), d * es), 0)
              << what << " lo of slot " << s << " kv head " << h << " page " << p;
          ASSERT_EQ(std::memcmp(x.hi_row(s, h, p), y.hi_row(s, h, p), d * es), 0)
              << what << " hi of slot " << s << " kv head " << h << " page " << p;
        }
      } else {
        for (int64_t t = 0; t < lens[s]; ++t)
          ASSERT_EQ(std::memcmp(x.sig_row(s, h, t), y.sig_row(s, h, t), 4 * size_t(x.words)), 0)
              << what << " signature of slot " << s << " kv head " << h << " token " << t;
      }
    }
  }
}

// A fresh index holding exactly the cache's view `lens`.
predictor_index fresh(const config& cfg, const plan_params& pp, key_cache& c,
                      const std::vector<int32_t>& lens) {
  predictor_index ix(cfg, pp);
  ix.update(c.view(lens));
  return ix;
}

// Expects f() to throw vattn::error whose message contains every one of `words`.
template <typename F>
void expect_error(F&& f, const std::vector<std::string>& words) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning '" << words.front() << "'";
  } catch (const error& e) {
    for (const std::string& w : words)
      EXPECT_NE(std::string(e.what()).find(w), std::string::npos)
          << "message '" << e.what() << "' lacks '" << w << "'";
  }
}

struct build_case {
  predictor pred;
  int32_t d, page, bits;
};

const std::vector<build_case> k_build_cases = {
    {predictor::page_bounds, 1, 1, 64},   {predictor::page_bounds, 17, 5, 64},
    {predictor::page_bounds, 33, 16, 64}, {predictor::sign_bits, 1, 16, 32},
    {predictor::sign_bits, 17, 16, 96},   {predictor::sign_bits, 33, 16, 256},
};

std::string case_name(const build_case& bc, dtype t, kv_layout l) {
  return std::string(predictor_name(bc.pred)) + " d=" + std::to_string(bc.d) +
         " page=" + std::to_string(bc.page) + " bits=" + std::to_string(bc.bits) + " " +
         dtype_name(t) + (l == kv_layout::paged ? " paged" : " contiguous");
}

TEST(PredictorIndex, IncrementalUpdateEqualsRebuild) {
  // 300 crosses k_center_tokens (256), where sign-bit slots are centred and rebuilt.
  const std::vector<int32_t> n_max = {70, 1, 41, 300};
  // Each step's lengths are min(n_max, g); the first step holds the first two sequences only.
  const std::vector<int32_t> schedule = {1, 2, 5, 5, 16, 17, 40, 64, 129, 255, 256, 257, 300};
  for (const build_case& bc : k_build_cases) {
    for (dtype t : {dtype::f32, dtype::f16, dtype::bf16}) {
      for (kv_layout l : {kv_layout::contiguous, kv_layout::paged}) {
        const std::string what = case_name(bc, t, l);
        SCOPED_TRACE(what);
        key_cache c = make_keys(t, l, n_max, {11, 12, 13, 14}, 2, bc.d, t != dtype::f32);
        const config cfg = pred_config(bc.pred, bc.page, bc.bits);
        const plan_params pp = index_params(5, 2, bc.d, 300, t);
        predictor_index ix(cfg, pp);
        for (size_t i = 0; i < schedule.size(); ++i) {
          std::vector<int32_t> lens;
          for (size_t s = 0; s < (i == 0 ? 2 : n_max.size()); ++s)
            lens.push_back(std::min(n_max[s], schedule[i]));
          ix.update(c.view(lens));
          const predictor_index ref = fresh(cfg, pp, c, lens);
          expect_same_index(ix, ref, lens, what + " step " + std::to_string(i));
          EXPECT_EQ(ix.tokens(4), 0);  // a slot beyond the batch is left alone
        }
      }
    }
  }
}

TEST(PredictorIndex, ShorterSequenceRebuildsItsSlot) {
  for (const build_case& bc : k_build_cases) {
    for (kv_layout l : {kv_layout::contiguous, kv_layout::paged}) {
      SCOPED_TRACE(case_name(bc, dtype::bf16, l));
      const config cfg = pred_config(bc.pred, bc.page, bc.bits);
      const plan_params pp = index_params(2, 3, bc.d, 90, dtype::bf16);
      key_cache a = make_keys(dtype::bf16, l, {50, 90}, {5, 6}, 3, bc.d, true);
      // b: sequence 0 continues a's, slot 1 is taken by a new, shorter sequence
      key_cache b = make_keys(dtype::bf16, l, {80, 33}, {5, 99}, 3, bc.d, false);
      predictor_index ix(cfg, pp);
      ix.update(a.full());
      ix.update(b.full());
      expect_same_index(ix, fresh(cfg, pp, b, b.n_max), b.n_max, "after a new sequence");
      ix.clear();
      EXPECT_EQ(ix.tokens(0), 0);
      EXPECT_EQ(ix.tokens(1), 0);
      ix.update(a.full());
      expect_same_index(ix, fresh(cfg, pp, a, a.n_max), a.n_max, "after clear");
    }
  }
}

TEST(PredictorIndex, ThreadCountsGiveIdenticalIndexes) {
  const std::vector<int32_t> n_max = {9000, 5003, 300};
  const std::vector<build_case> cases = {{predictor::page_bounds, 64, 5, 64},
                                         {predictor::page_bounds, 64, 16, 64},
                                         {predictor::sign_bits, 64, 16, 64}};
  for (const build_case& bc : cases) {
    for (dtype t : {dtype::f32, dtype::bf16}) {
      const std::string what = case_name(bc, t, kv_layout::paged);
      SCOPED_TRACE(what);
      key_cache c = make_keys(t, kv_layout::paged, n_max, {1, 2, 3}, 3, bc.d, false, 16);
      const config cfg = pred_config(bc.pred, bc.page, bc.bits);
      predictor_index one(cfg, index_params(3, 3, bc.d, 9000, t, 1));
      one.update(c.view({4102, 4102, 300}));
      one.update(c.full());
      for (int32_t threads : {2, 4}) {
        predictor_index many(cfg, index_params(3, 3, bc.d, 9000, t, threads));
        many.update(c.view({4102, 4102, 300}));  // the append starts mid-page
        many.update(c.full());
        expect_same_index(one, many, n_max, what + " threads " + std::to_string(threads));
        predictor_index once(cfg, index_params(3, 3, bc.d, 9000, t, threads));
        once.update(c.full());
        expect_same_index(one, once, n_max,
                          what + " one update, threads " + std::to_string(threads));
      }
    }
  }
}

TEST(PredictorIndex, PageBoundsAreElementwiseMinMaxAndBoundEveryKey) {
  const int32_t d = 37, H = 2;
  const std::vector<int32_t> n_max = {100, 45};
  for (dtype t : {dtype::f32, dtype::f16, dtype::bf16}) {
    for (int32_t P : {1, 7, 16}) {
      SCOPED_TRACE(std::string(dtype_name(t)) + " page " + std::to_string(P));
      key_cache c = make_keys(t, kv_layout::paged, n_max, {3, 4}, H, d, true);
      predictor_index ix(pred_config(predictor::page_bounds, P), index_params(2, H, d, 100, t));
      ix.update(c.full());
      const auto& x = ix.data();
      for (int32_t s = 0; s < 2; ++s) {
        const int64_t pages = (n_max[s] + P - 1) / P;
        for (int32_t h = 0; h < H; ++h) {
          for (int64_t p = 0; p < pages; ++p) {
            const int64_t t1 = std::min<int64_t>(n_max[s], (p + 1) * P);
            for (int32_t j = 0; j < d; ++j) {
              float lo = INFINITY, hi = -INFINITY;
              for (int64_t tok = p * P; tok < t1; ++tok)
                lo = std::min(lo, c.get(s, tok, h, j)), hi = std::max(hi, c.get(s, tok, h, j));
              ASSERT_EQ(detail::load_as_f32(x.lo_row(s, h, p), t, j), lo) << "page " << p;
              ASSERT_EQ(detail::load_as_f32(x.hi_row(s, h, p), t, j), hi) << "page " << p;
            }
          }
          for (int trial = 0; trial < 4; ++trial) {
            std::vector<float> q(d);
            for (int32_t j = 0; j < d; ++j) q[j] = 2 * hashed_uniform(77 + trial, j);
            std::vector<float> ub(pages + 1, -1.0f);
            detail::page_upper_bounds(x, s, h, q.data(), 0, pages, ub.data());
            ASSERT_EQ(ub[pages], -1.0f) << "wrote past p1";
            std::vector<float> part(pages);  // a sub-range gives the same values
            detail::page_upper_bounds(x, s, h, q.data(), 1, pages, part.data());
            for (int64_t p = 1; p < pages; ++p) ASSERT_EQ(part[p - 1], ub[p]);
            for (int64_t tok = 0; tok < n_max[s]; ++tok) {
              const int64_t p = tok / P;
              double dot = 0, mag = 0;
              for (int32_t j = 0; j < d; ++j) {
                const double lo = detail::load_as_f32(x.lo_row(s, h, p), t, j);
                const double hi = detail::load_as_f32(x.hi_row(s, h, p), t, j);
                dot += double(q[j]) * c.get(s, tok, h, j);
                mag += std::abs(double(q[j])) * std::max(std::abs(lo), std::abs(hi));
              }
              const double tol = 1e-5 * mag + 1e-30;
              ASSERT_LE(dot, ub[p] + tol) << "token " << tok;
              if (P == 1) {
                ASSERT_NEAR(dot, ub[p], tol) << "token " << tok;
              }
            }
          }
        }
      }
    }
  }
}

TEST(PredictorIndex, SignaturesMatchDoublePrecisionSigns) {
  for (dtype t : {dtype::f32, dtype::f16, dtype::bf16}) {
    for (const auto& db : std::vector<std::pair<int32_t, int32_t>>{{5, 32}, {64, 96}}) {
      const int32_t d = db.first, bits = db.second;
      SCOPED_TRACE(std::string(dtype_name(t)) + " d " + std::to_string(d) + " bits " +
                   std::to_string(bits));
      const int32_t H = 2;
      // Slot 0 is long enough to be centred on the mean of its first 256 keys; slot 1 is not.
      key_cache c = make_keys(t, kv_layout::contiguous, {300, 31}, {8, 9}, H, d, false);
      predictor_index ix(pred_config(predictor::sign_bits, 16, bits, 42),
                         index_params(2, H, d, 300, t));
      ix.update(c.full());
      const auto& x = ix.data();
      ASSERT_EQ(x.words, bits / 32);
      std::vector<double> mu(size_t(H) * d, 0.0);
      for (int32_t h = 0; h < H; ++h)
        for (int64_t tok = 0; tok < k_center_tokens; ++tok)
          for (int32_t j = 0; j < d; ++j)
            mu[h * d + j] += c.get(0, tok, h, j) / double(k_center_tokens);
      int64_t checked = 0, skipped = 0;
      // bit r of w_r . v in double, or -1 when |w_r . v| is too small to call
      auto naive_bit = [&](int32_t h, int32_t r, auto&& elem) {
        double dot = 0, mag = 0;
        for (int32_t j = 0; j < d; ++j) {
          const double w = x.proj[(size_t(h) * bits + r) * d + j];
          dot += w * elem(j);
          mag += std::abs(w * elem(j));
        }
        return std::abs(dot) <= 1e-4 * mag ? -1 : int(dot >= 0);
      };
      for (int32_t s = 0; s < 2; ++s) {
        for (int64_t tok = 0; tok < c.n_max[s]; ++tok) {
          for (int32_t h = 0; h < H; ++h) {
            const uint32_t* sig = x.sig_row(s, h, tok);
            for (int32_t r = 0; r < bits; ++r) {
              const int want = naive_bit(h, r, [&](int32_t j) {
                return c.get(s, tok, h, j) - (s == 0 ? mu[h * d + j] : 0.0);
              });
              if (want < 0) {
                ++skipped;
                continue;
              }
              ++checked;
              ASSERT_EQ(int(sig[r / 32] >> (r % 32) & 1u), want)
                  << "slot " << s << " token " << tok << " kv head " << h << " bit " << r;
            }
          }
        }
      }
      EXPECT_LT(skipped, checked / 100 + 1) << "too many near-zero projections";
      // The query side and the match counts.
      for (int32_t h = 0; h < H; ++h) {
        std::vector<float> q(d);
        for (int32_t j = 0; j < d; ++j) q[j] = hashed_uniform(500 + h, j);
        std::vector<uint32_t> qs(x.words);
        detail::query_signature(x, h, q.data(), qs.data());
        for (int32_t r = 0; r < bits; ++r) {
          const int want = naive_bit(h, r, [&](int32_t j) { return double(q[j]); });
          if (want >= 0) {
            ASSERT_EQ(int(qs[r / 32] >> (r % 32) & 1u), want) << "query bit " << r;
          }
        }
        const int64_t t0 = 3, t1 = 300;
        std::vector<uint16_t> m(t1 - t0 + 1, 7777);
        detail::sign_matches(x, 0, h, qs.data(), t0, t1, m.data());
        ASSERT_EQ(m[t1 - t0], 7777) << "wrote past t1";
        for (int64_t tok = t0; tok < t1; ++tok) {
          int diff = 0;
          for (int32_t i = 0; i < x.words; ++i)
            diff += std::popcount(qs[i] ^ x.sig_row(0, h, tok)[i]);
          ASSERT_EQ(m[tok - t0], bits - diff) << "token " << tok;
        }
      }
    }
  }
}

TEST(PredictorIndex, ProjectionsAreDeterministicGaussians) {
  const plan_params pp = index_params(1, 8, 128, 16, dtype::bf16);
  predictor_index a(pred_config(predictor::sign_bits, 16, 64, 7), pp);
  predictor_index b(pred_config(predictor::sign_bits, 16, 64, 7), pp);
  predictor_index c(pred_config(predictor::sign_bits, 16, 64, 8), pp);
  const std::vector<float>& w = a.data().proj;
  ASSERT_EQ(w.size(), size_t(8 * 64 * 128));
  EXPECT_EQ(w, b.data().proj);
  EXPECT_NE(w, c.data().proj);
  double sum = 0, sum2 = 0, tail = 0;
  for (float x : w) sum += x, sum2 += double(x) * x, tail += std::abs(x) > 1.959964;
  const double n = double(w.size()), mean = sum / n, var = sum2 / n - mean * mean;
  EXPECT_NEAR(mean, 0.0, 0.02);
  EXPECT_NEAR(var, 1.0, 0.03);
  EXPECT_NEAR(tail / n, 0.05, 0.005);
}

// Top k by a score vector, ties to the lower index.
std::vector<int64_t> top_k(const std::vector<double>& score, int64_t k) {
  std::vector<int64_t> idx(score.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int64_t a, int64_t b) {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
  });
  idx.resize(k);
  return idx;
}

// Recall of the oracle top-k on synthetic heads (bf16, d = 64, 8K tokens): sign-bit top-k (128
// bits) and page bounds (pages of 16 holding 4k tokens), and the rank each gives the needle.
TEST(PredictorIndex, RecallBeatsRandomOnSyntheticHeads) {
  const int64_t n = 8192, k = n / 100, P = 16, pages_n = n / P, pages_k = 4 * k / P;
  const int32_t d = 64, n_head_q = 4, H = 2;
  for (synth::family fam : {synth::family::heavy_hitters, synth::family::needle}) {
    SCOPED_TRACE(synth::family_name(fam));
    test::batch b = test::make_batch(fam, {int32_t(n)}, n_head_q, H, d, dtype::bf16,
                                     kv_layout::contiguous, 2024);
    const kv_cache kv = b.args().kv;
    const plan_params pp = index_params(1, H, d, n, dtype::bf16);
    predictor_index signs(pred_config(predictor::sign_bits, 16, 128), pp);
    predictor_index pages(pred_config(predictor::page_bounds, P), pp);
    signs.update(kv);
    pages.update(kv);
    double rec_signs = 0, rec_pages = 0;
    for (int32_t qh = 0; qh < n_head_q; ++qh) {
      const int32_t h = qh / (n_head_q / H);
      const float* q = b.q.data() + size_t(qh) * d;
      std::vector<double> exact(n), by_sig(n), by_page(pages_n);
      for (int64_t t = 0; t < n; ++t)
        for (int32_t j = 0; j < d; ++j)
          exact[t] +=
              double(q[j]) * detail::load_as_f32(b.k.data(), dtype::bf16, (t * H + h) * d + j);
      std::vector<uint32_t> qs(4);
      detail::query_signature(signs.data(), h, q, qs.data());
      std::vector<uint16_t> m(n);
      detail::sign_matches(signs.data(), 0, h, qs.data(), 0, n, m.data());
      for (int64_t t = 0; t < n; ++t) by_sig[t] = m[t];
      std::vector<float> ub(pages_n);
      detail::page_upper_bounds(pages.data(), 0, h, q, 0, pages_n, ub.data());
      for (int64_t p = 0; p < pages_n; ++p) by_page[p] = ub[p];
      const std::vector<int64_t> oracle = top_k(exact, k), sig_top = top_k(by_sig, k);
      const std::vector<int64_t> page_top = top_k(by_page, pages_k);
      std::vector<char> in_sig(n, 0), in_page(n, 0);
      for (int64_t t : sig_top) in_sig[t] = 1;
      for (int64_t p : page_top)
        for (int64_t t = p * P; t < (p + 1) * P; ++t) in_page[t] = 1;
      for (int64_t t : oracle) rec_signs += in_sig[t], rec_pages += in_page[t];
      if (fam == synth::family::needle) {
        const int64_t needle = oracle[0];
        const auto sig_rank = std::count_if(by_sig.begin(), by_sig.end(),
                                            [&](double x) { return x > by_sig[needle]; });
        const auto page_rank = std::count_if(by_page.begin(), by_page.end(),
                                             [&](double x) { return x > by_page[needle / P]; });
        std::printf("needle at %lld, query head %d: rank by signs %lld, its page's rank %lld\n",
                    (long long)needle, qh, (long long)sig_rank, (long long)page_rank);
        // Bounds catch the needle's page; signatures rank it high, not always in the top k
        // (the keys' constant outlier channels tilt every random hyperplane alike).
        EXPECT_TRUE(in_page[needle]) << "query head " << qh;
        EXPECT_LT(sig_rank, n / 16) << "query head " << qh;
      }
    }
    rec_signs /= double(k * n_head_q);
    rec_pages /= double(k * n_head_q);
    const double rand_signs = double(k) / n, rand_pages = double(pages_k * P) / n;
    std::printf(
        "%s: recall@%lld signs(128 bits) %.3f (random %.3f), pages(16, 4k tokens) %.3f "
        "(random %.3f)\n",
        synth::family_name(fam), (long long)k, rec_signs, rand_signs, rec_pages, rand_pages);
    if (fam == synth::family::heavy_hitters) {
      EXPECT_GT(rec_signs, 5 * rand_signs);
      EXPECT_GT(rec_pages, 2 * rand_pages);
    }
  }
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("vattn_pred_" + std::to_string(getpid()) + "_" + name + ".safetensors"))
      .string();
}

TEST(PredictorIndex, LearnedProjections) {
  const int32_t H = 2, bits = 32, d = 8;
  const plan_params pp = index_params(1, H, d, 50, dtype::f16);
  const config cfg = pred_config(predictor::sign_bits, 16, bits);
  key_cache c = make_keys(dtype::f16, kv_layout::contiguous, {50}, {3}, H, d, false);
  // Row r of kv head h picks channel (r + h) % d with sign (-1)^(r / d): bit r is that sign
  // times the channel, >= 0.
  std::vector<float> w(size_t(H) * bits * d, 0.0f);
  for (int32_t h = 0; h < H; ++h)
    for (int32_t r = 0; r < bits; ++r)
      w[(size_t(h) * bits + r) * d + (r + h) % d] = (r / d) % 2 ? -1.0f : 1.0f;
  predictor_index ix(cfg, pp);
  ix.update(c.full());
  ix.set_projections(w.data(), w.size());
  EXPECT_EQ(ix.tokens(0), 0) << "set_projections must empty the slots";
  EXPECT_EQ(ix.data().proj, w);
  ix.update(c.full());
  for (int64_t t = 0; t < 50; ++t)
    for (int32_t h = 0; h < H; ++h)
      for (int32_t r = 0; r < bits; ++r) {
        const float v = ((r / d) % 2 ? -1.0f : 1.0f) * c.get(0, t, h, (r + h) % d);
        ASSERT_EQ(int(ix.data().sig_row(0, h, t)[0] >> r & 1u), int(v >= 0))
            << "token " << t << " kv head " << h << " bit " << r;
      }

  // Round trips through safetensors files, f32 and bf16.
  const std::string path = temp_path("proj");
  std::vector<float> wf(w.size());
  for (size_t i = 0; i < wf.size(); ++i) wf[i] = 3 * hashed_uniform(9, i);
  io::save(path, {{"sign_projections", "F32", {H, bits, d}, wf.data(), wf.size() * 4}});
  predictor_index loaded(cfg, pp);
  loaded.load_projections(path);
  EXPECT_EQ(loaded.data().proj, wf);
  std::vector<uint16_t> wb(wf.size());
  std::vector<float> wb_f(wf.size());
  for (size_t i = 0; i < wf.size(); ++i)
    wb[i] = detail::f32_to_bf16(wf[i]), wb_f[i] = detail::bf16_to_f32(wb[i]);
  const std::vector<int32_t> other = {1, 2, 3};
  io::save(path, {{"other", "I32", {3}, other.data(), 12},
                  {"sign_projections", "BF16", {H, bits, d}, wb.data(), wb.size() * 2}});
  loaded.load_projections(path);
  EXPECT_EQ(loaded.data().proj, wb_f);

  // Errors name the argument.
  expect_error([&] { ix.set_projections(w.data(), w.size() - 1); },
               {"count", std::to_string(w.size())});
  expect_error([&] { ix.set_projections(nullptr, w.size()); }, {"null"});
  std::vector<float> bad = w;
  bad[77] = NAN;
  expect_error([&] { ix.set_projections(bad.data(), bad.size()); }, {"w[77]", "NaN"});
  io::save(path, {{"projections", "F32", {H, bits, d}, wf.data(), wf.size() * 4}});
  expect_error([&] { loaded.load_projections(path); }, {"sign_projections", path});
  io::save(path, {{"sign_projections", "F32", {H, d, bits}, wf.data(), wf.size() * 4}});
  expect_error([&] { loaded.load_projections(path); }, {"shape", "[2, 8, 32]", "[2, 32, 8]"});
  std::vector<int32_t> ints(wf.size(), 1);
  io::save(path, {{"sign_projections", "I32", {H, bits, d}, ints.data(), ints.size() * 4}});
  expect_error([&] { loaded.load_projections(path); }, {"sign_projections"});
  wf[5] = INFINITY;
  io::save(path, {{"sign_projections", "F32", {H, bits, d}, wf.data(), wf.size() * 4}});
  expect_error([&] { loaded.load_projections(path); }, {"NaN/Inf", path});
  EXPECT_EQ(loaded.data().proj, wb_f) << "a rejected file must leave the projections alone";
  std::filesystem::remove(path);
  expect_error([&] { loaded.load_projections(path); }, {path});
  predictor_index pages(pred_config(predictor::page_bounds), pp);
  expect_error([&] { pages.set_projections(w.data(), w.size()); }, {"signs"});
  expect_error([&] { pages.load_projections(path); }, {"signs"});
}

TEST(PredictorIndex, RejectsBadInput) {
  const int32_t H = 3, d = 16;
  const config cfg = pred_config(predictor::page_bounds, 4);
  const plan_params pp = index_params(2, H, d, 64, dtype::bf16);
  config oracle = cfg;
  oracle.pred = predictor::oracle;
  expect_error([&] { (void)predictor_index(oracle, pp); }, {"cfg.pred", "oracle"});
  config not_topk = cfg;
  not_topk.select = selector::none;
  expect_error([&] { (void)predictor_index(not_topk, pp); }, {"select"});
  config bad_bits = pred_config(predictor::sign_bits, 16, 48);
  expect_error([&] { (void)predictor_index(bad_bits, pp); }, {"pred_bits"});
  plan_params p0 = pp;
  p0.n_head_kv = 0;
  expect_error([&] { (void)predictor_index(cfg, p0); }, {"n_head_kv"});
  p0 = pp;
  p0.n_tokens_max = 0;
  expect_error([&] { (void)predictor_index(cfg, p0); }, {"n_tokens_max"});
  p0 = pp;
  p0.n_seq_max = 0;
  expect_error([&] { (void)predictor_index(cfg, p0); }, {"n_seq_max"});
  p0 = pp;
  p0.head_dim = 0;
  expect_error([&] { (void)predictor_index(cfg, p0); }, {"head_dim"});

  for (predictor pr : {predictor::page_bounds, predictor::sign_bits}) {
    SCOPED_TRACE(predictor_name(pr));
    predictor_index ix(pred_config(pr, 4), pp);
    key_cache c = make_keys(dtype::bf16, kv_layout::paged, {40, 20}, {1, 2}, H, d, false);
    kv_cache kv = c.full();
    kv.type = dtype::f16;
    expect_error([&] { ix.update(kv); }, {"kv.type", "bf16"});
    kv = c.full();
    kv.n_head_kv = 2;
    expect_error([&] { ix.update(kv); }, {"kv.n_head_kv"});
    kv = c.full();
    kv.head_dim = 8;
    expect_error([&] { ix.update(kv); }, {"kv.head_dim"});
    kv = c.full();
    kv.k = nullptr;
    expect_error([&] { ix.update(kv); }, {"kv.k"});
    key_cache three = make_keys(dtype::bf16, kv_layout::paged, {4, 4, 4}, {1, 2, 3}, H, d, false);
    expect_error([&] { ix.update(three.full()); }, {"kv.n_seq"});
    key_cache longer = make_keys(dtype::bf16, kv_layout::paged, {65}, {1}, H, d, false);
    expect_error([&] { ix.update(longer.full()); }, {"seq_len[0]", "n_tokens_max"});
    expect_error([&] { ix.update(c.view({5, 0})); }, {"seq_len[1]"});
    EXPECT_EQ(ix.tokens(0), 0) << "a rejected cache must leave the index alone";
    ix.update(c.view({12, 10}));
    c.set(1, 13, 2, 5, NAN);
    c.set(1, 17, 0, 1, INFINITY);
    expect_error([&] { ix.update(c.full()); }, {"NaN/Inf", "seq 1, token 13, kv head 2"});
    EXPECT_EQ(ix.tokens(0), 0) << "a failed update empties the slots it touched";
    EXPECT_EQ(ix.tokens(1), 0);
    expect_error([&] { ix.tokens(2); }, {"slot"});
    expect_error([&] { ix.tokens(-1); }, {"slot"});
    kv_cache ok = c.view({40, 13});
    ix.update(ok);
    EXPECT_EQ(ix.tokens(1), 13);
  }
}

TEST(PredictorIndex, SizesReadBytesAndMoves) {
  const plan_params pp = index_params(3, 2, 10, 100, dtype::f16);
  predictor_index pages(pred_config(predictor::page_bounds, 16), pp);
  EXPECT_EQ(pages.data().pages_max, 7);
  EXPECT_EQ(pages.memory_bytes(), size_t(2 * 3 * 2 * 7 * 10 * 2 + 3 * 8));
  EXPECT_EQ(detail::predictor_read_bytes(pages.data(), 100), 2 * 7 * 10 * 2);
  EXPECT_EQ(detail::predictor_read_bytes(pages.data(), 16), 2 * 1 * 10 * 2);
  predictor_index signs(pred_config(predictor::sign_bits, 16, 96), pp);
  // signatures, projections, per-bit centring thresholds, token counts
  EXPECT_EQ(signs.memory_bytes(),
            size_t(3 * 2 * 100 * 12 + 2 * 96 * 10 * 4 + 3 * 2 * 96 * 4 + 3 * 8));
  EXPECT_EQ(detail::predictor_read_bytes(signs.data(), 100), 100 * 12);
  EXPECT_EQ(signs.cfg().pred_bits, 96);
  EXPECT_EQ(signs.params().head_dim, 10);

  predictor_index moved(std::move(signs));
  EXPECT_EQ(moved.cfg().pred, predictor::sign_bits);
  expect_error([&] { signs.tokens(0); }, {"moved"});
  moved = std::move(pages);
  EXPECT_EQ(moved.cfg().pred, predictor::page_bounds);
  EXPECT_EQ(moved.tokens(2), 0);
}

}  // namespace

// Scoring every head of a kv group in one pass gives the single-head values exactly; the fused
// unit score is their maximum, with its histogram.
TEST(PredictorIndex, GroupScoringEqualsPerHead) {
  for (predictor pred : {predictor::page_bounds, predictor::sign_bits}) {
    const int32_t d = 40, G = 3, n = 5000;
    key_cache c = make_keys(dtype::bf16, kv_layout::contiguous, {n}, {77}, 2, d, false);
    predictor_index ix(pred_config(pred, 8, 96), index_params(1, 2, d, n, dtype::bf16));
    ix.update(c.full());
    const auto& x = ix.data();
    std::vector<float> q(size_t(G) * d);
    for (size_t j = 0; j < q.size(); ++j) q[j] = hashed_uniform(9, j);
    const int64_t lo = 3, hi = n - 5, ld = n + 7;
    if (pred == predictor::page_bounds) {
      const int64_t p0 = lo / 8, p1 = (hi + 7) / 8;
      std::vector<float> all(size_t(G) * ld, -1.0f), one(size_t(p1 - p0));
      detail::page_upper_bounds_heads(x, 0, 1, q.data(), G, p0, p1, all.data(), ld);
      for (int32_t h = 0; h < G; ++h) {
        detail::page_upper_bounds(x, 0, 1, q.data() + h * d, p0, p1, one.data());
        for (int64_t p = 0; p < p1 - p0; ++p) ASSERT_EQ(all[h * ld + p], one[p]) << h << " " << p;
        EXPECT_EQ(all[h * ld + (p1 - p0)], -1.0f) << "wrote past p1";
      }
    } else {
      std::vector<uint32_t> qs(size_t(G) * x.words);
      for (int32_t h = 0; h < G; ++h)
        detail::query_signature(x, 1, q.data() + h * d, qs.data() + h * x.words);
      std::vector<uint16_t> all(size_t(G) * ld, 999), one(size_t(hi - lo));
      detail::sign_matches_heads(x, 0, 1, qs.data(), G, lo, hi, all.data(), ld);
      for (int32_t h = 0; h < G; ++h) {
        detail::sign_matches(x, 0, 1, qs.data() + h * x.words, lo, hi, one.data());
        for (int64_t t = 0; t < hi - lo; ++t) ASSERT_EQ(all[h * ld + t], one[t]) << h << " " << t;
        EXPECT_EQ(all[h * ld + (hi - lo)], 999) << "wrote past t1";
      }
      // The unit score (maximum over the heads) and its histogram, over one range and over two
      // pieces sharing the counts (as the scan's tasks do).
      for (int64_t cut : {lo, lo + 1000, lo + 1037, hi}) {
        std::vector<uint16_t> unit(size_t(hi - lo) + 1, 999);
        std::vector<int64_t> counts(size_t(x.cfg.pred_bits) + 1, 0);
        detail::sign_max_matches_heads(x, 0, 1, qs.data(), G, lo, cut, unit.data(), counts.data());
        detail::sign_max_matches_heads(x, 0, 1, qs.data(), G, cut, hi, unit.data() + (cut - lo),
                                       counts.data());
        std::vector<int64_t> want(counts.size(), 0);
        for (int64_t t = 0; t < hi - lo; ++t) {
          uint16_t m = 0;
          for (int32_t h = 0; h < G; ++h) m = std::max(m, all[h * ld + t]);
          ASSERT_EQ(unit[t], m) << "cut " << cut << " token " << t;
          ++want[m];
        }
        EXPECT_EQ(unit[hi - lo], 999) << "wrote past t1";
        EXPECT_EQ(counts, want) << "cut " << cut;
      }
    }
  }
}

// Match counts of every signature width over ranges of every length mod 8 (the vector kernels
// take 8 tokens a step, the rest one at a time) equal the popcounts of the XOR, whichever kernel
// the CPU level picks, and nothing past t1 is written.
TEST(PredictorIndex, SignMatchesEveryWidthAndRange) {
  std::printf("sign matches at level %s, vector popcounts %s\n",
              detail::simd_level_str(detail::active_simd_level()),
              detail::cpu_has_avx512vpopcntdq() ? "available" : "not available");
  const int32_t d = 24, n = 700;
  key_cache c = make_keys(dtype::f32, kv_layout::contiguous, {n}, {31}, 1, d, false);
  for (int32_t bits = 32; bits <= 256; bits += 32) {
    predictor_index ix(pred_config(predictor::sign_bits, 8, bits),
                       index_params(1, 1, d, n, dtype::f32));
    ix.update(c.full());
    const auto& x = ix.data();
    std::vector<float> q(d);
    for (int32_t j = 0; j < d; ++j) q[j] = hashed_uniform(bits, j);
    std::vector<uint32_t> qs(x.words);
    detail::query_signature(x, 0, q.data(), qs.data());
    for (int64_t t0 : {0, 1, 5})
      for (int64_t len = 0; len <= 41; ++len) {
        const int64_t t1 = std::min<int64_t>(n, t0 + (len == 41 ? n : len));
        std::vector<uint16_t> m(size_t(t1 - t0) + 1, 7777);
        detail::sign_matches(x, 0, 0, qs.data(), t0, t1, m.data());
        ASSERT_EQ(m[size_t(t1 - t0)], 7777) << "wrote past t1: bits " << bits << " len " << len;
        for (int64_t t = t0; t < t1; ++t) {
          int diff = 0;
          for (int32_t i = 0; i < x.words; ++i)
            diff += std::popcount(qs[i] ^ x.sig_row(0, 0, t)[i]);
          ASSERT_EQ(m[size_t(t - t0)], bits - diff) << "bits " << bits << " token " << t;
        }
      }
  }
}
