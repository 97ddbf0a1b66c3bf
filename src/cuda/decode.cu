// decode.cu: the CUDA backend's launcher: validation, the one kernel dispatch, split counts and
// workspace layout, the log-sum-exp merge of split states, device-error reporting, and the
// keyed-permutation sampler on the device.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "core/kv_access.hpp"
#include "core/sampler.hpp"
#include "cpu/simd.hpp"
#include "cuda/cuda_attention.hpp"
#include "cuda/kernel_args.hpp"

namespace vattn::cuda {
namespace {

using detail::split_args;

// ---------------------------------------------------------------------------------------------
// Kernels owned by the launcher.

// out[s, h, :] from the split states of (s, h): o = sum_k o_k 2^(m_k - M) / sum_k l_k 2^(m_k - M),
// M the largest m_k; empty splits (m = -inf) are skipped. A run whose kernels met a bad
// device-side argument writes NaN instead, so an unchecked failure cannot pass as a result.
__global__ void merge_kernel(const float2* __restrict__ part_ml, const float* __restrict__ part_o,
                             int n_split, const detail::device_status* status,
                             float* __restrict__ out) {
  const size_t bh = blockIdx.x;
  const int d = blockDim.x, j = threadIdx.x;
  if (status->code != detail::k_ok) {
    out[bh * d + j] = __int_as_float(0x7fc00000);
    return;
  }
  const float2* ml = part_ml + bh * n_split;
  float mx = -INFINITY;
  for (int k = 0; k < n_split; ++k) mx = fmaxf(mx, ml[k].x);
  float sum = 0.f, o = 0.f;
  for (int k = 0; k < n_split; ++k) {
    const float2 p = ml[k];
    if (p.x == -INFINITY) continue;
    const float r = exp2f(p.x - mx);
    sum = fmaf(p.y, r, sum);
    o = fmaf(part_o[(bh * n_split + k) * d + j], r, o);
  }
  out[bh * d + j] = o / sum;
}

__global__ void permutation_kernel(sample_key_fields f, uint64_t n, uint64_t first, uint64_t count,
                                   int64_t* __restrict__ out) {
  const uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  const uint64_t key = vattn::detail::sample_key(f.seed, f.layer, f.seq, f.head, f.step);
  out[i] = int64_t(vattn::detail::keyed_permutation(key, n)(first + i));
}

// ---------------------------------------------------------------------------------------------
// Dispatch: the only place where runtime shapes become a kernel instance. The plan asks it for
// every kernel it may launch, so a shape it accepts always has a kernel.

struct kernel_entry {
  cudaError_t (*launch)(const split_args&, dim3, cudaStream_t);
  int (*blocks_per_sm)();
};

template <dtype T, int D, int G, bool S>
kernel_entry entry() {
  return {&detail::launch_split<T, D, G, S>, &detail::split_blocks_per_sm<T, D, G, S>};
}

template <dtype T, int D>
kernel_entry find_kernel_g(int32_t g, bool sparse) {
  switch (g) {
    case 1:
      return sparse ? entry<T, D, 1, true>() : entry<T, D, 1, false>();
    case 2:
      return sparse ? entry<T, D, 2, true>() : entry<T, D, 2, false>();
    case 4:
      return sparse ? entry<T, D, 4, true>() : entry<T, D, 4, false>();
    case 8:
      return sparse ? entry<T, D, 8, true>() : entry<T, D, 8, false>();
    default:
      throw error("vattn::cuda: no kernel serves " + std::to_string(g) +
                  " query heads per block (1, 2, 4, 8)");
  }
}

template <dtype T>
kernel_entry find_kernel_d(int32_t d, int32_t g, bool sparse) {
  switch (d) {
    case 64:
      return find_kernel_g<T, 64>(g, sparse);
    case 128:
      return find_kernel_g<T, 128>(g, sparse);
    default:
      throw error("params.head_dim = " + std::to_string(d) +
                  ": the CUDA kernels support head_dim 64 and 128");
  }
}

kernel_entry find_kernel(dtype t, int32_t d, int32_t g, bool sparse) {
  switch (t) {
    case dtype::bf16:
      return find_kernel_d<dtype::bf16>(d, g, sparse);
    case dtype::f16:
      return find_kernel_d<dtype::f16>(d, g, sparse);
    case dtype::f32:
      return find_kernel_d<dtype::f32>(d, g, sparse);
  }
  throw error("params.kv_type = " + std::to_string(int(t)) + ": expected f32, f16 or bf16");
}

// Query heads of one kv group that one block serves: the largest power of two dividing the
// group, at most 8 (a group of 6 runs as 3 blocks of 2 heads; each block reads the rows again).
int32_t heads_per_block(int32_t group) {
  int32_t g = 1;
  while (g < 8 && group % (2 * g) == 0) g *= 2;
  return g;
}

enum kernel_kind { k_dense = 0, k_sparse_head = 1, k_sparse_group = 2 };

// ---------------------------------------------------------------------------------------------
// Workspace: [status record | split (m, l) pairs | split outputs], each part 256-byte aligned.

constexpr size_t round_up(size_t x, size_t a) {
  return (x + a - 1) / a * a;
}
struct ws_layout {
  size_t ml_offset, o_offset, bytes;
};
ws_layout layout_for(size_t n_part, int32_t d) {
  ws_layout w;
  w.ml_offset = detail::k_status_bytes;
  w.o_offset = w.ml_offset + round_up(n_part * sizeof(float2), 256);
  w.bytes = w.o_offset + n_part * size_t(d) * sizeof(float);
  return w;
}

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw cuda_error(std::string("vattn::cuda: ") + what + ": " + cudaGetErrorString(e));
}

std::string str(int64_t x) {
  return std::to_string(x);
}

// ---------------------------------------------------------------------------------------------
// Host-side checks of run arguments (device-resident values are checked by the kernels).

bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

void check_run(const params& p, int32_t n_head_q, const float* q, const kv_cache& kv,
               const float* out, float scale, const void* ws, size_t ws_size, size_t ws_needed) {
  if (n_head_q != p.n_head_q)
    throw error("n_head_q = " + str(n_head_q) + ": the plan is for " + str(p.n_head_q));
  if (!q) throw error("q is null: expected a device pointer to [n_seq, n_head_q, head_dim] f32");
  if (!out)
    throw error("out is null: expected a device pointer to [n_seq, n_head_q, head_dim] f32");
  if (!(std::isfinite(scale) && scale >= 0))
    throw error("scale = " + std::to_string(scale) + ": expected 0 (1/sqrt(head_dim)) or > 0");
  if (kv.n_seq < 1 || kv.n_seq > p.n_seq_max)
    throw error("kv.n_seq = " + str(kv.n_seq) + ": expected 1..n_seq_max = " + str(p.n_seq_max));
  if (kv.n_head_kv != p.n_head_kv)
    throw error("kv.n_head_kv = " + str(kv.n_head_kv) + ": the plan is for " + str(p.n_head_kv));
  if (kv.head_dim != p.head_dim)
    throw error("kv.head_dim = " + str(kv.head_dim) + ": the plan is for " + str(p.head_dim));
  if (kv.type != p.kv_type)
    throw error(std::string("kv.type = ") + dtype_name(kv.type) + ": the plan is for " +
                dtype_name(p.kv_type));
  if (!kv.k) throw error("kv.k is null: expected a device pointer");
  if (!kv.v) throw error("kv.v is null: expected a device pointer");
  if (!kv.seq_len) throw error("kv.seq_len is null: expected a device pointer to int32 [n_seq]");
  if (!aligned16(kv.k) || !aligned16(kv.v))
    throw error("kv.k and kv.v must be 16-byte aligned (the kernels load 16-byte words)");
  const size_t es = dtype_size(kv.type);
  auto check_stride = [&](int64_t st, const char* name) {
    if (st < 0) throw error(std::string("kv.") + name + " = " + str(st) + ": expected >= 0");
    if ((size_t(st) * es) % 16 != 0)
      throw error(std::string("kv.") + name + " = " + str(st) + " elements of " + str(es) +
                  " bytes: expected a multiple of 16 bytes (16-byte row loads)");
  };
  check_stride(kv.stride_token, "stride_token");
  check_stride(kv.stride_head, "stride_head");
  if (kv.layout == kv_layout::contiguous) {
    if (kv.n_rows < 1) throw error("kv.n_rows = " + str(kv.n_rows) + ": expected >= 1");
  } else if (kv.layout == kv_layout::paged) {
    if (kv.page_size < 1) throw error("kv.page_size = " + str(kv.page_size) + ": expected >= 1");
    if (!kv.page_table) throw error("kv.page_table is null: expected a device pointer (paged)");
    if (!kv.page_start) throw error("kv.page_start is null: expected a device pointer (paged)");
    if (kv.n_pages < 1) throw error("kv.n_pages = " + str(kv.n_pages) + ": expected >= 1");
    check_stride(kv.stride_page, "stride_page");
  } else {
    throw error("kv.layout = " + str(int(kv.layout)) + ": expected contiguous or paged");
  }
  if (!ws) throw error("workspace is null: expected workspace_bytes() bytes of device memory");
  if (!aligned16(ws)) throw error("workspace must be 16-byte aligned");
  if (ws_size < ws_needed)
    throw error("workspace_size = " + str(int64_t(ws_size)) + ": the plan needs " +
                str(int64_t(ws_needed)) + " bytes (workspace_bytes())");
}

split_args make_args(const params& p, const kv_cache& kv, const float* q, float scale) {
  split_args s{};
  static_cast<detail::kv_view&>(s) = detail::make_kv_view(kv);
  s.q = q;
  s.n_tokens_max = int32_t(p.n_tokens_max);
  s.n_head_q = p.n_head_q;
  s.group = p.n_head_q / p.n_head_kv;
  const float sc = scale > 0 ? scale : 1.0f / std::sqrt(float(p.head_dim));
  s.scale_log2 = sc * 1.4426950408889634f;  // log2(e)
  return s;
}

// Enqueues one run: clear the status record, the split kernel, the merge.
void enqueue(const params& p, const kernel_entry& k, split_args s, int32_t n_seq,
             int32_t blocks_per_seq, int32_t n_split, void* ws, float* out, cudaStream_t stream,
             bool clear) {
  const ws_layout w = layout_for(size_t(n_seq) * p.n_head_q * n_split, p.head_dim);
  char* base = static_cast<char*>(ws);
  s.n_split = n_split;
  s.status = reinterpret_cast<detail::device_status*>(base);
  s.part_ml = reinterpret_cast<float2*>(base + w.ml_offset);
  s.part_o = reinterpret_cast<float*>(base + w.o_offset);
  if (clear)
    check_cuda(cudaMemsetAsync(s.status, 0, sizeof(detail::device_status), stream),
               "clearing the status record");
  check_cuda(k.launch(s, dim3(n_split, blocks_per_seq, n_seq), stream), "split kernel launch");
  merge_kernel<<<unsigned(n_seq) * p.n_head_q, p.head_dim, 0, stream>>>(s.part_ml, s.part_o,
                                                                        n_split, s.status, out);
  check_cuda(cudaGetLastError(), "merge kernel launch");
}

}  // namespace

