// kernels.cuh: the split-KV decode kernel, dense or over weighted index lists, as a template on
// the KV element type, head_dim and the query heads one block serves (GQA packing: each K/V row
// loaded once serves all of them). Instantiated per dtype by split_<dtype>.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernel_args.hpp"

namespace vattn::cuda::detail {

// 2^x by the special-function unit (relative error about 2^-22; ex2(-inf) = 0).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// KV element types: the storage type and the unpacking of one 16-byte word into floats.
template <dtype T>
struct kv_elem;
template <>
struct kv_elem<dtype::bf16> {
  using type = __nv_bfloat16;
  static constexpr int k_per_word = 8;
  __device__ static void unpack(const uint4& w, float* x) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&w);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      x[2 * i] = f.x, x[2 * i + 1] = f.y;
    }
  }
};
template <>
struct kv_elem<dtype::f16> {
  using type = __half;
  static constexpr int k_per_word = 8;
  __device__ static void unpack(const uint4& w, float* x) {
    const __half2* h = reinterpret_cast<const __half2*>(&w);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      x[2 * i] = f.x, x[2 * i + 1] = f.y;
    }
  }
};
template <>
struct kv_elem<dtype::f32> {
  using type = float;
  static constexpr int k_per_word = 4;
  __device__ static void unpack(const uint4& w, float* x) {
    x[0] = __uint_as_float(w.x), x[1] = __uint_as_float(w.y);
    x[2] = __uint_as_float(w.z), x[3] = __uint_as_float(w.w);
  }
};

// Tuning (measured on an H200 at Llama-3.1-8B shapes, bf16, G = 4): bytes of K (and as many of
// V) each lane loads per step; warps per multiprocessor the register budget is capped for
// (dense: 16, so 128 registers; sparse also keeps list entries: 12); how many steps ahead each
// warp asks L2 for its contiguous rows (0: off).
constexpr int k_lane_bytes = 64;
constexpr int k_dense_warps_per_sm = 16;
constexpr int k_sparse_warps_per_sm = 12;
constexpr int k_l2_prefetch_steps = 1;

// How a block covers token rows: `k_lanes` consecutive lanes share one row, each holding
// `k_dims` of its dimensions (8: one 16-byte word of bf16/f16, two of f32); a lane keeps G query
// rows and G accumulators of k_dims floats. Each lane loads `k_unroll` rows of K and of V per
// step, as raw words, before any is used (64 bytes of K and 64 of V per lane; half for G = 8,
// whose queries and accumulators take twice the registers), and the register budget is capped
// so that k_min_blocks blocks fit on a multiprocessor: the bytes in flight per multiprocessor,
// not the arithmetic, bound a decode kernel.
template <dtype T, int D, int G, bool Sparse = false>
struct tiling {
  static constexpr int k_elem_bytes = int(sizeof(typename kv_elem<T>::type));
  static constexpr int k_dims = 8;
  static constexpr int k_words = k_dims * k_elem_bytes / 16;  // 16-byte words per lane and row
  static constexpr int k_lanes = D / k_dims;
  static constexpr int k_tokens = 32 / k_lanes;  // rows per warp per unrolled step
  static constexpr int k_bytes = G >= 8 ? k_lane_bytes / 2 : k_lane_bytes;
  static constexpr int k_unroll = k_bytes / (k_dims * k_elem_bytes) > 0
                                      ? k_bytes / (k_dims * k_elem_bytes)
                                      : 1;
  static constexpr int k_warps = k_threads / 32;
  static constexpr int k_min_warps =
      G >= 8 ? 8 : (Sparse ? k_sparse_warps_per_sm : k_dense_warps_per_sm);
  static constexpr int k_min_blocks = k_min_warps / k_warps > 0 ? k_min_warps / k_warps : 1;
  static constexpr int k_step = k_warps * k_tokens * k_unroll;  // tokens a block covers per step
  static_assert(D % k_dims == 0 && 32 % k_lanes == 0 && k_lanes <= 32 && k_words >= 1,
                "bad tiling");
};

