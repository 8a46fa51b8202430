// ferry::flow's error category, type names and teardown_error (include/ferry/flow/error.hpp).
// Kept apart from the context machinery so that small tools (the fuzz target) can link it.
#include <ferry/flow/error.hpp>

#include <cstdlib>
#include <cxxabi.h>
#include <exception>
#include <memory>
#include <string>
#include <typeindex>
#include <typeinfo>
#include <vector>

namespace ferry::flow {

// --- errors ----------------------------------------------------------------------------------
namespace {
class flow_category final : public std::error_category {
public:
  const char* name() const noexcept override { return "ferry.flow"; }
  std::string message(int value) const override {
    switch (static_cast<errc>(value)) {
      case errc::resource_conflict: return "resource conflict";
      case errc::resource_not_found: return "resource not found";
      case errc::teardown_failed: return "teardown callbacks failed";
      case errc::context_closed: return "context closed";
      case errc::invalid_name: return "invalid resource name";
      case errc::null_resource: return "null resource";
      case errc::unknown_definition: return "unknown definition";
      case errc::type_mismatch: return "type mismatch";
      case errc::duplicate_instance: return "duplicate operation instance";
      case errc::unfilled_input: return "input nothing can fill";
      case errc::unknown_instance: return "unknown operation instance or port";
      case errc::not_implemented: return "operation not implemented";
      case errc::invalid_input: return "invalid input value";
      case errc::operation_failed: return "operation failed";
      case errc::output_missing: return "output missing";
      case errc::invalid_description: return "invalid flow description";
      case errc::duplicate_output: return "duplicate output key";
      case errc::missing_key: return "missing key";
      case errc::merge_conflict: return "merge conflict";
      case errc::no_branch_ran: return "no branch could run";
      case errc::never_runs: return "step can never run";
      case errc::invalid_mapping: return "invalid key mapping";
      case errc::undeclared_output: return "undeclared output key";
      case errc::unhandled_error_event: return "error event without a handler";
      case errc::failure_threshold: return "consecutive failure threshold reached";
      case errc::http_error: return "HTTP request failed";
      case errc::connection_failed: return "connection failed";
      case errc::handler_stopped: return "message handler stopped";
      case errc::no_source: return "manager has no source";
    }
    return "unknown ferry.flow error";
  }
};

std::string what_of(const std::exception_ptr& e) {
  if (!e) return "no exception";
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "unknown exception";
  }
}

std::string teardown_message(const std::vector<std::exception_ptr>& errors) {
  std::string msg = std::to_string(errors.size()) + " teardown callback(s) failed:";
  for (const auto& e : errors) {
    msg += " [";
    msg += what_of(e);
    msg += "]";
  }
  return msg;
}
}  // namespace

const std::error_category& error_category() noexcept {
  static const flow_category category;
  return category;
}

namespace {
std::string demangle(const char* mangled) {
  int status = 0;
  char* demangled = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string out = status == 0 && demangled ? demangled : mangled;
  std::free(demangled);  // NOLINT: allocated by the ABI with malloc
  return out;
}
}  // namespace

std::string type_name(const std::type_info& t) { return demangle(t.name()); }
std::string type_name(std::type_index t) { return demangle(t.name()); }

teardown_error::teardown_error(std::vector<std::exception_ptr> exceptions)
    : ferry::error(make_error_code(errc::teardown_failed), teardown_message(exceptions)),
      exceptions_(std::move(exceptions)) {}

unhandled_error_event::unhandled_error_event(std::string port, std::exception_ptr cause)
    : ferry::error(make_error_code(errc::unhandled_error_event),
                   "error event on '" + port + "' has no handler: " + what_of(cause)),
      port_(std::move(port)),
      cause_(std::move(cause)) {}

std::string describe_exception(const std::exception_ptr& e) { return what_of(e); }

}  // namespace ferry::flow
