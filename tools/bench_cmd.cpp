// bench_cmd.cpp: `vattn bench`: decode-attention latency of each method and predictor on
// synthetic KV caches at model shapes, against dense attention in the same run and against the
// machine's stream-read bandwidth; a table, JSON or CSV.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "cli_common.hpp"
#include "commands.hpp"
#include "core/budget.hpp"
#include "core/dtype.hpp"
#include "vattn/synth.hpp"

namespace vattn::cli {

namespace {

using ojson = nlohmann::ordered_json;
using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t h = v.size() / 2;
  return v.size() % 2 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

struct bench_options {
  std::vector<int64_t> contexts{131072};
  std::vector<int64_t> batches{1};
  int32_t n_head_q = 32, n_head_kv = 8, head_dim = 128;
  std::string dtype_name = "bf16";
  double eps = 0.05, delta = 0.05;
  std::vector<std::string> methods{"dense", "topk", "vattention"};
  std::vector<std::string> predictors{"oracle", "pages", "signs"};
  std::vector<double> refines{0};  // re-ranking factors of pages/signs rows (0: none)
  std::vector<std::string> families{"heavy_hitters"};
  std::string extra;
  int reps = 5;
  int threads = 0;
  uint64_t seed = 1;
  std::string csv;
  std::string layout = "contiguous";
  std::string kv_order = "nhd";  // token-major rows (nhd) or each head's rows together (hnd)
  int32_t page_size = 16;
  int64_t stream_mib = 1024;
};

// One measured configuration of a group; the first of every group is dense.
struct row_spec {
  std::string method;
  config cfg;
};

size_t physical_memory() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? size_t(pages) * size_t(page) : size_t(0);
}

std::string gib(double bytes) {
  return fmt(bytes / double(1 << 30), 2) + " GiB";
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);) {
    if (line.rfind("model name", 0) == 0) {
      const size_t c = line.find(':');
      if (c != std::string::npos) return line.substr(line.find_first_not_of(" \t", c + 1));
    }
  }
  return "unknown";
}

// Read-sums a buffer far larger than the last-level cache with `threads` threads: the read
// bandwidth decode attention is bound by. GB/s, median of `passes` after one warm-up pass.
double stream_read_gbs(int threads, size_t bytes, int passes = 7) {
  const int64_t n = int64_t(bytes / sizeof(uint64_t));
  aligned_buffer buf(size_t(n) * sizeof(uint64_t));
  uint64_t* p = static_cast<uint64_t*>(buf.data());
  // First touch by the reading threads places the pages near them.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) p[i] = uint64_t(i);
  std::vector<double> secs;
  static volatile uint64_t keep = 0;
  for (int pass = 0; pass <= passes; ++pass) {
    const auto t0 = clock_type::now();
    uint64_t s = 0;
#pragma omp parallel for schedule(static) reduction(+ : s) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) s += p[i];
    if (pass > 0) secs.push_back(seconds_since(t0));
    keep = keep + s;
  }
  return double(n) * sizeof(uint64_t) / median(secs) / 1e9;
}

// ---------------------------------------------------------------------------------------------
// Data: one KV cache per (family, context, batch), in the requested dtype and layout.

