// predictors.hpp: the data of a predictor_index and the scoring kernels the CPU path calls.
// Approximate predictors rank tokens for top-k from a small index instead of every key:
// - page_bounds (Quest): per page of P tokens and kv head, the elementwise min and max of K,
//   stored in the cache's dtype (a min or max of stored values is a stored value, so the bounds
//   are exact); a page's score is sum_j max(q_j lo_j, q_j hi_j) >= q.k for every key of the page;
// - sign_bits (SimHash): bit r of a token's signature is [w_r . k >= 0] for the kv head's
//   projection rows w_r (Gaussian, drawn from the config's seed, or learned); a token's score is
//   the number of bits its signature shares with the query's. Keys are centred first: once a
//   slot holds k_center_tokens keys, bit r is [w_r . (k - mu) >= 0] with mu the mean of the
//   slot's first k_center_tokens keys (per kv head). Keys share large constant components
//   (outlier channels) that would otherwise fix most bits; q . mu is the same for every token,
//   so centring leaves the ranking target q . k unchanged. A slot that reaches k_center_tokens
//   is rebuilt once, so appending and rebuilding still agree.
#pragma once

#include <cstdint>
#include <vector>

#include "vattn/vattn.hpp"

namespace vattn {

constexpr int64_t k_center_tokens = 256;

struct predictor_index::impl {
  config cfg;
  plan_params p;
  int64_t pages_max = 0;        // ceil(n_tokens_max / pred_page)
  int32_t words = 0;            // pred_bits / 32
  std::vector<float> proj;      // sign_bits: [n_head_kv, pred_bits, head_dim]
  std::vector<int64_t> count;   // [n_seq_max] tokens each slot holds
  std::vector<uint8_t> lo, hi;  // page_bounds: [slot, kv head, page, head_dim] in kv dtype
  std::vector<uint32_t> sig;    // sign_bits: [slot, kv head, token, words]
  std::vector<float> bias;      // sign_bits: [slot, kv head, bit] w_r . mu (0 before centring)

  const uint8_t* lo_row(int32_t slot, int32_t kvh, int64_t page) const;
  const uint8_t* hi_row(int32_t slot, int32_t kvh, int64_t page) const;
  const uint32_t* sig_row(int32_t slot, int32_t kvh, int64_t t) const;
};

namespace detail {

using pred_impl = predictor_index::impl;

// Counts of sign scores (0 to 256) in four interleaved copies: neighbouring tokens mostly share a
// score, and adds to one counter would wait on each other.
struct score_counts {
  int64_t part[4][257] = {};
  void add(const uint16_t* sc, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
      ++part[0][sc[i]], ++part[1][sc[i + 1]], ++part[2][sc[i + 2]], ++part[3][sc[i + 3]];
    for (; i < n; ++i) ++part[0][sc[i]];
  }
  int64_t at(int32_t v) const { return part[0][v] + part[1][v] + part[2][v] + part[3][v]; }
};

// Upper bounds of <q, k> (unscaled) over pages [p0, p1) of (slot, kv head): out[p - p0].
void page_upper_bounds(const pred_impl& ix, int32_t slot, int32_t kvh, const float* q, int64_t p0,
                       int64_t p1, float* out);

// The signature of q under kv head kvh's projections: words uint32 values.
void query_signature(const pred_impl& ix, int32_t kvh, const float* q, uint32_t* sig);

// Bits shared by qsig and the signatures of tokens [t0, t1): out[t - t0] in [0, pred_bits].
void sign_matches(const pred_impl& ix, int32_t slot, int32_t kvh, const uint32_t* qsig, int64_t t0,
                  int64_t t1, uint16_t* out);

// The same for G query heads of kv head kvh at once (q [G, head_dim], qsig [G, words]; out row
// x at out + x * ld): values equal the single-head calls, the index is read once.
void page_upper_bounds_heads(const pred_impl& ix, int32_t slot, int32_t kvh, const float* q,
                             int32_t G, int64_t p0, int64_t p1, float* out, int64_t ld);
void sign_matches_heads(const pred_impl& ix, int32_t slot, int32_t kvh, const uint32_t* qsig,
                        int32_t G, int64_t t0, int64_t t1, uint16_t* out, int64_t ld);

// The unit score of tokens [t0, t1) of kv head kvh: per token the maximum over G query heads
// (qsig [G, words]) of the bits shared, into out[t - t0] (equal to the per-head calls and a
// maximum); counts[s] (pred_bits + 1 entries) gains the tokens scoring s, added atomically so
// concurrent calls over disjoint ranges may share it. Each block is scored, maximised and counted
// while it is in L1.
void sign_max_matches_heads(const pred_impl& ix, int32_t slot, int32_t kvh, const uint32_t* qsig,
                            int32_t G, int64_t t0, int64_t t1, uint16_t* out, int64_t* counts);

// Bytes of the index read to score n tokens (once per kv group when heads score together).
int64_t predictor_read_bytes(const pred_impl& ix, int64_t n);

}  // namespace detail
}  // namespace vattn
