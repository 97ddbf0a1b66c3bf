// test_attention.cpp: the CPU path against the double-precision reference on the same inputs
// and the same sampled indices, over methods, dtypes, layouts, awkward sizes and thread counts.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "core/budget.hpp"
#include "core/sampler.hpp"
#include "test_util.hpp"
#include "vattn/reference.hpp"
#include "vattn/vattn.hpp"

using namespace vattn;
using vattn::test::batch;
using vattn::test::make_batch;
using vattn::test::small_config;

namespace {

plan_params params_for(const batch& b, int32_t threads) {
  plan_params pp;
  pp.n_seq_max = int32_t(b.seq_len.size());
  pp.n_head_q = b.n_head_q;
  pp.n_head_kv = b.n_head_kv;
  pp.head_dim = b.d;
  pp.n_tokens_max = b.n_max();
  pp.kv_type = b.type;
  pp.n_threads = threads;
  return pp;
}

// The predictor index of an approximate predictor, brought up to the batch's lengths.
std::unique_ptr<predictor_index> index_for(const config& cfg, const batch& b, run_args& a) {
  if (cfg.pred == predictor::oracle) return nullptr;
  auto ix = std::make_unique<predictor_index>(cfg, params_for(b, 2));
  ix->update(a.kv);
  a.index = ix.get();
  return ix;
}

void run_cpu(const config& cfg, batch& b, run_args& a, int32_t threads) {
  plan p(cfg, params_for(b, threads));
  aligned_buffer ws(p.workspace_bytes());
  p.run(a, ws.data(), ws.size());
}

// Whether the F sets differ only by tokens whose reference logits are tied to within float
// rounding: the f32 fast path may then rank the k-th place the other way (legitimately).
bool near_tie(const reference::head_result& r, const int32_t* idx, int64_t n_f) {
  std::set<int32_t> ref(r.f.begin(), r.f.end()), cpu(idx, idx + n_f), diff;
  std::set_symmetric_difference(ref.begin(), ref.end(), cpu.begin(), cpu.end(),
                                std::inserter(diff, diff.begin()));
  if (diff.empty()) return false;
  double lo = 1e300, hi = -1e300;
  for (int32_t t : diff) lo = std::min(lo, r.logits[t]), hi = std::max(hi, r.logits[t]);
  return hi - lo <= 1e-5 * (1 + std::abs(hi));
}

// Compares every head: index sets exactly, counts exactly, outputs by NMSE, guards untouched.
// Heads whose F differs by a float-rounding tie at the top-k boundary are counted and skipped;
// they must stay rare.
void expect_matches_reference(const config& cfg, batch& b, const std::string& what,
                              int32_t threads = 2) {
  run_args a = b.args(3);
  const auto ix = index_for(cfg, b, a);
  run_cpu(cfg, b, a, threads);
  const std::vector<reference::head_result> ref = reference::run(cfg, a);
  ASSERT_TRUE(b.guards_intact()) << what;
  const int64_t n_max = b.n_max();
  size_t ties = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const reference::head_result& r = ref[i];
    const head_stats& st = b.stats[i];
    SCOPED_TRACE(what + " head " + std::to_string(i));
    const int32_t* idx = b.indices.data() + i * n_max;
    ASSERT_EQ(st.n_f, int64_t(r.f.size()));
    if (!std::equal(r.f.begin(), r.f.end(), idx) && near_tie(r, idx, st.n_f)) {
      ++ties;
      continue;
    }
    ASSERT_EQ(st.n_sampled, int64_t(r.sample.size()));
    if (!cfg.hub) {
      EXPECT_EQ(st.b, st.n_sampled);
    }
    EXPECT_EQ(st.n, r.stats.n);
    EXPECT_EQ(st.n_s, r.stats.n_s);
    EXPECT_EQ(st.m, r.stats.m);
    EXPECT_EQ(st.b, r.stats.b);
    EXPECT_EQ(st.dense_fallback, r.stats.dense_fallback);
    EXPECT_EQ(st.bytes_kv, r.stats.bytes_kv);
    EXPECT_NEAR(st.density, r.stats.density, 1e-12);
    if (r.stats.est_rel_error < 0 || std::isinf(r.stats.est_rel_error))
      EXPECT_EQ(st.est_rel_error, r.stats.est_rel_error);
    else
      EXPECT_NEAR(st.est_rel_error, r.stats.est_rel_error, 1e-6 * (1 + r.stats.est_rel_error));
    for (size_t j = 0; j < r.f.size(); ++j) ASSERT_EQ(idx[j], r.f[j]) << "F position " << j;
    for (size_t j = 0; j < r.sample.size(); ++j)
      ASSERT_EQ(idx[r.f.size() + j], r.sample[j]) << "sample position " << j;
    const size_t used = r.f.size() + r.sample.size();
    if (int64_t(used) < n_max) {
      EXPECT_EQ(idx[used], -7) << "indices written past n_f + n_sampled";
    }
    const float* o = b.out.data() + i * b.d;
    for (int32_t j = 0; j < b.d; ++j) ASSERT_TRUE(std::isfinite(o[j]));
    EXPECT_LT(test::nmse(o, r.out.data(), b.d), 1e-9);
  }
  EXPECT_LE(ties * 100, ref.size()) << what << ": " << ties << " near-tie heads";
}

