// ferry/flow/detail/loop_event.hpp — an event for coroutines on one executor.
//
// Wakes every coroutine waiting on it; waiters re-check their condition (so a notify with
// nobody waiting is simply not needed by anyone). A steady_timer that never expires on its
// own: cancel() ends the pending waits and leaves the expiry alone, so several waiters never
// cancel one another (which resetting the expiry would do). Not thread-safe: notify and wait
// on the executor it was made with (one thread or a strand), like the timer itself.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

namespace ferry::flow::detail {

class loop_event {
public:
  explicit loop_event(const asio::any_io_executor& ex)
      : timer_(ex, asio::steady_timer::time_point::max()) {}
  void notify() { timer_.cancel(); }
  // Returns when notified, or at once if the awaiting coroutine's wait is cancelled.
  asio::awaitable<void> wait() {
    auto op = timer_.async_wait(asio::experimental::as_tuple(asio::use_awaitable));
    co_await std::move(op);
  }

private:
  asio::steady_timer timer_;
};

// Whether the calling coroutine has been asked to cancel (any cancellation type).
inline asio::awaitable<bool> cancelled_now() {
  asio::cancellation_state st = co_await asio::this_coro::cancellation_state;
  co_return st.cancelled() != asio::cancellation_type::none;
}

}  // namespace ferry::flow::detail
