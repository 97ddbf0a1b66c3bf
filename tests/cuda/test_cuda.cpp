// test_cuda.cpp: the CUDA backend against the double-precision reference and the CPU path on the
// same inputs: dense attention over contiguous, strided and paged caches; the weighted sparse
// kernel over the CPU's own vAttention index lists and weights; the keyed sampler; bad
// arguments. Every test that needs a GPU reports SKIPPED with the reason when there is none.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/budget.hpp"
#include "core/dtype.hpp"
#include "core/kv_access.hpp"
#include "core/sampler.hpp"
#include "cpu/gqa_kernels.hpp"
#include "cpu/simd.hpp"
#include "cuda/cuda_attention.hpp"
#include "cuda/select_math.hpp"
#include "test_util.hpp"
#include "vattn/reference.hpp"
#include "vattn/vattn.hpp"

using namespace vattn;
using vattn::test::batch;
using vattn::test::make_batch;

namespace {

// --------------------------------------------------------------------------------------------
// GPU presence, device buffers

std::string gpu_missing() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return std::string("no CUDA device (") + cudaGetErrorString(e) + ")";
  if (n == 0) return "no CUDA device";
  return "";
}

#define REQUIRE_GPU()                        \
  do {                                       \
    const std::string why_ = gpu_missing();  \
    if (!why_.empty()) GTEST_SKIP() << why_; \
  } while (0)

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

template <typename T>
class dev {  // an owning device buffer
 public:
  dev() = default;
  explicit dev(size_t n) : n_(n) {
    if (n) ck(cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)), "cudaMalloc");
  }
  explicit dev(const std::vector<T>& h) : dev(h.size()) { upload(h); }
  dev(dev&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  dev& operator=(dev&& o) noexcept {
    std::swap(p_, o.p_), std::swap(n_, o.n_);
    return *this;
  }
  ~dev() {
    if (p_) cudaFree(p_);
  }
  void upload(const std::vector<T>& h) {
    if (n_ == 0) return;
    ck(cudaMemcpy(p_, h.data(), std::min(h.size(), n_) * sizeof(T), cudaMemcpyHostToDevice),
       "upload");
  }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    if (n_ == 0) return h;
    ck(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return h;
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

constexpr size_t k_guard = 64;  // floats after every output
constexpr float k_guard_value = 12345.0f;

// The device copy of a test batch (same layout), and its output with guard values after it.
struct gpu_batch {
  dev<float> q, out;
  dev<uint8_t> k, v;
  dev<int32_t> seq_len, page_table;
  dev<int64_t> page_start;
  kv_cache kv;  // device pointers
  size_t n_out = 0;
  int32_t n_head_q = 0;

  explicit gpu_batch(const batch& b)
      : q(b.q),
        k(b.k),
        v(b.v),
        seq_len(b.seq_len),
        page_table(b.page_table),
        page_start(b.page_start) {
    n_head_q = b.n_head_q;
    n_out = b.seq_len.size() * size_t(b.n_head_q) * b.d;
    out = dev<float>(n_out + k_guard);
    kv.layout = b.layout;
    kv.type = b.type;
    kv.n_head_kv = b.n_head_kv;
    kv.head_dim = b.d;
    kv.k = k.get();
    kv.v = v.get();
    kv.n_seq = int32_t(b.seq_len.size());
    kv.seq_len = seq_len.get();
    kv.n_rows = b.n_rows;
    if (b.layout == kv_layout::paged) {
      kv.page_size = b.page_size;
      kv.page_table = page_table.get();
      kv.page_start = page_start.get();
      kv.n_pages = b.n_pages;
    }
  }
  // dense_args, sparse_args or run_args over this batch: its heads, q, kv and output.
  template <typename A>
  A args() const {
    A a;
    a.n_head_q = n_head_q;
    a.q = q.get();
    a.kv = kv;
    a.out = out.get();
    return a;
  }
  // Output NaN (so an unwritten element cannot pass), guards set.
  void poison() {
    std::vector<float> h(n_out + k_guard, std::nanf(""));
    std::fill(h.begin() + n_out, h.end(), k_guard_value);
    out.upload(h);
  }
  // The output; fails the test if a guard changed.
  std::vector<float> result() const {
    std::vector<float> h = out.download();
    for (size_t i = n_out; i < h.size(); ++i)
      EXPECT_EQ(h[i], k_guard_value) << "guard " << i - n_out << " after the output changed";
    h.resize(n_out);
    return h;
  }
};

// The plan shapes of a batch (cuda::params or vattn::plan_params).
template <typename P>
P params_for(const batch& b) {
  P p;
  p.n_seq_max = int32_t(b.seq_len.size());
  p.n_head_q = b.n_head_q;
  p.n_head_kv = b.n_head_kv;
  p.head_dim = b.d;
  p.n_tokens_max = b.n_max();
  p.kv_type = b.type;
  return p;
}
cuda::params cuda_params_for(const batch& b) {
  return params_for<cuda::params>(b);
}
plan_params cpu_params_for(const batch& b) {
  plan_params p = params_for<plan_params>(b);
  p.n_threads = 2;
  return p;
}

// Runs the CPU path over the batch (fills b.out, b.stats, b.indices) and returns its output.
std::vector<float> run_cpu(const config& cfg, batch& b, uint64_t step = 3) {
  const run_args a = b.args(step);
  vattn::plan p(cfg, cpu_params_for(b));
  aligned_buffer ws(p.workspace_bytes());
  p.run(a, ws.data(), ws.size());
  EXPECT_TRUE(b.guards_intact());
  return std::vector<float>(b.out.begin(), b.out.end() - 16);
}

std::vector<float> run_gpu_dense(const batch& b, gpu_batch& g) {
  const cuda::plan p(cuda_params_for(b));
  dev<uint8_t> ws(p.workspace_bytes());
  auto a = g.args<cuda::dense_args>();
  g.poison();
  p.dense(a, ws.get(), ws.size(), nullptr);
  cuda::check_errors(ws.get(), nullptr);
  return g.result();
}

bool all_finite(const std::vector<float>& x) {
  return std::all_of(x.begin(), x.end(), [](float v) { return std::isfinite(v); });
}

std::vector<double> reference_dense(const batch& b_in) {
  batch b = b_in;
  const std::vector<reference::head_result> ref = reference::run(method_config("dense"), b.args());
  std::vector<double> out;
  for (const auto& r : ref) out.insert(out.end(), r.out_dense.begin(), r.out_dense.end());
  return out;
}

const char* layout_name(kv_layout l) {
  return l == kv_layout::paged ? "paged" : "contiguous";
}

template <typename F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no vattn::error; expected one naming \"" << needle << "\"";
  } catch (const vattn::error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message \"" << e.what() << "\" does not name \"" << needle << "\"";
  }
}

// --------------------------------------------------------------------------------------------
// Dense

// f32 accumulation against double: NMSE lands near 1e-13; 1e-9 leaves room and still catches
// any wrong index, row or weight (those give NMSE >= 1e-4).
constexpr double k_nmse_bound = 1e-9;

// The GPU output against the double reference and the CPU path's output: both NMSEs under
// k_nmse_bound; the worst of each and the cases kept.
struct nmse_worst {
  double ref = 0, cpu = 0;
  int cases = 0;
  void check(const std::vector<float>& got, const std::vector<double>& r,
             const std::vector<float>& c) {
    const double e_ref = test::nmse(got.data(), r.data(), got.size());
    const double e_cpu = test::nmse(got.data(), c.data(), got.size());
    EXPECT_LT(e_ref, k_nmse_bound);
    EXPECT_LT(e_cpu, k_nmse_bound);
    ref = std::max(ref, e_ref);
    cpu = std::max(cpu, e_cpu);
    ++cases;
  }
};

