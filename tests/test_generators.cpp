// test_generators.cpp: the synthetic families of vattn/synth.hpp: determinism, shapes, errors, and
// each family's defining attention property, measured with exact softmax attention in double.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "vattn/synth.hpp"
#include "vattn/vattn.hpp"

namespace {

using vattn::synth::family;
using vattn::synth::problem;
using vattn::synth::shape;

// Logits s_i = scale <q_h, k_i> of query head h, in double.
std::vector<double> logits(const problem& p, int32_t h) {
  const shape& s = p.shp;
  const int32_t d = s.head_dim, g = h / (s.n_head_q / s.n_head_kv);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> out(s.n_tokens);
  for (int64_t i = 0; i < s.n_tokens; ++i) {
    const float* k = &p.k[(i * s.n_head_kv + g) * d];
    const float* q = &p.q[static_cast<size_t>(h) * d];
    double acc[4] = {0, 0, 0, 0};  // independent partial sums: no single dependency chain
    int32_t c = 0;
    for (; c + 4 <= d; c += 4)
      for (int32_t j = 0; j < 4; ++j) acc[j] += double{q[c + j]} * k[c + j];
    for (; c < d; ++c) acc[0] += double{q[c]} * k[c];
    out[i] = scale * ((acc[0] + acc[1]) + (acc[2] + acc[3]));
  }
  return out;
}

std::vector<double> softmax(const std::vector<double>& s) {
  const double mx = *std::max_element(s.begin(), s.end());
  std::vector<double> w(s.size());
  double sum = 0;
  for (size_t i = 0; i < s.size(); ++i) sum += w[i] = std::exp(s[i] - mx);
  for (double& x : w) x /= sum;
  return w;
}

// Token indices by decreasing weight.
std::vector<int64_t> order_by_weight(const std::vector<double>& w) {
  std::vector<int64_t> idx(w.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return w[a] > w[b]; });
  return idx;
}

double top_mass(const std::vector<double>& w, const std::vector<int64_t>& order, int64_t count) {
  double m = 0;
  for (int64_t j = 0; j < count; ++j) m += w[order[j]];
  return m;
}

double normalized_entropy(const std::vector<double>& w) {
  double h = 0;
  for (double x : w)
    if (x > 0) h -= x * std::log(x);
  return w.size() > 1 ? h / std::log(static_cast<double>(w.size())) : 1.0;
}

double correlation(const std::vector<double>& a, const std::vector<double>& b) {
  const double n = static_cast<double>(a.size());
  const double ma = std::accumulate(a.begin(), a.end(), 0.0) / n;
  const double mb = std::accumulate(b.begin(), b.end(), 0.0) / n;
  double sab = 0, saa = 0, sbb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    sab += (a[i] - ma) * (b[i] - mb);
    saa += (a[i] - ma) * (a[i] - ma);
    sbb += (b[i] - mb) * (b[i] - mb);
  }
  return sab / std::sqrt(saa * sbb);
}

// Value row of token i for kv head g, in double.
std::vector<double> value(const problem& p, int64_t i, int32_t g) {
  const int32_t d = p.shp.head_dim;
  const float* v = &p.v[(i * p.shp.n_head_kv + g) * d];
  return std::vector<double>(v, v + d);
}

// Mean value row over a set of tokens of kv head g.
std::vector<double> mean_value(const problem& p, int32_t g, const std::vector<int64_t>& tokens) {
  const int32_t d = p.shp.head_dim;
  std::vector<double> m(d, 0.0);
  for (int64_t i : tokens) {
    const float* v = &p.v[(i * p.shp.n_head_kv + g) * d];
    for (int32_t c = 0; c < d; ++c) m[c] += v[c];
  }
  for (double& x : m) x /= static_cast<double>(tokens.size());
  return m;
}

double norm(const std::vector<double>& x) {
  double s = 0;
  for (double c : x) s += c * c;
  return std::sqrt(s);
}

