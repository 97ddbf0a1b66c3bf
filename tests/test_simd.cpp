// test_simd.cpp: every SIMD level's row kernels against the scalar ones on awkward sizes, and the
// level selection (detection, VATTN_SIMD parsing).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/dtype.hpp"
#include "cpu/simd.hpp"
#include "vattn/vattn.hpp"

using namespace vattn::detail;

TEST(Simd, LevelSelection) {
  simd_level l = simd_level::avx2;
  EXPECT_TRUE(parse_simd_level("scalar", &l));
  EXPECT_EQ(l, simd_level::scalar);
  EXPECT_TRUE(parse_simd_level("avx2", &l));
  EXPECT_EQ(l, simd_level::avx2);
  EXPECT_FALSE(parse_simd_level("avx9000", &l));
  EXPECT_FALSE(parse_simd_level(nullptr, &l));
  EXPECT_LE(int(active_simd_level()), int(detected_simd_level()));
  const char* env = std::getenv("VATTN_SIMD");
  if (env && std::strcmp(env, "scalar") == 0) {
    EXPECT_EQ(active_simd_level(), simd_level::scalar);
  }
  EXPECT_STREQ(vattn::simd_level_name(), simd_level_str(active_simd_level()));
}

TEST(Simd, DotMatchesScalarOnAwkwardSizes) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  const row_ops& ref = row_ops_for(simd_level::scalar);
  for (simd_level lvl : {simd_level::scalar, simd_level::avx2}) {
    if (int(lvl) > int(detected_simd_level())) {
      std::printf("level %s not supported here: skipped\n", simd_level_str(lvl));
      continue;
    }
    const row_ops& ops = row_ops_for(lvl);
    for (int32_t d : {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 80, 96, 127, 128, 129, 256, 257}) {
      // unaligned starts: offset 1 element into the buffers
      std::vector<float> q(d + 1), kf(d + 1);
      std::vector<uint16_t> kh(d + 1), kb(d + 1);
      for (int32_t j = 0; j <= d; ++j) {
        q[j] = nd(rng);
        kf[j] = nd(rng) * 3.0f;
        kh[j] = f32_to_f16(kf[j]);
        kb[j] = f32_to_bf16(kf[j]);
      }
      double mag = 0;
      for (int32_t j = 1; j <= d; ++j) mag += std::abs(double(q[j]) * kf[j]);
      const double tol = 1e-5 * (mag + 1e-30);
      EXPECT_NEAR(ops.dot_f32(q.data() + 1, kf.data() + 1, d),
                  ref.dot_f32(q.data() + 1, kf.data() + 1, d), tol)
          << simd_level_str(lvl) << " f32 d=" << d;
      EXPECT_NEAR(ops.dot_f16(q.data() + 1, kh.data() + 1, d),
                  ref.dot_f16(q.data() + 1, kh.data() + 1, d), tol)
          << simd_level_str(lvl) << " f16 d=" << d;
      EXPECT_NEAR(ops.dot_bf16(q.data() + 1, kb.data() + 1, d),
                  ref.dot_bf16(q.data() + 1, kb.data() + 1, d), tol)
          << simd_level_str(lvl) << " bf16 d=" << d;
      // and against a double-precision dot of the same stored values
      double exact = 0;
      for (int32_t j = 1; j <= d; ++j) exact += double(q[j]) * bf16_to_f32(kb[j]);
      EXPECT_NEAR(ops.dot_bf16(q.data() + 1, kb.data() + 1, d), exact, tol);
    }
  }
}

// Non-finite inputs propagate (the run reports them): no kernel may hide a NaN.
TEST(Simd, NanPropagates) {
  for (simd_level lvl : {simd_level::scalar, simd_level::avx2}) {
    if (int(lvl) > int(detected_simd_level())) continue;
    std::vector<float> q(40, 1.0f), k(40, 1.0f);
    k[37] = std::nanf("");
    EXPECT_TRUE(std::isnan(row_ops_for(lvl).dot_f32(q.data(), k.data(), 40)));
    k[37] = 1.0f;
    k[5] = INFINITY;
    EXPECT_FALSE(std::isfinite(row_ops_for(lvl).dot_f32(q.data(), k.data(), 40)));
  }
}
