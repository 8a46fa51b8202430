// ferry/flow/operation.hpp — typed definitions, inputs with provenance, and operations.
//
//     namespace fl = ferry::flow;
//     const fl::definition<std::string> line{"line"};
//     const fl::definition<int> lhs{"lhs"}, rhs{"rhs"}, result{"result"};
//     const fl::definition<bool> is_add{"is_add"};
//
//     fl::operation parse = fl::make_operation("parse")
//         .inputs(line).outputs(lhs, rhs, is_add)
//         .implement([](const std::string& s) { return std::tuple{1, 2, true}; });  // on a pool
//     fl::operation add = fl::make_operation("add")
//         .inputs(lhs, rhs).outputs(result).conditions(is_add)
//         .implement([](int a, int b) -> asio::awaitable<int> { co_return a + b; });  // on the loop
//
// Rules (spec/flow-operations.md O1–O4):
//  * A definition<T> is a named, typed port; the name is its identity across a flow. Options:
//    `lock` (O10), a default value (used when the definition has no value in a run context
//    that would otherwise finish), and a validator (a bool(const T&) predicate checked on
//    every value entering a context; a false is errc::invalid_input naming the definition).
//    T must be copy-constructible; values are shared read-only between the runs using them.
//  * An input is one value of a definition in one run context with its provenance: a unique
//    id, where it came from (a seed, or an operation instance's output port) and the inputs
//    it was derived from (the inputs of the run that produced it).
//  * make_operation(name) builds an operation: inputs (definitions, or port("name", def) for
//    a port named apart from its definition), outputs (expand(def): the implementation
//    returns a range, each element is one input), conditions (definitions of bool), stage
//    (processing, cleanup, output) and retry (N attempts in all; 0 and 1 mean one). The
//    types are checked when implement() is compiled: the implementation takes the inputs'
//    values in order (optionally after a `const run_info&`) and returns nothing (no
//    outputs), the value of the single output, or a tuple / tuple-like / aggregate with one
//    member per output. A std::optional result (when the output itself is not optional)
//    produces no outputs when empty.
//  * A callable returning asio::awaitable<R> runs on the orchestrator's loop; any other
//    callable runs on a thread pool through ferry::threaded (the orchestrator's pool, else
//    the loop's default pool), never on the loop.
//  * implement(obj) or implement<Impl>(args...): each orchestrator makes its own copy (or
//    instance) per operation instance. Optional members: `enter(flow::context&)` and
//    `exit(std::exception_ptr)` (void or asio::awaitable<void>) run once per orchestrator
//    per instance — enter before its first run, exit when the orchestrator closes, in
//    reverse order of entering; `scope(const run_info&)` makes a per-run object whose
//    operator() does the work instead of obj's own, destroyed when the run ends.
//  * op.as("name2") is the same operation under another instance name; instances in one
//    flow are independent (their own implementation objects, their own runs).
#pragma once

#include <ferry/flow/context.hpp>
#include <ferry/flow/detail/result_shape.hpp>
#include <ferry/flow/error.hpp>
#include <ferry/thread_pool.hpp>
#include <ferry/threaded.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <ranges>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <typeindex>
#include <utility>
#include <vector>

namespace ferry::flow {

class input;
using input_ptr = std::shared_ptr<const input>;
class orchestrator;

namespace detail {

using value_ptr = std::shared_ptr<const void>;

struct definition_info {
  std::string name;
  std::type_index type;
  std::string type_name;
  bool lock = false;
  value_ptr default_value;                     // null when there is none
  std::function<bool(const void*)> validator;  // empty when there is none
};

std::shared_ptr<const definition_info> make_definition_info(std::string name,
                                                            std::type_index type,
                                                            std::string type_name, bool lock,
                                                            value_ptr default_value,
                                                            std::function<bool(const void*)> v);
}  // namespace detail

// A type-erased definition: what flows, descriptions and registries hold.
class any_definition {
public:
  const std::string& name() const noexcept { return info_->name; }
  std::type_index type() const noexcept { return info_->type; }
  const std::string& type_name() const noexcept { return info_->type_name; }
  bool locked() const noexcept { return info_->lock; }
  bool has_default() const noexcept { return info_->default_value != nullptr; }
  const std::shared_ptr<const detail::definition_info>& info() const noexcept { return info_; }

