// vattn.hpp: the public C++ API of vattn, verified sparse attention for LLM decoding.
// One call computes decode attention (one query row per sequence) over a KV cache, exactly over
// a deterministic set of tokens and by an unbiased sample over the rest; see docs/algorithm.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace vattn {

// ---------------------------------------------------------------------------------------------
// Errors: every invalid argument raises vattn::error whose message names the argument and what
// was expected. Non-finite values met in q, K or V raise vattn::error as well.
class error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// ---------------------------------------------------------------------------------------------
// Element types of the KV cache (queries and outputs are always f32).
enum class dtype : int32_t { f32 = 0, f16 = 1, bf16 = 2 };
size_t dtype_size(dtype t);
const char* dtype_name(dtype t);
dtype dtype_from_string(std::string_view s);  // "f32", "f16", "bf16"; throws vattn::error

// ---------------------------------------------------------------------------------------------
// Configuration (docs/algorithm.md and SPEC sections 2-6).

// A size given as a count of tokens or as a fraction f of a length n (resolved as floor(f * n)).
struct count_or_fraction {
  double value = 0;
  bool fraction = false;
  int64_t resolve(int64_t n) const;
};

// The data-dependent stage of the deterministic set F.
enum class selector : int32_t {
  none = 0,
  topk = 1,  // the k highest-scoring tokens outside sinks and local, as ranked by `predictor`
  topp = 2,  // smallest prefix (by score) of the remaining tokens that brings F's mass to top_p
};
// How top-k ranks tokens. The approximate predictors read a small index kept beside the cache
// (vattn::predictor_index) instead of every key.
enum class predictor : int32_t {
  oracle = 0,       // exact logits of every key: the quality ceiling, reads all of K
  page_bounds = 1,  // Quest: per page of `pred_page` tokens the elementwise min and max of K; a
                    // page scores the upper bound of q.k over it; the best pages enter F whole
  sign_bits = 2,    // SimHash: `pred_bits` sign bits of random (or learned) projections of each
                    // key; a token scores the bits its signature shares with the query's
};
const char* predictor_name(predictor p);  // "oracle", "pages", "signs"
// How the residual R = [0, n) \ F enters the output.
enum class sampling : int32_t {
  none = 0,        // R is dropped (pure top-k / top-p / sink+local baselines)
  fixed_rate = 1,  // a uniform sample of ceil(sample_rate * n_s) tokens, weight n_s / b
  adaptive = 2,    // vAttention: the budget b is chosen from (eps, delta) per head and query
};
// Which quantity the (eps, delta) guarantee bounds in adaptive sampling.
enum class budget_mode : int32_t {
  denominator = 0,  // |D^ - D| <= eps D (the paper's default)
  numerator = 1,    // ||N^ - N|| <= eps ||N||
  combined = 2,     // ||O^ - O|| <= eps ||O|| through both bounds and a union bound
  output = 3,       // ||O^ - O|| <= eps ||O|| directly (ratio estimator, delta method)
};
const char* budget_mode_name(budget_mode m);

struct config {
  bool dense = false;         // exact attention over every token; every other stage must be off
  count_or_fraction sink{};   // positions [0, sink)
  count_or_fraction local{};  // the last `local` positions
  selector select = selector::none;
  predictor pred = predictor::oracle;
  count_or_fraction topk{};  // select == topk; a fraction is of all n tokens
  int32_t pred_page = 16;    // page_bounds: tokens per bounds page, >= 1
  int32_t pred_bits = 64;    // sign_bits: bits per signature, a multiple of 32 in [32, 256]
  // Re-ranking of an approximate predictor's choice with exact logits (0 = off, else in
  // [1, 64]): the unit's predictor scores (per token the maximum over the unit's heads) pick a
  // shortlist of ceil(refine * k) tokens (pages: whole pages until they hold that many), then
  // each head's k tokens of the shortlist with the highest exact logits enter F. refine = 1
  // with gqa_shared selects k tokens per kv group and needs no logits; refine > 1 reads the
  // shortlist's K rows (faiss calls this re-ranking stage a refine with a k_factor).
  double refine = 0;
  double top_p = 0;  // select == topp, in (0, 1]
  sampling sample = sampling::none;
  double sample_rate = 0;              // fixed_rate, in (0, 1]
  count_or_fraction base{0.05, true};  // adaptive: base sample size m; a fraction is of n_s
  budget_mode mode = budget_mode::denominator;
  double eps = 0.05;        // adaptive: relative error target, in (0, 1)
  double delta = 0.05;      // adaptive: failure probability, in (0, 1)
  bool gqa_shared = false;  // heads of one kv group share F (union of top-k) and one sample
  bool hub = false;   // compatibility with the reference framework (SPEC section 6); adaptive only
  float scale = 0;    // logit scale; 0 means 1 / sqrt(head_dim)
  uint64_t seed = 0;  // sampling key, with layer, sequence id, head and step
  int32_t layer = 0;

