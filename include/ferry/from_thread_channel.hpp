// ferry/from_thread_channel.hpp — a bounded channel from threads into a loop.
//
//     ferry::from_thread_channel<std::string> ch{io.get_executor(), 16};
//     std::thread producer([&] {
//       for (auto& line : read_lines(path))
//         if (!ch.put(std::move(line))) return;   // false: the consumer closed; stop cleanly
//       ch.close();                               // end of stream (close(eptr) to fail it)
//     });
//     for (;;) {                                   // in a coroutine on `io`
//       auto [e, line] = co_await ch.async_get(asio::experimental::as_tuple(asio::use_awaitable));
//       if (e) break;                             // channel_closed (or the producer's error)
//       use(line);
//     }
//
// Rules (spec/iterators.md H1–H5):
//  * `from_thread_channel<T> ch{executor, max_size}`: at most max_size items are stored;
//    max_size == 0 means unbounded. The executor is the default one for completion
//    handlers that name none (Asio's I/O-object convention).
//  * Thread side: put(item) blocks while the channel is full (spinning `producer_spin`,
//    then parked on a futex) and returns false, without throwing and without moving from
//    the item, once the channel is closed. try_put never blocks and says ok, full or closed.
//    Do not call put() on the consumer's own loop thread: it would wait for itself.
//  * Loop side: async_get completes FIFO with `void(std::exception_ptr, T)`; once the
//    channel is closed *and* drained with ferry::error(errc::channel_closed), or with the
//    exception given to close(eptr). async_get_for adds a timeout (errc::timed_out);
//    async_get_batch(n) takes up to n ready items at once (`void(std::exception_ptr,
//    std::vector<T>)`, never empty on success). try_get never waits.
//  * close() / close(eptr) from either side is idempotent (the first wins) and wakes every
//    blocked put and pending async_get at once. Destroying the channel closes it.
//  * Cancellation (per-operation cancellation slot; terminal, partial or total): a pending
//    async_get completes with operation_aborted and takes nothing: an item that arrives at
//    that moment stays in the channel for the next get.
//  * The consumer's loop is posted to only when a reader is (about to be) suspended; a
//    burst of puts costs one hand-off (H5). Items must be nothrow-move-constructible.
// Thread safety: every member may be called from any thread, by several producers and
// several consumers at once.
#pragma once

#include <ferry/detail/channel_core.hpp>
#include <ferry/detail/loop_waiters.hpp>
#include <ferry/error.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/cancellation_state.hpp>
#include <asio/compose.hpp>
#include <asio/error.hpp>
#include <asio/execution_context.hpp>

#include <chrono>
#include <cstddef>
#include <exception>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace ferry {

namespace detail {
std::exception_ptr make_channel_closed_error(const char* what);
std::exception_ptr make_channel_timeout_error(const char* what);
std::exception_ptr make_channel_aborted_error(const char* what);

// The composed operation behind async_get / async_get_for / async_get_batch.
template <class T, bool Batch>
struct channel_get_op {
  std::shared_ptr<channel_core<T>> core;
  std::optional<std::chrono::steady_clock::time_point> deadline;
  std::size_t max_items;
  const char* name;
  bool started = false;

  using result_type = std::conditional_t<Batch, std::vector<T>, T>;

  template <class Self>
  void operator()(Self& self, std::error_code ec = {}) {
    channel_core<T>* c = core.get();
    if (!started) {
      // Never complete inside the initiating function: the first look goes through the
      // wait, which posts at once when the channel is already readable.
      started = true;
      // The wait honours terminal, partial and total cancellation (async_compose would
      // pass only terminal on by default).
      self.reset_cancellation_state(asio::enable_total_cancellation());
      async_wait_until(
          c->readers(), core, [c] { return c->readable(); }, deadline, std::move(self));
      return;
    }
    if (ec == asio::error::operation_aborted) {
      self.complete(make_channel_aborted_error(name), result_type{});
      return;
    }
    if constexpr (Batch) {
      std::vector<T> items;
      if (core->try_pop_batch(items, max_items) != 0) {
        self.complete(nullptr, std::move(items));
        return;
      }
    } else {
      std::optional<T> item;
      if (core->try_pop(item)) {
        self.complete(nullptr, std::move(*item));
        return;
      }
    }
    if (core->drained()) {
      std::exception_ptr e = core->error();
      self.complete(e ? std::move(e) : make_channel_closed_error(name), result_type{});
      return;
    }
    if (ec) {  // timed out, nothing arrived
      self.complete(make_channel_timeout_error(name), result_type{});
      return;
    }
    async_wait_until(
        c->readers(), core, [c] { return c->readable(); }, deadline, std::move(self));
  }
};
}  // namespace detail

