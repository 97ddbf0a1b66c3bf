// cpu_attention.cpp: the CPU execution of a plan: threads over (sequence, selection unit), a
// preallocated workspace per thread, float row kernels and double-precision budget statistics.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "core/budget.hpp"
#include "core/dtype.hpp"
#include "core/kv_access.hpp"
#include "core/sampler.hpp"
#include "core/validate.hpp"
#include "cpu/row_kernels.hpp"
#include "cpu/simd.hpp"
#include "vattn/vattn.hpp"

#if VATTN_HAVE_OPENMP
#include <omp.h>
#endif

namespace vattn {

using namespace vattn::detail;

namespace {

constexpr size_t k_align = 64;
size_t align_up(size_t x) {
  return (x + k_align - 1) / k_align * k_align;
}

// Per-thread scratch carved out of the caller's workspace.
struct scratch {
  float* logits;    // [group, n_max] logits of every head of a unit, indexed by token
  uint8_t* flags;   // [n_max] 1: in F; 2: drawn (hub)
  int32_t* cand;    // [n_max] top-k / top-p candidates
  int32_t* f;       // [n_max] F ascending
  int32_t* sample;  // [n_max] sampled tokens in draw order
  double* acc;      // [group, acc_stride] accumulators (see head_acc)
};

// Accumulators of one head: F sums, sample sums and the base-sample moments.
struct head_acc {
  double* n_f;     // [d] sum_F e v
  double* s_ev;    // [d] sum_S e v
  double* s_evev;  // [d] sum_B (e v)^2
  double* s_eev;   // [d] sum_B e (e v)
  double d_f, s_e, s_ee;
  float c;  // stabiliser the sums are in
};
size_t acc_stride(int32_t d) {
  return size_t(4) * d;
}

struct layout_sizes {
  size_t logits, flags, ints, acc, total;
};
layout_sizes scratch_sizes(int64_t n_max, int32_t group, int32_t d) {
  layout_sizes s;
  s.logits = align_up(sizeof(float) * size_t(n_max) * group);
  s.flags = align_up(size_t(n_max));
  s.ints = align_up(sizeof(int32_t) * size_t(n_max));
  s.acc = align_up(sizeof(double) * acc_stride(d) * group);
  s.total = s.logits + s.flags + 3 * s.ints + s.acc;
  return s;
}

scratch carve(uint8_t* base, const layout_sizes& s) {
  scratch w;
  w.logits = reinterpret_cast<float*>(base);
  base += s.logits;
  w.flags = base;
  base += s.flags;
  w.cand = reinterpret_cast<int32_t*>(base);
  base += s.ints;
  w.f = reinterpret_cast<int32_t*>(base);
  base += s.ints;
  w.sample = reinterpret_cast<int32_t*>(base);
  base += s.ints;
  w.acc = reinterpret_cast<double*>(base);
  return w;
}

int32_t unit_group(const config& cfg, const plan_params& p) {
  return cfg.gqa_shared ? p.n_head_q / p.n_head_kv : 1;
}

// Everything a unit needs that does not change across units of one run.
struct run_ctx {
  const config& cfg;
  const plan_params& p;
  const run_args& a;
  const kv_cache& kv;
  const int64_t* row0;
  float scale;
};

template <dtype T>
class unit_runner {
  using elem = typename storage<T>::type;

 public:
  unit_runner(const run_ctx& ctx, scratch ws, int32_t s, int32_t first_head, int32_t n_heads)
      : c_(ctx), ws_(ws), s_(s), h0_(first_head), g_(n_heads) {
    kvh_ = first_head / (ctx.p.n_head_q / ctx.p.n_head_kv);
    n_ = ctx.kv.seq_len[s];
    d_ = ctx.p.head_dim;
    n_max_ = ctx.p.n_tokens_max;
  }