const char* k_methods[] = {"dense", "sink_local", "topk", "topp", "random", "vattention", "hub"};

}  // namespace

TEST(CpuVsReference, EveryMethodAwkwardLengths) {
  // 1, 2, 3, around sink + local = 12, and odd sizes.
  const std::vector<int32_t> lens = {1, 2, 3, 11, 12, 13, 14, 17, 33, 129, 257, 700};
  for (const char* m : k_methods) {
    config cfg = small_config(m);
    batch b = make_batch(synth::family::heavy_hitters, lens, 4, 2, 16, dtype::f32,
                         kv_layout::contiguous, 11);
    expect_matches_reference(cfg, b, m);
  }
}

TEST(CpuVsReference, BudgetModesAndDtypes) {
  const std::vector<int32_t> lens = {300, 1025};
  for (budget_mode mode : {budget_mode::denominator, budget_mode::numerator, budget_mode::combined,
                           budget_mode::output}) {
    for (dtype t : {dtype::f32, dtype::f16, dtype::bf16}) {
      for (synth::family f : {synth::family::uniform, synth::family::correlated_values}) {
        config cfg = small_config("vattention");
        cfg.mode = mode;
        batch b = make_batch(f, lens, 4, 1, 64, t, kv_layout::contiguous, 5);
        expect_matches_reference(cfg, b,
                                 std::string(budget_mode_name(mode)) + "/" + dtype_name(t) + "/" +
                                     synth::family_name(f));
      }
    }
  }
}

TEST(CpuVsReference, OddHeadDims) {
  for (int32_t d : {1, 3, 7, 9, 17, 33, 80, 96, 128, 256}) {
    config cfg = small_config("vattention");
    batch b = make_batch(synth::family::power_law, {200, 65}, 2, 2, d, dtype::bf16,
                         kv_layout::contiguous, 9);
    expect_matches_reference(cfg, b, "d=" + std::to_string(d));
    // Dense with 4 query heads per kv head (the two-row kernel when d % 8 == 0), several chunks.
    batch bd = make_batch(synth::family::power_law, {600, 3}, 8, 2, d, dtype::bf16,
                          kv_layout::contiguous, 10);
    expect_matches_reference(small_config("dense"), bd, "dense d=" + std::to_string(d));
  }
}

TEST(CpuVsReference, PagedLayoutAndGqaShared) {
  for (const char* m : k_methods) {
    for (bool shared : {false, true}) {
      config cfg = small_config(m);
      if (shared && (cfg.hub || cfg.dense)) continue;
      cfg.gqa_shared = shared;
      batch b = make_batch(synth::family::clustered, {40, 513, 77}, 8, 2, 32, dtype::f16,
                           kv_layout::paged, 21, 16);
      expect_matches_reference(cfg, b, std::string(m) + (shared ? " shared" : ""));
    }
  }
}

TEST(CpuVsReference, PageSizesAndSeqIds) {
  for (int32_t page : {1, 3, 16, 64}) {
    config cfg = small_config("vattention");
    batch b =
        make_batch(synth::family::needle, {100, 1}, 2, 1, 8, dtype::f32, kv_layout::paged, 4, page);
    expect_matches_reference(cfg, b, "page " + std::to_string(page));
  }
}

