// cuda_attention.hpp: the host API of the CUDA backend: decode attention on device buffers,
// dense (split-KV over every token) or over weighted per-head index lists (vAttention's F plus
// its sample), each merged across splits by log-sum-exp, and the keyed sampler on the device.
// Design: docs/design/cuda.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "vattn/vattn.hpp"

struct CUstream_st;  // cudaStream_t is CUstream_st*; no CUDA header is needed to use this API

namespace vattn::cuda {

using stream_t = CUstream_st*;  // a cudaStream_t; nullptr is the legacy default stream

// A failure of the CUDA runtime itself (no device, a launch that failed); invalid arguments raise
// vattn::error as everywhere else.
class cuda_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// What a plan is sized for (the CUDA counterpart of vattn::plan_params).
struct params {
  int32_t n_seq_max = 1;        // sequences per run, 1..65535
  int32_t n_head_q = 0;         // query heads, a multiple of n_head_kv (any group size)
  int32_t n_head_kv = 0;        // kv heads
  int32_t head_dim = 0;         // 64 or 128
  int64_t n_tokens_max = 0;     // longest sequence (and longest index list), 1..2^31-1
  dtype kv_type = dtype::bf16;  // K and V elements: bf16, f16 or f32
};

// Dense decode attention: out = softmax(scale q K^T) V over every token of each sequence.
struct dense_args {
  int32_t n_head_q = 0;
  const float* q = nullptr;  // device [n_seq, n_head_q, head_dim], packed
  // Every pointer in kv (k, v, seq_len, seq_start, page_table, page_start) is a device pointer;
  // layouts and strides as documented in vattn.hpp. K and V must be 16-byte aligned and every
  // stride a multiple of 16 bytes (the kernels load rows 16 bytes at a time).
  kv_cache kv;
  float* out = nullptr;  // device [n_seq, n_head_q, head_dim], packed; written in full
  float scale = 0;       // logit scale; 0 means 1 / sqrt(head_dim)
};

// Weighted sparse attention: per (sequence, list head) a list of token positions t_i with
// weights w_i, and out = sum_i w_i e_i v_{t_i} / sum_i w_i e_i with e_i = exp(scale q.k_{t_i} - c).
// The lists vAttention reads are F with weight 1 followed by the sample with weight n_s / b (the
// CPU path's run_args::indices and head_stats give exactly these).
struct sparse_args {
  int32_t n_head_q = 0;
  const float* q = nullptr;  // device [n_seq, n_head_q, head_dim], packed
  kv_cache kv;               // as in dense_args
  // false: one list per query head (list head = query head, n_list_heads = n_head_q);
  // true: one list per kv group, read once for all its query heads (n_list_heads = n_head_kv).
  bool per_group = false;
  const int32_t* indices = nullptr;   // device [n_seq, n_list_heads, list_stride]: positions in
                                      // [0, seq_len[s]), any order, duplicates allowed
  const float* weights = nullptr;     // device, the same shape: each position's weight
  const int32_t* list_len = nullptr;  // device [n_seq, n_list_heads], each in [1, list_stride]
  int64_t list_stride = 0;            // 1..params.n_tokens_max
  float* out = nullptr;               // device [n_seq, n_head_q, head_dim], packed
  float scale = 0;                    // 0 means 1 / sqrt(head_dim)
};

// The device mirror of a vattn::predictor_index (sign_bits): the CPU index's key signatures and
// projection rows copied to device memory, so the GPU ranks tokens by exactly the signatures
// the CPU ranks them by. Built from the CPU index (its params and config); upload() copies what
// the CPU index holds now (call it after predictor_index::update, before the runs that use it).
// Owns device memory; move-only.
class device_index {
 public:
  explicit device_index(const predictor_index& ix);  // allocates; throws vattn::error / cuda_error
  device_index(device_index&& o) noexcept;
  device_index& operator=(device_index&& o) noexcept;
  device_index(const device_index&) = delete;
  device_index& operator=(const device_index&) = delete;
  ~device_index();

  // Copies every slot's signatures [0, tokens(slot)), the projections and the token counts
  // (synchronous with respect to the host; not capturable).
  void upload(const predictor_index& ix);

  const config& cfg() const { return cfg_; }
  const plan_params& shape() const { return p_; }
  size_t device_bytes() const { return bytes_; }

  // For the kernels.
  const uint32_t* signatures() const { return sig_; }  // [slot, kv head, token, words]
  const float* projections() const { return proj_; }   // [kv head, bits, head_dim]
  const int64_t* counts() const { return count_; }     // [slot] tokens each slot holds

