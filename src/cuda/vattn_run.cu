// vattn_run.cu: vAttention end to end on the device (plan::run): top-k scoring (oracle logits in
// the CPU's float summation order, or sign-bit matches over the device_index mirror), top-k by
// radix select, F as a bitmap and an ascending list, the keyed permutation walked past F for the
// base sample and its extension, base-sample moments and budgets in double, the index lists and
// weights the weighted sparse kernel (kernels.cuh) reads. Every kernel takes its sizes from
// device memory (seq_len, the per-unit records), so a run never synchronises with the host and
// can be captured in a CUDA graph. Compiled with -fmad=false (cmake/cuda.cmake): the float and
// double arithmetic the CPU rounds step by step is rounded step by step here too.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <string>

#include "core/budget.hpp"
#include "core/kv_access.hpp"
#include "core/sampler.hpp"
#include "cpu/predictors.hpp"
#include "cuda/cuda_attention.hpp"
#include "cuda/kernel_args.hpp"
#include "cuda/kernels.cuh"
#include "cuda/select_math.hpp"

namespace vattn::cuda {
namespace detail {
namespace {

constexpr int k_sel_threads = 1024;  // finishing blocks
constexpr int k_mom_threads = 512;   // moments blocks (16 warps)
constexpr int k_pass_threads = 256;  // the multi-block selection passes
constexpr int k_chunk = 2048;        // positions per selection-pass block (8 per thread)
constexpr int k_per_thread = k_chunk / k_pass_threads;
static_assert(k_per_thread == 8, "a selection thread's 16-bit sign keys: one 16-byte load");
constexpr int k_walk_threads = 512;  // walk_count: 16 warps, 128 positions of the chunk each
constexpr int k_hist_span = 8192;    // positions per hist_pass block
constexpr int k_sign_threads = 256;
constexpr int k_sign_tokens = 1024;  // tokens per sign scoring block
constexpr int k_max_words = 8;       // 256 signature bits
// Rows of the per-token selection arrays that a flag_pass thread reads or writes 8 at a time (the
// 16-bit sign scores, the flags) are padded to 8 entries, so its 8 positions (8-aligned) are one
// 16-byte load or one 8-byte store.
__host__ __device__ constexpr int64_t pad8(int64_t n_max) {
  return (n_max + 7) / 8 * 8;
}
// The radix select's digits, from the top: f32 order keys in three passes (8, 12, 12 bits; the
// first histogram is built by the scoring kernel), sign scores (0..256) in one pass of 9 bits.
constexpr int k_hist1 = 512, k_hist2 = 4096, k_hist3 = 4096;
constexpr int k_hist_ints = k_hist1 + k_hist2 + k_hist3;  // per (sequence, query head)
// Sign scores are 0 .. 256: the scoring kernel's per-warp histogram copies hold that many bins.
// With signs, int k_hist1 of a group's first head's histograms is the scoring blocks' ticket.
constexpr int k_sign_bins = 257;
// Copies of a kv group's sign histograms (one per score row: the group's heads, or one with
// refine and gqa_shared) per scoring block: one per warp while they fit 48 KiB.
inline int sign_copies(int rows) {
  int c = k_sign_threads / 32;
  while (c > 1 && size_t(c) * rows * k_sign_bins * 4 > 48 * 1024) c /= 2;
  return c;
}
inline size_t sign_smem(int rows) {
  return size_t(sign_copies(rows)) * rows * k_sign_bins * 4;
}

// Per (sequence, selection unit): what the selection decided. A unit is one query head, or one
// kv group with gqa_shared.
struct unit_rec {
  int64_t n, n_f, n_s, m0;
  int32_t dense;  // 1: attention over every token (too short for sparsity)
  int32_t skip;   // 1: a bad device-side value was reported; the unit is left alone
};
// Per (sequence, query head): the base-sample moments and the head's own budget.
struct head_rec {
  moments mm;
  int64_t b;
};

// The radix select's state per query head: the digits of the k-th key found so far (prefix, under
// mask) and kk, its rank among the candidates sharing that prefix; after the last digit, ties: 1
// when more candidates equal the k-th key than are taken (kk of them), so that the lowest
// positions must be chosen among them (flag_pass); 0 when all of them are taken.
struct key_prefix {
  uint32_t prefix, mask;
  int64_t kk;
  int32_t ties;
};

struct run_kargs : kv_view {
  const float* q;
  int32_t n_max, n_head_q, n_head_kv, d, group;
  int32_t unit_heads;  // query heads per unit
  int32_t n_units;     // units per sequence
  int32_t es;          // bytes per K/V element
  int32_t n_chunks;    // selection-pass chunks per sequence: ceil(n_max / k_chunk)
  // refine with gqa_shared: a kv group's sign scores are one row, each token's maximum over the
  // group's heads (kept in the row of its first head), selected once per unit
  int32_t max_rows;
  // refine: a bound of every sequence's shortlist length (the refine logits' grid)
  int64_t shortlist_max;
  // refine > 1 with list logits (a sampling stage, predictor not the oracle): refine_finish moves
  // the refine logits of F's top-k part to their list positions and the list-logit stage computes
  // only the other rows (the CPU's refined_f_logits)
  int32_t refine_reuse;
  dot_order order;
  sel_cfg c;
  uint64_t step;
  const int64_t* seq_id;
  // predictor=signs
  const uint32_t* sig;
  const float* proj;
  const int64_t* ix_count;
  int64_t ix_n_max;
  int32_t words;
  // workspace
  uint32_t* scores;  // [n_seq, n_head_q, n_max]: logits (f32 bits); with signs, 16-bit
                     // sign scores at rows of pad8(n_max), list logits f32 later
  uint32_t* qsig;    // [n_seq, n_head_q, k_max_words]
  int32_t* hist;     // [n_seq, n_head_q, k_hist_ints]: the radix select's digit histograms
  key_prefix* sel;   // [n_seq, n_head_q]: the k-th key's digits found so far
  unsigned long long* f_scan;   // [n_seq, n_units, 1 + n_chunks]: chunk ticket, F look-back
  unsigned long long* eq_scan;  // [n_seq, n_head_q, n_chunks]: look-back of keys equal to the k-th
  int32_t* w_count;             // [n_seq, n_units, n_chunks]: walk positions outside F per chunk
  uint8_t* flags;               // [n_seq, n_units, pad8(n_max)]
  int32_t* list;                // [n_seq, n_units, n_max]
  int32_t* cand;   // refine > 1: the shortlist C, ascending [n_seq, n_units, n_max] (the weights'
                   // memory, which the walk only uses later)
  float* weights;  // [n_seq, n_units, n_max]; before finishing: the walk's tokens (int32)
  int32_t* list_len;  // [n_seq, n_units]
  unit_rec* units;    // [n_seq, n_units]
  head_rec* heads;    // [n_seq, n_head_q]
  head_stats* stats;
  int32_t* indices;
  device_status* status;
};

// kernels.cuh's report(): the first bad value wins.
__device__ inline void report_status(device_status* st, int32_t code, int32_t seq, int64_t value,
                                     int64_t aux, int64_t limit) {
  if (atomicCAS(&st->code, 0, code) == 0) {
    st->seq = seq, st->value = value, st->aux = aux, st->limit = limit;
  }
}

// hist[bin] += 1 for every lane with `active`, one atomic per distinct bin of the warp (logits
// crowd into a few bins; plain shared atomics would serialise on them). Every lane of the warp
// calls it.
__device__ __forceinline__ void hist_add(int* hist, uint32_t bin, bool active) {
  const unsigned live = __ballot_sync(0xffffffffu, active);
  if (!active) return;
  const unsigned peers = __match_any_sync(live, bin);
  if (int(threadIdx.x % 32) == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
}

// How many tokens the predictor's select keeps: k, or with refine the shortlist's L.
// Inclusive prefix sum of v over the lanes of a full warp.
__device__ __forceinline__ int warp_inclusive_sum(int v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int x = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += x;
  }
  return v;
}

__device__ __forceinline__ int64_t select_count(const sel_cfg& c, const stages& st) {
  return c.refine > 0 ? st.shortlist : st.k;
}
// refine with a shortlist longer than k (refine > 1 on a sparse sequence): F's top-k part is
// each unit head's k best exact logits among the shortlist (the refine kernels), not the
// shortlist itself.
__device__ __forceinline__ bool refine_pending(const sel_cfg& c, const stages& st) {
  return c.refine > 0 && !st.dense && st.k > 0 && st.shortlist > st.k;
}

// --- sequence geometry -------------------------------------------------------------------------

// First row (contiguous) or first page-table entry (paged) of sequence s, or -1 after reporting
// a bad value. Every thread calls it; thread 0 reports.
__device__ int64_t seq_base(const run_kargs& a, int s, int32_t n, bool report_it) {
  if (!a.paged) {
    int64_t r0 = 0;
    if (a.seq_start) {
      r0 = a.seq_start[s];
    } else {
      for (int i = 0; i < s; ++i) r0 += a.seq_len[i];
    }
    if (r0 < 0 || r0 + n > a.n_rows) {
      if (report_it) report_status(a.status, k_bad_rows, s, r0, n, a.n_rows);
      return -1;
    }
    return r0;
  }
  const int64_t p0 = a.page_start[s];
  if (p0 < 0) {
    if (report_it) report_status(a.status, k_bad_page_start, s, p0, 0, 0);
    return -1;
  }
  return p0;
}

__device__ __forceinline__ int64_t row_of(const run_kargs& a, int s, int64_t base, int64_t t,
                                          int kvh) {
  if (!a.paged) return (base + t) * a.stride_token + int64_t(kvh) * a.stride_head;
  const int64_t pi = base + t / a.page_size;
  int64_t page = a.page_table[pi];
  if (page < 0 || page >= a.n_pages) {
    report_status(a.status, k_bad_page, s, page, pi, a.n_pages);
    page = 0;
  }
  return page * a.stride_page + (t % a.page_size) * a.stride_token + int64_t(kvh) * a.stride_head;
}

template <dtype T>
__device__ __forceinline__ float load_elem(const void* base, int64_t i) {
  if constexpr (T == dtype::bf16)
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  else if constexpr (T == dtype::f16)
    return __half2float(static_cast<const __half*>(base)[i]);
  else
    return static_cast<const float*>(base)[i];
}

// The CPU-order dot product of q (shared, d floats) with row `row` of `kb` by a segment of
// o.lanes lanes (lane `a` of the segment holds accumulator a); the result is in the segment's
// lane 0. Every lane of the warp must call it (shuffles); `valid` false gives a dummy value.
// Used for the query signatures (d projections per head).
__device__ __forceinline__ float seg_dot(const float* q, const float* kb, int64_t row, int d,
                                         dot_order o, int a, bool valid) {
  float acc = 0.f;
  if (valid) {
    for (int j = a; j < d; j += o.lanes)
      acc = o.fused ? __fmaf_rn(q[j], kb[row + j], acc)
                    : __fadd_rn(acc, __fmul_rn(q[j], kb[row + j]));
  }
  if (o.fused) {
    for (int off = o.lanes / 2; off >= 1; off /= 2)
      acc = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, off, o.lanes));
  } else {
    for (int off = 1; off < o.lanes; off *= 2)
      acc = __fadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, off, o.lanes));
  }
  return acc;
}

// The CPU-order dot product of one row held in shared memory (16-byte words) with q (shared, 16-
// byte aligned): L accumulators, element j into accumulator j % L in order, fused or not, then
// the CPU's reduction tree (select_math.hpp cpu_order_dot), all in one thread's registers.
template <int Off>
__device__ __forceinline__ void halve(float* acc) {
#pragma unroll
  for (int x = 0; x < Off; ++x) acc[x] = __fadd_rn(acc[x], acc[x + Off]);
  if constexpr (Off > 1) halve<Off / 2>(acc);
}
template <dtype T, int D, int L, bool Fused>
__device__ __forceinline__ float row_dot(const uint4* row, const float* q) {
  constexpr int PW = kv_elem<T>::k_per_word, W = D / PW;
  float acc[L];
#pragma unroll
  for (int x = 0; x < L; ++x) acc[x] = 0.f;
  const float4* q4 = reinterpret_cast<const float4*>(q);
#pragma unroll
  for (int w = 0; w < W; ++w) {
    float x[PW], qv[PW];
    kv_elem<T>::unpack(row[w], x);
#pragma unroll
    for (int e = 0; e < PW / 4; ++e) {
      const float4 f = q4[w * (PW / 4) + e];
      qv[4 * e] = f.x, qv[4 * e + 1] = f.y, qv[4 * e + 2] = f.z, qv[4 * e + 3] = f.w;
    }
#pragma unroll
    for (int e = 0; e < PW; ++e) {
      const int j = w * PW + e;
      if constexpr (Fused)
        acc[j % L] = __fmaf_rn(qv[e], x[e], acc[j % L]);
      else
        acc[j % L] = __fadd_rn(acc[j % L], __fmul_rn(qv[e], x[e]));
    }
  }
  if constexpr (Fused) {
    halve<L / 2>(acc);  // halves first: L/2, ..., 1
  } else {              // the scalar kernel's (a0 + a1) + (a2 + a3)
    acc[0] = __fadd_rn(acc[0], acc[1]);
    acc[2] = __fadd_rn(acc[2], acc[3]);
    acc[0] = __fadd_rn(acc[0], acc[2]);
  }
  return acc[0];
}

