/* test_c_api.c: the C ABI used from C: config parsing, plan, run, statistics, error codes, and
 * the approximate predictors' index with run profiling. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vattn/vattn.h"

static int failures = 0, passed = 0;
#define CHECK(cond)                                                            \
  do {                                                                         \
    if (cond) {                                                                \
      ++passed;                                                                \
    } else {                                                                   \
      ++failures;                                                              \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                          \
  } while (0)

static void test_plan_run(void) {
  enum { N = 600, HQ = 4, HKV = 2, D = 16 };
  float* q = malloc(sizeof(float) * HQ * D);
  float* k = malloc(sizeof(float) * N * HKV * D);
  float* v = malloc(sizeof(float) * N * HKV * D);
  float* out = malloc(sizeof(float) * HQ * D);
  unsigned s = 12345u;
  for (int i = 0; i < HQ * D; ++i)
    q[i] = (float)((s = s * 1103515245u + 12345u) % 1000) / 500.f - 1.f;
  for (int i = 0; i < N * HKV * D; ++i) {
    k[i] = (float)((s = s * 1103515245u + 12345u) % 1000) / 500.f - 1.f;
    v[i] = 1.f + (float)((s = s * 1103515245u + 12345u) % 1000) / 1000.f;
  }

  vattn_config* cfg = NULL;
  CHECK(vattn_config_parse("method=vattention,sink=4,local=8,eps=0.2,delta=0.2", &cfg) == VATTN_OK);
  CHECK(cfg != NULL);
  size_t need = 0;
  CHECK(vattn_config_to_string(cfg, NULL, 0, &need) == VATTN_OK);
  CHECK(need > 10);
  char* text = malloc(need);
  CHECK(vattn_config_to_string(cfg, text, need, NULL) == VATTN_OK);
  CHECK(strstr(text, "eps=0.2") != NULL);
  free(text);

  vattn_config* bad = NULL;
  CHECK(vattn_config_parse("method=vattention,eps=2", &bad) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(bad == NULL);
  CHECK(strstr(vattn_last_error(), "eps") != NULL);

  vattn_plan_params pp = {1, HQ, HKV, D, N, VATTN_F32, 1};
  vattn_plan* plan = NULL;
  CHECK(vattn_plan_create(cfg, &pp, &plan) == VATTN_OK);
  size_t ws_bytes = vattn_plan_workspace_bytes(plan);
  CHECK(ws_bytes > 0);
  void* ws = aligned_alloc(64, (ws_bytes + 63) / 64 * 64);

  int32_t len = N;
  vattn_head_stats stats[HQ];
  vattn_run_args a;
  memset(&a, 0, sizeof a);
  a.n_head_q = HQ;
  a.q = q;
  a.kv.layout = VATTN_CONTIGUOUS;
  a.kv.type = VATTN_F32;
  a.kv.n_head_kv = HKV;
  a.kv.head_dim = D;
  a.kv.k = k;
  a.kv.v = v;
  a.kv.n_seq = 1;
  a.kv.seq_len = &len;
  a.kv.n_rows = N;
  a.out = out;
  a.stats = stats;
  CHECK(vattn_plan_run(plan, &a, ws, ws_bytes) == VATTN_OK);
  for (int h = 0; h < HQ; ++h) {
    CHECK(stats[h].n == N);
    CHECK(stats[h].b >= stats[h].m && stats[h].m >= 2);
    CHECK(stats[h].density > 0 && stats[h].density <= 1);
    for (int j = 0; j < D; ++j) CHECK(isfinite(out[h * D + j]) && out[h * D + j] > 0.9f);
  }
  /* errors: wrong head count, too small workspace, null plan */
  a.n_head_q = 3;
  CHECK(vattn_plan_run(plan, &a, ws, ws_bytes) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "n_head_q") != NULL);
  a.n_head_q = HQ;
  CHECK(vattn_plan_run(plan, &a, ws, 8) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "workspace") != NULL);
  CHECK(vattn_plan_run(NULL, &a, ws, ws_bytes) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "plan") != NULL);
  vattn_plan_params bad_pp = {1, 3, 2, D, N, VATTN_F32, 1};
  vattn_plan* bad_plan = NULL;
  CHECK(vattn_plan_create(cfg, &bad_pp, &bad_plan) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "multiple") != NULL);
  CHECK(strlen(vattn_version()) > 0);

  vattn_plan_free(plan);
  vattn_config_free(cfg);
  free(ws);
  free(q);
  free(k);
  free(v);
  free(out);
}

