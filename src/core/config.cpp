// config.cpp: configuration validation, named method presets and the "key=value" text form.
#include <charconv>
#include <cmath>
#include <string>
#include <vector>

#include "vattn/vattn.hpp"

namespace vattn {

int64_t count_or_fraction::resolve(int64_t n) const {
  if (!fraction) return int64_t(value);
  return int64_t(std::floor(value * double(n) * (1 + 1e-12)));  // as detail::floor_fraction
}

const char* budget_mode_name(budget_mode m) {
  switch (m) {
    case budget_mode::denominator:
      return "denominator";
    case budget_mode::numerator:
      return "numerator";
    case budget_mode::combined:
      return "combined";
    case budget_mode::output:
      return "output";
  }
  return "?";
}

const char* predictor_name(predictor p) {
  switch (p) {
    case predictor::oracle:
      return "oracle";
    case predictor::page_bounds:
      return "pages";
    case predictor::sign_bits:
      return "signs";
  }
  return "?";
}

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw error("config: " + msg);
}

void check_size(const char* name, const count_or_fraction& c) {
  if (!std::isfinite(c.value) || c.value < 0)
    fail(std::string(name) + " must be a finite value >= 0, got " + std::to_string(c.value));
  if (c.fraction && c.value > 1)
    fail(std::string(name) + " as a fraction must lie in [0, 1], got " + std::to_string(c.value));
  if (!c.fraction && (c.value != std::floor(c.value) || c.value > 1e15))
    fail(std::string(name) + " as a count must be a whole number, got " + std::to_string(c.value));
}

bool in_open_unit(double x) {
  return std::isfinite(x) && x > 0 && x < 1;
}

std::string fmt_double(double x) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, x);
  return std::string(buf, r.ptr);
}

// Fractions always carry a '.' or an exponent so they read back as fractions.
std::string fmt_size(const count_or_fraction& c) {
  if (!c.fraction) return std::to_string(int64_t(c.value));
  std::string s = fmt_double(c.value);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

}  // namespace

void config::validate() const {
  check_size("sink", sink);
  check_size("local", local);
  check_size("topk", topk);
  check_size("base", base);
  if (!std::isfinite(scale) || scale < 0)
    fail("scale must be finite and >= 0 (0 selects 1/sqrt(head_dim)), got " +
         std::to_string(scale));
  if (pred_page < 1 || pred_page > (1 << 20))
    fail("pred_page must be in [1, 2^20] tokens, got " + std::to_string(pred_page));
  if (pred_bits < 32 || pred_bits > 256 || pred_bits % 32 != 0)
    fail("pred_bits must be a multiple of 32 in [32, 256], got " + std::to_string(pred_bits));
  if (!(refine == 0 || (refine >= 1 && refine <= 64)))
    fail("refine must be 0 (off) or in [1, 64] (shortlist = refine * topk), got " +
         fmt_double(refine));
  if (refine != 0 && (select != selector::topk || pred == predictor::oracle))
    fail(
        "refine re-ranks an approximate predictor's top-k: it needs select=topk with "
        "predictor=pages or signs");
  if (dense) {
    if (pred != predictor::oracle)
      fail("dense=1 reads every key: predictor must be oracle, got " + std::to_string(int(pred)));
    if (sink.value != 0 || local.value != 0 || select != selector::none ||
        sample != sampling::none || hub || gqa_shared)
      fail(
          "dense=1 computes exact attention and excludes sink, local, select, sample, hub and "
          "gqa_shared");
    return;
  }
  switch (select) {
    case selector::none:
      if (topk.value != 0) fail("topk is set but select is not topk");
      if (top_p != 0) fail("top_p is set but select is not topp");
      break;
    case selector::topk:
      if (topk.value <= 0) fail("select=topk needs topk > 0 (a count or a fraction of n)");
      if (top_p != 0) fail("top_p is set but select is topk (they are exclusive)");
      break;
    case selector::topp:
      if (!(std::isfinite(top_p) && top_p > 0 && top_p <= 1))
        fail("select=topp needs top_p in (0, 1], got " + std::to_string(top_p));
      if (topk.value != 0) fail("topk is set but select is topp (they are exclusive)");
      break;
    default:
      fail("select has an unknown value " + std::to_string(int(select)));
  }
  switch (pred) {
    case predictor::oracle:
      break;
    case predictor::page_bounds:
    case predictor::sign_bits:
      if (select != selector::topk)
        fail(std::string("predictor=") + predictor_name(pred) +
             " ranks tokens for top-k only: set select=topk (top-p needs exact masses)");
      if (hub) fail("hub=1 supports predictor=oracle only");
      break;
    default:
      fail("predictor has an unknown value " + std::to_string(int(pred)));
  }
  switch (sample) {
    case sampling::none:
      break;
    case sampling::fixed_rate:
      if (!(std::isfinite(sample_rate) && sample_rate > 0 && sample_rate <= 1))
        fail("sample=fixed needs sample_rate in (0, 1], got " + std::to_string(sample_rate));
      break;
    case sampling::adaptive:
      if (!in_open_unit(eps)) fail("eps must lie in (0, 1), got " + std::to_string(eps));
      if (!in_open_unit(delta)) fail("delta must lie in (0, 1), got " + std::to_string(delta));
      if (base.value <= 0) fail("base (the base sample size) must be > 0");
      if (!base.fraction && base.value < 2) fail("base as a count must be >= 2");
      break;
    default:
      fail("sample has an unknown value " + std::to_string(int(sample)));
  }
  if (sample != sampling::fixed_rate && sample_rate != 0)
    fail("sample_rate is set but sample is not fixed");
  if (int(mode) < 0 || int(mode) > 3)
    fail("mode has an unknown value " + std::to_string(int(mode)));
  if (sink.value == 0 && local.value == 0 && select == selector::none && sample == sampling::none)
    fail("selects no token: set dense=1 or at least one of sink, local, select, sample");
  if (hub) {
    if (sample != sampling::adaptive) fail("hub=1 needs sample=adaptive");
    if (select == selector::topp) fail("hub=1 supports select=none or select=topk only");
    if (mode != budget_mode::denominator) fail("hub=1 supports mode=denominator only");
    if (gqa_shared) fail("hub=1 excludes gqa_shared=1");
  }
}

