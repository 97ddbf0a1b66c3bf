// cpu_attention.cpp: the CPU execution of a plan: threads over (sequence, selection unit), a
// preallocated workspace per thread, float row kernels and double-precision budget statistics.
#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "core/budget.hpp"
#include "core/dtype.hpp"
#include "core/kv_access.hpp"
#include "core/sampler.hpp"
#include "core/validate.hpp"
#include "cpu/gqa_kernels.hpp"
#include "cpu/predictors.hpp"
#include "cpu/row_kernels.hpp"
#include "cpu/select_kernels.hpp"
#include "cpu/simd.hpp"
#include "vattn/vattn.hpp"

#if VATTN_HAVE_OPENMP
#include <omp.h>
#endif

// Heavy loops inside a unit run as OpenMP tasks over fixed chunks of rows: threads without a unit
// of their own (batch 1 on many cores) pick them up at the region's barrier. Chunks do not depend
// on the thread count and partial sums are added in chunk order, so results stay identical.
#if VATTN_HAVE_OPENMP
#define VATTN_TASKLOOP _Pragma("omp taskloop grainsize(1) default(shared)")
#else
#define VATTN_TASKLOOP
#endif

namespace vattn {

using namespace vattn::detail;

namespace {

constexpr size_t k_align = 64;
size_t align_up(size_t x) {
  return (x + k_align - 1) / k_align * k_align;
}

// Tokens per split-KV chunk of the dense path: fixed (not derived from the thread count), so
// every thread count gives the same partial states and the same merged output.
constexpr int64_t k_dense_chunk = 256;
constexpr int64_t k_walk_grain = 1024;  // positions of the sample walk a task evaluates
// Rows per f32 block of a weighted V sum before it is added into the double accumulators.
constexpr int64_t k_flush = 512;

// Per-thread scratch carved out of the caller's workspace.
struct scratch {
  float* logits;         // [group, n_max] logits of every head of a unit, indexed by token
  float* cl;             // [group, n_max] logits, then weights, of the listed rows (F, then sample)
  uint8_t* flags;        // [n_max] 1: in F; 2: drawn (hub)
  int32_t* cand;         // [n_max] top-k / top-p candidates
  int32_t* f;            // [n_max] F ascending
  int32_t* sample;       // [n_max] sampled tokens in draw order
  int64_t* off;          // [n_max] element offsets of the listed rows
  double* acc;           // [4, group, d] accumulators (see head_acc)
  float* facc;           // [group, d] f32 block sums
  float* qs;             // [group, d] scaled queries
  float* part;           // [chunks, group, d] f32 sums of k_flush-row chunks (V sums)
  double* mpart;         // [chunks, 3, group, d] base-sample moments per chunk
  uint16_t* walk_table;  // [keyed_permutation::k_table_entries] the sample walk's round tables
  uint64_t* bits;        // [n_max / 64 + 1] a bit per token (ascending)
  run_profile* prof;     // this thread's share of run_args::profile
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

struct layout_sizes {
  size_t logits, flags, ints, offs, acc, facc, part, mpart, walk_table, bits, total;
};
layout_sizes scratch_sizes(int64_t n_max, int32_t group, int32_t d) {
  layout_sizes s;
  const int64_t rows = std::max(n_max, k_dense_chunk);
  s.logits = align_up(sizeof(float) * size_t(rows) * group);
  s.flags = align_up(size_t(rows));
  s.ints = align_up(sizeof(int32_t) * size_t(rows));
  s.offs = align_up(sizeof(int64_t) * size_t(rows));
  s.acc = align_up(sizeof(double) * 4 * size_t(d) * group);
  s.facc = align_up(sizeof(float) * size_t(d) * group);
  const size_t chunks = size_t(rows / k_flush + 1);
  s.part = align_up(sizeof(float) * chunks * size_t(d) * group);
  s.mpart = align_up(sizeof(double) * chunks * 3 * size_t(d) * group);
  s.walk_table = align_up(sizeof(uint16_t) * keyed_permutation::k_table_entries);
  s.bits = align_up(sizeof(uint64_t) * size_t(rows / 64 + 1));
  s.total = 2 * s.logits + s.flags + 3 * s.ints + s.offs + s.acc + 2 * s.facc + s.part + s.mpart +
            s.walk_table + s.bits + align_up(sizeof(run_profile));
  return s;
}

scratch carve(uint8_t* base, const layout_sizes& s) {
  scratch w;
  auto take = [&base](size_t bytes) {
    uint8_t* p = base;
    base += bytes;
    return p;
  };
  w.logits = reinterpret_cast<float*>(take(s.logits));
  w.cl = reinterpret_cast<float*>(take(s.logits));
  w.flags = take(s.flags);
  w.cand = reinterpret_cast<int32_t*>(take(s.ints));
  w.f = reinterpret_cast<int32_t*>(take(s.ints));
  w.sample = reinterpret_cast<int32_t*>(take(s.ints));
  w.off = reinterpret_cast<int64_t*>(take(s.offs));
  w.acc = reinterpret_cast<double*>(take(s.acc));
  w.facc = reinterpret_cast<float*>(take(s.facc));
  w.qs = reinterpret_cast<float*>(take(s.facc));
  w.part = reinterpret_cast<float*>(take(s.part));
  w.mpart = reinterpret_cast<double*>(take(s.mpart));
  w.walk_table = reinterpret_cast<uint16_t*>(take(s.walk_table));
  w.bits = reinterpret_cast<uint64_t*>(take(s.bits));
  w.prof = reinterpret_cast<run_profile*>(take(align_up(sizeof(run_profile))));
  return w;
}

int32_t unit_group(const config& cfg, const plan_params& p) {
  // Dense attention works on every head of a sequence at once (one row read serves a group).
  if (cfg.dense) return p.n_head_q;
  return cfg.gqa_shared ? p.n_head_q / p.n_head_kv : 1;
}

// Token rows a thread's scratch holds: a dense chunk, or the longest sequence.
int64_t scratch_rows(const config& cfg, const plan_params& p) {
  return cfg.dense ? k_dense_chunk : p.n_tokens_max;
}

// Everything a unit needs that does not change across units of one run.
struct run_ctx {
  const config& cfg;
  const plan_params& p;
  const run_args& a;
  const kv_cache& kv;
  const int64_t* row0;
  float scale;
  float* partials;  // dense: [n_seq, n_head_q, chunks, head_dim + 2] split-KV states
  int64_t chunks_max;
};

using clock_type = std::chrono::steady_clock;
double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

[[noreturn]] void fail_at(const std::string& msg) {
  throw error(msg);
}

// The largest of x[0, n) (-inf when n = 0). Eight running maxima in a fixed-length inner loop,
// which the compiler turns into vector maxima (a > m ? a : m is the vector max instruction's rule).
float max_of(const float* x, int64_t n) {
  float m[8];
  std::fill(m, m + 8, -INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
  for (; i < n; ++i) m[0] = x[i] > m[0] ? x[i] : m[0];
  float r = m[0];
  for (int j = 1; j < 8; ++j) r = m[j] > r ? m[j] : r;
  return r;
}

// *sum += sum_i x[i] and, with Squares, *sq += sum_i x[i]^2, in double with four partial sums
// each (a fixed summation order).
template <bool Squares>
void add_sums(const float* x, int64_t n, double* sum, double* sq = nullptr) {
  double s[4] = {0, 0, 0, 0}, q[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) {
      const double v = x[i + j];
      s[j] += v;
      if constexpr (Squares) q[j] += v * v;
    }
  for (; i < n; ++i) {
    s[0] += double(x[i]);
    if constexpr (Squares) q[0] += double(x[i]) * x[i];
  }
  *sum += (s[0] + s[1]) + (s[2] + s[3]);
  if constexpr (Squares) *sq += (q[0] + q[1]) + (q[2] + q[3]);
}

// The rows one unit reads, with the kernels of the SIMD level in use.
template <dtype T>
class row_source {
 public:
  using elem = typename storage<T>::type;
  row_source(const run_ctx& c, int32_t s, int32_t kvh)
      : c_(c), ops_(gqa_ops_for<T>(active_simd_level())), s_(s), kvh_(kvh) {}
  int64_t offset(int64_t t) const { return row_offset(c_.kv, c_.row0[s_], s_, t, kvh_); }
  const elem* k() const { return static_cast<const elem*>(c_.kv.k); }
  const elem* v() const { return static_cast<const elem*>(c_.kv.v); }
  const gqa_ops<T>& ops() const { return ops_; }

  // Logits of the listed rows for G heads; rejects non-finite ones, naming the token.
  void logits(const float* qs, int32_t G, int32_t d, const int64_t* off, const int32_t* tok,
              int64_t cnt, float* out, int64_t ld) const {
    const int64_t chunks = (cnt + k_flush - 1) / k_flush;
    VATTN_TASKLOOP
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t i0 = c * k_flush;
      ops_.logits(qs, G, d, k(), off + i0, std::min(k_flush, cnt - i0), out + i0, ld);
    }
    for (int32_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < cnt; ++i)
        if (!std::isfinite(out[g * ld + i]))
          fail_at("k contains NaN/Inf (or q.k overflows) at seq " + std::to_string(s_) +
                  ", token " + std::to_string(tok ? tok[i] : i) + ", kv head " +
                  std::to_string(kvh_));
  }

  // acc[g, :] += sum_i w[g, i] v_i: f32 sums of k_flush-row chunks, added into double in chunk
  // order. part holds one [G, d] slot per chunk.
  void wsum(const float* w, int64_t ldw, int32_t G, int32_t d, const int64_t* off, int64_t cnt,
            float* part, double* acc, int64_t ld_acc) const {
    const int64_t chunks = (cnt + k_flush - 1) / k_flush, gd = int64_t(G) * d;
    VATTN_TASKLOOP
    for (int64_t c = 0; c < chunks; ++c) {
      float* f = part + c * gd;
      std::fill(f, f + gd, 0.0f);
      const int64_t i0 = c * k_flush;
      ops_.wsum(w + i0, ldw, G, d, v(), off + i0, std::min(k_flush, cnt - i0), f);
    }
    for (int64_t c = 0; c < chunks; ++c)
      for (int32_t g = 0; g < G; ++g)
        for (int32_t j = 0; j < d; ++j) acc[g * ld_acc + j] += double(part[c * gd + g * d + j]);
  }

  // Base-sample moments (moments kernel) by chunks, added in chunk order; s1, s2, s3 are [G, d].
  void moments(const float* w, int64_t ldw, int32_t G, int32_t d, const int64_t* off, int64_t cnt,
               double* mpart, double* s1, double* s2, double* s3) const {
    const int64_t chunks = (cnt + k_flush - 1) / k_flush, gd = int64_t(G) * d;
    VATTN_TASKLOOP
    for (int64_t c = 0; c < chunks; ++c) {
      double* m = mpart + c * 3 * gd;
      std::fill(m, m + 3 * gd, 0.0);
      const int64_t i0 = c * k_flush;
      ops_.moments(w + i0, ldw, G, d, v(), off + i0, std::min(k_flush, cnt - i0), m, m + gd,
                   m + 2 * gd);
    }
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t i = 0; i < gd; ++i) {
        const double* m = mpart + c * 3 * gd;
        s1[i] += m[i], s2[i] += m[gd + i], s3[i] += m[2 * gd + i];
      }
  }