// Approximate predictors: the same F (pages taken whole, signature ties by position), the same
// sample and the same output as the reference fed by the same index.
TEST(CpuVsReference, Predictors) {
  const std::vector<std::string> preds = {
      "predictor=pages,pred_page=1", "predictor=pages,pred_page=5", "predictor=pages,pred_page=16",
      "predictor=signs,bits=32",     "predictor=signs,bits=64",     "predictor=signs,bits=128"};
  int32_t seed = 30;
  for (const std::string& pred : preds) {
    for (const char* m : {"topk", "vattention"}) {
      for (bool shared : {false, true}) {
        for (kv_layout layout : {kv_layout::contiguous, kv_layout::paged}) {
          config cfg = parse_config(pred, small_config(m));
          cfg.gqa_shared = shared;
          const dtype t = seed % 3 == 0 ? dtype::f32 : seed % 3 == 1 ? dtype::f16 : dtype::bf16;
          batch b = make_batch(synth::family::heavy_hitters, {1, 13, 40, 513, 1025}, 4, 2, 24, t,
                               layout, uint64_t(++seed), 16);
          expect_matches_reference(cfg, b,
                                   pred + " " + m + (shared ? " shared " : " ") + dtype_name(t));
        }
      }
    }
  }
}

// refine: a shortlist by the unit's score, re-ranked by exact logits per head. The same F,
// sample, stats (the shortlist's K rows in bytes_kv) and output as the reference.
TEST(CpuVsReference, RefinedPredictors) {
  const std::vector<std::string> preds = {"predictor=pages,pred_page=1",
                                          "predictor=pages,pred_page=5", "predictor=signs,bits=32",
                                          "predictor=signs,bits=128"};
  int32_t seed = 90;
  for (const std::string& pred : preds) {
    for (const char* refine : {"refine=1", "refine=2.5", "refine=64"}) {
      for (const char* m : {"topk", "vattention"}) {
        for (bool shared : {false, true}) {
          config cfg = parse_config(pred + "," + refine, small_config(m));
          cfg.gqa_shared = shared;
          const dtype t = seed % 3 == 0 ? dtype::f32 : seed % 3 == 1 ? dtype::f16 : dtype::bf16;
          const kv_layout layout = seed % 2 ? kv_layout::paged : kv_layout::contiguous;
          batch b = make_batch(synth::family::heavy_hitters, {1, 13, 40, 513, 1025}, 4, 2, 24, t,
                               layout, uint64_t(++seed), 16);
          expect_matches_reference(cfg, b,
                                   pred + " " + refine + " " + m + (shared ? " shared" : ""));
        }
      }
    }
  }
}

// refine = 1 with gqa_shared selects k tokens per kv group (not the union of the heads' k);
// refine > 1 brings the predictor's choice closer to the oracle's top-k.
TEST(Predictors, RefineSelectsPerGroupAndRaisesRecall) {
  const int32_t n = 4096, d = 64, H = 2, G = 4;
  batch b = make_batch(synth::family::heavy_hitters, {n}, H * G, H, d, dtype::bf16,
                       kv_layout::contiguous, 77);
  auto chosen = [&](const std::string& text, int32_t head) {
    config cfg = parse_config(text, method_config("topk"));
    run_args a = b.args();
    const auto ix = index_for(cfg, b, a);
    run_cpu(cfg, b, a, 2);
    const head_stats& st = b.stats[head];
    const int32_t* idx = b.indices.data() + int64_t(head) * b.n_max();
    return std::make_pair(st, std::set<int32_t>(idx, idx + st.n_f));
  };
  const int64_t k = n / 20, fixed = 256;  // topk 5%, sink 128 + local 128
  for (const char* pred : {"predictor=signs,bits=128", "predictor=pages"}) {
    SCOPED_TRACE(pred);
    const std::string p = pred;
    const auto [union_st, union_f] = chosen(p + ",gqa_shared=1", 0);
    const auto [group_st, group_f] = chosen(p + ",gqa_shared=1,refine=1", 0);
    EXPECT_GE(union_st.n_f, group_st.n_f);
    if (p.find("signs") != std::string::npos) {
      EXPECT_GT(union_st.n_f, fixed + k + k / 2) << "the union of 4 heads' top-k";
      EXPECT_EQ(group_st.n_f, fixed + k);
    } else {
      EXPECT_LT(group_st.n_f, fixed + k + 16);  // whole pages of 16
    }
    double rec_plain = 0, rec_refined = 0;
    for (int32_t h = 0; h < H * G; ++h) {
      const auto oracle = chosen("predictor=oracle", h).second;
      const auto plain = chosen(p, h).second;
      const auto refined = chosen(p + ",refine=4", h).second;
      for (int32_t t : oracle) rec_plain += plain.count(t), rec_refined += refined.count(t);
      EXPECT_EQ(int64_t(refined.size()), fixed + k);
    }
    // recall of the oracle's top-k (sinks and local are in every F)
    rec_plain = (rec_plain - double(H * G * fixed)) / double(H * G * k);
    rec_refined = (rec_refined - double(H * G * fixed)) / double(H * G * k);
    std::printf("%s: recall of the oracle top-k, plain %.3f, refine=4 %.3f\n", pred, rec_plain,
                rec_refined);
    EXPECT_GT(rec_refined, rec_plain + 0.05);
  }
}