  explicit any_definition(std::shared_ptr<const detail::definition_info> info)
      : info_(std::move(info)) {}

protected:
  std::shared_ptr<const detail::definition_info> info_;
};

template <class T>
struct definition_options {
  bool lock = false;
  std::optional<T> default_value{};
  std::function<bool(const T&)> validator{};
};

template <class T>
class definition : public any_definition {
  static_assert(std::is_copy_constructible_v<T> && !std::is_reference_v<T>,
                "ferry::flow::definition<T>: T must be a copy-constructible value type");

public:
  using value_type = T;

  explicit definition(std::string name, definition_options<T> opts = {})
      : any_definition(make(std::move(name), std::move(opts))) {}

private:
  static std::shared_ptr<const detail::definition_info> make(std::string name,
                                                             definition_options<T> opts) {
    detail::value_ptr def;
    if (opts.default_value) def = std::make_shared<const T>(std::move(*opts.default_value));
    std::function<bool(const void*)> v;
    if (opts.validator) {
      v = [f = std::move(opts.validator)](const void* p) { return f(*static_cast<const T*>(p)); };
    }
    return detail::make_definition_info(std::move(name), typeid(T), flow::type_name(typeid(T)),
                                        opts.lock, std::move(def), std::move(v));
  }
};

// Where an input came from: a seed (instance empty) or an operation instance's output port.
struct origin {
  std::string instance;
  std::string output;
  bool seed() const noexcept { return instance.empty(); }
};

class input {
public:
  input(std::uint64_t id, any_definition def, detail::value_ptr value, origin from,
        std::vector<input_ptr> parents)
      : id_(id), def_(std::move(def)), value_(std::move(value)), from_(std::move(from)),
        parents_(std::move(parents)) {}

  std::uint64_t id() const noexcept { return id_; }
  const any_definition& definition() const noexcept { return def_; }
  const origin& from() const noexcept { return from_; }
  const std::vector<input_ptr>& parents() const noexcept { return parents_; }
  const void* raw() const noexcept { return value_.get(); }
  const detail::value_ptr& shared_value() const noexcept { return value_; }

  template <class T>
  const T& value() const {
    if (std::type_index(typeid(T)) != def_.type()) {
      throw error(make_error_code(errc::type_mismatch),
                  "input of '" + def_.name() + "' holds " + def_.type_name() + ", not " +
                      flow::type_name(typeid(T)));
    }
    return *static_cast<const T*>(value_.get());
  }

private:
  std::uint64_t id_;
  any_definition def_;
  detail::value_ptr value_;
  origin from_;
  std::vector<input_ptr> parents_;
};

// A typed id of one run context (one input set in one orchestrator run).
struct run_context_id {
  std::uint64_t value = 0;
  friend bool operator==(run_context_id, run_context_id) = default;
  friend auto operator<=>(run_context_id, run_context_id) = default;
};

// What an implementation may learn about the run it is doing.
struct run_info {
  run_context_id context{};
  std::string context_name;
  std::string instance;
  unsigned attempt = 1;            // 1 for the first attempt, 2 for the first retry...
  std::vector<input_ptr> inputs;   // in port order
  flow::context* scope = nullptr;  // the orchestrator's flow::context
  thread_pool* pool = nullptr;     // where plain functions run (null: the loop's default)
  // Every value of a definition in this run context so far (arrival order).
  std::function<std::vector<input_ptr>(std::string_view definition)> context_values{};
};

enum class stage { processing, cleanup, output };

struct port {
  std::string name;
  any_definition def;
  bool expand = false;
};

namespace detail {

struct produced {
  std::size_t port;  // index into the operation's outputs
  value_ptr value;
};

// One implementation object of one operation instance in one orchestrator.
class implementation_base {
public:
  virtual ~implementation_base() = default;
  virtual asio::awaitable<void> enter(flow::context& scope) = 0;
  virtual asio::awaitable<void> exit(std::exception_ptr e) = 0;
  virtual asio::awaitable<std::vector<produced>> run(const run_info& info) = 0;
};

struct operation_info {
  std::string name;
  std::vector<port> inputs;
  std::vector<port> outputs;
  std::vector<any_definition> conditions;
  flow::stage stage = stage::processing;
  unsigned retry = 1;
  std::function<std::unique_ptr<implementation_base>()> make;  // empty: not implemented
};

template <class... Ts>
struct type_list {};

template <class T, bool Expand>
struct out_port {
  using type = T;
  static constexpr bool expand = Expand;
};

}  // namespace detail

// An operation instance: a description plus an implementation, under an instance name.
class operation {
public:
  operation(std::shared_ptr<const detail::operation_info> info, std::string instance)
      : info_(std::move(info)), instance_(std::move(instance)) {}

