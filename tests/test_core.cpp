// test_core.cpp: the building blocks: normal quantile, keyed permutation, budgets, config.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "core/budget.hpp"
#include "core/sampler.hpp"
#include "vattn/vattn.hpp"

using namespace vattn;
using namespace vattn::detail;

TEST(NormalQuantile, KnownValues) {
  // Values of Phi^-1 to 16 digits.
  EXPECT_NEAR(normal_quantile(0.5), 0.0, 1e-15);
  EXPECT_NEAR(normal_quantile(0.975), 1.959963984540054, 1e-13);
  EXPECT_NEAR(normal_quantile(0.95), 1.6448536269514722, 1e-13);
  EXPECT_NEAR(normal_quantile(0.995), 2.5758293035489004, 1e-13);
  EXPECT_NEAR(normal_quantile(0.9875), 2.241402727604947, 1e-12);
  EXPECT_NEAR(normal_quantile(0.02), -2.053748910631823, 1e-12);
  EXPECT_NEAR(normal_quantile(1e-10), -6.361340902404056, 1e-10);
  EXPECT_NEAR(normal_quantile(1 - 1e-10), 6.361340889697422, 1e-6);  // 1 - 1e-10 is inexact
  for (double p : {1e-8, 0.01, 0.3, 0.7, 0.99, 0.999999})
    EXPECT_NEAR(normal_quantile(p), -normal_quantile(1 - p),
                1e-7 * (1 + std::abs(normal_quantile(p))));
  // Round trip through Phi.
  for (double p = 0.001; p < 1; p += 0.0137) {
    const double x = normal_quantile(p);
    EXPECT_NEAR(0.5 * std::erfc(-x / std::sqrt(2.0)), p, 1e-14);
  }
  EXPECT_THROW(normal_quantile(0), error);
  EXPECT_THROW(normal_quantile(1), error);
  EXPECT_THROW(normal_quantile(std::nan("")), error);
}

TEST(Permutation, IsABijectionForAwkwardSizes) {
  for (uint64_t n : {1, 2, 3, 4, 5, 7, 9, 16, 17, 33, 100, 129, 257, 1000, 4096, 4097, 65537}) {
    for (uint64_t key : {0ull, 1ull, 0xdeadbeefull}) {
      keyed_permutation p(key, n);
      std::vector<char> seen(n, 0);
      for (uint64_t i = 0; i < n; ++i) {
        const uint64_t x = p(i);
        ASSERT_LT(x, n);
        ASSERT_FALSE(seen[x]) << "repeat at n=" << n << " i=" << i;
        seen[x] = 1;
      }
    }
  }
}

// The one-evaluation entry point the GPU walk uses: step(i), then step while out of range, is
// operator()(i) for every position, and step is a bijection of the network's domain.
TEST(Permutation, StepWalkEqualsTheWalk) {
  for (uint64_t n : {1, 2, 5, 17, 255, 256, 257, 1000, 4097, 65537, 131072}) {
    for (uint64_t key : {uint64_t{0}, uint64_t{7}, sample_key(1, 2, 3, 4, 5)}) {
      keyed_permutation p(key, n);
      for (uint64_t i = 0; i < n; ++i) {
        uint64_t x = p.step(i);
        while (x >= n) x = p.step(x);
        ASSERT_EQ(x, p(i)) << "n=" << n << " i=" << i;
      }
    }
  }
  keyed_permutation p(3, 1000);  // 1000: 10 bits, halves of 5 bits, domain 1024
  ASSERT_EQ(p.half_bits(), 5u);
  std::vector<char> seen(1024, 0);
  for (uint64_t x = 0; x < 1024; ++x) {
    const uint64_t y = p.step(x);
    ASSERT_LT(y, 1024u);
    ASSERT_FALSE(seen[y]);
    seen[y] = 1;
  }
}