  void run() {
    const config& cfg = c_.cfg;
    stage_sizes st = resolve_stages(cfg, n_);
    const bool need_all = st.dense || cfg.select != selector::none || cfg.hub;
    if (need_all)
      for (int32_t x = 0; x < g_; ++x)
        for (int64_t t = 0; t < n_; ++t) logit(x, t);
    if (st.dense) return run_dense(cfg.dense ? 0 : 1);
    if (cfg.hub) return run_hub(st);

    uint8_t* flags = ws_.flags;
    std::memset(flags, 0, size_t(n_));
    for (int64_t i = 0; i < st.n_sink; ++i) flags[i] = 1;
    for (int64_t i = n_ - st.n_local; i < n_; ++i) flags[i] = 1;
    if (cfg.select == selector::topk) select_topk(st);
    if (cfg.select == selector::topp) select_topp(st);
    int64_t n_f = 0, n_s = 0;
    for (int64_t i = 0; i < n_; ++i) {
      if (flags[i])
        ws_.f[n_f++] = int32_t(i);
      else
        ++n_s;
    }
    if (n_s < 2) {
      if (!need_all)
        for (int32_t x = 0; x < g_; ++x)
          for (int64_t t = 0; t < n_; ++t) logit(x, t);
      return run_dense(1);
    }

    const int32_t key_head = cfg.gqa_shared ? kvh_ : h0_;
    const int64_t seq_key = c_.a.seq_id ? c_.a.seq_id[s_] : s_;
    residual_walk walk(sample_key(cfg.seed, cfg.layer, seq_key, key_head, c_.a.step), uint64_t(n_));
    auto in_f = [flags](uint64_t t) { return flags[t] != 0; };
    int64_t m0 = 0;  // the first sample drawn before the budget is known
    if (cfg.sample == sampling::fixed_rate) m0 = fixed_rate_sample_size(cfg, n_s);
    if (cfg.sample == sampling::adaptive) m0 = base_sample_size(cfg, n_s);
    for (int64_t j = 0; j < m0; ++j) ws_.sample[j] = int32_t(walk.next(in_f));

    // Phase 1: F and the first m0 draws, with moments, in one stabiliser per head.
    int64_t b = m0;
    double est[256];
    for (int32_t x = 0; x < g_; ++x) {
      bind_acc(x);
      accumulate_base(x, n_f, m0);
      if (m0 >= 2) {
        base_moments bm = moments(acc_[x], n_f, n_s, m0);
        if (cfg.sample == sampling::adaptive) {
          b = std::max(b, compute_budget(cfg.mode, cfg.eps, cfg.delta, bm).b);
          moments_[x] = bm;
        } else {
          est[x] = estimated_rel_error(budget_mode::denominator, cfg.delta, bm, m0);
        }
      } else {
        est[x] = -1;
      }
    }
    if (cfg.sample == sampling::adaptive) {
      // Phase 2: extend the sample to b (nested: the base draws are its prefix).
      for (int64_t j = m0; j < b; ++j) ws_.sample[j] = int32_t(walk.next(in_f));
      for (int32_t x = 0; x < g_; ++x) {
        extend(x, m0, b);
        est[x] = estimated_rel_error(cfg.mode, cfg.delta, moments_[x], b);
      }
    }

    const bool reads_all_k = cfg.select != selector::none;
    const double row_bytes = double(d_) * double(sizeof(elem));
    const double k_rows = reads_all_k ? double(n_) : double(n_f + b);
    const int64_t bytes = int64_t((k_rows + double(n_f + b)) * row_bytes / double(g_));
    for (int32_t x = 0; x < g_; ++x) {
      const head_acc& A = acc_[x];
      const double w = b > 0 ? double(n_s) / double(b) : 0.0;
      write_output(x, A.d_f + w * A.s_e, A.n_f, A.s_ev, w, n_f, b);
      head_stats hs;
      hs.n = n_;
      hs.n_f = n_f;
      hs.n_s = n_s;
      hs.m = cfg.sample == sampling::adaptive ? m0 : 0;
      hs.b = b;
      hs.n_sampled = b;
      hs.density = double(n_f + b) / double(n_);
      hs.est_rel_error = est[x];
      hs.bytes_kv = bytes;
      emit(x, hs, n_f, b);
    }
  }

