// cli_common.hpp: shared pieces of the `vattn` command line: config options, progress, tables.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "vattn/eval.hpp"
#include "vattn/vattn.hpp"

namespace vattn::cli {

// Method and algorithm options shared by commands; turned into a config via parse_config so
// every validation message comes from one place.
struct config_options {
  std::string method = "vattention";
  std::string eps, delta, sink, local, topk, top_p, base_rate, mode, sample_rate, seed, extra;
  bool gqa_shared = false;
  void add_to(CLI::App& app);
  config build() const;
};

// A one-line progress indicator on stderr, shown only when stderr is a terminal.
class progress {
 public:
  progress(std::string label, int64_t total);
  void tick(int64_t done, const std::string& note = "");
  ~progress();

 private:
  std::string label_;
  int64_t total_;
  bool enabled_;
};

// Fixed-width text table.
class table {
 public:
  explicit table(std::vector<std::string> header) : header_(std::move(header)) {}
  void row(std::vector<std::string> cells) { rows_.push_back(std::move(cells)); }
  void separator() { rows_.push_back({}); }
  std::string str() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

std::string fmt(double x, int precision = 4);
std::string fmt_ci(const eval::interval& ci);
nlohmann::json to_json(const head_stats& s);
nlohmann::json tally_json(const eval::tally& t);

}  // namespace vattn::cli
