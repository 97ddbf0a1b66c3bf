// sampler.hpp: counter-based sampling that CPU and GPU compute identically: a keyed pseudo-random
// permutation of [0, n) (its prefixes are nested uniform samples without replacement) and keyed
// uniform draws with replacement (hub compatibility). Pure integer arithmetic, no state.
#pragma once

#include <cassert>
#include <cstdint>

#if defined(__CUDACC__)
#define VATTN_HD __host__ __device__ __forceinline__
#else
#define VATTN_HD inline
#endif

namespace vattn::detail {

// splitmix64's finaliser: a bijective 64-bit mixer with full avalanche.
VATTN_HD uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The sampling key of one (seed, layer, sequence, head, step): each field is absorbed by a
// full mix so nearby tuples give unrelated keys.
VATTN_HD uint64_t sample_key(uint64_t seed, int32_t layer, int64_t seq, int32_t head,
                             uint64_t step) {
  uint64_t h = mix64(seed ^ 0x76617474656e0001ull);
  h = mix64(h ^ uint64_t(uint32_t(layer)));
  h = mix64(h ^ uint64_t(seq));
  h = mix64(h ^ uint64_t(uint32_t(head)));
  return mix64(h ^ step);
}

// A keyed bijection of [0, n): a balanced Feistel network over 2*half_bits bits (the smallest
// even width covering n, at least 8 bits) with cycle walking back into [0, n). Halves narrower
// than 4 bits make measurably non-uniform pairs, hence the floor. For n >= 256 the domain is
// < 4n, so a walk takes fewer than 4 evaluations of the network on average.
class keyed_permutation {
 public:
  static constexpr int k_rounds = 8;
  // Networks whose halves have at most this many bits (n <= 2^20) may be evaluated from tables
  // of their round function: k_rounds x 2^half_bits() 16-bit entries (tabulate()).
  static constexpr int k_table_bits = 10;
  static constexpr int k_table_entries = k_rounds << k_table_bits;

  VATTN_HD keyed_permutation(uint64_t key, uint64_t n) : n_(n) {
    uint32_t bits = 0;
    while (bits < 64 && (uint64_t(1) << bits) < n) ++bits;
    half_ = bits < 8 ? 4 : (bits + 1) / 2;
    mask_ = (uint64_t(1) << half_) - 1;
    for (int r = 0; r < k_rounds; ++r) keys_[r] = mix64(key + 0x632be59bd9b4e019ull * (r + 1));
  }

  // The element at position i of the permutation (i < n).
  VATTN_HD uint64_t operator()(uint64_t i) const {
    uint64_t x = i;
    do x = step(x);
    while (x >= n_);
    return x;
  }

  VATTN_HD uint64_t size() const { return n_; }

  // One evaluation of the network: operator()(i) is step(i), then step of that while it is
  // >= n. Public so that a GPU walk can advance many positions one evaluation at a time (a lane
  // whose walk has ended takes the next position instead of waiting for its warp's longest walk).
  VATTN_HD uint64_t step(uint64_t x) const {
    return step_with(x, [this](int k, uint64_t r) { return round_fn(k, r); });
  }

  // The network's parts, for a GPU that tabulates the round function: round k maps a half r
  // (r < 2^half_bits()) to round_fn(k, r) < 2^half_bits(), and step_with(x, f) is step(x) with
  // f(k, r) in place of round_fn(k, r).
  VATTN_HD uint32_t half_bits() const { return half_; }
  VATTN_HD bool tabulable() const { return half_ <= uint32_t(k_table_bits); }
  // Host: round k's function at table[(k << half_bits()) | r] (tabulable() networks only).
  void tabulate(uint16_t* table) const {
    for (int k = 0; k < k_rounds; ++k)
      for (uint64_t r = 0; r <= mask_; ++r)
        table[(uint64_t(k) << half_) | r] = uint16_t(round_fn(k, r));
  }
  VATTN_HD uint64_t round_fn(int k, uint64_t r) const { return mix64(r ^ keys_[k]) & mask_; }
  template <typename Round>
  VATTN_HD uint64_t step_with(uint64_t x, const Round& f) const {
    uint64_t l = x >> half_, r = x & mask_;
    for (int k = 0; k < k_rounds; ++k) {
      const uint64_t t = l ^ f(k, r);
      l = r;
      r = t;
    }
    return (l << half_) | r;
  }