  const std::string& name() const noexcept { return info_->name; }
  const std::string& instance() const noexcept { return instance_; }
  const std::vector<port>& inputs() const noexcept { return info_->inputs; }
  const std::vector<port>& outputs() const noexcept { return info_->outputs; }
  const std::vector<any_definition>& conditions() const noexcept { return info_->conditions; }
  flow::stage stage() const noexcept { return info_->stage; }
  unsigned retry() const noexcept { return info_->retry; }
  const std::shared_ptr<const detail::operation_info>& info() const noexcept { return info_; }

  // The same operation under another instance name.
  operation as(std::string instance_name) const { return operation(info_, std::move(instance_name)); }

private:
  std::shared_ptr<const detail::operation_info> info_;
  std::string instance_;
};

template <class T>
struct port_spec {
  std::string name;
  definition<T> def;
};
template <class T>
struct expand_spec {
  std::string name;
  definition<T> def;
};

template <class T>
port_spec<T> named_port(std::string name, const definition<T>& def) {
  return {std::move(name), def};
}
template <class T>
expand_spec<T> expand(const definition<T>& def) {
  return {def.name(), def};
}
template <class T>
expand_spec<T> expand(std::string name, const definition<T>& def) {
  return {std::move(name), def};
}

namespace detail {

template <class T>
struct in_type;
template <class T>
struct in_type<definition<T>> {
  using type = T;
};
template <class T>
struct in_type<port_spec<T>> {
  using type = T;
};

template <class T>
struct out_type;
template <class T>
struct out_type<definition<T>> {
  using type = out_port<T, false>;
};
template <class T>
struct out_type<port_spec<T>> {
  using type = out_port<T, false>;
};
template <class T>
struct out_type<expand_spec<T>> {
  using type = out_port<T, true>;
};

template <class T>
port to_port(const definition<T>& d) {
  return {d.name(), d, false};
}
template <class T>
port to_port(const port_spec<T>& p) {
  return {p.name, p.def, false};
}
template <class T>
port to_port(const expand_spec<T>& p) {
  return {p.name, p.def, true};
}

template <class T>
concept has_enter = requires(T& t, flow::context& c) { t.enter(c); };
template <class T>
concept has_exit = requires(T& t, std::exception_ptr e) { t.exit(e); };
template <class T>
concept has_scope = requires(T& t, const run_info& r) { t.scope(r); };


// One output port's value(s) into `out`.
template <class Port, class V>
void emit_one(std::vector<produced>& out, std::size_t index, V&& v) {
  using T = typename Port::type;
  if constexpr (Port::expand) {
    static_assert(std::ranges::input_range<std::remove_reference_t<V>>,
                  "ferry::flow: an expand(...) output needs a range result for that port");
    static_assert(std::is_convertible_v<std::ranges::range_reference_t<std::remove_reference_t<V>>, T>,
                  "ferry::flow: the range's elements do not convert to the expand output's type");
    for (auto&& e : v) out.push_back({index, std::make_shared<const T>(static_cast<T>(e))});
  } else {
    static_assert(std::is_convertible_v<V&&, T>,
                  "ferry::flow: the implementation's result does not convert to the output "
                  "definition's type");
    out.push_back({index, std::make_shared<const T>(std::forward<V>(v))});
  }
}

template <class... Outs, class Tuple, std::size_t... I>
void emit_tuple(std::vector<produced>& out, Tuple&& t, std::index_sequence<I...>) {
  (emit_one<Outs>(out, I, std::get<I>(std::forward<Tuple>(t))), ...);
}

template <class... Outs, class R>
std::vector<produced> emit(R&& r) {
  std::vector<produced> out;
  using D = std::decay_t<R>;
  constexpr std::size_t n = sizeof...(Outs);
  if constexpr (is_optional<D>::value && n == 1 &&
                !is_optional<typename std::tuple_element_t<0, std::tuple<Outs...>>::type>::value) {
    if (r) emit_one<Outs...>(out, 0, std::move(*r));
  } else if constexpr (is_optional<D>::value && n > 1) {
    if (r) out = emit<Outs...>(std::move(*r));
  } else if constexpr (n == 1) {
    emit_one<Outs...>(out, 0, std::forward<R>(r));
  } else if constexpr (tuple_like_of_size<D, n>()) {
    emit_tuple<Outs...>(out, std::forward<R>(r), std::make_index_sequence<n>{});
  } else if constexpr (std::is_aggregate_v<D>) {
    static_assert(member_count<D>() == n,
                  "ferry::flow: the implementation returns an aggregate whose member count is "
                  "not the operation's number of outputs");
    emit_tuple<Outs...>(out, members<n>(r), std::make_index_sequence<n>{});
  } else {
    static_assert(n == 1,
                  "ferry::flow: with several outputs the implementation must return a tuple, "
                  "a tuple-like type or an aggregate with one member per output");
  }
  return out;
}

template <class F, class... Ins>
constexpr bool takes_run_info() {
  return std::is_invocable_v<F&, const run_info&, const Ins&...>;
}

template <class F, class... Ins>
constexpr bool invocable_with_inputs() {
  return takes_run_info<F, Ins...>() || std::is_invocable_v<F&, const Ins&...>;
}

template <class F, class... Ins, std::size_t... I>
decltype(auto) call_with_inputs(F& f, const run_info& info, std::index_sequence<I...>) {
  if constexpr (takes_run_info<F, Ins...>()) {
    return std::invoke(f, info, *static_cast<const Ins*>(info.inputs[I]->raw())...);
  } else {
    return std::invoke(f, *static_cast<const Ins*>(info.inputs[I]->raw())...);
  }
}

template <class F, class... Ins>
using call_result_t = decltype(call_with_inputs<F, Ins...>(
    std::declval<F&>(), std::declval<const run_info&>(), std::index_sequence_for<Ins...>{}));

// The coroutines that await a run live in src/flow/orchestrator.cpp and see only these
// type-erased callables: no coroutine frame in a header holds a user's type (g++ warns,
// -Wsubobject-linkage, when one from an anonymous namespace lands in a header's frame).
using emit_callback = std::function<void(std::exception_ptr, std::vector<produced>)>;
using spawn_fn = std::function<void(const asio::any_io_executor&, asio::cancellation_slot,
                                    emit_callback)>;

// Runs `job` on `pool` (null: the loop's default pool) through ferry::threaded.
asio::awaitable<std::vector<produced>> run_blocking(thread_pool* pool,
                                                    std::function<std::vector<produced>()> job);
// Starts a coroutine with `start` (co_spawn on the given executor and slot) and waits for it;
// cancelling the waiter cancels the coroutine.
asio::awaitable<std::vector<produced>> run_spawned(spawn_fn start);
asio::awaitable<void> ready();

// One run of `f` (the implementation or its per-run scope), kept alive by `keep`.
template <class... Outs, class... Ins, class F>
asio::awaitable<std::vector<produced>> invoke_run(F& f, std::shared_ptr<void> keep,
                                                  const run_info& info, type_list<Outs...>,
                                                  type_list<Ins...>) {
  using R = call_result_t<F, Ins...>;
  if constexpr (is_awaitable<std::decay_t<R>>::value) {
    using A = std::decay_t<R>;
    using V = typename awaitable_value<A>::type;
    if constexpr (std::is_void_v<V>) {
      static_assert(sizeof...(Outs) == 0,
                    "ferry::flow: the implementation returns nothing but the operation has "
                    "outputs");
    }
    auto aw = std::make_shared<A>(call_with_inputs<F, Ins...>(f, info, std::index_sequence_for<Ins...>{}));
    return run_spawned([aw, keep](const asio::any_io_executor& ex, asio::cancellation_slot slot,
                                  emit_callback done) {
      if constexpr (std::is_void_v<V>) {
        asio::co_spawn(ex, std::move(*aw),
                       asio::bind_cancellation_slot(slot, [done, keep](std::exception_ptr e) {
                         done(e, {});
                       }));
      } else {
        asio::co_spawn(ex, std::move(*aw),
                       asio::bind_cancellation_slot(slot, [done, keep](std::exception_ptr e, V v) {
                         if (e) {
                           done(e, {});
                           return;
                         }
                         std::vector<produced> out;
                         try {
                           out = emit<Outs...>(std::move(v));
                         } catch (...) {
                           done(std::current_exception(), {});
                           return;
                         }
                         done(nullptr, std::move(out));
                       }));
      }
    });
  } else {
    if constexpr (std::is_void_v<R>) {
      static_assert(sizeof...(Outs) == 0,
                    "ferry::flow: the implementation returns nothing but the operation has "
                    "outputs");
    }
    return run_blocking(info.pool, [&f, &info, keep]() -> std::vector<produced> {
      if constexpr (std::is_void_v<R>) {
        call_with_inputs<F, Ins...>(f, info, std::index_sequence_for<Ins...>{});
        return {};
      } else {
        return emit<Outs...>(call_with_inputs<F, Ins...>(f, info, std::index_sequence_for<Ins...>{}));
      }
    });
  }
}

template <class R>
asio::awaitable<void> as_awaitable(R&& r) {
  if constexpr (is_awaitable<std::decay_t<R>>::value) {
    return std::forward<R>(r);
  } else {
    return ready();
  }
}

template <class Impl, class Ins, class Outs>
class implementation final : public implementation_base {
public:
  template <class... A>
  explicit implementation(A&&... a) : impl_(std::make_shared<Impl>(std::forward<A>(a)...)) {}

