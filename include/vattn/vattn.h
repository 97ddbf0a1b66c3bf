/* vattn.h: the C ABI of vattn (verified sparse attention for LLM decoding). Every call returns a
 * vattn_status; on failure vattn_last_error() gives a message naming the argument at fault.
 * Shapes and strides follow vattn.hpp; all strides are in elements. */
#ifndef VATTN_H
#define VATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum vattn_status {
  VATTN_OK = 0,
  VATTN_ERR_INVALID_ARGUMENT = 1, /* bad shape, config, pointer, or NaN/Inf in q, K or V */
  VATTN_ERR_OUT_OF_MEMORY = 2,
  VATTN_ERR_INTERNAL = 3
} vattn_status;

typedef enum vattn_dtype { VATTN_F32 = 0, VATTN_F16 = 1, VATTN_BF16 = 2 } vattn_dtype;
typedef enum vattn_layout { VATTN_CONTIGUOUS = 0, VATTN_PAGED = 1 } vattn_layout;

/* The message of the last failed call on this thread; a successful call clears it to "". */
const char* vattn_last_error(void);
const char* vattn_version(void);

/* A configuration, made from the "key=value,..." text form (vattn.hpp parse_config), e.g.
 * "method=vattention,eps=0.05,delta=0.05,mode=output". Free with vattn_config_free. */
typedef struct vattn_config vattn_config;
vattn_status vattn_config_parse(const char* text, vattn_config** out);
void vattn_config_free(vattn_config* cfg);
/* Writes the canonical text form into buf (NUL-terminated, truncated to buf_size); *needed gets
 * the full length plus one. buf may be NULL when buf_size is 0. */
vattn_status vattn_config_to_string(const vattn_config* cfg, char* buf, size_t buf_size,
                                    size_t* needed);

typedef struct vattn_plan_params {
  int32_t n_seq_max;
  int32_t n_head_q;
  int32_t n_head_kv;
  int32_t head_dim;
  int64_t n_tokens_max;
  vattn_dtype kv_type;
  int32_t n_threads; /* 0: all hardware threads */
} vattn_plan_params;

/* K/V element (seq s, token t, kv head h, dim d):
 *   contiguous: base + (seq_start[s] + t) * stride_token + h * stride_head + d
 *   paged:      base + page_table[page_start[s] + t / page_size] * stride_page
 *                    + (t % page_size) * stride_token + h * stride_head + d
 * Zero strides take the packed defaults; seq_start NULL means sequences packed back to back. */
typedef struct vattn_kv_cache {
  vattn_layout layout;
  vattn_dtype type;
  int32_t n_head_kv;
  int32_t head_dim;
  const void* k;
  const void* v;
  int64_t stride_token;
  int64_t stride_head;
  int64_t stride_page;
  int32_t n_seq;
  const int32_t* seq_len;   /* [n_seq] */
  const int64_t* seq_start; /* contiguous: [n_seq] or NULL */
  int64_t n_rows;           /* contiguous: rows the buffers hold */
  int32_t page_size;
  const int32_t* page_table;
  const int64_t* page_start; /* paged: [n_seq] */
  int64_t n_pages;
} vattn_kv_cache;

typedef struct vattn_head_stats {
  int64_t n, n_f, n_s, m, b;
  int64_t n_sampled; /* distinct sampled tokens (= b except in hub mode) */
  double density;
  double est_rel_error; /* 0: exact; -1: not estimated (no sampling); see vattn.hpp */
  int64_t bytes_kv;
  int32_t dense_fallback;
} vattn_head_stats;

/* The index of an approximate top-k predictor (config predictor=pages or predictor=signs): one
 * slot per sequence, slot s following sequence s of the caches given to update. Created for
 * n_seq_max slots of n_tokens_max tokens; nothing else allocates. */
typedef struct vattn_predictor_index vattn_predictor_index;
/* params: as for the plan that will use the index (n_head_kv, head_dim and kv_type must match). */
vattn_status vattn_predictor_index_create(const vattn_config* cfg, const vattn_plan_params* params,
                                          vattn_predictor_index** out);
void vattn_predictor_index_free(vattn_predictor_index* index);
/* Appends each slot s < kv->n_seq up to kv->seq_len[s] tokens; a slot holding more tokens than
 * seq_len is rebuilt from token 0. Rejects NaN/Inf keys (every slot of the update is emptied). */
vattn_status vattn_predictor_index_update(vattn_predictor_index* index, const vattn_kv_cache* kv);
/* Every slot back to 0 tokens (e.g. before a slot's sequence is replaced by a longer one). */
vattn_status vattn_predictor_index_clear(vattn_predictor_index* index);
/* predictor=signs only: learned projections f32 [n_head_kv, pred_bits, head_dim] in place of the
 * random ones; count = n_head_kv * pred_bits * head_dim. Clears every slot. */
vattn_status vattn_predictor_index_set_projections(vattn_predictor_index* index, const float* w,
                                                   size_t count);
/* The same from a safetensors file holding "sign_projections" (f32, f16 or bf16). */
vattn_status vattn_predictor_index_load_projections(vattn_predictor_index* index, const char* path);
/* Tokens slot holds; -1 (and vattn_last_error set) on a NULL index or a slot out of range. */
int64_t vattn_predictor_index_tokens(const vattn_predictor_index* index, int32_t slot);
size_t vattn_predictor_index_memory_bytes(const vattn_predictor_index* index); /* 0 on NULL */

/* Where a run's time went, in thread-seconds summed over threads. */
typedef struct vattn_run_profile {
  double select_s; /* predictor or oracle scoring, selection, budget and sampling */
  double attend_s; /* reading the chosen K/V rows and forming the output */
} vattn_run_profile;

/* Zero-initialise it (vattn_run_args a = {0};) before setting fields: a zero field is unset, so
 * code that sets only the fields it knows still builds and runs when fields are appended. */
typedef struct vattn_run_args {
  int32_t n_head_q;
  const float* q; /* [n_seq, n_head_q, head_dim] */
  vattn_kv_cache kv;
  float* out;              /* [n_seq, n_head_q, head_dim] */
  vattn_head_stats* stats; /* optional [n_seq, n_head_q] */
  int32_t* indices;        /* optional [n_seq, n_head_q, n_tokens_max] */
  uint64_t step;
  const int64_t* seq_id; /* optional [n_seq] */
  /* Required when the predictor is not oracle: an index made with the same predictor settings
   * and head shapes whose slot s holds exactly kv.seq_len[s] tokens (update it first). */
  const vattn_predictor_index* index;
  vattn_run_profile* profile; /* optional: run adds to it (it is not reset) */
} vattn_run_args;

typedef struct vattn_plan vattn_plan;
vattn_status vattn_plan_create(const vattn_config* cfg, const vattn_plan_params* params,
                               vattn_plan** out);
void vattn_plan_free(vattn_plan* plan);
size_t vattn_plan_workspace_bytes(const vattn_plan* plan);
/* workspace: vattn_plan_workspace_bytes() bytes, 64-byte aligned; run never allocates. */
vattn_status vattn_plan_run(const vattn_plan* plan, const vattn_run_args* args, void* workspace,
                            size_t workspace_bytes);

#ifdef __cplusplus
}
#endif
#endif /* VATTN_H */
