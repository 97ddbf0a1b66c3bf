// reference.cpp: vAttention in double precision, written for clarity rather than speed (full
// sorts, dense score vectors, two-pass moments). The oracle for every fast path.
#include "vattn/reference.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "core/budget.hpp"
#include "core/dtype.hpp"
#include "core/kv_access.hpp"
#include "core/sampler.hpp"
#include "core/validate.hpp"
#include "cpu/predictors.hpp"

namespace vattn::reference {

namespace {

using namespace vattn::detail;

// K, V rows of one (sequence, kv head) and the logits of the query heads that read them.
struct group_data {
  int64_t n = 0;
  int32_t d = 0;
  std::vector<double> k, v;                 // [n, d]
  std::vector<std::vector<double>> logits;  // per head of the group: [n]
  std::vector<double> c;                    // per head: max logit
  std::vector<std::vector<double>> e;       // per head: exp(logit - c)
};

// Plain moments of the base sample for one head (two passes: means, then variances).
base_moments moments(const group_data& g, int hh, const std::vector<char>& in_f,
                     const std::vector<int32_t>& base, int64_t n_s) {
  const int32_t d = g.d;
  const auto& e = g.e[hh];
  const double m = double(base.size()), w = double(n_s) / m;
  std::vector<double> n_hat(d, 0.0);
  double d_hat = 0;
  for (int64_t i = 0; i < g.n; ++i) {
    if (!in_f[i]) continue;
    d_hat += e[i];
    for (int32_t j = 0; j < d; ++j) n_hat[j] += e[i] * g.v[i * d + j];
  }
  double mean_e = 0;
  std::vector<double> mean_ev(d, 0.0);
  for (int32_t t : base) {
    mean_e += e[t] / m;
    for (int32_t j = 0; j < d; ++j) mean_ev[j] += e[t] * g.v[int64_t(t) * d + j] / m;
  }
  d_hat += w * m * mean_e;
  for (int32_t j = 0; j < d; ++j) n_hat[j] += w * m * mean_ev[j];
  std::vector<double> o_hat(d);
  for (int32_t j = 0; j < d; ++j) o_hat[j] = n_hat[j] / d_hat;

  base_moments mm;
  mm.n_s = n_s;
  mm.m = int64_t(base.size());
  mm.d_hat = d_hat;
  for (int32_t t : base) {
    mm.var_e += (e[t] - mean_e) * (e[t] - mean_e);
    for (int32_t j = 0; j < d; ++j) {
      const double x = e[t] * g.v[int64_t(t) * d + j];
      mm.var_ev += (x - mean_ev[j]) * (x - mean_ev[j]);
    }
  }
  // mean of e (v - O^_B) over B is mean_ev - O^_B mean_e
  for (int32_t t : base) {
    for (int32_t j = 0; j < d; ++j) {
      const double y = e[t] * (g.v[int64_t(t) * d + j] - o_hat[j]);
      const double mu = mean_ev[j] - o_hat[j] * mean_e;
      mm.var_eo += (y - mu) * (y - mu);
    }
  }
  mm.var_e /= (m - 1);
  mm.var_ev /= (m - 1);
  mm.var_eo /= (m - 1);
  for (int32_t j = 0; j < d; ++j) {
    mm.n_norm2 += n_hat[j] * n_hat[j];
    mm.o_norm2 += o_hat[j] * o_hat[j];
  }
  return mm;
}

// Fills D^, N^, O^ from per-token weights (0 for tokens not read).
void estimate(const group_data& g, int hh, const std::vector<double>& weight, head_result& r) {
  const int32_t d = g.d;
  r.d_est = 0;
  r.n_est.assign(d, 0.0);
  for (int64_t i = 0; i < g.n; ++i) {
    if (weight[i] == 0) continue;
    const double we = weight[i] * g.e[hh][i];
    r.d_est += we;
    for (int32_t j = 0; j < d; ++j) r.n_est[j] += we * g.v[i * d + j];
  }
  r.out.resize(d);
  for (int32_t j = 0; j < d; ++j) r.out[j] = r.n_est[j] / r.d_est;
}

// Tokens outside F sorted by (logit descending, position ascending).
std::vector<int32_t> ranked_candidates(const group_data& g, int hh, const std::vector<char>& in_f) {
  std::vector<int32_t> cand;
  for (int64_t i = 0; i < g.n; ++i)
    if (!in_f[i]) cand.push_back(int32_t(i));
  const auto& s = g.logits[hh];
  std::sort(cand.begin(), cand.end(),
            [&](int32_t a, int32_t b) { return s[a] != s[b] ? s[a] > s[b] : a < b; });
  return cand;
}

// Exact attention for one head: F is every token, nothing sampled. `share` heads split the
// bytes read (a gqa_shared group reads each row once).
void finish_dense_head(const group_data& g, int hh, head_result& r, int64_t es, size_t share,
                       int32_t fallback) {
  std::vector<double> w(g.n, 1.0);
  estimate(g, hh, w, r);
  r.f.resize(g.n);
  std::iota(r.f.begin(), r.f.end(), 0);
  r.stats.n_f = g.n;
  r.stats.density = 1;
  r.stats.bytes_kv = int64_t(2.0 * double(g.n) * g.d * double(es) / double(share));
  r.stats.dense_fallback = fallback;
}

struct unit_ctx {
  const config& cfg;
  const run_args& a;
  int64_t seq_key;  // sequence id in the sampling key
  int32_t key_head;
  int64_t es;         // bytes per element
  int32_t group = 1;  // query heads per kv head
  int32_t seq = 0, kvh = 0;
  const float* q0 = nullptr;  // q of the kv group's first head
};

// Scores of an approximate predictor for head hh (the same functions the fast paths use), by
// token of [lo, hi) for signs and by page p0 + i for pages.
std::vector<double> predictor_scores(const unit_ctx& u, int hh, int64_t lo, int64_t hi, int32_t d) {
  const pred_impl& ix = u.a.index->data();
  const float* q = u.q0 + int64_t(hh) * d;
  if (u.cfg.pred == predictor::page_bounds) {
    const int64_t P = u.cfg.pred_page, p0 = lo / P, p1 = (hi + P - 1) / P;
    std::vector<float> sc(size_t(p1 - p0));
    page_upper_bounds(ix, u.seq, u.kvh, q, p0, p1, sc.data());
    return std::vector<double>(sc.begin(), sc.end());
  }
  uint32_t qsig[8];
  query_signature(ix, u.kvh, q, qsig);
  std::vector<uint16_t> sc(size_t(hi - lo));
  sign_matches(ix, u.seq, u.kvh, qsig, lo, hi, sc.data());
  return std::vector<double>(sc.begin(), sc.end());
}

// The tokens of [lo, hi) that scores `sc` (predictor_scores' form) rank first, ranked by a
// full sort: k tokens for signs, whole pages until they hold at least k tokens for pages.
std::vector<int32_t> predicted_topk(const unit_ctx& u, const std::vector<double>& sc, int64_t lo,
                                    int64_t hi, int64_t k) {
  std::vector<int32_t> out;
  std::vector<int64_t> order(sc.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](int64_t a, int64_t b) { return sc[a] != sc[b] ? sc[a] > sc[b] : a < b; });
  if (u.cfg.pred == predictor::page_bounds) {
    const int64_t P = u.cfg.pred_page, p0 = lo / P;
    for (int64_t p : order) {
      if (int64_t(out.size()) >= k) break;
      for (int64_t t = std::max(lo, (p0 + p) * P); t < std::min(hi, (p0 + p + 1) * P); ++t)
        out.push_back(int32_t(t));
    }
    return out;
  }
  for (int64_t i = 0; i < k; ++i) out.push_back(int32_t(lo + order[i]));
  return out;
}

// refine: the shortlist by the unit's score (per token or page the maximum over its heads),
// then each head's k best of it by exact logit (descending, lower position first). Returns the
// K rows read for the ranking: the shortlist's size, 0 when it holds no more than k tokens
// (every head takes it whole, no logit is needed).
int64_t refined_topk(const unit_ctx& u, const group_data& g, const std::vector<int>& heads,
                     const stage_sizes& st, std::vector<char>& in_f) {
  const int64_t lo = st.n_sink, hi = g.n - st.n_local;
  std::vector<double> best;
  for (int hh : heads) {
    const std::vector<double> sc = predictor_scores(u, hh, lo, hi, g.d);
    if (best.empty()) best = sc;
    for (size_t i = 0; i < sc.size(); ++i) best[i] = std::max(best[i], sc[i]);
  }
  std::vector<int32_t> shortlist = predicted_topk(u, best, lo, hi, st.shortlist);
  for (int hh : heads) {
    const auto& s = g.logits[hh];
    std::sort(shortlist.begin(), shortlist.end(),
              [&](int32_t a, int32_t b) { return s[a] != s[b] ? s[a] > s[b] : a < b; });
    for (int64_t i = 0; i < std::min<int64_t>(st.k, int64_t(shortlist.size())); ++i)
      in_f[shortlist[i]] = 1;
  }
  return int64_t(shortlist.size()) > st.k ? int64_t(shortlist.size()) : 0;
}

// One selection unit: a single query head, or every head of a kv group when gqa_shared.
void run_unit(const unit_ctx& u, const group_data& g, const std::vector<int>& heads,
              std::vector<head_result*>& res) {
  const config& cfg = u.cfg;
  const int64_t n = g.n;
  const int32_t d = g.d;
  const double row_bytes = double(d) * double(u.es);
  stage_sizes st = resolve_stages(cfg, n);
  std::vector<char> in_f(n, 0);

  auto finish_dense = [&]() {
    for (size_t x = 0; x < heads.size(); ++x)
      // Dense attention reads each row once for the whole kv group.
      finish_dense_head(g, heads[x], *res[x], u.es, cfg.dense ? size_t(u.group) : heads.size(),
                        cfg.dense ? 0 : 1);
  };
  if (st.dense) return finish_dense();

  for (int64_t i = 0; i < st.n_sink; ++i) in_f[i] = 1;
  for (int64_t i = n - st.n_local; i < n; ++i) in_f[i] = 1;
  const std::vector<char> fixed_f = in_f;  // sinks and local only
  const bool refine = cfg.select == selector::topk && st.shortlist > 0;
  // refine reads the shortlist's K rows once more for the exact ranking
  const int64_t refine_rows = refine ? refined_topk(u, g, heads, st, in_f) : 0;
  for (int hh : heads) {
    if (refine) break;
    if (cfg.select == selector::topk && cfg.pred != predictor::oracle) {
      const int64_t lo = st.n_sink, hi = n - st.n_local;
      for (int32_t t : predicted_topk(u, predictor_scores(u, hh, lo, hi, d), lo, hi, st.k))
        in_f[t] = 1;
    } else if (cfg.select == selector::topk) {
      std::vector<int32_t> cand = ranked_candidates(g, hh, fixed_f);
      for (int64_t i = 0; i < st.k; ++i) in_f[cand[i]] = 1;
    } else if (cfg.select == selector::topp) {
      std::vector<int32_t> cand = ranked_candidates(g, hh, fixed_f);
      const auto& e = g.e[hh];
      double total = 0, mass = 0;
      for (int64_t i = 0; i < n; ++i) total += e[i];
      for (int64_t i = 0; i < n; ++i) mass += fixed_f[i] ? e[i] : 0.0;
      for (size_t i = 0; i < cand.size() && mass < cfg.top_p * total; ++i) {
        in_f[cand[i]] = 1;
        mass += e[cand[i]];
      }
    }
  }
  std::vector<int32_t> f;
  for (int64_t i = 0; i < n; ++i)
    if (in_f[i]) f.push_back(int32_t(i));
  const int64_t n_s = n - int64_t(f.size());
  if (n_s < 2) return finish_dense();

  // The sample: the tokens of R in the order of a keyed permutation of [0, n) (F skipped); the
  // first m are the base sample, the first b the final one.
  const uint64_t key = sample_key(cfg.seed, cfg.layer, u.seq_key, u.key_head, u.a.step);
  const keyed_permutation perm(key, uint64_t(n));
  std::vector<int32_t> order;
  for (uint64_t j = 0; int64_t(order.size()) < n_s; ++j) {
    const int32_t t = int32_t(perm(j));
    if (!in_f[t]) order.push_back(t);
  }
  auto prefix = [&](int64_t len) {
    return std::vector<int32_t>(order.begin(), order.begin() + len);
  };

  int64_t m = 0, b = 0;
  std::vector<double> est_err(heads.size(), -1.0);
  std::vector<base_moments> mm(heads.size());
  if (cfg.sample == sampling::fixed_rate) {
    b = fixed_rate_sample_size(cfg, n_s);
  } else if (cfg.sample == sampling::adaptive) {
    m = base_sample_size(cfg, n_s);
    const std::vector<int32_t> base = prefix(m);
    for (size_t x = 0; x < heads.size(); ++x) {
      mm[x] = moments(g, heads[x], in_f, base, n_s);
      b = std::max(b, compute_budget(cfg.mode, cfg.eps, cfg.delta, mm[x]).b);
    }
  }
  const std::vector<int32_t> sample = prefix(b);
  for (size_t x = 0; x < heads.size(); ++x) {
    if (cfg.sample == sampling::adaptive) {
      est_err[x] = estimated_rel_error(cfg.mode, cfg.delta, mm[x], b);
    } else if (cfg.sample == sampling::fixed_rate && b >= 2) {
      est_err[x] = estimated_rel_error(budget_mode::denominator, cfg.delta,
                                       moments(g, heads[x], in_f, sample, n_s), b);
    }
  }

  std::vector<double> w(n, 0.0);
  for (int32_t i : f) w[i] = 1.0;
  for (int32_t i : sample) w[i] = double(n_s) / double(b);
  const bool reads_all_k = cfg.select != selector::none && cfg.pred == predictor::oracle;
  // With refine's exact ranking, F's top-k rows are read with the shortlist, not again.
  const double k_rows = reads_all_k       ? double(n)
                        : refine_rows > 0 ? double(st.n_sink + st.n_local + refine_rows + b)
                                          : double(f.size() + b);
  // The heads of a unit score in one pass over the index.
  const int64_t pred_bytes =
      cfg.pred != predictor::oracle
          ? predictor_read_bytes(u.a.index->data(), n) / int64_t(heads.size())
          : 0;
  const double v_rows = double(f.size() + b);
  for (size_t x = 0; x < heads.size(); ++x) {
    head_result& r = *res[x];
    estimate(g, heads[x], w, r);
    r.f = f;
    r.sample = sample;
    r.stats.n_f = int64_t(f.size());
    r.stats.n_s = n_s;
    r.stats.m = m;
    r.stats.b = b;
    r.stats.n_sampled = b;
    r.stats.density = double(int64_t(f.size()) + b) / double(n);
    r.stats.est_rel_error = est_err[x];
    r.stats.bytes_kv = int64_t((k_rows + v_rows) * row_bytes / double(heads.size())) + pred_bytes;
  }
}

// Hub compatibility mode (SPEC section 6), one query head.
void run_hub_head(const unit_ctx& u, const group_data& g, int hh, head_result& r) {
  const config& cfg = u.cfg;
  const int64_t n = g.n;
  stage_sizes st = resolve_stages(cfg, n);
  std::vector<char> in_f(n, 0);
  if (st.dense) return finish_dense_head(g, hh, r, u.es, 1, 1);
  for (int64_t i = 0; i < st.n_sink; ++i) in_f[i] = 1;
  for (int64_t i = n - st.n_local; i < n; ++i) in_f[i] = 1;
  if (st.k > 0) {
    std::vector<int32_t> cand = ranked_candidates(g, hh, in_f);  // logit order = raw q.k order
    for (int64_t i = 0; i < st.k; ++i) in_f[cand[i]] = 1;
  }
  const auto& e = g.e[hh];
  const int64_t w0 = st.n_sink, n_w = n - st.n_sink - st.n_local;  // window [w0, w0 + n_w)
  const int64_t m = hub_base_sample_size(cfg, n_w);
  const uint64_t key = sample_key(cfg.seed, cfg.layer, u.seq_key, u.key_head, u.a.step);

  std::vector<int32_t> draws(m);
  for (int64_t j = 0; j < m; ++j) draws[j] = int32_t(w0 + uniform_draw(key, uint64_t(j), n_w));
  double mean = 0, var = 0;
  for (int32_t t : draws) mean += e[t] / double(m);
  for (int32_t t : draws) var += (e[t] - mean) * (e[t] - mean) / double(m - 1);
  const double sd = std::max(std::sqrt(var), 1e-8);
  double d_b = 0;
  for (int64_t i = 0; i < n; ++i) d_b += in_f[i] ? e[i] : 0.0;
  std::vector<char> seen(n, 0);
  double distinct_sum = 0;
  for (int32_t t : draws)
    if (!seen[t]) seen[t] = 1, distinct_sum += e[t];
  d_b += double(n_w) / double(m) * distinct_sum;
  const double z = -normal_quantile(cfg.delta);
  const int64_t b = hub_budget(z, sd, d_b, cfg.eps, n_w, m);

  std::vector<double> w(n, 0.0);
  for (int64_t i = 0; i < n; ++i)
    if (in_f[i]) w[i] = 1.0;
  const double p = double(b) / double(n_w);
  std::vector<int32_t> sample;
  for (int64_t j = 0; j < b; ++j) {
    const int32_t t = int32_t(w0 + uniform_draw(key, uint64_t(m + j), n_w));
    if (w[t] != 0) continue;  // in F (weight 1) or drawn before: duplicates collapse
    w[t] = 1.0 / (p + 1e-6);
    sample.push_back(t);
  }
  estimate(g, hh, w, r);
  for (int64_t i = 0; i < n; ++i)
    if (in_f[i]) r.f.push_back(int32_t(i));
  r.sample = sample;
  r.stats.n_f = int64_t(r.f.size());
  r.stats.n_s = n_w;
  r.stats.m = m;
  r.stats.b = b;
  r.stats.n_sampled = int64_t(sample.size());
  r.stats.density = double(r.f.size() + sample.size()) / double(n);
  r.stats.est_rel_error = d_b > 0 ? z * sd * double(n_w) / (std::sqrt(double(b)) * d_b) : 0;
  r.stats.bytes_kv = int64_t(n + int64_t(r.f.size() + sample.size())) * g.d * u.es;
}

}  // namespace

