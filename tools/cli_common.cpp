// cli_common.cpp: config options, progress, tables and JSON helpers of the command line.
#include "cli_common.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <sstream>

namespace vattn::cli {

void config_options::add_to(CLI::App& app) {
  app.add_option("--method", method,
                 "dense, sink_local, topk, topp, random, vattention or hub (presets: sink 128, "
                 "local 128, top-k 5%, base 5%, eps = delta = 0.05)")
      ->capture_default_str();
  app.add_option("--eps", eps, "relative error target in (0, 1)");
  app.add_option("--delta", delta, "failure probability in (0, 1)");
  app.add_option("--sink", sink, "sink tokens: a count (128) or a fraction of n (0.01, 1%)");
  app.add_option("--local", local, "local window: a count or a fraction of n");
  app.add_option("--topk", topk, "top-k size: a count or a fraction of n");
  app.add_option("--top-p", top_p, "top-p mass in (0, 1]");
  app.add_option("--base-rate", base_rate, "base sample: a fraction of the residual or a count");
  app.add_option("--mode", mode, "budget mode: denominator, numerator, combined or output");
  app.add_option("--sample-rate", sample_rate, "fixed sampling rate in (0, 1]");
  app.add_option("--seed", seed, "sampling seed");
  app.add_flag("--gqa-shared", gqa_shared, "heads of a kv group share F and the sample");
  app.add_option("--config", extra, "further key=value pairs, e.g. \"layer=3,scale=0.1\"");
}

config config_options::build() const {
  std::string s = "method=" + method;
  auto put = [&](const char* k, const std::string& v) {
    if (!v.empty()) s += std::string(",") + k + "=" + v;
  };
  put("eps", eps);
  put("delta", delta);
  put("sink", sink);
  put("local", local);
  put("topk", topk);
  put("top_p", top_p);
  put("base", base_rate);
  put("mode", mode);
  put("sample_rate", sample_rate);
  put("seed", seed);
  if (gqa_shared) s += ",gqa_shared=1";
  if (!extra.empty()) s += "," + extra;
  config c = parse_config(s);
  c.validate();
  return c;
}

progress::progress(std::string label, int64_t total)
    : label_(std::move(label)), total_(total), enabled_(isatty(2) != 0) {}

void progress::tick(int64_t done, const std::string& note) {
  if (!enabled_) return;
  const int width = 30;
  const int filled = total_ > 0 ? int(width * done / total_) : width;
  std::fprintf(stderr, "\r%s [%s%s] %lld/%lld %s\033[K", label_.c_str(),
               std::string(size_t(filled), '#').c_str(),
               std::string(size_t(width - filled), '.').c_str(), (long long)done, (long long)total_,
               note.c_str());
  std::fflush(stderr);
}

progress::~progress() {
  if (enabled_) std::fprintf(stderr, "\r\033[K");
}

std::string table::str() const {
  std::vector<size_t> w(header_.size(), 0);
  for (size_t i = 0; i < header_.size(); ++i) w[i] = header_[i].size();
  for (const auto& r : rows_)
    for (size_t i = 0; i < r.size() && i < w.size(); ++i) w[i] = std::max(w[i], r[i].size());
  std::ostringstream os;
  auto line = [&](const std::vector<std::string>& r) {
    for (size_t i = 0; i < w.size(); ++i) {
      const std::string c = i < r.size() ? r[i] : "";
      if (i == 0)
        os << c << std::string(w[i] - c.size(), ' ');
      else
        os << "  " << std::string(w[i] - c.size(), ' ') << c;
    }
    os << "\n";
  };
  size_t total = 0;
  for (size_t x : w) total += x + 2;
  line(header_);
  os << std::string(total - 2, '-') << "\n";
  for (const auto& r : rows_) {
    if (r.empty())
      os << "\n";
    else
      line(r);
  }
  return os.str();
}

std::string fmt(double x, int precision) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", precision, x);
  return buf;
}

std::string fmt_ci(const eval::interval& ci) {
  return "[" + fmt(ci.lo, 3) + "," + fmt(ci.hi, 3) + "]";
}

nlohmann::json to_json(const head_stats& s) {
  return {{"n", s.n},
          {"n_f", s.n_f},
          {"n_s", s.n_s},
          {"m", s.m},
          {"b", s.b},
          {"density", s.density},
          {"est_rel_error", std::isfinite(s.est_rel_error) ? nlohmann::json(s.est_rel_error)
                                                           : nlohmann::json(nullptr)},
          {"bytes_kv", s.bytes_kv},
          {"dense_fallback", s.dense_fallback}};
}

nlohmann::json tally_json(const eval::tally& t) {
  const eval::summary eo = eval::summarize(t.err_output), et = eval::summarize(t.err_target),
                      de = eval::summarize(t.density), bu = eval::summarize(t.budget);
  const eval::interval ct = eval::wilson(t.target_ok, t.cases),
                       co = eval::wilson(t.output_ok, t.cases);
  return {{"cases", t.cases},
          {"density_mean", de.mean},
          {"density_p95", de.p95},
          {"budget_mean", bu.mean},
          {"err_output_mean", eo.mean},
          {"err_output_p95", eo.p95},
          {"err_output_max", eo.max},
          {"err_target_mean", et.mean},
          {"err_target_p95", et.p95},
          {"coverage_target", double(t.target_ok) / double(std::max<int64_t>(1, t.cases))},
          {"coverage_target_ci95", {ct.lo, ct.hi}},
          {"coverage_output", double(t.output_ok) / double(std::max<int64_t>(1, t.cases))},
          {"coverage_output_ci95", {co.lo, co.hi}},
          {"bytes_kv_mean", t.bytes_kv / double(std::max<int64_t>(1, t.cases))}};
}

}  // namespace vattn::cli