uint64_t fnv1a(const std::vector<float>& x, uint64_t h = 0xcbf29ce484222325ULL) {
  const auto* b = reinterpret_cast<const unsigned char*>(x.data());
  for (size_t i = 0; i < x.size() * sizeof(float); ++i) h = (h ^ b[i]) * 0x100000001b3ULL;
  return h;
}

// Per-head attention statistics, the columns of the table in docs/generators.md.
struct head_stats {
  double top1 = 0, top2pct = 0, top5pct = 0, top_eighth = 0, entropy = 0;
  double topk_error = 0;  // ||O_top5% - O|| / ||O||: output of the top 5% alone vs exact
  double resid_skew = 0;  // skewness of the weights outside the top 5% (CLT difficulty)
  double min_logit = 0, max_logit = 0;
};

head_stats stats_of(const problem& p, int32_t h) {
  const int64_t n = p.shp.n_tokens;
  const int32_t g = h / (p.shp.n_head_q / p.shp.n_head_kv), d = p.shp.head_dim;
  const std::vector<double> s = logits(p, h);
  const std::vector<double> w = softmax(s);
  const std::vector<int64_t> order = order_by_weight(w);
  const int64_t k5 = std::max<int64_t>(1, n / 20);
  head_stats st;
  st.min_logit = *std::min_element(s.begin(), s.end());
  st.max_logit = *std::max_element(s.begin(), s.end());
  st.top1 = w[order[0]];
  st.top2pct = top_mass(w, order, std::max<int64_t>(1, n / 50));
  st.top5pct = top_mass(w, order, k5);
  st.top_eighth = top_mass(w, order, std::max<int64_t>(1, n / 8));
  st.entropy = normalized_entropy(w);
  std::vector<char> in_top(n, 0);
  for (int64_t j = 0; j < k5; ++j) in_top[order[j]] = 1;
  std::vector<double> o(d, 0.0), o_top(d, 0.0);
  for (int64_t i = 0; i < n; ++i) {  // in memory order
    const float* v = &p.v[(i * p.shp.n_head_kv + g) * d];
    const double wi = w[i], wi_top = w[i] / st.top5pct;  // locals: o may alias w otherwise
    for (int32_t c = 0; c < d; ++c) o[c] += wi * v[c];
    if (in_top[i])
      for (int32_t c = 0; c < d; ++c) o_top[c] += wi_top * v[c];
  }
  std::vector<double> diff(d);
  for (int32_t c = 0; c < d; ++c) diff[c] = o_top[c] - o[c];
  st.topk_error = norm(diff) / norm(o);
  double m1 = 0, m2 = 0, m3 = 0;
  const double nr = static_cast<double>(n - k5);
  for (int64_t j = k5; j < n; ++j) m1 += w[order[j]] / nr;
  for (int64_t j = k5; j < n; ++j) {
    const double x = w[order[j]] - m1;
    m2 += x * x / nr;
    m3 += x * x * x / nr;
  }
  st.resid_skew = m2 > 0 ? m3 / std::pow(m2, 1.5) : 0.0;
  return st;
}

std::vector<head_stats> all_heads(const problem& p) {
  std::vector<head_stats> out;
  for (int32_t h = 0; h < p.shp.n_head_q; ++h) out.push_back(stats_of(p, h));
  return out;
}

double mean_of(const std::vector<head_stats>& hs, double head_stats::*field) {
  double s = 0;
  for (const head_stats& x : hs) s += x.*field;
  return s / static_cast<double>(hs.size());
}

// The shape of the statistical tests: 8 query heads over 2 kv heads, 3 seeds, 24 heads in all.
const shape k_test_shape{4096, 8, 2, 64};
constexpr uint64_t k_test_seeds[] = {1, 2, 3};

