// ferry/flow/context.hpp — scopes holding typed resources and ordered async teardown.
//
//     ferry::flow::context root{io.get_executor()};
//     root.add_resource(std::make_shared<smtp_mailer>(cfg), "default",
//                       ferry::flow::types<mailer, smtp_mailer>);   // one value, two types
//     root.add_resource_factory<transaction>(                      // one value per context
//         [](ferry::flow::context& c) { return c.require<database>()->begin(); });
//     root.add_teardown_callback([db] { db->close(); });
//
//     co_await ferry::flow::scoped(root, [&](ferry::flow::context& request) -> asio::awaitable<void> {
//       auto tx = request.require<transaction>();                  // generated in `request`
//       request.add_teardown_callback([tx](std::exception_ptr e) { e ? tx->rollback() : tx->commit(); });
//       co_await handle(request);
//     });                                                          // closed here
//     co_await root.close();
//
// Rules (spec/flow-context.md R1–R11):
//  * Resources are keyed by (type, name); the name defaults to "default" and must match
//    [A-Za-z0-9_]+ (else errc::invalid_name). Values are held as std::shared_ptr<T>; a value
//    may be registered under several types at once with `types<A, B...>` (each must be T or
//    a base of T); a null pointer is refused (errc::null_resource). add_resource(T value)
//    wraps a plain value in a shared_ptr.
//  * A (type, name) this context already holds is a resource_conflict naming both; a child
//    may hold the same key (it shadows the parent's). A second factory for one key in one
//    context is a conflict too; a factory and a plain resource for the same key may coexist.
//  * A factory `shared_ptr<T>(context&)` runs on first lookup from a context and its value
//    is stored in that (requesting) context and reused there (R3).
//  * Lookup order (R4): a resource stored in this context; else the nearest factory for the
//    key in this context or an ancestor (its value is generated into this context); else
//    the nearest ancestor's resource.
//  * get<T>(name) → shared_ptr<T>, empty when nothing is found; require<T>(name) throws
//    resource_not_found naming type and name; `co_await request<T>(name, timeout)` waits
//    until the key appears here or in an ancestor (resource or factory), is cancellable
//    through its cancellation slot (operation_aborted) and gives up after the optional
//    timeout (ferry::errc::timed_out).
//  * Teardown callbacks (R6): `void()`, `void(std::exception_ptr)`, `asio::awaitable<void>()`
//    or `asio::awaitable<void>(std::exception_ptr)` — those taking the exception get the one
//    that ended the scope (the `pass_exception` form; `add_teardown_callback(fn,
//    pass_exception)` insists on it). close() runs them in reverse order of registration,
//    one at a time (a coroutine callback finishes before the next starts), all of them even
//    if some throw; the errors, in order, are thrown together as one teardown_error.
//  * Callbacks added while closing run after the current batch, again newest first (R7).
//    Adding callbacks or resources after close, closing twice, closing from inside a
//    teardown callback and looking up after close throw errc::context_closed; lookups
//    (factories too) keep working inside teardown callbacks.
//  * scoped(parent, block) runs block in a new child context and closes it on the way out,
//    passing block's exception to the callbacks, then rethrows it (R8). context_teardown
//    (R9) runs a set-up/teardown coroutine around one co_await of the closing signal.
//  * spawn(awaitable) runs a task under the context; close() cancels the tasks still
//    running (terminal cancellation) and awaits them before any teardown callback runs
//    (R10). A task's own failure (other than cancellation) is reported in close()'s
//    teardown_error.
//  * Threads (R11): the synchronous members (add_*, get, require, make_child) are
//    thread-safe. A context belongs to one executor: its spawned tasks run there, and
//    close(), request() and teardown coroutines must be awaited on it (an io_context run by
//    one thread or a strand), never concurrently from several threads.
//  * A context is a handle (copies share one scope); a child keeps its parent alive. A scope
//    destroyed with teardown callbacks never run is reported on stderr.
#pragma once

#include <ferry/detail/loop_waiters.hpp>
#include <ferry/error.hpp>
#include <ferry/flow/error.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/use_awaitable.hpp>

#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <typeindex>
#include <utility>
#include <vector>

