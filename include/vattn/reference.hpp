// reference.hpp: the double-precision reference of vattn: dense attention, every selection stage,
// the sampler and the estimators, written for clarity. Every fast path is checked against it on
// the same inputs and the same sampled indices; tools use it to measure errors.
#pragma once

#include <cstdint>
#include <vector>

#include "vattn/vattn.hpp"

namespace vattn::reference {

// Everything the reference knows about one (sequence, query head). Quantities D, N are in one
// stabilised scale: exp(s_i - c) with c the maximum logit over all n tokens.
struct head_result {
  std::vector<double> out;             // [head_dim] the method's output O^
  std::vector<double> out_dense;       // [head_dim] exact attention O
  std::vector<int32_t> f;              // deterministic set F, ascending
  std::vector<int32_t> sample;         // sampled tokens not in F, distinct, in draw order
  double d_est = 0, d_dense = 0;       // D^ and D
  std::vector<double> n_est, n_dense;  // N^ and N, [head_dim]
  double c = 0;                        // the stabiliser
  std::vector<double> logits;          // [n] scale <q, k_i>
  head_stats stats;
};

// Runs the configuration over a batch (validated like plan::run; out, stats and indices are
// not written). Result index is seq * n_head_q + head.
std::vector<head_result> run(const config& cfg, const run_args& args);

// Relative errors of the mode targets: |D^-D|/D, ||N^-N||/||N||, ||O^-O||/||O||.
struct rel_errors {
  double d = 0, n = 0, o = 0;
};
rel_errors errors(const head_result& r);

}  // namespace vattn::reference