 private:
  const float* q(int32_t x) const { return c_.a.q + (int64_t(s_) * c_.p.n_head_q + h0_ + x) * d_; }
  const elem* krow(int64_t t) const {
    return static_cast<const elem*>(c_.kv.k) + row_offset(c_.kv, c_.row0[s_], s_, t, kvh_);
  }
  const elem* vrow(int64_t t) const {
    return static_cast<const elem*>(c_.kv.v) + row_offset(c_.kv, c_.row0[s_], s_, t, kvh_);
  }
  float& lg(int32_t x, int64_t t) { return ws_.logits[int64_t(x) * n_max_ + t]; }

  // Computes and stores the logit of token t for head x; rejects non-finite values.
  float logit(int32_t x, int64_t t) {
    float l = c_.scale * dot_(q(x), krow(t), d_);
    if (!std::isfinite(l))
      fail_at("k contains NaN/Inf (or q.k overflows) at seq " + std::to_string(s_) + ", token " +
              std::to_string(t) + ", kv head " + std::to_string(kvh_));
    lg(x, t) = l;
    return l;
  }

  [[noreturn]] void fail_at(const std::string& msg) { throw error(msg); }

  void bind_acc(int32_t x) {
    double* base = ws_.acc + acc_stride(d_) * x;
    head_acc& A = acc_[x];
    A.n_f = base;
    A.s_ev = base + d_;
    A.s_evev = base + 2 * d_;
    A.s_eev = base + 3 * d_;
    std::fill(base, base + acc_stride(d_), 0.0);
    A.d_f = A.s_e = A.s_ee = 0;
  }

  // F and the first m0 draws: stabiliser over both, then sums and second moments.
  void accumulate_base(int32_t x, int64_t n_f, int64_t m0) {
    const bool have = c_.cfg.select != selector::none;  // logits of every token are stored
    float c = -INFINITY;
    for (int64_t i = 0; i < n_f; ++i) c = std::max(c, have ? lg(x, ws_.f[i]) : logit(x, ws_.f[i]));
    for (int64_t j = 0; j < m0; ++j)
      c = std::max(c, have ? lg(x, ws_.sample[j]) : logit(x, ws_.sample[j]));
    head_acc& A = acc_[x];
    A.c = c;
    for (int64_t i = 0; i < n_f; ++i) {
      const int32_t t = ws_.f[i];
      const double e = std::exp(double(lg(x, t) - c));
      A.d_f += e;
      row_axpy<T>(e, vrow(t), d_, A.n_f);
    }
    for (int64_t j = 0; j < m0; ++j) {
      const int32_t t = ws_.sample[j];
      const double e = std::exp(double(lg(x, t) - c));
      A.s_e += e;
      A.s_ee += e * e;
      row_moments<T>(e, vrow(t), d_, A.s_ev, A.s_evev, A.s_eev);
    }
  }

  base_moments moments(const head_acc& A, int64_t n_f, int64_t n_s, int64_t m) const {
    base_moments mm;
    mm.n_s = n_s;
    mm.m = m;
    const double md = double(m), w = double(n_s) / md;
    mm.d_hat = A.d_f + w * A.s_e;
    mm.var_e = (A.s_ee - A.s_e * A.s_e / md) / (md - 1);
    for (int32_t j = 0; j < d_; ++j) {
      const double nh = A.n_f[j] + w * A.s_ev[j];
      const double o = nh / mm.d_hat;
      mm.n_norm2 += nh * nh;
      mm.o_norm2 += o * o;
      mm.var_ev += (A.s_evev[j] - A.s_ev[j] * A.s_ev[j] / md) / (md - 1);
      // y = e (v - o): sum y = s_ev - o s_e; sum y^2 = s_evev - 2 o s_eev + o^2 s_ee
      const double sy = A.s_ev[j] - o * A.s_e;
      const double syy = A.s_evev[j] - 2 * o * A.s_eev[j] + o * o * A.s_ee;
      mm.var_eo += (syy - sy * sy / md) / (md - 1);
    }
    mm.var_e = std::max(mm.var_e, 0.0);
    mm.var_ev = std::max(mm.var_ev, 0.0);
    mm.var_eo = std::max(mm.var_eo, 0.0);
    return mm;
  }

