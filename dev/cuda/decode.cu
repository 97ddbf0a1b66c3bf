// dev/cuda/decode.cu: self-contained experiment for the CUDA backend: a split-KV, GQA-packed
// decode attention kernel over bf16 K/V (dense, and the same kernel over a weighted index list
// as vAttention's sparse step), its log-sum-exp merge, a read-bandwidth probe, and a parity check
// of the keyed permutation sampler against the CPU. Checked against a double-precision CPU
// reference; timed with CUDA events (median of repeats, inputs rotated past L2).
//
// Build (from the repository root):
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -I src dev/cuda/decode.cu -o decode
// Run: ./decode [contexts] [batches], e.g. ./decode 8192,131072 1,16 (docs/benchmarks.md)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "core/sampler.hpp"

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

namespace {

constexpr int kD = 128;                          // head_dim
constexpr int kG = 4;                            // query heads per kv head (Llama-3.1-8B: 32 / 8)
constexpr int kWarps = 4;                        // warps per block
constexpr int kLanesPerTok = 8;                  // lanes sharing one token row
constexpr int kDimsPerLane = kD / kLanesPerTok;  // 16 dims = 32 bytes = two 16-byte loads
constexpr int kTokPerWarp = 32 / kLanesPerTok;   // 4 tokens per warp step
#ifndef DECODE_UNROLL
#define DECODE_UNROLL 2
#endif
constexpr int kUnroll = DECODE_UNROLL;  // token rows per lane group loaded before any is used
// DECODE_ASYNC=1: each thread prefetches its own 64 bytes of K and V rows kStages steps ahead
// with cp.async into shared memory, so rows in flight no longer cost registers.
#ifndef DECODE_ASYNC
#define DECODE_ASYNC 0
#endif
constexpr int kStages = 5;
constexpr int kMergeBytes = kWarps * kTokPerWarp * kG * (kD + 2) * 4;
constexpr int kStageBytes = DECODE_ASYNC ? kWarps * 32 * kStages * 64 : 0;
constexpr int kSmemBytes = kMergeBytes > kStageBytes ? kMergeBytes : kStageBytes;

struct partial {  // per (batch, q head, split): running max, sum and unnormalised output
  float m, l;
};

// Two 16-byte words of bf16 (this lane's 16 dims of a row) as f32.
__device__ __forceinline__ void unpack_row(uint4 a, uint4 b, float (&x)[kDimsPerLane]) {
  const __nv_bfloat162* ha = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* hb = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 fa = __bfloat1622float2(ha[i]), fb = __bfloat1622float2(hb[i]);
    x[2 * i] = fa.x, x[2 * i + 1] = fa.y;
    x[8 + 2 * i] = fb.x, x[8 + 2 * i + 1] = fb.y;
  }
}

__device__ __forceinline__ void load_row(const __nv_bfloat16* row, float (&x)[kDimsPerLane]) {
  const uint4* p = reinterpret_cast<const uint4*>(row);
  unpack_row(__ldg(p), __ldg(p + 1), x);
}