template <dtype T, int D>
__device__ __forceinline__ float cpu_row_dot(const uint4* row, const float* q, dot_order o) {
  if (o.lanes == 32) return row_dot<T, D, 32, true>(row, q);
  if (o.lanes == 16) return row_dot<T, D, 16, true>(row, q);
  return row_dot<T, D, 4, false>(row, q);  // scalar: 4 accumulators, unfused
}

// --- scoring ----------------------------------------------------------------------------------

// A scoring tile: `k_tokens` K rows staged in shared memory by coalesced 16-byte loads (rows
// padded by one word: conflict-free 16-byte reads), one thread per row then computing the CPU-
// order dot products with each query row.
template <dtype T, int D>
struct tile_geom {
  static constexpr int k_es = sizeof(typename kv_elem<T>::type);
  static constexpr int k_words = D * k_es / 16;  // 16-byte words per row
  static constexpr int k_pitch = k_words + 1;
  static constexpr int k_tokens = k_es == 4 ? 64 : 128;        // rows per tile = threads per block
  static constexpr int k_batch = k_words < 16 ? k_words : 16;  // words per thread in flight
  static constexpr size_t k_tile_bytes = size_t(k_tokens) * k_pitch * 16;
};

// Shared memory of a scoring block serving `heads` query rows, with the first radix histogram.
template <dtype T, int D>
constexpr size_t score_smem(int heads) {
  return tile_geom<T, D>::k_tile_bytes + size_t(heads) * D * 4 + size_t(heads) * 256 * 4;
}

// Oracle logits (list_mode 0: grid (tiles, kv head, sequence), every token for the query heads
// of the kv group, and the first radix histogram of each head's top-k candidates), or the logits
// of the listed rows F + base sample of one query head (list_mode 1: grid (tiles, query head,
// sequence), for predictors and sampling without top-k; stored by list position; with gqa_shared
// the list is the kv group's, so the grid is (tiles, kv head, sequence) and each staged row is
// dotted with the group's G query rows), or (list_mode 2, refine) the same over the unit's
// shortlist C, entry i stored at n_sink + i (so that refine_finish can move the chosen ones down
// to their list positions in place). With refine_reuse, list mode 1 of a refine-pending unit
// skips F's top-k part (list positions [n_sink, n_f - n_local): refine_finish put their refine
// logits there), so its entry i is list position i below n_sink and i + (that part's size) above.
// q is scaled as the CPU scales it (one float multiply) and dotted in its order.
template <dtype T, int D>
__global__ void __launch_bounds__(tile_geom<T, D>::k_tokens)
    score_kernel(const run_kargs a, int list_mode) {
  using tg = tile_geom<T, D>;
  constexpr int NT = tg::k_tokens, W = tg::k_words, P = tg::k_pitch;
  extern __shared__ uint4 smem[];
  uint4* kt = smem;
  float* qs = reinterpret_cast<float*>(smem + NT * P);
  const int s = blockIdx.z, tid = threadIdx.x, G = a.group;
  const int32_t n = a.seq_len[s];
  if (n < 1 || n > a.n_max) return;  // reported by the selection
  const int64_t base = seq_base(a, s, n, false);
  if (base < 0) return;
  int kvh, h0, ng;
  int64_t count = n;
  const int32_t* lst = nullptr;
  // entry i is list position i < skip_at ? i : i + skip_n, its logit stored at store_off + that
  int64_t skip_at = INT64_MAX, skip_n = 0, store_off = 0;
  if (!list_mode) {
    kvh = blockIdx.y, h0 = kvh * G, ng = G;
  } else if (a.c.gqa_shared) {  // one list per kv group: each row staged once for its G heads
    kvh = blockIdx.y, h0 = kvh * G, ng = G;
  } else {
    h0 = blockIdx.y, kvh = h0 / G, ng = 1;
  }
  if (list_mode) {
    const int u = a.c.gqa_shared ? kvh : h0;
    const int64_t ui = int64_t(s) * a.n_units + u;
    const unit_rec ur = a.units[ui];
    if (list_mode == 2) {  // refine: the shortlist C of the unit
      const stages sr = resolve_stages(a.c, n);
      if (ur.skip || ur.dense || !refine_pending(a.c, sr)) return;
      count = sr.shortlist;
      lst = a.cand + ui * a.n_max;
      store_off = sr.n_sink;
    } else {
      if (ur.skip || ur.dense || ur.m0 < 1) return;
      count = ur.n_f + ur.m0;
      lst = a.list + ui * a.n_max;
      if (a.refine_reuse) {
        const stages sr = resolve_stages(a.c, n);
        if (refine_pending(a.c, sr)) {
          skip_at = sr.n_sink;
          skip_n = ur.n_f - sr.n_sink - sr.n_local;
          count -= skip_n;
        }
      }
    }
  }
  const int64_t i0 = int64_t(blockIdx.x) * NT;
  if (i0 >= count) return;
  int* hist = reinterpret_cast<int*>(qs + ng * D);
  const stages st = resolve_stages(a.c, n);
  const int64_t lo = st.n_sink, hi = n - st.n_local;
  const bool do_hist = !list_mode && a.c.select == int32_t(selector::topk) && !st.dense &&
                       st.k > 0 && st.k < hi - lo;
  for (int i = tid; i < ng * D; i += NT)
    qs[i] = __fmul_rn(a.q[(int64_t(s) * a.n_head_q + h0) * D + i], a.c.scale);
  if (do_hist)
    for (int i = tid; i < ng * 256; i += NT) hist[i] = 0;
  // Stage the tile: thread `tid` loads words tid, tid + NT, ... of the tile (row-major), so a
  // warp reads consecutive 16-byte words of consecutive rows; k_batch words in flight at once.
  const char* kb = static_cast<const char*>(a.k);
#pragma unroll
  for (int j0 = 0; j0 < W; j0 += tg::k_batch) {
    uint4 buf[tg::k_batch];
#pragma unroll
    for (int j = 0; j < tg::k_batch; ++j) {
      const int idx = (j0 + j) * NT + tid, r = idx / W, w = idx % W;
      const int64_t i = i0 + r;
      buf[j] = make_uint4(0, 0, 0, 0);
      if (i < count) {
        const int64_t t = lst ? lst[i < skip_at ? i : i + skip_n] : i;
        const int64_t off = row_of(a, s, base, t, kvh);
        buf[j] = __ldg(reinterpret_cast<const uint4*>(kb + off * tg::k_es) + w);
      }
    }
#pragma unroll
    for (int j = 0; j < tg::k_batch; ++j) {
      const int idx = (j0 + j) * NT + tid;
      kt[(idx / W) * P + idx % W] = buf[j];
    }
  }
  __syncthreads();
  const int64_t i = i0 + tid;
  const bool live = i < count;
  const int64_t pos = store_off + (i < skip_at ? i : i + skip_n);  // where the logit is stored
  const int64_t t = live ? (lst ? lst[pos - store_off] : i) : 0;
  for (int x = 0; x < ng; ++x) {
    float l = 0.f;
    if (live) {
      l = cpu_row_dot<T, D>(kt + tid * P, qs + x * D, a.order);
      if (!isfinite(l)) report_status(a.status, k_bad_key, s, t, kvh, 0);
      a.scores[(int64_t(s) * a.n_head_q + h0 + x) * a.n_max + pos] = __float_as_uint(l);
    }
    if (do_hist) hist_add(hist + x * 256, order_key(l) >> 24, live && t >= lo && t < hi);
  }
  if (do_hist) {
    __syncthreads();
    for (int b = tid; b < ng * 256; b += NT) {
      const int c = hist[b];
      if (c)
        atomicAdd(&a.hist[(int64_t(s) * a.n_head_q + h0 + b / 256) * k_hist_ints + b % 256], c);
    }
  }
}

// Zeroes the radix histograms of (query head, sequence) and, for predictor=signs, computes the
// query's signature: bit r = [w_r . q >= 0] with q unscaled, dotted in the CPU's order (its
// row_ops dot_f32). Grid (query head, sequence), k_prep_threads threads (32 warps: at most a few
// projections per warp, so the dependent load-and-reduce chains of one head overlap).
constexpr int k_prep_threads = 1024;
__global__ void __launch_bounds__(k_prep_threads) prep_kernel(const run_kargs a, int signs) {
  __shared__ float q[256];
  __shared__ uint32_t bits[256];
  const int h = blockIdx.x, s = blockIdx.y, d = a.d, kvh = h / a.group;
  int32_t* hist = a.hist + (int64_t(s) * a.n_head_q + h) * k_hist_ints;
  // Sign scores use the first histogram alone (one digit level), and the ticket after it.
  for (int i = threadIdx.x; i < (signs ? k_hist1 + 1 : k_hist_ints); i += blockDim.x) hist[i] = 0;
  // The flag pass's chunk tickets and look-back records of this head (and of unit h), and the
  // status record (block (0, 0)): cleared here rather than by two memsets before the launch.
  const int nc = a.n_chunks;
  unsigned long long* eq = a.eq_scan + (int64_t(s) * a.n_head_q + h) * nc;
  for (int i = threadIdx.x; i < nc; i += blockDim.x) eq[i] = 0;
  if (h < a.n_units) {
    unsigned long long* fs = a.f_scan + (int64_t(s) * a.n_units + h) * (nc + 1);
    for (int i = threadIdx.x; i <= nc; i += blockDim.x) fs[i] = 0;
  }
  if (h == 0 && s == 0 && threadIdx.x == 0) *a.status = device_status{};
  if (!signs) return;
  const int R = a.c.pred_bits;
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    q[i] = a.q[(int64_t(s) * a.n_head_q + h) * d + i];
  __syncthreads();
  const int lanes = a.order.lanes, per_warp = 32 / lanes;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, sub = lane / lanes, ai = lane % lanes;
  const float* w = a.proj + int64_t(kvh) * R * d;
  for (int rb = warp * per_warp; rb < R; rb += (k_prep_threads / 32) * per_warp) {
    const int r = rb + sub;
    const bool valid = r < R;
    const float x = seg_dot(q, w, valid ? int64_t(r) * d : 0, d, a.order, ai, valid);
    if (valid && ai == 0) bits[r] = x >= 0.0f ? 1u : 0u;
  }
  __syncthreads();
  if (threadIdx.x < a.words) {
    uint32_t word = 0;
    for (int b = 0; b < 32; ++b) word |= bits[32 * threadIdx.x + b] << b;
    a.qsig[(int64_t(s) * a.n_head_q + h) * k_max_words + threadIdx.x] = word;
  }
}

// --- the radix select, over many blocks ----------------------------------------------------------
//
// Top-k of [lo, hi) by (key desc, position asc), key = order_key of the f32 logit (oracle) or the
// sign score: the k-th key is found digit by digit from the top by histograms of the candidates
// that share the digits chosen so far (each pass a grid over the positions, counting into a
// global histogram with one atomic per distinct bin of a warp; the first histogram is built by the
// scoring kernel), each level's digit then found by a small kernel per head (a block-wide suffix
// scan of the histogram) and kept in the head's key_prefix record (sign scores, one level: the
// scoring kernel's last block per kv group finds it, with no digit kernel). The flagging pass takes
// the keys above the k-th and, where more keys equal it than are taken, the lowest positions among
// those equal (a block scan plus the equal keys of earlier chunks, by look-back): the set of the
// CPU's nth_element with its position tie-break, on any number of blocks.

using pscan_t = cub::BlockScan<int, k_pass_threads>;
using preduce_t = cub::BlockReduce<int, k_pass_threads>;

struct pass_shared {
  typename pscan_t::TempStorage scan;
  int64_t i64[2];
  uint32_t u32[2];
  int i32[2];
};

struct radix_level {
  int shift, bins, offset;  // digit position, bins, offset of its histogram in the head's block
};
__device__ inline radix_level radix_level_at(bool is_float, int i) {
  if (!is_float) return {0, k_hist1, 0};
  if (i == 0) return {24, 256, 0};
  if (i == 1) return {12, k_hist2, k_hist1};
  return {0, k_hist3, k_hist1 + k_hist2};
}

