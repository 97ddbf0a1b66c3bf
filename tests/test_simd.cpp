// test_simd.cpp: every SIMD level's kernels (row dot products, the GQA row-list kernels, exp)
// against the scalar ones on awkward sizes, and the level selection (detection, VATTN_SIMD
// parsing). Each kernel test runs once per level; levels this CPU lacks are skipped by name.
// Inputs end where an inaccessible page begins (Linux), so reads or writes past them fault.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "core/dtype.hpp"
#include "cpu/gqa_kernels.hpp"
#include "cpu/select_kernels.hpp"
#include "cpu/simd.hpp"
#include "vattn/vattn.hpp"

using namespace vattn::detail;
using vattn::dtype;

namespace {

constexpr simd_level k_levels[] = {simd_level::scalar, simd_level::avx2, simd_level::avx512};

// The level as a test name ("avx512+bf16" is not a valid one).
const char* level_name(simd_level l) {
  switch (l) {
    case simd_level::scalar:
      return "scalar";
    case simd_level::avx2:
      return "avx2";
    case simd_level::avx512:
      return "avx512";
  }
  return "unknown";
}

// n elements that end where an inaccessible page begins (elsewhere than Linux: a plain buffer).
template <typename E>
class fenced {
 public:
  explicit fenced(size_t n) : n_(n) {
#if defined(__linux__)
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t bytes = n * sizeof(E);
    len_ = (bytes + page - 1) / page * page + page;
    void* p = mmap(nullptr, len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    map_ = static_cast<char*>(p);
    if (mprotect(map_ + len_ - page, page, PROT_NONE) != 0) std::abort();
    data_ = reinterpret_cast<E*>(map_ + len_ - page - bytes);
#else
    buf_.resize(n + 1);
    data_ = buf_.data();
#endif
  }
  ~fenced() {
#if defined(__linux__)
    munmap(map_, len_);
#endif
  }
  fenced(const fenced&) = delete;
  fenced& operator=(const fenced&) = delete;

  E* data() {
    return data_;
  }
  E& operator[](size_t i) {
    return data_[i];
  }
  size_t size() const {
    return n_;
  }
  void assign(const std::vector<E>& v) {
    std::copy(v.begin(), v.end(), data_);
  }
  std::vector<E> vec() const {
    return std::vector<E>(data_, data_ + n_);
  }

 private:
  size_t n_ = 0;
  E* data_ = nullptr;
#if defined(__linux__)
  char* map_ = nullptr;
  size_t len_ = 0;
#else
  std::vector<E> buf_;
#endif
};

template <dtype T>
typename storage<T>::type to_elem(float x) {
  if constexpr (T == dtype::f32) {
    return x;
  } else if constexpr (T == dtype::f16) {
    return f32_to_f16(x);
  } else {
    return f32_to_bf16(x);
  }
}

const char* type_name(dtype t) {
  return t == dtype::f32 ? "f32" : t == dtype::f16 ? "f16" : "bf16";
}

class SimdLevel : public ::testing::TestWithParam<simd_level> {
 protected:
  void SetUp() override {
    if (int(GetParam()) > int(detected_simd_level()))
      GTEST_SKIP() << "this CPU lacks the " << level_name(GetParam()) << " level";
  }
};

}  // namespace

INSTANTIATE_TEST_SUITE_P(Levels, SimdLevel, ::testing::ValuesIn(k_levels),
                         [](const ::testing::TestParamInfo<simd_level>& i) {
                           return std::string(level_name(i.param));
                         });

TEST(Simd, LevelSelection) {
  simd_level l = simd_level::avx2;
  EXPECT_TRUE(parse_simd_level("scalar", &l));
  EXPECT_EQ(l, simd_level::scalar);
  EXPECT_TRUE(parse_simd_level("avx2", &l));
  EXPECT_EQ(l, simd_level::avx2);
  EXPECT_TRUE(parse_simd_level("avx512", &l));
  EXPECT_EQ(l, simd_level::avx512);
  EXPECT_FALSE(parse_simd_level("avx9000", &l));
  EXPECT_FALSE(parse_simd_level(nullptr, &l));
  EXPECT_LE(int(active_simd_level()), int(detected_simd_level()));
  // VATTN_SIMD picks a level; one the CPU lacks falls back to the best it has.
  simd_level want = simd_level::scalar;
  if (parse_simd_level(std::getenv("VATTN_SIMD"), &want)) {
    EXPECT_EQ(int(active_simd_level()), std::min(int(want), int(detected_simd_level())));
  } else {
    EXPECT_EQ(active_simd_level(), detected_simd_level());
  }
  EXPECT_STREQ(vattn::simd_level_name(), simd_level_str(active_simd_level()));
  EXPECT_STREQ(simd_level_str(simd_level::scalar), "scalar");
  EXPECT_STREQ(simd_level_str(simd_level::avx2), "avx2");
  EXPECT_STREQ(simd_level_str(simd_level::avx512), cpu_has_avx512bf16() ? "avx512+bf16" : "avx512");
  if (detected_simd_level() == simd_level::avx512) {
    EXPECT_TRUE(cpu_has_avx512());
  }
  if (cpu_has_avx512bf16()) {
    EXPECT_TRUE(cpu_has_avx512());
  }
  std::printf("detected %s, active %s\n", simd_level_str(detected_simd_level()),
              simd_level_str(active_simd_level()));
}

TEST_P(SimdLevel, DotMatchesScalarOnAwkwardSizes) {
  const simd_level lvl = GetParam();
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  const row_ops& ref = row_ops_for(simd_level::scalar);
  const row_ops& ops = row_ops_for(lvl);
  for (int32_t d : {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 80, 96, 127, 128, 129, 256, 257}) {
    // unaligned starts: offset 1 element into the buffers, whose ends are fenced
    fenced<float> q(d + 1), kf(d + 1);
    fenced<uint16_t> kh(d + 1), kb(d + 1);
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
        << level_name(lvl) << " f32 d=" << d;
    EXPECT_NEAR(ops.dot_f16(q.data() + 1, kh.data() + 1, d),
                ref.dot_f16(q.data() + 1, kh.data() + 1, d), tol)
        << level_name(lvl) << " f16 d=" << d;
    EXPECT_NEAR(ops.dot_bf16(q.data() + 1, kb.data() + 1, d),
                ref.dot_bf16(q.data() + 1, kb.data() + 1, d), tol)
        << level_name(lvl) << " bf16 d=" << d;
    // and against a double-precision dot of the same stored values
    double exact = 0;
    for (int32_t j = 1; j <= d; ++j) exact += double(q[j]) * bf16_to_f32(kb[j]);
    EXPECT_NEAR(ops.dot_bf16(q.data() + 1, kb.data() + 1, d), exact, tol);
  }
}

// Non-finite inputs propagate (the run reports them): no kernel may hide a NaN.
TEST_P(SimdLevel, NanPropagates) {
  const simd_level lvl = GetParam();
  std::vector<float> q(40, 1.0f), k(40, 1.0f);
  k[37] = std::nanf("");
  EXPECT_TRUE(std::isnan(row_ops_for(lvl).dot_f32(q.data(), k.data(), 40)));
  k[37] = 1.0f;
  k[5] = INFINITY;
  EXPECT_FALSE(std::isfinite(row_ops_for(lvl).dot_f32(q.data(), k.data(), 40)));
  // the GQA kernels, NaN in the main part and in the tail of a row
  for (int32_t j : {5, 37}) {
    std::vector<float> kr(40, 1.0f), qg(3 * 40, 1.0f), out(3), w(3, 1.0f), acc(3 * 40, 0.0f);
    std::vector<double> s1(3 * 40), s2(3 * 40), s3(3 * 40);
    kr[j] = std::nanf("");
    const int64_t off = 0;
    const gqa_ops<dtype::f32>& ops = gqa_ops_for<dtype::f32>(lvl);
    ops.logits(qg.data(), 3, 40, kr.data(), &off, 1, out.data(), 1);
    ops.wsum(w.data(), 1, 3, 40, kr.data(), &off, 1, acc.data());
    ops.moments(w.data(), 1, 3, 40, kr.data(), &off, 1, s1.data(), s2.data(), s3.data());
    for (int32_t g = 0; g < 3; ++g) {
      EXPECT_TRUE(std::isnan(out[g])) << level_name(lvl) << " j=" << j << " g=" << g;
      EXPECT_TRUE(std::isnan(acc[g * 40 + j]));
      EXPECT_TRUE(std::isnan(s1[g * 40 + j]) && std::isnan(s2[g * 40 + j]) &&
                  std::isnan(s3[g * 40 + j]));
    }
  }
}

namespace {

// Row offsets of a layout: 0 contiguous from an unaligned start, 1 pages of 16 rows in shuffled
// slots with unaligned gaps, 2 scattered rows (repeats allowed, unsorted) at an odd stride.
// The row at the largest offset ends the pool (so it ends at the fence).
std::vector<int64_t> row_offsets(int layout, int64_t cnt, int32_t d, std::mt19937& rng,
                                 int64_t* pool) {
  std::vector<int64_t> off(static_cast<size_t>(cnt));
  if (layout == 0) {
    for (int64_t i = 0; i < cnt; ++i) off[i] = 1 + i * d;
  } else if (layout == 1) {
    constexpr int64_t P = 16;
    const int64_t pages = (cnt + P - 1) / P, slot_len = P * d + 3;
    std::vector<int64_t> slot(size_t(pages) + 2);
    for (size_t s = 0; s < slot.size(); ++s) slot[s] = int64_t(s);
    std::shuffle(slot.begin(), slot.end(), rng);
    for (int64_t i = 0; i < cnt; ++i) off[i] = 5 + slot[i / P] * slot_len + (i % P) * d;
  } else {
    std::uniform_int_distribution<int64_t> pick(0, 3 * cnt + 1);
    for (int64_t i = 0; i < cnt; ++i) off[i] = 3 + pick(rng) * (d + 1);
  }
  int64_t end = 0;
  for (int64_t o : off) end = std::max(end, o + d);
  *pool = end;
  return off;
}

std::string where(simd_level l, dtype t, int layout, int32_t d, int32_t G, int64_t cnt) {
  std::ostringstream s;
  s << level_name(l) << " " << type_name(t) << " layout=" << layout << " d=" << d << " G=" << G
    << " cnt=" << cnt;
  return s.str();
}

// One kernel output against the scalar one: |got - want| <= rel * mag + 1e-300 elementwise.
template <typename F>
bool close(const F* got, const std::vector<F>& want, const std::vector<double>& mag, double rel,
           const std::string& what) {
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::abs(double(got[i]) - double(want[i]));
    if (!(err <= rel * mag[i] + 1e-300)) {
      ADD_FAILURE() << what << ": element " << i << " is " << got[i] << ", scalar " << want[i]
                    << " (allowed " << rel * mag[i] << ")";
      return false;
    }
  }
  return true;
}

template <dtype T>
bool gqa_case(simd_level lvl, int layout, int32_t d, int32_t G, int64_t cnt, std::mt19937& rng) {
  using E = typename storage<T>::type;
  const std::string at = where(lvl, T, layout, d, G, cnt);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> uw(-1.f, 1.f);
  int64_t pool = 0;
  const std::vector<int64_t> off = row_offsets(layout, cnt, d, rng, &pool);
  fenced<E> base(static_cast<size_t>(pool));
  for (int64_t t = 0; t < pool; ++t)  // some f16 subnormals too
    base[t] = to_elem<T>(t % 11 == 4 ? nd(rng) * 1e-6f : nd(rng) * 3.0f);
  auto val = [&](int64_t i, int32_t j) { return double(storage<T>::load(base[off[i] + j])); };
  const gqa_ops<T>& ref = gqa_ops_for<T>(simd_level::scalar);
  const gqa_ops<T>& ops = gqa_ops_for<T>(lvl);
  const int64_t gd = int64_t(G) * d;
  const size_t ngd = size_t(gd);

  {  // logits into a strided output; entries past cnt stay untouched
    fenced<float> q(ngd);
    for (int64_t t = 0; t < gd; ++t) q[t] = nd(rng);
    const int64_t ld = cnt + 3;
    std::vector<float> want(size_t(G * ld), -7.0f);
    fenced<float> got(want.size());
    got.assign(want);
    ref.logits(q.data(), G, d, base.data(), off.data(), cnt, want.data(), ld);
    ops.logits(q.data(), G, d, base.data(), off.data(), cnt, got.data(), ld);
    std::vector<double> mag(want.size(), 0.0);
    for (int32_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < cnt; ++i)
        for (int32_t j = 0; j < d; ++j) mag[g * ld + i] += std::abs(q[g * d + j] * val(i, j));
    if (!close(got.data(), want, mag, 1e-5, at + " logits")) return false;
    // A list gives the bits of its rows one at a time (the one-row kernel's summation order,
    // which the CUDA backend reproduces), whichever path (rows in pairs, an odd last row) took it.
    std::vector<float> one(want.size(), -7.0f);
    for (int64_t i = 0; i < cnt; ++i)
      ops.logits(q.data(), G, d, base.data(), off.data() + i, 1, one.data() + i, ld);
    if (std::memcmp(one.data(), got.data(), one.size() * sizeof(float)) != 0) {
      ADD_FAILURE() << at << " logits: the list's bits differ from row-by-row calls";
      return false;
    }
  }

  const int64_t ldw = cnt + 5;
  std::vector<float> w(size_t(G * ldw));
  for (float& x : w) x = uw(rng);

  {  // wsum adds to what acc holds
    fenced<float> got(ngd);
    std::vector<float> want(ngd);
    for (float& x : want) x = nd(rng);
    got.assign(want);
    std::vector<double> mag(want.size());
    for (int64_t t = 0; t < gd; ++t) mag[t] = std::abs(want[t]);
    for (int32_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < cnt; ++i)
        for (int32_t j = 0; j < d; ++j) mag[g * d + j] += std::abs(w[g * ldw + i] * val(i, j));
    std::vector<float> one(got.data(), got.data() + ngd);
    ref.wsum(w.data(), ldw, G, d, base.data(), off.data(), cnt, want.data());
    ops.wsum(w.data(), ldw, G, d, base.data(), off.data(), cnt, got.data());
    if (!close(got.data(), want, mag, 1e-5, at + " wsum")) return false;
    // Each element sums its rows in list order: row-by-row calls give the same bits.
    for (int64_t i = 0; i < cnt; ++i)
      ops.wsum(w.data() + i, ldw, G, d, base.data(), off.data() + i, 1, one.data());
    if (std::memcmp(one.data(), got.data(), ngd * sizeof(float)) != 0) {
      ADD_FAILURE() << at << " wsum: the list's bits differ from row-by-row calls";
      return false;
    }
  }

  {  // moments in double add to s1, s2, s3
    fenced<double> g1(ngd), g2(ngd), g3(ngd);
    std::vector<double> w1(ngd), w2(ngd), w3(ngd);
    for (int64_t t = 0; t < gd; ++t) w1[t] = nd(rng), w2[t] = std::abs(nd(rng)), w3[t] = nd(rng);
    g1.assign(w1), g2.assign(w2), g3.assign(w3);
    std::vector<double> m1(ngd), m2(ngd), m3(ngd);
    for (int64_t t = 0; t < gd; ++t)
      m1[t] = std::abs(w1[t]), m2[t] = std::abs(w2[t]), m3[t] = std::abs(w3[t]);
    for (int32_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < cnt; ++i)
        for (int32_t j = 0; j < d; ++j) {
          const double e = w[g * ldw + i], x = std::abs(e * val(i, j));
          m1[g * d + j] += x;
          m2[g * d + j] += x * x;
          m3[g * d + j] += std::abs(e) * x;
        }
    std::vector<double> o1(g1.data(), g1.data() + ngd), o2(g2.data(), g2.data() + ngd),
        o3(g3.data(), g3.data() + ngd);
    ref.moments(w.data(), ldw, G, d, base.data(), off.data(), cnt, w1.data(), w2.data(), w3.data());
    ops.moments(w.data(), ldw, G, d, base.data(), off.data(), cnt, g1.data(), g2.data(), g3.data());
    for (int64_t i = 0; i < cnt; ++i)
      ops.moments(w.data() + i, ldw, G, d, base.data(), off.data() + i, 1, o1.data(), o2.data(),
                  o3.data());
    if (std::memcmp(o1.data(), g1.data(), ngd * 8) != 0 ||
        std::memcmp(o2.data(), g2.data(), ngd * 8) != 0 ||
        std::memcmp(o3.data(), g3.data(), ngd * 8) != 0) {
      ADD_FAILURE() << at << " moments: the list's bits differ from row-by-row calls";
      return false;
    }
    if (!close(g1.data(), w1, m1, 1e-12, at + " moments s1")) return false;
    if (!close(g2.data(), w2, m2, 1e-12, at + " moments s2")) return false;
    if (!close(g3.data(), w3, m3, 1e-12, at + " moments s3")) return false;
  }
  return true;
}

template <dtype T>
void gqa_all(simd_level lvl) {
  std::mt19937 rng(11);
  for (int32_t d : {1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 80, 96, 127, 128, 256})
    for (int32_t G : {1, 2, 3, 4, 5, 8})
      for (int64_t cnt : {0, 1, 7, 100})
        for (int layout = 0; layout < 3; ++layout)
          if (!gqa_case<T>(lvl, layout, d, G, cnt, rng)) return;  // first mismatch only
}

}  // namespace