TEST(cuda_dense, matches_reference_and_cpu) {
  REQUIRE_GPU();
  struct shape {
    int32_t hq, hkv, d;
  };
  const shape shapes[] = {{8, 2, 128}, {4, 4, 64}, {8, 1, 64}, {6, 2, 128}, {32, 8, 128}};
  const std::vector<std::vector<int32_t>> lens = {{1}, {7}, {300}, {5000}, {5000, 1, 300, 7, 64}};
  const dtype types[] = {dtype::bf16, dtype::f16, dtype::f32};
  const int32_t page_sizes[] = {16, 5, 64};
  int cases = 0;
  for (int ti = 0; ti < 3; ++ti) {
    nmse_worst worst;
    for (kv_layout layout : {kv_layout::contiguous, kv_layout::paged}) {
      for (const shape& sh : shapes) {
        for (size_t li = 0; li < lens.size(); ++li) {
          const auto fam = synth::all_families()[(li + ti) % synth::all_families().size()];
          const std::string what = std::string(dtype_name(types[ti])) + " " + layout_name(layout) +
                                   " hq " + std::to_string(sh.hq) + " hkv " +
                                   std::to_string(sh.hkv) + " d " + std::to_string(sh.d) +
                                   " lens[0] " + std::to_string(lens[li][0]) + " n_seq " +
                                   std::to_string(lens[li].size());
          SCOPED_TRACE(what);
          batch b = make_batch(fam, lens[li], sh.hq, sh.hkv, sh.d, types[ti], layout, 17 + li,
                               page_sizes[ti]);
          gpu_batch g(b);
          const std::vector<float> gpu = run_gpu_dense(b, g);
          const std::vector<double> ref = reference_dense(b);
          const std::vector<float> cpu = run_cpu(method_config("dense"), b);
          ASSERT_TRUE(all_finite(gpu));
          worst.check(gpu, ref, cpu);
        }
      }
    }
    std::printf("[cuda dense] %-4s: worst NMSE vs reference %.2e, vs CPU path %.2e\n",
                dtype_name(types[ti]), worst.ref, worst.cpu);
    cases += worst.cases;
  }
  std::printf("[cuda dense] %d cases\n", cases);
}

// Rows with a padded token stride, sequences at gaps given by seq_start, and the kv-head-major
// ("HND") layout: the same strides the CPU path accepts.
TEST(cuda_dense, strided_rows_and_seq_start) {
  REQUIRE_GPU();
  const int32_t hq = 8, hkv = 2, d = 64;
  const std::vector<int32_t> lens = {300, 77, 1000};
  batch b =
      make_batch(synth::family::power_law, lens, hq, hkv, d, dtype::bf16, kv_layout::contiguous, 5);
  for (int hnd = 0; hnd < 2; ++hnd) {
    SCOPED_TRACE(hnd ? "head-major" : "padded token stride");
    const int64_t gap = 13;
    std::vector<int64_t> seq_start;
    int64_t rows = gap;
    for (int32_t n : lens) seq_start.push_back(rows), rows += n + gap;
    kv_cache kv;
    kv.type = dtype::bf16;
    kv.n_head_kv = hkv;
    kv.head_dim = d;
    kv.n_seq = int32_t(lens.size());
    kv.n_rows = rows;
    if (hnd) {  // [kv head][row][dim]
      kv.stride_head = rows * d;
      kv.stride_token = d;
    } else {  // [row][kv head][dim + 8 spare elements]
      kv.stride_head = d + 8;
      kv.stride_token = hkv * (d + 8);
    }
    const size_t elems = size_t(rows) * hkv * (d + 8);
    std::vector<uint16_t> k(elems, 0x7fc0), v(elems, 0x7fc0);  // bf16 NaN where nothing lives
    const uint16_t* k0 = reinterpret_cast<const uint16_t*>(b.k.data());
    const uint16_t* v0 = reinterpret_cast<const uint16_t*>(b.v.data());
    int64_t src_row = 0;
    for (size_t s = 0; s < lens.size(); ++s) {
      for (int32_t t = 0; t < lens[s]; ++t, ++src_row) {
        for (int32_t h = 0; h < hkv; ++h) {
          const size_t dst = size_t((seq_start[s] + t) * kv.stride_token + h * kv.stride_head);
          const size_t src = size_t((src_row * hkv + h) * d);
          std::copy(k0 + src, k0 + src + d, k.begin() + dst);
          std::copy(v0 + src, v0 + src + d, v.begin() + dst);
        }
      }
    }
    // reference on the host copy
    run_args ha;
    ha.n_head_q = hq;
    ha.q = b.q.data();
    ha.kv = kv;
    ha.kv.k = k.data();
    ha.kv.v = v.data();
    ha.kv.seq_len = lens.data();
    ha.kv.seq_start = seq_start.data();
    std::vector<double> ref;
    for (const auto& r : reference::run(method_config("dense"), ha))
      ref.insert(ref.end(), r.out_dense.begin(), r.out_dense.end());
    // the GPU on device copies
    dev<uint16_t> dk(k), dv(v);
    dev<int32_t> dlen(lens);
    dev<int64_t> dstart(seq_start);
    dev<float> dq(b.q), dout(ref.size());
    cuda::params p = cuda_params_for(b);
    const cuda::plan pl(p);
    dev<uint8_t> ws(pl.workspace_bytes());
    cuda::dense_args a;
    a.n_head_q = hq;
    a.q = dq.get();
    a.kv = kv;
    a.kv.k = dk.get();
    a.kv.v = dv.get();
    a.kv.seq_len = dlen.get();
    a.kv.seq_start = dstart.get();
    a.out = dout.get();
    pl.dense(a, ws.get(), ws.size(), nullptr);
    cuda::check_errors(ws.get(), nullptr);
    const std::vector<float> gpu = dout.download();
    ASSERT_TRUE(all_finite(gpu));
    const double e = test::nmse(gpu.data(), ref.data(), gpu.size());
    EXPECT_LT(e, k_nmse_bound);
    std::printf("[cuda dense] %s: NMSE vs reference %.2e\n", hnd ? "head-major" : "padded", e);
  }
}

