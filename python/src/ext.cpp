// ext.cpp: the Python extension vattn._core. It binds the C++ API (config, plan, predictor index)
// over DLPack arrays through nanobind's ndarray: torch tensors, numpy arrays and anything else
// that speaks DLPack are read in place, with their strides; nothing here depends on torch.
// The Python package (python/vattn) builds shapes and strides from tensors; this layer checks
// that every address the kernels may touch lies inside the arrays it was handed.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "vattn/vattn.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using array = nb::ndarray<nb::ro>;
using out_array = nb::ndarray<>;

[[noreturn]] void fail(const std::string& msg) {
  throw vattn::error(msg);
}

bool on_cpu(int device_type) {
  return device_type == nb::device::cpu::value;
}

void require_cpu(const char* name, int device_type) {
  if (!on_cpu(device_type))
    fail(std::string(name) +
         " must be a CPU tensor: this build of vattn has no CUDA backend (move it with .cpu())");
}

vattn::dtype kv_dtype_of(const char* name, const nb::dlpack::dtype& t) {
  if (t.lanes == 1) {
    if (t.code == uint8_t(nb::dlpack::dtype_code::Float) && t.bits == 32) return vattn::dtype::f32;
    if (t.code == uint8_t(nb::dlpack::dtype_code::Float) && t.bits == 16) return vattn::dtype::f16;
    if (t.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && t.bits == 16)
      return vattn::dtype::bf16;
  }
  fail(std::string(name) + " must hold float32, float16 or bfloat16 elements");
}

bool is_type(const nb::dlpack::dtype& t, nb::dlpack::dtype_code code, int bits) {
  return t.lanes == 1 && t.code == uint8_t(code) && t.bits == bits;
}

// Elements from an array's first element to its last, over every index (strides must be >= 0).
int64_t extent_elems(const char* name, const nb::ndarray<nb::ro>& a) {
  int64_t last = 0;
  for (size_t i = 0; i < a.ndim(); ++i) {
    if (a.shape(i) == 0) return 0;
    if (a.stride(i) < 0) fail(std::string(name) + " must not have negative strides");
    last += int64_t(a.shape(i) - 1) * a.stride(i);
  }
  return last + 1;
}

// A packed (C-contiguous) array of `count` elements of the given type, on the CPU.
template <class A>
void require_packed(const char* name, const A& a, nb::dlpack::dtype_code code, int bits,
                    int64_t count, const char* what) {
  require_cpu(name, a.device_type());
  if (!is_type(a.dtype(), code, bits)) fail(std::string(name) + " must be " + what);
  int64_t expect = 1, n = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expect)
      fail(std::string(name) + " must be contiguous (call .contiguous())");
    expect *= int64_t(a.shape(i));
    n *= int64_t(a.shape(i));
  }
  if (n != count)
    fail(std::string(name) + " must hold " + std::to_string(count) + " elements, got " +
         std::to_string(n));
}

// One layer's KV cache as the kernels see it, holding its arrays alive.
struct py_kv {
  array k, v;
  nb::ndarray<nb::ro> seq_len, seq_start, page_table, page_start;
  vattn::kv_cache kv{};  // pointers into the vectors below are set by view()
  std::vector<int32_t> lens;
  std::vector<int64_t> starts, pstarts;
  std::vector<int32_t> table;

  vattn::kv_cache view() const {
    vattn::kv_cache c = kv;
    c.seq_len = lens.data();
    if (c.layout == vattn::kv_layout::contiguous) {
      c.seq_start = starts.data();
    } else {
      c.page_table = table.data();
      c.page_start = pstarts.data();
    }
    return c;
  }
};

std::vector<int64_t> to_i64(const char* name, const nb::ndarray<nb::ro>& a, int64_t count) {
  require_cpu(name, a.device_type());
  if (a.ndim() != 1 || int64_t(a.shape(0)) != count)
    fail(std::string(name) + " must be a 1-D array of " + std::to_string(count) + " entries");
  std::vector<int64_t> out(static_cast<size_t>(count));
  const auto& t = a.dtype();
  for (int64_t i = 0; i < count; ++i) {
    const char* p = static_cast<const char*>(a.data()) + i * a.stride(0) * int64_t(a.itemsize());
    if (is_type(t, nb::dlpack::dtype_code::Int, 64))
      out[size_t(i)] = *reinterpret_cast<const int64_t*>(p);
    else if (is_type(t, nb::dlpack::dtype_code::Int, 32))
      out[size_t(i)] = *reinterpret_cast<const int32_t*>(p);
    else
      fail(std::string(name) + " must hold int32 or int64 entries");
  }
  return out;
}

