// safetensors.cpp: the safetensors reader (validates every header field before touching data, so
// malformed or hostile files raise vattn::error instead of reading out of bounds) and writer.
#include "vattn/safetensors.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>

#include "core/dtype.hpp"

namespace vattn::io {
namespace {

using json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the limit the reference implementation uses
constexpr size_t kPrefixBytes = 8;

[[noreturn]] void fail(const std::string& msg) {
  throw error("safetensors: " + msg);
}

std::string quote(std::string_view name) {
  return "'" + std::string(name) + "'";
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

const char* json_type(const json& j) {
  return j.type_name();
}

// Reads a JSON integer as a non-negative int64; `what` names the field in messages.
int64_t non_negative(const json& j, const std::string& what) {
  if (j.is_number_unsigned()) {
    const uint64_t u = j.get<uint64_t>();
    if (u > uint64_t(std::numeric_limits<int64_t>::max()))
      fail(what + " is too large (" + std::to_string(u) + ")");
    return int64_t(u);
  }
  if (j.is_number_integer()) {
    const int64_t v = j.get<int64_t>();
    if (v < 0) fail(what + " is negative (" + std::to_string(v) + ")");
    return v;
  }
  fail(what + " is not an integer (got " + json_type(j) + ")");
}

// A checked product of the dims and the element size, so a hostile shape cannot wrap around
// and pass the size check.
uint64_t checked_nbytes(const std::string& who, const std::vector<int64_t>& shape,
                        const std::string& dtype, size_t elem) {
  uint64_t n = elem;
  for (int64_t d : shape) {
    if (__builtin_mul_overflow(n, uint64_t(d), &n))
      fail(who + ": shape " + shape_string(shape) + " x " + dtype + " overflows 64-bit byte count");
  }
  return n;
}

// nlohmann keeps the last of duplicate keys; this callback sees every key as it is read, so
// duplicates anywhere in the header can be reported instead of silently dropped.
struct duplicate_finder {
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string duplicate;
  bool found = false;

  bool operator()(int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys.empty() && parsed.is_string() &&
            !keys.back().insert(parsed.get<std::string>()).second && !found) {
          found = true;
          duplicate = parsed.get<std::string>();
        }
        break;
      default:
        break;
    }
    return true;
  }
};

json parse_header(const uint8_t* begin, const uint8_t* end) {
  duplicate_finder dups;
  json header;
  try {
    header = json::parse(reinterpret_cast<const char*>(begin), reinterpret_cast<const char*>(end),
                         std::ref(dups));
  } catch (const json::exception& e) {
    fail(std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object())
    fail(std::string("header is not a JSON object (got ") + json_type(header) + ")");
  if (dups.found) fail("duplicate key " + quote(dups.duplicate) + " in header");
  return header;
}

const json& field(const json& entry, const std::string& who, const char* key) {
  auto it = entry.find(key);
  if (it == entry.end()) fail(who + ": missing field '" + key + "'");
  return *it;
}

struct parsed_tensor {
  tensor_view view;
  uint64_t begin = 0;
  uint64_t end = 0;
};

parsed_tensor parse_entry(const std::string& name, const json& entry, uint64_t data_size) {
  const std::string who = "tensor " + quote(name);
  if (!entry.is_object()) fail(who + ": entry is not a JSON object (got " + json_type(entry) + ")");
  parsed_tensor t;
  t.view.name = name;

  const json& dtype = field(entry, who, "dtype");
  if (!dtype.is_string()) fail(who + ": dtype is not a string (got " + json_type(dtype) + ")");
  t.view.dtype = dtype.get<std::string>();
  const size_t elem = dtype_bytes(t.view.dtype);
  if (elem == 0) fail(who + ": unknown dtype " + quote(t.view.dtype));

  const json& shape = field(entry, who, "shape");
  if (!shape.is_array()) fail(who + ": shape is not an array (got " + json_type(shape) + ")");
  t.view.shape.reserve(shape.size());
  for (size_t i = 0; i < shape.size(); ++i)
    t.view.shape.push_back(non_negative(shape[i], who + ": shape dimension " + std::to_string(i)));
  const uint64_t nbytes = checked_nbytes(who, t.view.shape, t.view.dtype, elem);

  const json& offsets = field(entry, who, "data_offsets");
  // Messages name JSON types, never dump() values: dumping recurses, and a hostile header can
  // nest arrays millions deep.
  if (!offsets.is_array() || offsets.size() != 2)
    fail(who + ": data_offsets is not an array of two integers (got " +
         (offsets.is_array() ? "an array of " + std::to_string(offsets.size())
                             : json_type(offsets)) +
         ")");
  t.begin = uint64_t(non_negative(offsets[0], who + ": data_offsets begin"));
  t.end = uint64_t(non_negative(offsets[1], who + ": data_offsets end"));
  const std::string range = "[" + std::to_string(t.begin) + ", " + std::to_string(t.end) + ")";
  if (t.end < t.begin) fail(who + ": data_offsets " + range + " end before begin");
  if (t.end > data_size)
    fail(who + ": data_offsets " + range + " out of range of the " + std::to_string(data_size) +
         "-byte data buffer");
  if (t.end - t.begin != nbytes)
    fail(who + ": data_offsets " + range + " do not match shape " + shape_string(t.view.shape) +
         " x " + t.view.dtype + " = " + std::to_string(nbytes) + " bytes");
  t.view.nbytes = size_t(nbytes);
  return t;
}

void parse_metadata(const json& j, std::map<std::string, std::string>& out) {
  if (j.is_null()) return;  // writers that use Option<> may emit null for "no metadata"
  if (!j.is_object())
    fail(std::string("__metadata__ is not a JSON object (got ") + json_type(j) + ")");
  for (const auto& [key, value] : j.items()) {
    if (!value.is_string())
      fail("__metadata__ value for " + quote(key) + " is not a string (got " + json_type(value) +
           ")");
    out.emplace(key, value.get<std::string>());
  }
}

// Little-endian loads through bytes: the data is neither aligned nor in host order in general.
inline uint16_t load_u16(const uint8_t* p) {
  return uint16_t(p[0] | (uint16_t(p[1]) << 8));
}
inline uint32_t load_u32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

std::string json_string(const std::string& s, const std::string& what) {
  try {
    return json(s).dump();
  } catch (const json::exception&) {
    fail(what + " is not valid UTF-8");
  }
}

}  // namespace

size_t dtype_bytes(std::string_view dtype) {
  static const std::map<std::string_view, size_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},     {"U32", 4},
      {"F32", 4},  {"I64", 8}, {"U64", 8}, {"F64", 8},
  };
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