// Asks L2 for the 128-byte line at p; nothing waits on it.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Unpacks `NW` 16-byte words of one row into floats.
template <dtype T, int NW>
__device__ __forceinline__ void unpack_row(const uint4 (&w)[NW], float* x) {
#pragma unroll
  for (int i = 0; i < NW; ++i) kv_elem<T>::unpack(w[i], x + i * kv_elem<T>::k_per_word);
}

__device__ inline void report(device_status* st, int32_t code, int32_t seq, int64_t value,
                              int64_t aux, int64_t limit) {
  if (atomicCAS(&st->code, 0, code) == 0) {
    st->seq = seq, st->value = value, st->aux = aux, st->limit = limit;
  }
}

// First row of sequence s when sequences are packed one after another: each warp sums
// seq_len[0 .. s) by lanes and a butterfly (every lane gets the total).
__device__ inline int64_t packed_row0(const int32_t* seq_len, int s) {
  int64_t acc = 0;
  for (int i = threadIdx.x % 32; i < s; i += 32) acc += seq_len[i];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  return acc;
}

// A logit may exceed the running reference m by this much (base 2) before the accumulators are
// rescaled: p = 2^(s - m) <= 2^8 stays exact in f32, and l and acc share the reference, so the
// final o / l is unchanged; rescaling becomes rare instead of a multiply per row and dim.
constexpr float k_rescale_slack = 8.f;