std::string config::to_string() const {
  if (dense)
    return "dense=1,scale=" + fmt_double(scale) + ",seed=" + std::to_string(seed) +
           ",layer=" + std::to_string(layer);
  std::string s = "sink=" + fmt_size(sink) + ",local=" + fmt_size(local);
  switch (select) {
    case selector::none:
      s += ",select=none";
      break;
    case selector::topk:
      s += ",select=topk,topk=" + fmt_size(topk) + ",predictor=" + predictor_name(pred);
      if (pred == predictor::page_bounds) s += ",pred_page=" + std::to_string(pred_page);
      if (pred == predictor::sign_bits) s += ",pred_bits=" + std::to_string(pred_bits);
      if (refine != 0) s += ",refine=" + fmt_double(refine);
      break;
    case selector::topp:
      s += ",select=topp,top_p=" + fmt_double(top_p);
      break;
  }
  switch (sample) {
    case sampling::none:
      s += ",sample=none";
      break;
    case sampling::fixed_rate:
      s += ",sample=fixed,sample_rate=" + fmt_double(sample_rate);
      break;
    case sampling::adaptive:
      s += ",sample=adaptive,base=" + fmt_size(base) + ",mode=" + budget_mode_name(mode) +
           ",eps=" + fmt_double(eps) + ",delta=" + fmt_double(delta);
      break;
  }
  s += std::string(",gqa_shared=") + (gqa_shared ? "1" : "0") + ",hub=" + (hub ? "1" : "0") +
       ",scale=" + fmt_double(scale) + ",seed=" + std::to_string(seed) +
       ",layer=" + std::to_string(layer);
  return s;
}

config method_config(std::string_view method) {
  config c;
  const count_or_fraction paper_sink{128, false}, paper_local{128, false}, paper_topk{0.05, true};
  if (method == "dense") {
    c.dense = true;
  } else if (method == "sink_local") {
    c.sink = paper_sink, c.local = paper_local;
  } else if (method == "topk") {
    c.sink = paper_sink, c.local = paper_local, c.select = selector::topk, c.topk = paper_topk;
  } else if (method == "topp") {
    c.sink = paper_sink, c.local = paper_local, c.select = selector::topp, c.top_p = 0.9;
  } else if (method == "random") {
    c.sink = paper_sink, c.local = paper_local, c.sample = sampling::fixed_rate;
    c.sample_rate = 0.05;
  } else if (method == "vattention" || method == "hub") {
    c.sink = paper_sink, c.local = paper_local, c.select = selector::topk, c.topk = paper_topk;
    c.sample = sampling::adaptive;
    c.hub = method == "hub";
  } else {
    throw error(
        "config: method must be one of dense, sink_local, topk, topp, random, vattention, "
        "hub; got '" +
        std::string(method) + "'");
  }
  return c;
}

namespace {

double parse_number(std::string_view key, std::string_view v) {
  double x = 0;
  auto r = std::from_chars(v.data(), v.data() + v.size(), x);
  if (r.ec != std::errc() || r.ptr != v.data() + v.size() || !std::isfinite(x))
    fail(std::string(key) + " expects a finite number, got '" + std::string(v) + "'");
  return x;
}

uint64_t parse_u64(std::string_view key, std::string_view v) {
  uint64_t x = 0;
  auto r = std::from_chars(v.data(), v.data() + v.size(), x);
  if (r.ec != std::errc() || r.ptr != v.data() + v.size())
    fail(std::string(key) + " expects a non-negative integer, got '" + std::string(v) + "'");
  return x;
}

bool parse_bool(std::string_view key, std::string_view v) {
  if (v == "1" || v == "true" || v == "on" || v == "yes") return true;
  if (v == "0" || v == "false" || v == "off" || v == "no") return false;
  fail(std::string(key) + " expects 0/1/true/false, got '" + std::string(v) + "'");
}

// "128" is a count; "0.05", "5e-2" and "5%" are fractions of n.
count_or_fraction parse_size(std::string_view key, std::string_view v) {
  if (!v.empty() && v.back() == '%')
    return {parse_number(key, v.substr(0, v.size() - 1)) / 100.0, true};
  const bool frac = v.find_first_of(".eE") != std::string_view::npos;
  double x = parse_number(key, v);
  return {x, frac};
}

}  // namespace