 private:
  uint64_t n_;
  uint32_t half_;
  uint64_t mask_;
  uint64_t keys_[k_rounds];
};

// The sample of vAttention: positions of a keyed permutation of all n tokens, skipping those in
// F. The kept tokens are a uniformly random ordering of the residual R = [0, n) \ F, so every
// prefix is a uniform sample without replacement from R, prefixes are nested, and a change of
// one member of F (a near-tie at the top-k boundary on another backend) moves at most one or
// two sampled tokens instead of reshuffling the whole sample.
class residual_walk {
 public:
  VATTN_HD residual_walk(uint64_t key, uint64_t n) : perm_(key, n) {}
  // The next token of R; `in_f(t)` tells whether token t is deterministic. R must not be
  // exhausted (callers draw at most |R| tokens).
  template <typename InF>
  VATTN_HD uint64_t next(const InF& in_f) {
    for (;;) {
      const uint64_t t = perm_(pos_++);
      if (!in_f(t)) return t;
    }
  }

  // Host: the next `count` tokens of R into out, exactly what `count` calls of next(in_f) give.
  // k_block positions of the permutation are walked at once: each position's cycle walk is an
  // independent chain, so a block's chains overlap in the core, and a position leaves the block's
  // active list as soon as its walk lands in [0, n). `table` (tabulate(), or nullptr) replaces
  // each round's 64-bit mix by a lookup. On one core of the dev VM at n = 128K: 106 ns per token
  // with next(), 23 ns with take and a table.
  template <typename InF>
  void take(int64_t count, const InF& in_f, int32_t* out, const uint16_t* table) {
    with_step(table, [&](const auto& step) { take_with(count, in_f, out, step); });
  }

  // Host, for a walk split across threads: the permutation's values at positions [from, from +
  // cnt) into vals, evaluated as take() evaluates them. The walk itself is untouched, so
  // concurrent calls over disjoint ranges are safe; take_values() then consumes them in order.
  void values(uint64_t from, int64_t cnt, int32_t* vals, const uint16_t* table) const {
    assert(from + uint64_t(cnt) <= perm_.size());  // a position past n may never walk back
    with_step(table, [&](const auto& step) {
      uint64_t x[k_block];
      for (int64_t i = 0; i < cnt; i += k_block) {
        const int nb = int(cnt - i < k_block ? cnt - i : k_block);
        walk_block(from + uint64_t(i), nb, x, step);
        for (int j = 0; j < nb; ++j) vals[i + j] = int32_t(x[j]);
      }
    });
  }
  // Host: the next tokens of R from vals, the values of the walk's next nv positions (values()
  // from position()): at most `count` of them into out, exactly what take() would give. Returns
  // how many; the walk advances past the positions used.
  template <typename InF>
  int64_t take_values(const int32_t* vals, int64_t nv, int64_t count, const InF& in_f,
                      int32_t* out) {
    int64_t got = 0, i = 0;
    for (; i < nv && got < count; ++i) {
      out[got] = vals[i];
      got += !in_f(uint64_t(vals[i]));
    }
    pos_ += uint64_t(i);
    return got;
  }
  uint64_t position() const { return pos_; }

