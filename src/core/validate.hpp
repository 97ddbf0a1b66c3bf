// validate.hpp: argument checks shared by plan, run, the reference and the C API. Each failure
// throws vattn::error naming the argument and what was expected.
#pragma once

#include <cstdint>
#include <vector>

#include "vattn/vattn.hpp"

namespace vattn::detail {

void validate_plan_params(const plan_params& p);
// Checks a KV cache against the plan's head shapes and limits (the kv part of validate_run_args);
// fills `row0` (size n_seq) like it when non-null. `needs_v` is false for users of K alone.
void validate_kv_cache(const plan_params& p, const kv_cache& kv, int64_t* row0,
                       bool needs_v = true);
// Checks args against the plan; fills `row0` (size n_seq) with each sequence's first row in the
// contiguous layout when it is non-null. Scans q for NaN/Inf. `needs_out` is false for callers
// that return results another way (the reference).
void validate_run_args(const plan_params& p, const run_args& a, int64_t* row0,
                       bool needs_out = true);
// With an approximate predictor: a.index must be set, built for the same predictor and head
// shapes, and hold exactly kv.seq_len[s] tokens in slot s.
void validate_index(const config& cfg, const plan_params& p, const run_args& a);

}  // namespace vattn::detail