  asio::awaitable<void> enter(flow::context& scope) override {
    if constexpr (has_enter<Impl>) {
      if constexpr (std::is_void_v<decltype(impl_->enter(scope))>) {
        impl_->enter(scope);
        return ready();
      } else {
        return as_awaitable(impl_->enter(scope));
      }
    } else {
      return ready();
    }
  }
  asio::awaitable<void> exit(std::exception_ptr e) override {
    if constexpr (has_exit<Impl>) {
      if constexpr (std::is_void_v<decltype(impl_->exit(e))>) {
        impl_->exit(e);
        return ready();
      } else {
        return as_awaitable(impl_->exit(e));
      }
    } else {
      return ready();
    }
  }
  asio::awaitable<std::vector<produced>> run(const run_info& info) override {
    if constexpr (has_scope<Impl>) {
      using S = decltype(impl_->scope(info));
      auto scope = std::make_shared<S>(impl_->scope(info));
      S& s = *scope;
      return invoke_run(s, std::shared_ptr<void>(std::move(scope)), info, Outs{}, Ins{});
    } else {
      return invoke_run(*impl_, impl_, info, Outs{}, Ins{});
    }
  }

private:
  std::shared_ptr<Impl> impl_;
};

template <class Impl, class... Ins>
constexpr void check_implementation() {
  if constexpr (has_scope<Impl>) {
    using S = decltype(std::declval<Impl&>().scope(std::declval<const run_info&>()));
    static_assert(invocable_with_inputs<S, Ins...>(),
                  "ferry::flow: the per-run scope is not callable with the operation's input "
                  "values (in order, optionally after a const run_info&)");
  } else {
    static_assert(invocable_with_inputs<Impl, Ins...>(),
                  "ferry::flow: the implementation is not callable with the operation's input "
                  "values (in order, optionally after a const run_info&)");
  }
}

}  // namespace detail

template <class Ins, class Outs>
class operation_builder;

// Builds an operation step by step; implement() checks the types and finishes it.
template <class... Ins, class... Outs>
class operation_builder<detail::type_list<Ins...>, detail::type_list<Outs...>> {
public:
  explicit operation_builder(std::shared_ptr<detail::operation_info> info)
      : info_(std::move(info)) {}

