// test_cli.cpp: the `vattn` command line end to end: info, demo, check, synth, bench, and their
// error messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/dtype.hpp"
#include "vattn/safetensors.hpp"
#include "vattn/synth.hpp"

namespace {

struct result {
  int code;
  std::string out;
};

result run(const std::string& args) {
  const std::string cmd = std::string(VATTN_CLI) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("vattn_test_" + std::to_string(getpid()) + "_" + name))
      .string();
}

// q [n_q, n_head_q, d], k and v [n, n_head_kv, d] in bf16 from a synthetic problem.
std::string write_input(int n_q) {
  vattn::synth::problem p =
      vattn::synth::generate(vattn::synth::family::power_law, {700, 4, 2, 32}, 5);
  std::vector<uint16_t> k(p.k.size()), v(p.v.size());
  for (size_t i = 0; i < k.size(); ++i) k[i] = vattn::detail::f32_to_bf16(p.k[i]);
  for (size_t i = 0; i < v.size(); ++i) v[i] = vattn::detail::f32_to_bf16(p.v[i]);
  std::vector<float> q;
  for (int i = 0; i < n_q; ++i) q.insert(q.end(), p.q.begin(), p.q.end());
  const std::string path = temp_path("in" + std::to_string(n_q) + ".safetensors");
  vattn::io::save(path, {{"q", "F32", {n_q, 4, 32}, q.data(), q.size() * 4},
                         {"k", "BF16", {700, 2, 32}, k.data(), k.size() * 2},
                         {"v", "BF16", {700, 2, 32}, v.data(), v.size() * 2}});
  return path;
}

}  // namespace

TEST(Cli, Info) {
  result r = run("info");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("vattn "), std::string::npos);
  r = run("info --json");
  ASSERT_EQ(r.code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_TRUE(j.contains("version"));
  EXPECT_TRUE(j.contains("cpu_features"));
}

TEST(Cli, DemoSmallJson) {
  result r = run("demo --tokens 600 --seeds 2 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["rows"].size(), 6u * 10u);  // families x methods
  for (const auto& row : j["rows"]) {
    EXPECT_EQ(row["cases"].get<int>(), 16);
    EXPECT_GT(row["density_mean"].get<double>(), 0.0);
    EXPECT_LE(row["density_mean"].get<double>(), 1.0);
    if (row["method"] == "dense") {
      EXPECT_LT(row["err_output_max"].get<double>(), 1e-12);
    }
  }
}

TEST(Cli, DemoTable) {
  result r = run("demo --tokens 400 --seeds 1");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("vAttn output"), std::string::npos);
  EXPECT_NE(r.out.find("heavy_hitters"), std::string::npos);
}

TEST(Cli, CheckJsonAndTable) {
  const std::string in = write_input(3);
  result r = run("check --input " + in +
                 " --method vattention --sink 16 --local 16 --topk 0.05 --eps 0.1 --delta 0.1 "
                 "--mode output --trials 3 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["n_q"].get<int>(), 3);
  EXPECT_EQ(j["heads"].size(), 4u);
  EXPECT_EQ(j["all"]["cases"].get<int>(), 3 * 3 * 4);
  EXPECT_EQ(j["target"], "O");
  EXPECT_LT(j["cpu_vs_reference_max_nmse"].get<double>(), 1e-9);
  EXPECT_EQ(j["cpu_vs_reference_index_mismatches"].get<int>(), 0);
  r = run("check --input " + in + " --method topk --sink 8 --local 8 --topk 32 --trials 1");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("all"), std::string::npos);
  std::filesystem::remove(in);
}

// Real caches: q/K/V of the first decode step of our trained model (models/kjv-ruler-18m) on a
// needle and a variable-tracking prompt of 1024 bytes (`vattn eval --dump`). The guarantee is
// checked on them: coverage of ||O^ - O|| <= eps ||O|| at least 1 - delta, within a binomial
// margin, and the CPU path equals the reference on the same sampled indices.
TEST(Cli, CheckRealCachesFromOurModel) {
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(VATTN_TEST_DATA)) {
    if (e.path().extension() != ".safetensors") continue;
    ++files;
    result r = run("check --input " + e.path().string() +
                   " --method vattention --sink 16 --local 16 --topk 0.05 --base-rate 0.05 "
                   "--eps 0.1 --delta 0.1 --mode output --trials 10 --json");
    ASSERT_EQ(r.code, 0) << r.out;
    auto j = nlohmann::json::parse(r.out);
    const double cases = j["all"]["cases"].get<double>(), delta = 0.1;
    EXPECT_EQ(cases, 10 * 8) << e.path();  // 10 trials x 8 query heads
    EXPECT_GE(j["all"]["coverage_output"].get<double>(),
              1 - delta - 3 * std::sqrt(delta * (1 - delta) / cases))
        << e.path();
    EXPECT_LT(j["all"]["density_mean"].get<double>(), 0.9) << e.path();  // it did sample
    EXPECT_LT(j["cpu_vs_reference_max_nmse"].get<double>(), 1e-9);
    EXPECT_EQ(j["cpu_vs_reference_index_mismatches"].get<int>(), 0);
  }
  EXPECT_GE(files, 2);
}