namespace detail {
void check_run_host(const params& p, int32_t n_head_q, const float* q, const kv_cache& kv,
                    const float* out, float scale, const void* ws, size_t ws_size,
                    size_t ws_needed) {
  check_run(p, n_head_q, q, kv, out, scale, ws, ws_size, ws_needed);
}
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// plan

plan::plan(const params& p) : plan(p, method_config("dense")) {}

plan::plan(const params& p, const config& cfg) : p_(p), cfg_(cfg) {
  if (p.n_seq_max < 1 || p.n_seq_max > 65535)
    throw error("params.n_seq_max = " + str(p.n_seq_max) + ": expected 1..65535");
  if (p.n_head_kv < 1) throw error("params.n_head_kv = " + str(p.n_head_kv) + ": expected >= 1");
  if (p.n_head_q < 1 || p.n_head_q % p.n_head_kv != 0)
    throw error("params.n_head_q = " + str(p.n_head_q) +
                ": expected a positive multiple of n_head_kv = " + str(p.n_head_kv));
  if (p.n_tokens_max < 1 || p.n_tokens_max > INT32_MAX)
    throw error("params.n_tokens_max = " + str(p.n_tokens_max) + ": expected 1..2^31-1");
  cfg_.validate();
  detail::check_run_config(cfg_);
  heads_per_block_ = heads_per_block(p.n_head_q / p.n_head_kv);
  if (p.n_head_q > 65535)
    throw error("params.n_head_q = " + str(p.n_head_q) + ": expected at most 65535");
  const kernel_entry kernels[3] = {find_kernel(p.kv_type, p.head_dim, heads_per_block_, false),
                                   find_kernel(p.kv_type, p.head_dim, 1, true),
                                   find_kernel(p.kv_type, p.head_dim, heads_per_block_, true)};
  // Shapes are valid: now the device.
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "no usable CUDA device");
  check_cuda(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, dev),
             "reading the multiprocessor count");
  for (int i = 0; i < 3; ++i) {
    per_sm_[i] = kernels[i].blocks_per_sm();
    if (per_sm_[i] < 1) check_cuda(cudaGetLastError(), "occupancy query of the split kernel");
    per_sm_[i] = std::max(per_sm_[i], 1);
  }
  size_t n_part = 0;
  for (int32_t n_seq = 1; n_seq <= p.n_seq_max; ++n_seq) {
    const int32_t most = std::max({dense_splits(n_seq), sparse_splits(n_seq, false, p.n_tokens_max),
                                   sparse_splits(n_seq, true, p.n_tokens_max)});
    n_part = std::max(n_part, size_t(n_seq) * p.n_head_q * most);
  }
  split_bytes_ = round_up(layout_for(n_part, p.head_dim).bytes, 256);
  ws_bytes_ = split_bytes_ + detail::run_workspace_bytes(cfg_, p.n_seq_max, p.n_head_q, p.n_head_kv,
                                                         p.n_tokens_max);
  cpu_level_ = int32_t(vattn::detail::active_simd_level());
  detail::prepare_run(cfg_, p.kv_type, p.head_dim, p.n_head_q / p.n_head_kv);
}