// The round function tabulated (as the GPU walk does, one table per round) gives step() exactly.
TEST(Permutation, TabulatedRoundsGiveTheStep) {
  for (uint64_t n : {3, 256, 300, 4097, 131072, 1000003}) {
    const keyed_permutation p(sample_key(9, 1, 0, 2, 7), n);
    const uint64_t half = uint64_t(1) << p.half_bits();
    std::vector<uint32_t> table(keyed_permutation::k_rounds * half);
    for (int k = 0; k < keyed_permutation::k_rounds; ++k)
      for (uint64_t r = 0; r < half; ++r) {
        table[k * half + r] = uint32_t(p.round_fn(k, r));
        ASSERT_LT(table[k * half + r], half);
      }
    auto f = [&](int k, uint64_t r) { return uint64_t(table[k * half + r]); };
    for (uint64_t x = 0; x < half * half; x += (half * half) / 5000 + 1)
      ASSERT_EQ(p.step_with(x, f), p.step(x)) << "n=" << n << " x=" << x;
  }
}

TEST(Permutation, KeysGiveDifferentOrders) {
  keyed_permutation a(1, 1000), b(2, 1000);
  int same = 0;
  for (uint64_t i = 0; i < 1000; ++i) same += a(i) == b(i);
  EXPECT_LT(same, 10);
  EXPECT_NE(sample_key(0, 0, 0, 0, 0), sample_key(0, 0, 0, 0, 1));
  EXPECT_NE(sample_key(0, 0, 0, 1, 0), sample_key(0, 0, 1, 0, 0));
  EXPECT_NE(sample_key(1, 0, 0, 0, 0), sample_key(0, 1, 0, 0, 0));
}

// Chi-square of inclusion counts of a prefix of size b over many keys: under uniform sampling
// without replacement every element is included with probability b/n. With n - 1 = 49 degrees
// of freedom the 0.9999 quantile is about 94.5.
TEST(Permutation, PrefixInclusionIsUniform) {
  for (uint64_t n : {50ull, 37ull}) {
    const uint64_t b = 10, keys = 20000;
    std::vector<double> count(n, 0), first(n, 0);
    for (uint64_t key = 0; key < keys; ++key) {
      keyed_permutation p(sample_key(7, 0, 0, 0, key), n);
      for (uint64_t i = 0; i < b; ++i) count[p(i)] += 1;
      first[p(0)] += 1;
    }
    auto chi2 = [&](const std::vector<double>& c, double expected) {
      double x = 0;
      for (double v : c) x += (v - expected) * (v - expected) / expected;
      return x;
    };
    // Inclusion counts of a without-replacement sample have variance E (1 - b/n) (n-1)/n ... the
    // plain statistic is conservative (smaller) for them.
    const double limit = n == 50 ? 94.5 : 75.0;  // df 49 / 36 at 0.9999
    EXPECT_LT(chi2(count, double(keys * b) / double(n)), limit) << "n=" << n;
    EXPECT_LT(chi2(first, double(keys) / double(n)), limit) << "n=" << n;
  }
}

// Pairs: P(i and j both in a prefix of size b) = b(b-1)/(n(n-1)) for every pair. Small n is the
// hard case for a Feistel network (narrow halves); the chi-square bound is the 0.9999 quantile.
TEST(Permutation, PairInclusionIsUniform) {
  struct pair_case {
    uint64_t n, b, keys;
    double limit;
  };
  for (const pair_case& c : {pair_case{5, 2, 200000, 34.1}, pair_case{8, 3, 300000, 63.4},
                             pair_case{12, 4, 200000, 116.3}}) {
    const uint64_t n = c.n;
    std::vector<double> pair(n * n, 0);
    for (uint64_t key = 0; key < c.keys; ++key) {
      keyed_permutation p(sample_key(3, 1, 2, 3, key), n);
      std::vector<uint64_t> s;
      for (uint64_t i = 0; i < c.b; ++i) s.push_back(p(i));
      for (uint64_t x : s)
        for (uint64_t y : s)
          if (x < y) pair[x * n + y] += 1;
    }
    const double expected = double(c.keys) * double(c.b * (c.b - 1)) / double(n * (n - 1));
    double chi = 0;
    for (uint64_t x = 0; x < n; ++x)
      for (uint64_t y = x + 1; y < n; ++y)
        chi += (pair[x * n + y] - expected) * (pair[x * n + y] - expected) / expected;
    EXPECT_LT(chi, c.limit) << "n=" << n << " (" << n * (n - 1) / 2 - 1 << " df)";
  }
}

