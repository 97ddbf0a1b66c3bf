// gqa_kernels.hpp: the gather kernels of the CPU path. Each reads a list of K or V rows (element
// offsets from one base pointer, so contiguous chunks, pages and sparse index lists all take
// the same path) once and serves every query head of a kv group with it: one row load feeds G
// dot products or G accumulators. Rows are prefetched a few ahead for gathers.
#pragma once

#include <cstdint>

#include "core/dtype.hpp"
#include "cpu/simd.hpp"

namespace vattn::detail {

template <dtype T>
struct gqa_ops {
  using elem = typename storage<T>::type;
  // out[g * ld + i] = <q_g, row_i> for i < cnt, g < G; q is [G, d] (scale folded in).
  void (*logits)(const float* q, int32_t G, int32_t d, const elem* base, const int64_t* off,
                 int64_t cnt, float* out, int64_t ld);
  // acc[g * d + j] += sum_i w[g * ldw + i] * row_i[j], in f32.
  void (*wsum)(const float* w, int64_t ldw, int32_t G, int32_t d, const elem* base,
               const int64_t* off, int64_t cnt, float* acc);
  // Base-sample moments in double, x = e v with e = w[g * ldw + i]: s1 += x, s2 += x^2,
  // s3 += e x (each [G, d]).
  void (*moments)(const float* w, int64_t ldw, int32_t G, int32_t d, const elem* base,
                  const int64_t* off, int64_t cnt, double* s1, double* s2, double* s3);
};

template <dtype T>
const gqa_ops<T>& gqa_ops_for(simd_level l);

// Dense attention reads K and V token by token across all kv heads, so memory is walked
// forward (a head-by-head walk strides by a whole token and reads ~3x slower). The row of kv
// head h of listed token i is at base + off[i] + h * hs; q and the outputs are per query head
// (kv head h owns query heads [h G, h G + G)).
template <dtype T>
struct dense_ops {
  using elem = typename storage<T>::type;
  // out[(h G + x) * ld + i] = <q_{h G + x}, row(i, h)>
  void (*logits)(const float* q, int32_t H, int32_t G, int32_t d, const elem* base,
                 const int64_t* off, int64_t hs, int64_t cnt, float* out, int64_t ld);
  // acc[(h G + x) * d + j] += sum_i w[(h G + x) * ldw + i] * row(i, h)[j]
  void (*wsum)(const float* w, int64_t ldw, int32_t H, int32_t G, int32_t d, const elem* base,
               const int64_t* off, int64_t hs, int64_t cnt, float* acc);
};

template <dtype T>
const dense_ops<T>& dense_ops_for(simd_level l);

// x[i] = exp(x[i]) in f32 (relative error below 2e-7; arguments below -87 give 0).
void exp_inplace(simd_level l, float* x, int64_t n);

// One softmax row of a dense chunk (n >= 1): m = max_i x[i], x[i] = exp(x[i] - m) as
// exp_inplace, *sum = sum_i x[i] accumulated in double. Returns false, with x unchanged, when
// some x[i] is NaN or infinite.
bool shift_exp_sum(simd_level l, float* x, int64_t n, float* m, double* sum);

}  // namespace vattn::detail