// Splits fill one wave of resident blocks (a partial second wave would leave most of the
// machine idle), with at least min_chunk tokens or list entries each.
int32_t plan::splits(int32_t n_seq, int32_t blocks_per_seq, int64_t tokens, int32_t per_sm,
                     int32_t min_chunk) const {
  const int64_t wave = int64_t(per_sm) * sm_count_;
  const int64_t want = std::max<int64_t>(1, wave / (int64_t(n_seq) * blocks_per_seq));
  const int64_t need = (tokens + min_chunk - 1) / min_chunk;
  return int32_t(std::clamp<int64_t>(std::min(want, need), 1, detail::k_max_splits));
}

int32_t plan::dense_splits(int32_t n_seq) const {
  return splits(n_seq, p_.n_head_q / heads_per_block_, p_.n_tokens_max, per_sm_[k_dense],
                detail::k_min_chunk);
}

int32_t plan::sparse_splits(int32_t n_seq, bool per_group, int64_t list_stride) const {
  if (per_group)
    return splits(n_seq, p_.n_head_q / heads_per_block_, list_stride, per_sm_[k_sparse_group],
                  detail::k_min_chunk_sparse);
  return splits(n_seq, p_.n_head_q, list_stride, per_sm_[k_sparse_head],
                detail::k_min_chunk_sparse);
}

