// ferry/flow/bundle.hpp — steps over keyword bags, composed with seq() and par() into a
// bundle that runs like one coroutine (the async-data-flow seed's DataFlow).
//
//     namespace fl = ferry::flow;
//     const fl::key<std::string> endpoint{"endpoint"}, query{"query"};
//     const fl::key<std::vector<int>> data{"data"}, data_a{"data_a"}, data_b{"data_b"};
//     const fl::key<int> status{"status"};
//
//     auto source = fl::step("source", fl::needs(endpoint, query), fl::gives(data),
//         [](const std::string& ep, const std::string& q) -> asio::awaitable<std::vector<int>> {
//           co_return co_await fetch(ep, q);                          // a coroutine: on the loop
//         });
//     auto merge = fl::step("merge", fl::needs(data_a, data_b), fl::gives(data),
//         [](const std::vector<int>& a, const std::vector<int>& b) { return zip(a, b); });  // a pool
//     auto store = fl::step("store", fl::needs(endpoint, data), fl::gives(status), write_rows);
//
//     fl::bundle flow{fl::seq(
//         fl::par(source.bind(endpoint, "a").map_output(data, data_a),
//                 source.bind(endpoint, "b").map_output(data, data_b)),
//         merge, store.bind(endpoint, "c"))};
//     fl::bag out = co_await flow(fl::bag{query("q1")});          // out.at(status)
//
// Rules (spec/flow-pipelines.md F1–F9):
//  * step(name, needs(keys...), gives(keys...), f): f takes the needed keys' values in order
//    (as `const T&` or by value) and returns nothing (no gives), the single given value, a
//    tuple / tuple-like / aggregate with one member per given key, a std::optional of those
//    (empty: it gives nothing) or a flow::bag holding any subset of the given keys (a name it
//    did not declare is errc::undeclared_output). f is called concurrently when calls
//    overlap, so it is invoked as const. A function returning asio::awaitable<R> runs on the
//    caller's executor; any other runs on a thread pool through ferry::threaded (the pool
//    given with .on(pool), else the loop's default pool), never on the loop; a plain
//    function whose first parameter is a std::stop_token is asked to stop when the call is
//    cancelled. Zero-argument steps run (F7).
//  * seq(a, b, ...) runs its elements in order; par(x, y, ...) runs its branches concurrently
//    and merges their outputs; elements are steps, seqs or pars, nested to any depth. A seq
//    branch of a par runs concurrently with its siblings (F2).
//  * Skipping (F3): a step whose needed keys are not all present is skipped and the bag
//    passes through. A par starts only the branches whose first step can run; when none can,
//    it is errc::no_branch_ran in strict mode and a pass-through otherwise. A needed key
//    present with another type is errc::type_mismatch, not a skip. With
//    `bundle_options::strict`, construction also rejects (errc::never_runs, naming the step
//    and the key) a step whose needs nothing before it can give, starting from
//    `bundle_options::inputs`.
//  * Merging (F4): the same key from two branches with equal values (operator==, or the same
//    shared value) is kept once; different values are flow::merge_conflict naming the key
//    and both steps.
//  * Visibility (F5), chosen per call (default: bundle_options::visible, itself `initial`):
//    `none` — after a step only its outputs are visible; `initial` — the call's initial
//    values plus the last step's outputs; `all` — everything given so far (a later value of
//    a key replaces an earlier one). Every call has its own bags: concurrent calls of one
//    bundle never see each other's values. The call returns the bag visible at the end.
//  * Mapping (F6): .map_input(param, from) reads a parameter from another key,
//    .map_output(given, to) writes a given key under another name, .bind(param, value) fixes
//    a parameter (it is no longer needed from the bag). Each returns a new step; a key the
//    step does not have, or a parameter both bound and mapped, is errc::invalid_mapping
//    naming the key.
//  * repeat(initial, {.period, .stop, .max_iterations}) runs the bundle again and again with
//    the same initial values until the stop token is triggered (checked between iterations
//    and during the period) — it then returns the number of completed iterations — or the
//    call is cancelled through Asio (operation_aborted) (F8).
//  * Errors (F9): a step's exception propagates unchanged. In a par the first failure
//    cancels the sibling branches (terminal cancellation: coroutines see operation_aborted,
//    plain functions taking a stop_token get a stop request) and is rethrown once all of
//    them have stopped. Cancelling a call cancels its running steps the same way.
//  * Threads: a call's coroutines run on the caller's executor, which must not run two
//    handlers at once (an io_context run by one thread, or a strand).
#pragma once