// run() is capturable: no allocation, no synchronisation. Replays of the graph give the
// direct run's output bit for bit.
TEST(cuda_dense, graph_capture_replays_the_same_result) {
  REQUIRE_GPU();
  batch b = make_batch(synth::family::heavy_hitters, {3000, 50, 1}, 8, 2, 128, dtype::bf16,
                       kv_layout::paged, 9);
  gpu_batch g(b);
  const cuda::plan p(cuda_params_for(b));
  dev<uint8_t> ws(p.workspace_bytes());
  auto a = g.args<cuda::dense_args>();
  cudaStream_t stream;
  ck(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  g.poison();
  p.dense(a, ws.get(), ws.size(), stream);
  cuda::check_errors(ws.get(), stream);
  const std::vector<float> direct = g.result();

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  ck(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "begin capture");
  p.dense(a, ws.get(), ws.size(), stream);
  ck(cudaStreamEndCapture(stream, &graph), "end capture");
  ck(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  g.poison();
  for (int r = 0; r < 3; ++r) ck(cudaGraphLaunch(exec, stream), "graph launch");
  cuda::check_errors(ws.get(), stream);
  const std::vector<float> replayed = g.result();
  EXPECT_EQ(0, std::memcmp(direct.data(), replayed.data(), direct.size() * sizeof(float)));
  ASSERT_TRUE(all_finite(replayed));
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

// --------------------------------------------------------------------------------------------
// Sparse: the CPU path's own lists (F with weight 1, then the sample with weight n_s / b)

struct lists {
  std::vector<int32_t> idx, len;
  std::vector<float> w;
  int64_t stride = 0;
};

// Per query head, from b.indices and b.stats after a CPU run.
lists lists_from_cpu(const batch& b) {
  lists L;
  L.stride = b.n_max();
  L.idx = b.indices;
  L.w.assign(b.indices.size(), 0.f);
  for (size_t hi = 0; hi < b.stats.size(); ++hi) {
    const head_stats& st = b.stats[hi];
    EXPECT_EQ(st.n_sampled, st.n_sampled > 0 ? st.b : 0) << "head " << hi;
    const float ws = st.b > 0 ? float(double(st.n_s) / double(st.b)) : 0.f;
    for (int64_t j = 0; j < st.n_f + st.n_sampled; ++j)
      L.w[hi * L.stride + j] = j < st.n_f ? 1.f : ws;
    L.len.push_back(int32_t(st.n_f + st.n_sampled));
  }
  return L;
}

// One list per kv group from per-head lists, which must agree within each group.
lists group_lists(const batch& b, const lists& per_head) {
  const int32_t group = b.n_head_q / b.n_head_kv;
  lists L;
  L.stride = per_head.stride;
  for (size_t s = 0; s < b.seq_len.size(); ++s) {
    for (int32_t kvh = 0; kvh < b.n_head_kv; ++kvh) {
      const size_t h0 = s * b.n_head_q + kvh * group;
      const int32_t n = per_head.len[h0];
      for (int32_t x = 1; x < group; ++x) {
        const size_t h = h0 + x;
        EXPECT_EQ(per_head.len[h], n) << "heads of a shared group read different lists";
        for (int32_t j = 0; j < std::min(n, per_head.len[h]); ++j) {
          EXPECT_EQ(per_head.idx[h * L.stride + j], per_head.idx[h0 * L.stride + j]);
          EXPECT_EQ(per_head.w[h * L.stride + j], per_head.w[h0 * L.stride + j]);
        }
      }
      L.len.push_back(n);
      L.idx.insert(L.idx.end(), per_head.idx.begin() + h0 * L.stride,
                   per_head.idx.begin() + (h0 + 1) * L.stride);
      L.w.insert(L.w.end(), per_head.w.begin() + h0 * L.stride,
                 per_head.w.begin() + (h0 + 1) * L.stride);
    }
  }
  return L;
}

// sum_i w_i e_i v_i / sum_i w_i e_i over each query head's list, in double.
std::vector<double> weighted_attention(const batch& b, const lists& L, bool per_group) {
  batch host = b;  // args() resets the outputs: use a copy for the host pointers
  const kv_cache kv = detail::with_default_strides(host.args().kv);
  const int32_t d = b.d, group = b.n_head_q / b.n_head_kv;
  const double scale = 1.0 / std::sqrt(double(d));
  std::vector<double> out;
  int64_t row0 = 0;
  for (size_t s = 0; s < b.seq_len.size(); ++s) {
    for (int32_t h = 0; h < b.n_head_q; ++h) {
      const int32_t kvh = h / group;
      const size_t lh = s * (per_group ? b.n_head_kv : b.n_head_q) + (per_group ? kvh : h);
      const float* q = b.q.data() + (s * b.n_head_q + h) * d;
      std::vector<double> lg(L.len[lh]);
      double c = -1e300;
      for (int32_t i = 0; i < L.len[lh]; ++i) {
        const int64_t off = detail::row_offset(kv, row0, int64_t(s), L.idx[lh * L.stride + i], kvh);
        double dot = 0;
        for (int32_t j = 0; j < d; ++j)
          dot += double(q[j]) * detail::load_as_f32(kv.k, kv.type, off + j);
        lg[i] = scale * dot;
        c = std::max(c, lg[i]);
      }
      std::vector<double> o(d, 0.0);
      double den = 0;
      for (int32_t i = 0; i < L.len[lh]; ++i) {
        const int64_t off = detail::row_offset(kv, row0, int64_t(s), L.idx[lh * L.stride + i], kvh);
        const double e = double(L.w[lh * L.stride + i]) * std::exp(lg[i] - c);
        den += e;
        for (int32_t j = 0; j < d; ++j) o[j] += e * detail::load_as_f32(kv.v, kv.type, off + j);
      }
      for (int32_t j = 0; j < d; ++j) out.push_back(o[j] / den);
    }
    row0 += b.seq_len[s];
  }
  return out;
}

std::vector<float> run_gpu_sparse(const batch& b, gpu_batch& g, const lists& L, bool per_group) {
  const cuda::plan p(cuda_params_for(b));
  dev<uint8_t> ws(p.workspace_bytes());
  dev<int32_t> idx(L.idx), len(L.len);
  dev<float> w(L.w);
  auto a = g.args<cuda::sparse_args>();
  a.per_group = per_group;
  a.indices = idx.get();
  a.weights = w.get();
  a.list_len = len.get();
  a.list_stride = L.stride;
  g.poison();
  p.sparse(a, ws.get(), ws.size(), nullptr);
  cuda::check_errors(ws.get(), nullptr);
  return g.result();
}

config sparse_config(const std::string& method, bool shared) {
  config c = method_config(method);
  c.sink = {16, false};
  c.local = {32, false};
  if (c.select == selector::topk) c.topk = {0.05, true};
  if (c.sample == sampling::fixed_rate) c.sample_rate = 0.1;
  if (c.sample == sampling::adaptive) c.base = {0.1, true};
  c.gqa_shared = shared;
  c.seed = 1234;
  c.layer = 3;
  c.validate();
  return c;
}

// The GPU reproduces the CPU's vAttention output from the CPU's index lists and weights. The
// CPU-side half (its output equals the weighted sum over its own lists) runs without a GPU.
TEST(cuda_sparse, reproduces_cpu_vattention_from_its_lists) {
  struct method_case {
    const char* method;
    bool shared;
  };
  const method_case methods[] = {
      {"vattention", false}, {"random", false}, {"topk", false}, {"vattention", true}};
  struct shape {
    int32_t hq, hkv, d;
  };
  const shape shapes[] = {{8, 2, 128}, {4, 4, 64}};
  const std::vector<std::vector<int32_t>> lens = {{5000}, {300}, {5000, 300, 7}};
  const bool gpu = gpu_missing().empty();
  nmse_worst worst;
  double worst_cpu_lists = 0;
  for (const method_case& mc : methods) {
    const config cfg = sparse_config(mc.method, mc.shared);
    for (dtype type : {dtype::bf16, dtype::f16}) {
      for (kv_layout layout : {kv_layout::contiguous, kv_layout::paged}) {
        for (const shape& sh : shapes) {
          for (size_t li = 0; li < lens.size(); ++li) {
            const std::string what = std::string(mc.method) + (mc.shared ? " shared " : " ") +
                                     dtype_name(type) + " " + layout_name(layout) + " hq " +
                                     std::to_string(sh.hq) + " hkv " + std::to_string(sh.hkv) +
                                     " lens[0] " + std::to_string(lens[li][0]);
            SCOPED_TRACE(what);
            batch b = make_batch(synth::family::correlated_values, lens[li], sh.hq, sh.hkv, sh.d,
                                 type, layout, 31 + li, 16);
            const std::vector<float> cpu = run_cpu(cfg, b);
            const lists per_head = lists_from_cpu(b);
            const lists L = mc.shared ? group_lists(b, per_head) : per_head;
            const std::vector<double> ref = weighted_attention(b, L, mc.shared);
            const double e_cl = test::nmse(cpu.data(), ref.data(), cpu.size());
            EXPECT_LT(e_cl, k_nmse_bound) << "the CPU output is not the weighted sum of its lists";
            worst_cpu_lists = std::max(worst_cpu_lists, e_cl);
            if (!gpu) continue;
            gpu_batch g(b);
            const std::vector<float> out = run_gpu_sparse(b, g, L, mc.shared);
            ASSERT_TRUE(all_finite(out));
            worst.check(out, ref, cpu);
          }
        }
      }
    }
  }
  std::printf("[cuda sparse] CPU output vs double over its own lists: worst NMSE %.2e\n",
              worst_cpu_lists);
  if (!gpu) GTEST_SKIP() << gpu_missing() << " (the CPU-side checks ran and passed)";
  std::printf("[cuda sparse] %d cases: worst NMSE vs double over the lists %.2e, vs CPU %.2e\n",
              worst.cases, worst.ref, worst.cpu);
}

// --------------------------------------------------------------------------------------------
// Sampler

TEST(cuda_sampler, permutation_matches_cpu) {
  REQUIRE_GPU();
  const cuda::sample_key_fields keys[] = {
      {0, 0, 0, 0, 0}, {1234, 3, 5, 7, 9}, {~0ull, -1, -3, 31, 1ull << 40}, {42, 31, 1000, 2, 77}};
  const uint64_t sizes[] = {1, 2, 7, 255, 256, 257, 4099, 131149, (1u << 20) + 3};
  uint64_t checked = 0, bad = 0;
  for (const auto& f : keys) {
    const uint64_t key = detail::sample_key(f.seed, f.layer, f.seq, f.head, f.step);
    for (uint64_t n : sizes) {
      const uint64_t first = n / 3, count = n - first;
      dev<int64_t> d_out(count);
      cuda::permutation(f, n, first, count, d_out.get(), nullptr);
      ck(cudaDeviceSynchronize(), "permutation");
      const std::vector<int64_t> got = d_out.download();
      const detail::keyed_permutation perm(key, n);
      for (uint64_t i = 0; i < count; ++i) bad += uint64_t(got[i]) != perm(first + i);
      checked += count;
      if (n <= 4099) {  // and it is a permutation: the whole range, sorted, is 0..n-1
        dev<int64_t> all(n);
        cuda::permutation(f, n, 0, n, all.get(), nullptr);
        std::vector<int64_t> v = all.download();
        std::sort(v.begin(), v.end());
        for (uint64_t i = 0; i < n; ++i) ASSERT_EQ(v[i], int64_t(i)) << "n " << n;
      }
    }
  }
  EXPECT_EQ(bad, 0u);
  std::printf("[cuda sampler] %llu elements checked, %llu mismatches\n",
              (unsigned long long)checked, (unsigned long long)bad);
}

// The GPU permutation, walked skipping F, gives exactly the CPU path's sampled tokens in draw
// order, for every head (per-head keys, and kv-group keys with gqa_shared).
TEST(cuda_sampler, reproduces_cpu_samples) {
  REQUIRE_GPU();
  for (bool shared : {false, true}) {
    SCOPED_TRACE(shared ? "gqa_shared" : "per head");
    const config cfg = sparse_config("vattention", shared);
    batch b = make_batch(synth::family::uniform, {5000, 300}, 8, 2, 64, dtype::f32,
                         kv_layout::contiguous, 3);
    const uint64_t step = 11;
    run_cpu(cfg, b, step);
    const int64_t stride = b.n_max();
    int64_t heads = 0, samples = 0;
    for (size_t hi = 0; hi < b.stats.size(); ++hi) {
      const head_stats& st = b.stats[hi];
      if (st.n_sampled == 0) continue;
      const int32_t s = int32_t(hi / b.n_head_q), h = int32_t(hi % b.n_head_q);
      const int32_t key_head = shared ? h / (b.n_head_q / b.n_head_kv) : h;
      const cuda::sample_key_fields f{cfg.seed, cfg.layer, s, key_head, step};
      dev<int64_t> d_perm(st.n);
      cuda::permutation(f, st.n, 0, st.n, d_perm.get(), nullptr);
      const std::vector<int64_t> perm = d_perm.download();
      const int32_t* idx = b.indices.data() + hi * stride;
      const std::set<int64_t> in_f(idx, idx + st.n_f);
      std::vector<int32_t> walk;
      for (size_t i = 0; i < perm.size() && int64_t(walk.size()) < st.n_sampled; ++i)
        if (!in_f.count(perm[i])) walk.push_back(int32_t(perm[i]));
      ASSERT_EQ(int64_t(walk.size()), st.n_sampled) << "head " << hi;
      EXPECT_TRUE(std::equal(walk.begin(), walk.end(), idx + st.n_f)) << "head " << hi;
      ++heads;
      samples += st.n_sampled;
    }
    EXPECT_GT(heads, 0);
    std::printf("[cuda sampler] %s: %lld heads, %lld sampled tokens equal to the CPU's\n",
                shared ? "gqa_shared" : "per head", (long long)heads, (long long)samples);
  }
}

// --------------------------------------------------------------------------------------------
// Bad input

TEST(cuda_errors, bad_plan_params) {  // checked before any CUDA call: runs without a GPU
  cuda::params good;
  good.n_head_q = 8, good.n_head_kv = 2, good.head_dim = 128, good.n_tokens_max = 100;
  auto with = [&](auto change) {
    cuda::params p = good;
    change(p);
    return p;
  };
  expect_error([&] { cuda::plan x(with([](auto& p) { p.head_dim = 96; })); }, "head_dim");
  expect_error([&] { cuda::plan x(with([](auto& p) { p.head_dim = 0; })); }, "head_dim");
  expect_error([&] { cuda::plan x(with([](auto& p) { p.n_head_q = 6, p.n_head_kv = 4; })); },
               "n_head_q");
  expect_error([&] { cuda::plan x(with([](auto& p) { p.n_head_kv = 0; })); }, "n_head_kv");
  expect_error([&] { cuda::plan x(with([](auto& p) { p.n_tokens_max = 0; })); }, "n_tokens_max");
  expect_error([&] { cuda::plan x(with([](auto& p) { p.n_seq_max = 0; })); }, "n_seq_max");
  expect_error([&] { cuda::plan x(with([](auto& p) { p.kv_type = dtype(7); })); }, "kv_type");
  expect_error([&] { cuda::permutation({}, 0, 0, 0, nullptr, nullptr); }, "n = 0");
  expect_error([&] { cuda::permutation({}, 10, 5, 6, nullptr, nullptr); }, "first + count");
}

TEST(cuda_errors, bad_run_arguments) {
  REQUIRE_GPU();
  batch b = make_batch(synth::family::uniform, {100, 30}, 8, 2, 128, dtype::bf16, kv_layout::paged,
                       2, 16);
  gpu_batch g(b);
  const cuda::plan p(cuda_params_for(b));
  dev<uint8_t> ws(p.workspace_bytes());
  auto good = g.args<cuda::dense_args>();
  auto dense_with = [&](auto change, const std::string& needle, size_t ws_size = 0) {
    cuda::dense_args a = good;
    change(a);
    expect_error([&] { p.dense(a, ws.get(), ws_size ? ws_size : ws.size(), nullptr); }, needle);
  };
  dense_with([](auto& a) { a.q = nullptr; }, "q is null");
  dense_with([](auto& a) { a.out = nullptr; }, "out is null");
  dense_with([](auto& a) { a.kv.k = nullptr; }, "kv.k");
  dense_with([](auto& a) { a.kv.v = nullptr; }, "kv.v");
  dense_with([](auto& a) { a.kv.seq_len = nullptr; }, "kv.seq_len");
  dense_with([](auto& a) { a.kv.page_table = nullptr; }, "kv.page_table");
  dense_with([](auto& a) { a.kv.n_seq = 3; }, "kv.n_seq");
  dense_with([](auto& a) { a.kv.n_seq = 0; }, "kv.n_seq");
  dense_with([](auto& a) { a.kv.head_dim = 64; }, "kv.head_dim");
  dense_with([](auto& a) { a.kv.n_head_kv = 4; }, "kv.n_head_kv");
  dense_with([](auto& a) { a.kv.type = dtype::f16; }, "kv.type");
  dense_with([](auto& a) { a.n_head_q = 4; }, "n_head_q");
  dense_with([](auto& a) { a.scale = -1; }, "scale");
  dense_with([](auto& a) { a.kv.stride_token = 2 * 128 + 4; }, "kv.stride_token");
  dense_with([](auto& a) { a.kv.k = static_cast<const char*>(a.kv.k) + 2; }, "aligned");
  dense_with([](auto& a) { a.kv.page_size = 0; }, "kv.page_size");
  dense_with([](auto&) {}, "workspace_size", p.workspace_bytes() - 1);
  expect_error([&] { p.dense(good, nullptr, ws.size(), nullptr); }, "workspace is null");

  auto sa = g.args<cuda::sparse_args>();
  dev<int32_t> idx(std::vector<int32_t>(16 * 100, 0)), len(std::vector<int32_t>(16, 1));
  dev<float> w(std::vector<float>(16 * 100, 1.f));
  sa.indices = idx.get(), sa.weights = w.get(), sa.list_len = len.get(), sa.list_stride = 100;
  auto sparse_with = [&](auto change, const std::string& needle) {
    cuda::sparse_args a = sa;
    change(a);
    expect_error([&] { p.sparse(a, ws.get(), ws.size(), nullptr); }, needle);
  };
  sparse_with([](auto& a) { a.indices = nullptr; }, "indices");
  sparse_with([](auto& a) { a.weights = nullptr; }, "weights");
  sparse_with([](auto& a) { a.list_len = nullptr; }, "list_len");
  sparse_with([](auto& a) { a.list_stride = 101; }, "list_stride");
  sparse_with([](auto& a) { a.list_stride = 0; }, "list_stride");
  p.sparse(sa, ws.get(), ws.size(), nullptr);  // the good arguments run
  cuda::check_errors(ws.get(), nullptr);
}

// Values that live on the device are checked by the kernels: the run writes NaN and
// check_errors names the value; the next good run clears the record.
TEST(cuda_errors, bad_device_values) {
  REQUIRE_GPU();
  for (kv_layout layout : {kv_layout::contiguous, kv_layout::paged}) {
    SCOPED_TRACE(layout_name(layout));
    batch b = make_batch(synth::family::uniform, {100, 30}, 8, 2, 64, dtype::f16, layout, 4, 16);
    gpu_batch g(b);
    const cuda::plan p(cuda_params_for(b));
    dev<uint8_t> ws(p.workspace_bytes());
    auto a = g.args<cuda::dense_args>();
    // corrupt(), run(): check_errors names the value and the output is NaN; then restore()
    // and a good run clears the record.
    auto expect_device_error = [&](auto corrupt, auto run, auto restore,
                                   const std::string& needle) {
      corrupt();
      g.poison();
      run();
      expect_error([&] { cuda::check_errors(ws.get(), nullptr); }, needle);
      const std::vector<float> out = g.result();
      EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return std::isnan(x); }));
      restore();
      run();
      EXPECT_NO_THROW(cuda::check_errors(ws.get(), nullptr));
    };
    auto dense = [&] { p.dense(a, ws.get(), ws.size(), nullptr); };
    for (int32_t bad_len : {0, 101, -5}) {
      expect_device_error(
          [&] {
            g.seq_len.upload({b.seq_len[0], bad_len});
          },
          dense, [&] { g.seq_len.upload(b.seq_len); },
          "kv.seq_len[1] = " + std::to_string(bad_len));
    }
    if (layout == kv_layout::paged) {
      std::vector<int32_t> table = b.page_table;
      table[3] = int32_t(b.n_pages);
      expect_device_error([&] { g.page_table.upload(table); }, dense,
                          [&] { g.page_table.upload(b.page_table); }, "kv.page_table[3]");
    } else {  // the second sequence occupies rows [100, 130)
      expect_device_error([&] { a.kv.n_rows = 120; }, dense, [&] { a.kv.n_rows = b.n_rows; },
                          "rows [100, 130)");
    }
    // sparse lists: a position past the sequence, an empty list
    const int64_t stride = 100;
    std::vector<int32_t> idx(2 * 8 * stride, 0), len(2 * 8, 10);
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = int32_t(i % 10);
    dev<int32_t> d_idx(idx), d_len(len);
    dev<float> d_w(std::vector<float>(idx.size(), 1.f));
    auto sa = g.args<cuda::sparse_args>();
    sa.indices = d_idx.get(), sa.weights = d_w.get(), sa.list_len = d_len.get();
    sa.list_stride = stride;
    auto sparse = [&] { p.sparse(sa, ws.get(), ws.size(), nullptr); };
    const size_t bad_at = (8 + 5) * stride + 2;  // sequence 1 (30 tokens), head 5, entry 2
    std::vector<int32_t> bad_idx = idx;
    bad_idx[bad_at] = 30;
    expect_device_error([&] { d_idx.upload(bad_idx); }, sparse, [&] { d_idx.upload(idx); },
                        "indices[" + std::to_string(bad_at) + "] = 30");
    std::vector<int32_t> bad_len = len;
    bad_len[6] = 0;
    expect_device_error([&] { d_len.upload(bad_len); }, sparse, [&] { d_len.upload(len); },
                        "list_len[6] = 0");
  }
}

}  // namespace