TEST_P(SimdLevel, GqaKernelsMatchScalarF32) {
  gqa_all<dtype::f32>(GetParam());
}
TEST_P(SimdLevel, GqaKernelsMatchScalarF16) {
  gqa_all<dtype::f16>(GetParam());
}
TEST_P(SimdLevel, GqaKernelsMatchScalarBf16) {
  gqa_all<dtype::bf16>(GetParam());
}

// exp_inplace against exp in double over [-100, 88]: relative 2e-7, exactly 0 below -87.
// A NaN argument stays NaN at every level and in every lane position (main part and tail).
TEST_P(SimdLevel, ExpKeepsNaN) {
  const simd_level lvl = GetParam();
  for (int64_t n : {1, 7, 8, 9, 16, 17, 33}) {
    for (int64_t at = 0; at < n; ++at) {
      std::vector<float> x(size_t(n), -1.0f);
      x[size_t(at)] = std::numeric_limits<float>::quiet_NaN();
      exp_inplace(lvl, x.data(), n);
      for (int64_t i = 0; i < n; ++i)
        EXPECT_EQ(std::isnan(x[size_t(i)]), i == at) << "n " << n << " at " << at << " i " << i;
    }
  }
}

TEST_P(SimdLevel, ExpMatchesStdExp) {
  const simd_level lvl = GetParam();
  std::vector<float> xs;
  for (float x = -100.0f; x <= 88.0f; x += 0.0173f) xs.push_back(x);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-100.0f, 88.0f);
  for (int i = 0; i < 20000; ++i) xs.push_back(u(rng));
  const float b = -87.0f;
  for (float x : {b, std::nextafter(b, -1e9f), std::nextafter(b, 1e9f), -86.99f, -87.01f, 0.0f,
                  -0.0f, 1e-30f, -1e-30f, 1e-7f, -1e-7f, 0.34657359f, -0.34657359f, 88.0f, 87.99f,
                  -100.0f, -std::numeric_limits<float>::infinity()})
    xs.push_back(x);
  std::shuffle(xs.begin(), xs.end(), rng);
  auto check = [&](const float* in, const float* got, size_t n, const char* what) {
    for (size_t i = 0; i < n; ++i) {
      const float x = in[i];
      if (x < -87.0f) {
        if (got[i] != 0.0f) {
          ADD_FAILURE() << level_name(lvl) << " " << what << ": exp(" << x << ") = " << got[i]
                        << ", want 0";
          return false;
        }
        continue;
      }
      const double want = std::exp(double(x));
      if (!(std::abs(got[i] - want) <= 2e-7 * want)) {
        ADD_FAILURE() << level_name(lvl) << " " << what << ": exp(" << x << ") = " << got[i]
                      << ", want " << want << " (relative " << std::abs(got[i] - want) / want
                      << ")";
        return false;
      }
    }
    return true;
  };
  // every length up to 40 and some longer ones, fenced at the end, from several starts
  std::vector<size_t> lens;
  for (size_t n = 0; n <= 40; ++n) lens.push_back(n);
  for (size_t n : {63, 64, 65, 100, 1000}) lens.push_back(n);
  size_t start = 0;
  for (size_t n : lens) {
    fenced<float> x(n);
    for (size_t i = 0; i < n; ++i) x[i] = xs[(start + i) % xs.size()];
    const std::vector<float> in = x.vec();
    exp_inplace(lvl, x.data(), int64_t(n));
    if (!check(in.data(), x.data(), n, "short")) return;
    start += n;
  }
  // all of them at once, from an unaligned start
  std::vector<float> all(xs.size() + 1);
  std::copy(xs.begin(), xs.end(), all.begin() + 1);
  exp_inplace(lvl, all.data() + 1, int64_t(xs.size()));
  check(xs.data(), all.data() + 1, xs.size(), "all");
}

