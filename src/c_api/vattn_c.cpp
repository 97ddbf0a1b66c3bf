// vattn_c.cpp: the C ABI (vattn.h) over the C++ API: exceptions become status codes and a
// thread-local last-error message.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <new>
#include <string>

#include "vattn/vattn.h"
#include "vattn/vattn.hpp"

struct vattn_config {
  vattn::config cfg;
};
struct vattn_plan {
  vattn::plan p;
};
struct vattn_predictor_index {
  vattn::predictor_index ix;
};

namespace {

thread_local std::string g_last_error;

template <typename F>
vattn_status guarded(F&& f) {
  try {
    f();
    g_last_error.clear();
    return VATTN_OK;
  } catch (const vattn::error& e) {
    g_last_error = e.what();
    return VATTN_ERR_INVALID_ARGUMENT;
  } catch (const std::bad_alloc&) {
    g_last_error = "out of memory";
    return VATTN_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    g_last_error = e.what();
    return VATTN_ERR_INTERNAL;
  } catch (...) {
    g_last_error = "unknown internal error";
    return VATTN_ERR_INTERNAL;
  }
}

void require(const void* p, const char* name) {
  if (!p) throw vattn::error(std::string(name) + " is null");
}

vattn::plan_params to_cpp(const vattn_plan_params& c) {
  vattn::plan_params p;
  p.n_seq_max = c.n_seq_max;
  p.n_head_q = c.n_head_q;
  p.n_head_kv = c.n_head_kv;
  p.head_dim = c.head_dim;
  p.n_tokens_max = c.n_tokens_max;
  p.kv_type = vattn::dtype(c.kv_type);
  p.n_threads = c.n_threads;
  return p;
}

vattn::kv_cache to_cpp(const vattn_kv_cache& c) {
  vattn::kv_cache kv;
  kv.layout = vattn::kv_layout(c.layout);
  kv.type = vattn::dtype(c.type);
  kv.n_head_kv = c.n_head_kv;
  kv.head_dim = c.head_dim;
  kv.k = c.k;
  kv.v = c.v;
  kv.stride_token = c.stride_token;
  kv.stride_head = c.stride_head;
  kv.stride_page = c.stride_page;
  kv.n_seq = c.n_seq;
  kv.seq_len = c.seq_len;
  kv.seq_start = c.seq_start;
  kv.n_rows = c.n_rows;
  kv.page_size = c.page_size;
  kv.page_table = c.page_table;
  kv.page_start = c.page_start;
  kv.n_pages = c.n_pages;
  return kv;
}

// The C and C++ stats records are converted in place after the run.
static_assert(sizeof(vattn_head_stats) == sizeof(vattn::head_stats));
static_assert(offsetof(vattn_head_stats, n_sampled) == offsetof(vattn::head_stats, n_sampled));
static_assert(offsetof(vattn_head_stats, density) == offsetof(vattn::head_stats, density));
static_assert(offsetof(vattn_head_stats, bytes_kv) == offsetof(vattn::head_stats, bytes_kv));
static_assert(offsetof(vattn_head_stats, dense_fallback) ==
              offsetof(vattn::head_stats, dense_fallback));
// The profile is passed through as a pointer.
static_assert(sizeof(vattn_run_profile) == sizeof(vattn::run_profile));
static_assert(offsetof(vattn_run_profile, select_s) == offsetof(vattn::run_profile, select_s));
static_assert(offsetof(vattn_run_profile, attend_s) == offsetof(vattn::run_profile, attend_s));

}  // namespace