// The residual walk skips F and visits every other token once, in a keyed order.
TEST(ResidualWalk, VisitsResidualOnce) {
  const uint64_t n = 300;
  std::vector<char> in_f(n, 0);
  for (uint64_t t = 0; t < n; t += 7) in_f[t] = 1;
  const uint64_t n_s = n - std::count(in_f.begin(), in_f.end(), 1);
  residual_walk w(42, n);
  std::vector<char> seen(n, 0);
  for (uint64_t j = 0; j < n_s; ++j) {
    const uint64_t t = w.next([&](uint64_t x) { return in_f[x] != 0; });
    ASSERT_FALSE(in_f[t]);
    ASSERT_FALSE(seen[t]);
    seen[t] = 1;
  }
}

// A residual of n tokens: about tenths/10 of them (and token 0) in F, and the tokens repeated
// next() calls of a walk keyed by key give.
struct walk_case {
  std::vector<char> in_f;
  int64_t n_s;
  uint64_t key;
  std::vector<int32_t> want;
  walk_case(uint64_t n, uint64_t salt, uint64_t tenths, uint64_t k) : in_f(n, 0), key(k) {
    for (uint64_t t = 0; t < n; ++t) in_f[t] = (mix64(salt + t) % 10) < tenths;
    in_f[0] = 1;
    n_s = int64_t(n) - std::count(in_f.begin(), in_f.end(), 1);
    residual_walk ref(key, n);
    auto f = [&](uint64_t x) { return in_f[x] != 0; };
    for (int64_t j = 0; j < n_s; ++j) want.push_back(int32_t(ref.next(f)));
  }
  bool operator()(uint64_t x) const { return in_f[x] != 0; }  // in F
  // w's round table when asked for and possible (into table), else nullptr.
  std::vector<uint16_t> table = std::vector<uint16_t>(keyed_permutation::k_table_entries);
  const uint16_t* table_for(const residual_walk& w, bool tabled) {
    if (!tabled || !w.permutation().tabulable()) return nullptr;
    w.permutation().tabulate(table.data());
    return table.data();
  }
};

// take() (blocks of positions walked at once, with or without round tables) gives exactly the
// tokens of repeated next() calls, across calls of every size and up to the residual's end.
TEST(ResidualWalk, TakeEqualsNext) {
  const uint64_t sizes[] = {3, 17, 256, 300, 4096, 131072, 1 << 20, (1 << 20) + 1};
  for (uint64_t n : sizes) {
    SCOPED_TRACE("n=" + std::to_string(n));
    walk_case wc(n, n, 3, sample_key(5, 2, int64_t(n), 1, 9));  // ~30% in F
    const walk_case& f = wc;
    const int64_t n_s = wc.n_s;
    for (bool tabled : {false, true}) {
      residual_walk w(wc.key, n);
      const uint16_t* tb = wc.table_for(w, tabled);
      EXPECT_EQ(w.permutation().tabulable(), n <= (uint64_t(1) << 20));
      std::vector<int32_t> got(size_t(n_s) + 1, -1);  // one guard entry past the end
      int64_t at = 0;
      for (int64_t step :
           {int64_t(0), int64_t(1), int64_t(31), int64_t(32), int64_t(33), int64_t(1000)}) {
        const int64_t c = std::min(step, n_s - at);
        std::fill(got.begin() + at, got.end(), -1);
        w.take(c, f, got.data() + at, tb);
        ASSERT_EQ(got[size_t(at + c)], -1) << "take wrote past its count";
        at += c;
      }
      w.take(n_s - at, f, got.data() + at, tb);
      EXPECT_EQ(got[size_t(n_s)], -1) << "take wrote past its count";
      got.pop_back();
      EXPECT_EQ(got, wc.want) << (tb ? "with tables" : "without tables");
      // the residual is exhausted: a further take returns without writing (or looping)
      int32_t none = -1;
      w.take(1, f, &none, tb);
      EXPECT_EQ(none, -1);
    }
  }
}