  // Throws vattn::error naming the first invalid field or combination.
  void validate() const;
  // "key=value,key=value" form used by the command line and the C API, e.g.
  // "method=vattention,eps=0.05,delta=0.05,sink=128,local=128,topk=0.05,mode=output".
  std::string to_string() const;
};

// Named methods (the baselines of SPEC section 7 and vAttention). Sizes are left at the values
// the paper uses (sink 128, local 128, top-k 5% of n, base 5% of n_s, eps = delta = 0.05).
config method_config(std::string_view method);  // dense, sink_local, topk, topp, random,
                                                // vattention, hub; throws on other names
// Parses "key=value" pairs separated by ',' or whitespace on top of `base` (or of a method's
// preset when a `method=` key comes first). Unknown keys and bad values throw vattn::error.
config parse_config(std::string_view text, const config& base = config{});

// ---------------------------------------------------------------------------------------------
// Data model: one layer's KV cache for a batch of sequences of different lengths.

enum class kv_layout : int32_t { contiguous = 0, paged = 1 };

// K and V share one layout and one set of strides (in elements, not bytes). Element
// (seq s, token t, kv head h, dim d) lives at
//   contiguous: base + (seq_start[s] + t) * stride_token + h * stride_head + d
//   paged:      base + page * stride_page + (t % page_size) * stride_token + h * stride_head + d,
//               page = page_table[page_start[s] + t / page_size]
// A zero stride takes the packed default: stride_head = head_dim, stride_token =
// n_head_kv * stride_head, stride_page = page_size * stride_token.
struct kv_cache {
  kv_layout layout = kv_layout::contiguous;
  dtype type = dtype::f32;
  int32_t n_head_kv = 0;
  int32_t head_dim = 0;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t stride_token = 0;
  int64_t stride_head = 0;
  int64_t stride_page = 0;
  // batch
  int32_t n_seq = 0;
  const int32_t* seq_len = nullptr;  // [n_seq], each >= 1
  // contiguous: [n_seq] first token row of each sequence; nullptr means packed one after another
  const int64_t* seq_start = nullptr;
  int64_t n_rows = 0;  // contiguous: token rows the buffers hold (bounds check)
  // paged
  int32_t page_size = 0;
  const int32_t* page_table = nullptr;  // page ids
  const int64_t* page_start = nullptr;  // [n_seq] where each sequence's pages begin in page_table
  int64_t n_pages = 0;                  // pages the pool holds (bounds check)
};

// ---------------------------------------------------------------------------------------------
// The index an approximate predictor keeps for one layer: one slot per sequence of the batch,
// appended to as tokens are decoded (slot s follows sequence s of the kv_cache given to update).
// Construction allocates for n_seq_max slots of n_tokens_max tokens; nothing else allocates.
struct plan_params;  // below, with the plan
class predictor_index {
 public:
  // cfg.pred must be page_bounds or sign_bits; params as for the plan that will use the index.
  predictor_index(const config& cfg, const plan_params& params);
  predictor_index(predictor_index&&) noexcept;
  predictor_index& operator=(predictor_index&&) noexcept;
  ~predictor_index();

  // Learned sign-bit projections, f32 [n_head_kv, pred_bits, head_dim] row-major, in place of
  // the random ones (drawn from cfg.seed). Clears every slot (their signatures are stale).
  void set_projections(const float* w, size_t count);
  // The same from a safetensors file holding "sign_projections" (f32, f16 or bf16).
  void load_projections(const std::string& path);

  // Brings each slot s < kv.n_seq up to kv.seq_len[s] tokens by appending the new ones; a slot
  // that holds more tokens than seq_len (a new sequence took it) is rebuilt from token 0.
  // Throws vattn::error on a cache that disagrees with the params or on non-finite keys.
  void update(const kv_cache& kv);
  void clear();  // every slot back to 0 tokens

  int64_t tokens(int32_t slot) const;
  size_t memory_bytes() const;
  const config& cfg() const;
  const plan_params& params() const;

  struct impl;
  const impl& data() const { return *impl_; }  // for the kernels

 private:
  impl* impl_ = nullptr;
};

