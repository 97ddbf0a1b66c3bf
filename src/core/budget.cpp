// budget.cpp: sample budgets from (eps, delta) for the four modes and the hub rule.
#include "core/budget.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace vattn::detail {

int64_t fpc_budget(double b0, int64_t n_s, int64_t m) {
  // Sampling is without replacement: the variance shrinks by (1 - b/n_s), which turns the
  // with-replacement budget b0 into b0 n_s / (b0 + n_s).
  if (!(b0 < 1e300)) return n_s;  // +inf or NaN: no evidence that fewer than all will do
  double b = std::ceil(b0 * double(n_s) / (b0 + double(n_s)));
  int64_t bi = b >= double(n_s) ? n_s : int64_t(b);
  return std::clamp<int64_t>(bi, m, n_s);
}

namespace {

// Variance of n_s/b * sum_S x relative to the population total, per unit variance of x:
// n_s^2 (1/b - 1/n_s).
double fpc_var_factor(int64_t n_s, int64_t b) {
  return double(n_s) * double(n_s) * std::max(0.0, 1.0 / double(b) - 1.0 / double(n_s));
}

// ||X||^2 with the sampling noise of the base estimate removed (SPEC: debiased norms).
double debiased_norm2(double plug_in2, double noise_var_sum, const base_moments& mm) {
  double noise = fpc_var_factor(mm.n_s, mm.m) * noise_var_sum;
  return std::max(plug_in2 - noise, k_norm_floor_fraction * plug_in2);
}

struct mode_terms {
  double sd_total;  // sqrt of the summed per-unit variance of the estimated total
  double target;    // the norm the error is relative to
};

mode_terms terms(budget_mode mode, const base_moments& mm) {
  switch (mode) {
    case budget_mode::denominator:
      return {std::sqrt(std::max(mm.var_e, k_var_floor)), mm.d_hat};
    case budget_mode::numerator:
      return {std::sqrt(std::max(mm.var_ev, k_var_floor)),
              std::sqrt(debiased_norm2(mm.n_norm2, mm.var_ev, mm))};
    case budget_mode::output: {
      // Delta method for the ratio N^/D^: its error is (N^ - O D^) / D, the estimated total
      // of e (v - O) divided by D.
      double noise = mm.d_hat > 0 ? mm.var_eo / (mm.d_hat * mm.d_hat) : 0;
      double o2 = debiased_norm2(mm.o_norm2, noise, mm);
      return {std::sqrt(std::max(mm.var_eo, k_var_floor)), mm.d_hat * std::sqrt(o2)};
    }
    default:
      return {0, 0};
  }
}

}  // namespace

bool budget_uses_v_moments(budget_mode mode) {
  return mode != budget_mode::denominator;
}

namespace {

double b0_for(budget_mode mode, double z, double eps, const base_moments& mm) {
  mode_terms t = terms(mode, mm);
  if (!(t.target > 0)) return std::numeric_limits<double>::infinity();
  double r = z * double(mm.n_s) * t.sd_total / (eps * t.target);
  return r * r;
}

double rel_halfwidth(budget_mode mode, double z, const base_moments& mm, int64_t b) {
  mode_terms t = terms(mode, mm);
  if (b >= mm.n_s) return 0;
  if (!(t.target > 0)) return std::numeric_limits<double>::infinity();
  return z * t.sd_total * std::sqrt(fpc_var_factor(mm.n_s, b)) / t.target;
}

}  // namespace

budget compute_budget(budget_mode mode, double eps, double delta, const base_moments& mm) {
  budget out;
  if (mode == budget_mode::combined) {
    // ||O^-O|| <= (eN + eD)/(1 - eD) ||O||: eN = eD = eps/(2+eps) gives eps; union bound over
    // the two events halves delta.
    const double e2 = eps / (2 + eps);
    const double z = -normal_quantile(delta / 4);
    out.b0 = std::max(b0_for(budget_mode::denominator, z, e2, mm),
                      b0_for(budget_mode::numerator, z, e2, mm));
  } else {
    out.b0 = b0_for(mode, -normal_quantile(delta / 2), eps, mm);
  }
  out.b = fpc_budget(out.b0, mm.n_s, mm.m);
  out.est_rel_error = estimated_rel_error(mode, delta, mm, out.b);
  return out;
}

