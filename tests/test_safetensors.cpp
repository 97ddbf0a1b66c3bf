// test_safetensors.cpp: round trips and rejection of malformed files for the safetensors reader,
// plus exhaustive checks of the f16/bf16 scalar conversions it relies on.
#include "vattn/safetensors.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include "core/dtype.hpp"

namespace {

using vattn::io::safetensors;
using vattn::io::tensor_out;
using vattn::io::tensor_view;

// A file image from a raw header string and `data_bytes` bytes of data (value i & 0xff).
std::vector<uint8_t> make_file(const std::string& header, size_t data_bytes) {
  std::vector<uint8_t> out;
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(uint8_t(n >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  for (size_t i = 0; i < data_bytes; ++i) out.push_back(uint8_t(i));
  return out;
}

// Expects from_bytes to throw vattn::error whose message contains `word`.
void expect_rejected(const std::vector<uint8_t>& bytes, const std::string& word) {
  try {
    safetensors::from_bytes(bytes);
    ADD_FAILURE() << "accepted a malformed file; expected an error containing '" << word << "'";
  } catch (const vattn::error& e) {
    EXPECT_NE(std::string(e.what()).find(word), std::string::npos)
        << "message '" << e.what() << "' lacks '" << word << "'";
  }
}

std::vector<uint16_t> to_f16(const std::vector<float>& x) {
  std::vector<uint16_t> out;
  for (float f : x) out.push_back(vattn::detail::f32_to_f16(f));
  return out;
}
std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> out;
  for (float f : x) out.push_back(vattn::detail::f32_to_bf16(f));
  return out;
}

TEST(Safetensors, RoundTripF32F16Bf16WithMetadata) {
  const std::vector<float> a = {1.0f, -2.5f, 3.25f, 0.0f, -0.0f, 1e-3f};
  const std::vector<float> b = {0.5f, -1.0f, 2.0f, 65504.0f};
  const std::vector<float> c = {1.0f, -3.0f, 0.15625f, 256.0f, -1e30f, 7.0f, 8.0f, 9.0f};
  const auto b16 = to_f16(b);
  const auto c16 = to_bf16(c);
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "k\"v\\ \xc3\xa9"}};
  const std::vector<uint8_t> bytes =
      vattn::io::serialize({{"a", "F32", {2, 3}, a.data(), a.size() * 4},
                            {"layer.0.k", "F16", {4}, b16.data(), b16.size() * 2},
                            {"c", "BF16", {2, 2, 2}, c16.data(), c16.size() * 2},
                            {"scalar_empty", "F32", {0, 5}, nullptr, 0}},
                           meta);

  // The prefix is the little-endian header length, and the header is space-padded to 8 bytes.
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(bytes[i]) << (8 * i);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + n + a.size() * 4 + b.size() * 2 + c.size() * 2);

  const safetensors st = safetensors::from_bytes(bytes);
  EXPECT_EQ(st.metadata(), meta);
  ASSERT_EQ(st.tensors().size(), 4u);
  // Data order, which is the order they were given in (the empty one sits at the end).
  EXPECT_EQ(st.tensors()[0].name, "a");
  EXPECT_EQ(st.tensors()[1].name, "layer.0.k");
  EXPECT_EQ(st.tensors()[2].name, "c");
  EXPECT_EQ(st.tensors()[3].name, "scalar_empty");

  const tensor_view* ta = st.find("a");
  ASSERT_NE(ta, nullptr);
  EXPECT_EQ(ta->dtype, "F32");
  EXPECT_EQ(ta->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(ta->nbytes, 24u);
  EXPECT_EQ(std::memcmp(ta->data, a.data(), 24), 0);
  EXPECT_EQ(vattn::io::to_f32(*ta), a);

  const tensor_view* tb = st.find("layer.0.k");
  ASSERT_NE(tb, nullptr);
  EXPECT_EQ(tb->dtype, "F16");
  EXPECT_EQ(vattn::io::to_f32(*tb), b);  // all exactly representable in f16

  const tensor_view* tc = st.find("c");
  ASSERT_NE(tc, nullptr);
  EXPECT_EQ(tc->dtype, "BF16");
  EXPECT_EQ(tc->shape, (std::vector<int64_t>{2, 2, 2}));
  const std::vector<float> c_back = vattn::io::to_f32(*tc);
  ASSERT_EQ(c_back.size(), c.size());
  for (size_t i = 0; i < c.size(); ++i)
    EXPECT_EQ(c_back[i], vattn::detail::bf16_to_f32(c16[i])) << i;
  EXPECT_EQ(c_back[0], 1.0f);
  EXPECT_EQ(c_back[2], 0.15625f);

  const tensor_view* te = st.find("scalar_empty");
  ASSERT_NE(te, nullptr);
  EXPECT_EQ(te->nbytes, 0u);
  EXPECT_TRUE(vattn::io::to_f32(*te).empty());

  EXPECT_EQ(st.find("missing"), nullptr);
  EXPECT_EQ(st.find("__metadata__"), nullptr);

  // Serializing the parsed views again reproduces the file byte for byte.
  std::vector<tensor_out> again;
  for (const tensor_view& t : st.tensors())
    again.push_back({t.name, t.dtype, t.shape, t.data, t.nbytes});
  EXPECT_EQ(vattn::io::serialize(again, st.metadata()), bytes);
}