#include <ferry/flow/bag.hpp>
#include <ferry/flow/detail/result_shape.hpp>
#include <ferry/flow/error.hpp>
#include <ferry/thread_pool.hpp>

#include <asio/awaitable.hpp>
#include <asio/co_spawn.hpp>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <ranges>
#include <stop_token>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace ferry::flow {

template <class... T>
struct needs_list {
  std::tuple<const key<T>&...> keys;
};
template <class... T>
struct gives_list {
  std::tuple<const key<T>&...> keys;
};

// The keys a step reads, in the order its function takes them.
template <class... T>
needs_list<T...> needs(const key<T>&... k) {
  return {{k...}};
}
// The keys a step gives, in the order its result holds them.
template <class... T>
gives_list<T...> gives(const key<T>&... k) {
  return {{k...}};
}

namespace detail {

template <class... T>
struct types {};

// What one call of a step's function produced: one value per given key (null: not given),
// or a whole bag when the function returned one.
struct step_output {
  // One slot per given key; up to 4 without a heap allocation.
  class value_slots {
  public:
    void resize(std::size_t n) {
      size_ = n;
      if (n > inline_.size()) more_.resize(n - inline_.size());
    }
    std::size_t size() const noexcept { return size_; }
    std::shared_ptr<const void>& operator[](std::size_t i) noexcept {
      return i < inline_.size() ? inline_[i] : more_[i - inline_.size()];
    }

  private:
    std::array<std::shared_ptr<const void>, 4> inline_{};
    std::vector<std::shared_ptr<const void>> more_{};
    std::size_t size_ = 0;
  };
  value_slots values;
  std::optional<bag> dynamic;
};

// The typed part of a step: its function and the types around it. Everything else (names,
// mapping, scheduling) is type-erased in step_impl and lives in src/flow/bundle.cpp.
struct step_body {
  virtual ~step_body() = default;
  std::vector<key_spec> params;
  std::vector<key_spec> gives;
  std::vector<const value_ops*> give_ops;
  bool coroutine = false;
  bool partial = false;  // may give a subset of its keys (a bag or optional result)
  // A plain function, on a pool worker.
  virtual void call(const void* const* args, std::stop_token stop, step_output& out) const = 0;
  // A coroutine, on the caller's executor.
  virtual asio::awaitable<void> call_async(const void* const* args, step_output& out) const = 0;
};

template <class T>
struct is_bag : std::is_same<std::decay_t<T>, bag> {};

template <class... Outs, class V, std::size_t... I>
void store_tuple(step_output& out, V&& v, std::index_sequence<I...>) {
  ((out.values[I] = std::make_shared<const Outs>(std::get<I>(std::forward<V>(v)))), ...);
}

template <class... Outs, class R>
void store_result(step_output& out, R&& r) {
  using D = std::decay_t<R>;
  constexpr std::size_t n = sizeof...(Outs);
  if constexpr (is_bag<D>::value) {
    out.dynamic = std::forward<R>(r);
  } else if constexpr (is_optional<D>::value && n == 1 &&
                       !is_optional<std::tuple_element_t<0, std::tuple<Outs...>>>::value) {
    if (r) store_result<Outs...>(out, std::move(*r));
  } else if constexpr (is_optional<D>::value && n > 1) {
    if (r) store_result<Outs...>(out, std::move(*r));
  } else if constexpr (n == 1) {
    using T = std::tuple_element_t<0, std::tuple<Outs...>>;
    static_assert(std::is_convertible_v<R&&, T>,
                  "ferry::flow::step: the function's result does not convert to the given "
                  "key's type");
    out.values[0] = std::make_shared<const T>(std::forward<R>(r));
  } else if constexpr (tuple_like_of_size<D, n>()) {
    store_tuple<Outs...>(out, std::forward<R>(r), std::make_index_sequence<n>{});
  } else if constexpr (std::is_aggregate_v<D> && n > 1) {
    static_assert(member_count<D>() == n,
                  "ferry::flow::step: the function returns an aggregate whose member count is "
                  "not the number of given keys");
    store_tuple<Outs...>(out, members<n>(r), std::make_index_sequence<n>{});
  } else {
    static_assert(n == 1,
                  "ferry::flow::step: with several given keys the function must return a "
                  "tuple, a tuple-like type, an aggregate with one member per key, or a bag");
  }
}

template <class F, class... Ins>
inline constexpr bool step_takes_stop_v = std::is_invocable_v<const F&, std::stop_token, const Ins&...>;

template <class F, class... Ins>
struct step_result {
  using type = std::invoke_result_t<const F&, const Ins&...>;
};
template <class F, class... Ins>
  requires step_takes_stop_v<F, Ins...>
struct step_result<F, Ins...> {
  using type = std::invoke_result_t<const F&, std::stop_token, const Ins&...>;
};

template <class F, class Ins, class Outs>
class typed_body;

// Coroutine frames instantiated here may hold a caller's types; g++ 12 flags those from an
// anonymous namespace with -Wsubobject-linkage although an instantiation with such a type has
// internal linkage itself (no ODR hazard), so the warning is silenced for this template only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsubobject-linkage"
#endif
template <class F, class... Ins, class... Outs>
class typed_body<F, types<Ins...>, types<Outs...>> final : public step_body {
  using R = typename step_result<F, Ins...>::type;
  static constexpr bool is_coro = is_awaitable<std::decay_t<R>>::value;
  using V = typename awaitable_value<std::decay_t<R>>::type;

public:
  explicit typed_body(F f, std::vector<key_spec> p, std::vector<key_spec> g) : f_(std::move(f)) {
    params = std::move(p);
    gives = std::move(g);
    give_ops = {&ops_of<Outs>...};
    coroutine = is_coro;
    partial = is_bag<V>::value || (is_optional<std::decay_t<V>>::value &&
                                   !(sizeof...(Outs) == 1 && (is_optional<Outs>::value && ...)));
    if constexpr (std::is_void_v<V>) {
      static_assert(sizeof...(Outs) == 0,
                    "ferry::flow::step: the function returns nothing but the step gives keys");
    }
    if constexpr (is_bag<V>::value) {
      static_assert(sizeof...(Outs) != 0,
                    "ferry::flow::step: a function returning a bag must declare the keys it "
                    "may give with gives(...)");
    }
  }

