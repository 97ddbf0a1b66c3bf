// bench_cuda.cpp: times the CUDA backend's dense decode attention (and the sparse kernel over 5%
// of the tokens) at Llama-3.1-8B layer shapes against the device-to-device copy bandwidth
// measured in the same run. Median of repeated runs timed with CUDA events; inputs rotate over
// copies so each run reads device memory, not L2.
//
// End-to-end rows (plan::run): vAttention with the paper's config (sink 128, local 128, top-k 5%,
// base 5%, eps = delta = 0.05, denominator mode), per head and gqa_shared, and top-k alone, with
// the oracle predictor and with 128 sign bits: time, speed-up over dense, mean density, the
// relative output error against the dense output of the same inputs (mean and max over heads),
// and the median time of each stage (events between the stages).
//
// Decode-step rows (variant 6): one decode step of a 32-layer model's attention, every layer's
// plan::run (its own K and V, its layer index in the sampling key) captured in ONE CUDA graph and
// replayed; dense the same way (plan without a config), (step 6) top-k 5% with the sign
// predictor, and (step 9) the same with gqa_shared and refine = 1 (one select of 5% per kv
// group); median of 20 replays. Only where 32 layers' K and V fit in 48 GiB (batch 1 to 128K).
//
// Usage: bench_cuda [contexts] [batches] [end-to-end variants], e.g. bench_cuda 8192,32768,131072
// 1,16 0,3 (variants: 0 vattention, 1 vattention gqa_shared, 2 oracle top-k, 3-5 the same with
// the sign-bit predictor, 6 the 32-layer decode step, 7 sign-bit top-k with gqa_shared (one list
// per kv group: the union of its heads' top 5%), 8-11 sign-bit top-k and vAttention with
// gqa_shared and refine (config::refine): 8 top-k refine=1 (one select of 5% per kv group over
// the heads' maximum sign score), 9 top-k refine=2 (a shortlist of 10% per kv group, each head's
// 5% best exact logits among it), 10 and 11 vAttention the same; default all).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/dtype.hpp"
#include "cpu/predictors.hpp"
#include "cuda/cuda_attention.hpp"

namespace {

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> v;
  for (const char* p = s; *p;) {
    v.push_back(std::atoll(p));
    while (*p && *p != ',') ++p;
    if (*p == ',') ++p;
  }
  return v;
}

// Median time in microseconds of `reps` runs of fn(rep) after `warm` untimed ones.
template <typename F>
double median_us(int warm, int reps, F&& fn) {
  cudaEvent_t e0, e1;
  ck(cudaEventCreate(&e0), "event");
  ck(cudaEventCreate(&e1), "event");
  std::vector<float> ms;
  for (int r = 0; r < warm + reps; ++r) {
    ck(cudaEventRecord(e0), "record");
    fn(r);
    ck(cudaEventRecord(e1), "record");
    ck(cudaEventSynchronize(e1), "sync");
    float t = 0;
    ck(cudaEventElapsedTime(&t, e0, e1), "elapsed");
    if (r >= warm) ms.push_back(t);
  }
  ck(cudaGetLastError(), "runs");
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(ms.begin(), ms.end());
  return 1e3 * ms[ms.size() / 2];
}

constexpr int64_t k_tile_rows = 8192;  // fill_bf16's tile in rows of 8 kv heads x 128 dims

// Fills `bytes` of device memory with bf16 values ~ N(mean, sd) (a 16 MiB host tile repeated).
void fill_bf16(void* dst, size_t bytes, uint32_t seed, float mean, float sd) {
  const size_t tile = std::min<size_t>(bytes, size_t(16) << 20) / 2;
  std::vector<uint16_t> h(tile);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(mean, sd);
  for (auto& x : h) x = vattn::detail::f32_to_bf16(nd(rng));
  char* p = static_cast<char*>(dst);
  for (size_t off = 0; off < bytes; off += tile * 2)
    ck(cudaMemcpy(p + off, h.data(), std::min(tile * 2, bytes - off), cudaMemcpyHostToDevice),
       "fill");
}