  // Host: take(count, ...) with the values of the positions ahead evaluated in blocks that may
  // run concurrently: each round sizes a span for the tokens still wanted (the residual's share
  // of n from n_f, the size of F, plus a margin), calls for_blocks(nv, eval), which must call
  // eval(i) once for each i = 0, grain, 2 grain, ... < nv in any order or concurrently, into
  // vals (nv entries), then keeps its tokens in order (take_values). Rounds repeat while at
  // least `grain` tokens are wanted; take() finishes. The tokens are exactly take()'s.
  template <typename InF, typename ForBlocks>
  void take_ahead(int64_t count, const InF& in_f, int32_t* out, const uint16_t* table,
                  int32_t* vals, int64_t grain, int64_t n_f, const ForBlocks& for_blocks) {
    const int64_t n = int64_t(perm_.size()), n_s = n - n_f > 1 ? n - n_f : 1;
    int64_t got = 0;
    while (count - got >= grain && pos_ < uint64_t(n)) {
      const int64_t need = count - got, p = int64_t(pos_), left = n - p;
      const int64_t want = need + need * n_f / n_s + need / 16 + 64;
      const int64_t nv = want < left ? want : left;
      for_blocks(nv, [&, p, nv](int64_t i) {
        values(uint64_t(p + i), grain < nv - i ? grain : nv - i, vals + i, table);
      });
      got += take_values(vals, nv, need, in_f, out + got);
    }
    take(count - got, in_f, out + got, table);
  }
  const keyed_permutation& permutation() const { return perm_; }

 private:
  static constexpr int k_block = 32;

  // A round's function read from tabulate()'s table (callable wherever step_with is).
  struct table_round {
    const uint16_t* table;
    uint32_t h;
    VATTN_HD uint64_t operator()(int k, uint64_t r) const {
      return uint64_t(table[(uint64_t(k) << h) | r]);
    }
  };

  // f(step) with step(x) one evaluation of the network: from `table` (tabulate(), or nullptr)
  // each round's 64-bit mix is a lookup.
  template <typename F>
  void with_step(const uint16_t* table, const F& f) const {
    if (table) {
      const table_round lookup{table, perm_.half_bits()};
      f([&](uint64_t x) { return perm_.step_with(x, lookup); });
    } else {
      f([&](uint64_t x) { return perm_.step(x); });
    }
  }

  // x[j] = the permutation's value at position p + j, j < nb <= k_block: each position's cycle
  // walk is an independent chain, so the block's chains overlap in the core, and a position
  // leaves the active list as soon as its walk lands in [0, n).
  template <typename Step>
  void walk_block(uint64_t p, int nb, uint64_t* x, const Step& step) const {
    const uint64_t n = perm_.size();
    uint8_t active[k_block];
    int na = nb;
    for (int j = 0; j < nb; ++j) x[j] = p + uint64_t(j), active[j] = uint8_t(j);
    while (na > 0) {
      for (int i = 0; i < na; ++i) x[active[i]] = step(x[active[i]]);
      int still = 0;  // compaction without a branch per position
      for (int i = 0; i < na; ++i) {
        const int j = active[i];
        active[still] = uint8_t(j);
        still += x[j] >= n;
      }
      na = still;
    }
  }

  template <typename InF, typename Step>
  void take_with(int64_t count, const InF& in_f, int32_t* out, const Step& step) {
    const uint64_t n = perm_.size();
    int64_t got = 0;
    while (got < count) {
      // Callers draw at most |R| tokens; past the permutation's end there is nothing to take
      // (and no endless loop).
      if (pos_ >= n) return;
      const int nb = int(n - pos_ < uint64_t(k_block) ? n - pos_ : uint64_t(k_block));
      uint64_t x[k_block];
      walk_block(pos_, nb, x, step);
      for (int j = 0; j < nb; ++j) {
        if (in_f(x[j])) continue;
        out[got++] = int32_t(x[j]);
        if (got == count) {
          pos_ += uint64_t(j) + 1;
          return;
        }
      }
      pos_ += uint64_t(nb);
    }
  }

  keyed_permutation perm_;
  uint64_t pos_ = 0;
};

// Draw number `counter` of a uniform stream over [0, n) keyed by `key` (with replacement).
// Multiply-shift maps 64 random bits to [0, n) with a bias below n / 2^64.
VATTN_HD uint64_t uniform_draw(uint64_t key, uint64_t counter, uint64_t n) {
  uint64_t r = mix64(key ^ mix64(counter + 0x5851f42d4c957f2dull));
#if defined(__CUDA_ARCH__)
  return __umul64hi(r, n);
#else
  return uint64_t((static_cast<unsigned __int128>(r) * n) >> 64);
#endif
}

}  // namespace vattn::detail