/* --- Predictor index --------------------------------------------------------------------------
 * One sequence of PN tokens; for each query head hq a key planted at PLANT + 8 hq as 4 q[hq]
 * (shared by the two heads of a kv group), which every predictor must put into F. */
enum { PN = 2048, PHQ = 4, PHKV = 2, PD = 64, PLANT = 1000 };
#define PROJ_COUNT ((size_t)PHKV * 64 * PD) /* n_head_kv * pred_bits * head_dim for bits=64 */

static unsigned rng_state = 2024u;
static float uniform(void) { /* in [-1, 1) from the high bits of an LCG */
  rng_state = rng_state * 1664525u + 1013904223u;
  return (float)(rng_state >> 8) / 8388608.f - 1.f;
}

typedef struct problem {
  float *q, *k, *v;
  int32_t len;
  vattn_plan_params pp;
} problem;

static problem make_problem(void) {
  problem p;
  p.q = malloc(sizeof(float) * PHQ * PD);
  p.k = malloc(sizeof(float) * PN * PHKV * PD);
  p.v = malloc(sizeof(float) * PN * PHKV * PD);
  for (int i = 0; i < PHQ * PD; ++i) p.q[i] = uniform();
  for (int i = 0; i < PN * PHKV * PD; ++i) p.k[i] = uniform(), p.v[i] = uniform();
  for (int hq = 0; hq < PHQ; ++hq) {
    const int kvh = hq / (PHQ / PHKV);
    float* row = p.k + ((int64_t)(PLANT + 8 * hq) * PHKV + kvh) * PD;
    for (int j = 0; j < PD; ++j) row[j] = 4.f * p.q[hq * PD + j];
  }
  p.len = PN;
  vattn_plan_params pp = {2, PHQ, PHKV, PD, PN, VATTN_F32, 2};
  p.pp = pp;
  return p;
}

static vattn_kv_cache problem_kv(const problem* p) {
  vattn_kv_cache kv = {0};
  kv.layout = VATTN_CONTIGUOUS;
  kv.type = VATTN_F32;
  kv.n_head_kv = PHKV;
  kv.head_dim = PD;
  kv.k = p->k;
  kv.v = p->v;
  kv.n_seq = 1;
  kv.seq_len = &p->len;
  kv.n_rows = PN;
  return kv;
}

/* The outputs of one run. */
typedef struct result {
  float out[PHQ * PD];
  vattn_head_stats stats[PHQ];
  int32_t indices[PHQ * PN];
  vattn_run_profile prof;
  int64_t bytes_kv; /* summed over heads */
} result;

/* Plans `text` and runs it with `index` (may be NULL); r->prof starts at zero. */
static vattn_status run_config(const problem* p, const char* text,
                               const vattn_predictor_index* index, result* r) {
  vattn_config* cfg = NULL;
  vattn_plan* plan = NULL;
  CHECK(vattn_config_parse(text, &cfg) == VATTN_OK);
  CHECK(vattn_plan_create(cfg, &p->pp, &plan) == VATTN_OK);
  const size_t ws_bytes = vattn_plan_workspace_bytes(plan);
  void* ws = aligned_alloc(64, (ws_bytes + 63) / 64 * 64);
  memset(r, 0, sizeof *r);
  vattn_run_args a = {0};
  a.n_head_q = PHQ;
  a.q = p->q;
  a.kv = problem_kv(p);
  a.out = r->out;
  a.stats = r->stats;
  a.indices = r->indices;
  a.index = index;
  a.profile = &r->prof;
  const vattn_status st = vattn_plan_run(plan, &a, ws, ws_bytes);
  for (int h = 0; h < PHQ; ++h) r->bytes_kv += r->stats[h].bytes_kv;
  free(ws);
  vattn_plan_free(plan);
  vattn_config_free(cfg);
  return st;
}

/* A successful sparse run: finite output, statistics, the planted keys in F, a profile. */
static void check_result(const result* r) {
  for (int i = 0; i < PHQ * PD; ++i) CHECK(isfinite(r->out[i]));
  for (int hq = 0; hq < PHQ; ++hq) {
    const vattn_head_stats* st = &r->stats[hq];
    CHECK(st->n == PN);
    CHECK(st->dense_fallback == 0);
    CHECK(st->n_f >= 128 + 128 + PN / 20); /* sink, local, top-k 5% */
    CHECK(st->n_f + st->n_s == PN);
    CHECK(st->b >= st->m && st->m >= 2);
    CHECK(st->bytes_kv > 0);
    int found = 0;
    const int32_t* f = r->indices + (int64_t)hq * PN;
    for (int64_t i = 0; i < st->n_f; ++i) found |= f[i] == PLANT + 8 * hq;
    CHECK(found);
  }
  CHECK(r->prof.select_s >= 0 && r->prof.attend_s >= 0);
  CHECK(r->prof.select_s + r->prof.attend_s > 0);
}

