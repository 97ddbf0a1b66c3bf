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
#include "cuda/select_math.hpp"

namespace vattn::cuda {
namespace detail {
namespace {

constexpr int k_sel_threads = 1024;  // selection and finishing blocks
constexpr int k_mom_threads = 256;   // moments blocks (8 warps)
constexpr int k_score_threads = 256;
constexpr int k_score_tokens = 64;   // tokens per oracle scoring block
constexpr int k_sign_tokens = 1024;  // tokens per sign scoring block
constexpr int k_max_words = 8;       // 256 signature bits

// Per (sequence, selection unit): what the selection decided. A unit is one query head, or one
// kv group with gqa_shared.
struct unit_rec {
  int64_t n, n_f, n_s, m0;
  int64_t pos;    // the permutation position after the last draw so far
  int32_t dense;  // 1: attention over every token (too short for sparsity)
  int32_t skip;   // 1: a bad device-side value was reported; the unit is left alone
};
// Per (sequence, query head): the base-sample moments and the head's own budget.
struct head_rec {
  moments mm;
  int64_t b;
};

struct run_kargs {
  const float* q;
  const void* k;
  const void* v;
  int64_t stride_token, stride_head, stride_page;
  int32_t paged, page_size;
  const int32_t* seq_len;
  const int64_t* seq_start;
  const int32_t* page_table;
  const int64_t* page_start;
  int64_t n_rows, n_pages;
  int32_t n_max, n_head_q, n_head_kv, d, group;
  int32_t unit_heads;  // query heads per unit
  int32_t n_units;     // units per sequence
  int32_t es;          // bytes per K/V element
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
  uint32_t* scores;   // [n_seq, n_head_q, n_max]: logits (f32 bits) or sign matches
  uint32_t* qsig;     // [n_seq, n_head_q, k_max_words]
  uint8_t* flags;     // [n_seq, n_units, n_max]
  int32_t* list;      // [n_seq, n_units, n_max]
  float* weights;     // [n_seq, n_units, n_max]
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

// The CPU-order dot product of q (shared, d floats) with K row `row` by a segment of o.lanes
// lanes (lane `a` of the segment holds accumulator a); the result is in the segment's lane 0.
// Every lane of the warp must call it (shuffles); `valid` false gives a dummy value.
template <dtype T>
__device__ __forceinline__ float seg_dot(const float* q, const void* kb, int64_t row, int d,
                                         dot_order o, int a, bool valid) {
  float acc = 0.f;
  if (valid) {
    for (int j = a; j < d; j += o.lanes) {
      const float k = load_elem<T>(kb, row + j);
      acc = o.fused ? __fmaf_rn(q[j], k, acc) : __fadd_rn(acc, __fmul_rn(q[j], k));
    }
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

// --- scoring ----------------------------------------------------------------------------------

// Oracle logits of every token for the query heads of one kv group: grid (token blocks, kv head,
// sequence). q is scaled as the CPU scales it (one float multiply) and dotted in its order.
template <dtype T>
__global__ void __launch_bounds__(k_score_threads) oracle_scores(const run_kargs a) {
  extern __shared__ float qs[];  // [group, d]
  const int kvh = blockIdx.y, s = blockIdx.z, d = a.d, G = a.group;
  const int32_t n = a.seq_len[s];
  if (n < 1 || n > a.n_max) return;  // reported by the selection
  const int64_t t0 = int64_t(blockIdx.x) * k_score_tokens;
  if (t0 >= n) return;
  const int64_t base = seq_base(a, s, n, false);
  if (base < 0) return;
  for (int i = threadIdx.x; i < G * d; i += blockDim.x)
    qs[i] = __fmul_rn(a.q[(int64_t(s) * a.n_head_q + kvh * G) * d + i], a.c.scale);
  __syncthreads();
  const int lanes = a.order.lanes, per_warp = 32 / lanes;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, sub = lane / lanes, ai = lane % lanes;
  const int64_t t1 = min64(t0 + k_score_tokens, int64_t(n));
  for (int64_t tb = t0 + int64_t(warp) * per_warp; tb < t1;
       tb += int64_t(k_score_threads / 32) * per_warp) {
    const int64_t t = tb + sub;
    const bool valid = t < t1;
    const int64_t row = valid ? row_of(a, s, base, t, kvh) : 0;
    for (int g = 0; g < G; ++g) {
      const float l = seg_dot<T>(qs + g * d, a.k, row, d, a.order, ai, valid);
      if (valid && ai == 0) {
        if (!isfinite(l)) report_status(a.status, k_bad_key, s, t, kvh, 0);
        a.scores[(int64_t(s) * a.n_head_q + kvh * G + g) * a.n_max + t] = __float_as_uint(l);
      }
    }
  }
}

// The query's signature per query head: bit r = [w_r . q >= 0] with q unscaled, dotted in the
// CPU's order (its row_ops dot_f32). Grid (query head, sequence), 256 threads.
__global__ void __launch_bounds__(k_score_threads) query_signatures(const run_kargs a) {
  __shared__ float q[256];
  __shared__ uint32_t bits[256];
  const int h = blockIdx.x, s = blockIdx.y, d = a.d, kvh = h / a.group;
  const int R = a.c.pred_bits;
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    q[i] = a.q[(int64_t(s) * a.n_head_q + h) * d + i];
  __syncthreads();
  const int lanes = a.order.lanes, per_warp = 32 / lanes;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, sub = lane / lanes, ai = lane % lanes;
  const float* w = a.proj + int64_t(kvh) * R * d;
  for (int rb = warp * per_warp; rb < R; rb += (k_score_threads / 32) * per_warp) {
    const int r = rb + sub;
    const bool valid = r < R;
    const float x = seg_dot<dtype::f32>(q, w, valid ? int64_t(r) * d : 0, d, a.order, ai, valid);
    if (valid && ai == 0) bits[r] = x >= 0.0f ? 1u : 0u;
  }
  __syncthreads();
  if (threadIdx.x < a.words) {
    uint32_t word = 0;
    for (int b = 0; b < 32; ++b) word |= bits[32 * threadIdx.x + b] << b;
    a.qsig[(int64_t(s) * a.n_head_q + h) * k_max_words + threadIdx.x] = word;
  }
}

// Bits each token's signature shares with each query head's: grid (token blocks, kv head,
// sequence), one thread per token.
__global__ void __launch_bounds__(k_score_threads) sign_scores(const run_kargs a) {
  const int kvh = blockIdx.y, s = blockIdx.z, G = a.group, W = a.words;
  const int32_t n = a.seq_len[s];
  if (n < 1 || n > a.n_max || n > a.ix_n_max) return;
  const int64_t t0 = int64_t(blockIdx.x) * k_sign_tokens;
  const int64_t t1 = min64(t0 + k_sign_tokens, int64_t(n));
  for (int64_t t = t0 + threadIdx.x; t < t1; t += blockDim.x) {
    const uint32_t* ks = a.sig + ((int64_t(s) * a.n_head_kv + kvh) * a.ix_n_max + t) * W;
    uint32_t kw[k_max_words];
    for (int i = 0; i < W; ++i) kw[i] = ks[i];
    for (int g = 0; g < G; ++g) {
      const uint32_t* qw = a.qsig + (int64_t(s) * a.n_head_q + kvh * G + g) * k_max_words;
      int c = 0;
      for (int i = 0; i < W; ++i) c += __popc(qw[i] ^ kw[i]);
      a.scores[(int64_t(s) * a.n_head_q + kvh * G + g) * a.n_max + t] = uint32_t(a.c.pred_bits - c);
    }
  }
}

// --- block-wide pieces of the selection ------------------------------------------------------

using scan_t = cub::BlockScan<int, k_sel_threads>;

struct sel_shared {
  typename scan_t::TempStorage scan;
  int hist[256];
  int64_t i64[4];
  uint32_t u32[4];
};

// Top-k of [lo, hi) by (key desc, position asc) over key(t) = keys[t] (order_key of f32 bits
// when `is_float`): a radix select of the k-th key by 8-bit digits from the top (histograms of
// the candidates that share the digits chosen so far), then one ordered pass that flags the
// keys above it and the lowest positions among those equal to it.
__device__ void topk_select(const uint32_t* keys, bool is_float, int64_t lo, int64_t hi, int64_t k,
                            uint8_t* flags, sel_shared& sh) {
  const int tid = threadIdx.x;
  const int64_t cnt = hi - lo;
  if (k <= 0) return;
  if (k >= cnt) {
    for (int64_t t = lo + tid; t < hi; t += k_sel_threads) flags[t] = 1;
    __syncthreads();
    return;
  }
  auto key_of = [&](int64_t t) {
    const uint32_t x = keys[t];
    return is_float ? order_key(__uint_as_float(x)) : x;
  };
  uint32_t prefix = 0, mask = 0;
  int64_t kk = k;  // rank still to place among the candidates matching the prefix
  for (int shift = is_float ? 24 : 8; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += k_sel_threads) sh.hist[i] = 0;
    __syncthreads();
    for (int64_t t = lo + tid; t < hi; t += k_sel_threads) {
      const uint32_t x = key_of(t);
      if ((x & mask) == prefix) atomicAdd(&sh.hist[(x >> shift) & 255u], 1);
    }
    __syncthreads();
    if (tid == 0) {
      int64_t above = 0;
      int dg = 255;
      for (; dg > 0; --dg) {
        if (above + sh.hist[dg] >= kk) break;
        above += sh.hist[dg];
      }
      sh.i64[0] = kk - above;
      sh.u32[0] = uint32_t(dg);
    }
    __syncthreads();
    kk = sh.i64[0];
    prefix |= sh.u32[0] << shift;
    mask |= 255u << shift;
    __syncthreads();
  }
  // prefix is the k-th key; kk of the keys equal to it are taken, lowest positions first.
  int64_t taken = 0;
  for (int64_t b = lo; b < hi; b += k_sel_threads) {
    const int64_t t = b + tid;
    uint32_t x = 0;
    if (t < hi) x = key_of(t);
    const int eq = (t < hi && x == prefix) ? 1 : 0;
    int rank, total;
    scan_t(sh.scan).ExclusiveSum(eq, rank, total);
    if (t < hi && (x > prefix || (eq && taken + rank < kk))) flags[t] = 1;
    taken += total;
    __syncthreads();
  }
}

// Appends the next `need` tokens of the walk (permutation positions from `pos`, members of F
// skipped) to out; returns the position after the last one taken.
__device__ int64_t walk(const vattn::detail::keyed_permutation& perm, int64_t n,
                        const uint8_t* flags, int64_t pos, int64_t need, int32_t* out,
                        sel_shared& sh) {
  const int tid = threadIdx.x;
  int64_t taken = 0;
  while (taken < need) {
    const int64_t p = pos + tid;
    int32_t t = 0;
    int keep = 0;
    if (p < n) {
      t = int32_t(perm(uint64_t(p)));
      keep = flags[t] == 0;
    }
    int rank, total;
    scan_t(sh.scan).ExclusiveSum(keep, rank, total);
    if (keep && taken + rank < need) {
      out[taken + rank] = t;
      if (taken + rank == need - 1) sh.i64[1] = p + 1;
    }
    __syncthreads();
    if (taken + total >= need) {
      pos = sh.i64[1];
      taken = need;
    } else {
      pos += k_sel_threads;
      taken += total;
    }
    __syncthreads();
  }
  return pos;
}

__device__ inline int unit_first_head(const run_kargs& a, int u) {
  return a.c.gqa_shared ? u * a.group : u;
}

// --- selection: F, the base sample ------------------------------------------------------------

// Grid (unit, sequence), k_sel_threads threads.
__global__ void __launch_bounds__(k_sel_threads) select_kernel(const run_kargs a) {
  __shared__ sel_shared sh;
  const int u = blockIdx.x, s = blockIdx.y, tid = threadIdx.x;
  const int64_t ui = int64_t(s) * a.n_units + u;
  unit_rec* ur = a.units + ui;
  int32_t* list = a.list + ui * a.n_max;
  uint8_t* flags = a.flags + ui * a.n_max;
  const int32_t n = a.seq_len[s];
  bool bad = false;
  if (n < 1 || n > a.n_max) {
    if (tid == 0) report_status(a.status, k_bad_seq_len, s, n, a.n_max, 0);
    bad = true;
  } else if (seq_base(a, s, n, tid == 0) < 0) {
    bad = true;
  } else if (a.c.pred == int32_t(predictor::sign_bits) && a.c.select == int32_t(selector::topk) &&
             a.ix_count[s] != n) {
    if (tid == 0) report_status(a.status, k_bad_index_len, s, a.ix_count[s], n, 0);
    bad = true;
  }
  if (bad) {
    if (tid == 0) *ur = unit_rec{0, 0, 0, 0, 0, 0, 1};
    return;
  }
  const stages st = resolve_stages(a.c, n);
  auto all_dense = [&]() {
    for (int64_t t = tid; t < n; t += k_sel_threads) list[t] = int32_t(t);
    if (tid == 0) *ur = unit_rec{n, n, 0, 0, 0, 1, 0};
  };
  if (st.dense) return all_dense();
  for (int64_t t = tid; t < n; t += k_sel_threads)
    flags[t] = (t < st.n_sink || t >= n - st.n_local) ? 1 : 0;
  __syncthreads();
  if (a.c.select == int32_t(selector::topk)) {
    const int h0 = unit_first_head(a, u);
    const bool is_float = a.c.pred == int32_t(predictor::oracle);
    for (int x = 0; x < a.unit_heads; ++x)
      topk_select(a.scores + (int64_t(s) * a.n_head_q + h0 + x) * a.n_max, is_float, st.n_sink,
                  n - st.n_local, st.k, flags, sh);
  }
  __syncthreads();
  // F ascending
  int64_t n_f = 0;
  for (int64_t b = 0; b < n; b += k_sel_threads) {
    const int64_t t = b + tid;
    const int f = (t < n && flags[t]) ? 1 : 0;
    int rank, total;
    scan_t(sh.scan).ExclusiveSum(f, rank, total);
    if (f) list[n_f + rank] = int32_t(t);
    n_f += total;
    __syncthreads();
  }
  const int64_t n_s = n - n_f;
  if (n_s < 2) return all_dense();
  const int64_t m0 = first_draws(a.c, n_s);
  int64_t pos = 0;
  if (m0 > 0) {
    // key head: the unit's index is the kv head (gqa_shared) or the query head
    const int64_t seq_key = a.seq_id ? a.seq_id[s] : s;
    const vattn::detail::keyed_permutation perm(
        vattn::detail::sample_key(a.c.seed, a.c.layer, seq_key, u, a.step), uint64_t(n));
    pos = walk(perm, n, flags, 0, m0, list + n_f, sh);
  }
  if (tid == 0) *ur = unit_rec{n, n_f, n_s, m0, pos, 0, 0};
}

// --- moments and budgets per query head -------------------------------------------------------

struct max_op {
  __device__ float operator()(float x, float y) const { return fmaxf(x, y); }
};
using mreduce_t = cub::BlockReduce<double, k_mom_threads>;
using freduce_t = cub::BlockReduce<float, k_mom_threads>;

// Grid (query head, sequence), k_mom_threads threads. Logits of F and the base draws (stored
// oracle logits, or computed in the CPU's order), the stabiliser c = their maximum, the weights
// e = exp(l - c) by the CPU's exp, and the sums behind base_moments in double.
template <dtype T>
__global__ void __launch_bounds__(k_mom_threads) moments_kernel(const run_kargs a) {
  constexpr int D_MAX = 128, WARPS = k_mom_threads / 32;
  __shared__ float qs[D_MAX];
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
  uint32_t* lg_row = a.scores + (int64_t(s) * a.n_head_q + h) * a.n_max;
  const bool oracle =
      a.c.select != int32_t(selector::none) && a.c.pred == int32_t(predictor::oracle);
  const int64_t base = seq_base(a, s, int32_t(ur.n), false);
  for (int i = tid; i < d; i += blockDim.x)
    qs[i] = __fmul_rn(a.q[(int64_t(s) * a.n_head_q + h) * d + i], a.c.scale);
  __syncthreads();
  const int warp = tid / 32, lane = tid % 32;
  if (!oracle) {  // logits of the listed rows, stored by list position in this head's row
    const int lanes = a.order.lanes, per_warp = 32 / lanes, sub = lane / lanes, ai = lane % lanes;
    for (int64_t ib = int64_t(warp) * per_warp; ib < L; ib += int64_t(WARPS) * per_warp) {
      const int64_t i = ib + sub;
      const bool valid = i < L;
      const int64_t row = valid ? row_of(a, s, base, list[i], kvh) : 0;
      const float l = seg_dot<T>(qs, a.k, row, d, a.order, ai, valid);
      if (valid && ai == 0) {
        if (!isfinite(l)) report_status(a.status, k_bad_key, s, list[i], kvh, 0);
        lg_row[i] = __float_as_uint(l);
      }
    }
    __syncthreads();
  }
  auto logit = [&](int64_t i) { return __uint_as_float(oracle ? lg_row[list[i]] : lg_row[i]); };
  float cmax = -INFINITY;
  for (int64_t i = tid; i < L; i += blockDim.x) cmax = fmaxf(cmax, logit(i));
  cmax = freduce_t(red.f).Reduce(cmax, max_op());
  if (tid == 0) sc[0] = double(cmax);
  __syncthreads();
  const float c = float(sc[0]);
  __syncthreads();
  double d_f = 0, s_e = 0, s_ee = 0;
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

// --- finishing: the sample extended to b, lists, weights, stats, indices -----------------------

// Grid (unit, sequence), k_sel_threads threads.
__global__ void __launch_bounds__(k_sel_threads) finish_kernel(const run_kargs a) {
  __shared__ sel_shared sh;
  const int u = blockIdx.x, s = blockIdx.y, tid = threadIdx.x;
  const int64_t ui = int64_t(s) * a.n_units + u;
  const unit_rec ur = a.units[ui];
  int32_t* list = a.list + ui * a.n_max;
  float* wts = a.weights + ui * a.n_max;
  const uint8_t* flags = a.flags + ui * a.n_max;
  const int h0 = unit_first_head(a, u);
  if (ur.skip) {
    if (tid == 0) list[0] = 0, wts[0] = 1.f, a.list_len[ui] = 1;
    return;
  }
  const int64_t n = ur.n, n_f = ur.n_f, m0 = ur.m0;
  int64_t b = 0;
  if (!ur.dense) {
    if (a.c.sample == int32_t(sampling::fixed_rate)) b = m0;
    if (a.c.sample == int32_t(sampling::adaptive)) {
      b = m0;
      for (int x = 0; x < a.unit_heads; ++x)
        b = max64(b, a.heads[int64_t(s) * a.n_head_q + h0 + x].b);
    }
    if (b > m0) {
      const int64_t seq_key = a.seq_id ? a.seq_id[s] : s;
      const vattn::detail::keyed_permutation perm(
          vattn::detail::sample_key(a.c.seed, a.c.layer, seq_key, u, a.step), uint64_t(n));
      walk(perm, n, flags, ur.pos, b - m0, list + n_f + m0, sh);
    }
  }
  const int64_t len = n_f + b;
  const float w = b > 0 ? float(double(ur.n_s) / double(b)) : 0.f;
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
      const double k_rows = oracle ? double(n) : double(n_f + b);
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
  size_t scores, qsig, flags, list, weights, list_len, units, heads, bytes;
};
run_layout run_layout_for(const config& cfg, int32_t n_seq, int32_t hq, int32_t hkv, int64_t n) {
  run_layout l{};
  if (cfg.dense) return l;
  const size_t units = size_t(n_seq) * size_t(cfg.gqa_shared ? hkv : hq);
  const size_t heads = size_t(n_seq) * size_t(hq);
  size_t at = 0;
  auto take = [&at](size_t bytes) {
    const size_t p = at;
    at += round256(bytes);
    return p;
  };
  l.scores = take(heads * size_t(n) * 4);
  l.qsig = take(heads * k_max_words * 4);
  l.flags = take(units * size_t(n));
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

}  // namespace

// decode.cu: the host checks of dense() and sparse()
void check_run_host(const params& p, int32_t n_head_q, const float* q, const kv_cache& kv,
                    const float* out, float scale, const void* ws, size_t ws_size,
                    size_t ws_needed);

void check_run_config(const config& cfg) {
  if (cfg.dense) return;
  if (cfg.hub) throw error("config: hub=1 is not supported by the CUDA backend");
  if (cfg.select == selector::topp)
    throw error("config: select=topp is not supported by the CUDA backend (top-k or none)");
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
  k.k = kv.k;
  k.v = kv.v;
  k.stride_token = kv.stride_token;
  k.stride_head = kv.stride_head;
  k.stride_page = kv.stride_page;
  k.paged = kv.layout == kv_layout::paged;
  k.page_size = kv.page_size;
  k.seq_len = kv.seq_len;
  k.seq_start = kv.seq_start;
  k.page_table = kv.page_table;
  k.page_start = kv.page_start;
  k.n_rows = kv.n_rows;
  k.n_pages = kv.n_pages;
  k.n_max = int32_t(p_.n_tokens_max);
  k.n_head_q = p_.n_head_q;
  k.n_head_kv = p_.n_head_kv;
  k.d = p_.head_dim;
  k.group = p_.n_head_q / p_.n_head_kv;
  k.unit_heads = cfg_.gqa_shared ? k.group : 1;
  k.n_units = cfg_.gqa_shared ? p_.n_head_kv : p_.n_head_q;
  k.es = int32_t(dtype_size(p_.kv_type));
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
  k.flags = reinterpret_cast<uint8_t*>(rb + l.flags);
  k.list = reinterpret_cast<int32_t*>(rb + l.list);
  k.weights = reinterpret_cast<float*>(rb + l.weights);
  k.list_len = reinterpret_cast<int32_t*>(rb + l.list_len);
  k.units = reinterpret_cast<unit_rec*>(rb + l.units);
  k.heads = reinterpret_cast<head_rec*>(rb + l.heads);

  check(cudaMemsetAsync(k.status, 0, sizeof(device_status), stream), "clearing the status record");
  if (cfg_.select == selector::topk) {
    const unsigned hkv = unsigned(p_.n_head_kv);
    if (signs) {
      query_signatures<<<dim3(p_.n_head_q, n_seq), k_score_threads, 0, stream>>>(k);
      check(cudaGetLastError(), "signature kernel launch");
      const unsigned blocks = unsigned((p_.n_tokens_max + k_sign_tokens - 1) / k_sign_tokens);
      sign_scores<<<dim3(blocks, hkv, n_seq), k_score_threads, 0, stream>>>(k);
      check(cudaGetLastError(), "sign scoring kernel launch");
    } else {
      const unsigned blocks = unsigned((p_.n_tokens_max + k_score_tokens - 1) / k_score_tokens);
      const size_t shm = size_t(k.group) * p_.head_dim * sizeof(float);
      switch (p_.kv_type) {
        case dtype::bf16:
          oracle_scores<dtype::bf16><<<dim3(blocks, hkv, n_seq), k_score_threads, shm, stream>>>(k);
          break;
        case dtype::f16:
          oracle_scores<dtype::f16><<<dim3(blocks, hkv, n_seq), k_score_threads, shm, stream>>>(k);
          break;
        case dtype::f32:
          oracle_scores<dtype::f32><<<dim3(blocks, hkv, n_seq), k_score_threads, shm, stream>>>(k);
          break;
      }
      check(cudaGetLastError(), "oracle scoring kernel launch");
    }
  }
  const dim3 ugrid(unsigned(k.n_units), unsigned(n_seq));
  select_kernel<<<ugrid, k_sel_threads, 0, stream>>>(k);
  check(cudaGetLastError(), "selection kernel launch");
  if (cfg_.sample != sampling::none) {
    const dim3 hgrid(unsigned(p_.n_head_q), unsigned(n_seq));
    switch (p_.kv_type) {
      case dtype::bf16:
        moments_kernel<dtype::bf16><<<hgrid, k_mom_threads, 0, stream>>>(k);
        break;
      case dtype::f16:
        moments_kernel<dtype::f16><<<hgrid, k_mom_threads, 0, stream>>>(k);
        break;
      case dtype::f32:
        moments_kernel<dtype::f32><<<hgrid, k_mom_threads, 0, stream>>>(k);
        break;
    }
    check(cudaGetLastError(), "moments kernel launch");
  }
  finish_kernel<<<ugrid, k_sel_threads, 0, stream>>>(k);
  check(cudaGetLastError(), "finishing kernel launch");

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
}

}  // namespace vattn::cuda