  void call(const void* const* args, std::stop_token stop, step_output& out) const override {
    if constexpr (!is_coro) {
      if constexpr (std::is_void_v<V>) {
        invoke(args, std::move(stop), std::index_sequence_for<Ins...>{});
      } else {
        store_result<Outs...>(out, invoke(args, std::move(stop), std::index_sequence_for<Ins...>{}));
      }
    }
  }

  asio::awaitable<void> call_async(const void* const* args, step_output& out) const override {
    if constexpr (is_coro) {
      auto aw = invoke(args, std::stop_token{}, std::index_sequence_for<Ins...>{});
      if constexpr (std::is_void_v<V>) {
        co_await std::move(aw);
      } else {
        V v = co_await std::move(aw);
        store_result<Outs...>(out, std::move(v));
      }
    }
    co_return;
  }

private:
  template <std::size_t... I>
  decltype(auto) invoke(const void* const* args, std::stop_token stop,
                        std::index_sequence<I...>) const {
    if constexpr (step_takes_stop_v<F, Ins...>) {
      return std::invoke(f_, std::move(stop), *static_cast<const Ins*>(args[I])...);
    } else {
      return std::invoke(f_, *static_cast<const Ins*>(args[I])...);
    }
  }

  F f_;
};
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

struct step_impl;
struct node_impl;

template <class T>
std::shared_ptr<const void> make_value(T v) {
  return std::make_shared<const T>(std::move(v));
}

}  // namespace detail

class node;

// One function over a bag; see the rules above. A value type: copies share the function.
class step {
public:
  template <class... In, class... Out, class F>
  step(std::string name, needs_list<In...> in, gives_list<Out...> out, F f)
      : step(std::move(name), make_body(std::move(f), in, out)) {}
  template <class... In, class F>
  step(std::string name, needs_list<In...> in, F f)
      : step(std::move(name), std::move(in), gives_list<>{}, std::move(f)) {}
  template <class... Out, class F>
  step(std::string name, gives_list<Out...> out, F f)
      : step(std::move(name), needs_list<>{}, std::move(out), std::move(f)) {}
  template <class F>
    requires std::is_invocable_v<const F&> || std::is_invocable_v<const F&, std::stop_token>
  step(std::string name, F f) : step(std::move(name), needs_list<>{}, gives_list<>{}, std::move(f)) {}

