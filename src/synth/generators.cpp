// generators.cpp: the synthetic attention families of vattn/synth.hpp, built on a self-contained
// RNG (splitmix64 + xoshiro256**) so a (family, shape, seed) gives the same bytes everywhere.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <mutex>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include "vattn/synth.hpp"
#include "vattn/vattn.hpp"

// Bit-identical results need every a * b + c rounded twice: forbid FMA contraction, which
// clang (within expressions) and GCC (C++ in any mode) apply wherever the target has FMA.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#elif defined(_MSC_VER)
#pragma fp_contract(off)
#endif

namespace vattn::synth {
namespace {

// ------------------------------------------------------------------------------------------
// Random numbers. Integer streams are exact everywhere; floating results use only +, -, *, /,
// sqrt (correctly rounded in IEEE 754) and det_log below, never libm's log/exp/cos.

constexpr uint64_t k_golden = 0x9e3779b97f4a7c15ULL;

uint64_t mix64(uint64_t z) {  // splitmix64 finaliser
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Key of an independent stream, from the seed and a path of small integers.
uint64_t stream_key(uint64_t seed, std::initializer_list<uint64_t> path) {
  uint64_t h = mix64(seed + k_golden);
  for (uint64_t p : path) h = mix64(h ^ mix64(p + k_golden));
  return h;
}

// High 64 bits of a 64x64 product, portable (no __int128).
uint64_t mulhi64(uint64_t a, uint64_t b) {
  const uint64_t a_lo = a & 0xffffffffULL, a_hi = a >> 32;
  const uint64_t b_lo = b & 0xffffffffULL, b_hi = b >> 32;
  const uint64_t ll = a_lo * b_lo, hl = a_hi * b_lo, lh = a_lo * b_hi, hh = a_hi * b_hi;
  const uint64_t cross = (ll >> 32) + (hl & 0xffffffffULL) + lh;  // cannot overflow
  return hh + (hl >> 32) + (cross >> 32);
}

// Natural log from +, -, *, / only: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), then
// log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its series (error < 1e-16).
double det_log(double x) {
  int e = 0;
  double m = std::frexp(x, &e);  // exact
  if (m < 0.70710678118654752) {
    m *= 2;
    --e;
  }
  const double s = (m - 1) / (m + 1), z = s * s;
  // 1/3 + z/5 + ... + z^11/25, folded at compile time (correctly rounded everywhere).
  constexpr double inv_odd[] = {1.0 / 3,  1.0 / 5,  1.0 / 7,  1.0 / 9,  1.0 / 11, 1.0 / 13,
                                1.0 / 15, 1.0 / 17, 1.0 / 19, 1.0 / 21, 1.0 / 23, 1.0 / 25};
  double poly = inv_odd[11];
  for (int k = 10; k >= 0; --k) poly = inv_odd[k] + z * poly;
  constexpr double ln2_hi = 0.693147180369123816490, ln2_lo = 1.90821492927058770002e-10;
  return e * ln2_hi + (2 * s + (e * ln2_lo + 2 * s * z * poly));
}

class rng {  // xoshiro256**, seeded through splitmix64
 public:
  explicit rng(uint64_t key) {
    for (uint64_t& w : s_) {
      key += k_golden;
      w = mix64(key);
    }
  }
  uint64_t next() {
    const uint64_t r = rotl(s_[1] * 5, 7) * 9, t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return r;
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  uint64_t below(uint64_t n) { return mulhi64(next(), n); }  // [0, n); bias n / 2^64
  bool chance(double p) { return uniform() < p; }
  // Exact N(0, 1) by Marsaglia's polar method: for per-token logits, where tails matter.
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double a, b, r2;
    do {
      a = 2 * uniform() - 1;
      b = 2 * uniform() - 1;
      r2 = a * a + b * b;
    } while (r2 >= 1 || r2 == 0);
    const double f = std::sqrt(-2 * det_log(r2) / r2);
    spare_ = b * f;
    has_spare_ = true;
    return a * f;
  }
  // Approximate N(0, 1) for the bulk K/V noise, where speed matters: each is the sum of four
  // random bytes (Irwin-Hall shape: bounded at +-3.45, excess kurtosis -0.3, steps of 0.007),
  // two per 64-bit draw, summed in parallel within the word.
  void fast_normals(float* out, int32_t count) {
    constexpr float inv_sd = 6.765875e-03f;  // 1 / sqrt(4 * (256^2 - 1) / 12)
    for (int32_t c = 0; c < count; c += 2) {
      const uint64_t x = next();
      const uint64_t pairs = (x & 0x00ff00ff00ff00ffULL) + ((x >> 8) & 0x00ff00ff00ff00ffULL);
      const uint64_t quads =
          (pairs & 0x0000ffff0000ffffULL) + ((pairs >> 16) & 0x0000ffff0000ffffULL);
      out[c] = static_cast<float>(static_cast<int32_t>(quads & 0xffffffffULL) - 510) * inv_sd;
      if (c + 1 < count)
        out[c + 1] = static_cast<float>(static_cast<int32_t>(quads >> 32) - 510) * inv_sd;
    }
  }

 private:
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
  double spare_ = 0;
  bool has_spare_ = false;
};

// ------------------------------------------------------------------------------------------
// Model parameters.

constexpr double k_tau_lo = 0.7, k_tau_hi = 1.3;      // per-query-head temperature of the bulk
constexpr double k_alpha_lo = 0.6, k_alpha_hi = 1.2;  // power_law: the temperature is alpha
constexpr double k_spike_gain_lo = 0.95, k_spike_gain_hi = 1.05;
constexpr double k_shift = 2.0;       // |constant logit shift| through the outlier channels
constexpr double k_q_noise = 0.2;     // per-channel query noise: logit noise sd ~0.2
constexpr float k_v_noise = 1.0f;     // per-channel value noise
constexpr double k_hh_rate = 0.01;    // heavy hitters: fraction of positions
constexpr double k_sink_logit = 8.0;  // heavy hitters: position 0
constexpr double k_corr_beta = 1.0;   // correlated_values: value shift per unit of z
constexpr int k_n_clusters = 8;
constexpr int64_t k_block = 1024;  // tokens per K/V work unit (own stream: thread-count free)

// Stream tags; correlated_values reuses heavy_hitters' streams (identical q and K).
enum tag : uint64_t { tag_head = 1, tag_logits = 2, tag_query = 3, tag_kv = 4 };

struct kv_model {
  std::vector<double> u;       // bulk logit direction (unit)
  std::vector<double> ws;      // spike logit direction (unit, orthogonal to u; empty if d < 2)
  std::vector<double> offset;  // constant key offsets: nonzero on the outlier channels only
  std::vector<char> outlier;   // channel is an outlier channel
  std::vector<double> mu;      // value mean
  std::vector<double> wv;      // correlated_values: value direction (unit)
  std::vector<std::vector<double>> centres;  // clustered: key offsets of the cluster centres
  std::vector<float> bulk, spike;            // per-token targets t_i, p_i
  std::vector<float> vz;                     // correlated_values: beta * z_i
  std::vector<uint8_t> cluster;              // clustered: cluster of token i
};

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// A random unit vector, zero on the outlier channels and orthogonal to `against` (unit
// vectors). Returns all zeros when no direction is left (tiny head_dim).
std::vector<double> random_direction(rng& r, const std::vector<char>& outlier,
                                     std::initializer_list<const std::vector<double>*> against) {
  const size_t d = outlier.size();
  std::vector<double> x(d);
  for (size_t c = 0; c < d; ++c) x[c] = outlier[c] ? 0.0 : r.normal();
  for (int pass = 0; pass < 2; ++pass) {  // Gram-Schmidt, re-orthogonalised once for accuracy
    for (const std::vector<double>* a : against) {
      if (a->empty()) continue;
      const double p = dot(x, *a);
      for (size_t c = 0; c < d; ++c) x[c] -= p * (*a)[c];
    }
  }
  const double norm = std::sqrt(dot(x, x));
  if (!(norm > 1e-9)) return std::vector<double>(d, 0.0);
  for (double& c : x) c /= norm;
  return x;
}

family stream_family(family f) {
  return f == family::correlated_values ? family::heavy_hitters : f;
}

// Directions, offsets and per-token targets of kv head g.
void build_kv_model(family f, const shape& s, uint64_t seed, int32_t g, kv_model& m) {
  const int32_t d = s.head_dim;
  const int64_t n = s.n_tokens;
  const uint64_t fam = static_cast<uint64_t>(stream_family(f));
  rng r(stream_key(seed, {fam, tag_head, static_cast<uint64_t>(g)}));

  // Outlier channels: a few, only where enough channels remain for the signal directions.
  m.outlier.assign(d, 0);
  m.offset.assign(d, 0.0);
  const int32_t n_out = d >= 16 ? std::max(1, d / 32) : 0;
  std::vector<int32_t> channels(d);
  for (int32_t c = 0; c < d; ++c) channels[c] = c;
  for (int32_t j = 0; j < n_out; ++j) {  // partial Fisher-Yates
    std::swap(channels[j], channels[j + r.below(d - j)]);
    const int32_t c = channels[j];
    m.outlier[c] = 1;
    m.offset[c] = (r.chance(0.5) ? 1 : -1) * r.uniform(8, 15);
  }
  m.u = random_direction(r, m.outlier, {});
  m.ws = random_direction(r, m.outlier, {&m.u});
  if (dot(m.ws, m.ws) == 0) m.ws.clear();

  // Values: mean with norm 0.6-1.4 times the noise norm sqrt(d) * k_v_noise.
  const std::vector<char> none(d, 0);
  m.mu = random_direction(r, none, {});
  const double mu_norm = r.uniform(0.6, 1.4) * k_v_noise * std::sqrt(static_cast<double>(d));
  for (double& c : m.mu) c *= mu_norm;
  if (f == family::correlated_values) {
    std::vector<double> mu_unit = m.mu;
    for (double& c : mu_unit) c /= mu_norm;
    m.wv = random_direction(r, none, {&mu_unit});
    if (dot(m.wv, m.wv) == 0) m.wv = mu_unit;  // head_dim 1
  }

  // Per-token targets, from their own stream.
  rng t(stream_key(seed, {fam, tag_logits, static_cast<uint64_t>(g)}));
  m.bulk.assign(n, 0.0f);
  m.spike.assign(n, 0.0f);
  switch (f) {
    case family::heavy_hitters:
    case family::correlated_values:
      for (int64_t i = 0; i < n; ++i) {
        m.bulk[i] = static_cast<float>(t.normal());
        const bool hit = t.chance(k_hh_rate);
        const double height = t.uniform(5, 8);  // always drawn: the stream stays aligned
        m.spike[i] = static_cast<float>(i == 0 ? k_sink_logit : hit ? height : 0.0);
      }
      break;
    case family::uniform:
      for (int64_t i = 0; i < n; ++i) m.bulk[i] = static_cast<float>(0.3 * t.normal());
      break;
    case family::power_law: {
      std::vector<int64_t> rank(n);  // a random permutation of 1..n over the positions
      for (int64_t i = 0; i < n; ++i) rank[i] = i + 1;
      for (int64_t i = n - 1; i > 0; --i) std::swap(rank[i], rank[t.below(i + 1)]);
      for (int64_t i = 0; i < n; ++i)
        m.bulk[i] = static_cast<float>(4.0 - det_log(static_cast<double>(rank[i])));
      break;
    }
    case family::needle: {
      for (int64_t i = 0; i < n; ++i) m.bulk[i] = static_cast<float>(t.normal());
      const int64_t pos = n > 1 ? 1 + static_cast<int64_t>(t.below(n - 1)) : 0;
      const double height = std::clamp(det_log(static_cast<double>(n)) + 2.5, 8.0, 13.0);
      m.spike[pos] = static_cast<float>(height);
      break;
    }
    case family::clustered: {
      const int32_t nc = static_cast<int32_t>(std::min<int64_t>(k_n_clusters, n));
      const int32_t hot = static_cast<int32_t>(t.below(nc));
      std::vector<double> level(nc);
      for (int32_t c = 0; c < nc; ++c) level[c] = c == hot ? 4.0 : t.uniform(-2, 1);
      // Centres off the logit directions, with a norm like the key noise's: visible clusters.
      m.centres.resize(nc);
      for (int32_t c = 0; c < nc; ++c) {
        m.centres[c] = random_direction(r, m.outlier, {&m.u, &m.ws});
        for (double& x : m.centres[c]) x *= 0.8 * std::sqrt(static_cast<double>(d));
      }
      m.cluster.assign(n, 0);
      for (int64_t i = 0; i < n; ++i) {
        const int32_t c = static_cast<int32_t>(t.below(nc));
        m.cluster[i] = static_cast<uint8_t>(c);
        m.bulk[i] = static_cast<float>(level[c] + 0.5 * t.normal());
      }
      break;
    }
  }

  if (f == family::correlated_values) {  // beta * standardised target logit
    double sum = 0, sum2 = 0;
    for (int64_t i = 0; i < n; ++i) sum += double{m.bulk[i]} + m.spike[i];
    const double mean = sum / n;
    for (int64_t i = 0; i < n; ++i) {
      const double x = double{m.bulk[i]} + m.spike[i] - mean;
      sum2 += x * x;
    }
    const double sd = std::sqrt(sum2 / n);
    m.vz.assign(n, 0.0f);
    if (sd > 0) {
      for (int64_t i = 0; i < n; ++i)
        m.vz[i] = static_cast<float>(k_corr_beta * (double{m.bulk[i]} + m.spike[i] - mean) / sd);
    }
  }
}

// Dot product of float rows with eight partial sums in a fixed order: fast (the compiler may
// vectorise it) and still the same bits everywhere.
float dot8(const float* a, const float* b, int32_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int32_t c = 0;
  for (; c + 8 <= d; c += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[c + j] * b[c + j];
  for (int j = 0; c < d; ++c, ++j) acc[j] += a[c] * b[c];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

std::vector<float> to_float(const std::vector<double>& x, size_t d) {
  std::vector<float> out(d, 0.0f);  // zeros stand in for an absent direction
  for (size_t c = 0; c < x.size(); ++c) out[c] = static_cast<float>(x[c]);
  return out;
}

// Float copies of a kv head's rows for the K/V loops. Absent terms are zero rows, so one
// branch-free formula serves every family.
struct kv_rows {
  std::vector<float> u, ws, off, mu, wv, zero;
  std::vector<std::vector<float>> centres;
  explicit kv_rows(const kv_model& m, int32_t d)
      : u(to_float(m.u, d)),
        ws(to_float(m.ws, d)),
        off(to_float(m.offset, d)),
        mu(to_float(m.mu, d)),
        wv(to_float(m.wv, d)),
        zero(d, 0.0f) {
    for (const std::vector<double>& c : m.centres) centres.push_back(to_float(c, d));
  }
};

// The elementwise parts of a key and a value row (restrict parameters: GCC honours them only
// here, and then vectorises the 8-wide chunks at -O2 without changing the arithmetic).
void key_row(size_t d, float rho, float a, float b, float t, float p, const float* __restrict nk,
             const float* __restrict u, const float* __restrict ws, const float* __restrict off,
             const float* __restrict cen, float* __restrict out) {
  const size_t d8 = d / 8 * 8;
  for (size_t c = 0; c < d8; c += 8) {
    for (size_t j = 0; j < 8; ++j) {
      const size_t x = c + j;
      out[x] = rho * (nk[x] - a * u[x] - b * ws[x]) + (t * u[x] + p * ws[x] + off[x] + cen[x]);
    }
  }
  for (size_t c = d8; c < d; ++c)
    out[c] = rho * (nk[c] - a * u[c] - b * ws[c]) + (t * u[c] + p * ws[c] + off[c] + cen[c]);
}

void value_row(size_t d, float z, const float* __restrict nv, const float* __restrict mu,
               const float* __restrict wv, float* __restrict out) {
  const size_t d8 = d / 8 * 8;
  for (size_t c = 0; c < d8; c += 8)
    for (size_t j = 0; j < 8; ++j) out[c + j] = mu[c + j] + k_v_noise * nv[c + j] + z * wv[c + j];
  for (size_t c = d8; c < d; ++c) out[c] = mu[c] + k_v_noise * nv[c] + z * wv[c];
}

// Key and value of token i of kv head g; nk and nv are scratch rows.
void fill_token(const kv_model& m, const kv_rows& w, const shape& s, int32_t g, int64_t i, rng& r,
                float* nk, float* nv, float* k, float* v) {
  const int32_t d = s.head_dim;
  const bool has_ws = !m.ws.empty();
  const auto rho = static_cast<float>(r.uniform(0.7, 1.3));  // key norm variation
  r.fast_normals(nk, d);
  r.fast_normals(nv, d);
  // Key noise orthogonal to the logit directions, so the targets set the logits.
  const float a = dot8(nk, w.u.data(), d), b = dot8(nk, w.ws.data(), d);
  const float t = has_ws ? m.bulk[i] : m.bulk[i] + m.spike[i], p = has_ws ? m.spike[i] : 0.0f;
  const float* cen = w.centres.empty() ? w.zero.data() : w.centres[m.cluster[i]].data();
  const int64_t row = (i * s.n_head_kv + g) * d;
  key_row(d, rho, a, b, t, p, nk, w.u.data(), w.ws.data(), w.off.data(), cen, k + row);
  value_row(d, m.vz.empty() ? 0.0f : m.vz[i], nv, w.mu.data(), w.wv.data(), v + row);
}

// Query head h over its kv head's model: temperature, spike gain, constant shift, noise.
void fill_query(family f, const shape& s, uint64_t seed, int32_t h, const kv_model& m, float* q) {
  const int32_t d = s.head_dim;
  const uint64_t fam = static_cast<uint64_t>(stream_family(f));
  rng r(stream_key(seed, {fam, tag_query, static_cast<uint64_t>(h)}));
  const double tau =
      f == family::power_law ? r.uniform(k_alpha_lo, k_alpha_hi) : r.uniform(k_tau_lo, k_tau_hi);
  const double gain = r.uniform(k_spike_gain_lo, k_spike_gain_hi);
  const double shift = r.uniform(-k_shift, k_shift);
  const double inv_scale = std::sqrt(static_cast<double>(d));  // scale * (1/scale) = 1
  std::vector<double> x(d);
  for (int32_t c = 0; c < d; ++c) x[c] = m.outlier[c] ? 0.0 : k_q_noise * r.normal();
  const double a = dot(x, m.u), b = m.ws.empty() ? 0.0 : dot(x, m.ws);
  const double off2 = dot(m.offset, m.offset);
  // Along the offsets: scale * <q, offset> = shift for every token.
  const double lambda = off2 > 0 ? shift * inv_scale / off2 : 0.0;
  for (int32_t c = 0; c < d; ++c) {
    double y = x[c] - a * m.u[c] + tau * inv_scale * m.u[c] + lambda * m.offset[c];
    if (!m.ws.empty()) y += (gain * inv_scale - b) * m.ws[c];
    q[static_cast<int64_t>(h) * d + c] = static_cast<float>(y);
  }
}

// Runs body(0..count-1) on a few threads; results do not depend on the thread count. The first
// exception (bad_alloc) is rethrown here: it must not escape a thread.
void parallel_for(int64_t count, bool small, const std::function<void(int64_t)>& body) {
  const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t n_threads = small ? 1 : std::min<int64_t>({hw, count, 16});
  if (n_threads <= 1) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::mutex mutex;
  std::exception_ptr first;
  auto worker = [&] {
    try {
      for (int64_t i; (i = next.fetch_add(1)) < count;) body(i);
    } catch (...) {
      next = count;
      std::lock_guard<std::mutex> lock(mutex);
      if (!first) first = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  try {
    for (int64_t t = 1; t < n_threads; ++t) pool.emplace_back(worker);
  } catch (const std::system_error&) {  // no more threads: the started ones and this one suffice
  }
  worker();
  for (std::thread& t : pool) t.join();
  if (first) std::rethrow_exception(first);
}

void validate(const shape& s) {
  auto fail = [](const std::string& what) { throw vattn::error("synth::generate: " + what); };
  if (s.n_tokens < 1) fail("n_tokens must be >= 1, got " + std::to_string(s.n_tokens));
  if (s.n_head_q < 1) fail("n_head_q must be >= 1, got " + std::to_string(s.n_head_q));
  if (s.n_head_kv < 1) fail("n_head_kv must be >= 1, got " + std::to_string(s.n_head_kv));
  if (s.n_head_q % s.n_head_kv != 0) {
    fail("n_head_q (" + std::to_string(s.n_head_q) + ") must be a multiple of n_head_kv (" +
         std::to_string(s.n_head_kv) + ")");
  }
  if (s.head_dim < 1) fail("head_dim must be >= 1, got " + std::to_string(s.head_dim));
  const int64_t row = int64_t{s.n_head_kv} * s.head_dim;
  constexpr int64_t max_elems = int64_t{1} << 40;  // 4 TiB of floats: a typo, not a cache
  if (int64_t{s.n_head_q} * s.head_dim > max_elems || s.n_tokens > max_elems / row) {
    fail("shape too large to allocate: n_tokens " + std::to_string(s.n_tokens) + ", n_head_q " +
         std::to_string(s.n_head_q) + ", n_head_kv " + std::to_string(s.n_head_kv) + ", head_dim " +
         std::to_string(s.head_dim));
  }
}

constexpr const char* k_names[] = {"heavy_hitters", "uniform",   "power_law",
                                   "needle",        "clustered", "correlated_values"};
constexpr int32_t k_n_families = sizeof(k_names) / sizeof(k_names[0]);

}  // namespace

const char* family_name(family f) {
  const auto i = static_cast<int32_t>(f);
  return i >= 0 && i < k_n_families ? k_names[i] : "unknown";
}

family family_from_string(std::string_view s) {
  for (int32_t i = 0; i < k_n_families; ++i)
    if (s == k_names[i]) return static_cast<family>(i);
  std::string valid;
  for (int32_t i = 0; i < k_n_families; ++i) valid += std::string(i ? ", " : "") + k_names[i];
  throw vattn::error("unknown synthetic family '" + std::string(s) + "'; valid: " + valid);
}

const std::vector<family>& all_families() {
  static const std::vector<family> all = [] {
    std::vector<family> v;
    for (int32_t i = 0; i < k_n_families; ++i) v.push_back(static_cast<family>(i));
    return v;
  }();
  return all;
}

problem generate(family f, const shape& s, uint64_t seed) {
  const auto fi = static_cast<int32_t>(f);
  if (fi < 0 || fi >= k_n_families) {
    throw vattn::error("synth::generate: unknown family value " + std::to_string(fi));
  }
  validate(s);
  const int32_t d = s.head_dim, n_kv = s.n_head_kv;
  const int64_t n = s.n_tokens;
  problem p;
  p.shp = s;
  p.q.resize(static_cast<size_t>(s.n_head_q) * d);
  p.k.resize(static_cast<size_t>(n) * n_kv * d);
  p.v.resize(static_cast<size_t>(n) * n_kv * d);

  std::vector<kv_model> models(n_kv);
  const bool small = n * n_kv * d < (int64_t{1} << 18);
  parallel_for(n_kv, small,
               [&](int64_t g) { build_kv_model(f, s, seed, static_cast<int32_t>(g), models[g]); });

  // Each kv head has its own stream per block of tokens; a work unit is one block over all kv
  // heads, so its writes are contiguous.
  std::vector<kv_rows> rows;
  for (const kv_model& m : models) rows.emplace_back(m, d);
  const int64_t n_blocks = (n + k_block - 1) / k_block;
  const uint64_t fam = static_cast<uint64_t>(stream_family(f));
  parallel_for(n_blocks, small, [&](int64_t blk) {
    std::vector<rng> streams;
    for (int32_t g = 0; g < n_kv; ++g) {
      streams.emplace_back(
          stream_key(seed, {fam, tag_kv, static_cast<uint64_t>(g), static_cast<uint64_t>(blk)}));
    }
    std::vector<float> nk(d), nv(d);
    for (int64_t i = blk * k_block; i < std::min(n, (blk + 1) * k_block); ++i) {
      for (int32_t g = 0; g < n_kv; ++g) {
        fill_token(models[g], rows[g], s, g, i, streams[g], nk.data(), nv.data(), p.k.data(),
                   p.v.data());
      }
    }
  });

  const int32_t group = s.n_head_q / n_kv;
  for (int32_t h = 0; h < s.n_head_q; ++h) fill_query(f, s, seed, h, models[h / group], p.q.data());
  return p;
}

}  // namespace vattn::synth
