// synth.hpp: synthetic decode-attention problems (one query row per head over a KV cache) in
// families with known attention regimes, for the statistical tests and the `vattn demo` table.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace vattn::synth {

// Every family builds its logits s_i = scale * <q_h, k_i> (scale = 1/sqrt(head_dim)) from a target
// per token and kv head, t_i (the "bulk", multiplied by a per-query-head temperature tau_h) plus
// p_i (a "spike" shared by the heads of a kv group, gain 0.95-1.05), so heads of one group differ
// but agree on their outstanding tokens. Common to all families (docs/generators.md):
// - each query head adds a constant shift in [-2, 2] through a few K outlier channels with large
//   constant offsets (|offset| 8-15), and logit noise of sd ~0.2 (query noise against key noise),
//   independent between heads;
// - key noise norms vary per token (factor 0.7-1.3), as in real caches;
// - values are v_i = mu + noise (+ a family term), with a per-kv-head mean mu whose norm is
//   0.6-1.4 times the noise norm: real values share a strong mean direction (SPEC section 8).
enum class family : int32_t {
  // Peaked attention where top-k wins. t_i ~ N(0, 1); about 1% of positions (random) plus
  // position 0 (an attention sink, p_0 = 8) get p_i ~ U[5, 8]. Values independent of scores.
  // After a small top-k the residual still holds rare large weights (skewed for the CLT bound).
  heavy_hitters = 0,
  // Flat attention where sampling wins and top-k loses: t_i ~ N(0, 0.3^2), no spikes.
  uniform = 1,
  // Skewed, long-tailed attention: token of rank r (a random permutation of positions) has
  // t_i = 4 - log(r), and tau_h = alpha_h ~ U[0.6, 1.2], so weights follow r^-alpha_h. The
  // residual after top-k stays heavily skewed: the regime where the plug-in CLT may under-cover.
  power_law = 2,
  // Retrieval: one random position (not 0) gets p_i = log(n) + 2.5 clamped to [8, 13] (10.8 at
  // n = 4K, 12.2 at 16K, 13 from 30K on) over a N(0, 1) bulk, so it holds most of the mass at
  // any length: the best case for top-k (and for sink + local, the worst).
  needle = 3,
  // Mass spread over a whole group of tokens: keys scatter around 8 cluster centres, each token
  // in a random cluster; the query aligns with one ("hot") cluster, t_i = 4 + N(0, 0.5^2) there
  // and L_c + N(0, 0.5^2) with L_c ~ U[-2, 1] elsewhere. The hot cluster (~n/8 tokens) holds most
  // mass: small top-k misses much of it, clustering-based retrieval should find it.
  clustered = 4,
  // Values correlated with scores, as in real caches: the same q and K as heavy_hitters for the
  // same seed and shape, and values v_i = mu + noise + 1.0 * z_i * w, with z_i the standardised
  // target logit (t_i + p_i) and w a fixed unit direction per kv head. The high-score tokens'
  // mean value differs from the tail's, so top-k alone is biased and sampling the tail fixes it.
  correlated_values = 5,
};

const char* family_name(family f);  // "heavy_hitters", "uniform", ...; "unknown" if out of range
family family_from_string(std::string_view s);  // throws vattn::error listing the valid names
const std::vector<family>& all_families();      // in enum order

struct shape {
  int64_t n_tokens = 0;
  int32_t n_head_q = 1, n_head_kv = 1, head_dim = 64;
};

// One decode step: query head h reads kv head h / (n_head_q / n_head_kv).
struct problem {
  shape shp;
  std::vector<float> q;  // [n_head_q, head_dim]
  std::vector<float> k;  // [n_tokens, n_head_kv, head_dim]
  std::vector<float> v;  // [n_tokens, n_head_kv, head_dim]
};

// Deterministic for (f, s, seed): bit-identical across compilers and platforms (own RNG, no libm
// transcendental calls, no std distributions). Throws vattn::error on a bad shape (n_tokens < 1,
// a head count < 1, n_head_q not a multiple of n_head_kv, head_dim < 1, or too large to allocate).
problem generate(family f, const shape& s, uint64_t seed);

}  // namespace vattn::synth
