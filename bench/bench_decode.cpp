// bench_decode.cpp: Google Benchmark micro-benchmarks of the CPU path at Llama-3.1-8B shapes
// (32 query heads, 8 kv heads, head_dim 128, bf16 K/V, batch 1): the machine's stream-read
// bandwidth, dense attention, and vAttention with and without oracle top-k. Counters: bytes of
// K/V read per call (from the run's statistics), GB/s, density.
//   ./build/release/bench/bench_decode --benchmark_repetitions=5
//       --benchmark_report_aggregates_only=true   (one command line)
#include <benchmark/benchmark.h>

#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "core/dtype.hpp"
#include "vattn/synth.hpp"
#include "vattn/vattn.hpp"

namespace {

constexpr int32_t k_hq = 32, k_hkv = 8, k_d = 128;

struct problem_bf16 {
  int32_t n = 0;
  std::vector<float> q;
  std::vector<uint16_t> k, v;
};

const problem_bf16& get_problem(int32_t n) {
  static std::map<int32_t, std::unique_ptr<problem_bf16>> cache;
  auto& slot = cache[n];
  if (!slot) {
    vattn::synth::problem p =
        vattn::synth::generate(vattn::synth::family::power_law, {n, k_hq, k_hkv, k_d}, 1);
    slot = std::make_unique<problem_bf16>();
    slot->n = n;
    slot->q = p.q;
    slot->k.resize(p.k.size());
    slot->v.resize(p.v.size());
    for (size_t i = 0; i < p.k.size(); ++i) slot->k[i] = vattn::detail::f32_to_bf16(p.k[i]);
    for (size_t i = 0; i < p.v.size(); ++i) slot->v[i] = vattn::detail::f32_to_bf16(p.v[i]);
  }
  return *slot;
}

// Sums a buffer larger than the caches with all threads: the read bandwidth decode is bound by.
void BM_stream_read(benchmark::State& state) {
  const size_t n = size_t(512) << 20;  // bytes
  std::vector<float> buf(n / 4, 1.0f);
  for (auto _ : state) {
    float total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
    for (size_t i = 0; i < buf.size(); ++i) total += buf[i];
    benchmark::DoNotOptimize(total);
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * int64_t(n));
}
BENCHMARK(BM_stream_read)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_attention(benchmark::State& state, const char* cfg_text) {
  const int32_t n = int32_t(state.range(0));
  const problem_bf16& p = get_problem(n);
  const vattn::config cfg = vattn::parse_config(cfg_text);
  vattn::plan_params pp;
  pp.n_head_q = k_hq;
  pp.n_head_kv = k_hkv;
  pp.head_dim = k_d;
  pp.n_tokens_max = n;
  pp.kv_type = vattn::dtype::bf16;
  const vattn::plan plan(cfg, pp);
  vattn::aligned_buffer ws(plan.workspace_bytes());
  std::vector<float> out(size_t(k_hq) * k_d);
  std::vector<vattn::head_stats> stats(k_hq);
  vattn::run_args a;
  a.n_head_q = k_hq;
  a.q = p.q.data();
  a.kv.type = vattn::dtype::bf16;
  a.kv.n_head_kv = k_hkv;
  a.kv.head_dim = k_d;
  a.kv.k = p.k.data();
  a.kv.v = p.v.data();
  a.kv.n_seq = 1;
  a.kv.seq_len = &p.n;
  a.kv.n_rows = n;
  a.out = out.data();
  a.stats = stats.data();
  uint64_t step = 0;
  for (auto _ : state) {
    a.step = step++;
    plan.run(a, ws.data(), ws.size());
    benchmark::DoNotOptimize(out.data());
  }
  double bytes = 0, density = 0;
  for (const auto& s : stats) bytes += double(s.bytes_kv), density += s.density / k_hq;
  state.SetBytesProcessed(int64_t(double(state.iterations()) * bytes));
  state.counters["density"] = density;
  state.counters["MB_read"] = bytes / 1e6;
}

const char* k_dense = "method=dense";
const char* k_vattn = "method=vattention";  // sink 128, local 128, oracle top-k 5%, eps=delta=.05
// No top-k: reads only sinks, local and the sample; a stand-in for a predictor that costs nothing.
const char* k_vattn_no_topk = "method=vattention,select=none";

}  // namespace

BENCHMARK_CAPTURE(BM_attention, dense, k_dense)
    ->Arg(32768)
    ->Arg(131072)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_attention, vattention_oracle_topk, k_vattn)
    ->Arg(32768)
    ->Arg(131072)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_attention, vattention_sink_local_sample, k_vattn_no_topk)
    ->Arg(32768)
    ->Arg(131072)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK_MAIN();