extern "C" {

const char* vattn_last_error(void) {
  return g_last_error.c_str();
}
const char* vattn_version(void) {
  return vattn::version();
}

vattn_status vattn_config_parse(const char* text, vattn_config** out) {
  return guarded([&] {
    require(text, "text");
    require(out, "out");
    *out = nullptr;
    vattn::config c = vattn::parse_config(text);
    c.validate();
    *out = new vattn_config{c};
  });
}

void vattn_config_free(vattn_config* cfg) {
  delete cfg;
}

vattn_status vattn_config_to_string(const vattn_config* cfg, char* buf, size_t buf_size,
                                    size_t* needed) {
  return guarded([&] {
    require(cfg, "cfg");
    if (buf_size > 0) require(buf, "buf");
    const std::string s = cfg->cfg.to_string();
    if (needed) *needed = s.size() + 1;
    if (buf_size > 0) {
      const size_t n = std::min(s.size(), buf_size - 1);
      std::memcpy(buf, s.data(), n);
      buf[n] = '\0';
    }
  });
}

vattn_status vattn_plan_create(const vattn_config* cfg, const vattn_plan_params* params,
                               vattn_plan** out) {
  return guarded([&] {
    require(cfg, "cfg");
    require(params, "params");
    require(out, "out");
    *out = nullptr;
    *out = new vattn_plan{vattn::plan(cfg->cfg, to_cpp(*params))};
  });
}

void vattn_plan_free(vattn_plan* plan) {
  delete plan;
}

size_t vattn_plan_workspace_bytes(const vattn_plan* plan) {
  return plan ? plan->p.workspace_bytes() : 0;
}

vattn_status vattn_plan_run(const vattn_plan* plan, const vattn_run_args* args, void* workspace,
                            size_t workspace_bytes) {
  return guarded([&] {
    require(plan, "plan");
    require(args, "args");
    vattn::run_args a;
    a.n_head_q = args->n_head_q;
    a.q = args->q;
    a.kv = to_cpp(args->kv);
    a.out = args->out;
    a.indices = args->indices;
    a.step = args->step;
    a.seq_id = args->seq_id;
    a.index = args->index ? &args->index->ix : nullptr;
    // Layouts agree field for field (checked by the static_asserts and the C API test).
    a.stats = reinterpret_cast<vattn::head_stats*>(args->stats);
    a.profile = reinterpret_cast<vattn::run_profile*>(args->profile);
    plan->p.run(a, workspace, workspace_bytes);
  });
}

vattn_status vattn_predictor_index_create(const vattn_config* cfg, const vattn_plan_params* params,
                                          vattn_predictor_index** out) {
  return guarded([&] {
    require(cfg, "cfg");
    require(params, "params");
    require(out, "out");
    *out = nullptr;
    *out = new vattn_predictor_index{vattn::predictor_index(cfg->cfg, to_cpp(*params))};
  });
}

void vattn_predictor_index_free(vattn_predictor_index* index) {
  delete index;
}

vattn_status vattn_predictor_index_update(vattn_predictor_index* index, const vattn_kv_cache* kv) {
  return guarded([&] {
    require(index, "index");
    require(kv, "kv");
    index->ix.update(to_cpp(*kv));
  });
}

vattn_status vattn_predictor_index_clear(vattn_predictor_index* index) {
  return guarded([&] {
    require(index, "index");
    index->ix.clear();
  });
}

vattn_status vattn_predictor_index_set_projections(vattn_predictor_index* index, const float* w,
                                                   size_t count) {
  return guarded([&] {
    require(index, "index");
    index->ix.set_projections(w, count);
  });
}

vattn_status vattn_predictor_index_load_projections(vattn_predictor_index* index,
                                                    const char* path) {
  return guarded([&] {
    require(index, "index");
    require(path, "path");
    index->ix.load_projections(path);
  });
}

int64_t vattn_predictor_index_tokens(const vattn_predictor_index* index, int32_t slot) {
  int64_t n = -1;
  const vattn_status st = guarded([&] {
    require(index, "index");
    n = index->ix.tokens(slot);
  });
  return st == VATTN_OK ? n : -1;
}

size_t vattn_predictor_index_memory_bytes(const vattn_predictor_index* index) {
  return index ? index->ix.memory_bytes() : 0;
}

}  // extern "C"