namespace ferry::flow {

class context;

// Registers one value under several types: add_resource(p, "name", types<Iface, Impl>).
template <class... Ts>
struct types_t {};
template <class... Ts>
inline constexpr types_t<Ts...> types{};

// Insists that a teardown callback receives the closing exception.
struct pass_exception_t {};
inline constexpr pass_exception_t pass_exception{};

namespace detail {

template <class T>
inline constexpr bool is_shared_ptr_v = false;
template <class T>
inline constexpr bool is_shared_ptr_v<std::shared_ptr<T>> = true;

struct resource_key {
  std::type_index type;
  std::string name;
  friend bool operator<(const resource_key& a, const resource_key& b) noexcept {
    if (a.type != b.type) return a.type < b.type;
    return a.name < b.name;
  }
};

// One registered type of a value: its key and the pointer converted to that type.
using typed_value = std::pair<resource_key, std::shared_ptr<void>>;

struct factory_entry {
  // Produces the value (erased as its own type T) and its views as every registered type.
  std::function<std::vector<typed_value>(context&, const std::string& name)> make;
  std::string type_name;  // T's, for messages
};

struct teardown_callback {
  std::function<void(std::exception_ptr)> sync;
  std::function<asio::awaitable<void>(std::exception_ptr)> async;
};

class context_impl;

void check_name(std::string_view name);
[[noreturn]] void throw_null_resource(const std::string& type, std::string_view name);

template <class T, class... As>
std::vector<typed_value> typed_values(const std::shared_ptr<T>& p, const std::string& name) {
  std::vector<typed_value> out;
  if constexpr (sizeof...(As) == 0) {
    out.push_back({resource_key{typeid(T), name}, std::static_pointer_cast<void>(p)});
  } else {
    static_assert(((std::is_base_of_v<As, T> || std::is_same_v<As, T>) && ...),
                  "ferry::flow: every type in types<...> must be the value's type or a base");
    (out.push_back({resource_key{typeid(As), name},
                    std::static_pointer_cast<void>(std::static_pointer_cast<As>(p))}),
     ...);
  }
  return out;
}

}  // namespace detail

class context {
public:
  // A root context whose tasks run on `ex`.
  explicit context(asio::any_io_executor ex);
  template <class ExecutionContext>
    requires std::is_convertible_v<ExecutionContext&, asio::execution_context&>
  explicit context(ExecutionContext& ctx) : context(asio::any_io_executor(ctx.get_executor())) {}

  // A new child of this context (same executor unless given).
  context make_child() const;
  context make_child(asio::any_io_executor ex) const;

  asio::any_io_executor get_executor() const;
  // The parent, or nullopt for a root.
  std::optional<context> parent() const;
  bool closed() const noexcept;   // close() finished
  bool closing() const noexcept;  // close() started (and maybe finished)

  // --- resources ----------------------------------------------------------------------
  template <class T, class... As>
  void add_resource(std::shared_ptr<T> value, std::string name = "default",
                    types_t<As...> = {}) {
    detail::check_name(name);
    if (!value) detail::throw_null_resource(type_name(typeid(T)), name);
    add_values(detail::typed_values<T, As...>(value, name), type_name(typeid(T)));
  }

  template <class T, class... As>
    requires(!std::is_pointer_v<std::decay_t<T>> && !detail::is_shared_ptr_v<std::decay_t<T>>)
  void add_resource(T&& value, std::string name = "default", types_t<As...> tags = {}) {
    using V = std::decay_t<T>;
    add_resource(std::make_shared<V>(std::forward<T>(value)), std::move(name), tags);
  }

  // `factory(context&)` returns std::shared_ptr<T> (or a T, wrapped); registered under T,
  // or under each of As... when given.
  template <class T, class... As, class F>
  void add_resource_factory(F factory, std::string name = "default", types_t<As...> = {}) {
    detail::check_name(name);
    detail::factory_entry entry;
    entry.type_name = type_name(typeid(T));
    entry.make = [f = std::move(factory)](context& requester,
                                          const std::string& n) -> std::vector<detail::typed_value> {
      std::shared_ptr<T> p;
      if constexpr (std::is_convertible_v<std::invoke_result_t<F&, context&>, std::shared_ptr<T>>) {
        p = f(requester);
      } else {
        p = std::make_shared<T>(f(requester));
      }
      if (!p) detail::throw_null_resource(type_name(typeid(T)), n);
      return detail::typed_values<T, As...>(p, n);
    };
    std::vector<std::type_index> keys;
    if constexpr (sizeof...(As) == 0) {
      keys.push_back(typeid(T));
    } else {
      (keys.push_back(typeid(As)), ...);
    }
    add_factory(std::move(keys), std::move(name), std::move(entry));
  }

  template <class T>
  std::shared_ptr<T> get(std::string_view name = "default") const {
    return std::static_pointer_cast<T>(lookup(typeid(T), name));
  }

  template <class T>
  std::shared_ptr<T> require(std::string_view name = "default") const {
    std::shared_ptr<T> v = get<T>(name);
    if (!v) throw resource_not_found(type_name(typeid(T)), std::string(name));
    return v;
  }

  // Waits until a resource (or factory) of type T named `name` is available here or in an
  // ancestor. Cancellable; `timeout` bounds the wait (ferry::errc::timed_out).
  template <class T>
  asio::awaitable<std::shared_ptr<T>> request(
      std::string name = "default",
      std::optional<std::chrono::nanoseconds> timeout = std::nullopt) const {
    detail::check_name(name);
    std::optional<std::chrono::steady_clock::time_point> deadline;
    if (timeout) deadline = std::chrono::steady_clock::now() + *timeout;
    for (;;) {
      std::shared_ptr<T> v = get<T>(name);
      if (v) co_return v;
      std::error_code ec = co_await wait_for_key(typeid(T), name, deadline);
      if (ec == ferry::errc::timed_out) {
        throw ferry::error(ec, "ferry::flow::context::request: no resource of type " +
                                   type_name(typeid(T)) + " named '" + name +
                                   "' before the timeout");
      }
      if (ec) throw ferry::error(ec, "ferry::flow::context::request: cancelled");
    }
  }