  const std::string& name() const noexcept;
  // The bag names (and types) this step reads and writes, after mapping and binding.
  std::vector<key_spec> needs() const;
  std::vector<key_spec> gives() const;
  bool is_coroutine() const noexcept;

  // The same step with its plain function run on `pool`.
  step on(thread_pool& pool) const;
  // The same step under another name (for messages and conflicts).
  step renamed(std::string name) const;
  // Reads parameter `param` from the bag key `from`.
  template <class T>
  step map_input(const key<T>& param, const key<T>& from) const {
    return map_input_named(param.name(), from.name(), typeid(T));
  }
  // Writes the given key `given` under the key `to`.
  template <class T>
  step map_output(const key<T>& given, const key<T>& to) const {
    return map_output_named(given.name(), to.name(), typeid(T));
  }
  // Fixes parameter `param` to `value`; the step no longer needs it from the bag.
  template <class T, class U>
    requires std::constructible_from<T, U&&>
  step bind(const key<T>& param, U&& value) const {
    return bind_named(param.name(), detail::make_value<T>(T(std::forward<U>(value))),
                      &detail::ops_of<T>);
  }

  const std::shared_ptr<const detail::step_impl>& impl() const noexcept { return impl_; }

private:
  template <class F, class... In, class... Out>
  static std::shared_ptr<const detail::step_body> make_body(F f, const needs_list<In...>& in,
                                                            const gives_list<Out...>& out) {
    using FD = std::decay_t<F>;
    static_assert(std::is_invocable_v<const FD&, const In&...> ||
                      std::is_invocable_v<const FD&, std::stop_token, const In&...>,
                  "ferry::flow::step: the function cannot be called with the needed keys' "
                  "values in order (as const T&), optionally after a std::stop_token; note that "
                  "it is called as const, so a mutable lambda is refused");
    std::vector<key_spec> p, g;
    std::apply([&](const auto&... k) { (p.emplace_back(k), ...); }, in.keys);
    std::apply([&](const auto&... k) { (g.emplace_back(k), ...); }, out.keys);
    return std::make_shared<detail::typed_body<FD, detail::types<In...>, detail::types<Out...>>>(
        std::move(f), std::move(p), std::move(g));
  }

  step(std::string name, std::shared_ptr<const detail::step_body> body);
  explicit step(std::shared_ptr<const detail::step_impl> impl) : impl_(std::move(impl)) {}
  step map_input_named(const std::string& param, const std::string& from,
                       const std::type_info& type) const;
  step map_output_named(const std::string& given, const std::string& to,
                        const std::type_info& type) const;
  step bind_named(const std::string& param, std::shared_ptr<const void> value,
                  const detail::value_ops* ops) const;

  std::shared_ptr<const detail::step_impl> impl_;
};

// A step, a seq or a par: an element of a flow.
class node {
public:
  node(const step& s);  // NOLINT: a step is a node
  explicit node(std::shared_ptr<const detail::node_impl> impl) : impl_(std::move(impl)) {}
  // "source", "seq(a, b)", "par(x, seq(y, z))".
  std::string describe() const;
  const std::shared_ptr<const detail::node_impl>& impl() const noexcept { return impl_; }

private:
  std::shared_ptr<const detail::node_impl> impl_;
};

node seq(std::vector<node> elements);
node par(std::vector<node> branches);
template <class... N>
  requires(sizeof...(N) > 0 && (std::is_convertible_v<N, node> && ...))
node seq(N&&... elements) {
  return seq(std::vector<node>{node(std::forward<N>(elements))...});
}
template <class... N>
  requires(sizeof...(N) > 0 && (std::is_convertible_v<N, node> && ...))
node par(N&&... branches) {
  return par(std::vector<node>{node(std::forward<N>(branches))...});
}

