// ferry/detail/loop_waiters.hpp — coroutines on a loop waiting for something a thread does.
//
// The consumer side of a channel (and "wait until the producer finished") needs a wait
// that a foreign thread can end cheaply. `loop_waiters` is that list; `async_wait_until`
// is the Asio initiating function that suspends on it with completion signature
// `void(std::error_code)`: success once woken, `timed_out` at an optional deadline,
// `operation_aborted` when the handler's cancellation slot fires.
//
// The hand-shake between a waiter and a waker is Dekker's, made of seq_cst operations only
// (TSan models those; it does not model fences):
//   waiter: link the node, store any_ = true (seq_cst), evaluate ready() (seq_cst loads)
//   waker:  make the state ready (seq_cst store or RMW), load any_ (seq_cst)
// In the single total order of seq_cst operations one of the two comes second and sees the
// other: either ready() is true and the waiter unlinks itself and completes, or the waker
// sees any_ and wakes the list. The waker's fast path, when nobody waits, is one load.
//
// A woken node is handed to its loop through the loop's completion queue (one post per
// burst of wake-ups, no allocation); the delivery runs the handler on its own executor.
// Exactly one party completes a node: whoever unlinks it (canceller, timer, loop shutdown)
// or, once a waker has taken it off the list, the delivery on the loop.
#pragma once

#include <ferry/detail/completion_queue.hpp>
#include <ferry/detail/loop_executor.hpp>
#include <ferry/detail/loop_service.hpp>
#include <ferry/error.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/associated_allocator.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/dispatch.hpp>
#include <asio/error.hpp>
#include <asio/post.hpp>
#include <asio/recycling_allocator.hpp>
#include <asio/steady_timer.hpp>
#include <asio/system_executor.hpp>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <system_error>
#include <utility>

namespace ferry::detail {

struct wait_node : completion_node, pending_wait {
  wait_node* wprev = nullptr;  // links in loop_waiters, guarded by its mutex
  wait_node* wnext = nullptr;
  bool linked = false;
  // A waker took the node off the list: hand it to its loop. Any thread.
  void (*schedule)(wait_node*) noexcept = nullptr;
};

class loop_waiters {
public:
  // Links `n` unless `ready()`, evaluated once the node is visible to wakers, is already
  // true (then returns false and the caller completes on its own).
  template <class Ready>
  bool add(wait_node* n, Ready&& ready) {
    std::lock_guard lock(mu_);
    n->wprev = tail_;
    n->wnext = nullptr;
    if (tail_) {
      tail_->wnext = n;
    } else {
      head_ = n;
    }
    tail_ = n;
    n->linked = true;
    any_.store(true, std::memory_order_seq_cst);
    if (ready()) {
      unlink(n);
      return false;
    }
    return true;
  }

  // True if `n` was still linked: the caller now owns its completion.
  bool remove(wait_node* n) noexcept {
    std::lock_guard lock(mu_);
    if (!n->linked) return false;
    unlink(n);
    return true;
  }

  // Any thread, after making the awaited state true with a seq_cst write.
  void wake_all() noexcept {
    if (!any_.load(std::memory_order_seq_cst)) return;
    wait_node* list = nullptr;
    {
      std::lock_guard lock(mu_);
      any_.store(false, std::memory_order_relaxed);
      list = head_;
      head_ = tail_ = nullptr;
      for (wait_node* n = list; n; n = n->wnext) n->linked = false;
    }
    while (list) {
      wait_node* next = list->wnext;  // read first: schedule may free the node
      list->schedule(list);
      list = next;
    }
  }

private:
  void unlink(wait_node* n) noexcept {
    if (n->wprev) {
      n->wprev->wnext = n->wnext;
    } else {
      head_ = n->wnext;
    }
    if (n->wnext) {
      n->wnext->wprev = n->wprev;
    } else {
      tail_ = n->wprev;
    }
    n->wprev = n->wnext = nullptr;
    n->linked = false;
  }

