// check.cpp: `vattn check --input FILE.safetensors`: a method on user-supplied q, K, V, with
// per-head density, budget, error against dense attention and coverage over seeded trials.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "cli_common.hpp"
#include "commands.hpp"
#include "vattn/eval.hpp"
#include "vattn/reference.hpp"
#include "vattn/safetensors.hpp"

namespace vattn::cli {

namespace {

struct check_options {
  std::string input;
  config_options cfg;
  int trials = 20;
  int threads = 0;
};

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

const io::tensor_view& need(const io::safetensors& st, const char* name, const char* expect) {
  const io::tensor_view* t = st.find(name);
  if (!t)
    throw error(std::string("input: tensor '") + name + "' is missing (expected " + expect + ")");
  return *t;
}

int run_check(const check_options& o, bool json) {
  const config base = o.cfg.build();
  const io::safetensors st = io::safetensors::load(o.input);
  const io::tensor_view& tk = need(st, "k", "[n_tokens, n_head_kv, head_dim]");
  const io::tensor_view& tv = need(st, "v", "[n_tokens, n_head_kv, head_dim]");
  const io::tensor_view& tq = need(st, "q", "[n_head_q, head_dim] or [n_q, n_head_q, head_dim]");
  if (tk.shape.size() != 3)
    throw error("input: k has shape " + shape_str(tk.shape) +
                ", expected [n_tokens, n_head_kv, head_dim]");
  if (tv.shape != tk.shape)
    throw error("input: v has shape " + shape_str(tv.shape) + " but k has " + shape_str(tk.shape) +
                " (they must match)");
  if (tk.dtype != tv.dtype)
    throw error("input: k is " + tk.dtype + " but v is " + tv.dtype +
                " (K and V must share one dtype)");
  const dtype kv_type = dtype_from_string(tk.dtype);
  const int64_t n_tokens = tk.shape[0];
  const int64_t n_head_kv = tk.shape[1], d = tk.shape[2];
  if (n_tokens < 1) throw error("input: k holds no tokens (an empty cache cannot be attended)");
  if (n_tokens > (int64_t(1) << 31) - 1) throw error("input: k holds more than 2^31 tokens");
  if (n_head_kv < 1 || d < 1 || d > 4096)
    throw error("input: k has shape " + shape_str(tk.shape) +
                ": need n_head_kv >= 1 and head_dim in [1, 4096]");
  int64_t n_q = 1, n_head_q = 0;
  if (tq.shape.size() == 2) {
    n_head_q = tq.shape[0];
  } else if (tq.shape.size() == 3) {
    n_q = tq.shape[0];
    n_head_q = tq.shape[1];
  } else {
    throw error("input: q has shape " + shape_str(tq.shape) +
                ", expected [n_head_q, head_dim] or [n_q, n_head_q, head_dim]");
  }
  if (tq.shape.back() != d)
    throw error("input: q has head_dim " + std::to_string(tq.shape.back()) + " but k has " +
                std::to_string(d));
  if (n_q < 1 || n_head_q < 1 || n_head_q % n_head_kv != 0)
    throw error("input: q has " + std::to_string(n_head_q) +
                " heads, which must be a positive multiple of k's " + std::to_string(n_head_kv));
  const std::vector<float> q = io::to_f32(tq);
  // File data need not be aligned: K and V are copied into aligned buffers in their own dtype.
  aligned_buffer kb(tk.nbytes), vb(tv.nbytes);
  std::memcpy(kb.data(), tk.data, tk.nbytes);
  std::memcpy(vb.data(), tv.data, tv.nbytes);

  const int32_t len = int32_t(n_tokens);
  run_args a;
  a.n_head_q = int32_t(n_head_q);
  a.kv.type = kv_type;
  a.kv.n_head_kv = int32_t(n_head_kv);
  a.kv.head_dim = int32_t(d);
  a.kv.k = kb.data();
  a.kv.v = vb.data();
  a.kv.n_seq = 1;
  a.kv.seq_len = &len;
  a.kv.n_rows = n_tokens;
  std::vector<float> out(size_t(n_head_q * d));
  std::vector<head_stats> stats(static_cast<size_t>(n_head_q));
  std::vector<int32_t> indices(static_cast<size_t>(n_head_q * n_tokens));
  a.out = out.data();
  a.stats = stats.data();
  a.indices = indices.data();

  plan_params pp;
  pp.n_head_q = int32_t(n_head_q);
  pp.n_head_kv = int32_t(n_head_kv);
  pp.head_dim = int32_t(d);
  pp.n_tokens_max = n_tokens;
  pp.kv_type = kv_type;
  pp.n_threads = o.threads;
  const eval::target tgt = eval::guarantee_target(base);
  std::vector<eval::tally> per_head(static_cast<size_t>(n_head_q));
  std::vector<double> est_err_sum(static_cast<size_t>(n_head_q), 0.0);
  double max_nmse = 0;
  int64_t index_mismatches = 0;  // (trial, row, head) runs whose indices differ from the reference
  progress prog("check", int64_t(o.trials) * n_q);
  for (int t = 0; t < o.trials; ++t) {
    config cfg = base;
    cfg.seed = base.seed + uint64_t(t);
    const plan pl(cfg, pp);
    aligned_buffer ws(pl.workspace_bytes());
    for (int64_t i = 0; i < n_q; ++i) {
      a.q = q.data() + i * n_head_q * d;
      a.step = uint64_t(i);
      pl.run(a, ws.data(), pl.workspace_bytes());
      const auto ref = reference::run(cfg, a);
      for (int64_t h = 0; h < n_head_q; ++h) {
        per_head[h].add(ref[h], tgt, cfg.sample == sampling::adaptive ? cfg.eps : base.eps);
        est_err_sum[h] += std::max(0.0, stats[h].est_rel_error);
        double num = 0, den = 0;
        for (int64_t j = 0; j < d; ++j) {
          const double x = out[h * d + j], y = ref[h].out[j];
          num += (x - y) * (x - y);
          den += y * y;
        }
        max_nmse = std::max(max_nmse, den > 0 ? num / den : num);
        const int32_t* idx = indices.data() + h * n_tokens;
        const auto& r = ref[h];
        const bool same = stats[h].n_f == int64_t(r.f.size()) &&
                          stats[h].n_sampled == int64_t(r.sample.size()) &&
                          std::equal(r.f.begin(), r.f.end(), idx) &&
                          std::equal(r.sample.begin(), r.sample.end(), idx + r.f.size());
        index_mismatches += !same;
      }
      prog.tick(int64_t(t) * n_q + i + 1);
    }
  }
  eval::tally all;
  for (const auto& x : per_head) all.merge(x);
  const int64_t runs = int64_t(o.trials) * n_q;

  if (json) {
    nlohmann::json heads = nlohmann::json::array();
    for (int64_t h = 0; h < n_head_q; ++h) {
      nlohmann::json r = tally_json(per_head[h]);
      r["head"] = h;
      r["kv_head"] = h / (n_head_q / n_head_kv);
      r["est_rel_error_mean"] = est_err_sum[h] / double(runs);
      heads.push_back(r);
    }
    nlohmann::json out_json = {{"command", "check"},
                               {"input", o.input},
                               {"config", base.to_string()},
                               {"target", eval::target_name(tgt)},
                               {"n_tokens", n_tokens},
                               {"n_q", n_q},
                               {"n_head_q", n_head_q},
                               {"n_head_kv", n_head_kv},
                               {"head_dim", d},
                               {"dtype", dtype_name(kv_type)},
                               {"trials", o.trials},
                               {"cpu_vs_reference_max_nmse", max_nmse},
                               {"cpu_vs_reference_index_mismatches", index_mismatches},
                               {"heads", heads},
                               {"all", tally_json(all)}};
    std::cout << out_json.dump(2) << "\n";
    return 0;
  }
  std::printf(
      "vattn check: %s: %lld tokens, %lld query rows, %lld query heads / %lld kv heads, "
      "head_dim %lld, %s\n",
      o.input.c_str(), (long long)n_tokens, (long long)n_q, (long long)n_head_q,
      (long long)n_head_kv, (long long)d, dtype_name(kv_type));
  std::printf(
      "config: %s\n%d trials x %lld query rows per head; guarantee target %s; errors "
      "against dense attention in double precision\n\n",
      base.to_string().c_str(), o.trials, (long long)n_q, eval::target_name(tgt));
  table tb({"head", "kv", "density", "budget b", "est err", "err mean", "err p95", "cov tgt",
            "cov out", "95% CI (out)"});
  auto add_row = [&](const std::string& name, const std::string& kv, const eval::tally& t,
                     double est) {
    tb.row({name, kv, fmt(eval::summarize(t.density).mean, 4),
            fmt(eval::summarize(t.budget).mean, 1), fmt(est, 4),
            fmt(eval::summarize(t.err_output).mean), fmt(eval::summarize(t.err_output).p95),
            fmt(double(t.target_ok) / double(t.cases), 3),
            fmt(double(t.output_ok) / double(t.cases), 3),
            fmt_ci(eval::wilson(t.output_ok, t.cases))});
  };
  double est_all = 0;
  for (int64_t h = 0; h < n_head_q; ++h) {
    add_row(std::to_string(h), std::to_string(h / (n_head_q / n_head_kv)), per_head[h],
            est_err_sum[h] / double(runs));
    est_all += est_err_sum[h];
  }
  tb.separator();
  add_row("all", "", all, est_all / double(runs * n_head_q));
  std::printf(
      "%s\nCPU path vs reference: max output NMSE %.3g; token indices identical in %lld of %lld "
      "head runs (a difference can only come from a float-rounding tie at the top-k boundary)\n",
      tb.str().c_str(), max_nmse, (long long)(runs * n_head_q - index_mismatches),
      (long long)(runs * n_head_q));
  return 0;
}

}  // namespace

void add_check(CLI::App& app, bool& json) {
  auto o = std::make_shared<check_options>();
  CLI::App* c = app.add_subcommand(
      "check", "Run a method on q, k, v from a safetensors file and measure it against dense");
  c->add_option("--input", o->input,
                "safetensors file with q [n_head_q, d] or [n_q, n_head_q, d], k and v "
                "[n_tokens, n_head_kv, d] (f32, f16 or bf16)")
      ->required();
  o->cfg.add_to(*c);
  c->add_option("--trials", o->trials, "sampling seeds to run")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000000));
  c->add_option("--threads", o->threads, "worker threads (0: all)")->capture_default_str();
  c->callback([o, &json] { run_check(*o, json); });
}

}  // namespace vattn::cli