enum class visibility {
  none,     // a step's outputs replace the bag
  initial,  // the call's initial values stay visible beside the last outputs
  all,      // everything accumulates
};

struct bundle_options {
  visibility visible = visibility::initial;
  // Runtime: a par none of whose branches can start is errc::no_branch_ran. Construction:
  // a step that can never run (starting from `inputs`) is errc::never_runs.
  bool strict = false;
  std::vector<key_spec> inputs = {};
};

// How bundle::stream feeds a flow from a stream of bags.
struct stream_options {
  std::size_t max_in_flight = 16;  // calls running at once (> 0)
  bool ordered = true;             // results reach the sink in source order
};

// A stream of bags for bundle::stream: the next one, or nullopt at the end.
using bag_source = std::function<asio::awaitable<std::optional<bag>>()>;
// Where bundle::stream hands each call's result, on the calling coroutine's executor.
using bag_sink = std::function<void(bag)>;

namespace detail {
asio::awaitable<std::optional<bag>> ready_bag(std::optional<bag> b);

template <class View>
struct bag_range {
  View view;
  std::ranges::iterator_t<View> cur;
  bool started = false;
  std::optional<bag> next() {
    if (!started) {
      cur = std::ranges::begin(view);
      started = true;
    }
    if (cur == std::ranges::end(view)) return std::nullopt;
    std::optional<bag> b{bag(*cur)};
    ++cur;
    return b;
  }
};
}  // namespace detail

struct repeat_options {
  std::chrono::nanoseconds period{0};  // a pause between iterations
  std::stop_token stop = {};           // ends the loop between iterations / in the pause
  std::uint64_t max_iterations = 0;    // 0: unbounded
};

// A flow packaged to run like one coroutine; see the rules above.
class bundle {
public:
  explicit bundle(node root, bundle_options options = {});

  // Runs the flow on the calling coroutine's executor; returns the bag visible at the end.
  asio::awaitable<bag> operator()(bag initial) const;
  asio::awaitable<bag> operator()(bag initial, visibility mode) const;

  // Completion signature void(std::exception_ptr, bag), on `ex`.
  template <class Executor, class Token>
  auto async_run(const Executor& ex, bag initial, Token&& token) const {
    return asio::co_spawn(ex, (*this)(std::move(initial)), std::forward<Token>(token));
  }

  // Runs the flow again and again with the same initial values; see F8 above.
  asio::awaitable<std::uint64_t> repeat(bag initial, repeat_options options = {}) const;

  // Runs the flow once per bag of `source`, with at most options.max_in_flight calls at
  // once (the source is not read further until one finishes), handing every result to
  // `sink` — in source order when options.ordered, else as they finish. Returns the number
  // of results delivered. The first failure (of a call, the source or the sink) cancels
  // the calls still running and is rethrown once they have stopped; cancelling the stream
  // does the same with operation_aborted. Sources: a bag_source, an input range of bags
  // (read on the loop), or anything with `next()` returning
  // asio::awaitable<std::optional<bag>> — a ferry::threaded_iterator<bag>.
  asio::awaitable<std::uint64_t> stream(bag_source source, bag_sink sink,
                                        stream_options options = {}) const;
  template <std::ranges::input_range R>
    requires std::constructible_from<bag, std::ranges::range_reference_t<R>>
  asio::awaitable<std::uint64_t> stream(R&& source, bag_sink sink, stream_options options = {}) const {
    using view_t = std::views::all_t<R>;
    auto range = std::make_shared<detail::bag_range<view_t>>(
        detail::bag_range<view_t>{std::views::all(std::forward<R>(source)), {}, false});
    return stream(bag_source([range] { return detail::ready_bag(range->next()); }),
                  std::move(sink), options);
  }
  template <class Iterator>
    requires(!std::ranges::input_range<Iterator> &&
             std::same_as<decltype(std::declval<Iterator&>().next()),
                          asio::awaitable<std::optional<bag>>>)
  asio::awaitable<std::uint64_t> stream(Iterator& source, bag_sink sink, stream_options options = {}) const {
    return stream(bag_source([&source] { return source.next(); }), std::move(sink), options);
  }

  const bundle_options& options() const noexcept { return options_; }
  const node& root() const noexcept { return root_; }

private:
  node root_;
  bundle_options options_;
};

}  // namespace ferry::flow