  std::mutex mu_;
  wait_node* head_ = nullptr;
  wait_node* tail_ = nullptr;
  std::atomic<bool> any_{false};
};

// One suspended wait. References: the outcome (dropped by whoever completes or discards
// it) and, with a deadline, the timer's handler.
template <class Handler>
class wait_op final : public wait_node {
  using allocator_type = typename std::allocator_traits<
      asio::associated_allocator_t<Handler, asio::recycling_allocator<void>>>::
      template rebind_alloc<wait_op>;
  using loop_executor = asio::associated_executor_t<Handler>;
  using work_executor = std::decay_t<decltype(asio::prefer(
      std::declval<const loop_executor&>(), asio::execution::outstanding_work.tracked))>;

public:
  template <class H, class Ready>
  static void start(H&& handler, loop_waiters& waiters, std::shared_ptr<const void> keep,
                    Ready&& ready,
                    std::optional<std::chrono::steady_clock::time_point> deadline) {
    allocator_type alloc(
        asio::get_associated_allocator(handler, asio::recycling_allocator<void>()));
    wait_op* op = std::allocator_traits<allocator_type>::allocate(alloc, 1);
    try {
      ::new (static_cast<void*>(op))
          wait_op(alloc, std::forward<H>(handler), waiters, std::move(keep));
    } catch (...) {
      std::allocator_traits<allocator_type>::deallocate(alloc, op, 1);
      throw;
    }
    op->begin(std::forward<Ready>(ready), deadline);
  }

private:
  wait_op(const allocator_type& alloc, Handler&& h, loop_waiters& waiters,
          std::shared_ptr<const void> keep)
      : alloc_(alloc),
        handler_(std::in_place, std::move(h)),
        work_(asio::prefer(asio::get_associated_executor(*handler_),
                           asio::execution::outstanding_work.tracked)),
        waiters_(&waiters),
        keep_(std::move(keep)) {
    auto& ctx = static_cast<asio::execution_context&>(
        loop_context_of(asio::get_associated_executor(*handler_)));
    service_ = &loop_service::of(ctx);
    queue_ = service_->completions();
    this->deliver = &wait_op::do_deliver;
    this->discard = &wait_op::do_discard;
    this->schedule = &wait_op::do_schedule;
    this->abort_pending = &wait_op::do_abort;
  }

  template <class Ready>
  void begin(Ready&& ready, std::optional<std::chrono::steady_clock::time_point> deadline) {
    if (ready()) {
      post_result({});
      return;
    }
    if (!service_->add_pending(this)) {  // the loop is being destroyed
      handler_.reset();
      release();
      return;
    }
    slot_ = asio::get_associated_cancellation_slot(*handler_);
    if (slot_.is_connected()) slot_.template emplace<cancel_handler>(this);
    if (deadline) {
      if constexpr (std::is_constructible_v<asio::any_io_executor, const loop_executor&>) {
        timer_.emplace(asio::any_io_executor(asio::get_associated_executor(*handler_)),
                       *deadline);
      } else {  // e.g. use_future's executor: the timer runs on the system context
        timer_.emplace(asio::any_io_executor(asio::system_executor()), *deadline);
      }
      refs_.fetch_add(1, std::memory_order_relaxed);
      timer_->async_wait([this](const std::error_code& ec) {
        if (!ec) finish_if_linked(make_error_code(errc::timed_out));
        release();
      });
    }
    if (!waiters_->add(this, ready)) finish(std::error_code{}, /*inline_ok=*/false);
  }

  struct cancel_handler {
    wait_op* op;
    void operator()(asio::cancellation_type type) const {
      if ((type & (asio::cancellation_type::terminal | asio::cancellation_type::partial |
                   asio::cancellation_type::total)) == asio::cancellation_type::none) {
        return;
      }
      op->cancelled_.store(true, std::memory_order_release);
      op->finish_if_linked(asio::error::operation_aborted);
    }
  };