  template <class... Ps>
  auto inputs(const Ps&... ps) && {
    (info_->inputs.push_back(detail::to_port(ps)), ...);
    return operation_builder<detail::type_list<Ins..., typename detail::in_type<Ps>::type...>,
                             detail::type_list<Outs...>>(std::move(info_));
  }

  template <class... Ps>
  auto outputs(const Ps&... ps) && {
    (info_->outputs.push_back(detail::to_port(ps)), ...);
    return operation_builder<detail::type_list<Ins...>,
                             detail::type_list<Outs..., typename detail::out_type<Ps>::type...>>(
        std::move(info_));
  }

  template <class... Cs>
  operation_builder&& conditions(const definition<Cs>&... cs) && {
    static_assert((std::is_same_v<Cs, bool> && ...),
                  "ferry::flow: conditions are definitions of bool");
    (info_->conditions.push_back(cs), ...);
    return std::move(*this);
  }

  operation_builder&& stage(flow::stage s) && {
    info_->stage = s;
    return std::move(*this);
  }

  // N attempts in all (0 and 1: one attempt).
  operation_builder&& retry(unsigned attempts) && {
    info_->retry = attempts == 0 ? 1 : attempts;
    return std::move(*this);
  }

  // Each orchestrator copies `impl` once per instance of this operation.
  template <class F>
  operation implement(F impl) && {
    static_assert(std::is_copy_constructible_v<F>,
                  "ferry::flow: implement(obj) copies obj per orchestrator; use "
                  "implement<Impl>(args...) for a move-only implementation");
    detail::check_implementation<F, Ins...>();
    info_->make = [impl = std::move(impl)]() -> std::unique_ptr<detail::implementation_base> {
      return std::make_unique<detail::implementation<F, detail::type_list<Ins...>,
                                                     detail::type_list<Outs...>>>(impl);
    };
    return finish();
  }

  // Each orchestrator constructs Impl(args...) once per instance of this operation.
  template <class Impl, class... A>
  operation implement(A... args) && {
    detail::check_implementation<Impl, Ins...>();
    info_->make = [... args = std::move(args)]() -> std::unique_ptr<detail::implementation_base> {
      return std::make_unique<detail::implementation<Impl, detail::type_list<Ins...>,
                                                     detail::type_list<Outs...>>>(args...);
    };
    return finish();
  }

private:
  operation finish() {
    std::string name = info_->name;
    return operation(std::move(info_), std::move(name));
  }

  std::shared_ptr<detail::operation_info> info_;
};

// The start of every operation: make_operation("name").inputs(...).outputs(...).implement(f).
operation_builder<detail::type_list<>, detail::type_list<>> make_operation(std::string name);

}  // namespace ferry::flow
