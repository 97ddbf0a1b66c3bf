// test_util.hpp: builds batches (contiguous or paged, any dtype) from synthetic problems and
// compares the CPU path with the reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "core/dtype.hpp"
#include "core/sampler.hpp"
#include "vattn/synth.hpp"
#include "vattn/vattn.hpp"

namespace vattn::test {

// Owns the buffers of one batch and hands out run_args over them.
struct batch {
  int32_t n_head_q = 0, n_head_kv = 0, d = 0;
  dtype type = dtype::f32;
  kv_layout layout = kv_layout::contiguous;
  std::vector<int32_t> seq_len;
  std::vector<float> q;             // [n_seq, n_head_q, d]
  std::vector<uint8_t> k, v;        // storage in `type`
  std::vector<int32_t> page_table;  // paged
  std::vector<int64_t> page_start;  // paged
  int32_t page_size = 0;
  int64_t n_rows = 0, n_pages = 0;
  std::vector<float> out;
  std::vector<head_stats> stats;
  std::vector<int32_t> indices;

  int64_t n_max() const { return *std::max_element(seq_len.begin(), seq_len.end()); }

  run_args args(uint64_t step = 0) {
    run_args a;
    a.n_head_q = n_head_q;
    a.q = q.data();
    a.kv.layout = layout;
    a.kv.type = type;
    a.kv.n_head_kv = n_head_kv;
    a.kv.head_dim = d;
    a.kv.k = k.data();
    a.kv.v = v.data();
    a.kv.n_seq = int32_t(seq_len.size());
    a.kv.seq_len = seq_len.data();
    a.kv.n_rows = n_rows;
    if (layout == kv_layout::paged) {
      a.kv.page_size = page_size;
      a.kv.page_table = page_table.data();
      a.kv.page_start = page_start.data();
      a.kv.n_pages = n_pages;
    }
    const size_t nh = seq_len.size() * size_t(n_head_q);
    out.assign(nh * d + 16, 12345.0f);  // 16 guard values after the output
    stats.assign(nh, head_stats{});
    indices.assign(nh * size_t(n_max()), -7);
    a.out = out.data();
    a.stats = stats.data();
    a.indices = indices.data();
    a.step = step;
    return a;
  }
  bool guards_intact() const {
    const size_t nh = seq_len.size() * size_t(n_head_q) * d;
    for (size_t i = nh; i < out.size(); ++i)
      if (out[i] != 12345.0f) return false;
    return true;
  }
};

inline void store(std::vector<uint8_t>& dst, size_t i, float x, dtype t) {
  switch (t) {
    case dtype::f32:
      std::memcpy(dst.data() + 4 * i, &x, 4);
      break;
    case dtype::f16: {
      uint16_t h = detail::f32_to_f16(x);
      std::memcpy(dst.data() + 2 * i, &h, 2);
      break;
    }
    case dtype::bf16: {
      uint16_t h = detail::f32_to_bf16(x);
      std::memcpy(dst.data() + 2 * i, &h, 2);
      break;
    }
  }
}

// One synthetic problem per sequence (seed + s), packed contiguously or scattered over shuffled
// pages of `page_size` tokens.
inline batch make_batch(synth::family fam, const std::vector<int32_t>& lens, int32_t n_head_q,
                        int32_t n_head_kv, int32_t d, dtype type, kv_layout layout, uint64_t seed,
                        int32_t page_size = 16) {
  batch b;
  b.n_head_q = n_head_q, b.n_head_kv = n_head_kv, b.d = d, b.type = type, b.layout = layout;
  b.seq_len = lens;
  b.page_size = layout == kv_layout::paged ? page_size : 0;
  const size_t es = dtype_size(type), row = size_t(n_head_kv) * d;
  if (layout == kv_layout::contiguous) {
    b.n_rows = std::accumulate(lens.begin(), lens.end(), int64_t(0));
  } else {
    for (int32_t n : lens) {
      b.page_start.push_back(int64_t(b.page_table.size()));
      const int64_t pages = (n + page_size - 1) / page_size;
      for (int64_t p = 0; p < pages; ++p) b.page_table.push_back(int32_t(b.page_table.size()));
    }
    // shuffle page ids so logical order differs from physical order; keep one spare page
    b.n_pages = int64_t(b.page_table.size()) + 1;
    uint64_t st = seed * 7919 + 1;
    for (size_t i = b.page_table.size(); i > 1; --i) {
      st = detail::mix64(st);
      std::swap(b.page_table[i - 1], b.page_table[st % i]);
    }
    b.n_rows = b.n_pages * page_size;
  }
  b.k.assign(size_t(b.n_rows) * row * es, 0);
  b.v.assign(size_t(b.n_rows) * row * es, 0);
  int64_t row0 = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    synth::shape sh{lens[s], n_head_q, n_head_kv, d};
    synth::problem p = synth::generate(fam, sh, seed + s);
    b.q.insert(b.q.end(), p.q.begin(), p.q.end());
    for (int64_t t = 0; t < lens[s]; ++t) {
      int64_t r;
      if (layout == kv_layout::contiguous) {
        r = row0 + t;
      } else {
        r = int64_t(b.page_table[b.page_start[s] + t / page_size]) * page_size + t % page_size;
      }
      for (size_t j = 0; j < row; ++j) {
        store(b.k, size_t(r) * row + j, p.k[size_t(t) * row + j], type);
        store(b.v, size_t(r) * row + j, p.v[size_t(t) * row + j], type);
      }
    }
    row0 += lens[s];
  }
  return b;
}

// Normalised mean squared error sum (a-b)^2 / sum b^2.
template <typename A, typename B>
double nmse(const A* a, const B* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double x = double(a[i]), y = double(b[i]);
    num += (x - y) * (x - y);
    den += y * y;
  }
  return den > 0 ? num / den : num;
}

// Small-context configuration: sink 4, local 8 and the given method's other stages.
inline config small_config(std::string_view method) {
  config c = method_config(method);
  if (c.dense) return c;
  c.sink = {4, false};
  c.local = {8, false};
  if (c.select == selector::topk) c.topk = {0.1, true};
  if (c.sample == sampling::fixed_rate) c.sample_rate = 0.1;
  if (c.sample == sampling::adaptive) c.base = {0.1, true};
  return c;
}

}  // namespace vattn::test
