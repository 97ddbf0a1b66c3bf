// test_guarantee.cpp: the (eps, delta) guarantee tested statistically. For every budget mode and
// generator family, over 2000 (seed, head) cases, the failure rate P(rel. error of the mode's
// target > eps) must stay within delta plus a 99% binomial margin on the families in the CLT
// regime; the heavily skewed families are reported, not asserted (SPEC section 4, "Known limit").
#include <gtest/gtest.h>

#include <cstdio>
#include <map>
#include <vector>

#include "test_util.hpp"
#include "vattn/eval.hpp"
#include "vattn/reference.hpp"

using namespace vattn;

namespace {

constexpr int k_seeds = 250;  // x 8 query heads = 2000 cases per (mode, family)
constexpr int32_t k_heads = 8, k_kv_heads = 2, k_dim = 64, k_tokens = 2048;

// Families whose residual (after sinks, local and top-5%) has light-tailed exp-scores, where the
// plug-in CLT bound holds. power_law (residual skewness ~2.4) and clustered (~3.5, a small hot
// cluster among many cold tokens) are the heavily skewed ones: reported, not asserted.
// Skewness figures: docs/generators.md.
bool in_clt_regime(synth::family f) {
  return f == synth::family::uniform || f == synth::family::heavy_hitters ||
         f == synth::family::needle || f == synth::family::correlated_values;
}

config guarantee_config(budget_mode mode) {
  config c = parse_config("method=vattention,sink=32,local=32,topk=0.05,base=0.05");
  c.mode = mode;
  c.eps = 0.05;
  c.delta = 0.05;
  return c;
}

}  // namespace

class Guarantee : public ::testing::TestWithParam<budget_mode> {};

TEST_P(Guarantee, FailureRateWithinDelta) {
  const budget_mode mode = GetParam();
  const config base = guarantee_config(mode);
  const eval::target tgt = eval::guarantee_target(base);
  std::printf("\nmode=%s (target %s), eps=delta=0.05, n=%d, %d cases per family\n",
              budget_mode_name(mode), eval::target_name(tgt), k_tokens, k_seeds * k_heads);
  std::printf("%-18s %9s %9s %20s %9s %10s %10s  %s\n", "family", "density", "fail_tgt", "95% CI",
              "fail_out", "allowed", "mean_err", "verdict");
  for (synth::family fam : synth::all_families()) {
    std::vector<eval::tally> per_seed(k_seeds);
#pragma omp parallel for schedule(dynamic, 4)
    for (int s = 0; s < k_seeds; ++s) {
      test::batch b = test::make_batch(fam, {k_tokens}, k_heads, k_kv_heads, k_dim, dtype::f32,
                                       kv_layout::contiguous, 1000 + uint64_t(s));
      config cfg = base;
      cfg.seed = uint64_t(s) * 77 + 5;
      run_args a = b.args(uint64_t(s));
      for (const auto& r : reference::run(cfg, a)) per_seed[s].add(r, tgt, cfg.eps);
    }
    eval::tally t;
    for (const auto& x : per_seed) t.merge(x);
    const int64_t fail_t = t.cases - t.target_ok, fail_o = t.cases - t.output_ok;
    const eval::interval ci = eval::wilson(fail_t, t.cases);
    const double allowed = eval::allowed_failures(base.delta, t.cases, 0.99);
    const bool asserted = in_clt_regime(fam);
    const bool ok = double(fail_t) <= allowed;
    std::printf(
        "%-18s %9.4f %9.4f [%8.4f, %8.4f] %9.4f %10.1f %10.4f  %s\n", synth::family_name(fam),
        eval::summarize(t.density).mean, double(fail_t) / double(t.cases), ci.lo, ci.hi,
        double(fail_o) / double(t.cases), allowed, eval::summarize(t.err_target).mean,
        asserted ? (ok ? "ok" : "FAIL") : (ok ? "reported (ok)" : "reported (under-covers)"));
    EXPECT_EQ(t.cases, k_seeds * k_heads);
    if (asserted) {
      EXPECT_LE(double(fail_t), allowed)
          << synth::family_name(fam) << ": " << fail_t << " failures in " << t.cases;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, Guarantee,
                         ::testing::Values(budget_mode::denominator, budget_mode::numerator,
                                           budget_mode::combined, budget_mode::output),
                         [](const auto& info) {
                           return std::string(budget_mode_name(info.param));
                         });
