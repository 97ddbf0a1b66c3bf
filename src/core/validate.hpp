// validate.hpp: argument checks shared by plan, run, the reference and the C API. Each failure
// throws vattn::error naming the argument and what was expected.
#pragma once

#include <cstdint>
#include <vector>

#include "vattn/vattn.hpp"

namespace vattn::detail {

void validate_plan_params(const plan_params& p);
// Checks args against the plan; fills `row0` (size n_seq) with each sequence's first row in the
// contiguous layout when it is non-null. Scans q for NaN/Inf. `needs_out` is false for callers
// that return results another way (the reference).
void validate_run_args(const plan_params& p, const run_args& a, int64_t* row0,
                       bool needs_out = true);

}  // namespace vattn::detail