// values() over split ranges and take_values() (the threaded walk) give take()'s tokens: ranges
// too short, just long enough and longer than the tokens asked for, then take() after them; so
// does take_ahead() however its spans are sized and its blocks ordered.
TEST(ResidualWalk, ValuesThenTakeValuesEqualsNext) {
  for (uint64_t n : {uint64_t(300), uint64_t(4096), uint64_t(131072), uint64_t(1 << 20) + 1}) {
    SCOPED_TRACE("n=" + std::to_string(n));
    walk_case wc(n, 3 * n, 4, sample_key(7, 1, int64_t(n), 3, 2));  // ~40% in F
    const walk_case& f = wc;
    const int64_t n_s = wc.n_s;
    for (bool tabled : {false, true}) {
      residual_walk w(wc.key, n);
      const uint16_t* tb = wc.table_for(w, tabled);
      std::vector<int32_t> got(size_t(n_s) + 1, -1), vals(n);
      int64_t at = 0;
      // (tokens asked, positions evaluated): fewer positions than needed, then more
      const std::pair<int64_t, int64_t> rounds[] = {{50, 20}, {40, 200}, {1, 1}, {700, 5000}};
      for (auto [ask, span] : rounds) {
        const int64_t c = std::min(ask, n_s - at);
        const uint64_t pos = w.position();
        const int64_t nv = std::min<int64_t>(span, int64_t(n - pos));
        // two ranges, the later one first: values() must not depend on call order
        const int64_t half = nv / 2;
        w.values(pos + uint64_t(half), nv - half, vals.data() + half, tb);
        w.values(pos, half, vals.data(), tb);
        const int64_t took = w.take_values(vals.data(), nv, c, f, got.data() + at);
        ASSERT_LE(took, c);
        ASSERT_EQ(got[size_t(at + c)], -1) << "take_values wrote past its count";
        at += took;
      }
      w.take(n_s - at, f, got.data() + at, tb);
      got.pop_back();
      EXPECT_EQ(got, wc.want) << (tb ? "with tables" : "without tables");

      // take_ahead: blocks evaluated last to first; a hint of F's size that is exact, too small
      // (spans short of the tokens wanted: several rounds) or too large (spans to the end).
      const int64_t n_f = int64_t(n) - n_s;
      for (int64_t hint : {n_f, int64_t(0), int64_t(n) - 1}) {
        for (int64_t grain : {int64_t(16), int64_t(1024)}) {
          residual_walk a(wc.key, n);
          std::vector<int32_t> out(size_t(n_s) + 1, -1);
          int64_t rounds = 0;
          auto backwards = [&](int64_t nv, const auto& eval) {
            ++rounds;
            for (int64_t i = (nv - 1) / grain * grain; i >= 0; i -= grain) eval(i);
          };
          const int64_t first = std::min<int64_t>(n_s, 3000);
          a.take_ahead(first, f, out.data(), tb, vals.data(), grain, hint, backwards);
          a.take_ahead(n_s - first, f, out.data() + first, tb, vals.data(), grain, hint, backwards);
          EXPECT_EQ(out[size_t(n_s)], -1) << "take_ahead wrote past its count";
          out.pop_back();
          EXPECT_EQ(out, wc.want) << "hint " << hint << " grain " << grain;
          if (hint == 0 && grain == 16 && n >= 4096) {  // spans short by ~40% (in F)
            EXPECT_GT(rounds, 2) << "hint 0 takes several rounds";
          }
        }
      }
    }
  }
}