TEST(Safetensors, OtherDtypesParseButToF32Rejects) {
  const int32_t ints[3] = {1, -2, 3};
  const double d[2] = {1.5, -2.5};
  const uint8_t u[5] = {1, 2, 3, 4, 5};
  const auto bytes = vattn::io::serialize(
      {{"i", "I32", {3}, ints, 12}, {"d", "F64", {2}, d, 16}, {"u", "U8", {5}, u, 5}});
  const safetensors st = safetensors::from_bytes(bytes);
  ASSERT_EQ(st.tensors().size(), 3u);
  const tensor_view* ti = st.find("i");
  ASSERT_NE(ti, nullptr);
  EXPECT_EQ(std::memcmp(ti->data, ints, 12), 0);
  try {
    vattn::io::to_f32(*ti);
    ADD_FAILURE() << "to_f32 accepted I32";
  } catch (const vattn::error& e) {
    EXPECT_NE(std::string(e.what()).find("'i'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("I32"), std::string::npos) << e.what();
  }
  EXPECT_THROW(vattn::io::to_f32(*st.find("d")), vattn::error);
}

TEST(Safetensors, ToF32ConvertsUnalignedLittleEndian) {
  // A hand-made view at an odd address: the conversion must not assume alignment.
  uint8_t buf[1 + 8] = {};
  const float vals[2] = {1.5f, -0.375f};
  std::memcpy(buf + 1, vals, 8);
  tensor_view v{"x", "F32", {2}, buf + 1, 8};
  EXPECT_EQ(vattn::io::to_f32(v), (std::vector<float>{1.5f, -0.375f}));

  // f16 0x3c00 = 1, 0xc000 = -2, 0x7c00 = +inf, 0x0001 = 2^-24; bytes little-endian.
  const uint8_t h[8] = {0x00, 0x3c, 0x00, 0xc0, 0x00, 0x7c, 0x01, 0x00};
  tensor_view vh{"h", "F16", {4}, h, 8};
  const auto fh = vattn::io::to_f32(vh);
  EXPECT_EQ(fh[0], 1.0f);
  EXPECT_EQ(fh[1], -2.0f);
  EXPECT_EQ(fh[2], std::numeric_limits<float>::infinity());
  EXPECT_EQ(fh[3], std::ldexp(1.0f, -24));

  // bf16 0x3f80 = 1, 0xc040 = -3, 0x7fc0 = NaN.
  const uint8_t bh[6] = {0x80, 0x3f, 0x40, 0xc0, 0xc0, 0x7f};
  tensor_view vb{"b", "BF16", {3}, bh, 6};
  const auto fb = vattn::io::to_f32(vb);
  EXPECT_EQ(fb[0], 1.0f);
  EXPECT_EQ(fb[1], -3.0f);
  EXPECT_TRUE(std::isnan(fb[2]));

  tensor_view odd{"odd", "F16", {}, h, 3};  // not a whole number of elements
  EXPECT_THROW(vattn::io::to_f32(odd), vattn::error);
}

TEST(Safetensors, ViewsSurviveMoveAndCopy) {
  const std::vector<float> a = {1, 2, 3, 4};
  auto st = std::make_unique<safetensors>(
      safetensors::from_bytes(vattn::io::serialize({{"a", "F32", {4}, a.data(), 16}})));
  const uint8_t* before = st->find("a")->data;

  safetensors moved = std::move(*st);
  EXPECT_EQ(moved.find("a")->data, before);  // the heap buffer moved with the object
  safetensors copied = moved;
  safetensors assigned;
  assigned = copied;
  st.reset();
  EXPECT_NE(copied.find("a")->data, before);
  EXPECT_EQ(vattn::io::to_f32(*moved.find("a")), a);
  EXPECT_EQ(vattn::io::to_f32(*copied.find("a")), a);
  moved = safetensors();  // frees the original buffer; copies must not depend on it
  EXPECT_EQ(vattn::io::to_f32(*copied.find("a")), a);
  EXPECT_EQ(vattn::io::to_f32(*assigned.find("a")), a);
}

TEST(Safetensors, GapsInTheDataBufferAreAllowed) {
  // 16 bytes of data; the tensor uses [8, 16) and the first 8 bytes belong to nobody.
  const auto st = safetensors::from_bytes(
      make_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16));
  ASSERT_EQ(st.tensors().size(), 1u);
  EXPECT_EQ(st.tensors()[0].data[0], 8);
}

TEST(Safetensors, EmptyHeaderObjectIsValid) {
  const auto st = safetensors::from_bytes(make_file("{}      ", 0));
  EXPECT_TRUE(st.tensors().empty());
  EXPECT_TRUE(st.metadata().empty());
}

TEST(Safetensors, RejectsMalformedFiles) {
  const std::string ok_k = R"("k":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]})";
  // Sanity: the template is accepted.
  EXPECT_NO_THROW(safetensors::from_bytes(make_file("{" + ok_k + "}", 48)));

  expect_rejected({}, "empty");
  expect_rejected({0x10, 0, 0}, "truncated");
  {
    auto bytes = make_file("{}", 0);
    bytes[0] = 200;  // header length 200 with 2 bytes after the prefix
    expect_rejected(bytes, "past the end");
  }
  {
    auto bytes = make_file("{}", 0);
    bytes[4] = 1;  // 2^32 + 2 bytes
    expect_rejected(bytes, "100 MB");
  }
  {
    std::vector<uint8_t> bytes(8, 0xff);  // u64 max: must not wrap when adding the prefix
    expect_rejected(bytes, "100 MB");
  }
  expect_rejected(make_file("", 0), "JSON");
  expect_rejected(make_file("{\"k\":", 0), "JSON");
  expect_rejected(make_file("{} trailing", 0), "JSON");
  expect_rejected(make_file("{\"\xff\":1}", 0), "JSON");  // invalid UTF-8 in a key
  expect_rejected(make_file("[1,2]", 0), "not a JSON object");
  expect_rejected(make_file("\"str\"", 0), "not a JSON object");
  expect_rejected(make_file(R"({"k":[1]})", 0), "not a JSON object");
  expect_rejected(make_file(R"({"k":{"dtype":"F31","shape":[3,4],"data_offsets":[0,48]}})", 48),
                  "unknown dtype");
  expect_rejected(make_file(R"({"k":{"dtype":3,"shape":[3,4],"data_offsets":[0,48]}})", 48),
                  "dtype");
  expect_rejected(make_file(R"({"k":{"shape":[3,4],"data_offsets":[0,48]}})", 48),
                  "missing field 'dtype'");
  expect_rejected(make_file(R"({"k":{"dtype":"F32","data_offsets":[0,48]}})", 48),
                  "missing field 'shape'");
  expect_rejected(make_file(R"({"k":{"dtype":"F32","shape":[3,4]}})", 48),
                  "missing field 'data_offsets'");
  expect_rejected(make_file(R"({"k":{"dtype":"F32","shape":"3","data_offsets":[0,48]}})", 48),
                  "shape");
  expect_rejected(make_file(R"({"k":{"dtype":"F32","shape":[3.0,4],"data_offsets":[0,48]}})", 48),
                  "not an integer");
  expect_rejected(make_file(R"({"k":{"dtype":"F32","shape":[3,4],"data_offsets":[0]}})", 48),
                  "data_offsets");
  expect_rejected(make_file(R"({"k":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48,96]}})", 96),
                  "data_offsets");
  expect_rejected(make_file(R"({"k":{"dtype":"F32","shape":[3,4],"data_offsets":[-1,47]}})", 48),
                  "negative");
  expect_rejected(make_file(R"({"k":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]}})", 40),
                  "out of range");
  expect_rejected(make_file(R"({"k":{"dtype":"F32","shape":[3,4],"data_offsets":[40,88]}})", 48),
                  "out of range");
  expect_rejected(
      make_file(R"({"k":{"dtype":"F32","shape":[0],"data_offsets":[18446744073709551615,0]}})", 48),
      "too large");
  expect_rejected(make_file(R"({"k":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 48),
                  "end before begin");
  expect_rejected(make_file(R"({"k":{"dtype":"F32","shape":[3,4],"data_offsets":[0,44]}})", 48),
                  "do not match");
  expect_rejected(make_file(R"({"k":{"dtype":"F32","shape":[3,-4],"data_offsets":[0,48]}})", 48),
                  "negative");
  expect_rejected(
      make_file(R"({"k":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})",
                48),
      "overflow");
  // 2^62 * 4 bytes wraps to 0 in 64 bits: must be caught as overflow, not matched to [0, 0).
  expect_rejected(
      make_file(R"({"k":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", 8),
      "overflow");
  expect_rejected(make_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                            R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                            24),
                  "overlap");
  expect_rejected(make_file(R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},)"
                            R"("b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}})",
                            8),
                  "overlap");
  expect_rejected(make_file("{" + ok_k + "," + ok_k + "}", 48), "duplicate");
  expect_rejected(make_file(R"({"__metadata__":{"a":1}})", 0), "__metadata__");
  expect_rejected(make_file(R"({"__metadata__":[]})", 0), "__metadata__");
}

