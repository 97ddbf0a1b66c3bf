// gqa_kernels_avx512.hpp: the AVX-512 row-list kernels (gqa_kernels_avx512.cpp), for the
// level dispatch in gqa_kernels.cpp. Use them only where detected_simd_level() is avx512.
#pragma once

#include <cstdint>

#include "cpu/gqa_kernels.hpp"

#if defined(__x86_64__) || defined(__i386__)
namespace vattn::detail::avx512 {

template <dtype T>
const gqa_ops<T>& gqa_ops_table();

void exp_inplace(float* x, int64_t n);

}  // namespace vattn::detail::avx512
#endif