// --------------------------------------------------------------------------------------------
// End to end: plan::run against vattn::plan::run (same config, seed, step, layer)

namespace {

// The host copies of the device's rules equal the core functions and the CPU kernels they
// mirror, bit for bit (no GPU needed): stage sizes, sample sizes, budgets, exp, dot products.
TEST(cuda_run, select_math_matches_cpu) {
  namespace cd = cuda::detail;
  const detail::simd_level level = detail::active_simd_level();
  const cd::dot_order order = cd::dot_order_for_level(int32_t(level));
  // exp: the CPU's exp over a range of arguments
  std::vector<float> x;
  for (float v = -90.f; v <= 1.f; v += 0.0137f) x.push_back(v);
  for (float v : {-87.f, -86.99f, 0.f, -0.f, 1e-8f, -1e-8f}) x.push_back(v);
  std::vector<float> e = x;
  detail::exp_inplace(level, e.data(), int64_t(e.size()));
  int64_t exp_bad = 0;
  for (size_t i = 0; i < x.size(); ++i) exp_bad += cd::cpu_exp(x[i]) != e[i];
  if (level != detail::simd_level::scalar) {  // scalar uses std::exp
    EXPECT_EQ(exp_bad, 0);
  }
  // dot products in the CPU's order (row_ops dot_f32 of the active level)
  uint64_t st = 99;
  auto rnd = [&st] {
    st = detail::mix64(st);
    return float(int64_t(st >> 40) - (1 << 23)) / float(1 << 21);
  };
  int64_t dot_bad = 0;
  for (int32_t d : {64, 128})
    for (int rep = 0; rep < 200; ++rep) {
      std::vector<float> q(d), k(d);
      for (int32_t j = 0; j < d; ++j) q[j] = rnd(), k[j] = rnd();
      dot_bad += cd::cpu_order_dot(order, q.data(), k.data(), d) !=
                 detail::active_row_ops().dot_f32(q.data(), k.data(), d);
    }
  EXPECT_EQ(dot_bad, 0) << "level " << detail::simd_level_str(level);
  // stage sizes, sample sizes and budgets
  for (const char* method : {"vattention", "topk", "random", "sink_local"}) {
    config cfg = method_config(method);
    cfg.sink = {16, false};
    cfg.local = {0.01, true};
    cfg.sample_rate = 0.07;
    cd::sel_cfg c{};
    c.sink = cfg.sink.value, c.sink_frac = cfg.sink.fraction;
    c.local = cfg.local.value, c.local_frac = cfg.local.fraction;
    c.topk = cfg.topk.value, c.topk_frac = cfg.topk.fraction;
    c.base = cfg.base.value, c.base_frac = cfg.base.fraction;
    c.sample_rate = cfg.sample_rate, c.eps = cfg.eps, c.delta = cfg.delta;
    c.select = int32_t(cfg.select), c.sample = int32_t(cfg.sample);
    c.z_mode = -detail::normal_quantile(cfg.delta / 2);
    c.z_comb = -detail::normal_quantile(cfg.delta / 4);
    for (int64_t n = 1; n < 300000; n = n * 5 / 4 + 1) {
      const detail::stage_sizes a = detail::resolve_stages(cfg, n);
      const cd::stages b = cd::resolve_stages(c, n);
      ASSERT_EQ(a.n_sink, b.n_sink) << method << " n " << n;
      ASSERT_EQ(a.n_local, b.n_local) << method << " n " << n;
      ASSERT_EQ(a.k, b.k) << method << " n " << n;
      ASSERT_EQ(int32_t(a.dense), b.dense) << method << " n " << n;
      ASSERT_EQ(a.shortlist, b.shortlist) << method << " n " << n;
      for (double r : {1.0, 2.0, 2.5, 64.0}) {  // refine's shortlist (resolve_stages only)
        config cr = cfg;
        cd::sel_cfg ccr = c;
        cr.refine = ccr.refine = r;
        ASSERT_EQ(detail::resolve_stages(cr, n).shortlist, cd::resolve_stages(ccr, n).shortlist)
            << method << " refine " << r << " n " << n;
      }
      ASSERT_EQ(detail::base_sample_size(cfg, n), cd::base_sample_size(c, n));
      ASSERT_EQ(detail::fixed_rate_sample_size(cfg, n), cd::fixed_rate_sample_size(c, n));
    }
  }
  int64_t budgets = 0;
  for (int32_t mode = 0; mode < 4; ++mode)
    for (int rep = 0; rep < 500; ++rep) {
      detail::base_moments mm;
      mm.n_s = 100 + int64_t(detail::mix64(rep) % 100000);
      mm.m = std::min<int64_t>(mm.n_s, 2 + rep % 500);
      mm.d_hat = 1 + std::abs(rnd()) * 100;
      mm.var_e = std::abs(rnd()) * 1e-3 * (rep % 7);
      mm.var_ev = std::abs(rnd()) * 1e-2;
      mm.n_norm2 = std::abs(rnd()) * 10;
      mm.var_eo = std::abs(rnd()) * 1e-3;
      mm.o_norm2 = std::abs(rnd());
      cd::moments dm{mm.n_s,    mm.m,       mm.d_hat,  mm.var_e,
                     mm.var_ev, mm.n_norm2, mm.var_eo, mm.o_norm2};
      cd::sel_cfg c{};
      c.mode = mode, c.eps = 0.05, c.delta = 0.05;
      c.z_mode = -detail::normal_quantile(c.delta / 2);
      c.z_comb = -detail::normal_quantile(c.delta / 4);
      const detail::budget want = detail::compute_budget(budget_mode(mode), c.eps, c.delta, mm);
      ASSERT_EQ(want.b, cd::budget_b(c, dm)) << "mode " << mode << " rep " << rep;
      const double est = cd::est_rel_error(mode, c, c.z_mode, dm, want.b);
      ASSERT_TRUE(est == want.est_rel_error ||
                  std::abs(est - want.est_rel_error) <= 1e-15 * std::abs(want.est_rel_error));
      ++budgets;
    }
  std::printf("[cuda run] select_math at level %s: %zu exp, 400 dots, %lld budgets equal\n",
              detail::simd_level_str(level), x.size(), (long long)budgets);
}

// One GPU run of plan::run over a test batch: output, stats and indices (device -> host).
struct gpu_run_result {
  std::vector<float> out;
  std::vector<head_stats> stats;
  std::vector<int32_t> indices;
};

gpu_run_result run_gpu_e2e(const config& cfg, const batch& b, gpu_batch& g, uint64_t step,
                           const cuda::device_index* index = nullptr, bool graph = false) {
  const cuda::plan p(cuda_params_for(b), cfg);
  dev<uint8_t> ws(p.workspace_bytes());
  const size_t nh = b.seq_len.size() * size_t(b.n_head_q);
  dev<head_stats> stats(nh);
  dev<int32_t> idx(std::vector<int32_t>(nh * size_t(b.n_max()), -7));
  auto a = g.args<cuda::run_args>();
  a.stats = stats.get();
  a.indices = idx.get();
  a.step = step;
  a.index = index;
  g.poison();
  if (graph) {
    cudaStream_t s;
    ck(cudaStreamCreate(&s), "stream");
    cudaGraph_t gr;
    cudaGraphExec_t ex;
    ck(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), "begin capture");
    p.run(a, ws.get(), ws.size(), s);
    ck(cudaStreamEndCapture(s, &gr), "end capture");
    ck(cudaGraphInstantiate(&ex, gr, 0), "instantiate");
    for (int i = 0; i < 3; ++i) ck(cudaGraphLaunch(ex, s), "launch");
    cuda::check_errors(ws.get(), s);
    cudaGraphExecDestroy(ex);
    cudaGraphDestroy(gr);
    cudaStreamDestroy(s);
  } else {
    p.run(a, ws.get(), ws.size(), nullptr);
    cuda::check_errors(ws.get(), nullptr);
  }
  return {g.result(), stats.download(), idx.download()};
}