/* Writes w as the f32 tensor "sign_projections" [PHKV, 64, PD] of a safetensors file. */
static int write_projections(const char* path, const float* w) {
  char header[160];
  int len = snprintf(header, sizeof header,
                     "{\"sign_projections\":{\"dtype\":\"F32\",\"shape\":[%d,64,%d],"
                     "\"data_offsets\":[0,%zu]}}",
                     PHKV, PD, PROJ_COUNT * sizeof(float));
  while (len % 8 != 0) header[len++] = ' ';
  unsigned char size[8];
  for (int i = 0; i < 8; ++i) size[i] = (unsigned char)((uint64_t)len >> (8 * i));
  FILE* f = fopen(path, "wb");
  if (!f) return 0;
  int ok = fwrite(size, 1, 8, f) == 8 && fwrite(header, 1, (size_t)len, f) == (size_t)len;
  for (size_t i = 0; ok && i < PROJ_COUNT; ++i) { /* little-endian f32 */
    uint32_t u;
    memcpy(&u, &w[i], 4);
    unsigned char b[4] = {(unsigned char)u, (unsigned char)(u >> 8), (unsigned char)(u >> 16),
                          (unsigned char)(u >> 24)};
    ok = fwrite(b, 1, 4, f) == 4;
  }
  return fclose(f) == 0 && ok;
}

