// select_kernels.hpp: the compactions of token selection, positions from per-token flags or
// scores, scalar and AVX-512. Every level writes the same ascending positions; the AVX-512 ones
// test 64 flags or 32 scores at once and compress the chosen positions into the output, so a
// pass over a 128K-token cache costs a few thousand vector steps instead of one branchless store
// per token. Inputs are read only below n (masked loads); out must hold n entries, of which those
// past the returned count are unspecified.
#pragma once

#include <cstdint>

#include "cpu/simd.hpp"

namespace vattn::detail {

struct select_ops {
  // Positions i in [0, n) with flags[i] != 0, ascending, into out; returns their count.
  int64_t (*nonzero_positions)(const uint8_t* flags, int64_t n, int32_t* out);
  // Positions base + i, i in [0, n), with sc[i] > thr, and the first `ties` (lowest i) with
  // sc[i] == thr, ascending, into out; returns their count.
  int64_t (*positions_above)(const uint16_t* sc, int64_t n, uint16_t thr, int64_t ties,
                             int32_t base, int32_t* out);
};

// The kernels of level l (avx2 uses the scalar ones; the caller checks the CPU supports l).
const select_ops& select_ops_for(simd_level l);
inline const select_ops& active_select_ops() {
  return select_ops_for(active_simd_level());
}

}  // namespace vattn::detail