TEST(Predictors, RefineRejectsBadValues) {
  auto msg = [](const std::string& text) {
    try {
      parse_config(text, method_config("vattention")).validate();
    } catch (const error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(msg("predictor=signs,refine=0.5").find("refine must be 0 (off) or in [1, 64]"),
            std::string::npos);
  EXPECT_NE(msg("predictor=signs,refine=65").find("refine must be"), std::string::npos);
  EXPECT_NE(msg("predictor=oracle,refine=2").find("predictor=pages or signs"), std::string::npos);
  EXPECT_NE(msg("predictor=signs,refine=nan").find("refine"), std::string::npos);
  EXPECT_EQ(msg("predictor=signs,refine=2"), "no error");
  const config c = parse_config("predictor=signs,refine=2", method_config("vattention"));
  EXPECT_EQ(parse_config(c.to_string()).refine, 2.0);
}

// A predictor reads its index, not K: bytes fall well below the oracle's.
TEST(Predictors, ReadFewerBytesThanOracle) {
  batch b = make_batch(synth::family::heavy_hitters, {4000}, 4, 1, 64, dtype::bf16,
                       kv_layout::contiguous, 5);
  int64_t bytes[3] = {};
  int i = 0;
  for (const char* pred : {"predictor=oracle", "predictor=pages", "predictor=signs"}) {
    config cfg = parse_config(pred, small_config("topk"));
    run_args a = b.args();
    const auto ix = index_for(cfg, b, a);
    run_cpu(cfg, b, a, 2);
    bytes[i++] = b.stats[0].bytes_kv;
  }
  EXPECT_LT(bytes[1], bytes[0] / 2);
  EXPECT_LT(bytes[2], bytes[0] / 2);
}

TEST(Predictors, RunRejectsMissingOrStaleIndex) {
  config cfg = parse_config("predictor=signs", small_config("vattention"));
  batch b = make_batch(synth::family::uniform, {300, 200}, 2, 1, 16, dtype::f32,
                       kv_layout::contiguous, 2);
  run_args a = b.args();
  auto msg = [&](const run_args& args) {
    try {
      run_cpu(cfg, b, const_cast<run_args&>(args), 1);
    } catch (const error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(msg(a).find("run_args.index is null"), std::string::npos);
  const auto ix = index_for(cfg, b, a);
  b.seq_len[1] = 150;  // the cache moved on without an update
  EXPECT_NE(msg(a).find("slot 1 holds 200 tokens"), std::string::npos);
  config pages = parse_config("predictor=pages", small_config("vattention"));
  predictor_index other(pages, params_for(b, 1));
  a.index = &other;
  EXPECT_NE(msg(a).find("built for predictor=pages"), std::string::npos);
}

// Errors name the first bad position in (sequence, item) order whatever the thread count: two
// bad keys in different dense chunks give the same message with 1 and 8 threads.
TEST(BadInput, SameErrorForEveryThreadCount) {
  batch b =
      make_batch(synth::family::uniform, {3000}, 4, 1, 8, dtype::f32, kv_layout::contiguous, 2);
  reinterpret_cast<float*>(b.k.data())[300 * 8 + 1] = INFINITY;
  reinterpret_cast<float*>(b.k.data())[2900 * 8 + 1] = INFINITY;
  for (const char* m : {"dense", "vattention"}) {
    std::string first;
    for (int32_t t : {1, 8, 2}) {
      run_args a = b.args();
      try {
        run_cpu(small_config(m), b, a, t);
        ADD_FAILURE() << m << ": no error";
      } catch (const error& e) {
        if (first.empty()) first = e.what();
        EXPECT_EQ(first, e.what()) << m << " threads " << t;
      }
    }
    EXPECT_NE(first.find("token 300"), std::string::npos) << m << ": " << first;
  }
}

// A page bound can overflow to inf - inf (NaN): the page is taken, not mis-sorted, and the
// overflow is reported by the logit check.
TEST(Predictors, OverflowingPageBoundIsReported) {
  batch b =
      make_batch(synth::family::uniform, {600}, 2, 1, 8, dtype::f32, kv_layout::contiguous, 3);
  float* k = reinterpret_cast<float*>(b.k.data());
  k[300 * 8 + 0] = 1e20f;
  k[300 * 8 + 1] = -1e20f;
  k[301 * 8 + 0] = -1e20f;
  k[301 * 8 + 1] = -1e20f;
  for (int32_t h = 0; h < 2; ++h) b.q[h * 8] = 1e20f, b.q[h * 8 + 1] = 1e20f;
  config cfg = parse_config("predictor=pages,pred_page=4", small_config("topk"));
  run_args a = b.args();
  const auto ix = index_for(cfg, b, a);
  try {
    run_cpu(cfg, b, a, 2);
    ADD_FAILURE() << "no error";
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("overflows"), std::string::npos) << e.what();
  }
}

// Paged and contiguous storage of the same tokens give bit-identical results.
TEST(Layouts, PagedEqualsContiguous) {
  config cfg = small_config("vattention");
  batch c = make_batch(synth::family::power_law, {900, 333}, 4, 2, 64, dtype::bf16,
                       kv_layout::contiguous, 8);
  batch p = make_batch(synth::family::power_law, {900, 333}, 4, 2, 64, dtype::bf16,
                       kv_layout::paged, 8, 32);
  run_args ac = c.args(1), ap = p.args(1);
  run_cpu(cfg, c, ac, 2);
  run_cpu(cfg, p, ap, 2);
  EXPECT_EQ(c.indices, p.indices);
  for (size_t i = 0; i < c.seq_len.size() * 4 * 64; ++i) ASSERT_EQ(c.out[i], p.out[i]);
}

// The outputs and indices of cfg over batches from make() with 1, 2 and 8 threads are identical.
template <class Make>
void expect_same_for_thread_counts(const config& cfg, Make make, const char* what) {
  std::vector<std::vector<float>> outs;
  std::vector<std::vector<int32_t>> idx;
  for (int32_t t : {1, 2, 8}) {
    batch b = make();
    run_args a = b.args(7);
    const auto ix = index_for(cfg, b, a);
    run_cpu(cfg, b, a, t);
    outs.push_back(b.out);
    idx.push_back(b.indices);
  }
  EXPECT_EQ(outs[0], outs[1]) << what;
  EXPECT_EQ(outs[0], outs[2]) << what;
  EXPECT_EQ(idx[0], idx[1]) << what;
  EXPECT_EQ(idx[0], idx[2]) << what;
}

// Long enough that the sample walk runs in tasks (draws of k_walk_grain = 1024 tokens and more,
// base and extension): the same tokens as the reference's one-at-a-time walk, for every thread
// count.
TEST(CpuVsReference, LongDrawsWalkInTasks) {
  for (const char* m : {"vattention", "signs"}) {
    const std::string name = m;
    config cfg = name == "signs" ? parse_config("predictor=signs", small_config("vattention"))
                                 : small_config(m);
    cfg.gqa_shared = true;
    cfg.eps = 0.002;  // budgets well past the base draws
    auto make = [] {
      return make_batch(synth::family::clustered, {30000, 12000}, 4, 2, 16, dtype::f32,
                        kv_layout::contiguous, 13);
    };
    batch b = make();
    expect_matches_reference(cfg, b, m);
    for (const head_stats& st : b.stats) {  // both draws long enough for tasks
      EXPECT_GE(st.m, 1024) << m << " m " << st.m << " b " << st.b;
      EXPECT_GE(st.b - st.m, 1024) << m << " m " << st.m << " b " << st.b;
    }
    expect_same_for_thread_counts(cfg, make, m);
  }
}

// Results do not depend on the number of threads.
TEST(Threads, IdenticalFor1_2_8) {
  for (const char* m : {"vattention", "random", "hub", "dense", "signs", "refine"}) {
    const std::string name = m;
    config cfg = name == "signs" ? parse_config("predictor=signs", small_config("vattention"))
                 : name == "refine"
                     ? parse_config("predictor=pages,refine=3", small_config("vattention"))
                     : small_config(m);
    cfg.gqa_shared = name == "random" || name == "refine";
    expect_same_for_thread_counts(
        cfg,
        [] {
          return make_batch(synth::family::uniform, {1000, 500, 64, 2000}, 8, 4, 32, dtype::f32,
                            kv_layout::contiguous, 3);
        },
        m);
  }
}

// The same with bf16 rows, four query heads per kv head and head_dim 128: the sparse kernels'
// paired-row and blocked paths (the shapes of Llama-3.1-8B).
TEST(Threads, IdenticalFor1_2_8Bf16Groups4) {
  for (const char* m : {"vattention", "signs", "topk"}) {
    const std::string name = m;
    config cfg = name == "signs" ? parse_config("predictor=signs", small_config("vattention"))
                                 : small_config(m);
    cfg.gqa_shared = true;  // units of G = 4 heads: the paired-row paths
    expect_same_for_thread_counts(
        cfg,
        [] {
          return make_batch(synth::family::uniform, {1500, 77, 3000}, 8, 2, 128, dtype::bf16,
                            kv_layout::contiguous, 5);
        },
        m);
  }
}

// With eps so small that b = n_s the residual is exact and the output equals dense attention.
TEST(Exactness, FullBudgetEqualsDense) {
  for (budget_mode mode : {budget_mode::denominator, budget_mode::output}) {
    config cfg = small_config("vattention");
    cfg.mode = mode;
    cfg.eps = 1e-9;
    batch b =
        make_batch(synth::family::uniform, {500}, 2, 1, 32, dtype::f32, kv_layout::contiguous, 2);
    run_args a = b.args();
    run_cpu(cfg, b, a, 1);
    const auto ref = reference::run(cfg, a);
    for (size_t h = 0; h < ref.size(); ++h) {
      EXPECT_EQ(b.stats[h].b, b.stats[h].n_s);
      EXPECT_EQ(b.stats[h].est_rel_error, 0.0);
      EXPECT_LT(test::nmse(b.out.data() + h * 32, ref[h].out_dense.data(), 32), 1e-12);
    }
  }
}

// D^ and N^ are unbiased for a fixed b: their means over many seeds approach D and N. On the
// light-tailed uniform family the check also has power: it must reject a 1% bias.
void check_unbiased(synth::family fam, bool check_power) {
  config cfg = small_config("random");
  cfg.sample_rate = 0.02;
  batch b = make_batch(fam, {2000}, 1, 1, 16, dtype::f32, kv_layout::contiguous, 1);
  const int trials = 3000;
  double sum_d = 0, sum_d2 = 0, d_true = 0;
  std::vector<double> sum_n(16, 0.0), sum_n2(16, 0.0), n_true;
  for (int s = 0; s < trials; ++s) {
    cfg.seed = uint64_t(s);
    run_args a = b.args();
    const auto r = reference::run(cfg, a)[0];
    d_true = r.d_dense;
    n_true = r.n_dense;
    sum_d += r.d_est;
    sum_d2 += r.d_est * r.d_est;
    for (int j = 0; j < 16; ++j) sum_n[j] += r.n_est[j], sum_n2[j] += r.n_est[j] * r.n_est[j];
  }
  const double mean = sum_d / trials, se = std::sqrt((sum_d2 / trials - mean * mean) / trials);
  EXPECT_GT(se, 0.0);
  EXPECT_LT(std::abs(mean - d_true), 4.5 * se) << "D mean " << mean << " true " << d_true;
  if (check_power) {
    EXPECT_GT(std::abs(1.01 * mean - d_true), 4.5 * 1.01 * se);
  }
  for (int j = 0; j < 16; ++j) {
    const double mn = sum_n[j] / trials;
    const double sn = std::sqrt((sum_n2[j] / trials - mn * mn) / trials);
    EXPECT_LT(std::abs(mn - n_true[j]), 4.5 * sn + 1e-12) << "N dim " << j;
  }
}

TEST(Estimators, UnbiasedFlat) {
  check_unbiased(synth::family::uniform, true);
}
TEST(Estimators, UnbiasedHeavyTailed) {
  check_unbiased(synth::family::correlated_values, false);
}

// A configuration that would read no token on a short sequence (fractions rounding to zero)
// falls back to exact attention instead of dividing by zero.
TEST(Exactness, EmptySelectionFallsBackToDense) {
  for (const char* text : {"sink=0,local=0,topk=0.01", "sink=0.01,local=0.01"}) {
    config cfg = parse_config(text);
    batch b =
        make_batch(synth::family::uniform, {50}, 1, 1, 8, dtype::f32, kv_layout::contiguous, 6);
    run_args a = b.args();
    run_cpu(cfg, b, a, 1);
    const auto ref = reference::run(cfg, a);
    EXPECT_EQ(b.stats[0].dense_fallback, 1) << text;
    EXPECT_LT(test::nmse(b.out.data(), ref[0].out_dense.data(), 8), 1e-12) << text;
    EXPECT_LT(test::nmse(ref[0].out.data(), ref[0].out_dense.data(), 8), 1e-24) << text;
  }
}

// The sample is a uniform draw without replacement from R only: F never appears in it, no
// repeats, and the base sample is its prefix (nested).
TEST(Sampling, FromResidualWithoutRepeatsAndNested) {
  config cfg = small_config("vattention");
  cfg.eps = 0.01;
  batch b =
      make_batch(synth::family::uniform, {3000}, 1, 1, 16, dtype::f32, kv_layout::contiguous, 12);
  run_args a = b.args();
  const auto r = reference::run(cfg, a)[0];
  std::set<int32_t> f(r.f.begin(), r.f.end()), s;
  for (int32_t t : r.sample) {
    EXPECT_EQ(f.count(t), 0u);
    EXPECT_TRUE(s.insert(t).second);
  }
  ASSERT_GT(r.stats.b, r.stats.m);
  // The base sample with base = m equals the first m of the final sample.
  config base_only = cfg;
  base_only.eps = 0.999999;
  const auto rb = reference::run(base_only, a)[0];
  ASSERT_EQ(rb.stats.b, rb.stats.m);
  for (int64_t j = 0; j < rb.stats.m; ++j) EXPECT_EQ(rb.sample[j], r.sample[j]);
}

// Hub mode on a small hand-built case: sinks 2, local 2, window [2, 14) of 12 tokens.
TEST(Hub, FollowsCompatibilityRules) {
  config cfg = parse_config("method=hub,sink=2,local=2,topk=2,base=0.25,eps=0.2,delta=0.1");
  batch b =
      make_batch(synth::family::uniform, {16}, 1, 1, 4, dtype::f32, kv_layout::contiguous, 31);
  run_args a = b.args(0);
  const auto r = reference::run(cfg, a)[0];
  const int64_t n_w = 12, m = 3;  // m = max(2, floor(0.25 * 12))
  EXPECT_EQ(r.stats.n_s, n_w);
  EXPECT_EQ(r.stats.m, m);
  const uint64_t key = detail::sample_key(cfg.seed, cfg.layer, 0, 0, 0);
  // e over the base draws, one-sided z, sd floored, D^_B over F plus distinct base draws.
  std::vector<double> e(16);
  double mx = -1e300;
  std::vector<double> lg(16);
  for (int t = 0; t < 16; ++t) {
    double acc = 0;
    for (int j = 0; j < 4; ++j)
      acc += double(b.q[j]) * double(reinterpret_cast<const float*>(b.k.data())[t * 4 + j]);
    lg[t] = acc / 2.0;  // 1 / sqrt(4)
    mx = std::max(mx, lg[t]);
  }
  for (int t = 0; t < 16; ++t) e[t] = std::exp(lg[t] - mx);
  std::vector<int> draws;
  for (int64_t j = 0; j < m; ++j) draws.push_back(2 + int(detail::uniform_draw(key, j, n_w)));
  double mean = 0, var = 0;
  for (int t : draws) mean += e[t] / m;
  for (int t : draws) var += (e[t] - mean) * (e[t] - mean) / (m - 1);
  std::set<int> f(r.f.begin(), r.f.end()), distinct(draws.begin(), draws.end());
  EXPECT_EQ(f.size(), 6u);  // 2 sinks + 2 local + top-2 of the window
  double d_b = 0;
  for (int t : f) d_b += e[t];
  double ds = 0;
  for (int t : distinct) ds += e[t];
  d_b += double(n_w) / m * ds;
  const double z = 1.2815515655446004;  // Phi^-1(0.9): one-sided
  const int64_t b_expect = std::clamp<int64_t>(
      int64_t(std::clamp(
          std::pow(z * std::max(std::sqrt(var), 1e-8) * n_w / std::max(0.2 * d_b, 1e-8), 2), 1.0,
          double(n_w))),
      m, n_w);
  EXPECT_EQ(r.stats.b, b_expect);
  // The final sample: draws m .. m+b-1 (the base draws are not part of it), duplicates and F
  // members collapsed, each weighted 1 / (b / n_w + 1e-6).
  std::vector<int> expect_sample;
  std::set<int> taken(f);
  for (int64_t j = 0; j < r.stats.b; ++j) {
    int t = 2 + int(detail::uniform_draw(key, uint64_t(m + j), n_w));
    if (taken.insert(t).second) expect_sample.push_back(t);
  }
  EXPECT_EQ(std::vector<int>(r.sample.begin(), r.sample.end()), expect_sample);
  const double w = 1.0 / (double(r.stats.b) / n_w + 1e-6);
  double num0 = 0, den = 0;
  const float* v = reinterpret_cast<const float*>(b.v.data());
  for (int t : f) den += e[t], num0 += e[t] * v[t * 4];
  for (int t : expect_sample) den += w * e[t], num0 += w * e[t] * v[t * 4];
  EXPECT_NEAR(r.out[0], num0 / den, 1e-12);
}

TEST(BadInput, NamedErrors) {
  config cfg = small_config("vattention");
  auto expect_msg = [&](batch& b, run_args a, const char* needle) {
    try {
      run_cpu(cfg, b, a, 1);
      ADD_FAILURE() << "no error, expected '" << needle << "'";
    } catch (const error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  batch b =
      make_batch(synth::family::uniform, {100, 50}, 2, 1, 8, dtype::f32, kv_layout::contiguous, 1);
  run_args a = b.args();
  {
    run_args x = a;
    x.q = nullptr;
    expect_msg(b, x, "run_args.q");
  }
  {
    run_args x = a;
    x.out = nullptr;
    expect_msg(b, x, "run_args.out");
  }
  {
    std::vector<int32_t> lens = {100, 0};
    run_args x = a;
    x.kv.seq_len = lens.data();
    expect_msg(b, x, "seq_len[1]");
  }
  {
    run_args x = a;
    x.kv.n_rows = 120;
    expect_msg(b, x, "n_rows");
  }
  {
    b.q[3] = std::nanf("");
    expect_msg(b, a, "q contains NaN/Inf at seq 0, head 0, dim 3");
    b.q[3] = 0.5f;
  }
  {
    reinterpret_cast<float*>(b.k.data())[10 * 8 + 2] = INFINITY;  // token 10: always scored
    config dense = method_config("dense");
    run_args x = b.args();
    try {
      run_cpu(dense, b, x, 1);
      ADD_FAILURE() << "no error for Inf in K";
    } catch (const error& e) {
      EXPECT_NE(std::string(e.what()).find("k contains NaN/Inf"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("token 10"), std::string::npos) << e.what();
    }
    EXPECT_THROW(reference::run(dense, x), error);
    reinterpret_cast<float*>(b.k.data())[10 * 8 + 2] = 0.1f;
  }
  {
    reinterpret_cast<float*>(b.v.data())[99 * 8 + 5] = std::nanf("");  // last token: local
    run_args x = b.args();
    try {
      run_cpu(cfg, b, x, 1);
      ADD_FAILURE() << "no error for NaN in V";
    } catch (const error& e) {
      EXPECT_NE(std::string(e.what()).find("v contains NaN/Inf at seq 0, token 99"),
                std::string::npos)
          << e.what();
    }
    reinterpret_cast<float*>(b.v.data())[99 * 8 + 5] = 0.1f;
  }
  // Plan-level mismatches.
  plan_params pp{2, 2, 1, 8, 100, dtype::f32, 1};
  plan p(cfg, pp);
  std::vector<uint8_t> small(16);
  EXPECT_THROW(p.run(a, small.data(), small.size()), error);
  pp.kv_type = dtype::bf16;
  plan pb(cfg, pp);
  aligned_buffer ws(pb.workspace_bytes());
  try {
    pb.run(a, ws.data(), ws.size());
    ADD_FAILURE();
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("kv.type is f32"), std::string::npos) << e.what();
  }
  EXPECT_THROW(plan(cfg, plan_params{1, 3, 2, 8, 10, dtype::f32, 1}), error);  // 3 % 2
  EXPECT_THROW(plan(cfg, plan_params{1, 2, 1, 0, 10, dtype::f32, 1}), error);
  EXPECT_THROW(plan(cfg, plan_params{1, 2, 1, 8, 0, dtype::f32, 1}), error);
  {
    run_args x = a;
    x.kv.n_seq = 3;  // above n_seq_max
    plan pl(cfg, plan_params{2, 2, 1, 8, 100, dtype::f32, 1});
    ws.reserve(pl.workspace_bytes());
    EXPECT_THROW(pl.run(x, ws.data(), ws.size()), error);
  }
}

TEST(BadInput, PagedTableOutOfRange) {
  config cfg = small_config("vattention");
  batch b = make_batch(synth::family::uniform, {40}, 1, 1, 8, dtype::f32, kv_layout::paged, 1, 16);
  b.page_table[1] = 99;
  run_args a = b.args();
  try {
    run_cpu(cfg, b, a, 1);
    ADD_FAILURE();
  } catch (const error& e) {
    EXPECT_NE(std::string(e.what()).find("page_table"), std::string::npos) << e.what();
  }
}
