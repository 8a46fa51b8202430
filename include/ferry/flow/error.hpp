// ferry/flow/error.hpp — the dataflow layer's error codes and exceptions.
//
// Every exception here derives from ferry::error (a std::system_error), so one catch clause
// sees the whole library; `e.code()` compares equal to a ferry::flow::errc value.
//
//     try { auto db = ctx.require<database>(); }
//     catch (const ferry::flow::resource_not_found& e) { e.type_name(); e.name(); }
#pragma once

#include <ferry/error.hpp>

#include <exception>
#include <memory>
#include <string>
#include <system_error>
#include <typeindex>
#include <typeinfo>
#include <vector>

namespace ferry::flow {

enum class errc {
  resource_conflict = 1,  // a (type, name) this context already holds, or a second factory
  resource_not_found,     // require<T>(name) found nothing
  teardown_failed,        // one or more teardown callbacks threw (see teardown_error)
  context_closed,         // the context is closed (or closing, for operations refused then)
  invalid_name,           // a resource name that is not a non-empty [A-Za-z0-9_]+ identifier
  null_resource,          // an empty value (null pointer) offered or produced as a resource
  // operations and the orchestrator
  unknown_definition,     // a name no definition of the flow carries
  type_mismatch,          // one definition name with two types, or a value of another type
  duplicate_instance,     // two operation instances with one name in a flow
  unfilled_input,         // strict: an input port nothing produces, seeds or defaults
  unknown_instance,       // wiring or a source naming an instance (or port) the flow lacks
  not_implemented,        // an operation built without implement()
  invalid_input,          // a definition's validator refused a value
  operation_failed,       // an operation instance failed (see operation_error)
  output_missing,         // an output spec found no (or too many) values in a context
  invalid_description,    // a JSON flow description that cannot be loaded
  duplicate_output,       // two output specs of a flow with one result key
  // step flows (bundle) and pipelines
  missing_key,            // bag::at(k) found no value under k's name
  merge_conflict,         // two concurrent branches gave one key different values
  no_branch_ran,          // strict: no branch of a par could start
  never_runs,             // strict: a step whose needs nothing before it can give
  invalid_mapping,        // map_input / map_output / bind naming a key the step lacks
  undeclared_output,      // a step's bag result holds a key it did not declare
  // processors, sources and the supervisor
  unhandled_error_event,  // an "error" port emitted with no handler connected
  failure_threshold,      // a source's consecutive failures reached its threshold
  http_error,             // an HTTP request failed (connection, parse, or a non-2xx status)
  connection_failed,      // a stream source gave up reconnecting after its failure limit
  handler_stopped,        // a message handler refused a publish after stop()
  no_source,              // a manager run without a source
};

const std::error_category& error_category() noexcept;

inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

// The readable (demangled) name of a type, for messages.
std::string type_name(const std::type_info& t);
std::string type_name(std::type_index t);

// what() of the exception `e` holds ("unknown exception" for a non-std one), for messages.
std::string describe_exception(const std::exception_ptr& e);

class resource_conflict : public ferry::error {
public:
  resource_conflict(const std::string& type, const std::string& name, const std::string& what)
      : ferry::error(make_error_code(errc::resource_conflict), what), type_(type), name_(name) {}
  const std::string& type_name() const noexcept { return type_; }
  const std::string& name() const noexcept { return name_; }

private:
  std::string type_;
  std::string name_;
};

class resource_not_found : public ferry::error {
public:
  resource_not_found(const std::string& type, const std::string& name)
      : ferry::error(make_error_code(errc::resource_not_found),
                     "no resource of type " + type + " named '" + name + "'"),
        type_(type),
        name_(name) {}
  const std::string& type_name() const noexcept { return type_; }
  const std::string& name() const noexcept { return name_; }

private:
  std::string type_;
  std::string name_;
};

// Every exception the teardown callbacks of one close() threw, in the order they ran.
class teardown_error : public ferry::error {
public:
  explicit teardown_error(std::vector<std::exception_ptr> exceptions);
  const std::vector<std::exception_ptr>& exceptions() const noexcept { return exceptions_; }

private:
  std::vector<std::exception_ptr> exceptions_;
};

// bag::at(k) found nothing under k's name.
class missing_key : public ferry::error {
public:
  explicit missing_key(std::string key)
      : ferry::error(make_error_code(errc::missing_key), "no value for key '" + key + "' in the bag"),
        key_(std::move(key)) {}
  const std::string& key() const noexcept { return key_; }

private:
  std::string key_;
};

// Two concurrent branches of a par gave one key different values.
class merge_conflict : public ferry::error {
public:
  merge_conflict(std::string key, std::string first_step, std::string second_step)
      : ferry::error(make_error_code(errc::merge_conflict),
                     "key '" + key + "' was given different values by steps '" + first_step +
                         "' and '" + second_step + "'"),
        key_(std::move(key)),
        first_(std::move(first_step)),
        second_(std::move(second_step)) {}
  const std::string& key() const noexcept { return key_; }
  const std::string& first_step() const noexcept { return first_; }
  const std::string& second_step() const noexcept { return second_; }

private:
  std::string key_;
  std::string first_;
  std::string second_;
};

// emit(port, e) on a port named "error" with no handler connected (A3): the error would
// otherwise be lost. cause() is the exception that was emitted.
class unhandled_error_event : public ferry::error {
public:
  unhandled_error_event(std::string port, std::exception_ptr cause);
  const std::string& port() const noexcept { return port_; }
  const std::exception_ptr& cause() const noexcept { return cause_; }

private:
  std::string port_;
  std::exception_ptr cause_;
};

class input;

// An operation instance failed in a run context: which one, on which inputs, and why.
class operation_error : public ferry::error {
public:
  operation_error(std::string instance, std::string context,
                  std::vector<std::shared_ptr<const input>> inputs, std::exception_ptr cause);
  const std::string& instance() const noexcept { return instance_; }
  const std::string& context_name() const noexcept { return context_; }
  const std::vector<std::shared_ptr<const input>>& inputs() const noexcept { return inputs_; }
  const std::exception_ptr& cause() const noexcept { return cause_; }

private:
  std::string instance_;
  std::string context_;
  std::vector<std::shared_ptr<const input>> inputs_;
  std::exception_ptr cause_;
};

}  // namespace ferry::flow

template <>
struct std::is_error_code_enum<ferry::flow::errc> : std::true_type {};
