// fuzz_safetensors.cpp: libFuzzer target for the safetensors reader. Malformed input must raise
// vattn::error; any other exception, a crash or a sanitizer report is a bug.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "vattn/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto st = vattn::io::safetensors::from_bytes(std::vector<uint8_t>(data, data + size));
    volatile uint32_t sink = 0;  // keeps the reads from being optimized away
    for (const vattn::io::tensor_view& t : st.tensors()) {
      // Every byte a view claims must be readable (ASan checks the heap buffer's bounds).
      uint32_t sum = 0;
      for (size_t i = 0; i < t.nbytes; ++i) sum += t.data[i];
      sink = sink + sum;
      if (st.find(t.name) != &t) __builtin_trap();  // the index must agree with the list
      if (t.dtype == "F32" || t.dtype == "F16" || t.dtype == "BF16") {
        const std::vector<float> f = vattn::io::to_f32(t);
        if (f.size() * vattn::io::dtype_bytes(t.dtype) != t.nbytes) __builtin_trap();
        for (float x : f) sink = sink + (x == x ? 1u : 0u);
      }
    }
  } catch (const vattn::error&) {
    // expected for malformed input
  }
  return 0;
}