  // A non-finite output comes from a V row read for it: name the first one.
  [[noreturn]] void report_bad_v(int32_t d, const int32_t* a, int64_t na, const int32_t* b,
                                 int64_t nb) const {
    auto check = [&](int64_t t) {
      const elem* r = v() + offset(t);
      for (int32_t j = 0; j < d; ++j)
        if (!std::isfinite(storage<T>::load(r[j])))
          fail_at("v contains NaN/Inf at seq " + std::to_string(s_) + ", token " +
                  std::to_string(t) + ", kv head " + std::to_string(kvh_));
    };
    for (int64_t i = 0; i < na; ++i) check(a ? a[i] : i);
    for (int64_t i = 0; i < nb; ++i) check(b[i]);
    fail_at("attention output overflowed at seq " + std::to_string(s_) + ", kv head " +
            std::to_string(kvh_) + " (V values too large for f32)");
  }

 private:
  const run_ctx& c_;
  const gqa_ops<T>& ops_;
  int32_t s_, kvh_;
};

template <dtype T>
class unit_runner {
  using elem = typename storage<T>::type;

 public:
  unit_runner(const run_ctx& ctx, scratch ws, int32_t s, int32_t first_head, int32_t n_heads)
      : c_(ctx),
        ws_(ws),
        s_(s),
        h0_(first_head),
        g_(n_heads),
        kvh_(first_head / (ctx.p.n_head_q / ctx.p.n_head_kv)),
        src_(ctx, s, kvh_) {
    n_ = ctx.kv.seq_len[s];
    d_ = ctx.p.head_dim;
    n_max_ = ctx.p.n_tokens_max;
    for (int32_t x = 0; x < g_; ++x)
      for (int32_t j = 0; j < d_; ++j) ws_.qs[x * d_ + j] = q(x)[j] * ctx.scale;
  }