// One block: (split, group of G query heads, sequence). It walks its chunk of the sequence's
// tokens (dense) or of its list (sparse) with an online softmax per lane group, merges the lane
// groups of a warp by shuffles and the warps through shared memory, and writes one partial
// state per query head and split. Device-resident arguments are checked on the way; a bad one
// is reported and the block stops (the merge then writes NaN).
template <dtype T, int D, int G, bool Sparse>
__global__ void __launch_bounds__(k_threads, (tiling<T, D, G, Sparse>::k_min_blocks))
    split_kernel(const split_args a) {
  using tl = tiling<T, D, G, Sparse>;
  using elem_t = typename kv_elem<T>::type;
  constexpr int P = tl::k_dims, NW = tl::k_words, LPT = tl::k_lanes, TPW = tl::k_tokens,
                U = tl::k_unroll;
  __shared__ float sm_o[tl::k_warps][G][D];
  __shared__ float sm_m[tl::k_warps][G];
  __shared__ float sm_l[tl::k_warps][G];
  // the queries, pre-scaled, as each lane group's float4 words: [h][word][sub]
  __shared__ float4 sm_q[G][P / 4][LPT];

  const int split = blockIdx.x, qh0 = blockIdx.y * G, s = blockIdx.z;
  const int kvh = qh0 / a.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane / LPT, sub = lane % LPT;
  // partial state of query head qh0 + h: index part0 + h * n_split
  const size_t part0 = (size_t(s) * a.n_head_q + qh0) * a.n_split + split;

  // --- device-resident arguments of this sequence (every condition is uniform in the block)
  const int n = a.seq_len[s];
  if (n < 1 || n > a.n_tokens_max) {
    if (threadIdx.x == 0) report(a.status, k_bad_seq_len, s, n, a.n_tokens_max, 0);
    return;
  }
  int64_t row0 = 0;  // contiguous: first row; paged: first entry in page_table
  if (!a.paged) {
    row0 = a.seq_start ? a.seq_start[s] : packed_row0(a.seq_len, s);
    if (row0 < 0 || row0 + n > a.n_rows) {
      if (threadIdx.x == 0) report(a.status, k_bad_rows, s, row0, n, a.n_rows);
      return;
    }
  } else {
    row0 = a.page_start[s];
    if (row0 < 0) {
      if (threadIdx.x == 0) report(a.status, k_bad_page_start, s, row0, 0, 0);
      return;
    }
  }
  int total = n;
  const int32_t* list = nullptr;
  const float* list_w = nullptr;
  if constexpr (Sparse) {
    const int64_t lh = int64_t(s) * a.list_heads + (a.per_group ? kvh : qh0);
    total = a.list_len[lh];
    if (total < 1 || total > a.list_stride) {
      if (threadIdx.x == 0) report(a.status, k_bad_list_len, s, total, lh, a.list_stride);
      return;
    }
    list = a.indices + lh * a.list_stride;
    list_w = a.weights + lh * a.list_stride;
  }

  // --- this block's chunk: at least k_min_chunk tokens (dense) or k_min_chunk_sparse list
  // entries, so short sequences and lists use few blocks
  constexpr int min_chunk = Sparse ? k_min_chunk_sparse : k_min_chunk;
  const int64_t chunk = max((int64_t(total) + a.n_split - 1) / a.n_split, int64_t(min_chunk));
  const int64_t t0 = min(int64_t(total), int64_t(split) * chunk);
  const int t1 = int(min(int64_t(total), t0 + chunk));
  if (t0 >= t1) {  // nothing here: an empty state (m = -inf) that the merge skips
    for (int o = threadIdx.x; o < G * D; o += k_threads) {
      const size_t pi = part0 + size_t(o / D) * a.n_split;
      a.part_o[pi * D + o % D] = 0.f;
      if (o % D == 0) a.part_ml[pi] = make_float2(-INFINITY, 0.f);
    }
    return;
  }

  const elem_t* kb = static_cast<const elem_t*>(a.k) + kvh * a.stride_head + sub * P;
  const elem_t* vb = static_cast<const elem_t*>(a.v) + kvh * a.stride_head + sub * P;
  auto row_offset = [&](int t) -> int64_t {
    if (!a.paged) return (row0 + t) * a.stride_token;
    const int64_t pi = row0 + t / a.page_size;
    int64_t page = a.page_table[pi];
    if (page < 0 || page >= a.n_pages) {
      report(a.status, k_bad_page, s, page, pi, a.n_pages);
      page = 0;  // a valid row to read; the run's output is NaN anyway
    }
    return page * a.stride_page + int64_t(t % a.page_size) * a.stride_token;
  };

  // Queries pre-scaled by scale * log2(e): logits come out in base 2 for exp2.
  // (in shared memory, read back per row: the registers hold rows in flight instead)
  for (int o = threadIdx.x; o < G * D / 4; o += k_threads) {
    const int h = o / (D / 4), w4 = o % (D / 4);  // w4: float4 word of the head's row
    const float* x = a.q + (size_t(s) * a.n_head_q + qh0 + h) * D + 4 * w4;  // any alignment
    const float c = a.scale_log2;
    sm_q[h][w4 % (P / 4)][w4 / (P / 4)] = make_float4(x[0] * c, x[1] * c, x[2] * c, x[3] * c);
  }
  __syncthreads();
  float m[G], l[G], acc[G][P];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    m[h] = -INFINITY, l[h] = 0.f;
#pragma unroll
    for (int j = 0; j < P; ++j) acc[h][j] = 0.f;
  }

  // Warps interleave by steps of U x TPW rows. The loop bound is uniform in a warp (the
  // shuffles need every lane); a lane past the end reloads a valid row and discards it. A step's
  // U rows of K and V are loaded as raw words before any is used. Sparse: the list entries (token,
  // weight) of the step after the loaded one are read while its rows are in flight, so a row's load
  // does not wait on its index's load (entries past the chunk read entry t0 instead and are
  // discarded).
  int tn[U];
  float wn[U];
  auto fetch = [&](int b) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = b + u * TPW + slot, ii = i < t1 ? i : int(t0);
      tn[u] = list[ii];
      wn[u] = list_w[ii];
    }
  };
  // Loads the rows of the step at b (rows past the chunk: a valid row, discarded).
  auto issue = [&](int b, uint4(&kw)[U][NW], uint4(&vw)[U][NW], float(&wt)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = b + u * TPW + slot;
      int t = i < t1 ? i : int(t0);
      wt[u] = 1.f;
      if constexpr (Sparse) {
        t = tn[u];
        wt[u] = wn[u];
        if (t < 0 || t >= n) {
          report(a.status, k_bad_index, s, t, (list - a.indices) + (i < t1 ? i : int(t0)), n);
          t = 0;
        }
      }
      const int64_t off = row_offset(t);
      const uint4* pk = reinterpret_cast<const uint4*>(kb + off);
      const uint4* pv = reinterpret_cast<const uint4*>(vb + off);
#pragma unroll
      for (int w = 0; w < NW; ++w) kw[u][w] = __ldg(pk + w);
#pragma unroll
      for (int w = 0; w < NW; ++w) vw[u][w] = __ldg(pv + w);
    }
  };
  // The online softmax over the step at b: logits of its U rows, one reference update per step
  // (only when a logit exceeds it by more than the slack), then the weighted sums.
  auto consume = [&](int b, const uint4(&kw)[U][NW], const uint4(&vw)[U][NW], const float(&wt)[U]) {
    float sc[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kx[P];
      unpack_row<T, NW>(kw[u], kx);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float d = 0.f;
#pragma unroll
        for (int w = 0; w < P / 4; ++w) {
          const float4 qv = sm_q[h][w][sub];
          d = fmaf(qv.x, kx[4 * w], d);
          d = fmaf(qv.y, kx[4 * w + 1], d);
          d = fmaf(qv.z, kx[4 * w + 2], d);
          d = fmaf(qv.w, kx[4 * w + 3], d);
        }
        sc[u][h] = d;
      }
    }