// Events around the stages of plan::run (its stage_hook), on the legacy default stream: event 0
// before the run, event i + 1 after stage i; per stage the median time over the runs kept.
struct stage_timer {
  std::vector<std::string> names;
  std::vector<cudaEvent_t> ev;
  std::vector<std::vector<float>> ms;  // [stage][run]
  size_t at = 0;                       // the next event to record

  static void hook(const char* stage, void* ctx) {
    auto* t = static_cast<stage_timer*>(ctx);
    if (t->names.size() < t->at) t->names.emplace_back(stage);
    t->record();
  }
  void record() {
    if (ev.size() <= at) {
      ev.emplace_back();
      ck(cudaEventCreate(&ev.back()), "event");
    }
    ck(cudaEventRecord(ev[at]), "record");
    ++at;
  }
  void begin() {
    at = 0;
    record();
  }
  void end(bool keep) {
    ck(cudaEventSynchronize(ev[at - 1]), "sync");
    if (!keep) return;
    if (ms.size() < at - 1) ms.resize(at - 1);
    for (size_t i = 1; i < at; ++i) {
      float t = 0;
      ck(cudaEventElapsedTime(&t, ev[i - 1], ev[i]), "elapsed");
      ms[i - 1].push_back(t);
    }
  }
  std::string summary() {
    std::string out;
    for (size_t i = 0; i < ms.size() && i < names.size(); ++i) {
      std::sort(ms[i].begin(), ms[i].end());
      char buf[96];
      std::snprintf(buf, sizeof buf, "%s%s %.1f", i ? ", " : "", names[i].c_str(),
                    1e3 * ms[i][ms[i].size() / 2]);
      out += buf;
    }
    for (cudaEvent_t e : ev) cudaEventDestroy(e);
    ev.clear();
    return out;
  }
};

