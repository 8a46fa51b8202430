// ferry/detail/loop_executor.hpp — what the layers that deliver to a loop need to know
// about a handler's executor: which execution context ("loop") it belongs to, whether it
// names one at all, and which pool blocking work awaited there goes to by default.
#pragma once

#include <ferry/co_spawn.hpp>
#include <ferry/detail/completion_queue.hpp>
#include <ferry/detail/loop_service.hpp>
#include <ferry/thread_pool.hpp>

#include <asio/execution.hpp>
#include <asio/any_io_executor.hpp>
#include <asio/execution_context.hpp>
#include <asio/io_context.hpp>
#include <asio/query.hpp>
#include <asio/system_executor.hpp>

#include <type_traits>
#include <utility>

namespace ferry {

// The pool threaded calls awaited on `ctx` use when none is bound (created on first use).
inline thread_pool& default_pool(asio::execution_context& ctx) {
  return detail::loop_service::of(ctx).default_pool();
}
// A coroutine running on a ferry::thread_pool sends its blocking calls to that pool itself.
inline thread_pool& default_pool(thread_pool& pool) noexcept { return pool; }

// Replaces the default pool of `ctx`; `pool` must outlive the calls made on it.
inline void set_default_pool(asio::execution_context& ctx, thread_pool& pool) {
  asio::use_service<detail::loop_service>(ctx).set_default_pool(pool);
}

namespace detail {

template <class Executor>
const auto& unwrap_context(const Executor& ex) noexcept {
  if constexpr (requires { ex.get_inner_executor(); }) {
    return unwrap_context(ex.get_inner_executor());
  } else {
    return ex;
  }
}

// The execution context a handler's executor belongs to. Handlers without one (a plain
// callback's system_executor, use_future's) belong to the system context; their results
// are delivered on the thread that finished the call, without a hop.
template <class Executor>
decltype(auto) loop_context_of(const Executor& ex) {
  using plain = std::decay_t<decltype(unwrap_context(ex))>;
  using context_ref = asio::execution::context_as_t<asio::execution_context&>;
  if constexpr (std::is_same_v<plain, asio::system_executor>) {
    return static_cast<asio::execution_context&>(
        asio::query(asio::system_executor(), asio::execution::context));
  } else if constexpr (asio::can_query<const plain&, asio::execution::context_t>::value) {
    return asio::query(unwrap_context(ex), asio::execution::context);
  } else if constexpr (asio::can_query<const plain&, context_ref>::value) {
    return asio::query(unwrap_context(ex), context_ref());  // any_io_executor
  } else {
    return static_cast<asio::execution_context&>(
        asio::query(asio::system_executor(), asio::execution::context));
  }
}

// Handlers whose executor names no loop: a plain callback (system_executor), use_future.
template <class Executor>
inline constexpr bool delivers_inline_v =
    std::is_same_v<std::decay_t<decltype(unwrap_context(std::declval<const Executor&>()))>,
                   asio::system_executor> ||
    !(asio::can_query<const std::decay_t<decltype(unwrap_context(
                          std::declval<const Executor&>()))>&,
                      asio::execution::context_t>::value ||
      asio::can_query<const std::decay_t<decltype(unwrap_context(
                          std::declval<const Executor&>()))>&,
                      asio::execution::context_as_t<asio::execution_context&>>::value);

// Hands `node` to the loop `loop` belongs to, through that loop's completion queue `q`.
// Behind a type-erased executor, the drain is posted straight to the io_context: the
// drain's arena allocator survives that path, not the type-erased one.
template <class Executor>
void push_to_loop(completion_queue& q, completion_node* node, const Executor& loop) {
  const auto& target = unwrap_context(loop);
  if constexpr (std::is_same_v<std::decay_t<decltype(target)>, asio::any_io_executor>) {
    using io_executor = asio::io_context::executor_type;
    if (const auto* io = target_of<io_executor>(target)) {
      q.push(node, *io);
      return;
    }
    if (const auto* ce = target_of<context_executor<io_executor>>(target)) {
      q.push(node, ce->get_inner_executor());
      return;
    }
  }
  q.push(node, target);
}

}  // namespace detail
}  // namespace ferry