std::vector<int32_t> to_i32(const char* name, const nb::ndarray<nb::ro>& a, int64_t count) {
  std::vector<int64_t> w = to_i64(name, a, count);
  std::vector<int32_t> out(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    if (w[i] < INT32_MIN || w[i] > INT32_MAX)
      fail(std::string(name) + "[" + std::to_string(i) + "] does not fit in int32");
    out[i] = int32_t(w[i]);
  }
  return out;
}

// Builds the kernels' view of K and V: strides in elements, sequence starts in token rows.
// It holds the arrays alive but keeps their data pointers: the package builds one per call, and
// so should direct users of _core (an array resized in place afterwards is not seen).
// Contiguous layout: element (s, t, h, d) at k[(seq_start[s] + t) * stride_token + h * stride_head
// + d]; paged: at k[page * stride_page + (t % page_size) * stride_token + h * stride_head + d].
// Every address the kernels may read is checked against the arrays' extents.
py_kv make_kv(array k, array v, int32_t n_head_kv, int32_t head_dim, nb::ndarray<nb::ro> seq_len,
              int64_t stride_token, int64_t stride_head, std::optional<array> seq_start,
              int32_t page_size, std::optional<array> page_table, std::optional<array> page_start,
              int64_t n_pages, int64_t stride_page) {
  py_kv r;
  r.k = k;
  r.v = v;
  require_cpu("k", k.device_type());
  require_cpu("v", v.device_type());
  const vattn::dtype kt = kv_dtype_of("k", k.dtype()), vt = kv_dtype_of("v", v.dtype());
  if (kt != vt)
    fail(std::string("k and v must have one dtype, got ") + vattn::dtype_name(kt) + " and " +
         vattn::dtype_name(vt));
  if (n_head_kv < 1 || head_dim < 1) fail("n_head_kv and head_dim must be >= 1");
  if (stride_token < 1 || stride_head < 1) fail("stride_token and stride_head must be >= 1");
  if (seq_len.ndim() != 1 || seq_len.shape(0) < 1)
    fail("seq_lens must be a 1-D array with one entry per sequence");
  const int64_t n_seq = int64_t(seq_len.shape(0));
  r.lens = to_i32("seq_lens", seq_len, n_seq);
  for (int64_t s = 0; s < n_seq; ++s)
    if (r.lens[size_t(s)] < 1)
      fail("seq_lens[" + std::to_string(s) + "] is " + std::to_string(r.lens[size_t(s)]) +
           ": every sequence needs at least one cached token");
  // Bounds in 128-bit arithmetic: no stride or count can wrap the check around.
  using wide = __int128;
  const wide row_tail = wide(n_head_kv - 1) * stride_head + head_dim;  // elements of one row
  const wide extent = std::min(extent_elems("k", k), extent_elems("v", v));

  vattn::kv_cache& kv = r.kv;
  kv.type = kt;
  kv.n_head_kv = n_head_kv;
  kv.head_dim = head_dim;
  kv.k = k.data();
  kv.v = v.data();
  kv.stride_token = stride_token;
  kv.stride_head = stride_head;
  kv.n_seq = int32_t(n_seq);
  if (page_size == 0) {
    kv.layout = vattn::kv_layout::contiguous;
    if (seq_start) {
      r.starts = to_i64("seq_start", *seq_start, n_seq);
    } else {
      r.starts.resize(size_t(n_seq));
      int64_t at = 0;
      for (int64_t s = 0; s < n_seq; ++s) r.starts[size_t(s)] = at, at += r.lens[size_t(s)];
    }
    int64_t rows = 0;
    for (int64_t s = 0; s < n_seq; ++s) {
      if (r.starts[size_t(s)] < 0 || r.starts[size_t(s)] > extent)
        fail("seq_start[" + std::to_string(s) + "] = " + std::to_string(r.starts[size_t(s)]) +
             " lies outside the k/v arrays");
      rows = std::max(rows, r.starts[size_t(s)] + r.lens[size_t(s)]);
    }
    if (wide(rows - 1) * stride_token + row_tail > extent)
      fail(
          "k/v are too small for the sequences, strides and heads given (the last token row "
          "would end past the arrays)");
    kv.n_rows = rows;
  } else {
    kv.layout = vattn::kv_layout::paged;
    if (!page_table || !page_start) fail("a paged cache needs page_table and page_start");
    if (page_size < 1 || n_pages < 1 || stride_page < 1)
      fail("page_size, n_pages and stride_page must be >= 1 for a paged cache");
    if (wide(n_pages - 1) * stride_page + wide(page_size - 1) * stride_token + row_tail > extent)
      fail("k/v are too small for n_pages pages of page_size tokens with the strides given");
    r.pstarts = to_i64("page_start", *page_start, n_seq);
    const int64_t entries = page_table->ndim() == 1 ? int64_t(page_table->shape(0)) : -1;
    if (entries < 0) fail("page_table must be a 1-D array of page ids");
    r.table = to_i32("page_table", *page_table, entries);
    for (int64_t s = 0; s < n_seq; ++s) {
      const int64_t need = (r.lens[size_t(s)] + page_size - 1) / page_size;
      if (r.pstarts[size_t(s)] < 0 || r.pstarts[size_t(s)] + need > entries)
        fail("page_start[" + std::to_string(s) + "] plus the sequence's pages runs past the " +
             std::to_string(entries) + " entries of page_table");
    }
    kv.page_size = page_size;
    kv.n_pages = n_pages;
    kv.stride_page = stride_page;
  }
  return r;
}