// The digit of the k-th largest candidate: bins scanned from the top; returns the bin where the
// running count reaches kk and sets kk to its rank within that bin. Block-wide (every thread).
__device__ uint32_t find_digit(const int32_t* hist, int bins, int64_t& kk, pass_shared& sh) {
  const int tid = threadIdx.x, per = (bins + k_pass_threads - 1) / k_pass_threads;
  // thread tid covers bins [top - per, top), top = bins - tid * per (thread 0: the highest)
  const int top = bins - tid * per;
  int sum = 0;
  for (int b = top - 1; b >= 0 && b >= top - per; --b) sum += hist[b];
  int before, total;
  pscan_t(sh.scan).ExclusiveSum(sum, before, total);
  if (tid == 0) sh.u32[0] = 0, sh.i64[0] = kk;
  __syncthreads();
  if (before < kk && kk <= int64_t(before) + sum) {
    int64_t above = before;
    for (int b = top - 1; b >= 0 && b >= top - per; --b) {
      if (above + hist[b] >= kk) {
        sh.u32[0] = uint32_t(b);
        sh.i64[0] = kk - above;
        break;
      }
      above += hist[b];
    }
  }
  __syncthreads();
  const uint32_t dg = sh.u32[0];
  kk = sh.i64[0];
  __syncthreads();
  return dg;
}

__device__ __forceinline__ uint32_t key_at(const uint32_t* keys, bool is_float, int64_t t) {
  const uint32_t x = keys[t];
  return is_float ? order_key(__uint_as_float(x)) : x;
}

// What a pass needs about one query head's top-k: the candidate range, k, whether the radix
// select runs at all (k < the range: else none or all of it is taken).
struct topk_range {
  int64_t lo, hi, k;
  bool radix;
};
__device__ inline bool seq_ok(const run_kargs& a, int s, int32_t n) {
  return n >= 1 && n <= a.n_max && seq_base(a, s, n, false) >= 0;
}
__device__ inline topk_range topk_of(const run_kargs& a, int32_t n) {
  const stages st = resolve_stages(a.c, n);
  topk_range r{st.n_sink, n - st.n_local, select_count(a.c, st), false};
  r.radix = a.c.select == int32_t(selector::topk) && !st.dense && r.k > 0 && r.k < r.hi - r.lo;
  return r;
}

// Bits each token's signature shares with each query head's, the (only) radix histogram of those
// scores over the top-k candidates, and its digit: grid (token blocks, kv head, sequence), one
// thread per token, 16-byte signature loads. Each warp counts into its own copy of the group's
// histograms (sign_copies of them; plain shared atomics, no per-token warp vote), merged into the
// global one at the end. The last block of a (kv head, sequence) to merge (a ticket from the
// counter after the group's first histogram, cleared by prep_kernel) finds each head's digit,
// kk and ties from the finished histograms into sel (one warp per head, in parallel) for flag_pass.
template <int W>  // signature words (pred_bits / 32), a compile-time count: no predicated loops
__global__ void __launch_bounds__(k_sign_threads) sign_scores(const run_kargs a, int copies) {
  extern __shared__ int shist[];  // [copies, rows, k_sign_bins]
  __shared__ alignas(16) uint32_t qw[64 * W];
  __shared__ pass_shared sh;
  const int kvh = blockIdx.y, s = blockIdx.z, G = a.group, tid = threadIdx.x;
  const int32_t n = a.seq_len[s];
  if (n < 1 || n > a.n_max || n > a.ix_n_max) return;
  const int64_t t0 = int64_t(blockIdx.x) * k_sign_tokens;
  if (t0 >= n) return;
  const int64_t t1 = min64(t0 + k_sign_tokens, int64_t(n));
  const stages st = resolve_stages(a.c, n);
  const int64_t lo = st.n_sink, hi = n - st.n_local, sk = select_count(a.c, st);
  const bool do_hist = !st.dense && sk > 0 && sk < hi - lo;
  const int rows = a.max_rows ? 1 : G;  // score rows of the group (refine + gqa_shared: 1)
  const bool qw_shared = G <= 64;
  const int hn = rows * k_sign_bins;  // ints per histogram copy: one histogram per score row
  const uint32_t* qg0 = a.qsig + (int64_t(s) * a.n_head_q + kvh * G) * k_max_words;
  for (int i = tid; i < G * W && qw_shared; i += blockDim.x)
    qw[i] = qg0[i / W * k_max_words + i % W];
  if (do_hist)
    for (int i = tid; i < copies * hn; i += blockDim.x) shist[i] = 0;
  __syncthreads();
  int* mine = shist + (tid / 32) % copies * hn;
  // The query words of head g: packed W apart in shared memory, or k_max_words apart in qsig.
  auto qword = [&](int g, int i) {
    return qw_shared ? qw[g * W + i] : __ldg(qg0 + g * k_max_words + i);
  };
  // All of the thread's signatures are loaded before any is scored (k_sign_iters loads in flight
  // per thread instead of one).
  constexpr int k_sign_iters = k_sign_tokens / k_sign_threads;
  static_assert(k_sign_tokens % k_sign_threads == 0, "a sign block's tokens: whole steps");
  uint32_t kw[k_sign_iters][W];
  const uint32_t* sig = a.sig + (int64_t(s) * a.n_head_kv + kvh) * a.ix_n_max * W;
#pragma unroll
  for (int it = 0; it < k_sign_iters; ++it) {
    const int64_t t = t0 + int64_t(it) * k_sign_threads + tid;
    const uint32_t* ks = sig + (t < t1 ? t : t0) * W;
    if constexpr (W % 4 == 0) {
#pragma unroll
      for (int i = 0; i < W / 4; ++i) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(ks) + i);
        kw[it][4 * i] = v.x, kw[it][4 * i + 1] = v.y, kw[it][4 * i + 2] = v.z,
                   kw[it][4 * i + 3] = v.w;
      }
    } else if constexpr (W % 2 == 0) {
#pragma unroll
      for (int i = 0; i < W / 2; ++i) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(ks) + i);
        kw[it][2 * i] = v.x, kw[it][2 * i + 1] = v.y;
      }
    } else {
#pragma unroll
      for (int i = 0; i < W; ++i) kw[it][i] = __ldg(ks + i);
    }
  }
  uint16_t* srow =
      reinterpret_cast<uint16_t*>(a.scores) + (int64_t(s) * a.n_head_q + kvh * G) * pad8(a.n_max);
  const int bits = a.c.pred_bits;
#pragma unroll
  for (int it = 0; it < k_sign_iters; ++it) {
    const int64_t t = t0 + int64_t(it) * k_sign_threads + tid;
    if (t >= t1) break;
    const bool cand = do_hist && t >= lo && t < hi;
    if (a.max_rows) {  // the group's score: the most bits any of its heads shares (fewest diffs)
      int c = 1 << 30;
      for (int g = 0; g < G; ++g) {
        int cg = 0;
#pragma unroll
        for (int i = 0; i < W; ++i) cg += __popc(qword(g, i) ^ kw[it][i]);
        c = min(c, cg);
      }
      const uint32_t score = uint32_t(bits - c);
      srow[t] = uint16_t(score);
      if (cand) atomicAdd(mine + score, 1);
      continue;
    }
    for (int g = 0; g < G; ++g) {
      int c = 0;
#pragma unroll
      for (int i = 0; i < W; ++i) c += __popc(qword(g, i) ^ kw[it][i]);
      const uint32_t score = uint32_t(bits - c);
      srow[int64_t(g) * pad8(a.n_max) + t] = uint16_t(score);
      if (cand) atomicAdd(mine + g * k_sign_bins + score, 1);
    }
  }
  if (!do_hist) return;
  __syncthreads();
  int32_t* ghist = a.hist + (int64_t(s) * a.n_head_q + kvh * G) * k_hist_ints;
  for (int b = tid; b < hn; b += blockDim.x) {
    int c = 0;
    for (int x = 0; x < copies; ++x) c += shist[x * hn + b];
    if (c) atomicAdd(&ghist[(b / k_sign_bins) * k_hist_ints + b % k_sign_bins], c);
  }
  // The last block to merge sees every block's adds (each fenced before its ticket).
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int blocks = int((n + k_sign_tokens - 1) / k_sign_tokens);
    sh.i32[0] = atomicAdd(&ghist[k_hist1], 1) == blocks - 1;
  }
  __syncthreads();
  if (!sh.i32[0]) return;
  __threadfence();
  // One warp per head of the group, in parallel: lane l holds the head's bins [top - per, top),
  // top = k_sign_bins - l * per (lane 0 the highest; scores are 0..256, the bins above are never
  // counted), a warp scan of the lanes' sums finds the lane where the count from the top reaches
  // k, and that lane the bin: the digit, rank and ties of find_digit over the whole histogram.
  constexpr int per = (k_sign_bins + 31) / 32;
  const int lane = tid % 32;
  for (int g = tid / 32; g < rows; g += k_sign_threads / 32) {
    const int32_t* hg = ghist + int64_t(g) * k_hist_ints;
    const int top = k_sign_bins - lane * per;
    int v[per], sum = 0;
#pragma unroll
    for (int j = 0; j < per; ++j) {
      v[j] = top - 1 - j >= 0 ? __ldcg(hg + top - 1 - j) : 0;
      sum += v[j];
    }
    const int incl = warp_inclusive_sum(sum, lane);
    int64_t above = incl - sum;
    if (above < sk && sk <= int64_t(incl)) {
      key_prefix p{0, uint32_t(k_hist1 - 1), sk, 0};
#pragma unroll
      for (int j = 0; j < per; ++j) {
        if (above + v[j] >= sk) {
          p.prefix = uint32_t(top - 1 - j);
          p.kk = sk - above;
          p.ties = v[j] > p.kk;
          break;
        }
        above += v[j];
      }
      a.sel[int64_t(s) * a.n_head_q + kvh * G + g] = p;
    }
  }
}

// sign_scores for a signature of `words` 32-bit words (pred_bits / 32: 1 .. 8).
template <typename F>
void with_sign_words(int words, F&& f) {
  switch (words) {
    case 1:
      return f(sign_scores<1>);
    case 2:
      return f(sign_scores<2>);
    case 3:
      return f(sign_scores<3>);
    case 4:
      return f(sign_scores<4>);
    case 5:
      return f(sign_scores<5>);
    case 6:
      return f(sign_scores<6>);
    case 7:
      return f(sign_scores<7>);
    default:
      return f(sign_scores<8>);
  }
}

// One digit level of the k-th key per (query head, sequence) from the finished histogram of that
// level: grid (query head, sequence), k_pass_threads threads.
__global__ void __launch_bounds__(k_pass_threads) digit_kernel(const run_kargs a, int level) {
  __shared__ pass_shared sh;
  const int h = blockIdx.x, s = blockIdx.y;
  const int32_t n = a.seq_len[s];
  if (!seq_ok(a, s, n)) return;
  const topk_range r = topk_of(a, n);
  if (!r.radix) return;
  const bool is_float = a.c.pred == int32_t(predictor::oracle);
  key_prefix* sel = a.sel + int64_t(s) * a.n_head_q + h;
  key_prefix p = level == 0 ? key_prefix{0, 0, r.k, 0} : *sel;
  const radix_level lv = radix_level_at(is_float, level);
  const int32_t* hist = a.hist + (int64_t(s) * a.n_head_q + h) * k_hist_ints + lv.offset;
  const uint32_t dg = find_digit(hist, lv.bins, p.kk, sh);
  p.prefix |= dg << lv.shift;
  p.mask |= uint32_t(lv.bins - 1) << lv.shift;
  // The last level's bin dg holds exactly the candidates equal to the k-th key.
  p.ties = level == (is_float ? 2 : 0) && hist[dg] > p.kk;
  if (threadIdx.x == 0) *sel = p;
}

// Radix histogram level `level` (1 or 2; level 0 came from scoring): grid (spans of k_hist_span
// positions, query head, sequence). Level 1 counts in shared memory, then adds the non-empty bins;
// level 2 adds straight to the global histogram (warp-aggregated).
__global__ void __launch_bounds__(k_pass_threads) hist_pass(const run_kargs a, int level) {
  constexpr int B = 8;  // keys per thread in flight
  __shared__ int hist[k_hist2];
  const int c = blockIdx.x, h = blockIdx.y, s = blockIdx.z, tid = threadIdx.x;
  const int32_t n = a.seq_len[s];
  if (!seq_ok(a, s, n)) return;
  const topk_range r = topk_of(a, n);
  const int64_t c0 = max64(int64_t(c) * k_hist_span, r.lo);
  const int64_t c1 = min64(int64_t(c + 1) * k_hist_span, r.hi);
  if (!r.radix || c0 >= c1) return;
  const bool is_float = a.c.pred == int32_t(predictor::oracle);
  const key_prefix p = a.sel[int64_t(s) * a.n_head_q + h];
  const radix_level lv = radix_level_at(is_float, level);
  const uint32_t* keys = a.scores + (int64_t(s) * a.n_head_q + h) * a.n_max;
  int32_t* out = a.hist + (int64_t(s) * a.n_head_q + h) * k_hist_ints + lv.offset;
  // Level 2: few keys share the k-th key's first 20 bits, so they are counted in place (no
  // shared histogram of 4096 bins to clear and flush).
  int* hd = level == 2 ? out : hist;
  if (level != 2) {
    for (int b = tid; b < lv.bins; b += k_pass_threads) hist[b] = 0;
    __syncthreads();
  }
  for (int64_t tb = c0; tb < c1; tb += B * k_pass_threads) {  // uniform trip count (hist_add)
    uint32_t x[B];
#pragma unroll
    for (int i = 0; i < B; ++i) {
      const int64_t t = tb + i * k_pass_threads + tid;
      x[i] = t < c1 ? key_at(keys, is_float, t) : 0u;
    }
#pragma unroll
    for (int i = 0; i < B; ++i) {
      const int64_t t = tb + i * k_pass_threads + tid;
      hist_add(hd, (x[i] >> lv.shift) & uint32_t(lv.bins - 1),
               t < c1 && (x[i] & p.mask) == p.prefix);
    }
  }
  if (level == 2) return;
  __syncthreads();
  for (int b = tid; b < lv.bins; b += k_pass_threads)
    if (hist[b]) atomicAdd(&out[b], hist[b]);
}