TEST(Safetensors, DeeplyNestedHeaderIsRejectedWithoutRecursion) {
  // Nesting 200k deep would overflow the stack of any recursive walk (e.g. dump()).
  const size_t depth = 200'000;
  expect_rejected(make_file(R"({"k":{"dtype":"F32","shape":[1],"data_offsets":)" +
                                std::string(depth, '[') + std::string(depth, ']') + "}}",
                            4),
                  "data_offsets");
  std::string nested;
  for (size_t i = 0; i < depth; ++i) nested += "{\"a\":";
  expect_rejected(make_file("{\"__metadata__\":" + nested + "1" + std::string(depth + 1, '}'), 0),
                  "__metadata__");
  expect_rejected(make_file(std::string(depth, '['), 0), "JSON");
}

TEST(Safetensors, ErrorMessageNamesTensorAndSizes) {
  try {
    safetensors::from_bytes(
        make_file(R"({"k":{"dtype":"F32","shape":[3,4],"data_offsets":[0,100]}})", 100));
    FAIL() << "accepted";
  } catch (const vattn::error& e) {
    EXPECT_STREQ(e.what(),
                 "safetensors: tensor 'k': data_offsets [0, 100) do not match shape [3,4] x F32 = "
                 "48 bytes");
  }
}

TEST(Safetensors, SerializeRejectsBadInput) {
  const float x[4] = {};
  EXPECT_THROW(vattn::io::serialize({{"a", "F33", {4}, x, 16}}), vattn::error);
  EXPECT_THROW(vattn::io::serialize({{"a", "F32", {4}, x, 12}}), vattn::error);
  EXPECT_THROW(vattn::io::serialize({{"a", "F32", {-4}, x, 16}}), vattn::error);
  EXPECT_THROW(vattn::io::serialize({{"a", "F32", {4}, nullptr, 16}}), vattn::error);
  EXPECT_THROW(vattn::io::serialize({{"a", "F32", {4}, x, 16}, {"a", "F32", {4}, x, 16}}),
               vattn::error);
  EXPECT_THROW(vattn::io::serialize({{"__metadata__", "F32", {4}, x, 16}}), vattn::error);
  EXPECT_THROW(vattn::io::serialize({{"bad\xff", "F32", {4}, x, 16}}), vattn::error);
  EXPECT_THROW(vattn::io::serialize({}, {{"k", "bad\xfe"}}), vattn::error);
}

