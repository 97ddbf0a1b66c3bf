// kv_access.hpp: element offsets into a contiguous or paged KV cache (vattn::kv_cache).
#pragma once

#include <cstdint>

#include "vattn/vattn.hpp"

namespace vattn::detail {

// kv_cache with the default strides filled in.
inline kv_cache with_default_strides(kv_cache kv) {
  if (kv.stride_head == 0) kv.stride_head = kv.head_dim;
  if (kv.stride_token == 0) kv.stride_token = int64_t(kv.n_head_kv) * kv.stride_head;
  if (kv.layout == kv_layout::paged && kv.stride_page == 0)
    kv.stride_page = int64_t(kv.page_size) * kv.stride_token;
  return kv;
}

// Element offset of (seq s, token t, kv head h, dim 0). `seq_row0` is the first row of
// sequence s in the contiguous layout (seq_start[s], or the packed prefix sum).
inline int64_t row_offset(const kv_cache& kv, int64_t seq_row0, int64_t s, int64_t t, int32_t h) {
  if (kv.layout == kv_layout::contiguous)
    return (seq_row0 + t) * kv.stride_token + int64_t(h) * kv.stride_head;
  const int64_t page = kv.page_table[kv.page_start[s] + t / kv.page_size];
  return page * kv.stride_page + (t % kv.page_size) * kv.stride_token + int64_t(h) * kv.stride_head;
}

}  // namespace vattn::detail