std::vector<head_stats> family_heads(family f, const shape& s = k_test_shape) {
  std::vector<head_stats> out;
  for (uint64_t seed : k_test_seeds) {
    const std::vector<head_stats> hs = all_heads(vattn::synth::generate(f, s, seed));
    out.insert(out.end(), hs.begin(), hs.end());
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

TEST(Generators, FamilyNamesRoundTrip) {
  const std::vector<family>& all = vattn::synth::all_families();
  ASSERT_EQ(all.size(), 6u);
  for (size_t i = 0; i < all.size(); ++i) {
    EXPECT_EQ(static_cast<size_t>(all[i]), i);
    EXPECT_EQ(vattn::synth::family_from_string(vattn::synth::family_name(all[i])), all[i]);
  }
  EXPECT_STREQ(vattn::synth::family_name(family::heavy_hitters), "heavy_hitters");
  EXPECT_STREQ(vattn::synth::family_name(family::correlated_values), "correlated_values");
  EXPECT_STREQ(vattn::synth::family_name(static_cast<family>(99)), "unknown");
}

TEST(Generators, UnknownFamilyNameListsValidOnes) {
  for (const char* bad : {"needles", "", "Uniform", "power-law"}) {
    try {
      vattn::synth::family_from_string(bad);
      FAIL() << "accepted '" << bad << "'";
    } catch (const vattn::error& e) {
      const std::string msg = e.what();
      for (family f : vattn::synth::all_families())
        EXPECT_NE(msg.find(vattn::synth::family_name(f)), std::string::npos) << msg;
    }
  }
}

TEST(Generators, BadShapesThrow) {
  const shape bad[] = {
      {0, 1, 1, 64},
      {-5, 1, 1, 64},
      {16, 0, 1, 64},
      {16, 4, 0, 64},
      {16, 6, 4, 64},
      {16, 2, 4, 64},
      {16, 1, 1, 0},
      {16, 1, 1, -3},
      {int64_t{1} << 40, 8, 8, 128},
      {16, 1 << 30, 1, 1 << 30},
  };
  for (const shape& s : bad) {
    EXPECT_THROW(vattn::synth::generate(family::uniform, s, 1), vattn::error)
        << s.n_tokens << " " << s.n_head_q << " " << s.n_head_kv << " " << s.head_dim;
  }
  EXPECT_THROW(vattn::synth::generate(static_cast<family>(42), {16, 1, 1, 8}, 1), vattn::error);
}

TEST(Generators, ShapesAndFiniteValues) {
  const shape shapes[] = {{1, 1, 1, 1},     {2, 1, 1, 2},     {7, 3, 1, 3},
                          {1500, 4, 2, 16}, {3000, 4, 4, 33}, {2048, 8, 2, 128}};
  for (family f : vattn::synth::all_families()) {
    for (const shape& s : shapes) {
      const problem p = vattn::synth::generate(f, s, 11);
      EXPECT_EQ(p.shp.n_tokens, s.n_tokens);
      EXPECT_EQ(p.shp.n_head_q, s.n_head_q);
      EXPECT_EQ(p.shp.n_head_kv, s.n_head_kv);
      EXPECT_EQ(p.shp.head_dim, s.head_dim);
      ASSERT_EQ(p.q.size(), static_cast<size_t>(s.n_head_q) * s.head_dim);
      ASSERT_EQ(p.k.size(), static_cast<size_t>(s.n_tokens) * s.n_head_kv * s.head_dim);
      ASSERT_EQ(p.v.size(), p.k.size());
      for (const std::vector<float>* x : {&p.q, &p.k, &p.v})
        for (float e : *x) ASSERT_TRUE(std::isfinite(e)) << vattn::synth::family_name(f);
      // Logits stay in a range where exp is well-conditioned in f32; values stay of order 1.
      for (int32_t h = 0; h < s.n_head_q; ++h) {
        for (double l : logits(p, h)) {
          EXPECT_GT(l, -16.0) << vattn::synth::family_name(f);
          EXPECT_LT(l, 18.0) << vattn::synth::family_name(f);
        }
      }
      for (float e : p.v) ASSERT_LT(std::fabs(e), 12.0f) << vattn::synth::family_name(f);
    }
  }
}

TEST(Generators, Deterministic) {
  const shape s{3000, 4, 2, 64};  // not a multiple of the generator's token blocks
  for (family f : vattn::synth::all_families()) {
    const problem a = vattn::synth::generate(f, s, 5), b = vattn::synth::generate(f, s, 5);
    EXPECT_EQ(a.q, b.q);
    EXPECT_EQ(a.k, b.k);
    EXPECT_EQ(a.v, b.v);
    const problem c = vattn::synth::generate(f, s, 6);
    EXPECT_NE(a.q, c.q);
    EXPECT_NE(a.k, c.k);
    EXPECT_NE(a.v, c.v);
  }
  // Families differ from each other (correlated_values shares q and K with heavy_hitters).
  const problem hh = vattn::synth::generate(family::heavy_hitters, s, 5);
  for (family f : vattn::synth::all_families()) {
    if (f == family::heavy_hitters) continue;
    const problem p = vattn::synth::generate(f, s, 5);
    EXPECT_NE(p.v, hh.v) << vattn::synth::family_name(f);
    if (f != family::correlated_values) {
      EXPECT_NE(p.k, hh.k) << vattn::synth::family_name(f);
    }
  }
}

// Pins the exact bytes: the RNG and arithmetic are platform-independent, so these hashes must
// hold on every compiler and CPU (little-endian byte order). A deliberate change of a generator
// updates them.
TEST(Generators, GoldenHashes) {
  const shape s{2048, 4, 2, 64};  // large enough to take the multi-threaded path
  const uint64_t expected[] = {0x2467662eb5c7e958ULL, 0x9b2a89ca640212d3ULL, 0x91a0d581d3e62beeULL,
                               0x8ff73e943a93d06eULL, 0x82fe3a07758af49eULL, 0xee6c2b1c361ee8e7ULL};
  for (family f : vattn::synth::all_families()) {
    const problem p = vattn::synth::generate(f, s, 7);
    const uint64_t h = fnv1a(p.v, fnv1a(p.k, fnv1a(p.q)));
    EXPECT_EQ(h, expected[static_cast<int>(f)])
        << vattn::synth::family_name(f) << ": got " << std::hex << std::showbase << h;
  }
}

// ----- each family's defining property -----

TEST(Generators, NeedleTopTokenHoldsMostMass) {
  for (const shape& s : {k_test_shape, shape{32768, 8, 2, 128}}) {
    int64_t strong = 0, total = 0;
    for (uint64_t seed : k_test_seeds) {
      const problem p = vattn::synth::generate(family::needle, s, seed);
      std::vector<int64_t> argmax;
      for (int32_t h = 0; h < s.n_head_q; ++h) {
        const std::vector<double> w = softmax(logits(p, h));
        const auto top = std::max_element(w.begin(), w.end());
        argmax.push_back(top - w.begin());
        strong += *top > 0.5;
        ++total;
      }
      // One needle per kv head, found by each of its query heads.
      const int32_t group = s.n_head_q / s.n_head_kv;
      for (int32_t h = 0; h < s.n_head_q; ++h) EXPECT_EQ(argmax[h], argmax[h / group * group]);
    }
    EXPECT_GE(strong, total * 3 / 4) << "n = " << s.n_tokens;
  }
}

TEST(Generators, HeavyHittersConcentrateMass) {
  const std::vector<head_stats> hs = family_heads(family::heavy_hitters);
  for (const head_stats& x : hs) EXPECT_GT(x.top2pct, 0.5);
  EXPECT_GT(mean_of(hs, &head_stats::top2pct), 0.7);
  // Several tokens share it: not a needle.
  EXPECT_LT(mean_of(hs, &head_stats::top1), 0.5);
}

TEST(Generators, UniformIsFlat) {
  for (const shape& s : {k_test_shape, shape{65536, 4, 1, 128}}) {
    for (const head_stats& x : family_heads(family::uniform, s)) {
      EXPECT_LT(x.top1, 10.0 / static_cast<double>(s.n_tokens));
      EXPECT_GT(x.entropy, 0.95);
    }
  }
}

TEST(Generators, PowerLawBetweenFlatAndPeaked) {
  const double flat = mean_of(family_heads(family::uniform), &head_stats::top5pct);
  const double peaked = mean_of(family_heads(family::needle), &head_stats::top5pct);
  const std::vector<head_stats> hs = family_heads(family::power_law);
  for (const head_stats& x : hs) {
    EXPECT_GT(x.top5pct, flat + 0.1);
    EXPECT_LT(x.top5pct, peaked);
  }
  // The sorted weights follow rank^-alpha, alpha in [0.6, 1.2]: the log-log slope over ranks
  // 10 .. n/2 (a least-squares fit) lies near -alpha.
  for (uint64_t seed : k_test_seeds) {
    const problem p = vattn::synth::generate(family::power_law, k_test_shape, seed);
    for (int32_t h = 0; h < k_test_shape.n_head_q; ++h) {
      std::vector<double> w = softmax(logits(p, h));
      std::sort(w.begin(), w.end(), std::greater<>());
      double sx = 0, sy = 0, sxx = 0, sxy = 0, cnt = 0;
      for (size_t r = 10; r <= w.size() / 2; ++r) {
        const double x = std::log(static_cast<double>(r)), y = std::log(w[r - 1]);
        sx += x;
        sy += y;
        sxx += x * x;
        sxy += x * y;
        ++cnt;
      }
      const double slope = (cnt * sxy - sx * sy) / (cnt * sxx - sx * sx);
      EXPECT_LT(slope, -0.5) << "seed " << seed << " head " << h;
      EXPECT_GT(slope, -1.35) << "seed " << seed << " head " << h;
    }
  }
}

TEST(Generators, ClusteredHotClusterHoldsMostMass) {
  const std::vector<head_stats> hs = family_heads(family::clustered);
  for (const head_stats& x : hs) {
    EXPECT_GT(x.top_eighth, 0.5);  // the hot cluster is ~n/8 tokens
    EXPECT_LT(x.top1, 0.05);       // spread over it, not peaked
    EXPECT_LT(x.top2pct, 0.6 * x.top_eighth);
  }
  // The keys cluster: the top-n/8 group (the hot cluster) is tighter around its mean key than
  // a same-sized group of arbitrary tokens (which mixes all clusters).
  const shape& s = k_test_shape;
  const int32_t d = s.head_dim;
  auto spread = [&](const problem& p, int32_t g, const std::vector<int64_t>& tokens) {
    std::vector<double> m(d, 0.0);
    for (int64_t i : tokens)
      for (int32_t c = 0; c < d; ++c) m[c] += p.k[(i * s.n_head_kv + g) * d + c];
    for (double& x : m) x /= static_cast<double>(tokens.size());
    double ss = 0;
    for (int64_t i : tokens) {
      for (int32_t c = 0; c < d; ++c) {
        const double x = p.k[(i * s.n_head_kv + g) * d + c] - m[c];
        ss += x * x;
      }
    }
    return ss / static_cast<double>(tokens.size());
  };
  for (uint64_t seed : k_test_seeds) {
    const problem p = vattn::synth::generate(family::clustered, s, seed);
    for (int32_t g = 0; g < s.n_head_kv; ++g) {
      const int32_t h = g * (s.n_head_q / s.n_head_kv);
      const std::vector<int64_t> order = order_by_weight(softmax(logits(p, h)));
      const std::vector<int64_t> top(order.begin(), order.begin() + s.n_tokens / 8);
      std::vector<int64_t> any(s.n_tokens / 8);
      for (size_t j = 0; j < any.size(); ++j) any[j] = static_cast<int64_t>(j) * 8 + 3;
      EXPECT_LT(spread(p, g, top), 0.8 * spread(p, g, any)) << "seed " << seed;
    }
  }
}

// correlated_values = heavy_hitters' q and K, with values shifted by beta * z(logit) along one
// direction w per kv head: recover w exactly from the difference, then compare the mean value
// of each head's top-5% tokens with the tail's, along w.
TEST(Generators, CorrelatedValuesShiftHighScoreTokens) {
  const shape& s = k_test_shape;
  const int32_t d = s.head_dim, group = s.n_head_q / s.n_head_kv;
  for (uint64_t seed : k_test_seeds) {
    const problem hh = vattn::synth::generate(family::heavy_hitters, s, seed);
    const problem cv = vattn::synth::generate(family::correlated_values, s, seed);
    ASSERT_EQ(hh.q, cv.q);
    ASSERT_EQ(hh.k, cv.k);
    for (int32_t g = 0; g < s.n_head_kv; ++g) {
      // The difference is rank one: every token's lies along w.
      std::vector<double> w(d, 0.0);
      double best = 0;
      for (int64_t i = 0; i < s.n_tokens; ++i) {
        std::vector<double> diff = value(cv, i, g), base = value(hh, i, g);
        for (int32_t c = 0; c < d; ++c) diff[c] -= base[c];
        if (norm(diff) > best) best = norm(diff), w = diff;
      }
      for (double& c : w) c /= best;
      for (int64_t i = 0; i < s.n_tokens; i += 37) {
        std::vector<double> diff = value(cv, i, g), base = value(hh, i, g);
        double along = 0;
        for (int32_t c = 0; c < d; ++c) along += (diff[c] - base[c]) * w[c];
        for (int32_t c = 0; c < d; ++c) diff[c] -= base[c] + along * w[c];
        EXPECT_LT(norm(diff), 1e-4) << "token " << i;
      }
      for (int32_t h = g * group; h < (g + 1) * group; ++h) {
        const std::vector<int64_t> order = order_by_weight(softmax(logits(cv, h)));
        const auto k5 = static_cast<ptrdiff_t>(s.n_tokens / 20);
        const std::vector<int64_t> top(order.begin(), order.begin() + k5);
        const std::vector<int64_t> tail(order.begin() + k5, order.end());
        auto gap_along_w = [&](const problem& p) {
          const std::vector<double> mt = mean_value(p, g, top), mr = mean_value(p, g, tail);
          double x = 0;
          for (int32_t c = 0; c < d; ++c) x += (mt[c] - mr[c]) * w[c];
          return x;
        };
        EXPECT_GT(gap_along_w(cv), 0.6) << "seed " << seed << " head " << h;
        EXPECT_LT(std::fabs(gap_along_w(hh)), 0.25) << "seed " << seed << " head " << h;
      }
    }
  }
  // Consequence: the top 5% alone is a clearly worse output on correlated_values.
  EXPECT_GT(mean_of(family_heads(family::correlated_values), &head_stats::topk_error),
            1.5 * mean_of(family_heads(family::heavy_hitters), &head_stats::topk_error));
}

// ----- properties shared by all families -----

// ||mean_i v_i|| is comparable to the RMS norm of v_i - mean: relative output errors stay
// well-conditioned on flat heads (SPEC section 8).
TEST(Generators, PerHeadValueMeanComparableToNoise) {
  const shape& s = k_test_shape;
  const int32_t d = s.head_dim;
  for (family f : vattn::synth::all_families()) {
    for (uint64_t seed : k_test_seeds) {
      const problem p = vattn::synth::generate(f, s, seed);
      for (int32_t g = 0; g < s.n_head_kv; ++g) {
        std::vector<int64_t> all(s.n_tokens);
        std::iota(all.begin(), all.end(), 0);
        const std::vector<double> m = mean_value(p, g, all);
        double ss = 0;
        for (int64_t i = 0; i < s.n_tokens; ++i) {
          const std::vector<double> v = value(p, i, g);
          for (int32_t c = 0; c < d; ++c) ss += (v[c] - m[c]) * (v[c] - m[c]);
        }
        const double ratio = norm(m) / std::sqrt(ss / static_cast<double>(s.n_tokens));
        EXPECT_GT(ratio, 0.3) << vattn::synth::family_name(f) << " seed " << seed;
        EXPECT_LT(ratio, 3.0) << vattn::synth::family_name(f) << " seed " << seed;
      }
    }
  }
}

// Query heads of one kv group see different but correlated logits; heads of different groups
// are unrelated (their keys are independent).
TEST(Generators, GqaHeadsDifferButCorrelate) {
  const shape& s = k_test_shape;
  const int32_t group = s.n_head_q / s.n_head_kv;
  for (family f : vattn::synth::all_families()) {
    const problem p = vattn::synth::generate(f, s, 3);
    std::vector<std::vector<double>> l;
    for (int32_t h = 0; h < s.n_head_q; ++h) l.push_back(logits(p, h));
    double within = 0, across = 0;
    int n_within = 0, n_across = 0;
    for (int32_t a = 0; a < s.n_head_q; ++a) {
      for (int32_t b = a + 1; b < s.n_head_q; ++b) {
        const double r = correlation(l[a], l[b]);
        if (a / group == b / group) {
          EXPECT_GT(r, 0.4) << vattn::synth::family_name(f) << " heads " << a << ", " << b;
          EXPECT_LT(r, 0.9999) << vattn::synth::family_name(f) << " heads " << a << ", " << b;
          double max_diff = 0;  // and not merely a rescaled copy
          for (int64_t i = 0; i < s.n_tokens; ++i)
            max_diff = std::max(max_diff, std::fabs(l[a][i] - l[b][i]));
          EXPECT_GT(max_diff, 0.1);
          within += r, ++n_within;
        } else {
          across += std::fabs(r), ++n_across;
        }
      }
    }
    EXPECT_GT(within / n_within, across / n_across + 0.3) << vattn::synth::family_name(f);
  }
}

// The table of docs/generators.md: per family, averaged over 16 query heads (n = 16K, 4 kv
// heads, head_dim 128, seed 1); the logit range is over all heads.
TEST(Generators, PrintFamilyTable) {
  const shape s{16384, 16, 4, 128};
  std::printf(
      "\n| family | top-1 mass | top-5%% mass | norm. entropy | top-5%%-only rel. error | "
      "residual skew | logit range |\n|---|---|---|---|---|---|---|\n");
  for (family f : vattn::synth::all_families()) {
    const std::vector<head_stats> hs = all_heads(vattn::synth::generate(f, s, 1));
    double lo = 1e300, hi = -1e300;
    for (const head_stats& x : hs) lo = std::min(lo, x.min_logit), hi = std::max(hi, x.max_logit);
    std::printf("| %s | %.3f | %.3f | %.3f | %.3f | %.1f | [%.1f, %.1f] |\n",
                vattn::synth::family_name(f), mean_of(hs, &head_stats::top1),
                mean_of(hs, &head_stats::top5pct), mean_of(hs, &head_stats::entropy),
                mean_of(hs, &head_stats::topk_error), mean_of(hs, &head_stats::resid_skew), lo, hi);
  }
}

// A long context with 8 kv heads must stay cheap: tests generate many problems.
TEST(Generators, LargeProblemIsFast) {
  const shape s{65536, 32, 8, 128};
  const auto t0 = std::chrono::steady_clock::now();
  const problem p = vattn::synth::generate(family::heavy_hitters, s, 1);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("generate(64K tokens, 8 kv heads, head_dim 128): %.3f s\n", secs);
  EXPECT_LT(secs, 10.0);  // generous: sanitizer and debug builds are slower
  for (size_t i = 0; i < p.k.size(); i += 4099) ASSERT_TRUE(std::isfinite(p.k[i]));
}

}  // namespace
