// select_math.hpp: the scalar rules of vAttention's selection and budget (src/core/budget.cpp)
// and the CPU path's float arithmetic (src/cpu: its exp polynomial and dot-product summation
// orders), written once for host and device so the GPU computes the same stage sizes, logits,
// weights and budgets as the CPU, bit for bit. Host-callable, so tests compare each rule with
// the core function it mirrors without a GPU. Units compiled for the device with -fmad=false
// (cmake/cuda.cmake): no contraction the CPU build does not do.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "vattn/vattn.hpp"

#if defined(__CUDACC__)
#define VATTN_SM __host__ __device__ __forceinline__
#else
#define VATTN_SM inline
#endif

namespace vattn::cuda::detail {

// The configuration fields the device needs (a POD copy of vattn::config plus values the host
// derives once: the normal quantiles and the logit scale as the CPU rounds it).
struct sel_cfg {
  double sink, local, topk, base, sample_rate, eps, delta;
  double refine;  // 0: off; else the shortlist is ceil(refine * k) tokens (config::refine)
  int32_t sink_frac, local_frac, topk_frac, base_frac;
  int32_t select;  // vattn::selector
  int32_t sample;  // vattn::sampling
  int32_t pred;    // vattn::predictor
  int32_t mode;    // vattn::budget_mode
  int32_t gqa_shared;
  int32_t pred_bits;
  int32_t layer;
  uint64_t seed;
  double z_mode;  // -Phi^-1(delta / 2)
  double z_comb;  // -Phi^-1(delta / 4) (combined mode)
  float scale;    // float(logit_scale(cfg, head_dim)), as the CPU scales q
};

// --- stage sizes (core/budget.cpp: floor_fraction, ceil_fraction, resolve_stages, ...) -------

VATTN_SM int64_t floor_fraction(double f, int64_t n) {
  return int64_t(floor(f * double(n) * (1 + 1e-12)));
}
VATTN_SM int64_t ceil_fraction(double f, int64_t n) {
  const double c = ceil(f * double(n) * (1 - 1e-12));
  return int64_t(c > 0.0 ? c : 0.0);
}
VATTN_SM int64_t resolve_size(double v, int32_t frac, int64_t n) {
  return frac ? floor_fraction(v, n) : int64_t(v);
}
VATTN_SM int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}
VATTN_SM int64_t max64(int64_t a, int64_t b) {
  return a > b ? a : b;
}

struct stages {
  int64_t n_sink, n_local, k;
  int64_t shortlist;  // refine: min(middle, ceil(refine * k)), else 0
  int32_t dense;
};
// resolve_stages for a non-dense config.
VATTN_SM stages resolve_stages(const sel_cfg& c, int64_t n) {
  stages s{0, 0, 0, 0, 0};
  s.n_sink = min64(resolve_size(c.sink, c.sink_frac, n), n);
  s.n_local = min64(resolve_size(c.local, c.local_frac, n), n);
  if (n <= s.n_sink + s.n_local) {
    s.dense = 1;
    return s;
  }
  const int64_t middle = n - s.n_sink - s.n_local;
  if (c.select == int32_t(selector::topk))
    s.k = min64(resolve_size(c.topk, c.topk_frac, n), middle);
  if (c.refine > 0 && s.k > 0) s.shortlist = min64(middle, ceil_fraction(c.refine, s.k));
  if (middle - s.k < 2) s.dense = 1;
  if (c.sample == int32_t(sampling::none) && c.select != int32_t(selector::topp) &&
      s.n_sink + s.n_local + s.k == 0)
    s.dense = 1;
  return s;
}
VATTN_SM int64_t base_sample_size(const sel_cfg& c, int64_t n_s) {
  const int64_t m = c.base_frac ? ceil_fraction(c.base, n_s) : int64_t(c.base);
  return min64(max64(2, m), n_s);
}
VATTN_SM int64_t fixed_rate_sample_size(const sel_cfg& c, int64_t n_s) {
  return min64(max64(1, ceil_fraction(c.sample_rate, n_s)), n_s);
}
// The first sample drawn before the budget is known (0 without sampling).
VATTN_SM int64_t first_draws(const sel_cfg& c, int64_t n_s) {
  if (c.sample == int32_t(sampling::fixed_rate)) return fixed_rate_sample_size(c, n_s);
  if (c.sample == int32_t(sampling::adaptive)) return base_sample_size(c, n_s);
  return 0;
}