 private:
  void release();
  config cfg_;
  plan_params p_;
  uint32_t* sig_ = nullptr;
  float* proj_ = nullptr;
  int64_t* count_ = nullptr;
  size_t bytes_ = 0;
};

// One end-to-end decode step on the device (plan::run): selection, budgets, sampling and the
// weighted sparse kernel, as vattn::plan::run computes it on the CPU, with the same index sets.
struct run_args {
  int32_t n_head_q = 0;
  const float* q = nullptr;     // device [n_seq, n_head_q, head_dim], packed
  kv_cache kv;                  // device pointers, as in dense_args
  float* out = nullptr;         // device [n_seq, n_head_q, head_dim], packed; written in full
  head_stats* stats = nullptr;  // optional device [n_seq, n_head_q] (vattn::head_stats)
  // optional device [n_seq, n_head_q, params.n_tokens_max]: F ascending, then the sample in
  // draw order (stats.n_f + stats.n_sampled entries; the rest is left untouched), as the CPU's
  // run_args::indices
  int32_t* indices = nullptr;
  uint64_t step = 0;                // decode step, part of the sampling key
  const int64_t* seq_id = nullptr;  // optional device [n_seq] sampling-key ids (default: index)
  // Required for predictor=signs: the mirror of an index built with the same config and head
  // shapes whose slot s holds exactly seq_len[s] tokens (checked on the device).
  const device_index* index = nullptr;
  // Optional, for profiling (bench_cuda): called on the host right after each stage's kernels
  // are enqueued on the stream, e.g. to record an event there. Stages, in order: "score"
  // (top-k only), "select", "refine logits" and "refine select" (refine > 1: the shortlist's
  // exact logits, then each head's top-k among them and F), "sample", "list logits" (sampling
  // without oracle logits), "moments" (these three with sampling), "finish", "attend".
  void (*stage_hook)(const char* stage, void* ctx) = nullptr;
  void* stage_ctx = nullptr;
};

// Plan once, run many. The constructor validates the shapes (vattn::error naming the field),
// then reads the current device's multiprocessor count and the kernels' occupancy: a plan runs
// on the device that was current when it was made. dense(), sparse() and run() check their
// arguments on the host, then enqueue on `stream` without allocating or synchronising (so they
// can be captured in a CUDA graph). Values that live on the device (seq_len, pages, list
// lengths, indices) are checked by the kernels: a bad one makes the run write NaN outputs and
// leaves a record in the workspace that check_errors() turns into a vattn::error.
class plan {
 public:
  explicit plan(const params& p);
  // A plan that can also run(cfg): cfg.validate() must pass and the CUDA backend must support it:
  // dense, or sinks + local + optional top-k (predictor oracle or signs, the latter with optional
  // refine) + optional fixed-rate or adaptive sampling (not top-p, not hub, not predictor=pages).
  plan(const params& p, const config& cfg);

  // Device workspace every run needs: at least this many bytes, 16-byte aligned (cudaMalloc's
  // alignment is enough). Its contents need no initialisation and are not kept between runs.
  size_t workspace_bytes() const { return ws_bytes_; }
  const params& shape() const { return p_; }
  const config& cfg() const { return cfg_; }

  void dense(const dense_args& a, void* workspace, size_t workspace_size, stream_t stream) const;
  void sparse(const sparse_args& a, void* workspace, size_t workspace_size, stream_t stream) const;
  // The configured method end to end (plans made without a config run dense attention).
  void run(const run_args& a, void* workspace, size_t workspace_size, stream_t stream) const;

  // The number of KV splits a run uses (a function of the shapes only; for benchmarks).
  int32_t dense_splits(int32_t n_seq) const;
  int32_t sparse_splits(int32_t n_seq, bool per_group, int64_t list_stride) const;

 private:
  int32_t splits(int32_t n_seq, int32_t blocks_per_seq, int64_t tokens, int32_t per_sm,
                 int32_t min_chunk) const;
  void enqueue_dense(const dense_args& a, void* ws, stream_t stream, bool clear) const;
  void enqueue_sparse(const sparse_args& a, void* ws, stream_t stream, bool clear) const;

  params p_;
  config cfg_;
  int32_t heads_per_block_ = 1;  // query heads of one kv group a dense block serves
  int32_t sm_count_ = 0;
  int32_t per_sm_[3] = {};  // resident blocks per SM: dense, sparse per head, sparse per group
  int32_t cpu_level_ = 0;   // the CPU's SIMD level whose float summation order run() follows
  size_t split_bytes_ = 0;  // the split states' part of the workspace
  size_t ws_bytes_ = 0;
};

// Waits for `stream`, then reads what the last run on `workspace` recorded: throws vattn::error
// naming the first bad device-side value (e.g. "kv.seq_len[2] = 0: ...") or returns if none.
void check_errors(const void* workspace, stream_t stream);

// The sampling key fields of SPEC section 3 (vattn::detail::sample_key).
struct sample_key_fields {
  uint64_t seed = 0;
  int32_t layer = 0;
  int64_t seq = 0;   // the sequence id (run_args::seq_id, or the batch index)
  int32_t head = 0;  // the query head, or the kv head with gqa_shared
  uint64_t step = 0;
};

// The keyed permutation on the device: out[i] = keyed_permutation(sample_key(key), n)(first + i)
// for i < count (device int64 [count]). The CPU computes the same elements from the same key,
// so a sample drawn on the GPU equals the CPU's (tests/cuda).
void permutation(const sample_key_fields& key, uint64_t n, uint64_t first, uint64_t count,
                 int64_t* out, stream_t stream);

}  // namespace vattn::cuda
