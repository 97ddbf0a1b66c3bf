// eval.cpp: error, coverage and summary helpers (see vattn/eval.hpp).
#include "vattn/eval.hpp"

#include <algorithm>
#include <cmath>

#include "core/budget.hpp"

namespace vattn::eval {

interval wilson(int64_t k, int64_t n, double conf) {
  if (n <= 0) return {0, 1};
  const double z = detail::normal_quantile(0.5 + conf / 2);
  const double p = double(k) / double(n), nn = double(n), z2 = z * z;
  const double centre = (p + z2 / (2 * nn)) / (1 + z2 / nn);
  const double half = z * std::sqrt(p * (1 - p) / nn + z2 / (4 * nn * nn)) / (1 + z2 / nn);
  return {std::max(0.0, centre - half), std::min(1.0, centre + half)};
}

double allowed_failures(double delta, int64_t n, double conf) {
  const double z = detail::normal_quantile(conf), nd = double(n) * delta;
  return nd + z * std::sqrt(nd * (1 - delta));
}

target guarantee_target(const config& cfg) {
  if (cfg.sample != sampling::adaptive) return target::output;
  switch (cfg.mode) {
    case budget_mode::denominator:
      return target::denominator;
    case budget_mode::numerator:
      return target::numerator;
    default:
      return target::output;
  }
}

const char* target_name(target t) {
  switch (t) {
    case target::denominator:
      return "D";
    case target::numerator:
      return "N";
    case target::output:
      return "O";
  }
  return "?";
}

double target_error(const reference::rel_errors& e, target t) {
  switch (t) {
    case target::denominator:
      return e.d;
    case target::numerator:
      return e.n;
    case target::output:
      return e.o;
  }
  return e.o;
}

summary summarize(std::vector<double> v) {
  summary s;
  s.count = int64_t(v.size());
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / double(v.size());
  // nearest-rank percentile
  const size_t i95 = size_t(std::ceil(0.95 * double(v.size()))) - 1;
  s.p95 = v[std::min(i95, v.size() - 1)];
  s.max = v.back();
  return s;
}

void tally::add(const reference::head_result& r, target t, double eps) {
  const reference::rel_errors e = reference::errors(r);
  const double et = target_error(e, t);
  ++cases;
  target_ok += et <= eps;
  output_ok += e.o <= eps;
  err_output.push_back(e.o);
  err_target.push_back(et);
  density.push_back(r.stats.density);
  budget.push_back(double(r.stats.b));
  bytes_kv += double(r.stats.bytes_kv);
}

void tally::merge(const tally& o) {
  cases += o.cases;
  target_ok += o.target_ok;
  output_ok += o.output_ok;
  err_output.insert(err_output.end(), o.err_output.begin(), o.err_output.end());
  err_target.insert(err_target.end(), o.err_target.begin(), o.err_target.end());
  density.insert(density.end(), o.density.begin(), o.density.end());
  budget.insert(budget.end(), o.budget.begin(), o.budget.end());
  bytes_kv += o.bytes_kv;
}

}  // namespace vattn::eval
