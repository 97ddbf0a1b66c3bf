// test_guarantee.cpp: the (eps, delta) guarantee tested statistically. For every budget mode and
// generator family, over 2000 independent cases (one problem and one head each), the failure
// rate P(rel. error of the mode's target > eps) must stay within delta plus a 99% binomial
// margin on the families in the CLT regime; the heavily skewed families are reported, not
// asserted (SPEC section 4, "Known limit"). Every figure is printed.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <vector>

#include "test_util.hpp"
#include "vattn/eval.hpp"
#include "vattn/reference.hpp"

using namespace vattn;

namespace {

constexpr int k_cases = 2000;
constexpr int32_t k_dim = 64, k_tokens = 2048;

// A case family: a generator family, optionally with the per-head value mean halved ("flat
// values": a smaller ||O|| relative to the sampling noise, so the value-based modes need more).
struct family_case {
  synth::family fam;
  bool flat_values;
  std::string name() const {
    return std::string(synth::family_name(fam)) + (flat_values ? "+flat_v" : "");
  }
  // Residual exp-scores light-tailed enough for the plug-in CLT bound. power_law (residual
  // skewness ~2.4) and clustered (~3.5: a small hot cluster among many cold tokens) are the
  // heavily skewed ones (docs/generators.md).
  bool in_clt_regime() const {
    return fam != synth::family::power_law && fam != synth::family::clustered;
  }
};

std::vector<family_case> cases() {
  std::vector<family_case> c;
  for (synth::family f : synth::all_families()) c.push_back({f, false});
  c.push_back({synth::family::uniform, true});
  return c;
}

void flatten_values(test::batch& b) {
  float* v = reinterpret_cast<float*>(b.v.data());
  const int64_t n = b.seq_len[0];
  for (int32_t h = 0; h < b.n_head_kv; ++h)
    for (int32_t j = 0; j < b.d; ++j) {
      double mean = 0;
      for (int64_t t = 0; t < n; ++t) mean += v[(t * b.n_head_kv + h) * b.d + j];
      mean /= double(n);
      for (int64_t t = 0; t < n; ++t) v[(t * b.n_head_kv + h) * b.d + j] -= float(0.5 * mean);
    }
}

}  // namespace

class Guarantee : public ::testing::TestWithParam<budget_mode> {};

TEST_P(Guarantee, FailureRateWithinDelta) {
  const budget_mode mode = GetParam();
  config base = parse_config("method=vattention,sink=32,local=32,topk=0.05,base=0.05");
  base.mode = mode;
  const eval::target tgt = eval::guarantee_target(base);
  std::printf("\nmode=%s (target %s), eps=delta=0.05, n=%d, head_dim %d, %d cases per family\n",
              budget_mode_name(mode), eval::target_name(tgt), k_tokens, k_dim, k_cases);
  std::printf("%-22s %8s %7s %9s %20s %9s %8s %9s  %s\n", "family", "density", "b>m", "fail_tgt",
              "95% CI", "fail_out", "allowed", "mean_err", "verdict");
  for (const family_case& fc : cases()) {
    std::vector<eval::tally> per_case(k_cases);
    std::vector<int> b_above_m(k_cases, 0);
#pragma omp parallel for schedule(dynamic, 8)
    for (int s = 0; s < k_cases; ++s) {
      test::batch b = test::make_batch(fc.fam, {k_tokens}, 1, 1, k_dim, dtype::f32,
                                       kv_layout::contiguous, 1000 + uint64_t(s));
      if (fc.flat_values) flatten_values(b);
      config cfg = base;
      cfg.seed = uint64_t(s) * 77 + 5;
      run_args a = b.args(uint64_t(s));
      for (const auto& r : reference::run(cfg, a)) {
        per_case[s].add(r, tgt, cfg.eps);
        b_above_m[s] += r.stats.b > r.stats.m;
      }
    }
    eval::tally t;
    int active = 0;
    for (int s = 0; s < k_cases; ++s) t.merge(per_case[s]), active += b_above_m[s];
    const int64_t fail_t = t.cases - t.target_ok, fail_o = t.cases - t.output_ok;
    const eval::interval ci = eval::wilson(fail_t, t.cases);
    const double allowed = eval::allowed_failures(base.delta, t.cases, 0.99);
    const double density = eval::summarize(t.density).mean;
    const bool asserted = fc.in_clt_regime();
    const bool ok = double(fail_t) <= allowed;
    std::printf(
        "%-22s %8.4f %7.3f %9.4f [%8.4f, %8.4f] %9.4f %8.1f %9.4f  %s\n", fc.name().c_str(),
        density, double(active) / k_cases, double(fail_t) / double(t.cases), ci.lo, ci.hi,
        double(fail_o) / double(t.cases), allowed, eval::summarize(t.err_target).mean,
        asserted ? (ok ? "ok" : "FAIL") : (ok ? "reported (ok)" : "reported (under-covers)"));
    EXPECT_EQ(t.cases, k_cases);
    // A budget that collapsed to the whole residual would pass coverage while wasting the point
    // (the flat-value variant legitimately needs most of its residual in the value modes).
    if (!fc.flat_values) {
      EXPECT_LT(density, 0.95) << fc.name();
    }
    if (asserted) {
      EXPECT_LE(double(fail_t), allowed)
          << fc.name() << ": " << fail_t << " failures in " << t.cases;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, Guarantee,
                         ::testing::Values(budget_mode::denominator, budget_mode::numerator,
                                           budget_mode::combined, budget_mode::output),
                         [](const auto& info) {
                           return std::string(budget_mode_name(info.param));
                         });
