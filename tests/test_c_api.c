/* test_c_api.c: the C ABI used from C: config parsing, plan, run, statistics and error codes. */
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

int main(void) {
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
  printf("c_api: %d passed, %d failed\n", passed, failures);
  return failures == 0 ? 0 : 1;
}