#pragma unroll
    for (int off = LPT / 2; off > 0; off /= 2)
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int h = 0; h < G; ++h) sc[u][h] += __shfl_xor_sync(0xffffffffu, sc[u][h], off);
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) valid[u] = b + u * TPW + slot < t1;
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (valid[u]) mx = fmaxf(mx, sc[u][h]);
      if (mx > m[h] + k_rescale_slack) {  // m = -inf on the first row: r = 0
        const float r = exp2_approx(m[h] - mx);
        l[h] *= r;
#pragma unroll
        for (int j = 0; j < P; ++j) acc[h][j] *= r;
        m[h] = mx;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vx[P];
      unpack_row<T, NW>(vw[u], vx);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        const float p = valid[u] ? wt[u] * exp2_approx(sc[u][h] - m[h]) : 0.f;
        l[h] += p;
#pragma unroll
        for (int j = 0; j < P; ++j) acc[h][j] = fmaf(p, vx[j], acc[h][j]);
      }
    }
  };

  const int first = int(t0) + warp * TPW * U;
  if constexpr (Sparse) fetch(first);
  for (int base = first; base < t1; base += tl::k_step) {
    if constexpr (!Sparse && k_l2_prefetch_steps > 0) {
      // contiguous: the warp asks L2 for the K and V lines of its step k_l2_prefetch_steps
      // ahead (R consecutive rows, LR lines each), so DRAM has more bytes in flight than the
      // registers hold
      constexpr int R = TPW * U, LR = D * tl::k_elem_bytes / 128;
      static_assert(LR >= 1, "rows of at least 128 bytes");
      for (int x = lane; x < 2 * R * LR; x += 32) {
        const int i = base + k_l2_prefetch_steps * tl::k_step + (x / LR) % R;
        if (!a.paged && i < t1) {
          const elem_t* row = static_cast<const elem_t*>(x < R * LR ? a.k : a.v) +
                              kvh * a.stride_head + (row0 + i) * a.stride_token;
          prefetch_l2(reinterpret_cast<const char*>(row) + 128 * (x % LR));
        }
      }
    }
    uint4 kw[U][NW], vw[U][NW];
    float wt[U];
    issue(base, kw, vw, wt);
    if constexpr (Sparse) fetch(base + tl::k_step);
    consume(base, kw, vw, wt);
  }
  // A lane group whose loop ran zero times holds m = -inf, l = 0, acc = 0: an empty state.

  // --- merge the warp's TPW lane groups by shuffles (lane groups sub, sub + LPT, ...)