// head_stats as two packed arrays: integers [.., 8] and reals [.., 2].
constexpr int kStatInts = 8, kStatReals = 2;

class py_plan {
 public:
  py_plan(const vattn::config& cfg, const vattn::plan_params& p) : plan_(cfg, p) {
    ws_.reserve(plan_.workspace_bytes());
    stats_.resize(size_t(p.n_seq_max) * size_t(p.n_head_q));
  }
  const vattn::plan& get() const { return plan_; }

  // q, out: packed f32 [n_seq, n_head_q, head_dim]; stats arrays, indices and seq_id optional.
  void run(array q, const py_kv& kv, out_array out, std::optional<out_array> stats_int,
           std::optional<out_array> stats_real, std::optional<out_array> indices, uint64_t step,
           std::optional<array> seq_id, const vattn::predictor_index* index) {
    const auto& p = plan_.params();
    const int64_t n_seq = kv.kv.n_seq, heads = int64_t(n_seq) * p.n_head_q;
    const int64_t count = heads * p.head_dim;
    require_packed("q", q, nb::dlpack::dtype_code::Float, 32, count, "float32");
    require_packed("out", out, nb::dlpack::dtype_code::Float, 32, count, "float32");
    std::vector<int64_t> ids;
    if (seq_id) ids = to_i64("seq_id", *seq_id, n_seq);
    if (indices)
      require_packed("indices", *indices, nb::dlpack::dtype_code::Int, 32, heads * p.n_tokens_max,
                     "int32 [n_seq, n_head_q, n_tokens_max]");
    if (stats_int)
      require_packed("stats_int", *stats_int, nb::dlpack::dtype_code::Int, 64, heads * kStatInts,
                     "int64 [n_seq, n_head_q, 8]");
    if (stats_real)
      require_packed("stats_real", *stats_real, nb::dlpack::dtype_code::Float, 64,
                     heads * kStatReals, "float64 [n_seq, n_head_q, 2]");
    if (n_seq > p.n_seq_max)
      fail("the cache holds " + std::to_string(n_seq) + " sequences, above the plan's n_seq_max " +
           std::to_string(p.n_seq_max));

    vattn::run_args a;
    a.n_head_q = p.n_head_q;
    a.q = static_cast<const float*>(q.data());
    a.kv = kv.view();
    a.out = static_cast<float*>(out.data());
    a.stats = stats_.data();
    a.indices = indices ? static_cast<int32_t*>(indices->data()) : nullptr;
    a.step = step;
    a.seq_id = seq_id ? ids.data() : nullptr;
    a.index = index;
    {
      nb::gil_scoped_release release;  // the kernels run on their own threads
      plan_.run(a, ws_.data(), ws_.size());
    }
    if (stats_int) {
      auto* si = static_cast<int64_t*>(stats_int->data());
      for (int64_t i = 0; i < heads; ++i) {
        const vattn::head_stats& s = stats_[size_t(i)];
        const int64_t row[kStatInts] = {s.n, s.n_f,       s.n_s,      s.m,
                                        s.b, s.n_sampled, s.bytes_kv, s.dense_fallback};
        std::copy(row, row + kStatInts, si + i * kStatInts);
      }
    }
    if (stats_real) {
      auto* sr = static_cast<double*>(stats_real->data());
      for (int64_t i = 0; i < heads; ++i) {
        sr[i * kStatReals] = stats_[size_t(i)].density;
        sr[i * kStatReals + 1] = stats_[size_t(i)].est_rel_error;
      }
    }
  }