// --- budget (core/budget.cpp) ----------------------------------------------------------------

// vattn::detail::base_moments, field for field.
struct moments {
  int64_t n_s, m;
  double d_hat, var_e, var_ev, n_norm2, var_eo, o_norm2;
};

constexpr double k_var_floor = 1e-30;
constexpr double k_norm_floor_fraction = 1e-2;

VATTN_SM double dmax(double a, double b) {
  return a > b ? a : b;  // std::max(a, b) for non-NaN a, b
}

VATTN_SM int64_t fpc_budget(double b0, int64_t n_s, int64_t m) {
  if (!(b0 < 1e300)) return n_s;
  const double b = ceil(b0 * double(n_s) / (b0 + double(n_s)));
  const int64_t bi = b >= double(n_s) ? n_s : int64_t(b);
  return bi < m ? m : (bi > n_s ? n_s : bi);
}
VATTN_SM double fpc_var_factor(int64_t n_s, int64_t b) {
  return double(n_s) * double(n_s) * dmax(0.0, 1.0 / double(b) - 1.0 / double(n_s));
}
VATTN_SM double debiased_norm2(double plug_in2, double noise_var_sum, const moments& mm) {
  const double noise = fpc_var_factor(mm.n_s, mm.m) * noise_var_sum;
  return dmax(plug_in2 - noise, k_norm_floor_fraction * plug_in2);
}
struct mode_terms {
  double sd_total, target;
};
VATTN_SM mode_terms terms(int32_t mode, const moments& mm) {
  switch (mode) {
    case int32_t(budget_mode::denominator):
      return {sqrt(dmax(mm.var_e, k_var_floor)), mm.d_hat};
    case int32_t(budget_mode::numerator):
      return {sqrt(dmax(mm.var_ev, k_var_floor)), sqrt(debiased_norm2(mm.n_norm2, mm.var_ev, mm))};
    case int32_t(budget_mode::output): {
      const double noise = mm.d_hat > 0 ? mm.var_eo / (mm.d_hat * mm.d_hat) : 0;
      const double o2 = debiased_norm2(mm.o_norm2, noise, mm);
      return {sqrt(dmax(mm.var_eo, k_var_floor)), mm.d_hat * sqrt(o2)};
    }
    default:
      return {0, 0};
  }
}
VATTN_SM double b0_for(int32_t mode, double z, double eps, const moments& mm) {
  const mode_terms t = terms(mode, mm);
  if (!(t.target > 0)) return INFINITY;
  const double r = z * double(mm.n_s) * t.sd_total / (eps * t.target);
  return r * r;
}
VATTN_SM double rel_halfwidth(int32_t mode, double z, const moments& mm, int64_t b) {
  const mode_terms t = terms(mode, mm);
  if (b >= mm.n_s) return 0;
  if (!(t.target > 0)) return INFINITY;
  return z * t.sd_total * sqrt(fpc_var_factor(mm.n_s, b)) / t.target;
}
// compute_budget(...).b
VATTN_SM int64_t budget_b(const sel_cfg& c, const moments& mm) {
  double b0;
  if (c.mode == int32_t(budget_mode::combined)) {
    const double e2 = c.eps / (2 + c.eps);
    b0 = dmax(b0_for(int32_t(budget_mode::denominator), c.z_comb, e2, mm),
              b0_for(int32_t(budget_mode::numerator), c.z_comb, e2, mm));
  } else {
    b0 = b0_for(c.mode, c.z_mode, c.eps, mm);
  }
  return fpc_budget(b0, mm.n_s, mm.m);
}
// estimated_rel_error(mode, delta, mm, b); `z` is -Phi^-1(delta / 2) for a single mode.
VATTN_SM double est_rel_error(int32_t mode, const sel_cfg& c, double z, const moments& mm,
                              int64_t b) {
  if (mode == int32_t(budget_mode::combined)) {
    const double ed = rel_halfwidth(int32_t(budget_mode::denominator), c.z_comb, mm, b);
    const double en = rel_halfwidth(int32_t(budget_mode::numerator), c.z_comb, mm, b);
    return ed < 1 ? (en + ed) / (1 - ed) : INFINITY;
  }
  return rel_halfwidth(mode, z, mm, b);
}