// Compares the GPU's stats and index lists with the CPU run in b; returns heads compared.
int64_t expect_same_selection(const batch& b, const gpu_run_result& r, double est_tol,
                              int64_t* tokens, int64_t* sampled) {
  const int64_t stride = b.n_max();
  int64_t heads = 0;
  for (size_t hi = 0; hi < b.stats.size(); ++hi) {
    const head_stats &c = b.stats[hi], &g = r.stats[hi];
    SCOPED_TRACE("head " + std::to_string(hi));
    EXPECT_EQ(g.n, c.n);
    EXPECT_EQ(g.n_f, c.n_f);
    EXPECT_EQ(g.n_s, c.n_s);
    EXPECT_EQ(g.m, c.m);
    EXPECT_EQ(g.b, c.b);
    EXPECT_EQ(g.n_sampled, c.n_sampled);
    EXPECT_EQ(g.dense_fallback, c.dense_fallback);
    EXPECT_EQ(g.bytes_kv, c.bytes_kv);
    EXPECT_DOUBLE_EQ(g.density, c.density);
    // est_rel_error: the numerator and output terms use sum_F e v, which the CPU adds in f32
    // chunks and the GPU in double (docs/design/cuda.md): equal to ~1e-8 relative there.
    if (c.est_rel_error <= 0 || std::isinf(c.est_rel_error))
      EXPECT_EQ(g.est_rel_error, c.est_rel_error);
    else
      EXPECT_NEAR(g.est_rel_error, c.est_rel_error, est_tol * c.est_rel_error);
    const int64_t len = c.n_f + c.n_sampled;
    const int32_t* ci = b.indices.data() + hi * stride;
    const int32_t* gi = r.indices.data() + hi * stride;
    int64_t diff = 0;
    for (int64_t j = 0; j < len; ++j) diff += ci[j] != gi[j];
    EXPECT_EQ(diff, 0) << "of " << len << " listed tokens (F " << c.n_f << ")";
    if (len < stride) {
      EXPECT_EQ(gi[len], -7) << "written past the list";
    }
    *tokens += len;
    *sampled += c.n_sampled;
    ++heads;
  }
  return heads;
}