TEST(UniformDraw, InRangeAndUniform) {
  const uint64_t n = 40, draws = 80000;
  std::vector<double> c(n, 0);
  for (uint64_t j = 0; j < draws; ++j) {
    uint64_t x = uniform_draw(99, j, n);
    ASSERT_LT(x, n);
    c[x] += 1;
  }
  double chi = 0, e = double(draws) / n;
  for (double v : c) chi += (v - e) * (v - e) / e;
  EXPECT_LT(chi, 80.0);  // 39 df, 0.9999 quantile ~ 77
}

TEST(Budget, DenominatorHandComputed) {
  base_moments mm;
  mm.n_s = 1000;
  mm.m = 50;
  mm.d_hat = 10;
  mm.var_e = 1e-4;  // sd 0.01
  // b0 = (1.959964 * 1000 * 0.01 / (0.05 * 10))^2 = 1536.58; b = ceil(b0 * 1000 / (b0 + 1000))
  budget b = compute_budget(budget_mode::denominator, 0.05, 0.05, mm);
  const double z = 1.959963984540054, b0 = std::pow(z * 1000 * 0.01 / 0.5, 2);
  EXPECT_NEAR(b.b0, b0, 1e-9);
  EXPECT_EQ(b.b, int64_t(std::ceil(b0 * 1000 / (b0 + 1000))));
  EXPECT_EQ(b.b, 606);
  // At b the half-width z n_s sd sqrt(1/b - 1/n_s) / D is just under eps.
  EXPECT_LE(b.est_rel_error, 0.05);
  EXPECT_GT(b.est_rel_error, 0.0499);
}

TEST(Budget, ClampsAndFpc) {
  EXPECT_EQ(fpc_budget(0, 1000, 20), 20);
  EXPECT_EQ(fpc_budget(INFINITY, 1000, 20), 1000);
  EXPECT_EQ(fpc_budget(NAN, 1000, 20), 1000);
  EXPECT_EQ(fpc_budget(1e12, 1000, 20), 1000);
  EXPECT_EQ(fpc_budget(100, 100, 2), 50);  // b0 n/(b0+n) = 50
  // Zero variance: the base sample suffices.
  base_moments mm{1000, 50, 10, 0, 0, 1, 0, 1};
  EXPECT_EQ(compute_budget(budget_mode::denominator, 0.05, 0.05, mm).b, 50);
}

TEST(Budget, NumeratorUsesDebiasedNorm) {
  base_moments mm{1000, 50, 10, 1e-4, 4e-4, 4.0, 0, 0};
  const double z = 1.959963984540054;
  const double noise = 1000.0 * 1000.0 * (1.0 / 50 - 1.0 / 1000) * 4e-4;  // 7.6
  // plug-in ||N||^2 = 4 < noise: floored at 1% of 4
  const double n2 = std::max(4.0 - noise, 0.01 * 4.0);
  const double b0 = std::pow(z * 1000 * std::sqrt(4e-4) / (0.05 * std::sqrt(n2)), 2);
  EXPECT_NEAR(compute_budget(budget_mode::numerator, 0.05, 0.05, mm).b0, b0, 1e-6 * b0);
}

TEST(Budget, OutputAndCombined) {
  base_moments mm{10000, 500, 50, 1e-3, 2e-3, 2500 * 0.8, 1e-3, 0.8};
  const double z = 1.959963984540054;
  const double noise = 1e4 * 1e4 * (1.0 / 500 - 1e-4) * 1e-3 / (50.0 * 50.0);
  const double o2 = std::max(0.8 - noise, 0.008);
  const double b0 = std::pow(z * 1e4 * std::sqrt(1e-3) / (0.05 * 50 * std::sqrt(o2)), 2);
  EXPECT_NEAR(compute_budget(budget_mode::output, 0.05, 0.05, mm).b0, b0, 1e-6 * b0);
  // combined: eps' = eps / (2 + eps), z' = Phi^-1(1 - delta/4), max of D and N budgets
  const double e2 = 0.05 / 2.05, z2 = normal_quantile(1 - 0.0125);
  const double bd = std::pow(z2 * 1e4 * std::sqrt(1e-3) / (e2 * 50), 2);
  const double nn = std::max(2000.0 - 1e8 * (1.0 / 500 - 1e-4) * 2e-3, 20.0);
  const double bn = std::pow(z2 * 1e4 * std::sqrt(2e-3) / (e2 * std::sqrt(nn)), 2);
  budget c = compute_budget(budget_mode::combined, 0.05, 0.05, mm);
  EXPECT_NEAR(c.b0, std::max(bd, bn), 1e-6 * std::max(bd, bn));
}

