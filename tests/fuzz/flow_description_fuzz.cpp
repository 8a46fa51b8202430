// libFuzzer target for the JSON flow-description parser behind ferry::flow::load_flow
// (spec O15: a bad description is a clear error, never a crash). Built by the `fuzz` preset
// (clang, ASan+UBSan, -fsanitize=fuzzer) from the parser's own sources, which need nothing
// but the standard library and nlohmann/json; CI runs it for a bounded time from
// tests/fuzz/corpus/. Name resolution against a registry (load_flow's second half) is plain
// map lookups and is covered by tests/flow_operations_test.cpp.
//
// The contract checked: parsing either returns a description or throws ferry::error with
// errc::invalid_description. Any other exception escapes and libFuzzer reports it as a
// crash, as it does every sanitizer finding.
#include "flow/flow_description.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const auto d = ferry::flow::detail::parse_flow_description(text);
    // A parsed description is internally consistent: every wiring names a listed instance.
    for (const auto& w : d.wiring) {
      bool listed = false;
      for (const auto& o : d.operations) listed = listed || o.instance == w.instance;
      if (!listed || w.sources.empty()) std::abort();
    }
  } catch (const ferry::error& e) {
    if (e.code() != ferry::flow::make_error_code(ferry::flow::errc::invalid_description)) std::abort();
  }
  return 0;
}