config e2e_config(const std::string& method, bool shared, predictor pred, budget_mode mode,
                  double refine = 0, int32_t bits = 0) {
  config c = method_config(method);
  c.sink = {16, false};
  c.local = {32, false};
  if (c.select == selector::topk) {
    c.topk = {0.05, true};
    c.pred = pred;
    c.refine = refine;
    if (bits > 0) c.pred_bits = bits;
  }
  if (c.sample == sampling::fixed_rate) c.sample_rate = 0.1;
  if (c.sample == sampling::adaptive) c.base = {0.1, true}, c.mode = mode;
  c.gqa_shared = shared;
  c.seed = 77;
  c.layer = 5;
  c.validate();
  return c;
}

struct method_case {
  const char* method;
  bool shared;
  predictor pred;
  budget_mode mode;
  double refine = 0;
  int32_t bits = 0;  // signature bits (0: the config's default)
};
struct data_case {
  std::vector<int32_t> lens;
  dtype type;
  kv_layout layout;
  int32_t hq, hkv, d;
  synth::family fam;
};

// The parity tests' data sets: 7 tokens; a bf16 batch; paged f16 with d = 64; f32 GQA 8:1 with
// uniform logits (exact ties broken by position); 40K tokens. Each test picks the three batches'
// lengths.
std::vector<data_case> parity_datas(std::vector<int32_t> bf16_lens, std::vector<int32_t> paged_lens,
                                    std::vector<int32_t> gqa_lens) {
  const auto cv = synth::family::correlated_values;
  return {
      {{7}, dtype::bf16, kv_layout::contiguous, 8, 2, 128, cv},
      {std::move(bf16_lens), dtype::bf16, kv_layout::contiguous, 8, 2, 128, cv},
      {std::move(paged_lens), dtype::f16, kv_layout::paged, 4, 4, 64, cv},
      {std::move(gqa_lens), dtype::f32, kv_layout::contiguous, 8, 1, 64, synth::family::uniform},
      {{40000}, dtype::bf16, kv_layout::contiguous, 8, 2, 128, cv},
  };
}