#pragma unroll
  for (int off = LPT; off < 32; off *= 2) {
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[h], off);
      const float lo = __shfl_xor_sync(0xffffffffu, l[h], off);
      const float mx = fmaxf(m[h], mo);
      const float r0 = mx == -INFINITY ? 0.f : exp2_approx(m[h] - mx);
      const float r1 = mx == -INFINITY ? 0.f : exp2_approx(mo - mx);
      l[h] = fmaf(l[h], r0, lo * r1);
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[h][j], off);
        acc[h][j] = fmaf(acc[h][j], r0, ao * r1);
      }
      m[h] = mx;
    }
  }

  // --- merge the block's warps through shared memory, one output per thread
  if (lane < LPT) {
#pragma unroll
    for (int h = 0; h < G; ++h) {
      if (sub == 0) sm_m[warp][h] = m[h], sm_l[warp][h] = l[h];
#pragma unroll
      for (int j = 0; j < P; ++j) sm_o[warp][h][sub * P + j] = acc[h][j];
    }
  }
  __syncthreads();
  for (int o = threadIdx.x; o < G * D; o += k_threads) {
    const int h = o / D, d = o % D;
    float mx = -INFINITY;
    for (int x = 0; x < tl::k_warps; ++x) mx = fmaxf(mx, sm_m[x][h]);
    float sum = 0.f, out = 0.f;
    if (mx != -INFINITY) {
      for (int x = 0; x < tl::k_warps; ++x) {
        const float r = exp2_approx(sm_m[x][h] - mx);
        sum = fmaf(sm_l[x][h], r, sum);
        out = fmaf(sm_o[x][h][d], r, out);
      }
    }
    const size_t pi = part0 + size_t(h) * a.n_split;
    a.part_o[pi * D + d] = out;
    if (d == 0) a.part_ml[pi] = make_float2(mx, sum);
  }
}

// The entry points kernel_args.hpp declares, for one instance.
template <dtype T, int D, int G, bool Sparse>
cudaError_t launch_split(const split_args& a, dim3 grid, cudaStream_t stream) {
  split_kernel<T, D, G, Sparse><<<grid, k_threads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <dtype T, int D, int G, bool Sparse>
int split_blocks_per_sm() {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, split_kernel<T, D, G, Sparse>, k_threads,
                                                    0) != cudaSuccess)
    return 0;
  return n;
}

// Explicit instances of one KV type: head_dim 64 and 128, 1, 2, 4 or 8 heads per block, dense
// and sparse (each instance file invokes this once).
#define VATTN_CUDA_SPLIT_INSTANCE(T, D, G, S)                                           \
  template cudaError_t launch_split<T, D, G, S>(const split_args&, dim3, cudaStream_t); \
  template int split_blocks_per_sm<T, D, G, S>();
#define VATTN_CUDA_SPLIT_INSTANCES_G(T, D)  \
  VATTN_CUDA_SPLIT_INSTANCE(T, D, 1, false) \
  VATTN_CUDA_SPLIT_INSTANCE(T, D, 1, true)  \
  VATTN_CUDA_SPLIT_INSTANCE(T, D, 2, false) \
  VATTN_CUDA_SPLIT_INSTANCE(T, D, 2, true)  \
  VATTN_CUDA_SPLIT_INSTANCE(T, D, 4, false) \
  VATTN_CUDA_SPLIT_INSTANCE(T, D, 4, true)  \
  VATTN_CUDA_SPLIT_INSTANCE(T, D, 8, false) \
  VATTN_CUDA_SPLIT_INSTANCE(T, D, 8, true)
#define VATTN_CUDA_SPLIT_INSTANCES(T) \
  VATTN_CUDA_SPLIT_INSTANCES_G(T, 64) \
  VATTN_CUDA_SPLIT_INSTANCES_G(T, 128)

}  // namespace vattn::cuda::detail