// budget_uses_v_moments says which modes read var_ev, var_eo and the norms: changing them moves
// the budget and the error estimate of exactly those modes.
TEST(Budget, UsesVMomentsMatchesWhatEachModeReads) {
  const base_moments mm{10000, 500, 50, 1e-3, 2e-3, 2500 * 0.8, 1e-3, 0.8};
  base_moments other = mm;
  other.var_ev *= 3, other.n_norm2 *= 0.5, other.var_eo *= 3, other.o_norm2 *= 0.5;
  for (budget_mode mode : {budget_mode::denominator, budget_mode::numerator, budget_mode::combined,
                           budget_mode::output}) {
    SCOPED_TRACE(budget_mode_name(mode));
    const bool moved =
        compute_budget(mode, 0.05, 0.05, mm).b0 != compute_budget(mode, 0.05, 0.05, other).b0 ||
        estimated_rel_error(mode, 0.05, mm, 800) != estimated_rel_error(mode, 0.05, other, 800);
    EXPECT_EQ(moved, budget_uses_v_moments(mode));
  }
}

TEST(Budget, HubRule) {
  // b = (z sd n_s / max(eps D, 1e-8))^2 clamped to [1, n_s], truncated, clamped to [m, n_s].
  EXPECT_EQ(hub_budget(1.6448536269514722, 0.001, 10, 0.05, 10000, 5),
            int64_t(std::pow(1.6448536269514722 * 0.001 * 10000 / 0.5, 2)));
  EXPECT_EQ(hub_budget(1.64, 0.0, 10, 0.05, 1000, 5), 5);
  EXPECT_EQ(hub_budget(1.64, 1.0, 0.0, 0.05, 1000, 5), 1000);
}

TEST(Stages, SizesAndDenseFallback) {
  config c = method_config("vattention");
  stage_sizes s = resolve_stages(c, 10000);
  EXPECT_EQ(s.n_sink, 128);
  EXPECT_EQ(s.n_local, 128);
  EXPECT_EQ(s.k, 500);
  EXPECT_FALSE(s.dense);
  EXPECT_TRUE(resolve_stages(c, 256).dense);  // n <= sink + local
  EXPECT_TRUE(resolve_stages(c, 257).dense);  // residual of 1 token
  EXPECT_FALSE(resolve_stages(c, 300).dense);
  EXPECT_EQ(floor_fraction(0.29, 100), 29);
  EXPECT_EQ(ceil_fraction(0.05, 2000), 100);
  EXPECT_EQ(base_sample_size(c, 2000), 100);
  EXPECT_EQ(base_sample_size(c, 3), 2);
  EXPECT_EQ(base_sample_size(c, 2), 2);
}

TEST(Config, PresetsValidate) {
  for (const char* m : {"dense", "sink_local", "topk", "topp", "random", "vattention", "hub"})
    EXPECT_NO_THROW(method_config(m).validate()) << m;
  EXPECT_THROW(method_config("nope"), error);
}

