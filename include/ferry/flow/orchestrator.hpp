// ferry/flow/orchestrator.hpp — flows of operations and the orchestrator that runs them.
//
//     fl::dataflow calc({parse, add, mult}, {fl::get_single(result)}, {.seeds = {line}});
//     fl::context scope{io.get_executor()};
//     fl::orchestrator orch{scope, {.max_contexts = 8}};
//     auto done = co_await orch.run(calc, fl::input_set{"a", {fl::seed(line, "2 + 3")}},
//                                         fl::input_set{"b", {fl::seed(line, "4 * 5")}});
//     for (const auto& r : done) std::cout << r.name << " = " << r[sum] << '\n';
//     co_await orch.close();                       // implementations' exit(), newest first
//
// Rules (spec/flow-operations.md O5–O15):
//  * A flow wires inputs automatically by definition name: an input port is fed by every
//    value of its definition, whether an operation produced it or it was seeded. Explicit
//    wiring (flow_options::wiring) replaces that for one port with a list of sources — a
//    definition from anywhere, only from seeds, or only from one instance's output port.
//    Construction rejects duplicate instance names, unimplemented operations, one name used
//    with two types (naming both ends), wiring or outputs that name unknown instances,
//    ports or definitions, and — when strict (the default) — an input port that nothing can
//    fill: no operation outputs it, it is not in flow_options::seeds and has no default.
//  * run(flow, input sets...) runs each input set in its own run context (a
//    run_context_id) and returns one context_result per set, in the order they completed;
//    stream() gives them one at a time as each completes. Inputs of one context are never
//    paired with another's. Seeds of definitions the flow does not know are refused.
//  * Dispatch (O7): an operation instance runs once per combination of its ports'
//    candidate inputs (the Cartesian product), keyed by (instance, context, sorted input
//    ids): a combination already run never runs again, an equal value with a new id does.
//  * Conditions (O8): an instance runs only when each of its condition definitions has a
//    value in the context and the most recent one is true; combinations skipped meanwhile
//    run when the conditions turn true. Instances without inputs start when the context
//    starts (O9), once, conditions permitting.
//  * Locks (O10): a run holding an input of a definition with `lock = true` owns that input
//    until it ends; runs take their locks in ascending input-id order, so they cannot
//    deadlock.
//  * Completion (O11): when nothing runs and nothing is runnable, definitions with a default
//    value and no value get it (which may make more runnable); then cleanup-stage instances
//    run, then output-stage ones, then the output specs are computed: get_single (pick::only
//    — more than one value is an error — or first / last), get_multi (all, in arrival
//    order, possibly none), group_by(values, by) and associate(key, value) (each value
//    under its nearest ancestor of the other definition, through provenance). A spec with
//    no value to show is errc::output_missing naming the context and the definition.
//  * Errors (O12): an attempt that throws is retried up to the operation's retry count.
//    Strict (default): the first failure cancels the context's other runs and the context
//    fails with operation_error (instance, its inputs, the cause). Non-strict: the failure
//    goes to on_error (default: one line on stderr) and into context_result::errors, and
//    the context goes on.
//  * max_contexts (O13, default 64) contexts run at once; the rest wait their turn.
//  * Subflows (O14): make_subflow(name, child, inputs, outputs, forward) is an operation that
//    runs `child` in a new context seeded with its inputs and with the parent context's
//    values of the `forward` definitions (those present when it starts); its outputs are
//    the child context's values of the output definitions.
//  * Descriptions (O15): load_flow(json, registry) builds a flow from JSON with operations
//    looked up by name in a registry; any defect is a flow::error naming it (fuzzed).
//  * The orchestrator belongs to its scope's executor, like flow::context: run it on an
//    io_context run by one thread, or a strand. Implementations are entered before a flow's
//    first context starts and exited by close() (exit(nullptr)) or when the scope closes
//    (exit gets the exception the scope closes with), newest first; closing first cancels
//    the contexts still running and waits for them.
#pragma once

#include <ferry/flow/context.hpp>
#include <ferry/flow/error.hpp>
#include <ferry/flow/operation.hpp>

#include <asio/awaitable.hpp>

