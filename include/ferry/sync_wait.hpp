// ferry/sync_wait.hpp — a thread calls into the loop and waits (thread → loop, one call).
//
//     auto in_thread = ferry::threaded([] {
//       int n = ferry::sync_await([]() -> asio::awaitable<int> { co_return 7; });
//       return n * 6;                                    // ran the coroutine on our loop
//     });
//     int v = ferry::sync_wait_coroutine(io, fetch, "key");   // from any non-loop thread
//
// Rules (spec/core.md S1–S5):
//  * sync_wait_coroutine(executor_or_context, coro_fn, args...) spawns coro_fn(args...) on
//    that loop as a ferry task (it sees the calling thread's task-local context) and blocks
//    the calling thread until it finishes: returns its value or rethrows its exception.
//  * Called on a thread that is running that loop, it throws ferry::error(would_deadlock) at
//    once (S2).
//  * If the loop is destroyed before the coroutine finishes, the waiter gets
//    ferry::error(loop_gone) at once; if the loop is stopped, within ~10 ms (the waiter
//    checks io_context::stopped() while it waits). sync_wait_coroutine_for(timeout, ...)
//    gives up with errc::timed_out and cancels the coroutine (S3).
//  * sync_await(coro_fn, args...) finds the loop from the calling thread's context: code
//    running in threaded, threaded_separate or a threaded generator knows the loop it was
//    called from; elsewhere it throws ferry::error(no_loop) (S4). Nesting works (S5).
#pragma once

#include <ferry/co_spawn.hpp>
#include <ferry/detail/current_loop.hpp>
#include <ferry/detail/loop_service.hpp>
#include <ferry/error.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>

#include <chrono>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace ferry {
namespace detail {

template <class T>
struct sync_state {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::exception_ptr error;
  std::conditional_t<std::is_void_v<T>, bool, std::optional<T>> value{};
  asio::cancellation_signal cancel;  // emitted on the loop only

  bool ready = false;  // the result is in, the waiter not yet woken
  std::exception_ptr pending_error;

  std::atomic<bool> done_flag{false};  // done, readable without the mutex (waiter spins)

  void finish(std::exception_ptr e) {
    {
      std::lock_guard lock(mu);
      if (done) return;
      error = ready ? std::move(pending_error) : std::move(e);
      done = true;
      done_flag.store(true, std::memory_order_release);
    }
    cv.notify_all();  // outside the lock: the woken waiter does not block on it again
  }

  void finish_ready() { finish(nullptr); }
};

// co_spawn's completion handler. Destroyed without being invoked means the loop died with
// the coroutine pending: the waiting thread hears loop_gone.
//
// The waiter is woken by a second, posted handler rather than from inside this one: by
// then co_spawn has dropped its own copies of an exception, so the waiting thread holds the
// last reference to it. (Exception reference counts live in uninstrumented libstdc++; a
// last release on the loop thread after the waiter read the exception is safe but looks
// like a race to ThreadSanitizer.)
template <class T, class Executor>
class sync_handler {
public:
  sync_handler(std::shared_ptr<sync_state<T>> s, Executor ex) noexcept
      : state_(std::move(s)), ex_(std::move(ex)) {}
  sync_handler(sync_handler&& o) noexcept : state_(std::move(o.state_)), ex_(o.ex_) {}
  sync_handler& operator=(sync_handler&&) = delete;
  ~sync_handler() {
    if (state_) {
      state_->finish(std::make_exception_ptr(error(
          errc::loop_gone, "ferry::sync_wait_coroutine: the loop was destroyed first")));
    }
  }

  void operator()(std::exception_ptr e) requires std::is_void_v<T> { complete(std::move(e)); }

  template <class V>
    requires(!std::is_void_v<T>)
  void operator()(std::exception_ptr e, V&& v) {
    if (!e) {
      std::lock_guard lock(state_->mu);
      state_->value.emplace(std::forward<V>(v));
    }
    complete(std::move(e));
  }

private:
  void complete(std::exception_ptr e) {
    auto s = std::move(state_);
    {
      std::lock_guard lock(s->mu);
      s->pending_error = std::move(e);
      s->ready = true;
    }
    asio::post(ex_, [s] { s->finish_ready(); });
  }

