// normal.cpp: the inverse standard normal CDF used to turn delta into a z quantile.
#include <cmath>
#include <string>

#include "core/budget.hpp"

namespace vattn::detail {

double normal_quantile(double p) {
  if (!(p > 0 && p < 1))
    throw error("normal_quantile: p must lie in (0, 1), got " + std::to_string(p));
  // Acklam's rational approximations: central region and two tails (relative error 1.15e-9).
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02,  -2.759285104469687e+02,
                             1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                             6.680131188771972e+01, -1.328068155288572e+01};
  static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758276161862e+00,
                             -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                             3.754408661907416e+00};
  const double p_low = 0.02425;
  double x;
  if (p < p_low) {
    double q = std::sqrt(-2 * std::log(p));
    x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  } else if (p <= 1 - p_low) {
    double q = p - 0.5, r = q * q;
    x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
  } else {
    double q = std::sqrt(-2 * std::log1p(-p));
    x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  // One Halley step on Phi(x) - p brings the error to double precision. In the upper tail the
  // residual Phi(x) - p is written as (1 - p) - Q(x) so it does not cancel.
  const double sqrt2 = 1.4142135623730951, sqrt2pi = 2.5066282746310002;
  double e = (p < 0.5) ? 0.5 * std::erfc(-x / sqrt2) - p : (1 - p) - 0.5 * std::erfc(x / sqrt2);
  double u = e * sqrt2pi * std::exp(0.5 * x * x);
  return x - u / (1 + 0.5 * x * u);
}

}  // namespace vattn::detail
