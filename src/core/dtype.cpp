// dtype.cpp: dtype names and sizes, and build information.
#include <string>
#include <thread>

#include "vattn/vattn.hpp"

#ifndef VATTN_VERSION
#define VATTN_VERSION "0.0.0"
#endif

namespace vattn {

size_t dtype_size(dtype t) {
  return t == dtype::f32 ? 4 : 2;
}

const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::f32:
      return "f32";
    case dtype::f16:
      return "f16";
    case dtype::bf16:
      return "bf16";
  }
  return "?";
}

dtype dtype_from_string(std::string_view s) {
  if (s == "f32" || s == "float32" || s == "F32") return dtype::f32;
  if (s == "f16" || s == "float16" || s == "F16") return dtype::f16;
  if (s == "bf16" || s == "bfloat16" || s == "BF16") return dtype::bf16;
  throw error("dtype must be f32, f16 or bf16, got '" + std::string(s) + "'");
}

const char* version() {
  return VATTN_VERSION;
}

int32_t hardware_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : int32_t(n);
}

}  // namespace vattn