// Runs every method over every data set on the CPU path and plan::run, and expects identical
// stats, F, samples and b, and outputs within k_nmse_bound of the CPU's.
void expect_cpu_parity(const std::vector<method_case>& methods, const std::vector<data_case>& datas,
                       const char* what) {
  double worst = 0;
  int64_t heads = 0, tokens = 0, sampled = 0;
  int cases = 0;
  for (const data_case& dc : datas) {
    batch b0 = make_batch(dc.fam, dc.lens, dc.hq, dc.hkv, dc.d, dc.type, dc.layout, 5, 16);
    gpu_batch g(b0);
    for (const method_case& mc : methods) {
      const config cfg = e2e_config(mc.method, mc.shared, mc.pred, mc.mode, mc.refine, mc.bits);
      SCOPED_TRACE(cfg.to_string() + " lens[0] " + std::to_string(dc.lens[0]) + " " +
                   dtype_name(dc.type));
      batch b = b0;
      const uint64_t step = 9;
      run_args ca = b.args(step);
      std::unique_ptr<predictor_index> ix;
      std::unique_ptr<cuda::device_index> dix;
      if (cfg.select == selector::topk && cfg.pred != predictor::oracle) {
        ix = std::make_unique<predictor_index>(cfg, cpu_params_for(b));
        ix->update(ca.kv);
        ca.index = ix.get();
        dix = std::make_unique<cuda::device_index>(*ix);
      }
      vattn::plan cp(cfg, cpu_params_for(b));
      aligned_buffer cws(cp.workspace_bytes());
      cp.run(ca, cws.data(), cws.size());
      const std::vector<float> cpu(b.out.begin(), b.out.end() - 16);
      const gpu_run_result r = run_gpu_e2e(cfg, b, g, step, dix.get());
      ASSERT_TRUE(all_finite(r.out));
      const double est_tol = cfg.mode == budget_mode::denominator ? 1e-9 : 1e-6;
      heads += expect_same_selection(b, r, est_tol, &tokens, &sampled);
      const double e = test::nmse(r.out.data(), cpu.data(), cpu.size());
      EXPECT_LT(e, k_nmse_bound);
      worst = std::max(worst, e);
      ++cases;
    }
  }
  std::printf(
      "[cuda run] %s: %d cases, %lld heads: identical F, samples and b (%lld listed tokens, "
      "%lld sampled); worst output NMSE vs CPU %.2e\n",
      what, cases, (long long)heads, (long long)tokens, (long long)sampled, worst);
}

// The GPU selects, samples and budgets exactly as the CPU: identical F (including ties broken
// by position), identical sampled tokens in draw order, identical m and b, for top-k, vAttention
// (oracle and sign-bit predictor, every budget mode, gqa_shared on and off), top-k with sign bits
// per kv group (gqa_shared) and fixed-rate sampling, over short (dense fallback), mid and long
// (40K) sequences and mixed batches; the output matches the CPU's.
TEST(cuda_run, same_index_sets_as_cpu) {
  REQUIRE_GPU();
  const std::vector<method_case> methods = {
      {"topk", false, predictor::oracle, budget_mode::denominator},
      {"vattention", false, predictor::oracle, budget_mode::denominator},
      {"vattention", true, predictor::oracle, budget_mode::denominator},
      {"vattention", false, predictor::oracle, budget_mode::output},
      {"vattention", true, predictor::oracle, budget_mode::combined},
      {"vattention", false, predictor::sign_bits, budget_mode::denominator},
      {"vattention", true, predictor::sign_bits, budget_mode::numerator},
      {"topk", true, predictor::sign_bits, budget_mode::denominator},
      {"random", false, predictor::oracle, budget_mode::denominator},
  };
  const std::vector<data_case> datas = parity_datas({3000}, {5000, 300, 7, 1200}, {2000, 2500});
  expect_cpu_parity(methods, datas, "same_index_sets_as_cpu");
}