  std::shared_ptr<sync_state<T>> state_;
  Executor ex_;
};

template <class Executor>
bool loop_running_here(const Executor& ex) noexcept {
  if constexpr (requires { ex.get_inner_executor(); }) {
    return loop_running_here(ex.get_inner_executor());
  } else if constexpr (requires { ex.running_in_this_thread(); }) {
    return ex.running_in_this_thread();
  } else if constexpr (std::is_same_v<Executor, asio::any_io_executor>) {
    using io_executor = asio::io_context::executor_type;
    if (auto* io = target_of<io_executor>(ex)) return io->running_in_this_thread();
    if (auto* ce = target_of<context_executor<io_executor>>(ex)) {
      return ce->get_inner_executor().running_in_this_thread();
    }
    return false;
  } else {
    return false;
  }
}

template <class Executor>
asio::io_context* io_context_of(const Executor& ex) noexcept {
  if constexpr (requires { ex.get_inner_executor(); }) {
    return io_context_of(ex.get_inner_executor());
  } else if constexpr (std::is_same_v<Executor, asio::io_context::executor_type>) {
    return &asio::query(ex, asio::execution::context);
  } else if constexpr (std::is_same_v<Executor, asio::any_io_executor>) {
    using io_executor = asio::io_context::executor_type;
    if (auto* io = target_of<io_executor>(ex)) {
      return &asio::query(*io, asio::execution::context);
    }
    if (auto* ce = target_of<context_executor<io_executor>>(ex)) {
      return &asio::query(ce->get_inner_executor(), asio::execution::context);
    }
    return nullptr;
  } else {
    return nullptr;
  }
}

template <class Executor, class CoroFn, class... Args>
auto sync_wait_impl(std::optional<std::chrono::nanoseconds> timeout, const Executor& ex,
                    CoroFn&& fn, Args&&... args) {
  using awaitable_type = std::invoke_result_t<std::decay_t<CoroFn>&, std::decay_t<Args>...>;
  using T = typename awaitable_value<awaitable_type>::type;
  if (loop_running_here(ex)) {
    throw error(errc::would_deadlock,
                "ferry::sync_wait_coroutine called on a thread that is running the target "
                "loop: it would wait for itself");
  }
  auto state = std::make_shared<sync_state<T>>();
  ferry::co_spawn(
      ex,
      [f = std::decay_t<CoroFn>(std::forward<CoroFn>(fn)),
       a = std::make_tuple(std::decay_t<Args>(std::forward<Args>(args))...)]() mutable
      -> awaitable_type {
        awaitable_type inner = std::apply(f, std::move(a));
        co_return co_await std::move(inner);
      },
      asio::bind_cancellation_slot(state->cancel.slot(), sync_handler<T, Executor>(state, ex)));

  asio::io_context* io = io_context_of(ex);
  std::shared_ptr<loop_liveness> live;
  if (io) live = asio::use_service<loop_service>(*io).liveness();
  const auto deadline = timeout ? std::chrono::steady_clock::now() + *timeout
                                : std::chrono::steady_clock::time_point::max();
  // Spin briefly first: a short coroutine usually finishes within a few µs, and a waiter
  // that never parked costs no wake-up (bounded: 50 µs, then the condition variable).
  const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
  while (!state->done_flag.load(std::memory_order_acquire) &&
         std::chrono::steady_clock::now() < spin_until) {
  }
  std::unique_lock lock(state->mu);
  while (!state->done) {
    // Wake every 10 ms to notice a stopped loop (io_context has no stop notification).
    state->cv.wait_for(lock, std::chrono::milliseconds(10));
    if (state->done) break;
    if (io) {
      std::lock_guard live_lock(live->mu);  // the loop cannot be destroyed meanwhile
      if (live->gone || io->stopped()) {
        if (state->ready) {  // the result is in; its posted wake-up will never run
          state->error = std::move(state->pending_error);
          break;
        }
        throw error(errc::loop_gone, "ferry::sync_wait_coroutine: the loop stopped first");
      }
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      lock.unlock();
      asio::post(ex, [state] { state->cancel.emit(asio::cancellation_type::terminal); });
      throw error(errc::timed_out, "ferry::sync_wait_coroutine: timed out");
    }
  }
  // Take the exception out of the shared state: once it is rethrown here, no other thread
  // must hold a reference to it (the loop may drop the state at any time).
  if (state->error) {
    std::exception_ptr e = std::move(state->error);
    std::rethrow_exception(std::move(e));
  }
  if constexpr (!std::is_void_v<T>) return std::move(*state->value);
}

template <class E>
decltype(auto) executor_of(E& e) {
  if constexpr (requires { e.get_executor(); }) {
    return e.get_executor();
  } else {
    return e;
  }
}

}  // namespace detail

// Runs coro_fn(args...) on the loop and waits for it on this (non-loop) thread.
template <class ExecutorOrContext, class CoroFn, class... Args>
auto sync_wait_coroutine(ExecutorOrContext&& loop, CoroFn&& coro_fn, Args&&... args) {
  auto ex = detail::executor_of(loop);
  return detail::sync_wait_impl(std::nullopt, ex, std::forward<CoroFn>(coro_fn),
                                std::forward<Args>(args)...);
}

// The same, giving up after `timeout` with ferry::error(timed_out) (the coroutine is
// cancelled).
template <class ExecutorOrContext, class CoroFn, class... Args>
auto sync_wait_coroutine_for(std::chrono::nanoseconds timeout, ExecutorOrContext&& loop,
                             CoroFn&& coro_fn, Args&&... args) {
  auto ex = detail::executor_of(loop);
  return detail::sync_wait_impl(timeout, ex, std::forward<CoroFn>(coro_fn),
                                std::forward<Args>(args)...);
}

// sync_wait_coroutine on the loop that called into this thread (threaded code, a separate
// thread, a threaded generator).
template <class CoroFn, class... Args>
auto sync_await(CoroFn&& coro_fn, Args&&... args) {
  const detail::loop_ref loop = detail::current_loop();
  if (!loop) {
    throw error(errc::no_loop,
                "ferry::sync_await: this thread was not called from a loop (use it inside "
                "threaded, threaded_separate or a threaded generator, or call "
                "sync_wait_coroutine with an executor)");
  }
  asio::any_io_executor ex = loop.get();
  return detail::sync_wait_impl(std::nullopt, ex, std::forward<CoroFn>(coro_fn),
                                std::forward<Args>(args)...);
}

}  // namespace ferry