  // Adds draws [m0, b) to head x's sample sums, rescaling if a larger logit appears.
  void extend(int32_t x, int64_t m0, int64_t b) {
    const bool have = c_.cfg.select != selector::none;
    head_acc& A = acc_[x];
    float c = A.c;
    for (int64_t j = m0; j < b; ++j)
      c = std::max(c, have ? lg(x, ws_.sample[j]) : logit(x, ws_.sample[j]));
    // The second-moment sums (s_ee, s_evev, s_eev) are not rescaled: they served the budget,
    // which is fixed by now.
    if (c > A.c) {  // keep one stabiliser for every term of the row
      const double r = std::exp(double(A.c - c));
      A.d_f *= r;
      A.s_e *= r;
      for (int32_t j = 0; j < d_; ++j) A.n_f[j] *= r, A.s_ev[j] *= r;
      A.c = c;
    }
    for (int64_t j = m0; j < b; ++j) {
      const int32_t t = ws_.sample[j];
      const double e = std::exp(double(lg(x, t) - c));
      A.s_e += e;
      row_axpy<T>(e, vrow(t), d_, A.s_ev);
    }
  }

  void write_output(int32_t x, double d_total, const double* n_f, const double* s_ev, double w,
                    int64_t n_f_count, int64_t b) {
    float* o = c_.a.out + (int64_t(s_) * c_.p.n_head_q + h0_ + x) * d_;
    bool finite = std::isfinite(d_total) && d_total > 0;
    for (int32_t j = 0; j < d_; ++j) {
      const double v = (n_f[j] + (s_ev ? w * s_ev[j] : 0.0)) / d_total;
      o[j] = float(v);
      finite = finite && std::isfinite(o[j]);
    }
    if (!finite) report_bad_v(n_f_count, b);
  }

  // A non-finite output comes from a V row read for it: name the first one.
  [[noreturn]] void report_bad_v(int64_t n_f, int64_t b) {
    auto check = [&](int64_t t) {
      const elem* r = vrow(t);
      for (int32_t j = 0; j < d_; ++j)
        if (!std::isfinite(storage<T>::load(r[j])))
          fail_at("v contains NaN/Inf at seq " + std::to_string(s_) + ", token " +
                  std::to_string(t) + ", kv head " + std::to_string(kvh_));
    };
    for (int64_t i = 0; i < n_f; ++i) check(ws_.f[i]);
    for (int64_t j = 0; j < b; ++j) check(ws_.sample[j]);
    fail_at("attention output overflowed at seq " + std::to_string(s_) + ", kv head " +
            std::to_string(kvh_) + " (V values too large for f32)");
  }

  void emit(int32_t x, const head_stats& hs, int64_t n_f, int64_t n_sampled) {
    const int64_t hi = int64_t(s_) * c_.p.n_head_q + h0_ + x;
    if (c_.a.stats) c_.a.stats[hi] = hs;
    if (c_.a.indices) {
      int32_t* dst = c_.a.indices + hi * c_.p.n_tokens_max;
      std::copy(ws_.f, ws_.f + n_f, dst);
      std::copy(ws_.sample, ws_.sample + n_sampled, dst + n_f);
    }
  }

  void run_dense(int32_t fallback) {
    for (int64_t i = 0; i < n_; ++i) ws_.f[i] = int32_t(i);
    for (int32_t x = 0; x < g_; ++x) {
      bind_acc(x);
      head_acc& A = acc_[x];
      float c = -INFINITY;
      for (int64_t t = 0; t < n_; ++t) c = std::max(c, lg(x, t));
      for (int64_t t = 0; t < n_; ++t) {
        const double e = std::exp(double(lg(x, t) - c));
        A.d_f += e;
        row_axpy<T>(e, vrow(t), d_, A.n_f);
      }
      write_output(x, A.d_f, A.n_f, nullptr, 0, n_, 0);
      head_stats hs;
      hs.n = n_;
      hs.n_f = n_;
      hs.density = 1;
      hs.bytes_kv = int64_t(2 * n_ * d_ * int64_t(sizeof(elem)) / g_);
      hs.dense_fallback = fallback;
      emit(x, hs, n_, 0);
    }
  }

