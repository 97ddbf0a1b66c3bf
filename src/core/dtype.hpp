// dtype.hpp: scalar conversions between f32 and the 16-bit KV types (IEEE half, bfloat16).
#pragma once

#include <cstdint>
#include <cstring>

#include "vattn/vattn.hpp"

namespace vattn::detail {

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bf16_to_f32(uint16_t h) {
  return bits_to_f32(uint32_t(h) << 16);
}

// Round to nearest even; NaN stays NaN (quiet bit forced so truncation cannot make it Inf).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13));  // Inf / NaN
  if (exp != 0) return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
  // subnormal or zero: man * 2^-24, exact in f32
  float mag = float(man) * 5.9604644775390625e-08f;
  return (sign ? -mag : mag);
}

// Round to nearest even, overflow to Inf, NaN preserved.
inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: Inf
  if (a < 0x38800000u) {                                  // below the smallest normal half
    // value * 2^24 rounded to an integer: the subnormal mantissa
    float mag = bits_to_f32(a) * 16777216.0f;
    uint32_t m = uint32_t(mag);
    float frac = mag - float(m);
    if (frac > 0.5f || (frac == 0.5f && (m & 1u))) ++m;
    return uint16_t(sign | m);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round mantissa to 10 bits
  return uint16_t(sign | (((r >> 23) - 112u) << 10) | ((r >> 13) & 0x3ffu));
}

template <dtype T>
struct storage;
template <>
struct storage<dtype::f32> {
  using type = float;
  static float load(float x) { return x; }
};
template <>
struct storage<dtype::f16> {
  using type = uint16_t;
  static float load(uint16_t x) { return f16_to_f32(x); }
};
template <>
struct storage<dtype::bf16> {
  using type = uint16_t;
  static float load(uint16_t x) { return bf16_to_f32(x); }
};

// Load element i of a buffer of type t as f32 (slow path for references and tools).
inline float load_as_f32(const void* p, dtype t, int64_t i) {
  switch (t) {
    case dtype::f32:
      return static_cast<const float*>(p)[i];
    case dtype::f16:
      return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case dtype::bf16:
      return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
  return 0;
}

}  // namespace vattn::detail