#if DECODE_ASYNC
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// One block: (split, kv head, batch). K, V: [batch][n][n_kv][kD] bf16. q: [batch][n_kv*kG][kD].
// kSparse: tokens come from idx[batch][n_kv][len] with weights w (the sampled tokens' n_s/b).
template <bool kSparse>
__global__ void __launch_bounds__(kWarps * 32)
    decode_split(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                 const __nv_bfloat16* __restrict__ v, int n, int n_kv, int chunk,
                 const int* __restrict__ idx, const float* __restrict__ w, int len, float scale,
                 partial* __restrict__ part, float* __restrict__ part_o, int n_split) {
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane / kLanesPerTok, sub = lane % kLanesPerTok;
  const int total = kSparse ? len : n;
  const int t0 = split * chunk, t1 = min(total, t0 + chunk);

  float qr[kG][kDimsPerLane];
#pragma unroll
  for (int h = 0; h < kG; ++h) {
    const float* qh = q + ((size_t)b * n_kv * kG + kvh * kG + h) * kD + sub * kDimsPerLane;
#pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) qr[h][j] = qh[j] * scale;
  }
  float m[kG], l[kG], acc[kG][kDimsPerLane];
#pragma unroll
  for (int h = 0; h < kG; ++h) {
    m[h] = -INFINITY, l[h] = 0.f;
#pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) acc[h][j] = 0.f;
  }
  const size_t row_stride = (size_t)n_kv * kD;
  const __nv_bfloat16* kb = k + (size_t)b * n * row_stride + kvh * kD + sub * kDimsPerLane;
  const __nv_bfloat16* vb = v + (size_t)b * n * row_stride + kvh * kD + sub * kDimsPerLane;
  const int* ib = kSparse ? idx + ((size_t)b * n_kv + kvh) * len : nullptr;
  const float* wb = kSparse ? w + ((size_t)b * n_kv + kvh) * len : nullptr;

#if DECODE_ASYNC
  __shared__ __align__(16) unsigned char smem_raw[kSmemBytes];
  // Per-thread ring of kStages slots of 64 bytes (32 of K, 32 of V). A thread reads back only
  // what it copied itself, so cp.async.wait_group alone orders the reuse.
  uint4* ring = reinterpret_cast<uint4*>(smem_raw) + threadIdx.x * kStages * 4;
  constexpr int kStep = kWarps * kTokPerWarp;
  const int first = t0 + warp * kTokPerWarp;
  const int steps = first < t1 ? (t1 - first + kStep - 1) / kStep : 0;  // same for the warp
  auto issue = [&](int step) {
    if (step < steps) {
      const int i = first + step * kStep + slot;
      const int ii = i < t1 ? i : t1 - 1;
      const int t = kSparse ? ib[ii] : ii;
      const uint4* kr = reinterpret_cast<const uint4*>(kb + (size_t)t * row_stride);
      const uint4* vr = reinterpret_cast<const uint4*>(vb + (size_t)t * row_stride);
      uint4* slot_p = ring + (step % kStages) * 4;
      cp_async16(slot_p, kr);
      cp_async16(slot_p + 1, kr + 1);
      cp_async16(slot_p + 2, vr);
      cp_async16(slot_p + 3, vr + 1);
    }
    cp_async_commit();  // an empty group keeps the count uniform
  };
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) issue(st);
  for (int step = 0; step < steps; ++step) {
    issue(step + kStages - 1);
    cp_async_wait<kStages - 1>();
    const int i = first + step * kStep + slot;
    const bool valid = i < t1;
    const float wt = kSparse ? (valid ? wb[i] : 0.f) : 1.f;
    float kx[kDimsPerLane], vx[kDimsPerLane];
    const uint4* slot_r = ring + (step % kStages) * 4;
    unpack_row(slot_r[0], slot_r[1], kx);
    unpack_row(slot_r[2], slot_r[3], vx);
    float s[kG];
#pragma unroll
    for (int h = 0; h < kG; ++h) {
      float a = 0.f;
#pragma unroll
      for (int j = 0; j < kDimsPerLane; ++j) a = fmaf(qr[h][j], kx[j], a);
      s[h] = a;
    }
#pragma unroll
    for (int off = kLanesPerTok / 2; off > 0; off /= 2)
#pragma unroll
      for (int h = 0; h < kG; ++h) s[h] += __shfl_xor_sync(0xffffffffu, s[h], off);
    if (!valid) continue;
#pragma unroll
    for (int h = 0; h < kG; ++h) {
      const float mn = fmaxf(m[h], s[h]);
      const float r = __expf(m[h] - mn);
      const float p = wt * __expf(s[h] - mn);
      l[h] = l[h] * r + p;
#pragma unroll
      for (int j = 0; j < kDimsPerLane; ++j) acc[h][j] = fmaf(p, vx[j], acc[h][j] * r);
      m[h] = mn;
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring becomes the merge area below
#else
  // Each warp step covers kUnroll x kTokPerWarp tokens; warps interleave by step. The loop
  // bound is the same for all lanes of a warp (the shuffles below need every lane); a lane past
  // the end reloads a valid row and discards it. All rows of a step are loaded before any is
  // used, so kUnroll x 2 x 32 bytes per lane are in flight.
  constexpr int kStep = kWarps * kTokPerWarp * kUnroll;
  for (int base = t0 + warp * kTokPerWarp * kUnroll; base < t1; base += kStep) {
    float kx[kUnroll][kDimsPerLane], vx[kUnroll][kDimsPerLane], wt[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kTokPerWarp + slot;
      valid[u] = i < t1;
      const int ii = valid[u] ? i : base;
      const int t = kSparse ? ib[ii] : ii;
      wt[u] = kSparse ? wb[ii] : 1.f;
      load_row(kb + (size_t)t * row_stride, kx[u]);
      load_row(vb + (size_t)t * row_stride, vx[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float s[kG];
#pragma unroll
      for (int h = 0; h < kG; ++h) {
        float a = 0.f;
#pragma unroll
        for (int j = 0; j < kDimsPerLane; ++j) a = fmaf(qr[h][j], kx[u][j], a);
        s[h] = a;
      }
      // reduce over the 8 lanes of this token (xor stays inside the aligned group of 8)
#pragma unroll
      for (int off = kLanesPerTok / 2; off > 0; off /= 2)
#pragma unroll
        for (int h = 0; h < kG; ++h) s[h] += __shfl_xor_sync(0xffffffffu, s[h], off);
      if (!valid[u]) continue;
#pragma unroll
      for (int h = 0; h < kG; ++h) {
        const float mn = fmaxf(m[h], s[h]);
        const float r = __expf(m[h] - mn);  // m = -inf on the first token: r = 0
        const float p = wt[u] * __expf(s[h] - mn);
        l[h] = l[h] * r + p;
#pragma unroll
        for (int j = 0; j < kDimsPerLane; ++j) acc[h][j] = fmaf(p, vx[u][j], acc[h][j] * r);
        m[h] = mn;
      }
    }
  }
  __shared__ __align__(16) unsigned char smem_raw[kSmemBytes];
#endif
  // Note: a lane whose loop ran zero times has m = -inf, l = 0, acc = 0 and merges as empty.

  // Merge the 16 token slots (4 per warp x 4 warps) through shared memory.
  auto sm_o = reinterpret_cast<float(*)[kG][kD]>(smem_raw);
  auto sm_m = reinterpret_cast<float(*)[kG]>(smem_raw + kWarps * kTokPerWarp * kG * kD * 4);
  auto sm_l = reinterpret_cast<float(*)[kG]>(smem_raw + kWarps * kTokPerWarp * kG * (kD + 1) * 4);
  const int g = warp * kTokPerWarp + slot;
#pragma unroll
  for (int h = 0; h < kG; ++h) {
    if (sub == 0) sm_m[g][h] = m[h], sm_l[g][h] = l[h];
#pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) sm_o[g][h][sub * kDimsPerLane + j] = acc[h][j];
  }
  __syncthreads();
  // thread -> (head, dim block): 128 threads cover kG x kD = 512 outputs, 4 each
  for (int o = threadIdx.x; o < kG * kD; o += blockDim.x) {
    const int h = o / kD, dd = o % kD;
    float M = -INFINITY;
    for (int x = 0; x < kWarps * kTokPerWarp; ++x) M = fmaxf(M, sm_m[x][h]);
    float L = 0.f, O = 0.f;
    if (M != -INFINITY) {
      for (int x = 0; x < kWarps * kTokPerWarp; ++x) {
        const float r = __expf(sm_m[x][h] - M);
        L += sm_l[x][h] * r;
        O += sm_o[x][h][dd] * r;
      }
    }
    const size_t pi = (((size_t)b * n_kv + kvh) * kG + h) * n_split + split;
    part_o[pi * kD + dd] = O;
    if (dd == 0) part[pi] = {M, L};
  }
}

// out[b][hq][d] from the splits' partial states (log-sum-exp merge).
__global__ void merge_splits(const partial* __restrict__ part, const float* __restrict__ part_o,
                             int n_split, float* __restrict__ out) {
  const size_t bh = blockIdx.x;  // b * n_q + hq
  const int dd = threadIdx.x;
  float M = -INFINITY;
  for (int s = 0; s < n_split; ++s) M = fmaxf(M, part[bh * n_split + s].m);
  float L = 0.f, O = 0.f;
  for (int s = 0; s < n_split; ++s) {
    const partial p = part[bh * n_split + s];
    if (p.m == -INFINITY) continue;
    const float r = __expf(p.m - M);
    L += p.l * r;
    O += part_o[(bh * n_split + s) * kD + dd] * r;
  }
  out[bh * kD + dd] = O / L;
}

// Read bandwidth probe: every byte read once with 16-byte loads, one word written per block.
__global__ void read_probe(const uint4* __restrict__ x, size_t n, unsigned* __restrict__ sink) {
  unsigned a = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    uint4 y = __ldg(x + i);
    a ^= y.x ^ y.y ^ y.z ^ y.w;
  }
  if (a == 0x12345678u) sink[blockIdx.x] = a;  // practically never: keeps the loads alive
}

__global__ void perm_kernel(uint64_t key, uint64_t n, uint64_t count, uint64_t* out) {
  const uint64_t j = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  if (j < count) out[j] = vattn::detail::keyed_permutation(key, n)(j);
}

float bf16_to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Deterministic pseudo-normal values (sum of four uniforms, centred and scaled), made on the
// device: host-side generation of gigabytes would dominate the run.
__global__ void fill_normal(__nv_bfloat16* x, size_t n, uint64_t seed, float mean, float sd) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    const uint64_t h = vattn::detail::mix64(seed ^ vattn::detail::mix64(i));
    const float u =
        float(h & 0xffff) + float((h >> 16) & 0xffff) + float((h >> 32) & 0xffff) + float(h >> 48);
    x[i] = __float2bfloat16(mean + sd * (u / 65536.0f - 2.0f) * 1.7320508f);
  }
}

