// simd.hpp: the CPU instruction-set levels the row kernels are built for, the level in use
// (detected once, overridable with VATTN_SIMD=scalar|avx2|avx512 for tests and bug reports), and
// the table of row kernels for that level.
#pragma once

#include <cstdint>

namespace vattn::detail {

// avx2: AVX2 with FMA and F16C; avx512: AVX-512 F, BW, VL and DQ on top of that, with the ZMM
// state enabled by the OS. Each level includes the ones below it.
enum class simd_level : int32_t { scalar = 0, avx2 = 1, avx512 = 2 };

// The level's name; avx512 reads "avx512+bf16" on CPUs with AVX512_BF16 (reported, not used).
const char* simd_level_str(simd_level l);
simd_level detected_simd_level();
bool cpu_has_f16c();             // what this CPU supports (AVX2 needs FMA and F16C too)
bool cpu_has_avx512();           // F, BW, VL, DQ and the OS saves the ZMM and mask registers
bool cpu_has_avx512bf16();       // cpu_has_avx512() and AVX512_BF16
bool cpu_has_avx512vpopcntdq();  // cpu_has_avx512() and AVX512_VPOPCNTDQ (vector popcounts)
// The level in use: VATTN_SIMD if set (capped at what the CPU supports), else the detected one.
// Read once per process.
simd_level active_simd_level();
// Parses a VATTN_SIMD value; returns false for an unknown name.
bool parse_simd_level(const char* s, simd_level* out);

// Dot products of an f32 query with a K row stored as f32, f16 or bf16.
struct row_ops {
  float (*dot_f32)(const float* q, const float* row, int32_t d);
  float (*dot_f16)(const float* q, const uint16_t* row, int32_t d);
  float (*dot_bf16)(const float* q, const uint16_t* row, int32_t d);
};
const row_ops& row_ops_for(simd_level l);
inline const row_ops& active_row_ops() {
  return row_ops_for(active_simd_level());
}

}  // namespace vattn::detail