// A single-pass scan over chunks with decoupled look-back (as CUB's), by one warp (every lane
// calls it; all get the result): chunk c publishes its count at once (k_aggr), reads the status of
// the 32 chunks before it together (waiting until each has published), adds their counts down to
// the nearest inclusive prefix (k_incl), goes 32 further back if there was none, then publishes
// its own inclusive prefix. Returns the sum of the counts of chunks 0 .. c-1.
constexpr unsigned long long k_aggr = 1ull << 62, k_incl = 1ull << 63, k_scan_val = k_aggr - 1;
__device__ int64_t look_back(unsigned long long* st, int c, int64_t cnt) {
  const int lane = int(threadIdx.x % 32);
  if (c == 0) {
    if (lane == 0) atomicExch(&st[0], k_incl | static_cast<unsigned long long>(cnt));
    return 0;
  }
  if (lane == 0) atomicExch(&st[c], k_aggr | static_cast<unsigned long long>(cnt));
  int64_t before = 0;
  for (int top = c - 1;; top -= 32) {
    const int j = top - lane;
    unsigned long long v = 0;
    if (j >= 0)
      while ((v = atomicAdd(&st[j], 0ull)) == 0) __nanosleep(32);
    const unsigned incl = __ballot_sync(0xffffffffu, (v & k_incl) != 0);
    const int stop = incl ? __ffs(incl) - 1 : 31;  // the nearest inclusive prefix (chunk 0 is one)
    int64_t x = lane <= stop ? int64_t(v & k_scan_val) : 0;
    for (int o = 16; o >= 1; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    before += x;
    if (incl) break;
  }
  if (lane == 0) atomicExch(&st[c], k_incl | static_cast<unsigned long long>(before + cnt));
  return before;
}

// F over one chunk of a unit, compacted in the same pass: the flags (sinks, local window, each
// unit head's top-k), then F's members in ascending order at (members in earlier chunks, by
// look-back) + (rank in the chunk, a block scan), and the unit record (stage sizes, the dense
// fallbacks, bad device-side values reported here). Grid (chunks, unit, sequence); the chunk a
// block serves is a ticket taken from the unit's counter in the order blocks start, so every
// chunk a look-back waits for is held by a block that has started. Thread tid owns positions
// c0 + 8 tid .. + 7 (the scans keep position order). Dense units get their list (0 .. n-1) from
// finish_kernel.
__global__ void __launch_bounds__(k_pass_threads) flag_pass(const run_kargs a) {
  __shared__ pass_shared sh;
  const int u = blockIdx.y, s = blockIdx.z, tid = threadIdx.x;
  const int64_t ui = int64_t(s) * a.n_units + u;
  unit_rec* ur = a.units + ui;
  const bool lead = blockIdx.x == 0 && tid == 0;
  const int32_t n = a.seq_len[s];
  bool bad = false;
  if (n < 1 || n > a.n_max) {
    if (lead) report_status(a.status, k_bad_seq_len, s, n, a.n_max, 0);
    bad = true;
  } else if (seq_base(a, s, n, lead) < 0) {
    bad = true;
  } else if (a.c.pred == int32_t(predictor::sign_bits) && a.c.select == int32_t(selector::topk) &&
             a.ix_count[s] != n) {
    if (lead) report_status(a.status, k_bad_index_len, s, a.ix_count[s], n, 0);
    bad = true;
  }
  if (bad) {
    if (lead) *ur = unit_rec{0, 0, 0, 0, 0, 1};
    return;
  }
  const stages st = resolve_stages(a.c, n);
  if (st.dense) {  // attention over every token
    if (lead) *ur = unit_rec{n, n, 0, 0, 1, 0};
    return;
  }
  unsigned long long* scan = a.f_scan + ui * (a.n_chunks + 1);
  if (tid == 0) sh.i32[0] = int(atomicAdd(scan, 1ull));
  __syncthreads();
  const int c = sh.i32[0];
  __syncthreads();
  const int64_t c0 = int64_t(c) * k_chunk;
  if (c0 >= n) return;
  const topk_range r = topk_of(a, n);
  // refine > 1: the predictor's choice is the shortlist C, compacted into cand (F is finished by
  // the refine kernels); else it joins F here.
  const bool pend = refine_pending(a.c, st);
  const int64_t p0 = c0 + int64_t(tid) * k_per_thread;
  uint32_t f = 0;   // bit i: position p0 + i is in F (sinks, local)
  uint32_t tk = 0;  // bit i: position p0 + i is chosen by the predictor (top-k, or C)
#pragma unroll
  for (int i = 0; i < k_per_thread; ++i) {
    const int64_t t = p0 + i;
    if (t < n && (t < st.n_sink || t >= n - st.n_local)) f |= 1u << i;
  }
  if (a.c.select == int32_t(selector::topk) && r.k > 0) {
    const bool is_float = a.c.pred == int32_t(predictor::oracle);
    const int h0 = a.c.gqa_shared ? u * a.group : u;
    for (int x = 0; x < (a.max_rows ? 1 : a.unit_heads); ++x) {
      const int h = h0 + x;
      if (!r.radix) {  // k covers the whole range
#pragma unroll
        for (int i = 0; i < k_per_thread; ++i)
          if (p0 + i >= r.lo && p0 + i < r.hi) tk |= 1u << i;
        continue;
      }
      const int64_t row = int64_t(s) * a.n_head_q + h;
      key_prefix p;
      uint32_t kx[k_per_thread];  // the keys of positions p0 .. p0 + 7 (0 outside [lo, hi))
      if (is_float) {
        p = a.sel[row];
        const uint32_t* keys = a.scores + row * a.n_max;
#pragma unroll
        for (int i = 0; i < k_per_thread; ++i) {
          const int64_t t = p0 + i;
          kx[i] = (t >= r.lo && t < r.hi) ? key_at(keys, true, t) : 0u;
        }
      } else {
        // Sign scores: the only digit was found by the scoring kernel's last block of the head's
        // group (no digit kernel launch); the 8 keys are one 16-byte load (p0 is 8-aligned, and
        // p0 < n keeps it inside the padded row).
        p = a.sel[row];
        const uint16_t* keys = reinterpret_cast<const uint16_t*>(a.scores) + row * pad8(a.n_max);
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (p0 < n) v = *reinterpret_cast<const uint4*>(keys + p0);
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < k_per_thread; ++i) {
          const int64_t t = p0 + i;
          kx[i] = (t >= r.lo && t < r.hi) ? (w[i / 2] >> (16 * (i % 2))) & 0xffffu : 0u;
        }
      }
      if (!p.ties) {  // every key equal to the k-th is taken: the keys >= it
#pragma unroll
        for (int i = 0; i < k_per_thread; ++i) {
          const int64_t t = p0 + i;
          if (t >= r.lo && t < r.hi && kx[i] >= p.prefix) tk |= 1u << i;
        }
        continue;
      }
      int eq = 0;
#pragma unroll
      for (int i = 0; i < k_per_thread; ++i) {
        const int64_t t = p0 + i;
        if (t >= r.lo && t < r.hi) eq += kx[i] == p.prefix;
      }
      int rank, total;
      pscan_t(sh.scan).ExclusiveSum(eq, rank, total);
      if (tid < 32) {  // keys equal to the k-th in earlier chunks
        const int64_t b =
            look_back(a.eq_scan + (int64_t(s) * a.n_head_q + h) * a.n_chunks, c, total);
        if (tid == 0) sh.i64[1] = b;
      }
      __syncthreads();
      int64_t taken = sh.i64[1] + rank;
      __syncthreads();
#pragma unroll
      for (int i = 0; i < k_per_thread; ++i) {
        const int64_t t = p0 + i;
        if (t < r.lo || t >= r.hi) continue;
        if (kx[i] > p.prefix) tk |= 1u << i;
        if (kx[i] == p.prefix) {
          if (taken < p.kk) tk |= 1u << i;
          ++taken;
        }
      }
    }
  }
  if (!pend) f |= tk;
  // The flags are read by the walk alone (none without sampling) and, with a shortlist, by the
  // refine kernels (which add the chosen members of C): one 8-byte store of the thread's 8
  // positions (rows padded to 8 entries, p0 8-aligned; p0 < n keeps it in the row).
  if ((a.c.sample != int32_t(sampling::none) || pend) && p0 < n) {
    uint32_t lo4 = 0, hi4 = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      lo4 |= ((f >> i) & 1u) << (8 * i);
      hi4 |= ((f >> (i + 4)) & 1u) << (8 * i);
    }
    *reinterpret_cast<uint2*>(a.flags + ui * pad8(a.n_max) + p0) = make_uint2(lo4, hi4);
  }
  const uint32_t out = pend ? tk : f;  // compacted: F, or the shortlist C
  int rank, cnt;
  pscan_t(sh.scan).ExclusiveSum(__popc(out), rank, cnt);
  if (tid < 32) {
    const int64_t b = look_back(scan + 1, c, cnt);
    if (tid == 0) sh.i64[0] = b;
  }
  __syncthreads();
  const int64_t before = sh.i64[0];
  int32_t* list = (pend ? a.cand : a.list) + ui * a.n_max;
  int64_t at = before + rank;
#pragma unroll
  for (int i = 0; i < k_per_thread; ++i)
    if ((out >> i) & 1u) list[at++] = int32_t(p0 + i);
  if (tid == 0 && c == int((n - 1) / k_chunk) && pend) {  // F comes from refine_finish
    *ur = unit_rec{n, 0, 0, 0, 0, 0};
  } else if (tid == 0 && c == int((n - 1) / k_chunk)) {  // the last chunk: F's size is known
    const int64_t n_f = before + cnt, n_s = n - n_f;
    *ur = n_s < 2 ? unit_rec{n, n, 0, 0, 1, 0}  // too few left to sample: dense
                  : unit_rec{n, n_f, n_s, first_draws(a.c, n_s), 0, 0};
  }
}

// --- refine (refine > 1): each unit head's k best exact logits among the shortlist --------------
//
// After flag_pass compacted the unit's shortlist C (ascending) into cand and flagged the sinks
// and the local window, score_kernel (list mode 2) computed every unit head's logits of C's rows
// in the CPU's order (by list position, entry i at n_sink + i). refine_select, one block per (query
// head, sequence), finds the head's k-th largest logit among the L = |C| entries by a block-level
// radix select (12-, 12- and 8-bit digits from the top; after a digit, the keys sharing the digits
// so far are copied to shared memory when they fit k_refine_compact, and the later digits count
// only those), then flags the entries above it and, where more equal it than are taken, the
// lowest positions among those equal (C is ascending: list order is position order), as the CPU's
// (logit desc, position asc) order does. The heads of a unit flag the same rows (a byte store of
// 1: the union). refine_finish, one block per (unit, sequence), compacts F = sinks, C's flagged
// entries, local window (ascending) into the list and writes the unit record.
using sscan_t = cub::BlockScan<int, k_sel_threads>;
// refine_select keeps the first k_refine_smem keys of the head's shortlist in shared memory
// (64 KiB: L = 2k at 5% of 160K tokens), the rest are re-read from L2 at each level.
constexpr int k_refine_smem = 16384;
inline size_t refine_smem(int64_t n_max) {
  return size_t(std::min<int64_t>(n_max, k_refine_smem)) * 4;
}
constexpr int k_refine_bins = 4096;     // the widest digit: 12 bits
constexpr int k_refine_compact = 4096;  // keys sharing the digits so far, kept when they fit
// refine_finish's rounds: k_sel_threads x 16 shortlist entries (with refine_reuse, a round's
// chosen logits pass through shared memory: at most min(L, round) of them)
constexpr int k_finish_round = 16384;
inline size_t finish_smem(int64_t shortlist_max) {
  return size_t(std::min<int64_t>(shortlist_max, k_finish_round)) * 4;
}