#include <cstddef>
#include <exception>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <typeindex>
#include <utility>
#include <vector>

namespace ferry::flow {

// --- output specs ------------------------------------------------------------------------

enum class pick { only, first, last };

namespace detail {

// What an output spec sees of a finished context.
struct context_view {
  std::string context_name;
  std::function<const std::vector<input_ptr>&(const std::string& definition)> values;
};

struct output_info {
  std::string key;   // where the value goes in results
  std::string kind;  // get_single, get_multi, group_by, associate
  std::vector<any_definition> definitions;
  std::type_index result_type;
  std::function<value_ptr(const context_view&)> compute;
};

[[noreturn]] void throw_output_missing(const std::string& context, const std::string& kind,
                                       const std::string& definition, const std::string& why);

// The nearest ancestor (through parents, breadth first) of `in` holding `definition`.
input_ptr nearest_ancestor(const input_ptr& in, const std::string& definition);

}  // namespace detail

class output_spec {
public:
  explicit output_spec(std::shared_ptr<const detail::output_info> info) : info_(std::move(info)) {}
  const std::string& key() const noexcept { return info_->key; }
  const std::string& kind() const noexcept { return info_->kind; }
  const std::vector<any_definition>& definitions() const noexcept { return info_->definitions; }
  const std::shared_ptr<const detail::output_info>& info() const noexcept { return info_; }

private:
  std::shared_ptr<const detail::output_info> info_;
};

// An output spec whose value has type R: results[spec] is a const R&.
template <class R>
class output : public output_spec {
public:
  using result_type = R;
  using output_spec::output_spec;
};

template <class T>
output<T> get_single(const definition<T>& def, pick how = pick::only) {
  auto compute = [name = def.name(), how](const detail::context_view& v) -> detail::value_ptr {
    const auto& all = v.values(name);
    if (all.empty()) detail::throw_output_missing(v.context_name, "get_single", name, "no value");
    if (how == pick::only && all.size() > 1) {
      detail::throw_output_missing(v.context_name, "get_single", name,
                                   std::to_string(all.size()) +
                                       " values where pick::only wants one (use pick::first "
                                       "or pick::last)");
    }
    return (how == pick::last ? all.back() : all.front())->shared_value();
  };
  return output<T>(std::make_shared<const detail::output_info>(detail::output_info{
      def.name(), "get_single", {def}, typeid(T), std::move(compute)}));
}

template <class T>
output<std::vector<T>> get_multi(const definition<T>& def) {
  auto compute = [name = def.name()](const detail::context_view& v) -> detail::value_ptr {
    auto out = std::make_shared<std::vector<T>>();
    for (const auto& in : v.values(name)) out->push_back(in->template value<T>());
    return out;
  };
  return output<std::vector<T>>(std::make_shared<const detail::output_info>(detail::output_info{
      def.name(), "get_multi", {def}, typeid(std::vector<T>), std::move(compute)}));
}

// Each value of `values`, grouped under its nearest ancestor's value of `by`.
template <class V, class K>
output<std::map<K, std::vector<V>>> group_by(const definition<V>& values, const definition<K>& by) {
  auto compute = [vn = values.name(), kn = by.name()](const detail::context_view& v) -> detail::value_ptr {
    auto out = std::make_shared<std::map<K, std::vector<V>>>();
    for (const auto& in : v.values(vn)) {
      input_ptr key = detail::nearest_ancestor(in, kn);
      if (!key) {
        detail::throw_output_missing(v.context_name, "group_by", kn,
                                     "a value of '" + vn + "' has no ancestor of it");
      }
      (*out)[key->template value<K>()].push_back(in->template value<V>());
    }
    return out;
  };
  return output<std::map<K, std::vector<V>>>(
      std::make_shared<const detail::output_info>(detail::output_info{
          values.name() + " by " + by.name(), "group_by", {values, by},
          typeid(std::map<K, std::vector<V>>),
          std::move(compute)}));
}

// key value -> value, pairing each value of `value` with its nearest ancestor of `key`
// (a later value for the same key replaces an earlier one).
template <class K, class V>
output<std::map<K, V>> associate(const definition<K>& key, const definition<V>& value) {
  auto compute = [kn = key.name(), vn = value.name()](const detail::context_view& v) -> detail::value_ptr {
    auto out = std::make_shared<std::map<K, V>>();
    for (const auto& in : v.values(vn)) {
      input_ptr k = detail::nearest_ancestor(in, kn);
      if (!k) {
        detail::throw_output_missing(v.context_name, "associate", kn,
                                     "a value of '" + vn + "' has no ancestor of it");
      }
      out->insert_or_assign(k->template value<K>(), in->template value<V>());
    }
    return out;
  };
  return output<std::map<K, V>>(std::make_shared<const detail::output_info>(detail::output_info{
      key.name() + " -> " + value.name(), "associate", {key, value}, typeid(std::map<K, V>),
      std::move(compute)}));
}

// The output specs' values of one context, keyed by spec key: the definition's name for
// get_single / get_multi, "<values> by <by>" for group_by, "<key> -> <value>" for associate.
class results {
public:
  template <class R>
  const R& operator[](const output<R>& spec) const {
    return get<R>(spec.key());
  }
  template <class R>
  const R& get(std::string_view key) const {
    const entry& e = find(key);
    if (e.type != std::type_index(typeid(R))) throw_type(key, typeid(R));
    return *static_cast<const R*>(e.value.get());
  }
  bool contains(std::string_view key) const;
  std::size_t size() const noexcept { return values_.size(); }