struct timing {
  std::vector<float> ms;
  float median() {
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  // contexts and batches from the command line: decode 8192,32768 1,4
  auto parse_list = [](const char* s) {
    std::vector<int> v;
    for (const char* p = s; *p;) {
      v.push_back(std::atoi(p));
      while (*p && *p != ',') ++p;
      if (*p == ',') ++p;
    }
    return v;
  };
  const std::vector<int> contexts = parse_list(argc > 1 ? argv[1] : "8192,32768,131072");
  const std::vector<int> batches = parse_list(argc > 2 ? argv[2] : "1,4,16");
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  int driver = 0;
  CK(cudaDriverGetVersion(&driver));
  std::printf("device: %s, %d SMs, L2 %d MB, driver %d\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20, driver);

  // --- sampler parity: the keyed permutation on the GPU equals the CPU's, element for element
  {
    const uint64_t n = 131072 + 77, key = vattn::detail::sample_key(1, 3, 5, 7, 9);
    uint64_t* d;
    CK(cudaMalloc(&d, n * 8));
    perm_kernel<<<(n + 255) / 256, 256>>>(key, n, n, d);
    CK(cudaGetLastError());
    std::vector<uint64_t> h(n);
    CK(cudaMemcpy(h.data(), d, n * 8, cudaMemcpyDeviceToHost));
    vattn::detail::keyed_permutation p(key, n);
    size_t bad = 0;
    for (uint64_t j = 0; j < n; ++j) bad += h[j] != p(j);
    std::printf("sampler parity: %zu mismatches in %llu elements\n", bad, (unsigned long long)n);
    CK(cudaFree(d));
    if (bad) return 1;
  }

  // --- read bandwidth probe over 2 GiB, and a device-to-device copy
  float read_gbs = 0, copy_gbs = 0;
  {
    const size_t bytes = size_t(2) << 30;
    void *a, *c;
    unsigned* sink;
    CK(cudaMalloc(&a, bytes));
    CK(cudaMalloc(&c, bytes));
    CK(cudaMalloc(&sink, 4096 * 4));
    CK(cudaMemset(a, 1, bytes));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    timing tr, tc;
    for (int r = 0; r < 23; ++r) {
      CK(cudaEventRecord(e0));
      read_probe<<<prop.multiProcessorCount * 8, 512>>>((const uint4*)a, bytes / 16, sink);
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (r >= 3) tr.ms.push_back(ms);
      CK(cudaEventRecord(e0));
      CK(cudaMemcpyAsync(c, a, bytes, cudaMemcpyDeviceToDevice));
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (r >= 3) tc.ms.push_back(ms);
    }
    read_gbs = bytes / (tr.median() * 1e-3) / 1e9;
    copy_gbs = 2.0 * bytes / (tc.median() * 1e-3) / 1e9;
    std::printf("read probe: %.0f GB/s; device copy: %.0f GB/s (read + write)\n", read_gbs,
                copy_gbs);
    CK(cudaFree(a));
    CK(cudaFree(c));
    CK(cudaFree(sink));
  }

  const int n_kv = 8, n_q = n_kv * kG;
  const float scale = 1.0f / std::sqrt(float(kD));
  const double density = 0.05;
  std::printf("\n%7s %5s | %10s %8s %6s | %10s %8s %9s | %8s %8s\n", "context", "batch", "dense us",
              "GB/s", "%read", "sparse us", "GB/s", "speedup", "err_d", "err_s");
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int n : contexts) {
    for (int B : batches) {
      const size_t elems = (size_t)B * n * n_kv * kD;
      const size_t kv_bytes = 2 * elems * 2;
      // Rotate enough copies that each timed run reads from DRAM, not L2.
      const int copies = std::max<size_t>(1, (size_t(256) << 20) / kv_bytes + 1);
      std::vector<float> hq((size_t)B * n_q * kD);
      for (auto& x : hq) x = 2.0f * nd(rng);
      // sparse list: 5% of tokens per (b, kv head), sorted, weight n_s / b for all but the first
      // 1% (as if deterministic): stands in for vAttention's F + S.
      const int len = std::max(kWarps * kTokPerWarp, int(density * n));
      std::vector<int> hidx((size_t)B * n_kv * len);
      std::vector<float> hw(hidx.size());
      for (size_t g = 0; g < (size_t)B * n_kv; ++g) {
        std::vector<int> pick(n);
        for (int i = 0; i < n; ++i) pick[i] = i;
        std::shuffle(pick.begin(), pick.end(), rng);
        std::sort(pick.begin(), pick.begin() + len);
        for (int i = 0; i < len; ++i) {
          hidx[g * len + i] = pick[i];
          hw[g * len + i] = (i % 5 == 0) ? 1.0f : 1.0f / float(density);
        }
      }
      __nv_bfloat16 *dk, *dv;
      float *dq, *dout, *dpo, *dw;
      int* didx;
      partial* dp;
      CK(cudaMalloc(&dk, elems * 2 * copies));
      CK(cudaMalloc(&dv, elems * 2 * copies));
      fill_normal<<<4096, 256>>>(dk, elems * copies, 11, 0.0f, 1.0f);
      fill_normal<<<4096, 256>>>(dv, elems * copies, 12, 1.0f, 0.5f);
      CK(cudaGetLastError());
      // batch 0 of copy 0 back to the host for the reference: [n][n_kv][kD]
      const size_t elems0 = (size_t)n * n_kv * kD;
      std::vector<__nv_bfloat16> hk(elems0), hv(elems0);
      CK(cudaMemcpy(hk.data(), dk, elems0 * 2, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hv.data(), dv, elems0 * 2, cudaMemcpyDeviceToHost));
      CK(cudaMalloc(&dq, hq.size() * 4));
      CK(cudaMemcpy(dq, hq.data(), hq.size() * 4, cudaMemcpyHostToDevice));
      CK(cudaMalloc(&didx, hidx.size() * 4));
      CK(cudaMalloc(&dw, hw.size() * 4));
      CK(cudaMemcpy(didx, hidx.data(), hidx.size() * 4, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(dw, hw.data(), hw.size() * 4, cudaMemcpyHostToDevice));
      CK(cudaMalloc(&dout, hq.size() * 4));

      // splits: one full wave of resident blocks (occupancy x SMs), so no partial second wave
      // leaves most of the machine idle; chunks of at least 256 tokens.
      int per_sm_d = 0, per_sm_s = 0;
      CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm_d, decode_split<false>, kWarps * 32,
                                                       0));
      CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm_s, decode_split<true>, kWarps * 32,
                                                       0));
      auto splits_for = [&](int tokens, int per_sm) {
        const int slots = per_sm * prop.multiProcessorCount;
        const int want = std::max(1, slots / (B * n_kv));
        return std::max(1, std::min(want, (tokens + 255) / 256));
      };
      const int sd = splits_for(n, per_sm_d), ss = splits_for(len, per_sm_s);
      if (n == contexts[0] && B == batches[0])
        std::fprintf(stderr, "resident blocks per SM: dense %d, sparse %d\n", per_sm_d, per_sm_s);
      const int max_split = std::max(sd, ss);
      CK(cudaMalloc(&dp, sizeof(partial) * B * n_q * max_split));
      CK(cudaMalloc(&dpo, sizeof(float) * B * n_q * max_split * kD));

