// kernel_args.hpp: what the launcher (decode.cu) hands the split kernel (kernels.cuh), the
// device-side error record, and the entry points each instance file (split_<dtype>.cu) defines.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "vattn/vattn.hpp"

namespace vattn::cuda::detail {

constexpr int k_threads = 128;    // threads per split block (4 warps)
constexpr int k_min_chunk = 256;  // fewest tokens a dense split is given
// fewest list entries a sparse split is given: a 5% list at 128K (6.5K entries per kv group)
// then fills a wave at batch 1 (49 splits of 134 entries) instead of 26 splits of 256
constexpr int k_min_chunk_sparse = 64;
constexpr int k_max_splits = 1024;

// The first bad device-resident value a kernel met; written once (atomicCAS on code).
enum status_code : int32_t {
  k_ok = 0,
  k_bad_seq_len = 1,     // value = seq_len[seq], aux = n_tokens_max
  k_bad_rows = 2,        // value = first row, aux = seq_len
  k_bad_page_start = 3,  // value = page_start[seq]
  k_bad_page = 4,        // value = page id, aux = its index in page_table
  k_bad_list_len = 5,    // value = list_len, aux = its index in list_len
  k_bad_index = 6,       // value = position, aux = its index in indices
  k_bad_key = 7,         // value = token, aux = kv head: a non-finite logit (NaN/Inf in K or q)
  k_bad_index_len = 8,   // value = tokens the predictor index slot holds, aux = seq_len
};
struct device_status {
  int32_t code;
  int32_t seq;
  int64_t value;
  int64_t aux;
  int64_t limit;  // n_rows, n_pages or list_stride where the message needs it
};
constexpr size_t k_status_bytes = 256;  // the status record's slot at the workspace's start

// The KV-cache fields every kernel reads (a device-side copy of vattn::kv_cache's geometry);
// the launch arguments of the split kernel and of run()'s kernels derive from it. Strides are in
// elements.
struct kv_view {
  const void* k;
  const void* v;
  int64_t stride_token, stride_head, stride_page;
  int32_t paged;
  int32_t page_size;
  const int32_t* seq_len;
  const int64_t* seq_start;  // contiguous; nullptr: packed one after another
  const int32_t* page_table;
  const int64_t* page_start;
  int64_t n_rows, n_pages;
};
// The view of `kv` (whose default strides the caller resolved: with_default_strides).
inline kv_view make_kv_view(const kv_cache& kv) {
  kv_view w{};
  w.k = kv.k;
  w.v = kv.v;
  w.stride_token = kv.stride_token;
  w.stride_head = kv.stride_head;
  w.stride_page = kv.stride_page;
  w.paged = kv.layout == kv_layout::paged;
  w.page_size = kv.page_size;
  w.seq_len = kv.seq_len;
  w.seq_start = kv.seq_start;
  w.page_table = kv.page_table;
  w.page_start = kv.page_start;
  w.n_rows = kv.n_rows;
  w.n_pages = kv.n_pages;
  return w;
}

// Arguments of one launch of the split kernel (passed by value).
struct split_args : kv_view {
  const float* q;  // [n_seq, n_head_q, D]
  int32_t n_tokens_max;
  int32_t n_head_q;
  int32_t group;     // query heads per kv head
  float scale_log2;  // logit scale times log2(e): the kernels work in base 2
  // sparse lists
  const int32_t* indices;
  const float* weights;
  const int32_t* list_len;
  int64_t list_stride;
  int32_t list_heads;  // lists per sequence
  int32_t per_group;   // list head = kv head (1) or query head (0)
  // split-KV partial states: per (seq, query head, split) the running max m, sum l (as float2)
  // and the unnormalised output o[D]
  int32_t n_split;
  float2* part_ml;
  float* part_o;
  device_status* status;
};

// One instance per (KV type, head_dim, query heads per block, sparse); defined in
// split_<dtype>.cu. Grid: (n_split, n_head_q / G, n_seq), k_threads threads.
template <dtype T, int D, int G, bool Sparse>
cudaError_t launch_split(const split_args& a, dim3 grid, cudaStream_t stream);
// Resident blocks per multiprocessor of that instance (0 on a runtime error).
template <dtype T, int D, int G, bool Sparse>
int split_blocks_per_sm();

// run() (vattn_run.cu): whether the backend runs `cfg` (throws vattn::error naming what it does
// not support) and the workspace it needs beyond the split states.
void check_run_config(const config& cfg);
// The plan's one-time device setup of run()'s kernels (shared-memory limits by the GQA group).
void prepare_run(const config& cfg, dtype kv_type, int32_t head_dim, int32_t group);
size_t run_workspace_bytes(const config& cfg, int32_t n_seq_max, int32_t n_head_q,
                           int32_t n_head_kv, int64_t n_tokens_max);

}  // namespace vattn::cuda::detail