config parse_config(std::string_view text, const config& base) {
  config c = base;
  size_t pos = 0;
  bool first = true;
  while (pos < text.size()) {
    size_t end = text.find_first_of(", \t\n\r", pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view item = text.substr(pos, end - pos);
    pos = end + 1;
    if (item.empty()) continue;
    size_t eq = item.find('=');
    if (eq == std::string_view::npos || eq == 0)
      fail("expected key=value, got '" + std::string(item) + "'");
    std::string_view k = item.substr(0, eq), v = item.substr(eq + 1);
    if (v.empty()) fail(std::string(k) + " has an empty value");
    const bool was_first = first;
    first = false;
    if (k == "method") {
      if (!was_first) fail("method= must come first (it resets every other key)");
      c = method_config(v);
    } else if (k == "dense") {
      c.dense = parse_bool(k, v);
    } else if (k == "sink") {
      c.sink = parse_size(k, v);
    } else if (k == "local") {
      c.local = parse_size(k, v);
    } else if (k == "select") {
      if (v == "none")
        c.select = selector::none, c.topk = {}, c.top_p = 0;
      else if (v == "topk")
        c.select = selector::topk, c.top_p = 0;
      else if (v == "topp")
        c.select = selector::topp, c.topk = {};
      else
        fail("select must be none, topk or topp, got '" + std::string(v) + "'");
    } else if (k == "topk") {
      c.topk = parse_size(k, v);
      c.select = c.topk.value > 0 ? selector::topk : selector::none;
      c.top_p = 0;
    } else if (k == "top_p" || k == "topp") {
      c.top_p = parse_number(k, v);
      c.select = selector::topp, c.topk = {};
    } else if (k == "predictor") {
      if (v == "oracle")
        c.pred = predictor::oracle;
      else if (v == "pages" || v == "page_bounds" || v == "quest")
        c.pred = predictor::page_bounds;
      else if (v == "signs" || v == "sign_bits" || v == "simhash")
        c.pred = predictor::sign_bits;
      else
        fail("predictor must be oracle, pages or signs, got '" + std::string(v) + "'");
    } else if (k == "pred_page") {
      const uint64_t x = parse_u64(k, v);
      if (x < 1 || x > (1u << 20)) fail("pred_page must be in [1, 2^20] tokens");
      c.pred_page = int32_t(x);
    } else if (k == "pred_bits" || k == "bits") {
      const uint64_t x = parse_u64(k, v);
      if (x > 256) fail("pred_bits must be a multiple of 32 in [32, 256]");
      c.pred_bits = int32_t(x);
    } else if (k == "refine") {
      c.refine = parse_number(k, v);
    } else if (k == "sample") {
      if (v == "none")
        c.sample = sampling::none, c.sample_rate = 0;
      else if (v == "fixed")
        c.sample = sampling::fixed_rate;
      else if (v == "adaptive")
        c.sample = sampling::adaptive, c.sample_rate = 0;
      else
        fail("sample must be none, fixed or adaptive, got '" + std::string(v) + "'");
    } else if (k == "sample_rate" || k == "rate") {
      c.sample_rate = parse_number(k, v);
      c.sample = sampling::fixed_rate;
    } else if (k == "base" || k == "base_rate") {
      c.base = parse_size(k, v);
    } else if (k == "mode") {
      if (v == "denominator")
        c.mode = budget_mode::denominator;
      else if (v == "numerator")
        c.mode = budget_mode::numerator;
      else if (v == "combined")
        c.mode = budget_mode::combined;
      else if (v == "output")
        c.mode = budget_mode::output;
      else
        fail("mode must be denominator, numerator, combined or output, got '" + std::string(v) +
             "'");
    } else if (k == "eps") {
      c.eps = parse_number(k, v);
    } else if (k == "delta") {
      c.delta = parse_number(k, v);
    } else if (k == "gqa_shared") {
      c.gqa_shared = parse_bool(k, v);
    } else if (k == "hub") {
      c.hub = parse_bool(k, v);
    } else if (k == "scale") {
      c.scale = float(parse_number(k, v));
    } else if (k == "seed") {
      c.seed = parse_u64(k, v);
    } else if (k == "layer") {
      uint64_t l = parse_u64(k, v);
      if (l >= 1u << 30) fail("layer must be < 2^30");
      c.layer = int32_t(l);
    } else {
      fail("unknown key '" + std::string(k) +
           "' (known: method, dense, sink, local, select, topk, top_p, predictor, pred_page, "
           "pred_bits, refine, sample, "
           "sample_rate, base, mode, eps, delta, gqa_shared, hub, scale, seed, layer)");
    }
  }
  return c;
}

}  // namespace vattn