      auto run = [&](bool sparse, int c) {
        const int ns = sparse ? ss : sd;
        const int total = sparse ? len : n;
        const int chunk = (total + ns - 1) / ns;
        dim3 grid(ns, n_kv, B);
        if (sparse)
          decode_split<true><<<grid, kWarps * 32>>>(dq, dk + c * elems, dv + c * elems, n, n_kv,
                                                    chunk, didx, dw, len, scale, dp, dpo, ns);
        else
          decode_split<false><<<grid, kWarps * 32>>>(dq, dk + c * elems, dv + c * elems, n, n_kv,
                                                     chunk, nullptr, nullptr, 0, scale, dp, dpo,
                                                     ns);
        merge_splits<<<B * n_q, kD>>>(dp, dpo, ns, dout);
      };
      // correctness against a double reference on batch 0 (all heads)
      auto check = [&](bool sparse) {
        run(sparse, 0);
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
        std::vector<float> got(hq.size());
        CK(cudaMemcpy(got.data(), dout, got.size() * 4, cudaMemcpyDeviceToHost));
        double num = 0, den = 0;
        for (int h = 0; h < n_q; ++h) {
          const int kvh = h / kG;
          std::vector<int> toks;
          std::vector<double> wt;
          if (sparse) {
            for (int i = 0; i < len; ++i)
              toks.push_back(hidx[(size_t)kvh * len + i]), wt.push_back(hw[(size_t)kvh * len + i]);
          } else {
            for (int i = 0; i < n; ++i) toks.push_back(i), wt.push_back(1.0);
          }
          std::vector<double> s(toks.size());
          double mx = -1e300;
          for (size_t i = 0; i < toks.size(); ++i) {
            double a = 0;
            for (int j = 0; j < kD; ++j)
              a += double(hq[(size_t)h * kD + j]) *
                   bf16_to_float(hk[((size_t)toks[i] * n_kv + kvh) * kD + j]);
            s[i] = a * scale;
            mx = std::max(mx, s[i]);
          }
          std::vector<double> o(kD, 0.0);
          double l = 0;
          for (size_t i = 0; i < toks.size(); ++i) {
            const double e = wt[i] * std::exp(s[i] - mx);
            l += e;
            for (int j = 0; j < kD; ++j)
              o[j] += e * bf16_to_float(hv[((size_t)toks[i] * n_kv + kvh) * kD + j]);
          }
          for (int j = 0; j < kD; ++j) {
            const double ref = o[j] / l, x = got[(size_t)h * kD + j];
            if (!std::isfinite(x)) return 1e30;
            num += (x - ref) * (x - ref);
            den += ref * ref;
          }
        }
        return num / den;
      };
      std::fprintf(stderr, "[n=%d B=%d] data ready, checking\n", n, B);
      const double err_d = check(false), err_s = check(true);
      std::fprintf(stderr, "[n=%d B=%d] checked, timing\n", n, B);
      cudaEvent_t e0, e1;
      CK(cudaEventCreate(&e0));
      CK(cudaEventCreate(&e1));
      timing td, ts;
      for (int r = 0; r < 30; ++r) {
        for (int sp = 0; sp < 2; ++sp) {
          CK(cudaEventRecord(e0));
          run(sp == 1, r % copies);
          CK(cudaEventRecord(e1));
          CK(cudaEventSynchronize(e1));
          float ms;
          CK(cudaEventElapsedTime(&ms, e0, e1));
          if (r >= 5) (sp ? ts : td).ms.push_back(ms);
        }
      }
      CK(cudaGetLastError());
      const double dense_us = td.median() * 1e3, sparse_us = ts.median() * 1e3;
      const double dense_bytes = double(kv_bytes);
      const double sparse_bytes = double(B) * n_kv * len * kD * 2 * 2;
      std::printf("%7d %5d | %10.1f %8.0f %5.1f%% | %10.1f %8.0f %8.1fx | %8.1e %8.1e\n", n, B,
                  dense_us, dense_bytes / (dense_us * 1e-6) / 1e9,
                  100.0 * dense_bytes / (dense_us * 1e-6) / 1e9 / read_gbs, sparse_us,
                  sparse_bytes / (sparse_us * 1e-6) / 1e9, dense_us / sparse_us, err_d, err_s);
      CK(cudaFree(dk));
      CK(cudaFree(dv));
      CK(cudaFree(dq));
      CK(cudaFree(dout));
      CK(cudaFree(dpo));
      CK(cudaFree(dp));
      CK(cudaFree(didx));
      CK(cudaFree(dw));
      CK(cudaEventDestroy(e0));
      CK(cudaEventDestroy(e1));
    }
  }
  std::printf("\nerr_*: NMSE against a double-precision CPU reference on batch 0 (all heads)\n");
  return 0;
}