 private:
  vattn::plan plan_;
  vattn::aligned_buffer ws_;
  std::vector<vattn::head_stats> stats_;
};

vattn::plan_params make_params(int32_t n_seq_max, int32_t n_head_q, int32_t n_head_kv,
                               int32_t head_dim, int64_t n_tokens_max, const std::string& kv_dtype,
                               int32_t n_threads) {
  vattn::plan_params p;
  p.n_seq_max = n_seq_max;
  p.n_head_q = n_head_q;
  p.n_head_kv = n_head_kv;
  p.head_dim = head_dim;
  p.n_tokens_max = n_tokens_max;
  p.kv_type = vattn::dtype_from_string(kv_dtype);
  p.n_threads = n_threads;
  return p;
}

// A size field as Python sees it: an int for a count, a float for a fraction of n.
nb::object size_value(const vattn::count_or_fraction& c) {
  if (c.fraction) return nb::float_(c.value);
  return nb::int_(int64_t(c.value));
}

const char* select_name(vattn::selector s) {
  return s == vattn::selector::topk ? "topk" : s == vattn::selector::topp ? "topp" : "none";
}
const char* sample_name(vattn::sampling s) {
  return s == vattn::sampling::adaptive     ? "adaptive"
         : s == vattn::sampling::fixed_rate ? "fixed"
                                            : "none";
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "vattn C++ core: verified sparse attention for LLM decoding";
  // Plans and indices held by module-level caches, torch's op registry or a user's globals are
  // still alive when the interpreter shuts down: that is no leak, so no warning at exit.
  nb::set_leak_warnings(false);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const vattn::error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def("version", [] { return std::string(vattn::version()); });
  m.def("simd_level", [] { return std::string(vattn::simd_level_name()); });
  m.def("hardware_threads", &vattn::hardware_threads);

  nb::class_<vattn::config>(m, "CoreConfig")
      .def_prop_ro("dense", [](const vattn::config& c) { return c.dense; })
      .def_prop_ro("sink", [](const vattn::config& c) { return size_value(c.sink); })
      .def_prop_ro("local", [](const vattn::config& c) { return size_value(c.local); })
      .def_prop_ro("select", [](const vattn::config& c) { return select_name(c.select); })
      .def_prop_ro("predictor",
                   [](const vattn::config& c) { return vattn::predictor_name(c.pred); })
      .def_prop_ro("topk", [](const vattn::config& c) { return size_value(c.topk); })
      .def_prop_ro("pred_page", [](const vattn::config& c) { return c.pred_page; })
      .def_prop_ro("pred_bits", [](const vattn::config& c) { return c.pred_bits; })
      .def_prop_ro("refine", [](const vattn::config& c) { return c.refine; })
      .def_prop_ro("top_p", [](const vattn::config& c) { return c.top_p; })
      .def_prop_ro("sample", [](const vattn::config& c) { return sample_name(c.sample); })
      .def_prop_ro("sample_rate", [](const vattn::config& c) { return c.sample_rate; })
      .def_prop_ro("base", [](const vattn::config& c) { return size_value(c.base); })
      .def_prop_ro("mode", [](const vattn::config& c) { return vattn::budget_mode_name(c.mode); })
      .def_prop_ro("eps", [](const vattn::config& c) { return c.eps; })
      .def_prop_ro("delta", [](const vattn::config& c) { return c.delta; })
      .def_prop_ro("gqa_shared", [](const vattn::config& c) { return c.gqa_shared; })
      .def_prop_ro("hub", [](const vattn::config& c) { return c.hub; })
      .def_prop_ro("scale", [](const vattn::config& c) { return c.scale; })
      .def_prop_ro("seed", [](const vattn::config& c) { return c.seed; })
      .def_prop_ro("layer", [](const vattn::config& c) { return c.layer; })
      .def("to_string", &vattn::config::to_string);

  m.def(
      "parse_config",
      [](const std::string& text) {
        vattn::config c = vattn::parse_config(text);
        c.validate();
        return c;
      },
      "text"_a, "Parses and validates 'key=value,...' (see vattn.hpp); raises ValueError.");

  nb::class_<py_kv>(m, "KvCache")
      .def(nb::new_(&make_kv), "k"_a, "v"_a, "n_head_kv"_a, "head_dim"_a, "seq_lens"_a,
           "stride_token"_a, "stride_head"_a, "seq_start"_a = nb::none(), "page_size"_a = 0,
           "page_table"_a = nb::none(), "page_start"_a = nb::none(), "n_pages"_a = 0,
           "stride_page"_a = 0)
      .def_prop_ro("n_seq", [](const py_kv& k) { return k.kv.n_seq; })
      .def_prop_ro("dtype",
                   [](const py_kv& k) { return std::string(vattn::dtype_name(k.kv.type)); });

  nb::class_<vattn::predictor_index>(m, "PredictorIndex")
      .def(
          "__init__",
          [](vattn::predictor_index* self, const vattn::config& cfg, int32_t n_seq_max,
             int32_t n_head_q, int32_t n_head_kv, int32_t head_dim, int64_t n_tokens_max,
             const std::string& kv_dtype, int32_t n_threads) {
            new (self)
                vattn::predictor_index(cfg, make_params(n_seq_max, n_head_q, n_head_kv, head_dim,
                                                        n_tokens_max, kv_dtype, n_threads));
          },
          "config"_a, "n_seq_max"_a, "n_head_q"_a, "n_head_kv"_a, "head_dim"_a, "n_tokens_max"_a,
          "kv_dtype"_a, "n_threads"_a = 0)
      .def(
          "update",
          [](vattn::predictor_index& ix, const py_kv& kv) {
            nb::gil_scoped_release release;
            const vattn::kv_cache c = kv.view();
            ix.update(c);
          },
          "kv"_a)
      .def("clear", &vattn::predictor_index::clear)
      .def("tokens", &vattn::predictor_index::tokens, "slot"_a)
      .def("memory_bytes", &vattn::predictor_index::memory_bytes)
      .def("load_projections", &vattn::predictor_index::load_projections, "path"_a)
      .def(
          "set_projections",
          [](vattn::predictor_index& ix, array w) {
            const auto& p = ix.params();
            const int64_t count = int64_t(p.n_head_kv) * ix.cfg().pred_bits * p.head_dim;
            require_packed("projections", w, nb::dlpack::dtype_code::Float, 32, count,
                           "float32 [n_head_kv, pred_bits, head_dim]");
            ix.set_projections(static_cast<const float*>(w.data()), size_t(count));
          },
          "w"_a);

  nb::class_<py_plan>(m, "Plan")
      .def(
          "__init__",
          [](py_plan* self, const vattn::config& cfg, int32_t n_seq_max, int32_t n_head_q,
             int32_t n_head_kv, int32_t head_dim, int64_t n_tokens_max, const std::string& kv_dtype,
             int32_t n_threads) {
            new (self) py_plan(cfg, make_params(n_seq_max, n_head_q, n_head_kv, head_dim,
                                                n_tokens_max, kv_dtype, n_threads));
          },
          "config"_a, "n_seq_max"_a, "n_head_q"_a, "n_head_kv"_a, "head_dim"_a, "n_tokens_max"_a,
          "kv_dtype"_a, "n_threads"_a = 0)
      .def_prop_ro("workspace_bytes", [](const py_plan& p) { return p.get().workspace_bytes(); })
      .def_prop_ro("n_tokens_max", [](const py_plan& p) { return p.get().params().n_tokens_max; })
      .def_prop_ro("n_seq_max", [](const py_plan& p) { return p.get().params().n_seq_max; })
      .def("run", &py_plan::run, "q"_a, "kv"_a, "out"_a, "stats_int"_a = nb::none(),
           "stats_real"_a = nb::none(), "indices"_a = nb::none(), "step"_a = 0,
           "seq_id"_a = nb::none(), "index"_a = nb::none());
}