TEST(Safetensors, SaveAndLoad) {
  const auto path = (std::filesystem::temp_directory_path() /
                     ("vattn_test_" + std::to_string(::getpid()) + ".safetensors"))
                        .string();
  const std::vector<float> a = {1, 2, 3};
  vattn::io::save(path, {{"a", "F32", {3}, a.data(), 12}}, {{"m", "v"}});
  const safetensors st = safetensors::load(path);
  std::filesystem::remove(path);
  ASSERT_NE(st.find("a"), nullptr);
  EXPECT_EQ(vattn::io::to_f32(*st.find("a")), a);
  EXPECT_EQ(st.metadata().at("m"), "v");
}

TEST(Safetensors, LoadNamesMissingPath) {
  const std::string path = "/nonexistent/dir/vattn_missing.safetensors";
  try {
    safetensors::load(path);
    FAIL() << "loaded a missing file";
  } catch (const vattn::error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  EXPECT_THROW(vattn::io::save("/nonexistent/dir/out.safetensors", {}), vattn::error);
}

TEST(Safetensors, LoadNamesPathOfMalformedFile) {
  const auto path = (std::filesystem::temp_directory_path() /
                     ("vattn_bad_" + std::to_string(::getpid()) + ".safetensors"))
                        .string();
  {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    std::fputs("garbage", f);
    std::fclose(f);
  }
  try {
    safetensors::load(path);
    ADD_FAILURE() << "loaded garbage";
  } catch (const vattn::error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  std::filesystem::remove(path);
}

// ---------------------------------------------------------------------------------------------
// Scalar conversions (core/dtype.hpp).

TEST(Dtype, F16RoundTripsEveryBitPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = vattn::detail::f16_to_f32(uint16_t(h));
    const uint16_t back = vattn::detail::f32_to_f16(f);
    const bool is_nan = (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0;
    EXPECT_EQ(std::isnan(f), is_nan) << std::hex << h;
    if (is_nan) {
      EXPECT_TRUE(std::isnan(vattn::detail::f16_to_f32(back))) << std::hex << h;
      EXPECT_EQ(back & 0x8000u, h & 0x8000u) << std::hex << h;
    } else {
      EXPECT_EQ(back, h) << std::hex << h;
    }
  }
}

TEST(Dtype, Bf16RoundTripsEveryBitPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = vattn::detail::bf16_to_f32(uint16_t(h));
    const uint16_t back = vattn::detail::f32_to_bf16(f);
    const bool is_nan = (h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0;
    EXPECT_EQ(std::isnan(f), is_nan) << std::hex << h;
    if (is_nan) {
      EXPECT_TRUE(std::isnan(vattn::detail::bf16_to_f32(back))) << std::hex << h;
    } else {
      EXPECT_EQ(back, h) << std::hex << h;
    }
  }
}

TEST(Dtype, F16RoundingHandCases) {
  using vattn::detail::f32_to_f16;
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bffu);  // largest finite half
  EXPECT_EQ(f32_to_f16(std::nextafter(65520.0f, 0.0f)), 0x7bffu);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00u);  // halfway to 2^16: ties to even = Inf
  EXPECT_EQ(f32_to_f16(-65520.0f), 0xfc00u);
  EXPECT_EQ(f32_to_f16(1e10f), 0x7c00u);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::infinity()), 0x7c00u);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001u);     // smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000u);     // tie between 0 and 2^-24: even is 0
  EXPECT_EQ(f32_to_f16(-std::ldexp(1.0f, -25)), 0x8000u);    // keeps the sign
  EXPECT_EQ(f32_to_f16(std::ldexp(1.5f, -25)), 0x0001u);     // above the tie rounds up
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -25)), 0x0002u);     // 1.5 ulp ties to even 2
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -14)), 0x0400u);     // smallest normal
  EXPECT_EQ(f32_to_f16(std::ldexp(1023.5f, -24)), 0x0400u);  // subnormal rounding into normal
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00u);      // tie: 1 is even
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02u);  // tie: rounds up to even
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)), 0x3c01u);
  EXPECT_EQ(f32_to_f16(2047.5f), 0x6800u);  // 2048 after the mantissa carry
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000u);
  EXPECT_EQ(f32_to_f16(1e-10f), 0x0000u);
  const uint16_t nan = f32_to_f16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(std::isnan(vattn::detail::f16_to_f32(nan)));
}

TEST(Dtype, Bf16RoundingHandCases) {
  using vattn::detail::f32_to_bf16;
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80u);
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80u);  // tie: 1 is even
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82u);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80u);  // rounds up to Inf
  // A NaN whose payload sits only in the low 16 bits must not truncate to Inf.
  float low_nan;
  const uint32_t bits = 0x7f800001u;
  std::memcpy(&low_nan, &bits, 4);
  EXPECT_TRUE(std::isnan(vattn::detail::bf16_to_f32(f32_to_bf16(low_nan))));
}

}  // namespace
