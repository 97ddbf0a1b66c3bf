// budget.hpp: the statistics behind vAttention's guarantee: the normal quantile, plug-in
// moments of the base sample and the sample budget b they imply (SPEC section 4).
#pragma once

#include <cstdint>

#include "vattn/vattn.hpp"

namespace vattn::detail {

// Phi^-1(p) for p in (0, 1): Acklam's rational approximation refined by one Halley step
// against erfc, accurate to about 1e-15 relative. Throws vattn::error outside (0, 1).
double normal_quantile(double p);

// Plug-in moments measured on F and the base sample B (weights n_s / m), all in one
// stabilised exp scale. Sums over B are of e_j, e_j^2 and, summed over dims d, the
// per-dim variances needed by each mode.
struct base_moments {
  int64_t n_s = 0;     // residual size
  int64_t m = 0;       // base sample size (>= 2)
  double d_hat = 0;    // D^_B = sum_F e + (n_s/m) sum_B e
  double var_e = 0;    // unbiased variance of e over B
  double var_ev = 0;   // sum_d unbiased var_B(e v_d)
  double n_norm2 = 0;  // ||N^_B||^2
  double var_eo = 0;   // sum_d unbiased var_B(e (v_d - O^_B_d))
  double o_norm2 = 0;  // ||O^_B||^2
};

// Variances are floored at this value: a base sample of identical exp-scores would otherwise
// ask for b = m with no evidence about the rest of the residual.
inline constexpr double k_var_floor = 1e-30;
// The debiased squared norm is floored at this fraction of the plug-in squared norm.
inline constexpr double k_norm_floor_fraction = 1e-2;

struct budget {
  int64_t b = 0;             // final sample size in [m, n_s]
  double b0 = 0;             // with-replacement budget before the finite-population correction
  double est_rel_error = 0;  // CLT half-width at b over the estimate, for the mode's target
};

// Whether `mode`'s budget and error estimate read the V moments (var_ev, var_eo and the norms):
// the denominator mode reads d_hat and var_e alone, so a backend may skip summing V for it.
bool budget_uses_v_moments(budget_mode mode);

// b from (eps, delta) for `mode` (SPEC section 4, with FPC and debiased norms).
budget compute_budget(budget_mode mode, double eps, double delta, const base_moments& mm);

// b = ceil(b0 n_s / (b0 + n_s)) clamped to [m, n_s]; b0 may be +inf.
int64_t fpc_budget(double b0, int64_t n_s, int64_t m);

// Hub compatibility (SPEC section 6): b = (z sd n_s / max(eps D^_B, 1e-8))^2 clamped to [1, n_s],
// truncated, clamped to [m, n_s].
int64_t hub_budget(double z, double sd, double d_hat, double eps, int64_t n_s, int64_t m);

}  // namespace vattn::detail

namespace vattn::detail {

// Sizes of the deterministic stages for a sequence of n tokens (SPEC section 2).
struct stage_sizes {
  int64_t n_sink = 0, n_local = 0, k = 0;
  int64_t shortlist = 0;  // refine: min(middle, ceil(refine * k)) tokens, else 0
  bool dense = false;     // exact attention: dense=1, or too short for sparsity
};
stage_sizes resolve_stages(const config& cfg, int64_t n);

// floor(f n) and ceil(f n) with a 1e-12 relative tolerance, so 0.29 * 100 is 29 and
// 0.05 * 2000 is 100.
int64_t floor_fraction(double f, int64_t n);
int64_t ceil_fraction(double f, int64_t n);

// Base sample size m = max(2, ceil(base n_s)) (or the count), at most n_s.
int64_t base_sample_size(const config& cfg, int64_t n_s);
// Hub: m = max(2, floor(base n_s)), at most n_s.
int64_t hub_base_sample_size(const config& cfg, int64_t n_s);
// Fixed-rate sample size max(1, ceil(rate n_s)), at most n_s.
int64_t fixed_rate_sample_size(const config& cfg, int64_t n_s);
// The logit scale: cfg.scale, or 1/sqrt(head_dim) when it is 0.
double logit_scale(const config& cfg, int32_t head_dim);

}  // namespace vattn::detail

namespace vattn::detail {
// Estimated relative error (CLT half-width over the estimate) of the mode's target at sample
// size b; 0 when b = n_s (the residual is exact).
double estimated_rel_error(budget_mode mode, double delta, const base_moments& mm, int64_t b);
}  // namespace vattn::detail
