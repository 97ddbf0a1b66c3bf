// safetensors.hpp: a bounds-checked reader and a writer for the safetensors file format, used to
// load KV caches and queries captured from real models and to save test data.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "vattn/vattn.hpp"

namespace vattn::io {

// One tensor of a parsed file. `data` points into the owning safetensors object and stays valid
// for as long as that object (or the object it was moved into) lives.
struct tensor_view {
  std::string name;
  std::string dtype;  // as spelled in the format: "F32", "F16", "BF16", "F64", "I32", "U8", ...
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // little-endian elements, not necessarily aligned
  size_t nbytes = 0;
};

// Element size in bytes of a safetensors dtype name; 0 for names the format does not define.
size_t dtype_bytes(std::string_view dtype);

class safetensors {
 public:
  safetensors() = default;  // no tensors, no metadata
  // Parses a whole file held in memory; throws vattn::error on any malformation.
  static safetensors from_bytes(std::vector<uint8_t> bytes);
  // Reads and parses a file; throws vattn::error naming the path when it cannot be read or parsed.
  static safetensors load(const std::string& path);

  // Copies re-point the views at the copy's own bytes; moves keep the heap buffer and the views.
  safetensors(const safetensors& other);
  safetensors& operator=(const safetensors& other);
  safetensors(safetensors&&) noexcept = default;
  safetensors& operator=(safetensors&&) noexcept = default;
  ~safetensors() = default;

  // Tensors in the order of their data in the file (the order serialize() wrote them in).
  const std::vector<tensor_view>& tensors() const { return views_; }
  const tensor_view* find(std::string_view name) const;  // nullptr if absent
  // The "__metadata__" string map (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::vector<uint8_t> bytes_;  // the whole file; views point into its heap buffer
  std::vector<tensor_view> views_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in views_
  std::map<std::string, std::string> metadata_;
};

// Converts an F32/F16/BF16 tensor to float; throws vattn::error naming the tensor for other dtypes.
std::vector<float> to_f32(const tensor_view& t);

// A tensor to write: `nbytes` bytes of little-endian elements at `data`.
struct tensor_out {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;
};

// Builds a file image: tensors are laid out in the given order; the header is padded with spaces
// to a multiple of 8 bytes so the data buffer starts 8-byte aligned. Throws vattn::error on
// inconsistent input (unknown dtype, size not matching the shape, duplicate names, ...).
std::vector<uint8_t> serialize(const std::vector<tensor_out>& tensors,
                               const std::map<std::string, std::string>& metadata = {});
// serialize() written to `path`; throws vattn::error naming the path on I/O failure.
void save(const std::string& path, const std::vector<tensor_out>& tensors,
          const std::map<std::string, std::string>& metadata = {});

}  // namespace vattn::io