template <class T, class Executor = asio::any_io_executor>
class from_thread_channel {
  static_assert(std::is_nothrow_move_constructible_v<T>,
                "ferry::from_thread_channel<T>: T must be nothrow-move-constructible "
                "(wrap it in std::unique_ptr otherwise)");

public:
  using executor_type = Executor;
  using value_type = T;

  from_thread_channel(const executor_type& ex, std::size_t max_size)
      : ex_(ex), core_(std::make_shared<detail::channel_core<T>>(max_size)) {}

  template <class ExecutionContext>
    requires std::is_convertible_v<ExecutionContext&, asio::execution_context&>
  from_thread_channel(ExecutionContext& ctx, std::size_t max_size)
      : from_thread_channel(ctx.get_executor(), max_size) {}

  from_thread_channel(const from_thread_channel&) = delete;
  from_thread_channel& operator=(const from_thread_channel&) = delete;

  ~from_thread_channel() {
    if (core_) core_->close();
  }

  executor_type get_executor() const noexcept { return ex_; }
  std::size_t max_size() const noexcept { return core_->max_size(); }
  // Items stored right now (a snapshot).
  std::size_t size() const noexcept { return core_->size(); }
  bool closed() const noexcept { return core_->closed(); }

  // --- thread side ------------------------------------------------------------------------
  // Blocks while full. False once closed; `item` is then left as it was (not moved from).
  bool put(T&& item) { return core_->put(item); }
  bool put(const T& item)
    requires std::is_copy_constructible_v<T>
  {
    T copy(item);
    return core_->put(copy);
  }
  // Never blocks; moves from `item` only on put_status::ok.
  put_status try_put(T& item) { return core_->try_put(item); }
  put_status try_put(T&& item) { return core_->try_put(item); }

  // --- loop side --------------------------------------------------------------------------
  template <class CompletionToken>
  auto async_get(CompletionToken&& token) {
    return get<false>(std::nullopt, 1, "from_thread_channel::async_get",
                      std::forward<CompletionToken>(token));
  }

  template <class Rep, class Period, class CompletionToken>
  auto async_get_for(std::chrono::duration<Rep, Period> timeout, CompletionToken&& token) {
    return get<false>(std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(timeout),
                      1, "from_thread_channel::async_get_for",
                      std::forward<CompletionToken>(token));
  }

  template <class CompletionToken>
  auto async_get_batch(std::size_t max_items, CompletionToken&& token) {
    if (max_items == 0) {
      throw error(errc::invalid_argument,
                  "from_thread_channel::async_get_batch: max_items must be > 0");
    }
    return get<true>(std::nullopt, max_items, "from_thread_channel::async_get_batch",
                     std::forward<CompletionToken>(token));
  }

  // The next item if one is ready.
  std::optional<T> try_get() {
    std::optional<T> item;
    core_->try_pop(item);
    return item;
  }

  void close() noexcept { core_->close(); }
  void close(std::exception_ptr error) noexcept { core_->close(std::move(error)); }

  // Totals since creation: items put, items taken, time producers spent blocked while full.
  std::uint64_t produced() const noexcept { return core_->produced(); }
  std::uint64_t consumed() const noexcept { return core_->consumed(); }
  std::chrono::nanoseconds producer_blocked() const noexcept { return core_->producer_blocked(); }

private:
  template <bool Batch, class CompletionToken>
  auto get(std::optional<std::chrono::steady_clock::time_point> deadline, std::size_t max_items,
           const char* name, CompletionToken&& token) {
    using result_type = std::conditional_t<Batch, std::vector<T>, T>;
    static_assert(std::is_default_constructible_v<result_type>,
                  "from_thread_channel::async_get needs a default-constructible T (it is "
                  "passed, unspecified, beside an error)");
    return asio::async_compose<CompletionToken, void(std::exception_ptr, result_type)>(
        detail::channel_get_op<T, Batch>{core_, deadline, max_items, name}, token, ex_);
  }

  executor_type ex_;
  std::shared_ptr<detail::channel_core<T>> core_;
};

}  // namespace ferry