  // Partial selection: the k best (logit desc, position asc) of the middle, for each head; in a
  // shared unit F takes the union.
  void select_topk(const stage_sizes& st) {
    const int64_t lo = st.n_sink, hi = n_ - st.n_local, cnt = hi - lo;
    for (int32_t x = 0; x < g_; ++x) {
      for (int64_t i = 0; i < cnt; ++i) ws_.cand[i] = int32_t(lo + i);
      const float* l = ws_.logits + int64_t(x) * n_max_;
      auto better = [l](int32_t a, int32_t b) { return l[a] != l[b] ? l[a] > l[b] : a < b; };
      if (st.k < cnt) std::nth_element(ws_.cand, ws_.cand + st.k, ws_.cand + cnt, better);
      for (int64_t i = 0; i < st.k; ++i) ws_.flags[ws_.cand[i]] = 1;
    }
  }

  void select_topp(const stage_sizes& st) {
    const int64_t lo = st.n_sink, hi = n_ - st.n_local, cnt = hi - lo;
    for (int32_t x = 0; x < g_; ++x) {
      const float* l = ws_.logits + int64_t(x) * n_max_;
      float c = -INFINITY;
      for (int64_t t = 0; t < n_; ++t) c = std::max(c, l[t]);
      double total = 0, mass = 0;
      for (int64_t t = 0; t < n_; ++t) {
        const double e = std::exp(double(l[t] - c));
        total += e;
        if (t < lo || t >= hi) mass += e;
      }
      for (int64_t i = 0; i < cnt; ++i) ws_.cand[i] = int32_t(lo + i);
      auto better = [l](int32_t a, int32_t b) { return l[a] != l[b] ? l[a] > l[b] : a < b; };
      std::sort(ws_.cand, ws_.cand + cnt, better);
      const double target = c_.cfg.top_p * total;
      for (int64_t i = 0; i < cnt && mass < target; ++i) {
        ws_.flags[ws_.cand[i]] = 1;
        mass += std::exp(double(l[ws_.cand[i]] - c));
      }
    }
  }

  // Hub compatibility (SPEC section 6): i.i.d. draws with replacement over the window, one
  // query head per unit, stabiliser = the row maximum.
  void run_hub(const stage_sizes& st) {
    const config& cfg = c_.cfg;
    uint8_t* flags = ws_.flags;
    std::memset(flags, 0, size_t(n_));
    for (int64_t i = 0; i < st.n_sink; ++i) flags[i] = 1;
    for (int64_t i = n_ - st.n_local; i < n_; ++i) flags[i] = 1;
    if (st.k > 0) select_topk(st);
    int64_t n_f = 0;
    for (int64_t i = 0; i < n_; ++i)
      if (flags[i]) ws_.f[n_f++] = int32_t(i);
    float c = -INFINITY;
    for (int64_t t = 0; t < n_; ++t) c = std::max(c, lg(0, t));
    auto e_of = [&](int64_t t) { return std::exp(double(lg(0, t) - c)); };

    const int64_t w0 = st.n_sink, n_w = n_ - st.n_sink - st.n_local;
    const int64_t m = hub_base_sample_size(cfg, n_w);
    const int64_t seq_key = c_.a.seq_id ? c_.a.seq_id[s_] : s_;
    const uint64_t key = sample_key(cfg.seed, cfg.layer, seq_key, h0_, c_.a.step);
    double sum = 0, sum2 = 0, distinct = 0;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t t = w0 + int64_t(uniform_draw(key, uint64_t(j), uint64_t(n_w)));
      const double e = e_of(t);
      sum += e;
      sum2 += e * e;
      if (!(flags[t] & 2)) flags[t] |= 2, distinct += e;
    }
    const double md = double(m);
    const double var = std::max(0.0, (sum2 - sum * sum / md) / (md - 1));
    const double sd = std::max(std::sqrt(var), 1e-8);
    head_acc& A = acc_[0];
    bind_acc(0);
    for (int64_t i = 0; i < n_f; ++i) {
      const double e = e_of(ws_.f[i]);
      A.d_f += e;
      row_axpy<T>(e, vrow(ws_.f[i]), d_, A.n_f);
    }
    const double d_b = A.d_f + double(n_w) / md * distinct;
    const double z = -normal_quantile(cfg.delta);
    const int64_t b = hub_budget(z, sd, d_b, cfg.eps, n_w, m);
    for (int64_t j = 0; j < m; ++j) {  // clear the base-draw marks: base draws are not sampled
      const int64_t t = w0 + int64_t(uniform_draw(key, uint64_t(j), uint64_t(n_w)));
      flags[t] &= 1;
    }
    const double w = 1.0 / (double(b) / double(n_w) + 1e-6);
    int64_t n_sampled = 0;
    for (int64_t j = 0; j < b; ++j) {
      const int64_t t = w0 + int64_t(uniform_draw(key, uint64_t(m + j), uint64_t(n_w)));
      if (flags[t]) continue;  // in F (weight 1) or already drawn: duplicates collapse
      flags[t] = 2;
      ws_.sample[n_sampled++] = int32_t(t);
      const double e = e_of(t);
      A.s_e += e;
      row_axpy<T>(e, vrow(t), d_, A.s_ev);
    }
    write_output(0, A.d_f + w * A.s_e, A.n_f, A.s_ev, w, n_f, n_sampled);
    head_stats hs;
    hs.n = n_;
    hs.n_f = n_f;
    hs.n_s = n_w;
    hs.m = m;
    hs.b = b;
    hs.n_sampled = n_sampled;
    hs.density = double(n_f + n_sampled) / double(n_);
    hs.est_rel_error = d_b > 0 ? z * sd * double(n_w) / (std::sqrt(double(b)) * d_b) : 0;
    hs.bytes_kv = (n_ + n_f + n_sampled) * d_ * int64_t(sizeof(elem));
    emit(0, hs, n_f, n_sampled);
  }