// refine with the sign predictor (config::refine): refine = 1 with gqa_shared (one select per kv
// group over the heads' maximum score, no logits), refine = 2 with gqa_shared (a shortlist of 2k
// per group, each head's k best exact logits among it) and refine = 2.5 per head, top-k alone and
// vAttention; signatures of 32, 96, 128 and 256 bits besides the default; awkward lengths (around
// the 2048-position chunks, short sequences whose shortlist is most of the middle, a dense
// fallback), paged f16 d = 64, f32 GQA 8:1 with uniform logits (exact ties broken by position),
// 40K tokens. Identical F, samples, b and stats to the CPU.
TEST(cuda_run, refine_same_index_sets_as_cpu) {
  REQUIRE_GPU();
  const std::vector<method_case> methods = {
      {"topk", true, predictor::sign_bits, budget_mode::denominator, 1},
      {"vattention", true, predictor::sign_bits, budget_mode::denominator, 1},
      {"topk", true, predictor::sign_bits, budget_mode::denominator, 2},
      {"vattention", true, predictor::sign_bits, budget_mode::numerator, 2},
      {"topk", false, predictor::sign_bits, budget_mode::denominator, 2.5},
      {"vattention", false, predictor::sign_bits, budget_mode::denominator, 2.5},
      {"topk", false, predictor::sign_bits, budget_mode::denominator, 1},
      {"vattention", true, predictor::sign_bits, budget_mode::denominator, 40},
      // signatures of 1, 3, 4 and 8 words besides the default 2: the scoring kernel's 4-, 8- and
      // 16-byte loads (its instances for 5, 6 and 7 words use the same loads), 128 bits is the
      // benchmarks', one score row per kv group at 128 bits
      {"topk", true, predictor::sign_bits, budget_mode::denominator, 1, 128},
      {"vattention", false, predictor::sign_bits, budget_mode::denominator, 0, 96},
      {"topk", false, predictor::sign_bits, budget_mode::denominator, 0, 256},
      {"vattention", true, predictor::sign_bits, budget_mode::denominator, 0, 32},
  };
  const std::vector<data_case> datas =
      parity_datas({6143, 97, 2049, 1, 50}, {5000, 300, 7, 1201}, {2000, 2501});
  expect_cpu_parity(methods, datas, "refine_same_index_sets_as_cpu");
}

// A replayed graph gave exactly the direct run's output, indices and stats.
void expect_same_result(const gpu_run_result& direct, const gpu_run_result& replay) {
  ASSERT_EQ(direct.out.size(), replay.out.size());
  EXPECT_EQ(std::memcmp(direct.out.data(), replay.out.data(), direct.out.size() * 4), 0);
  EXPECT_EQ(direct.indices, replay.indices);
  for (size_t i = 0; i < direct.stats.size(); ++i) {
    EXPECT_EQ(direct.stats[i].b, replay.stats[i].b);
    EXPECT_EQ(direct.stats[i].n_f, replay.stats[i].n_f);
  }
}

// A captured run replays to exactly the direct run's output, stats and indices.
TEST(cuda_run, graph_capture_replays_the_same_result) {
  REQUIRE_GPU();
  for (bool shared : {false, true}) {
    const config cfg =
        e2e_config("vattention", shared, predictor::oracle, budget_mode::denominator);
    batch b = make_batch(synth::family::correlated_values, {6000, 900}, 8, 2, 128, dtype::bf16,
                         kv_layout::paged, 8, 16);
    gpu_batch g(b);
    const gpu_run_result direct = run_gpu_e2e(cfg, b, g, 4);
    const gpu_run_result replay = run_gpu_e2e(cfg, b, g, 4, nullptr, true);
    expect_same_result(direct, replay);
  }
}

// refine = 2 with gqa_shared (the refine kernels in the graph): a captured run replays to
// exactly the direct run's output, stats and indices.
TEST(cuda_run, refine_graph_capture_replays_the_same_result) {
  REQUIRE_GPU();
  const config cfg =
      e2e_config("vattention", true, predictor::sign_bits, budget_mode::denominator, 2);
  batch b = make_batch(synth::family::correlated_values, {6000, 900}, 8, 2, 128, dtype::bf16,
                       kv_layout::paged, 8, 16);
  gpu_batch g(b);
  predictor_index ix(cfg, cpu_params_for(b));
  ix.update(b.args().kv);
  const cuda::device_index dix(ix);
  const gpu_run_result direct = run_gpu_e2e(cfg, b, g, 4, &dix);
  const gpu_run_result replay = run_gpu_e2e(cfg, b, g, 4, &dix, true);
  expect_same_result(direct, replay);
}

// Bad configurations and arguments raise vattn::error (host), bad device values are reported by
// check_errors.
TEST(cuda_run, bad_inputs) {
  cuda::params p;
  p.n_head_q = 8, p.n_head_kv = 2, p.head_dim = 128, p.n_tokens_max = 1000;
  expect_error([&] { cuda::plan x(p, method_config("topp")); }, "topp");
  expect_error([&] { cuda::plan x(p, method_config("hub")); }, "hub");
  expect_error([&] { cuda::plan x(p, parse_config("method=vattention,predictor=pages")); },
               "pages");
  expect_error([&] { cuda::plan x(p, parse_config("method=vattention,eps=2")); }, "eps");
  expect_error([&] { cuda::plan x(p, parse_config("method=vattention,predictor=pages,refine=2")); },
               "refine with predictor=pages");
  REQUIRE_GPU();
  const config signs = e2e_config("vattention", false, predictor::sign_bits, budget_mode::output);
  batch b = make_batch(synth::family::correlated_values, {900, 500}, 8, 2, 128, dtype::bf16,
                       kv_layout::contiguous, 2);
  gpu_batch g(b);
  const cuda::plan pl(cuda_params_for(b), signs);
  dev<uint8_t> ws(pl.workspace_bytes());
  auto a = g.args<cuda::run_args>();
  expect_error([&] { pl.run(a, ws.get(), ws.size(), nullptr); }, "index is null");
  expect_error([&] { pl.run(a, ws.get(), 16, nullptr); }, "workspace_size");
  // an index one token short of the cache
  batch shorter = b;
  shorter.seq_len[1] -= 1;
  predictor_index ix(signs, cpu_params_for(b));
  ix.update(shorter.args().kv);
  cuda::device_index dix(ix);
  a.index = &dix;
  pl.run(a, ws.get(), ws.size(), nullptr);
  expect_error([&] { cuda::check_errors(ws.get(), nullptr); }, "slot 1 holds 499 tokens");
  ix.update(b.args().kv);
  dix.upload(ix);
  pl.run(a, ws.get(), ws.size(), nullptr);
  cuda::check_errors(ws.get(), nullptr);  // clean run clears the record
  // a bad seq_len on the device
  const config oracle =
      e2e_config("vattention", false, predictor::oracle, budget_mode::denominator);
  const cuda::plan po(cuda_params_for(b), oracle);
  dev<uint8_t> ws2(po.workspace_bytes());
  dev<int32_t> bad_len(std::vector<int32_t>{900, 5000});
  cuda::run_args a2 = a;
  a2.index = nullptr;
  a2.kv.seq_len = bad_len.get();
  po.run(a2, ws2.get(), ws2.size(), nullptr);
  expect_error([&] { cuda::check_errors(ws2.get(), nullptr); }, "kv.seq_len[1] = 5000");
  // NaN in K
  batch nan_b = b;
  const size_t at = (size_t(700) * b.n_head_kv + 1) * b.d + 3;  // seq 0, token 700, kv head 1
  test::store(nan_b.k, at, std::nanf(""), b.type);
  gpu_batch gn(nan_b);
  a2.kv = gn.kv;
  a2.q = gn.q.get();
  a2.out = gn.out.get();
  po.run(a2, ws2.get(), ws2.size(), nullptr);
  expect_error([&] { cuda::check_errors(ws2.get(), nullptr); }, "token 700, kv head 1");
}

}  // namespace