  void run() {
    const config& cfg = c_.cfg;
    run_profile& prof = *ws_.prof;
    auto t0 = clock_type::now();
    st_ = resolve_stages(cfg, n_);
    const stage_sizes& st = st_;
    if (st.dense) return run_dense(cfg.dense ? 0 : 1);
    const bool oracle = cfg.select != selector::none && cfg.pred == predictor::oracle;
    if (oracle || cfg.hub) all_logits();
    if (cfg.hub) {
      run_hub(st);
      prof.select_s += seconds_since(t0);  // hub mode is not split into phases
      return;
    }

    uint8_t* flags = ws_.flags;
    std::memset(flags, 0, size_t(n_));
    for (int64_t i = 0; i < st.n_sink; ++i) flags[i] = 1;
    for (int64_t i = n_ - st.n_local; i < n_; ++i) flags[i] = 1;
    int64_t pred_bytes = 0;
    if (cfg.select == selector::topk && oracle) select_topk(st);
    if (cfg.select == selector::topk && !oracle) pred_bytes = select_predicted(st);
    if (cfg.select == selector::topp) select_topp(st);
    const int64_t n_f = active_select_ops().nonzero_positions(flags, n_, ws_.f);  // F, ascending
    const int64_t n_s = n_ - n_f;
    if (n_s < 2) return run_dense(1);
    listed_f_ = n_f;
    if (refine_rows_ > 0) refined_f_logits(n_f);

    const int32_t key_head = cfg.gqa_shared ? kvh_ : h0_;
    const int64_t seq_key = c_.a.seq_id ? c_.a.seq_id[s_] : s_;
    residual_walk walk(sample_key(cfg.seed, cfg.layer, seq_key, key_head, c_.a.step), uint64_t(n_));
    auto in_f = [flags](uint64_t t) { return flags[t] != 0; };
    // Sample positions [from, to) into ws_.sample. The round tables (8 x 2^half mixes) are built
    // once at least 2^half / 2 draws are to be taken: each draw then costs about a fifth.
    const uint16_t* table = nullptr;
    auto draw = [&](int64_t from, int64_t to) {
      const keyed_permutation& perm = walk.permutation();
      if (!table && perm.tabulable() && (to - from) * 2 >= (int64_t(1) << perm.half_bits())) {
        perm.tabulate(ws_.walk_table);
        table = ws_.walk_table;
      }
      // Long draws evaluate the permutation's positions ahead in tasks of k_walk_grain into
      // ws_.cand + from (free until the draws are sorted there).
      walk.take_ahead(to - from, in_f, ws_.sample + from, table, ws_.cand + from, k_walk_grain, n_f,
                      [](int64_t nv, const auto& eval) {
                        VATTN_TASKLOOP
                        for (int64_t i = 0; i < nv; i += k_walk_grain) eval(i);
                      });
    };
    int64_t m0 = 0;  // the first sample drawn before the budget is known
    if (cfg.sample == sampling::fixed_rate) m0 = fixed_rate_sample_size(cfg, n_s);
    if (cfg.sample == sampling::adaptive) m0 = base_sample_size(cfg, n_s);
    draw(0, m0);
    prof.select_s += seconds_since(t0);
    t0 = clock_type::now();

    // Phase 1: F and the first m0 draws, with moments, in one stabiliser per head.
    list_rows(0, ws_.f, n_f);
    ascending(ws_.sample, m0, ws_.cand);
    list_rows(n_f, ws_.cand, m0);
    list_logits(0, n_f + m0);
    for (int32_t x = 0; x < g_; ++x) bind_acc(x);
    weigh(n_f, m0);
    src_.wsum(ws_.cl, n_max_, g_, d_, ws_.off, n_f, ws_.part, ws_.acc, d_);
    for (int32_t x = 0; x < g_; ++x)
      add_sums<true>(ws_.cl + x * n_max_ + n_f, m0, &acc_[x].s_e, &acc_[x].s_ee);
    // The V moments serve the budgets that read them (a fixed rate's error estimate is the
    // denominator's); otherwise the base rows take the plain weighted sum (float chunks, as the
    // extension's).
    const bool v_moments = cfg.sample == sampling::adaptive && budget_uses_v_moments(cfg.mode);
    if (v_moments)
      src_.moments(ws_.cl + n_f, n_max_, g_, d_, ws_.off + n_f, m0, ws_.mpart, acc_[0].s_ev,
                   acc_[0].s_evev, acc_[0].s_eev);
    else
      src_.wsum(ws_.cl + n_f, n_max_, g_, d_, ws_.off + n_f, m0, ws_.part, acc_[0].s_ev, d_);
    prof.attend_s += seconds_since(t0);
    t0 = clock_type::now();

    int64_t b = m0;
    double est[256];
    for (int32_t x = 0; x < g_; ++x) {
      if (m0 >= 2) {
        base_moments bm = moments(acc_[x], n_s, m0, v_moments);
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
    // Phase 2: extend the sample to b (nested: the base draws are its prefix).
    draw(m0, b);
    prof.select_s += seconds_since(t0);
    t0 = clock_type::now();
    if (b > m0) extend(n_f, m0, b);
    if (cfg.sample == sampling::adaptive)
      for (int32_t x = 0; x < g_; ++x)
        est[x] = estimated_rel_error(cfg.mode, cfg.delta, moments_[x], b);

    const double row_bytes = double(d_) * double(sizeof(elem));
    // With refine, F's top-k rows were read with the shortlist, not again.
    const double k_rows = oracle             ? double(n_)
                          : refine_rows_ > 0 ? double(st_.n_sink + st_.n_local + refine_rows_ + b)
                                             : double(n_f + b);
    const int64_t bytes = int64_t((k_rows + double(n_f + b)) * row_bytes / double(g_)) + pred_bytes;
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
    prof.attend_s += seconds_since(t0);
  }

 private:
  const float* q(int32_t x) const { return c_.a.q + (int64_t(s_) * c_.p.n_head_q + h0_ + x) * d_; }
  float& lg(int32_t x, int64_t t) { return ws_.logits[int64_t(x) * n_max_ + t]; }
  float* cl(int32_t x) { return ws_.cl + int64_t(x) * n_max_; }

  // Logits of every token for every head of the unit (oracle selection, hub, dense).
  void all_logits() {
    for (int64_t t = 0; t < n_; ++t) ws_.off[t] = src_.offset(t), ws_.f[t] = int32_t(t);
    src_.logits(ws_.qs, g_, d_, ws_.off, ws_.f, n_, ws_.logits, n_max_);
  }

  void list_rows(int64_t at, const int32_t* tok, int64_t cnt) {
    for (int64_t i = 0; i < cnt; ++i) ws_.off[at + i] = src_.offset(tok[i]);
  }
  // Listed rows: F ascending, then the sample's phases (base draws, then the extension), each
  // sorted ascending in ws_.cand so gathers walk memory forward (at high density nearly a
  // stream). Sums do not depend on the order beyond rounding.
  const int32_t* list_token_ptr(int64_t at, int64_t n_f) const {
    return at < n_f ? ws_.f + at : ws_.cand + (at - n_f);
  }

  // dst = src[0, cnt) (distinct tokens) in ascending order: a sort when very short, else a bit
  // per token and a scan of the words (at 128K, 6K tokens: about 15 us instead of 150 for a sort).
  void ascending(const int32_t* src, int64_t cnt, int32_t* dst) {
    const int64_t words = (n_ + 63) / 64;
    if (cnt * 8 < words) {
      std::copy(src, src + cnt, dst);
      std::sort(dst, dst + cnt);
      return;
    }
    uint64_t* bits = ws_.bits;
    std::fill(bits, bits + words, uint64_t(0));
    for (int64_t i = 0; i < cnt; ++i) bits[src[i] >> 6] |= uint64_t(1) << (src[i] & 63);
    int64_t k = 0;
    for (int64_t w = 0; w < words; ++w)
      for (uint64_t m = bits[w]; m != 0; m &= m - 1)
        dst[k++] = int32_t(w * 64 + std::countr_zero(m));
  }

  // With refine, F's top-k tokens all lie in the shortlist (ws_.sample, ascending), whose
  // logits select_predicted left in ws_.logits: copy them to F's list positions.
  void refined_f_logits(int64_t n_f) {
    const int32_t* list = ws_.sample;
    for (int32_t x = 0; x < g_; ++x) {
      const float* from = ws_.logits + int64_t(x) * n_max_;
      int64_t i = 0;
      for (int64_t j = st_.n_sink; j < n_f - st_.n_local; ++j) {
        while (list[i] != ws_.f[j]) ++i;
        cl(x)[j] = from[i];
      }
    }
  }

  // Logits of listed rows [at, at + cnt): copied when every logit is known, else computed.
  void list_logits(int64_t at, int64_t cnt) {
    const bool have = c_.cfg.select != selector::none && c_.cfg.pred == predictor::oracle;
    if (!have) {
      // F rows and sample rows carry their tokens in two arrays; compute each part.
      const int64_t n_f = listed_f_;
      if (at < n_f) {
        const int64_t c1 = std::min(cnt, n_f - at);
        if (refine_rows_ > 0) {  // F's top-k logits are known (refined_f_logits): F is listed
          // at once, sinks first and the local window last
          const int64_t ns = st_.n_sink, nl = st_.n_local, z = n_f - nl;
          src_.logits(ws_.qs, g_, d_, ws_.off, ws_.f, ns, ws_.cl, n_max_);
          src_.logits(ws_.qs, g_, d_, ws_.off + z, ws_.f + z, nl, ws_.cl + z, n_max_);
        } else {
          src_.logits(ws_.qs, g_, d_, ws_.off + at, ws_.f + at, c1, ws_.cl + at, n_max_);
        }
        at += c1, cnt -= c1;
      }
      if (cnt > 0)
        src_.logits(ws_.qs, g_, d_, ws_.off + at, ws_.cand + (at - n_f), cnt, ws_.cl + at, n_max_);
      return;
    }
    for (int32_t x = 0; x < g_; ++x)
      for (int64_t i = at; i < at + cnt; ++i) cl(x)[i] = lg(x, *list_token_ptr(i, listed_f_));
  }

  void bind_acc(int32_t x) {
    const int64_t gd = int64_t(g_) * d_;
    head_acc& A = acc_[x];
    A.n_f = ws_.acc + x * d_;
    A.s_ev = ws_.acc + gd + x * d_;
    A.s_evev = ws_.acc + 2 * gd + x * d_;
    A.s_eev = ws_.acc + 3 * gd + x * d_;
    std::fill(A.n_f, A.n_f + d_, 0.0);
    std::fill(A.s_ev, A.s_ev + d_, 0.0);
    std::fill(A.s_evev, A.s_evev + d_, 0.0);
    std::fill(A.s_eev, A.s_eev + d_, 0.0);
    A.d_f = A.s_e = A.s_ee = 0;
  }

  // Stabiliser over F and the base draws per head, then the weights e = exp(l - c) in place.
  void weigh(int64_t n_f, int64_t m0) {
    for (int32_t x = 0; x < g_; ++x) {
      float* l = cl(x);
      const float c = max_of(l, n_f + m0);
      for (int64_t i = 0; i < n_f + m0; ++i) l[i] -= c;
      exp_inplace(active_simd_level(), l, n_f + m0);
      head_acc& A = acc_[x];
      A.c = c;
      add_sums<false>(l, n_f, &A.d_f);
    }
  }

  // The budget's moments of one head; with_v: the V moments were summed (not for the
  // denominator budget or a fixed rate, whose var_ev, var_eo and norms then stay 0, unread).
  base_moments moments(const head_acc& A, int64_t n_s, int64_t m, bool with_v) const {
    base_moments mm;
    mm.n_s = n_s;
    mm.m = m;
    const double md = double(m), w = double(n_s) / md;
    mm.d_hat = A.d_f + w * A.s_e;
    mm.var_e = (A.s_ee - A.s_e * A.s_e / md) / (md - 1);
    for (int32_t j = 0; with_v && j < d_; ++j) {
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

  // Adds draws [m0, b) to each head's sample sums, rescaling if a larger logit appears.
  void extend(int64_t n_f, int64_t m0, int64_t b) {
    const int64_t at = n_f + m0, cnt = b - m0;
    ascending(ws_.sample + m0, cnt, ws_.cand + m0);
    list_rows(at, ws_.cand + m0, cnt);
    list_logits(at, cnt);
    for (int32_t x = 0; x < g_; ++x) {
      head_acc& A = acc_[x];
      float* l = cl(x) + at;
      const float c = std::max(A.c, max_of(l, cnt));
      // The second-moment sums (s_ee, s_evev, s_eev) are not rescaled: they served the budget,
      // which is fixed by now.
      if (c > A.c) {  // keep one stabiliser for every term of the row
        const double r = std::exp(double(A.c - c));
        A.d_f *= r;
        A.s_e *= r;
        for (int32_t j = 0; j < d_; ++j) A.n_f[j] *= r, A.s_ev[j] *= r;
        A.c = c;
      }
      for (int64_t i = 0; i < cnt; ++i) l[i] -= c;
      exp_inplace(active_simd_level(), l, cnt);
      add_sums<false>(l, cnt, &A.s_e);
    }
    src_.wsum(ws_.cl + at, n_max_, g_, d_, ws_.off + at, cnt, ws_.part, ws_.acc + int64_t(g_) * d_,
              d_);
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
    if (!finite) src_.report_bad_v(d_, ws_.f, n_f_count, ws_.sample, b);
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

  // Exact attention over every token (the too-short fallback of a sparse configuration).
  void run_dense(int32_t fallback) {
    const auto t0 = clock_type::now();
    all_logits();
    for (int64_t i = 0; i < n_; ++i) ws_.f[i] = int32_t(i);
    for (int32_t x = 0; x < g_; ++x) {
      bind_acc(x);
      float c = -INFINITY;
      for (int64_t t = 0; t < n_; ++t) c = std::max(c, lg(x, t));
      acc_[x].c = c;
    }
    for (int32_t x = 0; x < g_; ++x) {  // ws_.off holds every token's row (all_logits)
      float* e = cl(x);
      for (int64_t t = 0; t < n_; ++t) e[t] = lg(x, t) - acc_[x].c;
      exp_inplace(active_simd_level(), e, n_);
      for (int64_t t = 0; t < n_; ++t) acc_[x].d_f += double(e[t]);
    }
    src_.wsum(ws_.cl, n_max_, g_, d_, ws_.off, n_, ws_.part, ws_.acc, d_);
    for (int32_t x = 0; x < g_; ++x) {
      const head_acc& A = acc_[x];
      write_output(x, A.d_f, A.n_f, nullptr, 0, n_, 0);
      head_stats hs;
      hs.n = n_;
      hs.n_f = n_;
      hs.density = 1;
      hs.bytes_kv = int64_t(2 * n_ * d_ * int64_t(sizeof(elem)) / g_);
      hs.dense_fallback = fallback;
      emit(x, hs, n_, 0);
    }
    ws_.prof->attend_s += seconds_since(t0);
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

  // Top-k by an approximate predictor (predictors.hpp): every head of the unit scores in one
  // pass over the index; returns the index bytes read per head. With refine, the shortlist's K
  // rows read for the exact ranking are counted in refine_rows_.
  int64_t select_predicted(const stage_sizes& st) {
    const pred_impl& ix = c_.a.index->data();
    const int64_t lo = st.n_sink, hi = n_ - st.n_local;
    const bool pages = c_.cfg.pred == predictor::page_bounds;
    const int64_t P = c_.cfg.pred_page, p0 = lo / P, p1 = (hi + P - 1) / P;
    // Scores of head x: pages at ws_.logits + x * n_max (by page - p0), signs as u16 at
    // sc + x * n_max (by token - lo).
    uint16_t* sc = reinterpret_cast<uint16_t*>(ws_.logits);
    int64_t counts[257];  // refine with signs: the unit scores' histogram
    if (pages) {
      const int64_t block = 2048, blocks = (p1 - p0 + block - 1) / block;
      VATTN_TASKLOOP
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t a = p0 + b * block;
        page_upper_bounds_heads(ix, s_, kvh_, q(0), g_, a, std::min(p1, a + block),
                                ws_.logits + (a - p0), n_max_);
      }
    } else {
      uint32_t qsig[256 * 8];
      for (int32_t x = 0; x < g_; ++x) query_signature(ix, kvh_, q(x), qsig + x * ix.words);
      const int64_t block = 16384, blocks = (hi - lo + block - 1) / block;
      if (st.shortlist > 0) {  // refine: only the unit's score (row 0) and its histogram
        std::fill(counts, counts + 257, 0);
        VATTN_TASKLOOP
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t a = lo + b * block;
          sign_max_matches_heads(ix, s_, kvh_, qsig, g_, a, std::min(hi, a + block), sc + (a - lo),
                                 counts);
        }
      } else {
        VATTN_TASKLOOP
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t a = lo + b * block;
          sign_matches_heads(ix, s_, kvh_, qsig, g_, a, std::min(hi, a + block), sc + (a - lo),
                             n_max_);
        }
      }
    }
    const int64_t index_bytes = predictor_read_bytes(ix, n_) / g_;
    auto mark = [this](int64_t t, bool on) { ws_.flags[t] |= uint8_t(on); };
    if (st.shortlist == 0) {
      for (int32_t x = 0; x < g_; ++x) {
        if (pages) {
          top_pages(ws_.logits + x * n_max_, lo, hi, st.k, mark);
        } else {
          int32_t* picked = ws_.sample;  // free: the sample is drawn later
          const int64_t got = top_signs(sc + x * n_max_, lo, hi, st.k, picked);
          for (int64_t i = 0; i < got; ++i) ws_.flags[picked[i]] = 1;
        }
      }
      return index_bytes;
    }
    // refine: the shortlist by the unit's score (the maximum over its heads, kept in row 0; the
    // sign scan wrote it and its histogram directly).
    if (pages) {
      for (int32_t x = 1; x < g_; ++x) {
        const float* r = ws_.logits + x * n_max_;
        for (int64_t i = 0; i < p1 - p0; ++i) ws_.logits[i] = std::max(ws_.logits[i], r[i]);
      }
    }
    int32_t* list = ws_.sample;  // the shortlist's tokens; the sample is drawn later
    int64_t len = 0;
    if (pages) {
      auto add = [list, &len](int64_t t, bool on) {  // len < hi - lo: inside the list
        list[len] = int32_t(t);
        len += on;
      };
      top_pages(ws_.logits, lo, hi, st.shortlist, add);
      std::sort(list, list + len);  // gathers walk memory forward
    } else {
      len = top_signs(sc, lo, hi, st.shortlist, list, counts);  // ascending already
    }
    if (len <= st.k) {  // every head takes the whole shortlist: no logit needed
      for (int64_t i = 0; i < len; ++i) ws_.flags[list[i]] = 1;
      return index_bytes;
    }
    // Exact logits of the shortlist for every head (one K row read serves the unit), kept in
    // ws_.logits (the scores are spent) for F's rows; then each head's k best (logit
    // descending, lower position first).
    list_rows(0, list, len);
    src_.logits(ws_.qs, g_, d_, ws_.off, list, len, ws_.logits, n_max_);
    // The k-th largest logit of each head by a selection over a copy of its values (no index
    // indirection; the heads' selections are independent tasks), then one pass in list
    // (= position) order: the logits above it, and the lowest positions among those equal to it.
    float thr[256];
    VATTN_TASKLOOP
    for (int32_t x = 0; x < g_; ++x) {
      const float* l = ws_.logits + x * n_max_;
      float* tmp = cl(x);  // free until F's logits are listed
      std::copy(l, l + len, tmp);
      std::nth_element(tmp, tmp + (st.k - 1), tmp + len, std::greater<float>());
      thr[x] = tmp[st.k - 1];
    }
    for (int32_t x = 0; x < g_; ++x) {
      const float* l = ws_.logits + x * n_max_;
      const float t = thr[x];
      int64_t above = 0;
      for (int64_t i = 0; i < len; ++i) above += l[i] > t;
      int64_t at_thr = st.k - above;
      for (int64_t i = 0; i < len; ++i) {
        if (l[i] > t || (l[i] == t && at_thr-- > 0)) ws_.flags[list[i]] = 1;
      }
    }
    refine_rows_ = len;
    return index_bytes;
  }

  // Pages intersecting [lo, hi) ranked by their bound sc[page - p0] (desc, page asc); the best
  // pages are taken whole (their tokens inside [lo, hi), passed to take(t, true)) until they
  // hold at least k tokens.
  template <class Take>
  void top_pages(const float* sc, int64_t lo, int64_t hi, int64_t k, Take take) {
    const int64_t P = c_.cfg.pred_page, p0 = lo / P, p1 = (hi + P - 1) / P, np = p1 - p0;
    for (int64_t i = 0; i < np; ++i) ws_.cand[i] = int32_t(i);
    auto better = [sc](int32_t a, int32_t b) { return sc[a] != sc[b] ? sc[a] > sc[b] : a < b; };
    // Every page but the first and the last lies inside [lo, hi): k / P + 2 pages hold k tokens.
    const int64_t pick = std::min(np, (k + P - 1) / P + 2);
    if (pick < np) std::nth_element(ws_.cand, ws_.cand + pick, ws_.cand + np, better);
    std::sort(ws_.cand, ws_.cand + pick, better);
    int64_t got = 0;
    for (int64_t i = 0; i < pick && got < k; ++i) {
      const int64_t page = p0 + ws_.cand[i];
      const int64_t a = std::max(lo, page * P), z = std::min(hi, (page + 1) * P);
      for (int64_t t = a; t < z; ++t) take(t, true);
      got += z - a;
    }
  }

  // The first k tokens of [lo, hi) ranked by their sign score sc[t - lo] (desc, position asc),
  // in ascending position order into out; returns how many (k, or hi - lo if fewer). The
  // scores' histogram is `given` (pred_bits + 1 counts) or counted here.
  int64_t top_signs(const uint16_t* sc, int64_t lo, int64_t hi, int64_t k, int32_t* out,
                    const int64_t* given = nullptr) {
    const int64_t cnt = hi - lo;
    score_counts own;
    if (!given) own.add(sc, cnt);
    auto count = [&](int32_t b) { return given ? given[b] : own.at(b); };
    int32_t thr = c_.cfg.pred_bits;
    int64_t above = 0;  // tokens scoring more than thr
    while (thr > 0 && above + count(thr) < k) above += count(thr--);
    const int64_t at_thr = k - above;  // taken from the tokens scoring exactly thr, lowest first
    return active_select_ops().positions_above(sc, cnt, uint16_t(thr), at_thr, int32_t(lo), out);
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
    const int64_t n_f = active_select_ops().nonzero_positions(flags, n_, ws_.f);
    float c = -INFINITY;
    for (int64_t t = 0; t < n_; ++t) c = std::max(c, lg(0, t));
    auto e_of = [&](int64_t t) { return std::exp(double(lg(0, t) - c)); };
    const elem* vbase = src_.v();
    auto vrow = [&](int64_t t) { return vbase + src_.offset(t); };

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

  const run_ctx& c_;
  scratch ws_;
  int32_t s_, h0_, g_, kvh_;
  row_source<T> src_;
  int32_t d_ = 0;
  int64_t n_ = 0, n_max_ = 0;
  int64_t listed_f_ = 0;
  int64_t refine_rows_ = 0;  // refine: K rows read to rank the shortlist exactly (0: none)
  stage_sizes st_;           // this run's sizes of sinks, local window, top-k and shortlist
  head_acc acc_[256];
  base_moments moments_[256];
};

// ---- dense: split-KV over (sequence, kv head, chunk) items, then a log-sum-exp merge --------

int64_t dense_chunks(int64_t n) {
  return (n + k_dense_chunk - 1) / k_dense_chunk;
}

// One chunk of one sequence, every kv head, token by token: partial state (max m, sum l, output
// o = sum e v) per query head.
template <dtype T>
void dense_chunk(const run_ctx& c, scratch ws, int32_t s, int64_t chunk) {
  const int32_t H = c.p.n_head_kv, G = c.p.n_head_q / H, d = c.p.head_dim, Q = c.p.n_head_q;
  const int64_t n = c.kv.seq_len[s], t0 = chunk * k_dense_chunk;
  const int64_t cnt = std::min(k_dense_chunk, n - t0);
  const dense_ops<T>& ops = dense_ops_for<T>(active_simd_level());
  const auto* kb = static_cast<const typename storage<T>::type*>(c.kv.k);
  const auto* vb = static_cast<const typename storage<T>::type*>(c.kv.v);
  const float* q = c.a.q + int64_t(s) * Q * d;
  for (int64_t j = 0; j < int64_t(Q) * d; ++j) ws.qs[j] = q[j] * c.scale;
  for (int64_t i = 0; i < cnt; ++i) ws.off[i] = row_offset(c.kv, c.row0[s], s, t0 + i, 0);
  ops.logits(ws.qs, H, G, d, kb, ws.off, c.kv.stride_head, cnt, ws.cl, k_dense_chunk);
  const int64_t stride = d + 2;
  auto state = [&](int32_t x) {
    return c.partials + ((int64_t(s) * Q + x) * c.chunks_max + chunk) * stride;
  };
  for (int32_t x = 0; x < Q; ++x) {
    float* l = ws.cl + x * k_dense_chunk;
    float m = 0;
    double sum = 0;
    if (!shift_exp_sum(active_simd_level(), l, cnt, &m, &sum)) {
      const int64_t i = std::find_if(l, l + cnt, [](float v) { return !std::isfinite(v); }) - l;
      fail_at("k contains NaN/Inf (or q.k overflows) at seq " + std::to_string(s) + ", token " +
              std::to_string(t0 + i) + ", kv head " + std::to_string(x / G));
    }
    float* st = state(x);
    st[0] = m;
    st[1] = float(sum);
  }
  std::fill(ws.facc, ws.facc + int64_t(Q) * d, 0.0f);
  ops.wsum(ws.cl, k_dense_chunk, H, G, d, vb, ws.off, c.kv.stride_head, cnt, ws.facc);
  for (int32_t x = 0; x < Q; ++x) std::copy_n(ws.facc + int64_t(x) * d, d, state(x) + 2);
}

// Merges the chunk states of one (sequence, query head) in chunk order, in double.
template <dtype T>
void dense_merge(const run_ctx& c, int32_t s, int32_t h) {
  const int32_t d = c.p.head_dim, G = c.p.n_head_q / c.p.n_head_kv;
  const int64_t n = c.kv.seq_len[s], chunks = dense_chunks(n), stride = d + 2;
  const float* st = c.partials + (int64_t(s) * c.p.n_head_q + h) * c.chunks_max * stride;
  float mx = -INFINITY;
  for (int64_t k = 0; k < chunks; ++k) mx = std::max(mx, st[k * stride]);
  double acc[4096] = {};
  double l = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    const float* p = st + k * stride;
    const double r = std::exp(double(p[0] - mx));
    l += r * double(p[1]);
    for (int32_t j = 0; j < d; ++j) acc[j] += r * double(p[2 + j]);
  }
  float* o = c.a.out + (int64_t(s) * c.p.n_head_q + h) * d;
  bool finite = std::isfinite(l) && l > 0;
  for (int32_t j = 0; j < d; ++j) {
    o[j] = float(acc[j] / l);
    finite = finite && std::isfinite(o[j]);
  }
  if (!finite) row_source<T>(c, s, h / G).report_bad_v(d, nullptr, n, nullptr, 0);
  const int64_t hi = int64_t(s) * c.p.n_head_q + h;
  if (c.a.stats) {
    head_stats hs;
    hs.n = n;
    hs.n_f = n;
    hs.density = 1;
    hs.bytes_kv = int64_t(2 * n * d * int64_t(sizeof(typename storage<T>::type)) / G);
    c.a.stats[hi] = hs;
  }
  if (c.a.indices) {
    int32_t* dst = c.a.indices + hi * c.p.n_tokens_max;
    for (int64_t t = 0; t < n; ++t) dst[t] = int32_t(t);
  }
}

// Runs body(i, thread) for i in [0, n) on up to n_threads threads; the first exception's
// message is kept in a fixed buffer (reporting cannot throw inside the parallel region) and
// rethrown after the loop.
template <typename F>
void parallel_for(int64_t n, int32_t n_threads, F&& body) {
  // The error of the smallest failing item is reported, whatever the thread count: items above
  // a known failure are skipped, items below it still run.
  std::atomic<int64_t> failed_at{INT64_MAX};
  std::mutex mu;
  char first_error[512] = {};
  auto guarded = [&](int64_t i, int tid) {
    if (i > failed_at.load(std::memory_order_relaxed)) return;
    try {
      body(i, tid);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(mu);
      if (i < failed_at.load()) {
        failed_at.store(i);
        std::snprintf(first_error, sizeof first_error, "%s", e.what());
      }
    }
  };
#if VATTN_HAVE_OPENMP
  if (n_threads > 1) {  // even for one item: the other threads run its tasks
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (int64_t i = 0; i < n; ++i) guarded(i, omp_get_thread_num());
  } else {
    for (int64_t i = 0; i < n; ++i) guarded(i, 0);
  }
#else
  (void)n_threads;
  for (int64_t i = 0; i < n; ++i) guarded(i, 0);
#endif
  if (failed_at.load() != INT64_MAX) throw error(first_error);
}

// Per-thread phase times, zeroed before a run and added into run_args::profile after it.
void reset_profiles(uint8_t* ws, size_t ws_per_thread, const layout_sizes& sizes, int32_t n) {
  for (int32_t t = 0; t < n; ++t) *carve(ws + size_t(t) * ws_per_thread, sizes).prof = {};
}
void collect_profiles(uint8_t* ws, size_t ws_per_thread, const layout_sizes& sizes, int32_t n,
                      run_profile* out) {
  if (!out) return;
  for (int32_t t = 0; t < n; ++t) {
    const run_profile& p = *carve(ws + size_t(t) * ws_per_thread, sizes).prof;
    out->select_s += p.select_s;
    out->attend_s += p.attend_s;
  }
}

// Items (sequence, chunk) with chunks_max chunks per sequence; items past a sequence's last
// chunk do nothing.
template <dtype T>
void run_dense_split(const run_ctx& ctx, uint8_t* ws, size_t ws_per_thread,
                     const layout_sizes& sizes, int32_t n_threads) {
  parallel_for(int64_t(ctx.kv.n_seq) * ctx.chunks_max, n_threads, [&](int64_t i, int tid) {
    const int32_t s = int32_t(i / ctx.chunks_max);
    const int64_t chunk = i % ctx.chunks_max;
    if (chunk >= dense_chunks(ctx.kv.seq_len[s])) return;
    const auto t0 = clock_type::now();
    const scratch w = carve(ws + size_t(tid) * ws_per_thread, sizes);
    dense_chunk<T>(ctx, w, s, chunk);
    w.prof->attend_s += seconds_since(t0);
  });
  parallel_for(int64_t(ctx.kv.n_seq) * ctx.p.n_head_q, n_threads, [&](int64_t i, int) {
    dense_merge<T>(ctx, int32_t(i / ctx.p.n_head_q), int32_t(i % ctx.p.n_head_q));
  });
}

template <dtype T>
void run_units(const run_ctx& ctx, uint8_t* ws, size_t ws_per_thread, int32_t n_threads) {
  const int32_t group = unit_group(ctx.cfg, ctx.p);
  const layout_sizes sizes = scratch_sizes(scratch_rows(ctx.cfg, ctx.p), group, ctx.p.head_dim);
  reset_profiles(ws, ws_per_thread, sizes, n_threads);
  if (ctx.cfg.dense) {
    run_dense_split<T>(ctx, ws, ws_per_thread, sizes, n_threads);
  } else {
    const int32_t units_per_seq = ctx.p.n_head_q / group;
    const int64_t n_units = int64_t(ctx.kv.n_seq) * units_per_seq;
    parallel_for(n_units, n_threads, [&](int64_t u, int tid) {
      const int32_t s = int32_t(u / units_per_seq), first = int32_t(u % units_per_seq) * group;
      unit_runner<T> r(ctx, carve(ws + size_t(tid) * ws_per_thread, sizes), s, first, group);
      r.run();
    });
  }
  collect_profiles(ws, ws_per_thread, sizes, n_threads, ctx.a.profile);
}

}  // namespace

plan::plan(const config& cfg, const plan_params& params) : cfg_(cfg), params_(params) {
  cfg_.validate();
  validate_plan_params(params_);
  if (params_.n_threads == 0) params_.n_threads = hardware_threads();
  const int32_t group = unit_group(cfg_, params_);
  if (cfg_.gqa_shared && group > 256)
    throw error("plan_params: gqa_shared supports at most 256 query heads per kv head");
  ws_per_thread_ = scratch_sizes(scratch_rows(cfg_, params_), group, params_.head_dim).total;
  ws_shared_ = align_up(sizeof(int64_t) * size_t(params_.n_seq_max));
  if (cfg_.dense)  // split-KV partial states
    ws_shared_ +=
        align_up(sizeof(float) * size_t(params_.n_seq_max) * size_t(params_.n_head_q) *
                 size_t(dense_chunks(params_.n_tokens_max)) * (size_t(params_.head_dim) + 2));
  if (ws_per_thread_ > (size_t(1) << 46) / size_t(params_.n_threads))
    throw error("plan_params: the workspace for n_tokens_max " +
                std::to_string(params_.n_tokens_max) + " on " + std::to_string(params_.n_threads) +
                " threads exceeds 64 TiB");
  ws_bytes_ = ws_shared_ + ws_per_thread_ * size_t(params_.n_threads);
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
  validate_index(cfg_, params_, args);
  const kv_cache kv = with_default_strides(args.kv);
  float* partials =
      reinterpret_cast<float*>(ws + align_up(sizeof(int64_t) * size_t(params_.n_seq_max)));
  const run_ctx ctx{cfg_,     params_,
                    args,     kv,
                    row0,     float(logit_scale(cfg_, params_.head_dim)),
                    partials, dense_chunks(params_.n_tokens_max)};
  uint8_t* thread_ws = ws + ws_shared_;
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