  void set(std::string key, std::type_index type, detail::value_ptr value);

private:
  struct entry {
    std::type_index type;
    detail::value_ptr value;
  };
  const entry& find(std::string_view key) const;
  [[noreturn]] void throw_type(std::string_view key, const std::type_info& asked) const;
  std::map<std::string, entry, std::less<>> values_;
};

// --- flows -------------------------------------------------------------------------------

struct seed_value {
  any_definition def;
  detail::value_ptr value;
};

template <class T, class V>
seed_value seed(const definition<T>& def, V&& value) {
  return {def, std::make_shared<const T>(std::forward<V>(value))};
}

struct input_set {
  input_set(std::initializer_list<seed_value> s) : seeds(s) {}
  input_set(std::string n, std::vector<seed_value> s) : name(std::move(n)), seeds(std::move(s)) {}
  std::string name;  // empty: "context <id>"
  std::vector<seed_value> seeds;
};

// Where an explicitly wired port takes its inputs from.
struct source {
  std::string definition;                // the definition's name
  std::optional<std::string> instance;   // nullopt: anywhere; "": seeds only; else that instance
  static source any(std::string def) { return {std::move(def), std::nullopt}; }
  static source seed(std::string def) { return {std::move(def), std::string()}; }
  // Only values `instance` produced on its output port `output` (named like its port).
  static source output(std::string instance, std::string output) {
    return {std::move(output), std::move(instance)};
  }
};

struct wiring {
  std::string instance;
  std::string port;
  std::vector<source> sources;
};

struct flow_options {
  bool strict = true;                     // reject input ports nothing can fill
  std::vector<any_definition> seeds{};    // definitions callers will seed
  std::vector<ferry::flow::wiring> wiring{};           // explicit sources for some ports
};

namespace detail {
struct flow_impl;
}

class dataflow {
public:
  dataflow(std::vector<operation> operations, std::vector<output_spec> outputs = {},
       flow_options options = {});

  const std::vector<operation>& operations() const noexcept;
  const std::vector<output_spec>& outputs() const noexcept;
  const std::shared_ptr<const detail::flow_impl>& impl() const noexcept { return impl_; }

private:
  std::shared_ptr<const detail::flow_impl> impl_;
};

// An operation that runs `child` once per run in a new context (see O14 above).
operation make_subflow(std::string name, dataflow child, std::vector<any_definition> inputs,
                       std::vector<any_definition> outputs,
                       std::vector<any_definition> forward = {});

// Operations and definitions a JSON description may name.
class registry {
public:
  struct definition_entry {
    any_definition def;
    std::function<output_spec(pick)> single;  // get_single of it
    std::function<output_spec()> multi;       // get_multi of it
  };