  // The dot product of the SIMD level in use (VATTN_SIMD overrides the detected one).
  using dot_fn = float (*)(const float*, const elem*, int32_t);
  static dot_fn pick_dot() {
    const row_ops& ops = active_row_ops();
    if constexpr (T == dtype::f32) return ops.dot_f32;
    if constexpr (T == dtype::f16) return ops.dot_f16;
    if constexpr (T == dtype::bf16) return ops.dot_bf16;
  }

  const run_ctx& c_;
  const dot_fn dot_ = pick_dot();
  scratch ws_;
  int32_t s_, h0_, g_, kvh_ = 0, d_ = 0;
  int64_t n_ = 0, n_max_ = 0;
  head_acc acc_[256];
  base_moments moments_[256];
};

template <dtype T>
void run_units(const run_ctx& ctx, uint8_t* ws, size_t ws_per_thread, int32_t n_threads) {
  const int32_t group = unit_group(ctx.cfg, ctx.p);
  const int32_t units_per_seq = ctx.p.n_head_q / group;
  const int64_t n_units = int64_t(ctx.kv.n_seq) * units_per_seq;
  const layout_sizes sizes = scratch_sizes(ctx.p.n_tokens_max, group, ctx.p.head_dim);
  std::atomic<bool> failed{false};
  // The first error's message; a fixed buffer so reporting cannot throw inside the parallel
  // region.
  char first_error[512] = {};
  auto body = [&](int64_t u, int tid) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      const int32_t s = int32_t(u / units_per_seq), first = int32_t(u % units_per_seq) * group;
      unit_runner<T> r(ctx, carve(ws + size_t(tid) * ws_per_thread, sizes), s, first, group);
      r.run();
    } catch (const std::exception& e) {
      if (!failed.exchange(true)) std::snprintf(first_error, sizeof first_error, "%s", e.what());
    }
  };
#if VATTN_HAVE_OPENMP
  if (n_threads > 1 && n_units > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (int64_t u = 0; u < n_units; ++u) body(u, omp_get_thread_num());
  } else {
    for (int64_t u = 0; u < n_units; ++u) body(u, 0);
  }
#else
  (void)n_threads;
  for (int64_t u = 0; u < n_units; ++u) body(u, 0);
#endif
  if (failed) throw error(first_error);
}

}  // namespace