double estimated_rel_error(budget_mode mode, double delta, const base_moments& mm, int64_t b) {
  if (mode == budget_mode::combined) {
    const double z = -normal_quantile(delta / 4);
    double ed = rel_halfwidth(budget_mode::denominator, z, mm, b);
    double en = rel_halfwidth(budget_mode::numerator, z, mm, b);
    return ed < 1 ? (en + ed) / (1 - ed) : std::numeric_limits<double>::infinity();
  }
  return rel_halfwidth(mode, -normal_quantile(delta / 2), mm, b);
}

int64_t hub_budget(double z, double sd, double d_hat, double eps, int64_t n_s, int64_t m) {
  double r = z * sd * double(n_s) / std::max(eps * d_hat, 1e-8);
  double b = std::clamp(r * r, 1.0, double(n_s));
  int64_t bi = int64_t(b);  // truncation, as the reference framework does
  return std::clamp<int64_t>(bi, m, n_s);
}

}  // namespace vattn::detail

namespace vattn::detail {

// The relative tolerance absorbs the rounding of f * n (a few ulps), at any n.
int64_t floor_fraction(double f, int64_t n) {
  return int64_t(std::floor(f * double(n) * (1 + 1e-12)));
}
int64_t ceil_fraction(double f, int64_t n) {
  return int64_t(std::max(0.0, std::ceil(f * double(n) * (1 - 1e-12))));
}

namespace {
int64_t resolve_size(const count_or_fraction& c, int64_t n) {
  return c.fraction ? floor_fraction(c.value, n) : int64_t(c.value);
}
}  // namespace

stage_sizes resolve_stages(const config& cfg, int64_t n) {
  stage_sizes s;
  if (cfg.dense) {
    s.dense = true;
    return s;
  }
  s.n_sink = std::min<int64_t>(resolve_size(cfg.sink, n), n);
  s.n_local = std::min<int64_t>(resolve_size(cfg.local, n), n);
  if (n <= s.n_sink + s.n_local) {
    s.dense = true;
    return s;
  }
  const int64_t middle = n - s.n_sink - s.n_local;
  if (cfg.select == selector::topk) s.k = std::min<int64_t>(resolve_size(cfg.topk, n), middle);
  if (cfg.refine > 0 && s.k > 0)
    s.shortlist = std::min<int64_t>(middle, ceil_fraction(cfg.refine, s.k));
  if (middle - s.k < 2) s.dense = true;  // a residual of fewer than 2 tokens: exact is as cheap
  // Fractions can round to zero on short sequences: a method that would read no token at all
  // (no sampling, no top-p, empty sinks, local and top-k) computes exact attention instead.
  if (cfg.sample == sampling::none && cfg.select != selector::topp &&
      s.n_sink + s.n_local + s.k == 0)
    s.dense = true;
  return s;
}

int64_t base_sample_size(const config& cfg, int64_t n_s) {
  int64_t m = cfg.base.fraction ? ceil_fraction(cfg.base.value, n_s) : int64_t(cfg.base.value);
  return std::min<int64_t>(std::max<int64_t>(2, m), n_s);
}

int64_t hub_base_sample_size(const config& cfg, int64_t n_s) {
  int64_t m = cfg.base.fraction ? floor_fraction(cfg.base.value, n_s) : int64_t(cfg.base.value);
  return std::min<int64_t>(std::max<int64_t>(2, m), n_s);
}

int64_t fixed_rate_sample_size(const config& cfg, int64_t n_s) {
  return std::min<int64_t>(std::max<int64_t>(1, ceil_fraction(cfg.sample_rate, n_s)), n_s);
}

double logit_scale(const config& cfg, int32_t head_dim) {
  return cfg.scale > 0 ? double(cfg.scale) : 1.0 / std::sqrt(double(head_dim));
}

}  // namespace vattn::detail
