// ferry/co_spawn.hpp — spawn a coroutine as a ferry task: with its own task-local context.
//
//     ferry::context_var<std::string> request_id{"request_id"};
//     request_id.set("outer");
//     ferry::co_spawn(io, [&]() -> asio::awaitable<void> {
//       request_id.set("inner");             // invisible to the spawner (rule C2)
//       co_await timer.async_wait(asio::use_awaitable);
//       assert(request_id.get() == "inner"); // survives suspension (rule C4)
//     }, asio::detached);
//
// ferry::co_spawn(executor, awaitable-or-function, token) is asio::co_spawn with the
// executor wrapped in a ferry::context_executor: the wrapper installs the task's context
// around every function it executes, which is every resumption of the coroutine, so the
// task sees its own values after any co_await, whichever thread resumes it. The task starts
// with a copy of the spawner's context. Everything else (completion tokens, cancellation,
// exceptions) is asio::co_spawn's.
#pragma once

#include <ferry/context.hpp>

#include <asio/awaitable.hpp>
#include <asio/co_spawn.hpp>
#include <asio/execution.hpp>
#include <asio/execution_context.hpp>
#include <asio/prefer.hpp>
#include <asio/query.hpp>
#include <asio/require.hpp>

#include <memory>
#include <type_traits>
#include <typeinfo>
#include <utility>

namespace ferry {

// An executor that runs everything inside one task's context, forwarding every property to
// the executor it wraps.
template <class Inner>
class context_executor {
public:
  using inner_executor_type = Inner;

  context_executor(Inner inner, std::shared_ptr<detail::context_frame> frame) noexcept
      : inner_(std::move(inner)), frame_(std::move(frame)) {}

  const Inner& get_inner_executor() const noexcept { return inner_; }
  const std::shared_ptr<detail::context_frame>& frame() const noexcept { return frame_; }

  template <class Property>
    requires asio::can_query<const Inner&, const Property&>::value
  decltype(auto) query(const Property& p) const
      noexcept(asio::is_nothrow_query<const Inner&, const Property&>::value) {
    return asio::query(inner_, p);
  }

  template <class Property>
    requires asio::can_require<const Inner&, const Property&>::value
  auto require(const Property& p) const {
    using rewrapped = std::decay_t<decltype(asio::require(inner_, p))>;
    return context_executor<rewrapped>(asio::require(inner_, p), frame_);
  }

  template <class Property>
    requires asio::can_prefer<const Inner&, const Property&>::value
  auto prefer(const Property& p) const {
    using rewrapped = std::decay_t<decltype(asio::prefer(inner_, p))>;
    return context_executor<rewrapped>(asio::prefer(inner_, p), frame_);
  }

  template <class F>
  void execute(F&& f) const {
    asio::execution::execute(inner_, [frame = frame_, fn = std::forward<F>(f)]() mutable {
      detail::context_scope scope(*frame);
      std::move(fn)();
    });
  }

  friend bool operator==(const context_executor& a, const context_executor& b) noexcept {
    return a.inner_ == b.inner_ && a.frame_ == b.frame_;
  }
  friend bool operator!=(const context_executor& a, const context_executor& b) noexcept {
    return !(a == b);
  }

private:
  Inner inner_;
  std::shared_ptr<detail::context_frame> frame_;
};

namespace detail {

// The executor of type T inside an any_io_executor, or null. (Asio 1.22's
// any_executor::target<T>() does not check the type; this does.)
template <class T, class AnyExecutor>
const T* target_of(const AnyExecutor& ex) noexcept {
  if (!ex || ex.target_type() != typeid(T)) return nullptr;
  return ex.template target<T>();
}

template <class T>
struct awaitable_value;
template <class T, class E>
struct awaitable_value<asio::awaitable<T, E>> {
  using type = T;
};

template <class Executor>
auto with_task_context(const Executor& ex) {
  auto frame = std::make_shared<context_frame>();
  frame->snapshot = current_frame().snapshot;  // a copy of the spawner's context
  return context_executor<Executor>(ex, std::move(frame));
}

template <class Executor>
auto with_task_context(const context_executor<Executor>& ex) {
  return with_task_context(ex.get_inner_executor());  // a new task gets a new frame
}

}  // namespace detail

// asio::co_spawn, with the coroutine running as a ferry task (its own context copy).
template <class Executor, class AwaitableOrFunction, class CompletionToken>
  requires asio::execution::is_executor<Executor>::value
auto co_spawn(const Executor& ex, AwaitableOrFunction&& what, CompletionToken&& token) {
  return asio::co_spawn(detail::with_task_context(ex), std::forward<AwaitableOrFunction>(what),
                        std::forward<CompletionToken>(token));
}

template <class ExecutionContext, class AwaitableOrFunction, class CompletionToken>
  requires std::is_convertible_v<ExecutionContext&, asio::execution_context&>
auto co_spawn(ExecutionContext& ctx, AwaitableOrFunction&& what, CompletionToken&& token) {
  return ferry::co_spawn(ctx.get_executor(), std::forward<AwaitableOrFunction>(what),
                         std::forward<CompletionToken>(token));
}

}  // namespace ferry