// The dense chunk's softmax row: max, exp(x - max) and the double sum agree with a double
// computation on every length up to 40 and longer ones; any NaN or infinity (also in the tail,
// also -inf) is refused with the row left unchanged.
TEST_P(SimdLevel, ShiftExpSumMatchesDouble) {
  const simd_level lvl = GetParam();
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 6.0f);
  std::vector<size_t> lens;
  for (size_t n = 1; n <= 40; ++n) lens.push_back(n);
  for (size_t n : {63, 64, 65, 256, 1001}) lens.push_back(n);
  for (size_t n : lens) {
    fenced<float> x(n);
    for (size_t i = 0; i < n; ++i) x[i] = nd(rng);
    const std::vector<float> in = x.vec();
    float m = 0;
    double sum = 0;
    ASSERT_TRUE(shift_exp_sum(lvl, x.data(), int64_t(n), &m, &sum)) << level_name(lvl) << n;
    EXPECT_EQ(m, *std::max_element(in.begin(), in.end())) << level_name(lvl) << " n=" << n;
    double want_sum = 0;
    for (size_t i = 0; i < n; ++i) {
      const double want = std::exp(double(in[i] - m));
      want_sum += want;
      ASSERT_NEAR(x[i], want, 2e-7 * want + 1e-38) << level_name(lvl) << " n=" << n << " i=" << i;
    }
    EXPECT_NEAR(sum, want_sum, 1e-6 * want_sum) << level_name(lvl) << " n=" << n;
    for (float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
          -std::numeric_limits<float>::infinity()}) {
      for (size_t at : {size_t(0), n / 2, n - 1}) {
        std::vector<float> y = in;
        y[at] = bad;
        const std::vector<float> before = y;
        float m2 = 0;
        double s2 = 0;
        EXPECT_FALSE(shift_exp_sum(lvl, y.data(), int64_t(n), &m2, &s2))
            << level_name(lvl) << " n=" << n << " at=" << at << " value=" << bad;
        for (size_t i = 0; i < n; ++i)
          if (!(y[i] == before[i] || (std::isnan(y[i]) && std::isnan(before[i]))))
            ADD_FAILURE() << level_name(lvl) << " n=" << n << ": row changed at " << i;
      }
    }
  }
}