safetensors safetensors::from_bytes(std::vector<uint8_t> bytes) {
  const size_t size = bytes.size();
  if (size == 0) fail("empty file");
  if (size < kPrefixBytes)
    fail("truncated header length prefix (" + std::to_string(size) + " of 8 bytes)");
  uint64_t header_len = 0;
  for (size_t i = 0; i < kPrefixBytes; ++i) header_len |= uint64_t(bytes[i]) << (8 * i);
  if (header_len > kMaxHeaderBytes)
    fail("header length " + std::to_string(header_len) + " exceeds the 100 MB limit");
  if (header_len > size - kPrefixBytes)
    fail("header length " + std::to_string(header_len) + " runs past the end of the file (" +
         std::to_string(size - kPrefixBytes) + " bytes follow the length prefix)");

  const uint8_t* header_begin = bytes.data() + kPrefixBytes;
  const json header = parse_header(header_begin, header_begin + header_len);
  const size_t data_start = kPrefixBytes + size_t(header_len);
  const uint64_t data_size = size - data_start;

  safetensors st;
  std::vector<parsed_tensor> parsed;
  parsed.reserve(header.size());
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      parse_metadata(entry, st.metadata_);
      continue;
    }
    parsed.push_back(parse_entry(name, entry, data_size));
  }

  // Data order; ties (empty tensors) by name so the order is deterministic.
  std::sort(parsed.begin(), parsed.end(), [](const parsed_tensor& a, const parsed_tensor& b) {
    return a.begin != b.begin ? a.begin < b.begin
           : a.end != b.end   ? a.end < b.end
                              : a.view.name < b.view.name;
  });
  // Gaps are allowed; shared bytes are not. Empty tensors own no bytes and cannot overlap.
  const parsed_tensor* prev = nullptr;
  for (const parsed_tensor& t : parsed) {
    if (t.begin == t.end) continue;
    if (prev && t.begin < prev->end)
      fail("tensors " + quote(prev->view.name) + " [" + std::to_string(prev->begin) + ", " +
           std::to_string(prev->end) + ") and " + quote(t.view.name) + " [" +
           std::to_string(t.begin) + ", " + std::to_string(t.end) + ") overlap");
    prev = &t;
  }

  st.bytes_ = std::move(bytes);
  const uint8_t* data = st.bytes_.data() + data_start;
  st.views_.reserve(parsed.size());
  for (parsed_tensor& t : parsed) {
    t.view.data = data + t.begin;
    st.index_.emplace(t.view.name, st.views_.size());
    st.views_.push_back(std::move(t.view));
  }
  return st;
}

safetensors safetensors::load(const std::string& path) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) throw error("safetensors: cannot read '" + path + "': " + ec.message());
  std::ifstream in(path, std::ios::binary);
  if (!in) throw error("safetensors: cannot open '" + path + "': " + std::strerror(errno));
  std::vector<uint8_t> bytes(size);
  in.read(reinterpret_cast<char*>(bytes.data()), std::streamsize(size));
  if (size_t(in.gcount()) != size)
    throw error("safetensors: cannot read '" + path + "': short read (" +
                std::to_string(in.gcount()) + " of " + std::to_string(size) + " bytes)");
  try {
    return from_bytes(std::move(bytes));
  } catch (const error& e) {
    throw error(std::string(e.what()) + " (in '" + path + "')");
  }
}