__global__ void __launch_bounds__(k_sel_threads) refine_select(const run_kargs a, int cap) {
  extern __shared__ uint32_t skeys[];  // order keys of the shortlist's first `cap` entries
  __shared__ int hist[k_refine_bins];
  __shared__ uint32_t ckeys[k_refine_compact];  // the keys sharing the digits so far (compact)
  __shared__ typename sscan_t::TempStorage scan;
  __shared__ uint32_t s_digit;
  __shared__ int64_t s_kk;
  __shared__ int s_eq, s_cn;
  const int h = blockIdx.x, s = blockIdx.y, tid = threadIdx.x, lane = tid % 32;
  const int u = a.c.gqa_shared ? h / a.group : h;
  const int64_t ui = int64_t(s) * a.n_units + u;
  const unit_rec ur = a.units[ui];
  if (ur.skip || ur.dense) return;
  const stages st = resolve_stages(a.c, int32_t(ur.n));
  if (!refine_pending(a.c, st)) return;
  const int64_t L = st.shortlist;
  // the refine logits of C's entry i, at n_sink + i (score_kernel list mode 2)
  const uint32_t* lg = a.scores + (int64_t(s) * a.n_head_q + h) * a.n_max + st.n_sink;
  const int32_t* cand = a.cand + ui * a.n_max;
  uint8_t* flags = a.flags + ui * pad8(a.n_max);
  // entry i's order key (after level 0, which fills skeys)
  auto key_at = [&](int64_t i) {
    return i < cap ? skeys[i] : order_key(__uint_as_float(__ldcg(lg + i)));
  };
  uint32_t prefix = 0, mask = 0;
  int64_t kk = st.k;
  int eq_count = 0, cn = -1;  // cn >= 0: the candidates are the cn keys of ckeys
  for (int level = 0; level < 3; ++level) {
    const int bits = level < 2 ? 12 : 8, shift = level == 0 ? 20 : level == 1 ? 8 : 0;
    const int nb = 1 << bits;
    const uint32_t dmask = uint32_t(nb - 1);
    for (int b = tid; b < nb; b += k_sel_threads) hist[b] = 0;
    __syncthreads();
    if (cn >= 0) {
      for (int i0 = 0; i0 < cn; i0 += k_sel_threads) {  // uniform trip count (hist_add)
        const int i = i0 + tid;
        const uint32_t key = i < cn ? ckeys[i] : 0u;
        hist_add(hist, (key >> shift) & dmask, i < cn);
      }
    } else {
      for (int64_t i0 = 0; i0 < L; i0 += k_sel_threads) {  // uniform trip count (hist_add)
        const int64_t i = i0 + tid;
        uint32_t key = 0;
        if (i < L) {
          if (level > 0) {
            key = key_at(i);
          } else {
            key = order_key(__uint_as_float(__ldcg(lg + i)));
            if (i < cap) skeys[i] = key;
          }
        }
        hist_add(hist, (key >> shift) & dmask, i < L && (key & mask) == prefix);
      }
    }
    __syncthreads();
    // The digit: thread t sums bins nb - 1 - 4 t .. nb - 4 - 4 t (from the top), a block scan of
    // the sums finds the bin where the count from the top reaches kk.
    int v[4], sum = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int b = nb - 1 - 4 * tid - j;
      sum += (v[j] = b >= 0 ? hist[b] : 0);
    }
    int excl, total;
    sscan_t(scan).ExclusiveSum(sum, excl, total);
    int64_t above = excl;
    if (above < kk && kk <= above + sum) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (above + v[j] >= kk) {
          s_digit = uint32_t(nb - 1 - 4 * tid - j);
          s_kk = kk - above;
          s_eq = v[j];
          break;
        }
        above += v[j];
      }
    }
    __syncthreads();
    prefix |= s_digit << shift;
    mask |= dmask << shift;
    kk = s_kk;
    eq_count = s_eq;
    // Every candidate sharing the digits so far is taken: the keys whose digits so far are >=
    // prefix are exactly the top k (no further level, no ties).
    if (eq_count == kk || level == 2) break;
    if (cn < 0 && eq_count <= k_refine_compact) {  // keep only the candidates from here on
      if (tid == 0) s_cn = 0;
      __syncthreads();
      for (int64_t i0 = 0; i0 < L; i0 += k_sel_threads) {  // uniform trip count (ballot)
        const int64_t i = i0 + tid;
        const uint32_t key = i < L ? key_at(i) : 0u;
        const bool m = i < L && (key & mask) == prefix;
        const unsigned bal = __ballot_sync(0xffffffffu, m);
        int base = 0;
        if (lane == 0 && bal) base = atomicAdd(&s_cn, __popc(bal));
        base = __shfl_sync(0xffffffffu, base, 0);
        if (m) ckeys[base + __popc(bal & ((1u << lane) - 1u))] = key;
      }
      cn = eq_count;
    }
    __syncthreads();
  }
  // prefix (under mask) holds the k-th key's digits; eq_count keys share them, of which the first
  // kk (by position) are taken: all of them when eq_count == kk (then no ties: mask may be
  // partial).
  if (eq_count == kk) {
    for (int64_t i = tid; i < L; i += k_sel_threads)
      if ((key_at(i) & mask) >= prefix) flags[cand[i]] = 1;
    return;
  }
  // Ties (all 32 bits found): thread t owns a run of consecutive entries, one block scan of the
  // runs' counts of equal keys ranks them by position.
  const int64_t per = (L + k_sel_threads - 1) / k_sel_threads;
  const int64_t b0 = min64(L, tid * per), b1 = min64(L, b0 + per);
  int c = 0;
  for (int64_t i = b0; i < b1; ++i) c += key_at(i) == prefix ? 1 : 0;
  int rank, total;
  sscan_t(scan).ExclusiveSum(c, rank, total);
  int64_t r = rank;
  for (int64_t i = b0; i < b1; ++i) {
    const uint32_t key = key_at(i);
    if (key > prefix || (key == prefix && r++ < kk)) flags[cand[i]] = 1;
  }
}

__global__ void __launch_bounds__(k_sel_threads) refine_finish(const run_kargs a) {
  extern __shared__ uint32_t moved[];  // refine_reuse: a round's chosen logits, in list order
  constexpr int IPT = k_finish_round / k_sel_threads, W = k_sel_threads / 32;
  static_assert(IPT * W <= k_sel_threads, "one scan entry per (row, warp)");
  __shared__ typename sscan_t::TempStorage scan;
  __shared__ uint32_t sbal[IPT * W];  // per (row j, warp): the chosen lanes
  __shared__ int woff[IPT * W];       // per (row j, warp): its first rank in the round
  const int u = blockIdx.x, s = blockIdx.y, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t ui = int64_t(s) * a.n_units + u;
  unit_rec* urp = a.units + ui;
  const unit_rec ur = *urp;
  if (ur.skip || ur.dense) return;
  const int64_t n = ur.n;
  const stages st = resolve_stages(a.c, int32_t(n));
  if (!refine_pending(a.c, st)) return;
  const int64_t lo = st.n_sink, hi = n - st.n_local, L = st.shortlist;
  const int32_t* cand = a.cand + ui * a.n_max;
  const uint8_t* flags = a.flags + ui * pad8(a.n_max);
  int32_t* list = a.list + ui * a.n_max;
  for (int64_t i = tid; i < lo; i += k_sel_threads) list[i] = int32_t(i);
  // Rounds of IPT rows of k_sel_threads entries: entry r0 + j k_sel_threads + tid (a warp's loads
  // and stores coalesced, C ascending: its flag loads close together), ranked in entry order, i.e.
  // position order, by (row, warp) counts of the chosen lanes (one block scan) and each lane's
  // chosen lanes below it in its warp.
  const unsigned below = (1u << lane) - 1u;
  int64_t at = lo;
  for (int64_t r0 = 0; r0 < L; r0 += k_finish_round) {
    int32_t t[IPT];
#pragma unroll
    for (int j = 0; j < IPT; ++j) {
      const int64_t i = r0 + int64_t(j) * k_sel_threads + tid;
      t[j] = i < L ? cand[i] : -1;
    }
    uint32_t take = 0;
#pragma unroll
    for (int j = 0; j < IPT; ++j)
      if (t[j] >= 0 && flags[t[j]]) take |= 1u << j;
#pragma unroll
    for (int j = 0; j < IPT; ++j) {
      const unsigned bal = __ballot_sync(0xffffffffu, (take >> j) & 1u);
      if (lane == 0) sbal[j * W + warp] = bal;
    }
    __syncthreads();
    int off, total;
    sscan_t(scan).ExclusiveSum(tid < IPT * W ? __popc(sbal[tid]) : 0, off, total);
    if (tid < IPT * W) woff[tid] = off;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < IPT; ++j)
      if ((take >> j) & 1u)
        list[at + woff[j * W + warp] + __popc(sbal[j * W + warp] & below)] = t[j];
    if (a.refine_reuse) {
      // The unit heads' refine logits of the chosen entries, at lo + i (list mode 2), moved to
      // their list positions at + rank in place, through shared memory: a destination is never
      // above its source (at most i entries of C precede entry i), so with the rounds in order
      // and a round's reads before its writes (a barrier) no unread logit is overwritten.
      const int h0 = a.c.gqa_shared ? u * a.group : u;
      for (int x = 0; x < a.unit_heads; ++x) {
        uint32_t* row = a.scores + (int64_t(s) * a.n_head_q + h0 + x) * a.n_max;
#pragma unroll
        for (int j = 0; j < IPT; ++j)
          if ((take >> j) & 1u)
            moved[woff[j * W + warp] + __popc(sbal[j * W + warp] & below)] =
                row[lo + r0 + int64_t(j) * k_sel_threads + tid];
        __syncthreads();
        for (int j = tid; j < total; j += k_sel_threads) row[at + j] = moved[j];
        __syncthreads();
      }
    }
    at += total;
    __syncthreads();  // sbal, woff and the scan storage are the next round's
  }
  for (int64_t i = tid; i < n - hi; i += k_sel_threads) list[at + i] = int32_t(hi + i);
  if (tid == 0) {
    const int64_t n_f = at + (n - hi), n_s = n - n_f;
    *urp = n_s < 2 ? unit_rec{n, n, 0, 0, 1, 0}  // too few left to sample: dense
                   : unit_rec{n, n_f, n_s, first_draws(a.c, n_s), 0, 0};
  }
}

__device__ inline int sum_before(const int32_t* counts, int c, pass_shared& sh,
                                 typename preduce_t::TempStorage& red) {
  int x = 0;
  for (int i = threadIdx.x; i < c; i += k_pass_threads) x += counts[i];
  x = preduce_t(red).Sum(x);
  if (threadIdx.x == 0) sh.i32[1] = x;
  __syncthreads();
  x = sh.i32[1];
  __syncthreads();
  return x;
}

// The sample's budget b of a unit (after the moments): the largest over its heads (gqa_shared).
__device__ inline int64_t unit_budget(const run_kargs& a, int s, int u, const unit_rec& ur) {
  if (ur.dense || ur.skip) return 0;
  int64_t b = 0;
  if (a.c.sample == int32_t(sampling::fixed_rate)) b = ur.m0;
  if (a.c.sample == int32_t(sampling::adaptive)) {
    b = ur.m0;
    const int h0 = a.c.gqa_shared ? u * a.group : u;
    for (int x = 0; x < a.unit_heads; ++x)
      b = max64(b, a.heads[int64_t(s) * a.n_head_q + h0 + x].b);
  }
  return b;
}

// The walk: permutation positions 0, 1, ... of the unit's keyed permutation, members of F
// skipped; draw r is the r-th position kept. The first `need` draws lie within the first
// n_f + need positions. walk_count (stage 0: draws [0, m0); stage 1: [m0, b)) evaluates the
// chunks of positions below that bound not evaluated by an earlier stage, stores each position's
// token (or -1 for a member of F) and counts the kept ones per chunk; walk_write ranks the kept
// positions by the counts of earlier chunks and a block scan and writes draws [lo, hi) after F.
// Grid (chunks, unit, sequence) for both; the permutation key's head is the unit's index (the
// query head, or the kv head with gqa_shared), as on the CPU.
struct walk_block {
  int64_t ui;
  unit_rec ur;
  int64_t lo, hi;  // the draws of this stage
  int64_t c0;      // the block's first permutation position
};
// The unit and draw range of a walk block; false when it has nothing to do.
__device__ inline bool walk_setup(const run_kargs& a, int stage, walk_block& w) {
  const int u = blockIdx.y, s = blockIdx.z;
  w.ui = int64_t(s) * a.n_units + u;
  w.ur = a.units[w.ui];
  if (w.ur.skip || w.ur.dense || w.ur.m0 < 1) return false;
  w.lo = stage == 0 ? 0 : w.ur.m0;
  w.hi = stage == 0 ? w.ur.m0 : unit_budget(a, s, u, w.ur);
  w.c0 = int64_t(blockIdx.x) * k_chunk;
  return w.lo < w.hi && w.c0 < w.ur.n_f + w.hi;
}

