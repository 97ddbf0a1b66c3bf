// fuzz_config.cpp: libFuzzer target for vattn::parse_config. Bad text must raise vattn::error;
// a valid configuration must survive a to_string() / parse_config() round trip unchanged.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "vattn/vattn.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  vattn::config cfg;
  try {
    cfg = vattn::parse_config(text);
    cfg.validate();
  } catch (const vattn::error&) {
    return 0;  // rejected input: fine
  }
  // Outside the try on purpose: a valid configuration's own text must parse and validate, so
  // any exception from here on escapes and libFuzzer reports it.
  const std::string first = cfg.to_string();
  const vattn::config again = vattn::parse_config(first);
  again.validate();
  const std::string second = again.to_string();
  if (first != second) {
    std::fprintf(stderr, "to_string() is not stable:\n  input:  %.*s\n  first:  %s\n  second: %s\n",
                 int(text.size()), text.data(), first.c_str(), second.c_str());
    std::abort();
  }
  return 0;
}