safetensors::safetensors(const safetensors& other)
    : bytes_(other.bytes_), views_(other.views_), index_(other.index_), metadata_(other.metadata_) {
  // Re-point every view from the source buffer to the same offset in this copy's buffer.
  for (tensor_view& v : views_) v.data = bytes_.data() + (v.data - other.bytes_.data());
}

safetensors& safetensors::operator=(const safetensors& other) {
  if (this != &other) *this = safetensors(other);
  return *this;
}

const tensor_view* safetensors::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &views_[it->second];
}

std::vector<float> to_f32(const tensor_view& t) {
  const size_t elem = dtype_bytes(t.dtype);
  if (t.dtype != "F32" && t.dtype != "F16" && t.dtype != "BF16")
    fail("tensor " + quote(t.name) + " has dtype " + quote(t.dtype) +
         "; to_f32 supports F32, F16 and BF16");
  if (t.nbytes % elem != 0)
    fail("tensor " + quote(t.name) + ": " + std::to_string(t.nbytes) +
         " bytes is not a whole number of " + t.dtype + " elements");
  if (t.nbytes != 0 && t.data == nullptr) fail("tensor " + quote(t.name) + " has no data");
  const size_t n = t.nbytes / elem;
  std::vector<float> out(n);
  const uint8_t* p = t.data;
  if (t.dtype == "F32") {
    for (size_t i = 0; i < n; ++i) out[i] = detail::bits_to_f32(load_u32(p + 4 * i));
  } else if (t.dtype == "F16") {
    for (size_t i = 0; i < n; ++i) out[i] = detail::f16_to_f32(load_u16(p + 2 * i));
  } else {
    for (size_t i = 0; i < n; ++i) out[i] = detail::bf16_to_f32(load_u16(p + 2 * i));
  }
  return out;
}

std::vector<uint8_t> serialize(const std::vector<tensor_out>& tensors,
                               const std::map<std::string, std::string>& metadata) {
  // The header is written by hand so the keys keep the caller's order; nlohmann only escapes.
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [key, value] : metadata) {
      if (!first) header += ',';
      first = false;
      header += json_string(key, "__metadata__ key " + quote(key)) + ":" +
                json_string(value, "__metadata__ value for " + quote(key));
    }
    header += "}";
  }
  std::set<std::string_view> names;
  uint64_t offset = 0;
  for (const tensor_out& t : tensors) {
    const std::string who = "tensor " + quote(t.name);
    if (t.name == "__metadata__") fail(who + ": the name is reserved for the metadata");
    if (!names.insert(t.name).second) fail(who + ": duplicate name");
    const size_t elem = dtype_bytes(t.dtype);
    if (elem == 0) fail(who + ": unknown dtype " + quote(t.dtype));
    for (int64_t d : t.shape)
      if (d < 0) fail(who + ": shape " + shape_string(t.shape) + " has a negative dimension");
    const uint64_t nbytes = checked_nbytes(who, t.shape, t.dtype, elem);
    if (nbytes != t.nbytes)
      fail(who + ": " + std::to_string(t.nbytes) + " bytes do not match shape " +
           shape_string(t.shape) + " x " + t.dtype + " = " + std::to_string(nbytes) + " bytes");
    if (t.nbytes != 0 && t.data == nullptr) fail(who + ": data is null");
    if (header.size() > 1) header += ',';
    header += json_string(t.name, who + " name") + ":{\"dtype\":\"" + t.dtype + "\",\"shape\":[";
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (i) header += ',';
      header += std::to_string(t.shape[i]);
    }
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," +
              std::to_string(offset + nbytes) + "]}";
    offset += nbytes;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');  // keeps the data buffer 8-byte aligned
  if (header.size() > kMaxHeaderBytes)
    fail("header of " + std::to_string(header.size()) + " bytes exceeds the 100 MB limit");

  std::vector<uint8_t> out;
  out.reserve(kPrefixBytes + header.size() + offset);
  const uint64_t n = header.size();
  for (size_t i = 0; i < kPrefixBytes; ++i) out.push_back(uint8_t(n >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  for (const tensor_out& t : tensors) {
    const auto* p = static_cast<const uint8_t*>(t.data);
    if (t.nbytes) out.insert(out.end(), p, p + t.nbytes);
  }
  return out;
}

void save(const std::string& path, const std::vector<tensor_out>& tensors,
          const std::map<std::string, std::string>& metadata) {
  const std::vector<uint8_t> bytes = serialize(tensors, metadata);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out)
    throw error("safetensors: cannot open '" + path + "' for writing: " + std::strerror(errno));
  out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  out.close();
  if (!out) throw error("safetensors: cannot write '" + path + "': " + std::strerror(errno));
}

}  // namespace vattn::io