// --- the CPU's float arithmetic ---------------------------------------------------------------

// exp as the CPU's AVX2 / AVX-512 kernels compute it (cpu/gqa_kernels.cpp exp8): 2^n p(r),
// n = round(x log2 e), r = x - n ln 2 in two parts, p the degree-7 Taylor polynomial; fused
// multiply-adds where the CPU fuses; 0 below -87.
VATTN_SM float cpu_exp(float x) {
  if (x != x) return x;
  if (x < -87.0f) return 0.0f;
  x = x > 88.0f ? 88.0f : x;
  const float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(-n, 0.693359375f, x);
  r = fmaf(-n, -2.12194440e-4f, r);
  float p = 1.0f / 5040;
  p = fmaf(p, r, 1.0f / 720);
  p = fmaf(p, r, 1.0f / 120);
  p = fmaf(p, r, 1.0f / 24);
  p = fmaf(p, r, 1.0f / 6);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  const int32_t e = (int32_t(n) + 127) << 23;
  float s;
  memcpy(&s, &e, sizeof s);
  return p * s;
}

// How the CPU sums a dot product of a head_dim-long row (d a multiple of 32): `lanes`
// accumulators, accumulator a taking elements a, a + lanes, ... in order, fused (AVX2: 16 = two
// chains of 8 lanes; AVX-512: 32 = two chains of 16) or not (scalar: 4 accumulators, q*k rounded
// then added); then a pairwise reduction (AVX: halves first, as the horizontal sums do; scalar:
// (a0 + a1) + (a2 + a3)).
struct dot_order {
  int32_t lanes;  // 32, 16 or 4
  int32_t fused;  // 1: acc = fma(q, k, acc); 0: acc = acc + q * k
};

// Orders of the CPU levels (cpu/simd.hpp simd_level: 0 scalar, 1 avx2, 2 avx512).
inline dot_order dot_order_for_level(int32_t level) {
  if (level == 2) return {32, 1};
  if (level == 1) return {16, 1};
  return {4, 0};
}

// The CPU-order dot product on the host (tests check it against the CPU's kernels).
inline float cpu_order_dot(const dot_order& o, const float* q, const float* k, int32_t d) {
  float acc[32];
  for (int32_t a = 0; a < o.lanes; ++a) {
    float x = 0;
    for (int32_t j = a; j < d; j += o.lanes) x = o.fused ? fmaf(q[j], k[j], x) : x + q[j] * k[j];
    acc[a] = x;
  }
  if (o.fused) {
    for (int32_t off = o.lanes / 2; off >= 1; off /= 2)
      for (int32_t a = 0; a < off; ++a) acc[a] = acc[a] + acc[a + off];
  } else {
    for (int32_t off = 1; off < o.lanes; off *= 2)
      for (int32_t a = 0; a + off < o.lanes; a += 2 * off) acc[a] = acc[a] + acc[a + off];
  }
  return acc[0];
}

// A float logit as an unsigned key in the order of the value (-0 as +0: the CPU compares floats,
// so -0 and +0 tie and the lower position wins).
VATTN_SM uint32_t order_key(float x) {
  uint32_t u;
  if (x == 0.0f) x = 0.0f;
  memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace vattn::cuda::detail