  void finish_if_linked(std::error_code ec) {
    if (waiters_->remove(this)) finish(ec, /*inline_ok=*/false);
    // else a waker owns the node; its delivery sees `cancelled_`
  }

  // Completes the handler once; called by exactly one party.
  void finish(std::error_code ec, bool inline_ok) {
    service_->remove_pending(this);
    if (slot_.is_connected()) slot_.clear();
    if (timer_) timer_->cancel();
    complete(ec, inline_ok);
  }

  // Hands ec to the handler on its executor: posted from initiation and cancellation,
  // dispatched from the delivery (which already runs on the loop).
  void complete(std::error_code ec, bool may_run_inline) {
    Handler h(std::move(*handler_));
    handler_.reset();
    work_executor work(std::move(work_));
    release();
    auto call = [h = std::move(h), ec]() mutable { std::move(h)(ec); };
    if (may_run_inline) {
      asio::dispatch(work, std::move(call));
    } else {
      asio::post(work, std::move(call));
    }
  }
  void post_result(std::error_code ec) { complete(ec, false); }

  static void do_schedule(wait_node* n) noexcept {
    auto* op = static_cast<wait_op*>(n);
    std::shared_ptr<completion_queue> q = op->queue_;  // the op may be freed once pushed
    try {
      push_to_loop(*q, op, asio::get_associated_executor(*op->handler_));
    } catch (...) {
      // Posting the drain failed (out of memory): the wait stays suspended.
    }
  }

  // On the loop, after a waker took the node off the list.
  static void do_deliver(completion_node* n) {
    auto* op = static_cast<wait_op*>(n);
    const bool cancelled = op->cancelled_.load(std::memory_order_acquire);
    op->finish(cancelled ? std::error_code(asio::error::operation_aborted) : std::error_code{},
               /*inline_ok=*/true);
  }

  // The loop's completion queue closed with the node in it.
  static void do_discard(completion_node* n) noexcept {
    auto* op = static_cast<wait_op*>(n);
    op->drop();
  }

  // The loop is being destroyed while the wait is suspended.
  static void do_abort(pending_wait* p) noexcept {
    auto* op = static_cast<wait_op*>(p);
    if (op->waiters_->remove(op)) op->drop();
    // else a waker owns it; the completion queue discards it when it closes
  }

  void drop() noexcept {
    if (slot_.is_connected()) slot_.clear();
    if (timer_) timer_->cancel();
    handler_.reset();
    release();
  }

  void release() noexcept {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      allocator_type alloc(alloc_);
      this->~wait_op();
      std::allocator_traits<allocator_type>::deallocate(alloc, this, 1);
    }
  }

  allocator_type alloc_;
  std::optional<Handler> handler_;
  work_executor work_;
  loop_waiters* waiters_;
  std::shared_ptr<const void> keep_;  // keeps `waiters_` alive
  loop_service* service_ = nullptr;
  std::shared_ptr<completion_queue> queue_;
  asio::cancellation_slot slot_;
  std::optional<asio::steady_timer> timer_;
  std::atomic<bool> cancelled_{false};
  std::atomic<int> refs_{1};
};

// Suspends until `ready()` holds (checked now and after every wake-up of `waiters`), the
// deadline passes (errc::timed_out) or the handler is cancelled (operation_aborted).
// `keep` keeps the owner of `waiters` alive while the wait is pending.
template <class Token, class Ready>
auto async_wait_until(loop_waiters& waiters, std::shared_ptr<const void> keep, Ready ready,
                      std::optional<std::chrono::steady_clock::time_point> deadline,
                      Token&& token) {
  return asio::async_initiate<Token, void(std::error_code)>(
      [&waiters](auto handler, std::shared_ptr<const void> k, Ready r,
                 std::optional<std::chrono::steady_clock::time_point> d) {
        wait_op<decltype(handler)>::start(std::move(handler), waiters, std::move(k),
                                          std::move(r), d);
      },
      token, std::move(keep), std::move(ready), deadline);
}

}  // namespace ferry::detail