TEST(Config, ParseAndRoundTrip) {
  config c = parse_config("method=vattention,eps=0.1,delta=0.02,sink=64,local=5%,mode=output");
  EXPECT_EQ(c.sink.value, 64);
  EXPECT_FALSE(c.sink.fraction);
  EXPECT_TRUE(c.local.fraction);
  EXPECT_DOUBLE_EQ(c.local.value, 0.05);
  EXPECT_EQ(c.mode, budget_mode::output);
  EXPECT_DOUBLE_EQ(c.eps, 0.1);
  config d = parse_config(c.to_string());
  EXPECT_EQ(d.to_string(), c.to_string());
  EXPECT_EQ(parse_config("method=dense").to_string(), parse_config("dense=1").to_string());
}

// Each rejection names the offending key.
TEST(Config, RejectsWithNamedArgument) {
  auto msg = [](const char* text) {
    try {
      parse_config(text).validate();
    } catch (const error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(msg("method=vattention,eps=0").find("eps"), std::string::npos);
  EXPECT_NE(msg("method=vattention,eps=1.5").find("eps"), std::string::npos);
  EXPECT_NE(msg("method=vattention,delta=1").find("delta"), std::string::npos);
  EXPECT_NE(msg("method=vattention,delta=-0.1").find("delta"), std::string::npos);
  EXPECT_NE(msg("method=vattention,eps=nan").find("eps"), std::string::npos);
  EXPECT_NE(msg("method=topk,topk=1.5").find("topk"), std::string::npos);
  EXPECT_NE(msg("method=topk,sink=-3").find("sink"), std::string::npos);
  EXPECT_NE(msg("method=topk,sink=2.5x").find("sink"), std::string::npos);
  EXPECT_NE(msg("method=topp,top_p=0").find("top_p"), std::string::npos);
  EXPECT_NE(msg("method=dense,sink=3").find("dense"), std::string::npos);
  EXPECT_NE(msg("method=vattention,hub=1,mode=output").find("hub"), std::string::npos);
  EXPECT_NE(msg("method=random,sample_rate=2").find("sample_rate"), std::string::npos);
  EXPECT_NE(msg("method=vattention,base=1").find("base"), std::string::npos);
  EXPECT_NE(msg("eps=0.1,method=dense").find("method"), std::string::npos);
  EXPECT_NE(msg("method=vattention,colour=red").find("colour"), std::string::npos);
  EXPECT_NE(msg("method=vattention,eps").find("key=value"), std::string::npos);
  EXPECT_NE(msg("sample=none").find("selects no token"), std::string::npos);
  EXPECT_NE(msg("method=hub,gqa_shared=1").find("gqa_shared"), std::string::npos);
  EXPECT_NE(msg("method=vattention,predictor=lsh").find("predictor"), std::string::npos);
  EXPECT_NE(msg("method=topp,predictor=pages").find("select=topk"), std::string::npos);
  EXPECT_NE(msg("dense=1,predictor=pages").find("predictor must be oracle"), std::string::npos);
  EXPECT_NE(msg("method=hub,predictor=signs").find("hub"), std::string::npos);
  EXPECT_NE(msg("method=vattention,predictor=signs,bits=48").find("pred_bits"), std::string::npos);
  EXPECT_NE(msg("method=vattention,predictor=signs,bits=512").find("pred_bits"), std::string::npos);
  EXPECT_NE(msg("method=vattention,predictor=pages,pred_page=0").find("pred_page"),
            std::string::npos);
}

TEST(Config, PredictorsParseAndRoundTrip) {
  for (const char* text :
       {"method=vattention,predictor=pages,pred_page=32", "method=topk,predictor=signs,bits=128",
        "method=vattention,predictor=quest", "method=vattention,predictor=simhash,bits=32"}) {
    const config c = parse_config(text);
    EXPECT_NE(c.pred, predictor::oracle) << text;
    EXPECT_EQ(parse_config(c.to_string()).to_string(), c.to_string()) << text;
  }
  EXPECT_EQ(parse_config("method=vattention,predictor=pages,pred_page=32").pred_page, 32);
  EXPECT_EQ(parse_config("method=topk,predictor=signs,bits=128").pred_bits, 128);
  EXPECT_STREQ(predictor_name(predictor::sign_bits), "signs");
}