std::vector<head_result> run(const config& cfg, const run_args& a) {
  const int32_t n_head_q = a.n_head_q;
  cfg.validate();
  plan_params p;
  p.n_seq_max = std::max(1, a.kv.n_seq);
  p.n_head_q = n_head_q;
  p.n_head_kv = a.kv.n_head_kv;
  p.head_dim = a.kv.head_dim;
  p.kv_type = a.kv.type;
  p.n_tokens_max = 1;
  if (a.kv.seq_len)
    for (int32_t s = 0; s < a.kv.n_seq; ++s)
      p.n_tokens_max = std::max<int64_t>(p.n_tokens_max, a.kv.seq_len[s]);
  validate_plan_params(p);
  std::vector<int64_t> row0(p.n_seq_max);
  validate_run_args(p, a, row0.data(), /*needs_out=*/false);
  validate_index(cfg, p, a);

  const kv_cache kv = with_default_strides(a.kv);
  const int32_t d = p.head_dim, group = p.n_head_q / p.n_head_kv;
  const double scale = logit_scale(cfg, d);
  std::vector<head_result> out(size_t(kv.n_seq) * n_head_q);

  for (int32_t s = 0; s < kv.n_seq; ++s) {
    for (int32_t kvh = 0; kvh < p.n_head_kv; ++kvh) {
      group_data g;
      g.n = kv.seq_len[s];
      g.d = d;
      g.k.resize(g.n * d);
      g.v.resize(g.n * d);
      for (int64_t t = 0; t < g.n; ++t) {
        const int64_t off = row_offset(kv, row0[s], s, t, kvh);
        for (int32_t j = 0; j < d; ++j) {
          g.k[t * d + j] = load_as_f32(kv.k, kv.type, off + j);
          g.v[t * d + j] = load_as_f32(kv.v, kv.type, off + j);
          if (!std::isfinite(g.k[t * d + j]) || !std::isfinite(g.v[t * d + j]))
            throw error(std::string(std::isfinite(g.k[t * d + j]) ? "v" : "k") +
                        " contains NaN/Inf at seq " + std::to_string(s) + ", token " +
                        std::to_string(t) + ", kv head " + std::to_string(kvh));
        }
      }
      for (int hh = 0; hh < group; ++hh) {
        const int32_t h = kvh * group + hh;
        const float* q = a.q + (int64_t(s) * n_head_q + h) * d;
        std::vector<double> lg(g.n);
        for (int64_t t = 0; t < g.n; ++t) {
          double acc = 0;
          for (int32_t j = 0; j < d; ++j) acc += double(q[j]) * g.k[t * d + j];
          lg[t] = scale * acc;
        }
        const double c = *std::max_element(lg.begin(), lg.end());
        std::vector<double> e(g.n);
        for (int64_t t = 0; t < g.n; ++t) e[t] = std::exp(lg[t] - c);
        g.logits.push_back(std::move(lg));
        g.c.push_back(c);
        g.e.push_back(std::move(e));

        head_result& r = out[size_t(s) * n_head_q + h];
        r.c = c;
        r.logits = g.logits.back();
        r.stats.n = g.n;
        std::vector<double> ones(g.n, 1.0);
        estimate(g, hh, ones, r);  // exact attention first, kept as the dense answer
        r.out_dense = r.out;
        r.d_dense = r.d_est;
        r.n_dense = r.n_est;
      }
      const int64_t seq_key = a.seq_id ? a.seq_id[s] : s;
      const float* q_group = a.q + (int64_t(s) * n_head_q + int64_t(kvh) * group) * d;
      if (cfg.hub) {
        for (int hh = 0; hh < group; ++hh) {
          const int32_t h = kvh * group + hh;
          unit_ctx u{cfg, a, seq_key, h, int64_t(dtype_size(kv.type)), group, s, kvh, q_group};
          run_hub_head(u, g, hh, out[size_t(s) * n_head_q + h]);
        }
      } else if (cfg.gqa_shared) {
        unit_ctx u{cfg, a, seq_key, kvh, int64_t(dtype_size(kv.type)), group, s, kvh, q_group};
        std::vector<int> heads(group);
        std::vector<head_result*> res(group);
        for (int hh = 0; hh < group; ++hh) {
          heads[hh] = hh;
          res[hh] = &out[size_t(s) * n_head_q + kvh * group + hh];
        }
        run_unit(u, g, heads, res);
      } else {
        for (int hh = 0; hh < group; ++hh) {
          const int32_t h = kvh * group + hh;
          unit_ctx u{cfg, a, seq_key, h, int64_t(dtype_size(kv.type)), group, s, kvh, q_group};
          std::vector<head_result*> res{&out[size_t(s) * n_head_q + h]};
          run_unit(u, g, {hh}, res);
        }
      }
    }
  }
  return out;
}

rel_errors errors(const head_result& r) {
  rel_errors e;
  e.d = std::abs(r.d_est - r.d_dense) / r.d_dense;
  double dn = 0, nn = 0, dout = 0, on = 0;
  for (size_t j = 0; j < r.out.size(); ++j) {
    dn += (r.n_est[j] - r.n_dense[j]) * (r.n_est[j] - r.n_dense[j]);
    nn += r.n_dense[j] * r.n_dense[j];
    dout += (r.out[j] - r.out_dense[j]) * (r.out[j] - r.out_dense[j]);
    on += r.out_dense[j] * r.out_dense[j];
  }
  e.n = nn > 0 ? std::sqrt(dn / nn) : std::sqrt(dn);
  e.o = on > 0 ? std::sqrt(dout / on) : std::sqrt(dout);
  return e;
}

}  // namespace vattn::reference