// The device mirror of a sign-bit index for `batch` sequences of n tokens whose K (bf16,
// [row, kv head, d], packed) repeats every k_tile_rows rows: one tile's signatures computed by
// the CPU's predictor_index, copied to every tile of every sequence (filled directly: a bench
// shortcut; a real caller uses device_index::upload after predictor_index::update).
std::unique_ptr<vattn::cuda::device_index> sign_mirror(const vattn::config& cfg, const void* k,
                                                       int32_t batch, int64_t n, int32_t hq,
                                                       int32_t hkv, int32_t d) {
  vattn::plan_params tp;
  tp.n_seq_max = 1, tp.n_head_q = hq, tp.n_head_kv = hkv, tp.head_dim = d;
  tp.n_tokens_max = k_tile_rows, tp.kv_type = vattn::dtype::bf16;
  vattn::predictor_index tile(cfg, tp);
  std::vector<uint16_t> hk(size_t(k_tile_rows) * hkv * d);
  ck(cudaMemcpy(hk.data(), k, hk.size() * 2, cudaMemcpyDeviceToHost), "download");
  const int32_t len = k_tile_rows;
  vattn::kv_cache kv;
  kv.type = vattn::dtype::bf16;
  kv.n_head_kv = hkv, kv.head_dim = d, kv.n_seq = 1, kv.seq_len = &len;
  kv.n_rows = k_tile_rows, kv.k = hk.data(), kv.v = hk.data();
  tile.update(kv);
  vattn::plan_params fp = tp;
  fp.n_seq_max = batch, fp.n_tokens_max = n;
  const vattn::predictor_index full(cfg, fp);  // same seed and shapes: the same projections
  auto dix = std::make_unique<vattn::cuda::device_index>(full);
  const std::vector<uint32_t>& sig = tile.data().sig;
  const size_t words = size_t(cfg.pred_bits / 32);
  uint32_t* dst = const_cast<uint32_t*>(dix->signatures());
  for (int32_t s = 0; s < batch; ++s)
    for (int32_t h = 0; h < hkv; ++h)
      for (int64_t t0 = 0; t0 < n; t0 += k_tile_rows)
        ck(cudaMemcpy(dst + ((size_t(s) * hkv + h) * n + t0) * words,
                      sig.data() + size_t(h) * k_tile_rows * words, k_tile_rows * words * 4,
                      cudaMemcpyHostToDevice),
           "signatures");
  const std::vector<int64_t> counts(batch, n);
  ck(cudaMemcpy(const_cast<int64_t*>(dix->counts()), counts.data(), counts.size() * 8,
                cudaMemcpyHostToDevice),
     "counts");
  return dix;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const std::vector<int64_t> contexts = parse_list(argc > 1 ? argv[1] : "8192,32768,131072");
  const std::vector<int64_t> batches = parse_list(argc > 2 ? argv[2] : "1,16");
  const std::vector<int64_t> pick = parse_list(argc > 3 ? argv[3] : "0,1,2,3,4,5,6,7,8,9,10,11");
  auto picked = [&](size_t v) { return std::count(pick.begin(), pick.end(), int64_t(v)) > 0; };
  const int32_t n_head_q = 32, n_head_kv = 8, d = 128;  // Llama-3.1-8B, one layer
  const double density = 0.05;

  cudaDeviceProp prop;
  ck(cudaGetDeviceProperties(&prop, 0), "device");
  int driver = 0;
  ck(cudaDriverGetVersion(&driver), "driver");
  std::printf("device: %s, %d SMs, L2 %d MB, driver API %d\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20, driver);

  // Copy bandwidth: a 2 GiB device-to-device copy, bytes read + written.
  double copy_gbs = 0;
  {
    const size_t bytes = size_t(2) << 30;
    void *a = nullptr, *b = nullptr;
    ck(cudaMalloc(&a, bytes), "malloc");
    ck(cudaMalloc(&b, bytes), "malloc");
    ck(cudaMemset(a, 1, bytes), "memset");
    const double us = median_us(
        3, 20, [&](int) { ck(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice), "copy"); });
    copy_gbs = 2.0 * bytes / (us * 1e-6) / 1e9;
    std::printf("device copy: %.0f GB/s (read + write, 2 GiB, median of 20)\n\n", copy_gbs);
    cudaFree(a);
    cudaFree(b);
  }

  std::printf("%8s %5s %6s | %9s %8s %7s | %9s %8s %8s\n", "context", "batch", "splits", "dense us",
              "GB/s", "%copy", "sparse us", "GB/s", "speedup");
  for (int64_t n : contexts) {
    for (int64_t batch : batches) {
      // Queries seeded by the cell alone, so a cell's rows do not depend on the cells before it.
      std::mt19937 rng(uint32_t(7 + 1000003 * n + batch));
      const size_t rows = size_t(batch) * n;
      const size_t kv_bytes = rows * n_head_kv * d * 2;  // one of K, V
      // Enough copies that the rotation spans at least 512 MiB (well past the 50 MB L2).
      const int copies = int(std::max<size_t>(1, (size_t(512) << 20) / (2 * kv_bytes) + 1));
      void *k = nullptr, *v = nullptr;
      ck(cudaMalloc(&k, kv_bytes * copies), "malloc k");
      ck(cudaMalloc(&v, kv_bytes * copies), "malloc v");
      fill_bf16(k, kv_bytes * copies, 11, 0.f, 1.f);
      fill_bf16(v, kv_bytes * copies, 12, 1.f, 0.5f);
      std::vector<float> hq(size_t(batch) * n_head_q * d);
      std::normal_distribution<float> nd(0.f, 1.f);
      for (auto& x : hq) x = 2.f * nd(rng);
      std::vector<int32_t> hlen(batch, int32_t(n));
      // Sparse lists, one per (sequence, kv group): 5% of the tokens, sorted, weight 1 for every
      // fifth (as deterministic tokens) and 1 / density for the rest (as sampled ones).
      const int64_t len = std::max<int64_t>(1, int64_t(density * n));
      std::vector<int32_t> hidx(size_t(batch) * n_head_kv * len), hll(batch * n_head_kv, len);
      std::vector<float> hw(hidx.size());
      std::vector<int32_t> pick(n);
      for (size_t g = 0; g < size_t(batch) * n_head_kv; ++g) {
        for (int64_t i = 0; i < n; ++i) pick[i] = int32_t(i);
        for (int64_t i = 0; i < len; ++i) std::swap(pick[i], pick[i + rng() % (n - i)]);
        std::sort(pick.begin(), pick.begin() + len);
        for (int64_t i = 0; i < len; ++i) {
          hidx[g * len + i] = pick[i];
          hw[g * len + i] = i % 5 == 0 ? 1.f : float(1.0 / density);
        }
      }
      float *q = nullptr, *out = nullptr, *w = nullptr;
      int32_t *seq_len = nullptr, *idx = nullptr, *ll = nullptr;
      ck(cudaMalloc(&q, hq.size() * 4), "malloc");
      ck(cudaMalloc(&out, hq.size() * 4), "malloc");
      ck(cudaMalloc(&seq_len, hlen.size() * 4), "malloc");
      ck(cudaMalloc(&idx, hidx.size() * 4), "malloc");
      ck(cudaMalloc(&w, hw.size() * 4), "malloc");
      ck(cudaMalloc(&ll, hll.size() * 4), "malloc");
      ck(cudaMemcpy(q, hq.data(), hq.size() * 4, cudaMemcpyHostToDevice), "upload");
      ck(cudaMemcpy(seq_len, hlen.data(), hlen.size() * 4, cudaMemcpyHostToDevice), "upload");
      ck(cudaMemcpy(idx, hidx.data(), hidx.size() * 4, cudaMemcpyHostToDevice), "upload");
      ck(cudaMemcpy(w, hw.data(), hw.size() * 4, cudaMemcpyHostToDevice), "upload");
      ck(cudaMemcpy(ll, hll.data(), hll.size() * 4, cudaMemcpyHostToDevice), "upload");

      vattn::cuda::params p;
      p.n_seq_max = int32_t(batch);
      p.n_head_q = n_head_q;
      p.n_head_kv = n_head_kv;
      p.head_dim = d;
      p.n_tokens_max = n;
      p.kv_type = vattn::dtype::bf16;
      const vattn::cuda::plan pl(p);
      void* ws = nullptr;
      ck(cudaMalloc(&ws, pl.workspace_bytes()), "malloc ws");

      vattn::cuda::dense_args da;
      da.n_head_q = n_head_q;
      da.q = q;
      da.kv.type = vattn::dtype::bf16;
      da.kv.n_head_kv = n_head_kv;
      da.kv.head_dim = d;
      da.kv.n_seq = int32_t(batch);
      da.kv.seq_len = seq_len;
      da.kv.n_rows = int64_t(rows);
      da.out = out;
      vattn::cuda::sparse_args sa;
      sa.n_head_q = n_head_q;
      sa.q = q;
      sa.kv = da.kv;
      sa.per_group = true;
      sa.indices = idx;
      sa.weights = w;
      sa.list_len = ll;
      sa.list_stride = len;
      sa.out = out;
      auto at = [&](void* base, int c) { return static_cast<const char*>(base) + c * kv_bytes; };
      const double dense_us = median_us(5, 30, [&](int r) {
        da.kv.k = at(k, r % copies), da.kv.v = at(v, r % copies);
        pl.dense(da, ws, pl.workspace_bytes(), nullptr);
      });
      vattn::cuda::check_errors(ws, nullptr);
      const double sparse_us = median_us(5, 30, [&](int r) {
        sa.kv.k = at(k, r % copies), sa.kv.v = at(v, r % copies);
        pl.sparse(sa, ws, pl.workspace_bytes(), nullptr);
      });
      vattn::cuda::check_errors(ws, nullptr);
      // end to end, after the dense reference output of copy 0
      std::vector<float> ref(hq.size()), got(hq.size());
      da.kv.k = at(k, 0), da.kv.v = at(v, 0);
      pl.dense(da, ws, pl.workspace_bytes(), nullptr);
      ck(cudaMemcpy(ref.data(), out, ref.size() * 4, cudaMemcpyDeviceToHost), "download");
      struct e2e_row {
        std::string name;
        double us, density, err_mean, err_max;
        std::string stages;
      };
      std::vector<e2e_row> e2e;
      // The sign-bit mirror: K repeats every k_tile_rows rows (fill_bf16's tile, each sequence
      // starting on a tile), so the signatures of one tile, computed once on the CPU, are every
      // sequence's; they are copied into the device mirror directly (bench only).
      vattn::config sign_cfg = vattn::method_config("vattention");
      sign_cfg.pred = vattn::predictor::sign_bits;
      sign_cfg.pred_bits = 128;
      std::unique_ptr<vattn::cuda::device_index> dix;
      if (n % k_tile_rows == 0)
        dix = sign_mirror(sign_cfg, k, int32_t(batch), n, n_head_q, n_head_kv, d);
      struct variant {
        int id;  // the command line's variant number (6 is the decode step)
        const char* name;
        const char* method;
        bool shared, signs;
        double refine;
      };
      const variant variants[] = {
          {0, "vattention", "vattention", false, false, 0},
          {1, "vattention gqa_shared", "vattention", true, false, 0},
          {2, "topk (oracle 5%)", "topk", false, false, 0},
          {3, "vattention signs", "vattention", false, true, 0},
          {4, "vattention signs gqa_shared", "vattention", true, true, 0},
          {5, "topk (signs 5%)", "topk", false, true, 0},
          {7, "topk (signs 5%) gqa_shared", "topk", true, true, 0},
          {8, "topk (signs 5%) gqa refine=1", "topk", true, true, 1},
          {9, "topk (signs 5%) gqa refine=2", "topk", true, true, 2},
          {10, "vattention signs gqa refine=1", "vattention", true, true, 1},
          {11, "vattention signs gqa refine=2", "vattention", true, true, 2}};
      for (const variant& vr : variants) {
        if (!picked(size_t(vr.id)) || (vr.signs && !dix)) continue;
        vattn::config cfg = vattn::method_config(vr.method);
        cfg.gqa_shared = vr.shared;
        if (vr.signs) cfg.pred = sign_cfg.pred, cfg.pred_bits = sign_cfg.pred_bits;
        cfg.refine = vr.refine;
        const vattn::cuda::plan pv(p, cfg);
        void* wsv = nullptr;
        ck(cudaMalloc(&wsv, pv.workspace_bytes()), "malloc ws");
        vattn::head_stats* st = nullptr;
        const size_t nh = size_t(batch) * n_head_q;
        ck(cudaMalloc(&st, nh * sizeof(vattn::head_stats)), "malloc stats");
        vattn::cuda::run_args ra;
        ra.n_head_q = n_head_q;
        ra.q = q;
        ra.kv = da.kv;
        ra.out = out;
        ra.index = vr.signs ? dix.get() : nullptr;
        const double us = median_us(3, 15, [&](int r) {
          ra.kv.k = at(k, r % copies), ra.kv.v = at(v, r % copies);
          pv.run(ra, wsv, pv.workspace_bytes(), nullptr);
        });
        // where the time goes: an event after each stage (run_args::stage_hook)
        stage_timer tm;
        ra.stage_hook = &stage_timer::hook;
        ra.stage_ctx = &tm;
        for (int r = 0; r < 12; ++r) {
          ra.kv.k = at(k, r % copies), ra.kv.v = at(v, r % copies);
          tm.begin();
          pv.run(ra, wsv, pv.workspace_bytes(), nullptr);
          tm.end(r >= 2);
        }
        ra.stage_hook = nullptr;
        ra.kv.k = at(k, 0), ra.kv.v = at(v, 0);
        ra.stats = st;
        pv.run(ra, wsv, pv.workspace_bytes(), nullptr);
        vattn::cuda::check_errors(wsv, nullptr);
        std::vector<vattn::head_stats> hs(nh);
        ck(cudaMemcpy(hs.data(), st, nh * sizeof(vattn::head_stats), cudaMemcpyDeviceToHost),
           "download");
        ck(cudaMemcpy(got.data(), out, got.size() * 4, cudaMemcpyDeviceToHost), "download");
        e2e_row row{vr.name, us, 0, 0, 0, tm.summary()};
        for (size_t h = 0; h < nh; ++h) {
          double num = 0, den = 0;
          for (int32_t j = 0; j < d; ++j) {
            const double e = double(got[h * d + j]) - ref[h * d + j];
            num += e * e;
            den += double(ref[h * d + j]) * ref[h * d + j];
          }
          const double err = std::sqrt(num / den);
          row.err_mean += err / double(nh);
          row.err_max = std::max(row.err_max, err);
          row.density += hs[h].density / double(nh);
        }
        e2e.push_back(row);
        cudaFree(st);
        cudaFree(wsv);
      }
      // One decode step of 32 layers in one graph (dense, vAttention with the oracle, (step 6)
      // top-k 5% with the sign predictor, and (step 9) the same with gqa_shared and refine = 1:
      // one select of 5% per kv group; every layer's K is the same data, so one sign mirror
      // serves every layer).
      constexpr int n_layers = 32;
      double step_us[4] = {0, 0, 0, 0};
      if (picked(6) && size_t(n_layers) * 2 * kv_bytes <= (size_t(48) << 30)) {
        std::vector<void*> lk(n_layers), lv(n_layers);
        for (int l = 0; l < n_layers; ++l) {
          ck(cudaMalloc(&lk[l], kv_bytes), "malloc layer k");
          ck(cudaMalloc(&lv[l], kv_bytes), "malloc layer v");
          ck(cudaMemcpy(lk[l], k, kv_bytes, cudaMemcpyDeviceToDevice), "layer k");
          ck(cudaMemcpy(lv[l], v, kv_bytes, cudaMemcpyDeviceToDevice), "layer v");
        }
        cudaStream_t cs = nullptr;
        ck(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking), "stream");
        cudaEvent_t e0, e1;
        ck(cudaEventCreate(&e0), "event");
        ck(cudaEventCreate(&e1), "event");
        for (int m = 0; m < (dix ? 4 : 2); ++m) {
          std::vector<std::unique_ptr<vattn::cuda::plan>> plans;
          size_t ws_need = 0;
          for (int l = 0; l < n_layers; ++l) {
            vattn::config cfg = vattn::method_config(m >= 2 ? "topk" : "vattention");
            if (m >= 2) cfg.pred = sign_cfg.pred, cfg.pred_bits = sign_cfg.pred_bits;
            if (m == 3) cfg.gqa_shared = true, cfg.refine = 1;
            cfg.layer = l;
            plans.push_back(m ? std::make_unique<vattn::cuda::plan>(p, cfg)
                              : std::make_unique<vattn::cuda::plan>(p));
            ws_need = std::max(ws_need, plans.back()->workspace_bytes());
          }
          void* wsg = nullptr;
          ck(cudaMalloc(&wsg, ws_need), "malloc ws");
          vattn::cuda::run_args ra;
          ra.n_head_q = n_head_q;
          ra.q = q;
          ra.kv = da.kv;
          ra.out = out;
          ra.index = m >= 2 ? dix.get() : nullptr;
          cudaGraph_t g = nullptr;
          cudaGraphExec_t ge = nullptr;
          ck(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal), "capture");
          for (int l = 0; l < n_layers; ++l) {
            ra.kv.k = lk[l], ra.kv.v = lv[l];
            plans[l]->run(ra, wsg, ws_need, cs);
          }
          ck(cudaStreamEndCapture(cs, &g), "capture");
          ck(cudaGraphInstantiate(&ge, g, 0), "instantiate");
          std::vector<float> ms;
          for (int r = 0; r < 25; ++r) {
            ck(cudaEventRecord(e0, cs), "record");
            ck(cudaGraphLaunch(ge, cs), "graph launch");
            ck(cudaEventRecord(e1, cs), "record");
            ck(cudaEventSynchronize(e1), "sync");
            float t = 0;
            ck(cudaEventElapsedTime(&t, e0, e1), "elapsed");
            if (r >= 5) ms.push_back(t);
          }
          vattn::cuda::check_errors(wsg, cs);
          std::sort(ms.begin(), ms.end());
          step_us[m] = 1e3 * ms[ms.size() / 2];
          cudaGraphExecDestroy(ge);
          cudaGraphDestroy(g);
          cudaFree(wsg);
        }
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
        cudaStreamDestroy(cs);
        for (int l = 0; l < n_layers; ++l) cudaFree(lk[l]), cudaFree(lv[l]);
      }
      const double dense_gbs = 2.0 * kv_bytes / (dense_us * 1e-6) / 1e9;
      const double sparse_gbs = 2.0 * batch * n_head_kv * len * d * 2 / (sparse_us * 1e-6) / 1e9;
      std::printf("%8lld %5lld %6d | %9.1f %8.0f %6.1f%% | %9.1f %8.0f %7.1fx\n", (long long)n,
                  (long long)batch, pl.dense_splits(int32_t(batch)), dense_us, dense_gbs,
                  100.0 * dense_gbs / copy_gbs, sparse_us, sparse_gbs, dense_us / sparse_us);
      for (const e2e_row& r : e2e) {
        std::printf(
            "%8s %5s %6s |   e2e %-30s %9.1f us %6.2fx  density %.3f  rel err mean "
            "%.4f max %.4f\n",
            "", "", "", r.name.c_str(), r.us, dense_us / r.us, r.density, r.err_mean, r.err_max);
        std::printf("%8s %5s %6s |       stages (median us): %s\n", "", "", "", r.stages.c_str());
      }
      if (step_us[0] > 0)
        std::printf(
            "%8s %5s %6s |   decode step, %d layers in one CUDA graph: dense %.1f us, vattention "
            "%.1f us (%.1f us per layer), %.2fx\n",
            "", "", "", n_layers, step_us[0], step_us[1], step_us[1] / n_layers,
            step_us[0] / step_us[1]);
      if (step_us[2] > 0)
        std::printf(
            "%8s %5s %6s |   decode step, %d layers in one CUDA graph: topk (signs 5%%) %.1f us "
            "(%.1f us per layer), %.2fx dense\n",
            "", "", "", n_layers, step_us[2], step_us[2] / n_layers, step_us[0] / step_us[2]);
      if (step_us[3] > 0)
        std::printf(
            "%8s %5s %6s |   decode step, %d layers in one CUDA graph: topk (signs 5%%) gqa "
            "refine=1 %.1f us (%.1f us per layer), %.2fx dense\n",
            "", "", "", n_layers, step_us[3], step_us[3] / n_layers, step_us[0] / step_us[3]);
      for (void* ptr : {static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(q),
                        static_cast<void*>(out), static_cast<void*>(seq_len),
                        static_cast<void*>(idx), static_cast<void*>(w), static_cast<void*>(ll), ws})
        cudaFree(ptr);
    }
  }
  std::printf(
      "\nGB/s: K and V bytes the kernel must read over the median time; %%copy: of the "
      "device copy above (the issue's target: >= 85%% at contexts >= 32K)\n");
  return 0;
}