// walk_count's positions are evaluated a network step at a time with refills: each warp owns 128
// positions of the chunk, each lane one position at a time; a lane whose walk lands in [0, n)
// records the token (by position, in shared memory) and takes the warp's next unstarted position
// (ballot + prefix count), so no lane waits for its warp's longest walk.
template <typename Step>
__device__ __forceinline__ void walk_warp(const Step& step, int64_t q0, int q_len, uint64_t n,
                                          int32_t* res) {
  const int lane = int(threadIdx.x % 32);
  int j = lane, next = 32;  // the lane's position (offset from q0); the warp's next unstarted one
  uint64_t x = uint64_t(q0 + j);
  bool active = j < q_len;
  while (__any_sync(0xffffffffu, active)) {
    if (active) x = step(x);
    const bool done = active && x < n;
    const unsigned fin = __ballot_sync(0xffffffffu, done);
    if (done) {
      res[j] = int32_t(x);
      j = next + __popc(fin & ((1u << lane) - 1u));
      x = uint64_t(q0 + j);
      active = j < q_len;
    }
    next += __popc(fin);
  }
}

// The round function of the network is tabulated per block where its halves have at most
// keyed_permutation::k_table_bits bits (n <= 2^20): 8 rounds x 2^half 16-bit entries (the same
// values as keyed_permutation::round_fn, see step_with), so a step is 8 shared-memory lookups
// instead of 8 64-bit mixes. The flags of the tokens are then read by position, all loads in flight
// at once.
using wreduce_t = cub::BlockReduce<int, k_walk_threads>;
__global__ void __launch_bounds__(k_walk_threads) walk_count(const run_kargs a, int stage) {
  using perm_t = vattn::detail::keyed_permutation;
  constexpr int per_warp = k_chunk / (k_walk_threads / 32);
  __shared__ int32_t res[k_chunk];  // the token at each position of the chunk
  __shared__ uint16_t rt[perm_t::k_table_entries];
  __shared__ typename wreduce_t::TempStorage red;
  walk_block w;
  if (!walk_setup(a, stage, w)) return;
  if (stage == 1 && w.c0 < w.ur.n_f + w.ur.m0) return;  // counted by stage 0
  const int64_t n = w.ur.n;
  const int64_t seq_key = a.seq_id ? a.seq_id[blockIdx.z] : blockIdx.z;
  const perm_t perm(
      vattn::detail::sample_key(a.c.seed, a.c.layer, seq_key, int32_t(blockIdx.y), a.step),
      uint64_t(n));
  const int hb = int(perm.half_bits());
  const bool tab = perm.tabulable();
  if (tab)
    for (int r = int(threadIdx.x); r < (1 << hb); r += k_walk_threads)
#pragma unroll
      for (int k = 0; k < perm_t::k_rounds; ++k)  // k constant: the keys stay in registers
        rt[(k << hb) | r] = uint16_t(perm.round_fn(k, uint64_t(r)));
  __syncthreads();
  const int warp = int(threadIdx.x / 32);
  const int64_t q0 = w.c0 + int64_t(warp) * per_warp;
  const int q_len = int(max64(0, min64(per_warp, n - q0)));  // positions of this warp
  int32_t* wres = res + warp * per_warp;
  if (tab) {
    const auto lookup = [&](int k, uint64_t r) { return uint64_t(rt[(k << hb) | int(r)]); };
    walk_warp([&](uint64_t x) { return perm.step_with(x, lookup); }, q0, q_len, uint64_t(n), wres);
  } else {
    walk_warp([&](uint64_t x) { return perm.step(x); }, q0, q_len, uint64_t(n), wres);
  }
  __syncthreads();
  const uint8_t* flags = a.flags + w.ui * pad8(a.n_max);
  int32_t* tok = reinterpret_cast<int32_t*>(a.weights) + w.ui * a.n_max;
  int kept = 0;
#pragma unroll
  for (int i = 0; i < k_chunk / k_walk_threads; ++i) {
    const int l = i * k_walk_threads + int(threadIdx.x);
    const int64_t p = w.c0 + l;
    if (p >= n) break;
    const int32_t t = res[l];
    const bool keep = flags[t] == 0;
    tok[p] = keep ? t : -1;
    kept += keep;
  }
  kept = wreduce_t(red).Sum(kept);
  if (threadIdx.x == 0) a.w_count[w.ui * a.n_chunks + blockIdx.x] = kept;
}

__global__ void __launch_bounds__(k_pass_threads) walk_write(const run_kargs a, int stage) {
  __shared__ pass_shared sh;
  __shared__ typename preduce_t::TempStorage red;
  walk_block w;
  if (!walk_setup(a, stage, w)) return;
  const int before = sum_before(a.w_count + w.ui * a.n_chunks, int(blockIdx.x), sh, red);
  if (before >= w.hi) return;
  const int64_t n = w.ur.n;
  const int32_t* tok = reinterpret_cast<const int32_t*>(a.weights) + w.ui * a.n_max;
  int32_t* out = a.list + w.ui * a.n_max + w.ur.n_f;
  const int64_t p0 = w.c0 + int64_t(threadIdx.x) * k_per_thread;
  int32_t tx[k_per_thread];
  int kept = 0;
#pragma unroll
  for (int i = 0; i < k_per_thread; ++i) {
    tx[i] = p0 + i < n ? tok[p0 + i] : -1;
    kept += tx[i] >= 0;
  }
  int rank, total;
  pscan_t(sh.scan).ExclusiveSum(kept, rank, total);
  int64_t r = int64_t(before) + rank;
#pragma unroll
  for (int i = 0; i < k_per_thread; ++i) {
    if (tx[i] < 0) continue;
    if (r >= w.lo && r < w.hi) out[r] = tx[i];
    ++r;
  }
}

// --- moments and budgets per query head -------------------------------------------------------

struct max_op {
  __device__ float operator()(float x, float y) const { return fmaxf(x, y); }
};
using mreduce_t = cub::BlockReduce<double, k_mom_threads>;
using freduce_t = cub::BlockReduce<float, k_mom_threads>;

// Grid (query head, sequence), k_mom_threads threads. Logits of F and the base draws (stored
// oracle logits by token, or the list logits score_kernel computed by list position), the
// stabiliser c = their maximum, the weights e = exp(l - c) by the CPU's exp, and the sums behind
// base_moments in double.
template <dtype T>
__global__ void __launch_bounds__(k_mom_threads) moments_kernel(const run_kargs a) {
  constexpr int D_MAX = 128, WARPS = k_mom_threads / 32;
  __shared__ union {
    typename mreduce_t::TempStorage d;
    typename freduce_t::TempStorage f;
  } red;
  __shared__ double vsum[WARPS][D_MAX];
  __shared__ double vtot[4][D_MAX];
  __shared__ double sc[4];
  const int h = blockIdx.x, s = blockIdx.y, tid = threadIdx.x, d = a.d;
  const int u = a.c.gqa_shared ? h / a.group : h, kvh = h / a.group;
  const unit_rec ur = a.units[int64_t(s) * a.n_units + u];
  if (ur.skip || ur.dense || ur.m0 < 1) return;
  const int32_t* list = a.list + (int64_t(s) * a.n_units + u) * a.n_max;
  const int64_t n_f = ur.n_f, m0 = ur.m0, L = n_f + m0;
  const uint32_t* lg_row = a.scores + (int64_t(s) * a.n_head_q + h) * a.n_max;
  const bool oracle =
      a.c.select != int32_t(selector::none) && a.c.pred == int32_t(predictor::oracle);
  const int64_t base = seq_base(a, s, int32_t(ur.n), false);
  const int warp = tid / 32, lane = tid % 32;
  auto logit = [&](int64_t i) { return __uint_as_float(oracle ? lg_row[list[i]] : lg_row[i]); };
  float cmax = -INFINITY;
#pragma unroll 4
  for (int64_t i = tid; i < L; i += blockDim.x) cmax = fmaxf(cmax, logit(i));
  cmax = freduce_t(red.f).Reduce(cmax, max_op());
  if (tid == 0) sc[0] = double(cmax);
  __syncthreads();
  const float c = float(sc[0]);
  __syncthreads();
  double d_f = 0, s_e = 0, s_ee = 0;
#pragma unroll 4
  for (int64_t i = tid; i < L; i += blockDim.x) {
    const double e = double(cpu_exp(__fsub_rn(logit(i), c)));
    if (i < n_f) {
      d_f += e;
    } else {
      s_e += e;
      s_ee += e * e;
    }
  }
  d_f = mreduce_t(red.d).Sum(d_f);
  __syncthreads();
  s_e = mreduce_t(red.d).Sum(s_e);
  __syncthreads();
  s_ee = mreduce_t(red.d).Sum(s_ee);
  if (tid == 0) sc[0] = d_f, sc[1] = s_e, sc[2] = s_ee;
  __syncthreads();
  const bool need_v =
      a.c.sample == int32_t(sampling::adaptive) && a.c.mode != int32_t(budget_mode::denominator);
  if (need_v) {
    // sums over dims: [0] n_f = sum_F e v, [1] s_ev, [2] s_evev = sum_B (e v)^2, [3] s_eev
    constexpr int PER = D_MAX / 32;
    double acc[4][PER] = {};
    for (int64_t i = warp; i < L; i += WARPS) {
      const double e = double(cpu_exp(__fsub_rn(logit(i), c)));
      const int64_t row = row_of(a, s, base, list[i], kvh);
      for (int r = 0; r < PER; ++r) {
        const int j = lane + 32 * r;
        if (j >= d) break;
        const double x = e * double(load_elem<T>(a.v, row + j));
        if (i < n_f) {
          acc[0][r] += x;
        } else {
          acc[1][r] += x;
          acc[2][r] += x * x;
          acc[3][r] += e * x;
        }
      }
    }
    for (int q4 = 0; q4 < 4; ++q4) {
      for (int r = 0; r < PER; ++r)
        if (lane + 32 * r < d) vsum[warp][lane + 32 * r] = acc[q4][r];
      __syncthreads();
      for (int j = tid; j < d; j += blockDim.x) {
        double t = 0;
        for (int w = 0; w < WARPS; ++w) t += vsum[w][j];
        vtot[q4][j] = t;
      }
      __syncthreads();
    }
  }
  if (tid == 0) {
    // vattn::plan's moments(): the CPU's formula, term by term
    moments mm{};
    mm.n_s = ur.n_s;
    mm.m = m0;
    const double md = double(m0), w = double(ur.n_s) / md;
    const double Df = sc[0], Se = sc[1], See = sc[2];
    mm.d_hat = Df + w * Se;
    mm.var_e = (See - Se * Se / md) / (md - 1);
    if (need_v) {
      for (int j = 0; j < d; ++j) {
        const double nf = vtot[0][j], sev = vtot[1][j], sevev = vtot[2][j], seev = vtot[3][j];
        const double nh = nf + w * sev;
        const double o = nh / mm.d_hat;
        mm.n_norm2 += nh * nh;
        mm.o_norm2 += o * o;
        mm.var_ev += (sevev - sev * sev / md) / (md - 1);
        const double sy = sev - o * Se;
        const double syy = sevev - 2 * o * seev + o * o * See;
        mm.var_eo += (syy - sy * sy / md) / (md - 1);
      }
    }
    mm.var_e = dmax(mm.var_e, 0.0);
    mm.var_ev = dmax(mm.var_ev, 0.0);
    mm.var_eo = dmax(mm.var_eo, 0.0);
    head_rec& hr = a.heads[int64_t(s) * a.n_head_q + h];
    hr.mm = mm;
    hr.b = (a.c.sample == int32_t(sampling::adaptive) && m0 >= 2) ? budget_b(a.c, mm) : m0;
  }
}

// --- finishing: lists, weights, stats, indices ------------------------------------------------