// The selection compactions against a plain loop on awkward lengths: flags of every density
// (none, sparse, all, values other than 1), scores with thresholds inside, below and above their
// range and tie counts that take none, some or all of the tokens at the threshold. Inputs end at
// an inaccessible page; the output (n entries) is followed by a guard entry.
TEST_P(SimdLevel, SelectCompactionsMatchLoops) {
  const simd_level lvl = GetParam();
  const select_ops& ops = select_ops_for(lvl);
  std::mt19937 rng(9);
  std::vector<size_t> lens = {0, 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129, 1000, 4099};
  constexpr int32_t guard = -77;
  for (size_t n : lens) {
    for (double p : {0.0, 0.02, 0.3, 1.0}) {
      fenced<uint8_t> f(n);
      std::vector<int32_t> want;
      for (size_t i = 0; i < n; ++i) {
        f[i] = std::uniform_real_distribution<double>(0, 1)(rng) < p ? uint8_t(1 + rng() % 255) : 0;
        if (f[i]) want.push_back(int32_t(i));
      }
      std::vector<int32_t> got(n + 1, guard);
      const int64_t c = ops.nonzero_positions(f.data(), int64_t(n), got.data());
      ASSERT_EQ(c, int64_t(want.size())) << level_name(lvl) << " n=" << n << " p=" << p;
      EXPECT_TRUE(std::equal(want.begin(), want.end(), got.begin())) << level_name(lvl) << n;
      EXPECT_EQ(got[n], guard) << level_name(lvl) << " n=" << n << ": written past n";
    }
    fenced<uint16_t> sc(n);
    for (size_t i = 0; i < n; ++i) sc[i] = uint16_t(100 + rng() % 9);  // many equal scores
    for (int thr : {0, 99, 103, 104, 108, 300}) {
      const int64_t at_thr = std::count(sc.data(), sc.data() + n, uint16_t(thr));
      for (int64_t ties : {int64_t(0), int64_t(1), at_thr / 2, at_thr, at_thr + 5}) {
        std::vector<int32_t> want;
        int64_t left = ties;
        for (size_t i = 0; i < n; ++i) {
          const bool tie = sc[i] == thr && left > 0;
          left -= tie;
          if (sc[i] > thr || tie) want.push_back(int32_t(1000 + i));
        }
        std::vector<int32_t> got(n + 1, guard);
        const int64_t c =
            ops.positions_above(sc.data(), int64_t(n), uint16_t(thr), ties, 1000, got.data());
        ASSERT_EQ(c, int64_t(want.size()))
            << level_name(lvl) << " n=" << n << " thr=" << thr << " ties=" << ties;
        EXPECT_TRUE(std::equal(want.begin(), want.end(), got.begin()))
            << level_name(lvl) << " n=" << n << " thr=" << thr << " ties=" << ties;
        EXPECT_EQ(got[n], guard) << level_name(lvl) << " n=" << n << ": written past n";
      }
    }
  }
}
