// eval.hpp: measuring a method against exact attention: relative errors of the guarantee's
// targets, coverage with binomial confidence intervals, density summaries. Used by the command
// line, the statistical tests and the Python front.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "vattn/reference.hpp"
#include "vattn/vattn.hpp"

namespace vattn::eval {

struct interval {
  double lo = 0, hi = 0;
};
// Wilson score interval for k successes in n trials at the two-sided confidence `conf`.
interval wilson(int64_t k, int64_t n, double conf = 0.95);
// The largest failure count a guarantee "P(fail) <= delta" allows in n trials at one-sided
// confidence `conf` (normal approximation: n delta + z sqrt(n delta (1 - delta))).
double allowed_failures(double delta, int64_t n, double conf = 0.99);

// Which quantity a configuration's guarantee bounds: D for denominator mode, N for numerator,
// O for combined and output; O for methods without a guarantee.
enum class target : int32_t { denominator = 0, numerator = 1, output = 2 };
target guarantee_target(const config& cfg);
const char* target_name(target t);
double target_error(const reference::rel_errors& e, target t);

struct summary {
  int64_t count = 0;
  double mean = 0, p95 = 0, max = 0;
};
summary summarize(std::vector<double> values);

// Accumulates (sequence, head) cases of one method.
struct tally {
  int64_t cases = 0;
  int64_t target_ok = 0;  // cases with the guarantee's target within eps
  int64_t output_ok = 0;  // cases with ||O^ - O|| <= eps ||O||
  std::vector<double> err_output, err_target, density, budget;
  double bytes_kv = 0;
  void add(const reference::head_result& r, target t, double eps);
  void merge(const tally& o);
};

}  // namespace vattn::eval