TEST(Cli, SynthThenCheck) {
  const std::string path = temp_path("synth.safetensors");
  result r = run("synth --out " + path + " --family needle --tokens 900 --n-q 2 --dtype f16");
  ASSERT_EQ(r.code, 0) << r.out;
  vattn::io::safetensors st = vattn::io::safetensors::load(path);
  ASSERT_NE(st.find("k"), nullptr);
  EXPECT_EQ(st.find("k")->dtype, "F16");
  EXPECT_EQ(st.find("q")->shape, (std::vector<int64_t>{2, 8, 64}));
  r = run("check --input " + path + " --sink 16 --local 16 --trials 2 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["all"]["cases"].get<int>(), 2 * 2 * 8);
  EXPECT_EQ(j["dtype"], "f16");
  r = run("synth --out " + path + " --family nope");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("heavy_hitters"), std::string::npos) << r.out;
  std::filesystem::remove(path);
}

TEST(Cli, CheckRejectsBadInput) {
  result r = run("check --input /nonexistent/x.safetensors");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.out.find("x.safetensors"), std::string::npos) << r.out;

  const std::string garbage = temp_path("garbage.safetensors");
  FILE* f = std::fopen(garbage.c_str(), "wb");
  std::fputs("\x10\x00\x00\x00\x00\x00\x00\x00{not json}......", f);
  std::fclose(f);
  r = run("check --input " + garbage);
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("safetensors"), std::string::npos) << r.out;
  std::filesystem::remove(garbage);

  const std::string in = write_input(1);
  r = run("check --input " + in + " --eps 1.5");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("eps"), std::string::npos) << r.out;
  r = run("check --input " + in + " --mode sideways");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("mode"), std::string::npos) << r.out;
  r = run("check --input " + in + " --method nope");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("method"), std::string::npos) << r.out;
  std::filesystem::remove(in);

  // k present with the wrong rank
  const std::string wrong = temp_path("wrong.safetensors");
  std::vector<float> x(64, 0.5f);
  vattn::io::save(wrong, {{"q", "F32", {2, 8}, x.data(), 64},
                          {"k", "F32", {16}, x.data(), 64},
                          {"v", "F32", {16}, x.data(), 64}});
  r = run("check --input " + wrong);
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("k has shape [16]"), std::string::npos) << r.out;
  std::filesystem::remove(wrong);
}