void plan::dense(const dense_args& a, void* workspace, size_t workspace_size,
                 stream_t stream) const {
  const kv_cache kv = vattn::detail::with_default_strides(a.kv);
  check_run(p_, a.n_head_q, a.q, kv, a.out, a.scale, workspace, workspace_size, ws_bytes_);
  enqueue_dense(a, workspace, stream, true);
}

void plan::enqueue_dense(const dense_args& a, void* workspace, stream_t stream, bool clear) const {
  const kv_cache kv = vattn::detail::with_default_strides(a.kv);
  const split_args s = make_args(p_, kv, a.q, a.scale);
  const kernel_entry k = find_kernel(p_.kv_type, p_.head_dim, heads_per_block_, false);
  enqueue(p_, k, s, kv.n_seq, p_.n_head_q / heads_per_block_, dense_splits(kv.n_seq), workspace,
          a.out, stream, clear);
}

void plan::sparse(const sparse_args& a, void* workspace, size_t workspace_size,
                  stream_t stream) const {
  const kv_cache kv = vattn::detail::with_default_strides(a.kv);
  check_run(p_, a.n_head_q, a.q, kv, a.out, a.scale, workspace, workspace_size, ws_bytes_);
  if (!a.indices) throw error("indices is null: expected a device pointer to int32 lists");
  if (!a.weights) throw error("weights is null: expected a device pointer to f32 weights");
  if (!a.list_len) throw error("list_len is null: expected a device pointer to int32 lengths");
  if (a.list_stride < 1 || a.list_stride > p_.n_tokens_max)
    throw error("list_stride = " + str(a.list_stride) +
                ": expected 1..n_tokens_max = " + str(p_.n_tokens_max));
  enqueue_sparse(a, workspace, stream, true);
}