// Statistics of one (sequence, query head); SPEC section 5.
struct head_stats {
  int64_t n = 0;    // tokens in the cache
  int64_t n_f = 0;  // |F|, the deterministic set
  int64_t n_s = 0;  // |R|, the residual (hub mode: the sampling window)
  int64_t m = 0;    // base sample size
  int64_t b = 0;    // final sample size (tokens of R read); b = n_s means R was exact
  // distinct sampled tokens written to run_args::indices after F (= b, except in hub mode where
  // duplicate draws collapse)
  int64_t n_sampled = 0;
  double density = 0;  // tokens whose K/V rows were read for the output / n
  // CLT half-width at the chosen b over the estimate, for the mode's target (fixed-rate
  // sampling: the denominator). 0 when exact (dense, or b = n_s); -1 when nothing was sampled
  // (top-k, top-p, sink+local have no estimate) or a fixed-rate sample of one token. Hub mode
  // reports its own with-replacement half-width.
  double est_rel_error = 0;
  // Bytes of K and V rows read, predictor index reads included (oracle stages read every K row;
  // a predictor's index is counted over all n tokens, once per kv group that scores together;
  // a dense fallback counts its rows only).
  // With gqa_shared a group's rows count once, split evenly over its heads.
  int64_t bytes_kv = 0;
  int32_t dense_fallback = 0;  // 1 when n was too short for sparsity and attention ran dense
};

// Where run's time went, in thread-seconds summed over threads (for benchmarks; measuring costs a
// clock read per phase and unit).
struct run_profile {
  double select_s = 0;  // predictor or oracle scoring, selection, budget and sampling
  double attend_s = 0;  // reading the chosen K/V rows and forming the output
};

struct run_args {
  int32_t n_head_q = 0;      // query heads per sequence, a multiple of kv.n_head_kv
  const float* q = nullptr;  // [n_seq, n_head_q, head_dim], packed
  kv_cache kv;
  float* out = nullptr;         // [n_seq, n_head_q, head_dim], packed; written in full on
                                // success (unspecified after an error)
  head_stats* stats = nullptr;  // optional [n_seq, n_head_q]
  // optional [n_seq, n_head_q, n_tokens_max] (the plan's n_tokens_max; for attention(), the
  // longest seq_len): the tokens read for each head, F in ascending order and then the sample
  // in draw order (stats.n_f + stats.n_sampled entries; the rest is left untouched)
  int32_t* indices = nullptr;
  uint64_t step = 0;                // decode step, part of the sampling key
  const int64_t* seq_id = nullptr;  // optional [n_seq] sampling-key ids (default: batch index)
  // Required when the config's predictor is not oracle: an index built with the same config
  // and head shapes whose slot s holds exactly kv.seq_len[s] tokens (call update first).
  const predictor_index* index = nullptr;
  run_profile* profile = nullptr;  // optional: added to (not reset) by run
};

// ---------------------------------------------------------------------------------------------
// Plan once, run many: a plan validates the configuration and the problem size and reports the
// workspace that run needs; run never allocates.
struct plan_params {
  int32_t n_seq_max = 1;
  int32_t n_head_q = 0;
  int32_t n_head_kv = 0;
  int32_t head_dim = 0;
  int64_t n_tokens_max = 0;  // longest sequence any run will see
  dtype kv_type = dtype::f32;
  int32_t n_threads = 0;  // 0: the hardware's thread count
};

class plan {
 public:
  plan(const config& cfg, const plan_params& params);  // throws vattn::error
  size_t workspace_bytes() const { return ws_bytes_; }
  const config& cfg() const { return cfg_; }
  const plan_params& params() const { return params_; }
  // workspace: at least workspace_bytes() bytes, 64-byte aligned. Throws vattn::error on
  // arguments that disagree with the plan or on non-finite inputs met.
  void run(const run_args& args, void* workspace, size_t workspace_size) const;

 private:
  config cfg_;
  plan_params params_;
  size_t ws_per_thread_ = 0;
  size_t ws_shared_ = 0;  // sequence offsets and dense split-KV states, before the threads'
  size_t ws_bytes_ = 0;
};

// An owning, 64-byte-aligned byte buffer (for a plan's workspace). Move-only.
class aligned_buffer {
 public:
  explicit aligned_buffer(size_t bytes = 0) { reserve(bytes); }
  aligned_buffer(aligned_buffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  aligned_buffer& operator=(aligned_buffer&& o) noexcept;
  aligned_buffer(const aligned_buffer&) = delete;
  aligned_buffer& operator=(const aligned_buffer&) = delete;
  ~aligned_buffer();
  void reserve(size_t bytes);  // grows (contents are not kept), never shrinks
  void* data() const { return p_; }
  size_t size() const { return n_; }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

// One-shot convenience: plans for exactly these arguments, allocates the workspace, runs.
void attention(const config& cfg, const run_args& args, int32_t n_threads = 0);

// ---------------------------------------------------------------------------------------------
// Build information.
const char* version();
const char* simd_level_name();  // the instruction set the CPU kernels use on this machine
int32_t hardware_threads();

}  // namespace vattn
