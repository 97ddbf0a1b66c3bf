// validate.cpp: argument checks for plans and runs (see validate.hpp).
#include "core/validate.hpp"

#include <cmath>
#include <string>

#include "core/kv_access.hpp"

namespace vattn::detail {

namespace {
[[noreturn]] void fail(const std::string& msg) {
  throw error(msg);
}
std::string str(int64_t x) {
  return std::to_string(x);
}
}  // namespace

void validate_plan_params(const plan_params& p) {
  if (p.n_seq_max < 1) fail("plan_params.n_seq_max must be >= 1, got " + str(p.n_seq_max));
  if (p.n_head_q < 1) fail("plan_params.n_head_q must be >= 1, got " + str(p.n_head_q));
  if (p.n_head_kv < 1) fail("plan_params.n_head_kv must be >= 1, got " + str(p.n_head_kv));
  if (p.n_head_q % p.n_head_kv != 0)
    fail("plan_params.n_head_q (" + str(p.n_head_q) + ") must be a multiple of n_head_kv (" +
         str(p.n_head_kv) + ")");
  if (p.head_dim < 1 || p.head_dim > 4096)
    fail("plan_params.head_dim must lie in [1, 4096], got " + str(p.head_dim));
  if (p.n_tokens_max < 1 || p.n_tokens_max > (int64_t(1) << 31) - 1)
    fail("plan_params.n_tokens_max must lie in [1, 2^31), got " + str(p.n_tokens_max));
  if (p.n_threads < 0) fail("plan_params.n_threads must be >= 0, got " + str(p.n_threads));
  if (int(p.kv_type) < 0 || int(p.kv_type) > 2)
    fail("plan_params.kv_type has an unknown value " + str(int(p.kv_type)));
}

void validate_kv_cache(const plan_params& p, const kv_cache& kv_in, int64_t* row0, bool needs_v) {
  const kv_cache kv = with_default_strides(kv_in);
  if (!kv.k) fail("kv.k is null");
  if (needs_v && !kv.v) fail("kv.v is null");
  if (kv.type != p.kv_type)
    fail(std::string("kv.type is ") + dtype_name(kv.type) + " but the plan was made for " +
         dtype_name(p.kv_type));
  if (kv.n_head_kv != p.n_head_kv)
    fail("kv.n_head_kv is " + str(kv.n_head_kv) + " but the plan expects " + str(p.n_head_kv));
  if (kv.head_dim != p.head_dim)
    fail("kv.head_dim is " + str(kv.head_dim) + " but the plan expects " + str(p.head_dim));
  if (kv.n_seq < 1 || kv.n_seq > p.n_seq_max)
    fail("kv.n_seq must lie in [1, " + str(p.n_seq_max) + "], got " + str(kv.n_seq));
  if (!kv.seq_len) fail("kv.seq_len is null (expected [n_seq] token counts)");
  if (kv.stride_token <= 0 || kv.stride_head <= 0)
    fail("kv strides must be positive (stride_token " + str(kv.stride_token) + ", stride_head " +
         str(kv.stride_head) + ")");
  for (int32_t s = 0; s < kv.n_seq; ++s) {
    const int64_t n = kv.seq_len[s];
    if (n < 1)
      fail("kv.seq_len[" + str(s) + "] is " + str(n) +
           ": every sequence needs at least one cached token (empty caches are rejected)");
    if (n > p.n_tokens_max)
      fail("kv.seq_len[" + str(s) + "] is " + str(n) + ", above the plan's n_tokens_max " +
           str(p.n_tokens_max));
  }
  if (kv.layout == kv_layout::contiguous) {
    if (kv.n_rows < 1) fail("kv.n_rows must give the token rows the K/V buffers hold (>= 1)");
    int64_t packed = 0;
    for (int32_t s = 0; s < kv.n_seq; ++s) {
      const int64_t first = kv.seq_start ? kv.seq_start[s] : packed;
      if (first < 0 || first > kv.n_rows - kv.seq_len[s])  // no overflow for a huge seq_start
        fail("kv sequence " + str(s) + " spans rows [" + str(first) + ", " +
             str(first + kv.seq_len[s]) + ") outside the " + str(kv.n_rows) + " rows (n_rows)");
      if (row0) row0[s] = first;
      packed += kv.seq_len[s];
    }
  } else if (kv.layout == kv_layout::paged) {
    if (kv.page_size < 1) fail("kv.page_size must be >= 1 for the paged layout");
    if (!kv.page_table || !kv.page_start)
      fail("kv.page_table and kv.page_start must be set for the paged layout");
    if (kv.n_pages < 1) fail("kv.n_pages must give the pages the pool holds (>= 1)");
    if (kv.stride_page <= 0) fail("kv.stride_page must be positive");
    for (int32_t s = 0; s < kv.n_seq; ++s) {
      if (kv.page_start[s] < 0) fail("kv.page_start[" + str(s) + "] is negative");
      const int64_t pages = (kv.seq_len[s] + kv.page_size - 1) / kv.page_size;
      for (int64_t i = 0; i < pages; ++i) {
        const int64_t id = kv.page_table[kv.page_start[s] + i];
        if (id < 0 || id >= kv.n_pages)
          fail("kv.page_table entry " + str(i) + " of sequence " + str(s) + " is " + str(id) +
               ", outside [0, n_pages = " + str(kv.n_pages) + ")");
      }
      if (row0) row0[s] = 0;
    }
  } else {
    fail("kv.layout has an unknown value " + str(int(kv.layout)));
  }
}

void validate_run_args(const plan_params& p, const run_args& a, int64_t* row0, bool needs_out) {
  if (a.n_head_q != p.n_head_q)
    fail("run_args.n_head_q is " + str(a.n_head_q) + " but the plan expects " + str(p.n_head_q));
  if (!a.q) fail("run_args.q is null (expected [n_seq, n_head_q, head_dim] f32)");
  if (needs_out && !a.out) fail("run_args.out is null (expected [n_seq, n_head_q, head_dim] f32)");
  validate_kv_cache(p, a.kv, row0);
  const kv_cache& kv = a.kv;
  const int64_t nq = int64_t(kv.n_seq) * p.n_head_q * p.head_dim;
  for (int64_t i = 0; i < nq; ++i) {
    if (!std::isfinite(a.q[i])) {
      const int64_t d = i % p.head_dim, h = (i / p.head_dim) % p.n_head_q,
                    s = i / (int64_t(p.head_dim) * p.n_head_q);
      fail("q contains NaN/Inf at seq " + str(s) + ", head " + str(h) + ", dim " + str(d));
    }
  }
}

void validate_index(const config& cfg, const plan_params& p, const run_args& a) {
  if (cfg.pred == predictor::oracle) return;
  const predictor_index* ix = a.index;
  if (!ix)
    throw error(std::string("run_args.index is null: predictor=") + predictor_name(cfg.pred) +
                " needs a predictor_index built with update(kv)");
  const config& ic = ix->cfg();
  const plan_params& ip = ix->params();
  if (ic.pred != cfg.pred || ic.pred_page != cfg.pred_page || ic.pred_bits != cfg.pred_bits)
    throw error(std::string("run_args.index was built for predictor=") + predictor_name(ic.pred) +
                " (pred_page " + std::to_string(ic.pred_page) + ", pred_bits " +
                std::to_string(ic.pred_bits) + "), the plan uses predictor=" +
                predictor_name(cfg.pred) + " (pred_page " + std::to_string(cfg.pred_page) +
                ", pred_bits " + std::to_string(cfg.pred_bits) + ")");
  if (ip.n_head_kv != p.n_head_kv || ip.head_dim != p.head_dim || ip.kv_type != p.kv_type)
    throw error("run_args.index was built for n_head_kv " + std::to_string(ip.n_head_kv) +
                ", head_dim " + std::to_string(ip.head_dim) + ", kv_type " +
                dtype_name(ip.kv_type) + "; the plan has n_head_kv " + std::to_string(p.n_head_kv) +
                ", head_dim " + std::to_string(p.head_dim) + ", kv_type " + dtype_name(p.kv_type));
  if (a.kv.n_seq > ip.n_seq_max)
    throw error("run_args.index holds " + std::to_string(ip.n_seq_max) + " slots, kv.n_seq is " +
                std::to_string(a.kv.n_seq));
  for (int32_t s = 0; s < a.kv.n_seq; ++s)
    if (ix->tokens(s) != a.kv.seq_len[s])
      throw error("run_args.index: slot " + std::to_string(s) + " holds " +
                  std::to_string(ix->tokens(s)) + " tokens, kv.seq_len[" + std::to_string(s) +
                  "] is " + std::to_string(a.kv.seq_len[s]) + " (call index.update(kv) first)");
}

}  // namespace vattn::detail