static void test_predictor_index(void) {
  problem p = make_problem();
  const vattn_kv_cache kv = problem_kv(&p);
  static result oracle, r, r2;
  CHECK(run_config(&p, "method=vattention", NULL, &oracle) == VATTN_OK);
  check_result(&oracle);

  /* sign bits */
  const char* signs = "method=vattention,predictor=signs,bits=64";
  vattn_config* cfg = NULL;
  CHECK(vattn_config_parse(signs, &cfg) == VATTN_OK);
  vattn_predictor_index* ix = NULL;
  CHECK(vattn_predictor_index_create(cfg, &p.pp, &ix) == VATTN_OK);
  CHECK(ix != NULL);
  CHECK(vattn_predictor_index_memory_bytes(ix) >= (size_t)2 * PHKV * PN * 8);
  CHECK(vattn_predictor_index_tokens(ix, 0) == 0);
  CHECK(vattn_predictor_index_update(ix, &kv) == VATTN_OK);
  CHECK(vattn_predictor_index_tokens(ix, 0) == PN);
  CHECK(vattn_predictor_index_tokens(ix, 1) == 0);
  CHECK(strcmp(vattn_last_error(), "") == 0);
  CHECK(vattn_predictor_index_tokens(ix, 2) == -1);
  CHECK(strstr(vattn_last_error(), "slot") != NULL);
  CHECK(vattn_predictor_index_tokens(ix, -1) == -1);

  CHECK(run_config(&p, signs, ix, &r) == VATTN_OK);
  check_result(&r);
  CHECK(r.bytes_kv < oracle.bytes_kv);
  /* the index is required, and must be of the plan's predictor */
  CHECK(run_config(&p, signs, NULL, &r2) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "index") != NULL);
  CHECK(run_config(&p, "method=vattention,predictor=signs,bits=128", ix, &r2) ==
        VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "pred_bits") != NULL);

  /* update errors name the field */
  vattn_kv_cache bad = kv;
  bad.type = VATTN_F16;
  CHECK(vattn_predictor_index_update(ix, &bad) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "kv.type") != NULL);
  bad = kv;
  bad.head_dim = PD / 2;
  CHECK(vattn_predictor_index_update(ix, &bad) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "kv.head_dim") != NULL);
  CHECK(vattn_predictor_index_tokens(ix, 0) == PN); /* a rejected update leaves the index */

  /* learned projections: set, then the same from a file, give the same run */
  float* w = malloc(sizeof(float) * PROJ_COUNT);
  for (size_t i = 0; i < PROJ_COUNT; ++i) w[i] = uniform();
  CHECK(vattn_predictor_index_set_projections(ix, w, PROJ_COUNT - 1) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "count") != NULL);
  CHECK(vattn_predictor_index_set_projections(ix, w, PROJ_COUNT) == VATTN_OK);
  CHECK(vattn_predictor_index_tokens(ix, 0) == 0); /* the signatures were stale */
  CHECK(run_config(&p, signs, ix, &r2) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "update") != NULL);
  CHECK(vattn_predictor_index_update(ix, &kv) == VATTN_OK);
  CHECK(run_config(&p, signs, ix, &r) == VATTN_OK);
  check_result(&r);

  const char* path = "test_c_api_projections.safetensors";
  CHECK(write_projections(path, w));
  vattn_predictor_index* loaded = NULL;
  CHECK(vattn_predictor_index_create(cfg, &p.pp, &loaded) == VATTN_OK);
  CHECK(vattn_predictor_index_load_projections(loaded, path) == VATTN_OK);
  CHECK(vattn_predictor_index_update(loaded, &kv) == VATTN_OK);
  CHECK(run_config(&p, signs, loaded, &r2) == VATTN_OK);
  CHECK(memcmp(r.out, r2.out, sizeof r.out) == 0);
  CHECK(memcmp(r.stats, r2.stats, sizeof r.stats) == 0);
  remove(path);
  CHECK(vattn_predictor_index_load_projections(loaded, path) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), path) != NULL);
  CHECK(vattn_predictor_index_clear(loaded) == VATTN_OK);
  CHECK(vattn_predictor_index_tokens(loaded, 0) == 0);
  vattn_predictor_index_free(loaded);

  /* page bounds */
  const char* pages = "method=vattention,predictor=pages,pred_page=8";
  vattn_config* pcfg = NULL;
  CHECK(vattn_config_parse(pages, &pcfg) == VATTN_OK);
  vattn_predictor_index* pix = NULL;
  CHECK(vattn_predictor_index_create(pcfg, &p.pp, &pix) == VATTN_OK);
  CHECK(vattn_predictor_index_update(pix, &kv) == VATTN_OK);
  CHECK(run_config(&p, pages, pix, &r) == VATTN_OK);
  check_result(&r);
  CHECK(r.bytes_kv < oracle.bytes_kv);
  CHECK(run_config(&p, signs, pix, &r2) == VATTN_ERR_INVALID_ARGUMENT); /* wrong predictor */
  CHECK(strstr(vattn_last_error(), "predictor") != NULL);
  CHECK(vattn_predictor_index_set_projections(pix, w, PROJ_COUNT) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "signs") != NULL);

  /* an oracle config has no index */
  vattn_config* ocfg = NULL;
  CHECK(vattn_config_parse("method=vattention", &ocfg) == VATTN_OK);
  vattn_predictor_index* none = NULL;
  CHECK(vattn_predictor_index_create(ocfg, &p.pp, &none) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(none == NULL);
  CHECK(strstr(vattn_last_error(), "predictor") != NULL);

  /* null arguments */
  CHECK(vattn_predictor_index_create(NULL, &p.pp, &none) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "cfg") != NULL);
  CHECK(vattn_predictor_index_create(cfg, NULL, &none) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "params") != NULL);
  CHECK(vattn_predictor_index_create(cfg, &p.pp, NULL) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "out") != NULL);
  CHECK(vattn_predictor_index_update(NULL, &kv) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "index") != NULL);
  CHECK(vattn_predictor_index_update(ix, NULL) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "kv") != NULL);
  CHECK(vattn_predictor_index_clear(NULL) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(vattn_predictor_index_set_projections(NULL, w, PROJ_COUNT) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(vattn_predictor_index_set_projections(ix, NULL, PROJ_COUNT) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "w is null") != NULL);
  CHECK(vattn_predictor_index_load_projections(NULL, path) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(vattn_predictor_index_load_projections(ix, NULL) == VATTN_ERR_INVALID_ARGUMENT);
  CHECK(strstr(vattn_last_error(), "path") != NULL);
  CHECK(vattn_predictor_index_tokens(NULL, 0) == -1);
  CHECK(strstr(vattn_last_error(), "index") != NULL);
  CHECK(vattn_predictor_index_memory_bytes(NULL) == 0);
  vattn_predictor_index_free(NULL);
  CHECK(vattn_predictor_index_tokens(ix, 0) == PN); /* untouched by the failed calls */

  free(w);
  vattn_predictor_index_free(pix);
  vattn_predictor_index_free(ix);
  vattn_config_free(ocfg);
  vattn_config_free(pcfg);
  vattn_config_free(cfg);
  free(p.q);
  free(p.k);
  free(p.v);
}

int main(void) {
  test_plan_run();
  test_predictor_index();
  printf("c_api: %d passed, %d failed\n", passed, failures);
  return failures == 0 ? 0 : 1;
}