// Grid (unit, sequence), k_sel_threads threads (the sample was extended to b by walk_write).
__global__ void __launch_bounds__(k_sel_threads) finish_kernel(const run_kargs a) {
  const int u = blockIdx.x, s = blockIdx.y, tid = threadIdx.x;
  const int64_t ui = int64_t(s) * a.n_units + u;
  const unit_rec ur = a.units[ui];
  int32_t* list = a.list + ui * a.n_max;
  float* wts = a.weights + ui * a.n_max;
  const int h0 = a.c.gqa_shared ? u * a.group : u;
  if (ur.skip) {
    if (tid == 0) list[0] = 0, wts[0] = 1.f, a.list_len[ui] = 1;
    return;
  }
  const int64_t n = ur.n, n_f = ur.n_f, m0 = ur.m0;
  const int64_t b = unit_budget(a, s, u, ur);
  const int64_t len = n_f + b;
  const float w = b > 0 ? float(double(ur.n_s) / double(b)) : 0.f;
  if (ur.dense)  // every token (the same thread reads list[i] below)
    for (int64_t i = tid; i < n; i += k_sel_threads) list[i] = int32_t(i);
  for (int64_t i = tid; i < len; i += k_sel_threads) wts[i] = i < n_f ? 1.f : w;
  if (tid == 0) a.list_len[ui] = int32_t(len);
  if (a.indices) {
    for (int x = 0; x < a.unit_heads; ++x) {
      int32_t* dst = a.indices + (int64_t(s) * a.n_head_q + h0 + x) * a.n_max;
      for (int64_t i = tid; i < len; i += k_sel_threads) dst[i] = list[i];
    }
  }
  if (a.stats && tid < a.unit_heads) {
    const int h = h0 + tid;
    const double row_bytes = double(a.d) * double(a.es);
    head_stats hs{};
    hs.n = n;
    if (ur.dense) {
      hs.n_f = n;
      hs.density = 1;
      hs.bytes_kv = int64_t(2 * n * a.d * int64_t(a.es) / a.unit_heads);
      hs.dense_fallback = 1;
    } else {
      const head_rec& hr = a.heads[int64_t(s) * a.n_head_q + h];
      hs.n_f = n_f;
      hs.n_s = ur.n_s;
      hs.m = a.c.sample == int32_t(sampling::adaptive) ? m0 : 0;
      hs.b = b;
      hs.n_sampled = b;
      hs.density = double(n_f + b) / double(n);
      if (m0 >= 2 && a.c.sample == int32_t(sampling::adaptive))
        hs.est_rel_error = est_rel_error(a.c.mode, a.c, a.c.z_mode, hr.mm, b);
      else if (m0 >= 2)
        hs.est_rel_error =
            est_rel_error(int32_t(budget_mode::denominator), a.c, a.c.z_mode, hr.mm, m0);
      else
        hs.est_rel_error = -1;
      const bool oracle =
          a.c.select != int32_t(selector::none) && a.c.pred == int32_t(predictor::oracle);
      // refine > 1: the K rows read are the sinks, the local window, the shortlist (read once
      // per unit for the exact ranking; F's top-k rows are among them) and the sample, as the
      // CPU counts them
      const stages st = resolve_stages(a.c, n);
      const double k_rows = oracle ? double(n)
                            : refine_pending(a.c, st)
                                ? double(st.n_sink + st.n_local + st.shortlist + b)
                                : double(n_f + b);
      int64_t pred_bytes = 0;
      if (a.c.select != int32_t(selector::none) && a.c.pred == int32_t(predictor::sign_bits))
        pred_bytes = n * a.c.pred_bits / 8 / a.unit_heads;
      hs.bytes_kv =
          int64_t((k_rows + double(n_f + b)) * row_bytes / double(a.unit_heads)) + pred_bytes;
    }
    a.stats[int64_t(s) * a.n_head_q + h] = hs;
  }
}

// Stats and indices of a dense run (method dense): grid (query head, sequence).
__global__ void dense_outputs(const run_kargs a) {
  const int h = blockIdx.x, s = blockIdx.y;
  const int32_t n = a.seq_len[s];
  if (n < 1 || n > a.n_max) return;  // the split kernel reports it
  if (a.indices)
    for (int64_t t = threadIdx.x; t < n; t += blockDim.x)
      a.indices[(int64_t(s) * a.n_head_q + h) * a.n_max + t] = int32_t(t);
  if (a.stats && threadIdx.x == 0) {
    head_stats hs{};
    hs.n = n;
    hs.n_f = n;
    hs.density = 1;
    hs.bytes_kv = int64_t(2 * int64_t(n) * a.d * int64_t(a.es) / a.group);
    a.stats[int64_t(s) * a.n_head_q + h] = hs;
  }
}

// --- workspace -------------------------------------------------------------------------------

constexpr size_t round256(size_t x) {
  return (x + 255) / 256 * 256;
}
struct run_layout {
  size_t scores, qsig, hist, sel, f_scan, eq_scan, w_count, flags, list, weights, list_len, units,
      heads, bytes;
};
run_layout run_layout_for(const config& cfg, int32_t n_seq, int32_t hq, int32_t hkv, int64_t n) {
  run_layout l{};
  if (cfg.dense) return l;
  const size_t units = size_t(n_seq) * size_t(cfg.gqa_shared ? hkv : hq);
  const size_t heads = size_t(n_seq) * size_t(hq);
  const size_t chunks = size_t((n + k_chunk - 1) / k_chunk);
  size_t at = 0;
  auto take = [&at](size_t bytes) {
    const size_t p = at;
    at += round256(bytes);
    return p;
  };
  l.scores = take(heads * std::max(size_t(n) * 4, size_t(pad8(n)) * 2));
  l.qsig = take(heads * k_max_words * 4);
  l.hist = take(heads * k_hist_ints * 4);
  l.sel = take(heads * sizeof(key_prefix));
  l.f_scan = take(units * (chunks + 1) * 8);  // f_scan and eq_scan adjacent: one clearing
  l.eq_scan = take(heads * chunks * 8);
  l.w_count = take(units * chunks * 4);
  l.flags = take(units * size_t(pad8(n)));
  l.list = take(units * size_t(n) * 4);
  l.weights = take(units * size_t(n) * 4);
  l.list_len = take(units * 4);
  l.units = take(units * sizeof(unit_rec));
  l.heads = take(heads * sizeof(head_rec));
  l.bytes = at;
  return l;
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw cuda_error(std::string("vattn::cuda: ") + what + ": " + cudaGetErrorString(e));
}

template <dtype T, int D>
void launch_score_t(const run_kargs& k, dim3 grid, int list_mode, cudaStream_t stream) {
  using tg = tile_geom<T, D>;
  const int64_t rows = list_mode == 2 ? k.shortlist_max : k.n_max;  // tokens, or list entries
  grid.x = unsigned(std::max<int64_t>(1, (rows + tg::k_tokens - 1) / tg::k_tokens));
  const size_t shm = score_smem<T, D>(list_mode && !k.c.gqa_shared ? 1 : k.group);
  score_kernel<T, D><<<grid, tg::k_tokens, shm, stream>>>(k, list_mode);
  check(cudaGetLastError(), "scoring kernel launch");
}
template <dtype T>
void launch_score_d(int32_t d, const run_kargs& k, dim3 grid, int list_mode, cudaStream_t stream) {
  if (d == 64) return launch_score_t<T, 64>(k, grid, list_mode, stream);
  return launch_score_t<T, 128>(k, grid, list_mode, stream);
}
void launch_score(dtype t, int32_t d, const run_kargs& k, dim3 grid, int list_mode,
                  cudaStream_t stream) {
  switch (t) {
    case dtype::bf16:
      return launch_score_d<dtype::bf16>(d, k, grid, list_mode, stream);
    case dtype::f16:
      return launch_score_d<dtype::f16>(d, k, grid, list_mode, stream);
    case dtype::f32:
      return launch_score_d<dtype::f32>(d, k, grid, list_mode, stream);
  }
}

// Raises a kernel's dynamic shared-memory limit where `bytes` needs more than the default 48 KB.
template <typename K>
void allow_smem(K* kernel, size_t bytes, const char* what) {
  if (bytes <= 48 * 1024) return;
  int dev = 0, most = 0;
  check(cudaGetDevice(&dev), "no usable CUDA device");
  check(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
        "reading the shared-memory limit");
  if (bytes > size_t(most))
    throw error(std::string("vattn::cuda: ") + what + " needs " + std::to_string(bytes) +
                " bytes of shared memory for this GQA group size; the device allows " +
                std::to_string(most));
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
        "raising the shared-memory limit");
}
template <dtype T, int D>
void prepare_score(int32_t group) {
  allow_smem(score_kernel<T, D>, score_smem<T, D>(group), "the oracle scoring kernel");
}
template <dtype T>
void prepare_score_d(int32_t d, int32_t group) {
  if (d == 64) return prepare_score<T, 64>(group);
  return prepare_score<T, 128>(group);
}

}  // namespace

// The plan's one-time device setup of run()'s kernels (shared-memory limits).
void prepare_run(const config& cfg, dtype t, int32_t head_dim, int32_t group) {
  if (cfg.dense) return;
  switch (t) {
    case dtype::bf16:
      prepare_score_d<dtype::bf16>(head_dim, group);
      break;
    case dtype::f16:
      prepare_score_d<dtype::f16>(head_dim, group);
      break;
    case dtype::f32:
      prepare_score_d<dtype::f32>(head_dim, group);
      break;
  }
  for (int w = 1; w <= k_max_words; ++w)
    with_sign_words(
        w, [&](auto kernel) { allow_smem(kernel, sign_smem(group), "the sign scoring kernel"); });
  allow_smem(refine_select, refine_smem(k_refine_smem), "the refine select kernel");
  allow_smem(refine_finish, finish_smem(k_finish_round), "the refine finish kernel");
}

// decode.cu: the host checks of dense() and sparse()
void check_run_host(const params& p, int32_t n_head_q, const float* q, const kv_cache& kv,
                    const float* out, float scale, const void* ws, size_t ws_size,
                    size_t ws_needed);

void check_run_config(const config& cfg) {
  if (cfg.dense) return;
  if (cfg.hub) throw error("config: hub=1 is not supported by the CUDA backend");
  if (cfg.select == selector::topp)
    throw error("config: select=topp is not supported by the CUDA backend (top-k or none)");
  if (cfg.refine != 0 && cfg.pred == predictor::page_bounds)
    throw error(
        "config: refine with predictor=pages is not supported by the CUDA backend (refine needs "
        "predictor=signs there)");
  if (cfg.select == selector::topk && cfg.pred == predictor::page_bounds)
    throw error("config: predictor=pages is not supported by the CUDA backend (oracle, signs)");
}