  // --- teardown -------------------------------------------------------------------------
  template <class F>
  void add_teardown_callback(F fn) {
    add_callback(make_callback(std::move(fn)));
  }
  template <class F>
  void add_teardown_callback(F fn, pass_exception_t) {
    static_assert(std::is_invocable_v<F&, std::exception_ptr>,
                  "ferry::flow: a pass_exception teardown callback takes a std::exception_ptr");
    add_callback(make_callback(std::move(fn)));
  }

  // Cancels and awaits the spawned tasks, then runs the teardown callbacks (see the rules).
  asio::awaitable<void> close(std::exception_ptr exception = nullptr);

  // --- tasks ----------------------------------------------------------------------------
  // Runs `task` (an asio::awaitable<void>) on the context's executor until it finishes or
  // the context closes.
  void spawn(asio::awaitable<void> task);

private:
  explicit context(std::shared_ptr<detail::context_impl> impl) noexcept : impl_(std::move(impl)) {}
  friend class detail::context_impl;

  template <class F>
  static detail::teardown_callback make_callback(F fn) {
    detail::teardown_callback cb;
    if constexpr (std::is_invocable_v<F&, std::exception_ptr>) {
      using R = std::invoke_result_t<F&, std::exception_ptr>;
      if constexpr (std::is_same_v<R, asio::awaitable<void>>) {
        cb.async = std::move(fn);
      } else {
        cb.sync = [f = std::move(fn)](std::exception_ptr e) mutable { (void)f(std::move(e)); };
      }
    } else {
      static_assert(std::is_invocable_v<F&>,
                    "ferry::flow: a teardown callback is callable with () or (std::exception_ptr)");
      using R = std::invoke_result_t<F&>;
      if constexpr (std::is_same_v<R, asio::awaitable<void>>) {
        cb.async = [f = std::move(fn)](std::exception_ptr) mutable { return f(); };
      } else {
        cb.sync = [f = std::move(fn)](std::exception_ptr) mutable { (void)f(); };
      }
    }
    return cb;
  }

  void add_values(std::vector<detail::typed_value> values, const std::string& type) const;
  void add_factory(std::vector<std::type_index> keys, std::string name,
                   detail::factory_entry entry) const;
  std::shared_ptr<void> lookup(std::type_index type, std::string_view name) const;
  void add_callback(detail::teardown_callback cb) const;
  asio::awaitable<std::error_code> wait_for_key(
      std::type_index type, const std::string& name,
      std::optional<std::chrono::steady_clock::time_point> deadline) const;

  std::shared_ptr<detail::context_impl> impl_;
};

// Closes `child` after a scoped block; with a block failure the block's exception wins
// and a teardown failure is reported on stderr instead of being thrown.
asio::awaitable<void> close_after_block(context child, std::exception_ptr block_failure);

// Runs `block(child)` in a new child context of `parent` and closes the child on the way
// out (awaiting its teardown), passing block's exception to the callbacks; then returns
// block's result or rethrows its exception (R8). If only the teardown failed, its
// teardown_error is thrown.
template <class F>
auto scoped(const context& parent, F block)
    -> std::invoke_result_t<F&, context&> {
  using awaitable_type = std::invoke_result_t<F&, context&>;
  using R = typename awaitable_type::value_type;
  context child = parent.make_child();
  std::exception_ptr failure;
  std::optional<std::conditional_t<std::is_void_v<R>, int, R>> result;
  try {
    if constexpr (std::is_void_v<R>) {
      co_await block(child);
      result.emplace(0);
    } else {
      R value = co_await block(child);
      result.emplace(std::move(value));
    }
  } catch (...) {
    failure = std::current_exception();
  }
  asio::awaitable<void> closing = close_after_block(child, failure);
  co_await std::move(closing);
  if (failure) std::rethrow_exception(failure);
  if constexpr (!std::is_void_v<R>) co_return std::move(*result);
}

// The closing signal a context_teardown coroutine awaits once its set-up is done.
class closing_signal {
public:
  // Suspends until the context closes; returns the exception that ended it (or null).
  asio::awaitable<std::exception_ptr> wait();

  struct state;
  explicit closing_signal(std::shared_ptr<state> s) noexcept : state_(std::move(s)) {}

private:
  std::shared_ptr<state> state_;
};

// R9: runs `fn(ctx, closing)` (returning asio::awaitable<void>) on ctx's executor up to its
// `co_await closing.wait()`, then returns; when ctx closes, fn resumes with the closing
// exception, and the teardown waits for fn to finish (fn's exception joins the
// teardown_error). An exception thrown before the wait is rethrown here and nothing is
// registered. A fn that returns without waiting is simply done. On a closing or closed
// context it throws errc::context_closed without running fn; if the context closes while
// fn is still setting up, fn's teardown part runs at once (with that error as the closing
// exception) and context_closed is thrown.
asio::awaitable<void> context_teardown(
    const context& ctx, std::function<asio::awaitable<void>(context&, closing_signal)> fn);

}  // namespace ferry::flow