TEST(Cli, BenchSmallJson) {
  result r =
      run("bench --context 512,1024 --batch 1,2 --n-head-q 4 --n-head-kv 2 --head-dim 32 --reps 1 "
          "--predictors oracle --threads 1 --stream-mib 16 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_GT(j["machine"]["stream_gbs"].get<double>(), 0.0);
  EXPECT_TRUE(j["machine"].contains("simd"));
  ASSERT_EQ(j["rows"].size(), 2u * 2u * 3u);  // contexts x batches x (dense, topk, vattention)
  for (const auto& row : j["rows"]) {
    for (const char* k : {"median_ms", "min_ms", "density", "mb_read", "gbs", "speedup_vs_dense",
                          "err_mean", "err_p95", "floor_ms", "stream_gbs"}) {
      ASSERT_TRUE(row[k].is_number()) << k << " in " << row.dump();
      EXPECT_TRUE(std::isfinite(row[k].get<double>())) << k;
    }
    for (const auto& [k, v] : row.items()) {
      if (v.is_number()) {
        EXPECT_TRUE(std::isfinite(v.get<double>())) << k;
      }
    }
    EXPECT_GT(row["density"].get<double>(), 0.0);
    EXPECT_LE(row["density"].get<double>(), 1.0);
    if (row["method"] == "dense") {
      EXPECT_EQ(row["err_mean"].get<double>(), 0.0);
      EXPECT_EQ(row["err_p95"].get<double>(), 0.0);
      EXPECT_DOUBLE_EQ(row["speedup_vs_dense"].get<double>(), 1.0);
      EXPECT_TRUE(row["dense_frac_of_stream"].is_number());
    } else {
      EXPECT_EQ(row["predictor"], "oracle");
      EXPECT_EQ(row["recall"].get<double>(), 1.0);
      EXPECT_LT(row["density"].get<double>(), 1.0);
    }
  }
}

// Each timed call draws its own sample: the row's density is the mean over the calls, between
// the least and the largest call, and the vAttention budget moves from step to step (eps 0.01
// with a 1% base sample: the budget, not the base sample, sets the sample's size).
TEST(Cli, BenchDensityIsTheMeanOverSteps) {
  result r =
      run("bench --context 8192 --n-head-q 4 --n-head-kv 2 --head-dim 32 --reps 6 --methods "
          "vattention --predictors oracle --eps 0.01 --config base=0.01 --threads 1 "
          "--stream-mib 16 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["rows"].size(), 2u);  // dense, vattention
  const auto& dense = j["rows"][0];
  EXPECT_EQ(dense["density_min"].get<double>(), 1.0);
  EXPECT_EQ(dense["density_max"].get<double>(), 1.0);
  const auto& row = j["rows"][1];
  const double mean = row["density"].get<double>(), lo = row["density_min"].get<double>(),
               hi = row["density_max"].get<double>();
  EXPECT_GT(lo, 0.0);
  EXPECT_LE(lo, mean);
  EXPECT_LE(mean, hi);
  EXPECT_LT(lo, hi) << "six steps drew the same budget in every head";
  EXPECT_LT(hi, 1.0);
  const auto steps = row["density_steps"].get<std::vector<double>>();
  ASSERT_EQ(steps.size(), 6u);
  double sum = 0;
  for (double x : steps) sum += x;
  EXPECT_NEAR(mean, sum / 6.0, 1e-12);  // the mean of the calls, not the last call's
  EXPECT_NE(mean, steps.back());
  EXPECT_EQ(lo, *std::min_element(steps.begin(), steps.end()));
  EXPECT_EQ(hi, *std::max_element(steps.begin(), steps.end()));
}

TEST(Cli, BenchPredictorsJson) {
  result r =
      run("bench --context 2048 --n-head-q 4 --n-head-kv 2 --head-dim 32 --reps 1 --methods topk "
          "--predictors pages,signs --config pred_page=8 --threads 1 --stream-mib 16 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["rows"].size(), 3u);  // dense, topk/pages, topk/signs
  EXPECT_EQ(j["rows"][1]["predictor"], "pages");
  EXPECT_EQ(j["rows"][2]["predictor"], "signs");
  for (size_t i = 1; i < 3; ++i) {
    const auto& row = j["rows"][i];
    EXPECT_GE(row["recall"].get<double>(), 0.0);
    EXPECT_LE(row["recall"].get<double>(), 1.0);
    EXPECT_GT(row["index_bytes"].get<double>(), 0.0);
    EXPECT_GE(row["index_ms"].get<double>(), 0.0);
  }
  EXPECT_NE(j["rows"][1]["config"].get<std::string>().find("pred_page=8"), std::string::npos);
}

TEST(Cli, BenchTablePagedCsv) {
  const std::string csv = temp_path("bench.csv");
  result r = run(
      "bench --context 700 --batch 2 --n-head-q 4 --n-head-kv 2 --head-dim 32 --reps 1 "
      "--methods topk --predictors oracle --layout paged --page-size 16 --dtype f16 --threads 1 "
      "--stream-mib 16 --csv " +
      csv);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("speedup"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("paged"), std::string::npos) << r.out;
  FILE* f = std::fopen(csv.c_str(), "r");
  ASSERT_NE(f, nullptr);
  int lines = 0;
  for (int c; (c = std::fgetc(f)) != EOF;) lines += c == '\n';
  std::fclose(f);
  EXPECT_EQ(lines, 3);  // header, dense, topk
  std::filesystem::remove(csv);
}

TEST(Cli, BenchRejectsBadArguments) {
  const std::string tiny = " --n-head-kv 2 --head-dim 32 --reps 1 --stream-mib 16";
  result r = run("bench --context 0 --n-head-q 4" + tiny);
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("--context"), std::string::npos) << r.out;
  r = run("bench --context 512 --n-head-q 3" + tiny);
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("--n-head-q"), std::string::npos) << r.out;
  r = run("bench --context 512 --n-head-q 4 --predictors oracle,crystal_ball" + tiny);
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("crystal_ball"), std::string::npos) << r.out;
  r = run("bench --context 512 --n-head-q 4 --methods dense,nope" + tiny);
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("--methods"), std::string::npos) << r.out;
  r = run("bench --context 512 --n-head-q 4 --config frobnicate=1" + tiny);
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("--config"), std::string::npos) << r.out;
  r = run("bench --context 512 --n-head-q 4 --layout sideways" + tiny);
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("--layout"), std::string::npos) << r.out;
}