struct dataset {
  std::vector<float> q;  // [batch, n_head_q, head_dim]
  aligned_buffer k, v;   // contiguous: [batch * n, n_head_kv, head_dim]; paged: the page pool
  std::vector<int32_t> seq_len;
  std::vector<int32_t> page_table;
  std::vector<int64_t> page_start;
  kv_cache kv;
  double generate_s = 0, convert_s = 0;
};

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void convert_row(const float* src, void* dst, int64_t count, dtype t) {
  if (t == dtype::f32) {
    std::memcpy(dst, src, size_t(count) * sizeof(float));
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(dst);
  if (t == dtype::f16) {
    for (int64_t i = 0; i < count; ++i) d[i] = detail::f32_to_f16(src[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) d[i] = detail::f32_to_bf16(src[i]);
  }
}

void make_dataset(dataset& ds, const bench_options& o, synth::family fam, int64_t n, int32_t batch,
                  dtype t, kv_layout layout, int threads) {
  const int64_t row = int64_t(o.n_head_kv) * o.head_dim;  // elements per token
  const size_t es = dtype_size(t);
  const int64_t page = o.page_size;
  const int64_t pages_per_seq = (n + page - 1) / page;
  const int64_t rows = layout == kv_layout::paged ? batch * pages_per_seq * page : batch * n;
  ds.k.reserve(size_t(rows * row) * es);
  ds.v.reserve(size_t(rows * row) * es);
  ds.q.resize(size_t(batch) * o.n_head_q * o.head_dim);
  ds.seq_len.assign(size_t(batch), int32_t(n));
  const bool hnd = o.kv_order == "hnd";
  if (layout == kv_layout::paged) {
    // Sequences' pages scattered over the pool, as an allocator that reuses pages leaves them.
    const int64_t total = batch * pages_per_seq;
    ds.page_table.resize(size_t(total));
    for (int64_t i = 0; i < total; ++i) ds.page_table[i] = int32_t(i);
    uint64_t st = o.seed ^ 0x70616765ull;
    for (int64_t i = total - 1; i > 0; --i)
      std::swap(ds.page_table[i], ds.page_table[splitmix(st) % uint64_t(i + 1)]);
    ds.page_start.resize(size_t(batch));
    for (int32_t b = 0; b < batch; ++b) ds.page_start[b] = b * pages_per_seq;
  }
  progress prog("generate " + std::string(synth::family_name(fam)) + " n=" + std::to_string(n),
                batch);
  for (int32_t b = 0; b < batch; ++b) {
    auto t0 = clock_type::now();
    const synth::problem p =
        synth::generate(fam, {n, o.n_head_q, o.n_head_kv, o.head_dim}, o.seed + uint64_t(b));
    ds.generate_s += seconds_since(t0);
    t0 = clock_type::now();
    std::copy(p.q.begin(), p.q.end(), ds.q.begin() + int64_t(b) * o.n_head_q * o.head_dim);
    char* kd = static_cast<char*>(ds.k.data());
    char* vd = static_cast<char*>(ds.v.data());
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = layout == kv_layout::paged
                            ? int64_t(ds.page_table[b * pages_per_seq + i / page]) * page + i % page
                            : b * n + i;
      if (!hnd) {
        convert_row(p.k.data() + i * row, kd + size_t(r * row) * es, row, t);
        convert_row(p.v.data() + i * row, vd + size_t(r * row) * es, row, t);
        continue;
      }
      for (int32_t h = 0; h < o.n_head_kv; ++h) {  // head h's rows: [page][head][token][dim]
        const int64_t d = o.head_dim;
        const int64_t at = layout == kv_layout::paged
                               ? (r / page) * row * page + h * page * d + (r % page) * d
                               : h * rows * d + r * d;
        convert_row(p.k.data() + i * row + h * d, kd + size_t(at) * es, d, t);
        convert_row(p.v.data() + i * row + h * d, vd + size_t(at) * es, d, t);
      }
    }
    ds.convert_s += seconds_since(t0);
    prog.tick(b + 1);
  }
  kv_cache& kv = ds.kv;
  kv.layout = layout;
  kv.type = t;
  kv.n_head_kv = o.n_head_kv;
  kv.head_dim = o.head_dim;
  kv.k = ds.k.data();
  kv.v = ds.v.data();
  kv.n_seq = batch;
  kv.seq_len = ds.seq_len.data();
  if (hnd) {
    kv.stride_token = o.head_dim;
    kv.stride_head = (layout == kv_layout::paged ? page : rows) * o.head_dim;
    if (layout == kv_layout::paged) kv.stride_page = page * row;
  }
  if (layout == kv_layout::paged) {
    kv.page_size = int32_t(page);
    kv.page_table = ds.page_table.data();
    kv.page_start = ds.page_start.data();
    kv.n_pages = batch * pages_per_seq;
  } else {
    kv.n_rows = rows;
  }
}

// ---------------------------------------------------------------------------------------------
// Measurement.

struct timing {
  std::vector<double> ms, dense_ms;  // dense_ms: the paired dense calls, when asked for
  double select_s = 0, attend_s = 0;
};

// A dense call timed before each of a row's calls: the two alternate, so the ratio of their
// medians holds when the machine's bandwidth drifts, and the dense call streams the whole cache
// between two of the row's calls (as other layers would): where the cache is larger than the
// last-level cache, the row finds none of its own reads left there. (The dense row itself is
// timed back to back; its dense_paired_ms is its own median.)
struct paired_dense {
  const plan* pl = nullptr;
  run_args a;  // the row's inputs, its own output
};

// One warm-up run (of the paired dense call too), then `reps` timed runs (steps 1..reps); out
// and stats hold the last run. after_run() is called after each timed run, outside the timed
// region. The paired dense call uses the same workspace (ws must fit both plans).
template <typename After>
timing time_runs(const plan& pl, run_args a, aligned_buffer& ws, int reps, After after_run,
                 const paired_dense& pd) {
  timing t;
  a.profile = nullptr;
  a.step = 0;
  if (pd.pl) pd.pl->run(pd.a, ws.data(), ws.size());
  pl.run(a, ws.data(), ws.size());
  for (int r = 1; r <= reps; ++r) {
    if (pd.pl) {
      const auto t0 = clock_type::now();
      pd.pl->run(pd.a, ws.data(), ws.size());
      t.dense_ms.push_back(seconds_since(t0) * 1e3);
    }
    run_profile prof;
    a.profile = &prof;
    a.step = uint64_t(r);
    const auto t0 = clock_type::now();
    pl.run(a, ws.data(), ws.size());
    t.ms.push_back(seconds_since(t0) * 1e3);
    t.select_s += prof.select_s;
    t.attend_s += prof.attend_s;
    after_run();
  }
  return t;
}

// Mean over (sequence, head) of |F_pred & F_oracle| / |F_oracle| (both ascending in indices),
// over all of F and over its top-k part (sinks and the local window left out).
struct recall_result {
  double all = 0, topk = 0;
};

recall_result recall(const config& cfg, const std::vector<int32_t>& pred_idx,
                     const std::vector<head_stats>& pred_st, const std::vector<int32_t>& orac_idx,
                     const std::vector<head_stats>& orac_st, int64_t n_max) {
  recall_result r;
  const size_t heads = pred_st.size();
  for (size_t x = 0; x < heads; ++x) {
    const int32_t* p = pred_idx.data() + x * size_t(n_max);
    const int32_t* q = orac_idx.data() + x * size_t(n_max);
    const int64_t np = pred_st[x].n_f, nq = orac_st[x].n_f, n = orac_st[x].n;
    const detail::stage_sizes st = detail::resolve_stages(cfg, n);
    auto in_topk = [&](int32_t t) { return !st.dense && t >= st.n_sink && t < n - st.n_local; };
    int64_t hit = 0, hit_k = 0, want_k = 0;
    for (int64_t i = 0, j = 0; j < nq; ++j) {
      while (i < np && p[i] < q[j]) ++i;
      const bool found = i < np && p[i] == q[j];
      const bool k = in_topk(q[j]);
      hit += found;
      want_k += k;
      hit_k += found && k;
    }
    r.all += nq > 0 ? double(hit) / double(nq) : 1.0;
    r.topk += want_k > 0 ? double(hit_k) / double(want_k) : 1.0;
  }
  r.all /= double(std::max<size_t>(1, heads));
  r.topk /= double(std::max<size_t>(1, heads));
  return r;
}

ojson num_or_null(double x, bool ok = true) {
  return ok && std::isfinite(x) ? ojson(x) : ojson(nullptr);
}

// The rows of one group, dense first; `rows` receives one JSON object per row.
void measure_group(const bench_options& o, const std::vector<row_spec>& specs, dataset& ds,
                   const std::string& fam, int64_t n, int32_t batch, dtype t, int threads,
                   double stream_gbs, ojson& rows) {
  const int32_t hq = o.n_head_q, d = o.head_dim;
  const size_t heads = size_t(batch) * hq;
  plan_params pp;
  pp.n_seq_max = batch;
  pp.n_head_q = hq;
  pp.n_head_kv = o.n_head_kv;
  pp.head_dim = d;
  pp.n_tokens_max = n;
  pp.kv_type = t;
  pp.n_threads = threads;

  std::vector<float> out(heads * size_t(d)), dense_out;
  std::vector<head_stats> stats(heads);
  run_args base;
  base.n_head_q = hq;
  base.q = ds.q.data();
  base.kv = ds.kv;
  base.out = out.data();
  base.stats = stats.data();
  aligned_buffer ws;

  // Token indices for recall: [batch, n_head_q, n] int32 twice; skipped when they would take
  // more than a quarter of the memory.
  const size_t idx_bytes = heads * size_t(n) * sizeof(int32_t);
  const bool recall_fits = 2 * idx_bytes <= physical_memory() / 4;
  std::vector<int32_t> pred_idx, orac_idx;
  std::vector<head_stats> orac_st;
  std::string orac_key;  // the oracle config orac_idx belongs to (a method's rows are adjacent)

  // The floor of dense attention: every K and V byte of the cache read once at stream speed.
  const double cache_bytes = 2.0 * double(batch) * double(n) * o.n_head_kv * d * dtype_size(t);
  const double dense_floor_ms = cache_bytes / (stream_gbs * 1e9) * 1e3;
  double dense_ms = 0;
  // The paired dense calls: the group's dense row's config, their own output, the rows'
  // workspace (the calls take turns).
  std::unique_ptr<plan> dense_plan;
  std::vector<float> paired_out(out.size());
  paired_dense pd;
  progress prog("measure " + fam + " n=" + std::to_string(n) + " batch=" + std::to_string(batch),
                int64_t(specs.size()));
  for (size_t si = 0; si < specs.size(); ++si) {
    const row_spec& sp = specs[si];
    const config& cfg = sp.cfg;
    const bool is_dense = cfg.dense;
    const bool has_pred = cfg.select != selector::none;
    std::unique_ptr<predictor_index> index;
    double index_ms = 0;
    if (cfg.pred != predictor::oracle) {
      index = std::make_unique<predictor_index>(cfg, pp);
      const auto t0 = clock_type::now();
      index->update(ds.kv);
      index_ms = seconds_since(t0) * 1e3;
    }
    const plan pl(cfg, pp);
    ws.reserve(std::max(pl.workspace_bytes(), dense_plan ? dense_plan->workspace_bytes() : 0));
    run_args a = base;
    a.index = index.get();
    // Each step draws its own sample, so the budget, the density and the error change from step
    // to step: the row reports their means over every timed step (err: over every step and head).
    double bytes = 0, n_f = 0, b = 0;
    std::vector<double> err, density_steps;  // density_steps: each call's (mean over its heads)
    err.reserve(heads * size_t(o.reps));
    auto after_run = [&] {
      double call_density = 0;
      for (const head_stats& s : stats) {
        call_density += s.density, bytes += double(s.bytes_kv), n_f += double(s.n_f);
        b += double(s.b);
      }
      density_steps.push_back(call_density / double(heads));
      for (size_t x = 0; x < heads; ++x) {
        if (is_dense) {  // the baseline itself
          err.push_back(0.0);
          continue;
        }
        double num = 0, den = 0;
        for (int32_t j = 0; j < d; ++j) {
          const double y = dense_out[x * d + j], e = double(out[x * d + j]) - y;
          num += e * e, den += y * y;
        }
        err.push_back(den > 0 ? std::sqrt(num / den) : std::sqrt(num));
      }
    };
    const timing tm = time_runs(pl, a, ws, o.reps, after_run, is_dense ? paired_dense{} : pd);
    const double med = median(tm.ms);
    const double dense_paired_ms = is_dense ? med : median(tm.dense_ms);  // dense runs first
    const double mn = *std::min_element(tm.ms.begin(), tm.ms.end());
    const double runs = double(heads) * double(o.reps);
    const double density =
        std::accumulate(density_steps.begin(), density_steps.end(), 0.0) / double(o.reps);
    n_f /= runs, b /= runs;
    bytes /= double(o.reps);  // per call
    if (is_dense) {
      dense_out = out;
      dense_ms = med;
      dense_plan = std::make_unique<plan>(cfg, pp);
      pd.pl = dense_plan.get();
      pd.a = base;
      pd.a.out = paired_out.data();
      pd.a.stats = nullptr;
    }
    const eval::summary es = eval::summarize(err);

    // Recall against the same method with exact scores (untimed runs at the last timed step).
    ojson rec = nullptr, rec_k = nullptr;
    if (has_pred && cfg.pred == predictor::oracle) {
      rec = 1.0, rec_k = 1.0;
    } else if (has_pred && recall_fits) {
      config oc = cfg;
      oc.pred = predictor::oracle;
      oc.refine = 0;
      std::vector<float> scratch(out.size());
      // An untimed run at the last timed step that records the tokens each head read.
      auto run_for_indices = [&](const plan& p, run_args r, std::vector<int32_t>& idx,
                                 std::vector<head_stats>& st) {
        ws.reserve(p.workspace_bytes());
        idx.resize(heads * size_t(n));
        st.resize(heads);
        r.out = scratch.data();
        r.stats = st.data();
        r.indices = idx.data();
        r.step = uint64_t(o.reps);
        p.run(r, ws.data(), ws.size());
      };
      if (orac_key != oc.to_string()) {
        const plan opl(oc, pp);
        run_for_indices(opl, base, orac_idx, orac_st);
        orac_key = oc.to_string();
      }
      std::vector<head_stats> pst;
      run_for_indices(pl, a, pred_idx, pst);
      const recall_result rr = recall(cfg, pred_idx, pst, orac_idx, orac_st, n);
      rec = rr.all, rec_k = rr.topk;
    }

    const double tot = tm.select_s + tm.attend_s;
    const double floor_ms = bytes / (stream_gbs * 1e9) * 1e3;
    ojson row;
    row["family"] = fam;
    row["context"] = n;
    row["batch"] = batch;
    row["method"] = sp.method;
    row["predictor"] = !has_pred         ? std::string("-")
                       : cfg.refine == 0 ? std::string(predictor_name(cfg.pred))
                                         : predictor_name(cfg.pred) + std::string("+r") + ([&] {
                                             char b[32];
                                             std::snprintf(b, sizeof b, "%g", cfg.refine);
                                             return std::string(b);
                                           }());
    row["refine"] = cfg.refine;
    row["config"] = cfg.to_string();
    row["reps"] = o.reps;
    row["median_ms"] = med;
    row["min_ms"] = mn;
    row["density"] = density;
    row["density_min"] = *std::min_element(density_steps.begin(), density_steps.end());
    row["density_max"] = *std::max_element(density_steps.begin(), density_steps.end());
    row["density_steps"] = density_steps;
    row["n_f_mean"] = n_f;
    row["b_mean"] = b;
    row["bytes_read"] = bytes;
    row["mb_read"] = bytes / 1e6;
    row["gbs"] = bytes / (med * 1e-3) / 1e9;
    row["speedup_vs_dense"] = dense_paired_ms / med;
    row["dense_paired_ms"] = dense_paired_ms;
    row["speedup_vs_dense_row"] = dense_ms / med;
    row["err_mean"] = es.mean;
    row["err_p95"] = es.p95;
    row["err_max"] = es.max;
    row["recall"] = rec;
    row["recall_topk"] = rec_k;
    row["select_frac"] = tot > 0 ? ojson(tm.select_s / tot) : ojson(nullptr);
    row["index_ms"] = index ? ojson(index_ms) : ojson(nullptr);
    row["index_bytes"] = index ? ojson(index->memory_bytes()) : ojson(nullptr);
    row["stream_gbs"] = stream_gbs;
    row["floor_ms"] = floor_ms;
    row["dense_floor_ms"] = dense_floor_ms;
    row["dense_frac_of_stream"] = num_or_null(dense_floor_ms / med, is_dense);
    rows.push_back(row);
    prog.tick(int64_t(si + 1), sp.method);
  }
}

// ---------------------------------------------------------------------------------------------
// Arguments.

std::vector<predictor> parse_predictors(const std::vector<std::string>& names) {
  std::vector<predictor> out;
  for (const std::string& s : names) {
    predictor p;
    if (s == "oracle")
      p = predictor::oracle;
    else if (s == "pages")
      p = predictor::page_bounds;
    else if (s == "signs")
      p = predictor::sign_bits;
    else
      throw error("--predictors: unknown predictor '" + s + "' (use oracle, pages or signs)");
    if (std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
  }
  if (out.empty()) throw error("--predictors: give at least one of oracle, pages, signs");
  return out;
}

// Dense first, then each method; a method that ranks tokens for top-k gets one row per
// predictor, other methods (and hub, which supports only exact scores) one row.
std::vector<row_spec> build_specs(const bench_options& o, const std::vector<predictor>& preds) {
  auto preset = [&](const std::string& m) {
    config c;
    try {
      c = method_config(m);
    } catch (const error& e) {
      throw error(std::string("--methods: ") + e.what());
    }
    c.eps = o.eps, c.delta = o.delta, c.seed = o.seed;
    return c;
  };
  auto with_extra = [&](const std::string& m, config c) {
    try {
      c = parse_config(o.extra, c);
      if (c.dense) {  // only keys dense attention uses (scale, ...) survive
        const config d = method_config("dense");
        c.sink = d.sink, c.local = d.local, c.select = d.select, c.topk = d.topk;
        c.top_p = d.top_p, c.sample = d.sample, c.hub = d.hub, c.gqa_shared = d.gqa_shared;
        c.pred = d.pred;
      }
      // re-ranking applies to the approximate predictors' top-k rows only
      if (c.select != selector::topk || c.pred == predictor::oracle) c.refine = 0;
      c.validate();
    } catch (const error& e) {
      throw error("--config on method " + m + ": " + e.what());
    }
    return c;
  };
  std::vector<row_spec> specs;
  specs.push_back({"dense", with_extra("dense", preset("dense"))});
  std::vector<std::string> seen{"dense"};
  for (const std::string& m : o.methods) {
    if (std::find(seen.begin(), seen.end(), m) != seen.end()) continue;
    seen.push_back(m);
    const config c = preset(m);
    if (c.select == selector::topk && !c.hub) {
      for (predictor p : preds) {
        for (double r : o.refines) {
          if (p == predictor::oracle && r != 0) continue;  // exact scores need no re-ranking
          config cp = c;
          cp.pred = p;
          cp.refine = r;
          specs.push_back({m, with_extra(m, cp)});
        }
      }
    } else {
      specs.push_back({m, with_extra(m, c)});
    }
  }
  return specs;
}

void validate(const bench_options& o) {
  if (o.contexts.empty()) throw error("--context: give at least one length");
  for (double r : o.refines)
    if (!(r == 0 || (r >= 1 && r <= 64)))
      throw error("--refine: each factor must be 0 (none) or in [1, 64], got " + std::to_string(r));
  for (int64_t n : o.contexts)
    if (n < 1 || n > (int64_t(1) << 31) - 1)
      throw error("--context must be in [1, 2^31 - 1] tokens, got " + std::to_string(n));
  if (o.batches.empty()) throw error("--batch: give at least one batch size");
  for (int64_t b : o.batches)
    if (b < 1 || b > 65536) throw error("--batch must be in [1, 65536], got " + std::to_string(b));
  if (o.n_head_kv < 1) throw error("--n-head-kv must be >= 1, got " + std::to_string(o.n_head_kv));
  if (o.n_head_q < 1 || o.n_head_q % o.n_head_kv != 0)
    throw error("--n-head-q (" + std::to_string(o.n_head_q) +
                ") must be a positive multiple of --n-head-kv (" + std::to_string(o.n_head_kv) +
                ")");
  if (o.head_dim < 1 || o.head_dim > 4096)
    throw error("--head-dim must be in [1, 4096], got " + std::to_string(o.head_dim));
  if (!(o.eps > 0 && o.eps < 1)) throw error("--eps must lie in (0, 1)");
  if (!(o.delta > 0 && o.delta < 1)) throw error("--delta must lie in (0, 1)");
  if (o.reps < 1) throw error("--reps must be >= 1, got " + std::to_string(o.reps));
  if (o.threads < 0)
    throw error("--threads must be >= 0 (0: all), got " + std::to_string(o.threads));
  if (o.layout != "contiguous" && o.layout != "paged")
    throw error("--layout must be contiguous or paged, got '" + o.layout + "'");
  if (o.kv_order != "nhd" && o.kv_order != "hnd")
    throw error("--kv-order must be nhd or hnd, got '" + o.kv_order + "'");
  if (o.page_size < 1 || o.page_size > (1 << 20))
    throw error("--page-size must be in [1, 2^20] tokens, got " + std::to_string(o.page_size));
  if (o.stream_mib < 1) throw error("--stream-mib must be >= 1");
  if (o.methods.empty()) throw error("--methods: give at least one method");
}

// Memory the largest group needs (K and V in their dtype plus one f32 problem).
void check_memory(const bench_options& o, dtype t) {
  const double row = double(o.n_head_kv) * o.head_dim;
  double need = 0;
  for (int64_t n : o.contexts)
    for (int64_t b : o.batches) {
      const double pad = o.layout == "paged" ? double(o.page_size) : 0;
      need = std::max(need, 2 * double(b) * (double(n) + pad) * row * double(dtype_size(t)) +
                                2 * double(n) * row * sizeof(float));
    }
  const double have = double(physical_memory());
  if (have > 0 && need > 0.9 * have)
    throw error("--context x --batch: the largest cache needs " + gib(need) +
                " (K and V, plus one sequence in f32 while generating) but the machine has " +
                gib(have));
}

std::string csv_cell(const ojson& v) {
  if (v.is_null()) return "";
  if (v.is_string() || v.is_structured()) {  // lists (density_steps) as their JSON text, quoted
    std::string s = v.is_string() ? v.get<std::string>() : v.dump();
    if (s.find_first_of(",\"\n") == std::string::npos) return s;
    std::string q = "\"";
    for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
    return q + "\"";
  }
  return v.dump();
}

void write_csv(const std::string& path, const ojson& rows) {
  std::ofstream f(path);
  if (!f) throw error("--csv: cannot write '" + path + "'");
  if (rows.empty()) return;
  bool first = true;
  for (const auto& [k, v] : rows[0].items()) f << (first ? "" : ",") << k, first = false;
  f << "\n";
  for (const ojson& r : rows) {
    first = true;
    for (const auto& [k, v] : r.items()) f << (first ? "" : ",") << csv_cell(v), first = false;
    f << "\n";
  }
  if (!f) throw error("--csv: write to '" + path + "' failed");
}

std::string cell(const ojson& v, int precision) {
  return v.is_number() ? fmt(v.get<double>(), precision) : "-";
}

void run_bench(const bench_options& o, bool json) {
  validate(o);
  const dtype t = [&] {
    try {
      return dtype_from_string(o.dtype_name);
    } catch (const error& e) {
      throw error(std::string("--dtype: ") + e.what());
    }
  }();
  std::vector<synth::family> fams;
  for (const std::string& f : o.families) {
    try {
      fams.push_back(synth::family_from_string(f));
    } catch (const error& e) {
      throw error(std::string("--family: ") + e.what());
    }
  }
  if (fams.empty()) throw error("--family: give at least one family");
  const std::vector<row_spec> specs = build_specs(o, parse_predictors(o.predictors));
  check_memory(o, t);
  const kv_layout layout = o.layout == "paged" ? kv_layout::paged : kv_layout::contiguous;
  const int threads = o.threads > 0 ? o.threads : hardware_threads();

  const double stream_gbs = stream_read_gbs(threads, size_t(o.stream_mib) << 20);
  ojson rows = ojson::array(), datasets = ojson::array();
  for (synth::family fam : fams)
    for (int64_t n : o.contexts)
      for (int64_t b : o.batches) {
        dataset ds;
        make_dataset(ds, o, fam, n, int32_t(b), t, layout, threads);
        datasets.push_back({{"family", synth::family_name(fam)},
                            {"context", n},
                            {"batch", b},
                            {"generate_s", ds.generate_s},
                            {"convert_s", ds.convert_s},
                            {"kv_bytes", ds.k.size() + ds.v.size()}});
        // The group's floors use a stream read taken just before its rows: on a shared host
        // the bandwidth drifts within a run, and the start-of-run reading can be far off.
        const double group_gbs = stream_read_gbs(threads, size_t(o.stream_mib) << 20);
        measure_group(o, specs, ds, synth::family_name(fam), n, int32_t(b), t, threads, group_gbs,
                      rows);
      }
  if (!o.csv.empty()) write_csv(o.csv, rows);

  if (json) {
    ojson out;
    out["command"] = "bench";
    out["version"] = version();
    out["machine"] = {{"cpu", cpu_model()},
                      {"threads", threads},
                      {"simd", simd_level_name()},
                      {"stream_gbs", stream_gbs},
                      {"stream_mib", o.stream_mib}};
    out["args"] = {{"context", o.contexts},
                   {"batch", o.batches},
                   {"n_head_q", o.n_head_q},
                   {"n_head_kv", o.n_head_kv},
                   {"head_dim", o.head_dim},
                   {"dtype", dtype_name(t)},
                   {"eps", o.eps},
                   {"delta", o.delta},
                   {"methods", o.methods},
                   {"predictors", o.predictors},
                   {"refine", o.refines},
                   {"config", o.extra},
                   {"family", o.families},
                   {"reps", o.reps},
                   {"seed", o.seed},
                   {"layout", o.layout},
                   {"kv_order", o.kv_order},
                   {"page_size", o.page_size},
                   {"timing", "median and min of reps after one warm-up run"},
                   {"select_frac", "total select_s / (select_s + attend_s) over the timed runs"}};
    out["datasets"] = datasets;
    out["rows"] = rows;
    std::cout << out.dump(2) << "\n";
    return;
  }
  std::printf("vattn bench: %s, %d threads, %s kernels; stream read %.1f GB/s (%lld MiB)\n",
              cpu_model().c_str(), threads, simd_level_name(), stream_gbs, (long long)o.stream_mib);
  std::printf(
      "%d query heads / %d kv heads, head_dim %d, %s, %s; eps %g, delta %g; median of %d runs "
      "after a warm-up\n",
      o.n_head_q, o.n_head_kv, o.head_dim, dtype_name(t), o.layout.c_str(), o.eps, o.delta, o.reps);
  for (const auto& d : datasets)
    std::printf("data %s n=%lld batch=%lld: generated in %.2f s, converted in %.2f s (K+V %s)\n",
                d["family"].get<std::string>().c_str(), (long long)d["context"].get<int64_t>(),
                (long long)d["batch"].get<int64_t>(), d["generate_s"].get<double>(),
                d["convert_s"].get<double>(), gib(d["kv_bytes"].get<double>()).c_str());
  std::printf("\n");
  table tb({"family", "context", "batch", "method", "pred", "ms", "density", "MB read", "GB/s",
            "speedup", "err mean", "err p95", "recall", "rec top-k", "select%"});
  for (size_t i = 0; i < rows.size(); ++i) {
    const ojson& r = rows[i];
    if (i > 0 && r["method"] == "dense") tb.separator();
    const ojson sel =
        r["select_frac"].is_number() ? ojson(r["select_frac"].get<double>() * 100) : ojson(nullptr);
    tb.row({r["family"].get<std::string>(), std::to_string(r["context"].get<int64_t>()),
            std::to_string(r["batch"].get<int64_t>()), r["method"].get<std::string>(),
            r["predictor"].get<std::string>(), cell(r["median_ms"], 3), cell(r["density"], 4),
            cell(r["mb_read"], 1), cell(r["gbs"], 1), cell(r["speedup_vs_dense"], 2),
            cell(r["err_mean"], 4), cell(r["err_p95"], 4), cell(r["recall"], 3),
            cell(r["recall_topk"], 3), cell(sel, 1)});
  }
  std::printf("%s\n", tb.str().c_str());
  std::printf(
      "ms: median wall time of one call; density, MB: means over the timed calls (each step "
      "draws its own sample); GB/s: MB / ms;\nspeedup: median of dense calls timed alternately "
      "with the row's / ms; err: ||O - O_dense|| / "
      "||O_dense|| per (sequence, head, timed call); recall: |F & F_oracle| / |F_oracle| at the "
      "last step\n(rec top-k: without sinks and local window); select%%: selection's share of "
      "thread time over the timed runs\n");
}

}  // namespace

void add_bench(CLI::App& app, bool& json) {
  auto o = std::make_shared<bench_options>();
  CLI::App* c = app.add_subcommand(
      "bench", "Time methods and predictors on synthetic caches against dense and the read floor");
  c->add_option("--context", o->contexts, "cached tokens per sequence (comma list)")
      ->delimiter(',')
      ->capture_default_str();
  c->add_option("--batch", o->batches, "sequences per call (comma list)")
      ->delimiter(',')
      ->capture_default_str();
  c->add_option("--n-head-q", o->n_head_q, "query heads")->capture_default_str();
  c->add_option("--n-head-kv", o->n_head_kv, "kv heads")->capture_default_str();
  c->add_option("--head-dim", o->head_dim, "head dimension")->capture_default_str();
  c->add_option("--dtype", o->dtype_name, "K/V dtype: f32, f16 or bf16")->capture_default_str();
  c->add_option("--eps", o->eps, "relative error target of vattention")->capture_default_str();
  c->add_option("--delta", o->delta, "failure probability of vattention")->capture_default_str();
  c->add_option("--methods", o->methods,
                "method presets (comma list); dense always runs first, as the baseline")
      ->delimiter(',')
      ->capture_default_str();
  c->add_option("--predictors", o->predictors,
                "top-k rankers for top-k methods (comma list of oracle, pages, signs)")
      ->delimiter(',')
      ->capture_default_str();
  c->add_option("--refine", o->refines,
                "re-ranking factors for pages/signs rows (comma list; 0: none; r >= 1: a shortlist "
                "of r * k tokens ranked by exact logits, see docs/algorithm.md)")
      ->delimiter(',')
      ->capture_default_str();
  c->add_option(
      "--config", o->extra,
      "key=value pairs applied after each method preset, e.g. \"gqa_shared=1,pred_page=16\" "
      "(dense keeps only the keys it uses; refine applies to pages/signs top-k rows only)");
  c->add_option("--family", o->families, "synthetic families (comma list)")
      ->delimiter(',')
      ->capture_default_str();
  c->add_option("--reps", o->reps, "timed runs per row (after one warm-up)")->capture_default_str();
  c->add_option("--threads", o->threads, "worker threads (0: all)")->capture_default_str();
  c->add_option("--seed", o->seed, "generator seed (sequence b uses seed + b) and sampling seed")
      ->capture_default_str();
  c->add_option("--csv", o->csv, "also write the rows to this CSV file");
  c->add_option("--layout", o->layout, "KV layout: contiguous or paged")->capture_default_str();
  c->add_option("--kv-order", o->kv_order,
                "nhd: each token's kv heads together; hnd: each kv head's tokens together "
                "(per page when paged)")
      ->capture_default_str();
  c->add_option("--page-size", o->page_size, "KV page size in tokens (paged layout)")
      ->capture_default_str();
  c->add_option("--stream-mib", o->stream_mib,
                "buffer of the stream-read measurement, MiB (taken at the start and before each "
                "(family, context, batch) group; each row's floors use its group's)")
      ->capture_default_str();
  c->callback([o, &json] { run_bench(*o, json); });
}

}  // namespace vattn::cli