size_t run_workspace_bytes(const config& cfg, int32_t n_seq_max, int32_t n_head_q,
                           int32_t n_head_kv, int64_t n_tokens_max) {
  return run_layout_for(cfg, n_seq_max, n_head_q, n_head_kv, n_tokens_max).bytes;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// device_index

device_index::device_index(const predictor_index& ix) : cfg_(ix.cfg()), p_(ix.params()) {
  if (cfg_.pred != predictor::sign_bits)
    throw error(std::string("device_index: predictor=") + predictor_name(cfg_.pred) +
                ": the CUDA backend mirrors predictor=signs indexes only");
  const size_t words = size_t(cfg_.pred_bits / 32);
  const size_t n_sig = size_t(p_.n_seq_max) * p_.n_head_kv * size_t(p_.n_tokens_max) * words;
  const size_t n_proj = size_t(p_.n_head_kv) * cfg_.pred_bits * size_t(p_.head_dim);
  try {
    detail::check(cudaMalloc(reinterpret_cast<void**>(&sig_), n_sig * 4), "device_index malloc");
    detail::check(cudaMalloc(reinterpret_cast<void**>(&proj_), n_proj * 4), "device_index malloc");
    detail::check(cudaMalloc(reinterpret_cast<void**>(&count_), size_t(p_.n_seq_max) * 8),
                  "device_index malloc");
  } catch (...) {
    release();
    throw;
  }
  bytes_ = n_sig * 4 + n_proj * 4 + size_t(p_.n_seq_max) * 8;
  upload(ix);
}

device_index::device_index(device_index&& o) noexcept
    : cfg_(o.cfg_), p_(o.p_), sig_(o.sig_), proj_(o.proj_), count_(o.count_), bytes_(o.bytes_) {
  o.sig_ = nullptr, o.proj_ = nullptr, o.count_ = nullptr, o.bytes_ = 0;
}
device_index& device_index::operator=(device_index&& o) noexcept {
  if (this != &o) {
    release();
    cfg_ = o.cfg_, p_ = o.p_, sig_ = o.sig_, proj_ = o.proj_, count_ = o.count_, bytes_ = o.bytes_;
    o.sig_ = nullptr, o.proj_ = nullptr, o.count_ = nullptr, o.bytes_ = 0;
  }
  return *this;
}
device_index::~device_index() {
  release();
}
void device_index::release() {
  if (sig_) cudaFree(sig_);
  if (proj_) cudaFree(proj_);
  if (count_) cudaFree(count_);
  sig_ = nullptr, proj_ = nullptr, count_ = nullptr;
}

void device_index::upload(const predictor_index& ix) {
  const predictor_index::impl& d = ix.data();
  if (d.cfg.pred != cfg_.pred || d.cfg.pred_bits != cfg_.pred_bits ||
      d.p.n_seq_max != p_.n_seq_max || d.p.n_head_kv != p_.n_head_kv ||
      d.p.n_tokens_max != p_.n_tokens_max || d.p.head_dim != p_.head_dim)
    throw error("device_index::upload: the index's config or shapes differ from the mirror's");
  const size_t words = size_t(d.words);
  for (int32_t s = 0; s < p_.n_seq_max; ++s) {
    const int64_t cnt = d.count[size_t(s)];
    if (cnt == 0) continue;
    for (int32_t h = 0; h < p_.n_head_kv; ++h) {
      const size_t off = (size_t(s) * p_.n_head_kv + h) * size_t(p_.n_tokens_max) * words;
      detail::check(cudaMemcpy(sig_ + off, d.sig.data() + off, size_t(cnt) * words * 4,
                               cudaMemcpyHostToDevice),
                    "device_index::upload");
    }
  }
  detail::check(cudaMemcpy(proj_, d.proj.data(), d.proj.size() * 4, cudaMemcpyHostToDevice),
                "device_index::upload");
  detail::check(cudaMemcpy(count_, d.count.data(), d.count.size() * 8, cudaMemcpyHostToDevice),
                "device_index::upload");
}

// ---------------------------------------------------------------------------------------------
// plan::run

void plan::run(const run_args& a, void* workspace, size_t workspace_size, stream_t stream) const {
  using namespace detail;
  const kv_cache kv = vattn::detail::with_default_strides(a.kv);
  if (cfg_.dense) {
    dense_args da;
    da.n_head_q = a.n_head_q, da.q = a.q, da.kv = a.kv, da.out = a.out, da.scale = cfg_.scale;
    dense(da, workspace, workspace_size, stream);  // checks, clears the record, enqueues
  } else {
    check_run_host(p_, a.n_head_q, a.q, kv, a.out, cfg_.scale, workspace, workspace_size,
                   ws_bytes_);
  }
  const bool signs =
      !cfg_.dense && cfg_.select == selector::topk && cfg_.pred == predictor::sign_bits;
  if (signs) {
    if (!a.index) throw error("index is null: predictor=signs needs a device_index");
    const config& ic = a.index->cfg();
    const plan_params& ip = a.index->shape();
    if (ic.pred != cfg_.pred || ic.pred_bits != cfg_.pred_bits || ic.seed != cfg_.seed)
      throw error("index: built with predictor=" + std::string(predictor_name(ic.pred)) +
                  ", pred_bits=" + std::to_string(ic.pred_bits) +
                  ", seed=" + std::to_string(ic.seed) + "; the plan's config differs");
    if (ip.n_head_kv != p_.n_head_kv || ip.head_dim != p_.head_dim || ip.n_head_q != p_.n_head_q ||
        ip.n_seq_max < kv.n_seq)
      throw error("index: its head shapes or n_seq_max differ from the plan's");
  }

  run_kargs k{};
  k.q = a.q;
  static_cast<kv_view&>(k) = make_kv_view(kv);
  k.n_max = int32_t(p_.n_tokens_max);
  k.n_head_q = p_.n_head_q;
  k.n_head_kv = p_.n_head_kv;
  k.d = p_.head_dim;
  k.group = p_.n_head_q / p_.n_head_kv;
  k.unit_heads = cfg_.gqa_shared ? k.group : 1;
  k.n_units = cfg_.gqa_shared ? p_.n_head_kv : p_.n_head_q;
  k.es = int32_t(dtype_size(p_.kv_type));
  k.n_chunks = int32_t((p_.n_tokens_max + k_chunk - 1) / k_chunk);
  k.max_rows = cfg_.refine > 0 && cfg_.gqa_shared ? 1 : 0;
  if (cfg_.refine > 0) {  // k(n) <= the top-k size at n_max, and the shortlist grows with k
    const int64_t nm = p_.n_tokens_max;
    const int64_t k_max =
        std::min<int64_t>(nm, resolve_size(cfg_.topk.value, cfg_.topk.fraction ? 1 : 0, nm));
    k.shortlist_max = std::min<int64_t>(nm, ceil_fraction(cfg_.refine, k_max));
    // the list-logit stage runs (sampling, not the oracle): it reuses the refine logits
    k.refine_reuse = cfg_.refine > 1 && cfg_.select == selector::topk &&
                     cfg_.sample != sampling::none && cfg_.pred != predictor::oracle;
  }
  k.order = dot_order_for_level(cpu_level_);
  k.step = a.step;
  k.seq_id = a.seq_id;
  k.stats = a.stats;
  k.indices = a.indices;
  char* base = static_cast<char*>(workspace);
  k.status = reinterpret_cast<device_status*>(base);
  const int32_t n_seq = kv.n_seq;
  if (cfg_.dense) {
    if (a.stats || a.indices) {
      dense_outputs<<<dim3(p_.n_head_q, n_seq), 256, 0, stream>>>(k);
      check(cudaGetLastError(), "dense outputs kernel launch");
    }
    return;
  }

  sel_cfg& c = k.c;
  c.sink = cfg_.sink.value, c.sink_frac = cfg_.sink.fraction;
  c.local = cfg_.local.value, c.local_frac = cfg_.local.fraction;
  c.topk = cfg_.topk.value, c.topk_frac = cfg_.topk.fraction;
  c.base = cfg_.base.value, c.base_frac = cfg_.base.fraction;
  c.sample_rate = cfg_.sample_rate;
  c.refine = cfg_.refine;
  c.eps = cfg_.eps;
  c.delta = cfg_.delta;
  c.select = int32_t(cfg_.select);
  c.sample = int32_t(cfg_.sample);
  c.pred = int32_t(cfg_.pred);
  c.mode = int32_t(cfg_.mode);
  c.gqa_shared = cfg_.gqa_shared;
  c.pred_bits = cfg_.pred_bits;
  c.layer = cfg_.layer;
  c.seed = cfg_.seed;
  c.z_mode = -vattn::detail::normal_quantile(cfg_.delta / 2);
  c.z_comb = -vattn::detail::normal_quantile(cfg_.delta / 4);
  c.scale = float(vattn::detail::logit_scale(cfg_, p_.head_dim));
  if (signs) {
    k.sig = a.index->signatures();
    k.proj = a.index->projections();
    k.ix_count = a.index->counts();
    k.ix_n_max = a.index->shape().n_tokens_max;
    k.words = cfg_.pred_bits / 32;
  }
  const run_layout l =
      run_layout_for(cfg_, p_.n_seq_max, p_.n_head_q, p_.n_head_kv, p_.n_tokens_max);
  char* rb = base + split_bytes_;
  k.scores = reinterpret_cast<uint32_t*>(rb + l.scores);
  k.qsig = reinterpret_cast<uint32_t*>(rb + l.qsig);
  k.hist = reinterpret_cast<int32_t*>(rb + l.hist);
  k.sel = reinterpret_cast<key_prefix*>(rb + l.sel);
  k.f_scan = reinterpret_cast<unsigned long long*>(rb + l.f_scan);
  k.eq_scan = reinterpret_cast<unsigned long long*>(rb + l.eq_scan);
  k.w_count = reinterpret_cast<int32_t*>(rb + l.w_count);
  k.flags = reinterpret_cast<uint8_t*>(rb + l.flags);
  k.list = reinterpret_cast<int32_t*>(rb + l.list);
  k.weights = reinterpret_cast<float*>(rb + l.weights);
  k.cand = reinterpret_cast<int32_t*>(k.weights);
  k.list_len = reinterpret_cast<int32_t*>(rb + l.list_len);
  k.units = reinterpret_cast<unit_rec*>(rb + l.units);
  k.heads = reinterpret_cast<head_rec*>(rb + l.heads);

  const bool topk = cfg_.select == selector::topk;
  if (!topk) {  // with top-k, prep_kernel clears these (the first kernel of the run)
    check(cudaMemsetAsync(k.status, 0, sizeof(device_status), stream),
          "clearing the status record");
    check(cudaMemsetAsync(k.f_scan, 0,
                          l.eq_scan - l.f_scan + size_t(n_seq) * p_.n_head_q * k.n_chunks * 8,
                          stream),
          "clearing the flag pass's tickets and look-back records");
  }
  auto stage = [&](const char* name) {
    if (a.stage_hook) a.stage_hook(name, a.stage_ctx);
  };
  const unsigned hq = unsigned(p_.n_head_q), hkv = unsigned(p_.n_head_kv), ns = unsigned(n_seq);
  const unsigned chunks = unsigned(k.n_chunks), nu = unsigned(k.n_units);
  const unsigned spans = unsigned((p_.n_tokens_max + k_hist_span - 1) / k_hist_span);
  if (topk) {
    prep_kernel<<<dim3(hq, ns), k_prep_threads, 0, stream>>>(k, signs ? 1 : 0);
    check(cudaGetLastError(), "preparation kernel launch");
    if (signs) {
      const unsigned blocks = unsigned((p_.n_tokens_max + k_sign_tokens - 1) / k_sign_tokens);
      const int rows = k.max_rows ? 1 : k.group;  // score rows per kv group
      const size_t smem = sign_smem(rows);
      const int copies = sign_copies(rows);
      with_sign_words(k.words, [&](auto kernel) {
        kernel<<<dim3(blocks, hkv, ns), k_sign_threads, smem, stream>>>(k, copies);
      });
      check(cudaGetLastError(), "sign scoring kernel launch");
    } else {
      launch_score(p_.kv_type, p_.head_dim, k, dim3(0, hkv, ns), 0, stream);
    }
    stage("score");
    // Float logits: three digit levels (sign scores: one, found by sign_scores itself).
    for (int level = 0; level < (signs ? 0 : 3); ++level) {
      if (level > 0) {
        hist_pass<<<dim3(spans, hq, ns), k_pass_threads, 0, stream>>>(k, level);
        check(cudaGetLastError(), "histogram pass launch");
      }
      digit_kernel<<<dim3(hq, ns), k_pass_threads, 0, stream>>>(k, level);
      check(cudaGetLastError(), "digit kernel launch");
    }
  }
  flag_pass<<<dim3(chunks, nu, ns), k_pass_threads, 0, stream>>>(k);
  check(cudaGetLastError(), "flag pass launch");
  stage("select");
  if (topk && cfg_.refine > 1) {  // F's top-k part: each head's k best exact logits in C
    launch_score(p_.kv_type, p_.head_dim, k, dim3(0, cfg_.gqa_shared ? hkv : hq, ns), 2, stream);
    stage("refine logits");
    const int cap = int(std::min<int64_t>(p_.n_tokens_max, k_refine_smem));
    refine_select<<<dim3(hq, ns), k_sel_threads, refine_smem(p_.n_tokens_max), stream>>>(k, cap);
    check(cudaGetLastError(), "refine select launch");
    refine_finish<<<dim3(nu, ns), k_sel_threads, k.refine_reuse ? finish_smem(k.shortlist_max) : 0,
                    stream>>>(k);
    check(cudaGetLastError(), "refine finish launch");
    stage("refine select");
  }
  if (cfg_.sample != sampling::none) {
    walk_count<<<dim3(chunks, nu, ns), k_walk_threads, 0, stream>>>(k, 0);
    check(cudaGetLastError(), "walk count launch");
    walk_write<<<dim3(chunks, nu, ns), k_pass_threads, 0, stream>>>(k, 0);
    check(cudaGetLastError(), "walk launch");
    stage("sample");
    const bool oracle = topk && cfg_.pred == predictor::oracle;
    if (!oracle) {  // logits of F and the base draws, by list position
      launch_score(p_.kv_type, p_.head_dim, k, dim3(0, cfg_.gqa_shared ? hkv : hq, ns), 1, stream);
      stage("list logits");
    }
    auto* moments = p_.kv_type == dtype::bf16  ? moments_kernel<dtype::bf16>
                    : p_.kv_type == dtype::f16 ? moments_kernel<dtype::f16>
                                               : moments_kernel<dtype::f32>;
    moments<<<dim3(hq, ns), k_mom_threads, 0, stream>>>(k);
    check(cudaGetLastError(), "moments kernel launch");
    stage("moments");
    walk_count<<<dim3(chunks, nu, ns), k_walk_threads, 0, stream>>>(k, 1);
    check(cudaGetLastError(), "walk count launch");
    walk_write<<<dim3(chunks, nu, ns), k_pass_threads, 0, stream>>>(k, 1);
    check(cudaGetLastError(), "walk launch");
  }
  finish_kernel<<<dim3(nu, ns), k_sel_threads, 0, stream>>>(k);
  check(cudaGetLastError(), "finishing kernel launch");
  stage("finish");

  sparse_args sa;
  sa.n_head_q = a.n_head_q;
  sa.q = a.q;
  sa.kv = a.kv;
  sa.per_group = cfg_.gqa_shared;
  sa.indices = k.list;
  sa.weights = k.weights;
  sa.list_len = k.list_len;
  sa.list_stride = p_.n_tokens_max;
  sa.out = a.out;
  sa.scale = c.scale;
  enqueue_sparse(sa, workspace, stream, false);
  stage("attend");
}

}  // namespace vattn::cuda