plan::plan(const config& cfg, const plan_params& params) : cfg_(cfg), params_(params) {
  cfg_.validate();
  validate_plan_params(params_);
  if (params_.n_threads == 0) params_.n_threads = hardware_threads();
  const int32_t group = unit_group(cfg_, params_);
  if (group > 256)
    throw error("plan_params: gqa_shared supports at most 256 query heads per kv head");
  ws_per_thread_ = scratch_sizes(params_.n_tokens_max, group, params_.head_dim).total;
  if (ws_per_thread_ > (size_t(1) << 46) / size_t(params_.n_threads))
    throw error("plan_params: the workspace for n_tokens_max " +
                std::to_string(params_.n_tokens_max) + " on " + std::to_string(params_.n_threads) +
                " threads exceeds 64 TiB");
  ws_bytes_ = align_up(sizeof(int64_t) * size_t(params_.n_seq_max)) +
              ws_per_thread_ * size_t(params_.n_threads);
}

void plan::run(const run_args& args, void* workspace, size_t workspace_size) const {
  if (!workspace) throw error("run: workspace is null (plan.workspace_bytes() bytes expected)");
  if (workspace_size < ws_bytes_)
    throw error("run: workspace holds " + std::to_string(workspace_size) +
                " bytes, the plan needs " + std::to_string(ws_bytes_));
  if (reinterpret_cast<uintptr_t>(workspace) % k_align != 0)
    throw error("run: workspace must be 64-byte aligned");
  uint8_t* ws = static_cast<uint8_t*>(workspace);
  int64_t* row0 = reinterpret_cast<int64_t*>(ws);
  validate_run_args(params_, args, row0);
  const kv_cache kv = with_default_strides(args.kv);
  const run_ctx ctx{cfg_, params_, args, kv, row0, float(logit_scale(cfg_, params_.head_dim))};
  uint8_t* thread_ws = ws + align_up(sizeof(int64_t) * size_t(params_.n_seq_max));
  switch (params_.kv_type) {
    case dtype::f32:
      return run_units<dtype::f32>(ctx, thread_ws, ws_per_thread_, params_.n_threads);
    case dtype::f16:
      return run_units<dtype::f16>(ctx, thread_ws, ws_per_thread_, params_.n_threads);
    case dtype::bf16:
      return run_units<dtype::bf16>(ctx, thread_ws, ws_per_thread_, params_.n_threads);
  }
  throw error("plan: kv_type has an unknown value");
}

const char* simd_level_name() {
  return simd_level_str(active_simd_level());
}

void attention(const config& cfg, const run_args& args, int32_t n_threads) {
  plan_params p;
  p.n_seq_max = std::max(1, args.kv.n_seq);
  p.n_head_q = args.n_head_q;
  p.n_head_kv = args.kv.n_head_kv;
  p.head_dim = args.kv.head_dim;
  p.kv_type = args.kv.type;
  p.n_threads = n_threads;
  p.n_tokens_max = 1;
  if (args.kv.seq_len)
    for (int32_t s = 0; s < args.kv.n_seq; ++s)
      p.n_tokens_max = std::max<int64_t>(p.n_tokens_max, args.kv.seq_len[s]);
  const plan pl(cfg, p);
  aligned_buffer ws(pl.workspace_bytes());
  pl.run(args, ws.data(), ws.size());
}

aligned_buffer& aligned_buffer::operator=(aligned_buffer&& o) noexcept {
  if (this != &o) {
    this->~aligned_buffer();
    p_ = o.p_, n_ = o.n_;
    o.p_ = nullptr, o.n_ = 0;
  }
  return *this;
}

aligned_buffer::~aligned_buffer() {
  if (p_) ::operator delete(p_, std::align_val_t(k_align));
}

void aligned_buffer::reserve(size_t bytes) {
  if (bytes <= n_ && p_) return;
  if (p_) ::operator delete(p_, std::align_val_t(k_align));
  p_ = nullptr;
  n_ = 0;
  p_ = ::operator new(align_up(std::max<size_t>(bytes, 1)), std::align_val_t(k_align));
  n_ = bytes;
}

}  // namespace vattn
