// synth_cmd.cpp: `vattn synth`: writes a synthetic decode problem in the format `vattn check`
// reads, so the checker can be tried (and scripted) without a model.
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cli_common.hpp"
#include "commands.hpp"
#include "core/dtype.hpp"
#include "vattn/safetensors.hpp"
#include "vattn/synth.hpp"

namespace vattn::cli {

namespace {

struct synth_options {
  std::string family = "power_law", out, dtype_name = "bf16";
  int64_t tokens = 8192;
  int32_t n_head_q = 8, n_head_kv = 2, head_dim = 64, n_q = 4;
  uint64_t seed = 1;
};

std::vector<uint16_t> to_16(const std::vector<float>& x, dtype t) {
  std::vector<uint16_t> y(x.size());
  for (size_t i = 0; i < x.size(); ++i)
    y[i] = t == dtype::f16 ? detail::f32_to_f16(x[i]) : detail::f32_to_bf16(x[i]);
  return y;
}

void run_synth(const synth_options& o, bool json) {
  const synth::family fam = synth::family_from_string(o.family);
  const dtype t = dtype_from_string(o.dtype_name);
  if (o.n_q < 1) throw error("--n-q must be >= 1");
  // n_q decode steps over one cache: the same K/V; row i perturbs the family's query by +-2% i
  // per element (a decode step moves the query a little).
  synth::problem p = synth::generate(fam, {o.tokens, o.n_head_q, o.n_head_kv, o.head_dim}, o.seed);
  std::vector<float> q = p.q;
  for (int32_t i = 1; i < o.n_q; ++i) {
    for (size_t j = 0; j < p.q.size(); ++j)
      q.push_back(p.q[j] * (1.0f + 0.02f * float(i) * ((j * 2654435761u >> 7) % 3 == 0 ? 1 : -1)));
  }
  const std::vector<int64_t> kv_shape = {o.tokens, o.n_head_kv, o.head_dim};
  const std::vector<int64_t> q_shape = {o.n_q, o.n_head_q, o.head_dim};
  const std::map<std::string, std::string> meta = {
      {"generator", "vattn synth"}, {"family", o.family}, {"seed", std::to_string(o.seed)}};
  if (t == dtype::f32) {
    io::save(o.out,
             {{"q", "F32", q_shape, q.data(), q.size() * 4},
              {"k", "F32", kv_shape, p.k.data(), p.k.size() * 4},
              {"v", "F32", kv_shape, p.v.data(), p.v.size() * 4}},
             meta);
  } else {
    const std::vector<uint16_t> k = to_16(p.k, t), v = to_16(p.v, t);
    const std::string dt = t == dtype::f16 ? "F16" : "BF16";
    io::save(o.out,
             {{"q", "F32", q_shape, q.data(), q.size() * 4},
              {"k", dt, kv_shape, k.data(), k.size() * 2},
              {"v", dt, kv_shape, v.data(), v.size() * 2}},
             meta);
  }
  if (json) {
    std::printf("{\"command\": \"synth\", \"out\": \"%s\", \"family\": \"%s\"}\n", o.out.c_str(),
                o.family.c_str());
  } else {
    std::printf("wrote %s: q [%d, %d, %d] f32, k and v [%lld, %d, %d] %s (%s, seed %llu)\n",
                o.out.c_str(), o.n_q, o.n_head_q, o.head_dim, (long long)o.tokens, o.n_head_kv,
                o.head_dim, dtype_name(t), o.family.c_str(), (unsigned long long)o.seed);
  }
}

}  // namespace

void add_synth(CLI::App& app, bool& json) {
  auto o = std::make_shared<synth_options>();
  CLI::App* c = app.add_subcommand(
      "synth", "Write a synthetic problem (q, k, v) as safetensors for `vattn check`");
  c->add_option("--out", o->out, "output .safetensors path")->required();
  c->add_option("--family", o->family,
                "heavy_hitters, uniform, power_law, needle, clustered or correlated_values")
      ->capture_default_str();
  c->add_option("--tokens", o->tokens, "cached tokens")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(1) << 24));
  c->add_option("--n-head-q", o->n_head_q, "query heads")->capture_default_str();
  c->add_option("--n-head-kv", o->n_head_kv, "kv heads")->capture_default_str();
  c->add_option("--head-dim", o->head_dim, "head dimension")->capture_default_str();
  c->add_option("--n-q", o->n_q, "query rows (decode steps) over the cache")->capture_default_str();
  c->add_option("--dtype", o->dtype_name, "K/V dtype: f32, f16 or bf16")->capture_default_str();
  c->add_option("--seed", o->seed, "generator seed")->capture_default_str();
  c->callback([o, &json] { run_synth(*o, json); });
}

}  // namespace vattn::cli