void plan::enqueue_sparse(const sparse_args& a, void* workspace, stream_t stream,
                          bool clear) const {
  const kv_cache kv = vattn::detail::with_default_strides(a.kv);
  split_args s = make_args(p_, kv, a.q, a.scale);
  s.indices = a.indices;
  s.weights = a.weights;
  s.list_len = a.list_len;
  s.list_stride = a.list_stride;
  s.per_group = a.per_group;
  s.list_heads = a.per_group ? p_.n_head_kv : p_.n_head_q;
  const int32_t g = a.per_group ? heads_per_block_ : 1;
  const kernel_entry k = find_kernel(p_.kv_type, p_.head_dim, g, true);
  enqueue(p_, k, s, kv.n_seq, p_.n_head_q / g, sparse_splits(kv.n_seq, a.per_group, a.list_stride),
          workspace, a.out, stream, clear);
}

// ---------------------------------------------------------------------------------------------

void check_errors(const void* workspace, stream_t stream) {
  if (!workspace) throw error("workspace is null");
  check_cuda(cudaStreamSynchronize(stream), "waiting for the stream");
  detail::device_status st{};
  check_cuda(cudaMemcpy(&st, workspace, sizeof st, cudaMemcpyDeviceToHost),
             "reading the status record");
  const std::string seq = " (sequence " + str(st.seq) + ")";
  switch (st.code) {
    case detail::k_ok:
      return;
    case detail::k_bad_seq_len:
      throw error("kv.seq_len[" + str(st.seq) + "] = " + str(st.value) +
                  ": expected 1..n_tokens_max = " + str(st.aux));
    case detail::k_bad_rows:
      throw error("kv.seq_start / seq_len: sequence " + str(st.seq) + " occupies rows [" +
                  str(st.value) + ", " + str(st.value + st.aux) +
                  "), outside [0, kv.n_rows = " + str(st.limit) + ")");
    case detail::k_bad_page_start:
      throw error("kv.page_start[" + str(st.seq) + "] = " + str(st.value) + ": expected >= 0");
    case detail::k_bad_page:
      throw error("kv.page_table[" + str(st.aux) + "] = " + str(st.value) + seq +
                  ": expected a page id in [0, kv.n_pages = " + str(st.limit) + ")");
    case detail::k_bad_list_len:
      throw error("list_len[" + str(st.aux) + "] = " + str(st.value) + seq +
                  ": expected 1..list_stride = " + str(st.limit));
    case detail::k_bad_index:
      throw error("indices[" + str(st.aux) + "] = " + str(st.value) + seq +
                  ": expected a token position in [0, seq_len = " + str(st.limit) + ")");
    case detail::k_bad_key:
      throw error("k contains NaN/Inf (or q.k overflows) at seq " + str(st.seq) + ", token " +
                  str(st.value) + ", kv head " + str(st.aux));
    case detail::k_bad_index_len:
      throw error("index: slot " + str(st.seq) + " holds " + str(st.value) +
                  " tokens, kv.seq_len is " + str(st.aux) +
                  " (call predictor_index::update, then device_index::upload)");
    default:
      throw cuda_error("vattn::cuda: unknown status code " + str(st.code) +
                       " in the workspace (not a workspace of a run?)");
  }
}

void permutation(const sample_key_fields& key, uint64_t n, uint64_t first, uint64_t count,
                 int64_t* out, stream_t stream) {
  if (n < 1) throw error("n = 0: expected a permutation of at least one element");
  if (first > n || count > n - first)
    throw error("first + count = " + std::to_string(first) + " + " + std::to_string(count) +
                ": expected at most n = " + std::to_string(n));
  if (count == 0) return;
  if (!out) throw error("out is null: expected a device pointer to int64 [count]");
  const unsigned threads = 256;
  permutation_kernel<<<unsigned((count + threads - 1) / threads), threads, 0, stream>>>(
      key, n, first, count, out);
  check_cuda(cudaGetLastError(), "permutation kernel launch");
}

}  // namespace vattn::cuda
