// demo.cpp: `vattn demo`: every method on every built-in generator family, with density, output
// error and coverage of the guarantee (errors measured by the double-precision reference, which
// the CPU path matches index for index).
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "cli_common.hpp"
#include "commands.hpp"
#include "vattn/eval.hpp"
#include "vattn/reference.hpp"
#include "vattn/synth.hpp"

namespace vattn::cli {

namespace {

struct demo_options {
  int64_t tokens = 4096;
  int seeds = 40;
  int32_t n_head_q = 8, n_head_kv = 2, head_dim = 64;
  double eps = 0.05, delta = 0.05;
  int threads = 0;
};

struct method_row {
  std::string name;
  config cfg;
};

std::vector<method_row> demo_methods(const demo_options& o) {
  auto with = [&](const char* m, const std::string& extra) {
    return parse_config(std::string("method=") + m + extra);
  };
  const std::string ed = ",eps=" + std::to_string(o.eps) + ",delta=" + std::to_string(o.delta);
  return {
      {"dense", with("dense", "")},
      {"sink+local", with("sink_local", "")},
      {"oracle top-k 5%", with("topk", "")},
      {"oracle top-p 0.9", with("topp", "")},
      {"random 5%", with("random", "")},
      {"vAttn denominator", with("vattention", ed + ",mode=denominator")},
      {"vAttn numerator", with("vattention", ed + ",mode=numerator")},
      {"vAttn combined", with("vattention", ed + ",mode=combined")},
      {"vAttn output", with("vattention", ed + ",mode=output")},
      {"hub-compatible", with("hub", ed)},
  };
}

int run_demo(const demo_options& o, bool json) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<method_row> methods = demo_methods(o);
  const auto& fams = synth::all_families();
  // tallies[family][method]
  std::vector<std::vector<eval::tally>> tallies(fams.size(),
                                                std::vector<eval::tally>(methods.size()));
  progress prog("demo", int64_t(fams.size()) * o.seeds);
  int64_t done = 0;
  const int threads = o.threads > 0 ? o.threads : hardware_threads();
  for (size_t fi = 0; fi < fams.size(); ++fi) {
    std::vector<std::vector<eval::tally>> per_seed(o.seeds,
                                                   std::vector<eval::tally>(methods.size()));
    std::string first_error;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int s = 0; s < o.seeds; ++s) {
      try {
        synth::shape sh{o.tokens, o.n_head_q, o.n_head_kv, o.head_dim};
        const synth::problem p = synth::generate(fams[fi], sh, 9000 + uint64_t(s));
        const int32_t len = int32_t(o.tokens);
        run_args a;
        a.n_head_q = o.n_head_q;
        a.q = p.q.data();
        a.kv.type = dtype::f32;
        a.kv.n_head_kv = o.n_head_kv;
        a.kv.head_dim = o.head_dim;
        a.kv.k = p.k.data();
        a.kv.v = p.v.data();
        a.kv.n_seq = 1;
        a.kv.seq_len = &len;
        a.kv.n_rows = o.tokens;
        a.step = uint64_t(s);
        for (size_t mi = 0; mi < methods.size(); ++mi) {
          config cfg = methods[mi].cfg;
          cfg.seed = uint64_t(s);
          const eval::target t = eval::guarantee_target(cfg);
          for (const auto& r : reference::run(cfg, a)) per_seed[s][mi].add(r, t, o.eps);
        }
      } catch (const std::exception& e) {
#pragma omp critical
        first_error = e.what();
      }
#pragma omp critical
      prog.tick(++done, synth::family_name(fams[fi]));
    }
    if (!first_error.empty()) throw error(first_error);
    for (int s = 0; s < o.seeds; ++s)
      for (size_t mi = 0; mi < methods.size(); ++mi) tallies[fi][mi].merge(per_seed[s][mi]);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  if (json) {
    nlohmann::json rows = nlohmann::json::array();
    for (size_t fi = 0; fi < fams.size(); ++fi)
      for (size_t mi = 0; mi < methods.size(); ++mi) {
        nlohmann::json r = tally_json(tallies[fi][mi]);
        r["family"] = synth::family_name(fams[fi]);
        r["method"] = methods[mi].name;
        r["config"] = methods[mi].cfg.to_string();
        r["target"] = eval::target_name(eval::guarantee_target(methods[mi].cfg));
        rows.push_back(r);
      }
    nlohmann::json out = {{"command", "demo"},
                          {"tokens", o.tokens},
                          {"seeds", o.seeds},
                          {"n_head_q", o.n_head_q},
                          {"n_head_kv", o.n_head_kv},
                          {"head_dim", o.head_dim},
                          {"eps", o.eps},
                          {"delta", o.delta},
                          {"seconds", secs},
                          {"rows", rows}};
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  std::printf(
      "vattn demo: %lld tokens, %d query heads / %d kv heads, head_dim %d, %d seeds x %d heads = "
      "%d cases per cell, eps = %.3g, delta = %.3g\n",
      (long long)o.tokens, o.n_head_q, o.n_head_kv, o.head_dim, o.seeds, o.n_head_q,
      o.seeds * o.n_head_q, o.eps, o.delta);
  std::printf(
      "err = ||O^ - O|| / ||O|| per (seed, head); cov = fraction of cases within eps for the "
      "guarantee's target (tgt: D, N or O) and for the output O, with 95%% Wilson intervals.\n\n");
  for (size_t fi = 0; fi < fams.size(); ++fi) {
    table tb({synth::family_name(fams[fi]), "density", "err mean", "err p95", "tgt", "cov tgt",
              "95% CI", "cov out", "95% CI"});
    for (size_t mi = 0; mi < methods.size(); ++mi) {
      const eval::tally& t = tallies[fi][mi];
      const bool has_tgt = methods[mi].cfg.sample == sampling::adaptive;
      const eval::summary eo = eval::summarize(t.err_output);
      tb.row({methods[mi].name, fmt(eval::summarize(t.density).mean, 3), fmt(eo.mean), fmt(eo.p95),
              has_tgt ? eval::target_name(eval::guarantee_target(methods[mi].cfg)) : "-",
              has_tgt ? fmt(double(t.target_ok) / double(t.cases), 3) : "-",
              has_tgt ? fmt_ci(eval::wilson(t.target_ok, t.cases)) : "",
              fmt(double(t.output_ok) / double(t.cases), 3),
              fmt_ci(eval::wilson(t.output_ok, t.cases))});
    }
    std::printf("%s\n", tb.str().c_str());
  }
  std::printf("finished in %.1f s\n", secs);
  return 0;
}

}  // namespace

void add_demo(CLI::App& app, bool& json) {
  auto o = std::make_shared<demo_options>();
  CLI::App* c = app.add_subcommand(
      "demo", "Every method on every built-in generator family: density, error, coverage");
  c->add_option("--tokens", o->tokens, "cached tokens per problem")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(16), int64_t(1) << 22));
  c->add_option("--seeds", o->seeds, "problems per family (each gives n_head_q cases)")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  c->add_option("--eps", o->eps, "relative error target")->capture_default_str();
  c->add_option("--delta", o->delta, "failure probability")->capture_default_str();
  c->add_option("--threads", o->threads, "worker threads (0: all)")->capture_default_str();
  c->callback([o, &json] {
    if (!(o->eps > 0 && o->eps < 1)) throw error("--eps must lie in (0, 1)");
    if (!(o->delta > 0 && o->delta < 1)) throw error("--delta must lie in (0, 1)");
    int rc = run_demo(*o, json);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace vattn::cli