  void add(operation op);  // under op.name(); a second one of that name is refused
  template <class T>
  void add(const definition<T>& def) {  // under def.name(); outputs may then name it
    add_definition({def, [def](pick p) -> output_spec { return get_single(def, p); },
                    [def]() -> output_spec { return get_multi(def); }});
  }
  const operation* find_operation(std::string_view name) const;
  const definition_entry* find_definition(std::string_view name) const;

private:
  void add_definition(definition_entry e);
  std::map<std::string, operation, std::less<>> operations_;
  std::map<std::string, definition_entry, std::less<>> definitions_;
};

// Builds a flow from a JSON description:
//   { "operations": { "<instance>": { "operation": "<registered name>",
//                                     "inputs": { "<port>": [ "<def>" | {"seed": "<def>"} |
//                                                 {"instance": "<i>", "output": "<port>"} ] } } },
//     "seeds": [ "<def>" ], "strict": true,
//     "outputs": [ { "get_single": "<def>", "pick": "only|first|last" }, { "get_multi": "<def>" } ] }
// "inputs" (explicit wiring) is optional: ports are wired by name otherwise. Definitions
// named by seeds and outputs must be registered (registry::add(definition)) or carried by a
// port of a listed operation; outputs need registered ones. Every defect is a ferry::error
// with errc::invalid_description naming it (or the flow's own construction error).
dataflow load_flow(std::string_view json, const registry& reg);

// --- running -----------------------------------------------------------------------------

struct context_result {
  run_context_id id{};
  std::string name;
  flow::results results;
  std::exception_ptr error;                 // the context failed (strict) or its outputs did
  std::vector<std::exception_ptr> errors;   // non-strict failures, in the order they happened
  std::vector<input_ptr> inputs;            // every input the context held, in arrival order

  bool ok() const noexcept { return !error; }
  void rethrow_if_failed() const {
    if (error) std::rethrow_exception(error);
  }
  template <class R>
  const R& operator[](const output<R>& spec) const {
    rethrow_if_failed();
    return results[spec];
  }
};

struct orchestrator_options {
  std::size_t max_contexts = 64;  // contexts running at once (0 is refused)
  bool strict = true;             // first failure fails the context (see O12)
  thread_pool* pool = nullptr;    // for plain-function implementations; null: the loop's default
  std::function<void(const operation_error&)> on_error{};  // non-strict reports; default stderr
};

namespace detail {
struct orchestrator_impl;
struct stream_state;
}  // namespace detail

// Results of one run() as each context completes.
class result_stream {
public:
  explicit result_stream(std::shared_ptr<detail::stream_state> s) noexcept : state_(std::move(s)) {}
  result_stream(result_stream&&) noexcept = default;
  result_stream& operator=(result_stream&&) noexcept;
  // Cancels the contexts still running (their results are dropped). Destroy it on the
  // orchestrator's executor, like every other use.
  ~result_stream();

  // The next context to complete; nullopt once every context has been returned.
  asio::awaitable<std::optional<context_result>> next();

private:
  void cancel_pending() noexcept;
  std::shared_ptr<detail::stream_state> state_;
};

class orchestrator {
public:
  explicit orchestrator(flow::context scope, orchestrator_options options = {});
  orchestrator(const orchestrator&) = delete;
  orchestrator& operator=(const orchestrator&) = delete;
  ~orchestrator();

  result_stream stream(const dataflow& f, std::vector<input_set> sets);

  asio::awaitable<std::vector<context_result>> run(const dataflow& f, std::vector<input_set> sets);

  template <class... Sets>
    requires(std::is_convertible_v<Sets, input_set> && ...)
  asio::awaitable<std::vector<context_result>> run(const dataflow& f, Sets... sets) {
    std::vector<input_set> v;
    (v.push_back(std::move(sets)), ...);
    return run(f, std::move(v));
  }

  // One input set; its results, or its failure thrown.
  asio::awaitable<results> run_one(const dataflow& f, input_set set);

  // Cancels running contexts, waits for them, then exits every entered implementation,
  // newest first. Idempotent. Errors from exit() are thrown together as a teardown_error.
  asio::awaitable<void> close();

  const flow::context& scope() const noexcept;

private:
  std::shared_ptr<detail::orchestrator_impl> impl_;
};

}  // namespace ferry::flow
