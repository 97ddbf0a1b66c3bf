// row_kernels.hpp: portable per-row kernels: the scalar dot product with a K row and the
// double-precision weighted V accumulation of the hub compatibility mode.
#pragma once

#include <cstdint>

#include "core/dtype.hpp"

namespace vattn::detail {

// <q, row> in f32 with four partial sums (independent chains vectorise and pipeline).
template <dtype T>
inline float row_dot(const float* q, const typename storage<T>::type* row, int32_t d) {
  float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int32_t j = 0;
  for (; j + 4 <= d; j += 4) {
    a0 += q[j] * storage<T>::load(row[j]);
    a1 += q[j + 1] * storage<T>::load(row[j + 1]);
    a2 += q[j + 2] * storage<T>::load(row[j + 2]);
    a3 += q[j + 3] * storage<T>::load(row[j + 3]);
  }
  for (; j < d; ++j) a0 += q[j] * storage<T>::load(row[j]);
  return (a0 + a1) + (a2 + a3);
}

// acc += w * row, accumulated in double so long sums keep the reference's precision.
template <dtype T>
inline void row_axpy(double w, const typename storage<T>::type* row, int32_t d, double* acc) {
  for (int32_t j = 0; j < d; ++j) acc[j] += w * double(storage<T>::load(row[j]));
}

}  // namespace vattn::detail
