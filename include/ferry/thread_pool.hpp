// ferry/thread_pool.hpp — a fast thread pool that is an Asio execution context.
//
//     ferry::thread_pool pool{4};
//     asio::post(pool, [] { crunch(); });                       // fire and forget
//     auto f = pool.submit([] { return 6 * 7; }, asio::use_future);
//     int v = f.get();                                          // 42
//     asio::co_spawn(pool, job(), asio::detached);              // coroutines on the pool
//     pool.wait_idle();                                         // everything so far done
//
// Rules (spec/core.md P1–P7):
//  * `thread_pool{n}` starts n workers (n == 0 throws ferry::error invalid_argument); the
//    default size is min(max(hardware_concurrency, 4), 32).
//  * get_executor() is an Asio standard executor: post/dispatch/defer/co_spawn and
//    asio::execution::execute all work. `dispatch` runs inline on the pool's own workers.
//  * A task that throws never kills its worker. submit() delivers the exception to its
//    completion handler; for fire-and-forget work the exception goes to
//    thread_pool_options::on_task_exception (default: counted in stats().failed and reported
//    once on stderr).
//  * stop() ends promptly: running tasks finish; queued tasks never run. Work submitted
//    through submit() (and ferry's higher layers) completes with errc::pool_closed; raw Asio
//    handlers are destroyed without being invoked, as Asio's own pools do, and are counted
//    in stats().abandoned. Submitting after stop() throws ferry::error(errc::pool_closed)
//    (submit() completes its handler with that error instead).
//  * join() without a prior stop() first waits for the pool to go idle, then stops (like
//    asio::thread_pool::join). join_for(timeout) reports the workers still busy. Both are
//    idempotent; the destructor does stop() + join().
//  * wait_idle() blocks until as many tasks have finished (run or abandoned) as had been
//    submitted when it was called; called from one of the pool's own workers it throws
//    errc::would_deadlock instead of hanging.
//  * Idle workers spin for `spin` (default 50 µs, about what it costs to wake a parked
//    thread on a VM; at most `max_spinning` at once) and then park; a parked pool uses no
//    CPU. A submission wakes a
//    parked worker only when no worker is spinning, and a spinner that finds work wakes one
//    more parked worker so bursts spread over the pool.
//  * Callables up to detail::task::inline_size (56) bytes, alignment <= 8 and nothrow-movable
//    are queued without any heap allocation.
//
// Thread safety: every member function may be called from any thread.
#pragma once

#include <ferry/detail/task.hpp>
#include <ferry/error.hpp>

#include <asio/async_result.hpp>
#include <asio/associated_executor.hpp>
#include <asio/dispatch.hpp>
#include <asio/execution.hpp>
#include <asio/execution_context.hpp>
#include <asio/executor_work_guard.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <ranges>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace ferry {

struct thread_pool_options {
  // Number of worker threads; must be > 0.
  std::size_t threads = default_thread_count();
  // How long an idle worker spins looking for work before it parks. Zero parks at once.
  std::chrono::nanoseconds spin = std::chrono::microseconds(50);
  // At most this many idle workers spin at once (0: all of them). Fewer spinners burn less
  // CPU after a burst; more keep fan-out latency low (no wake-up per task of a burst).
  std::size_t max_spinning = 0;
  // Worker threads are named "<name>:<index>" (truncated to the OS limit).
  std::string name = "ferry";
  // Receives exceptions thrown by fire-and-forget tasks (asio::post, execute, post_bulk),
  // on the worker that ran the task. Empty: count them and report the first on stderr.
  std::function<void(std::exception_ptr)> on_task_exception{};

  static std::size_t default_thread_count() noexcept;
};

struct thread_pool_stats {
  std::size_t threads = 0;        // worker threads
  std::uint64_t submitted = 0;    // tasks accepted
  std::uint64_t completed = 0;    // tasks that ran to the end (returned or threw)
  std::uint64_t failed = 0;       // of those, the ones whose user code threw
  std::uint64_t abandoned = 0;    // tasks that never ran because the pool stopped
  std::uint64_t queued = 0;       // accepted, not yet started, not abandoned
  std::size_t busy = 0;           // workers running a task right now
  std::size_t spinning = 0;       // idle workers spinning for work right now
  std::size_t parked = 0;         // idle workers parked (asleep) right now
  std::size_t held = 0;           // workers held by long-running producers (threaded iterators)
  std::size_t elastic = 0;        // extra workers standing in for held ones right now
  std::uint64_t wakeups = 0;      // times a parked worker was woken for new work
  std::chrono::nanoseconds user_time{0};  // total time workers spent in tasks
};

// What join_for() found when its timeout expired.
struct busy_worker {
  std::size_t index = 0;
  std::string name;
  std::chrono::nanoseconds busy_for{0};  // time since it started its current batch
};

struct join_result {
  bool joined = false;
  std::vector<busy_worker> still_busy;
  explicit operator bool() const noexcept { return joined; }
};

namespace detail {
class pool_core;
// What pool_enqueue does with a task when the pool is already stopped.
enum class when_closed { throw_error, abandon };
void pool_enqueue(pool_core& core, task&& t, when_closed policy = when_closed::throw_error);
void pool_enqueue_bulk(pool_core& core, task* first, std::size_t n);
bool pool_on_worker(const pool_core& core) noexcept;
struct pool_access;
void pool_note_failure() noexcept;  // the task running on this worker failed
// The task running on this worker will hold it for a long time (a threaded iterator's
// producer). While every worker is held, the pool adds an elastic worker so that queued
// work still runs; release gives it back. No-ops off the pool's own workers.
bool pool_hold_worker(pool_core& core) noexcept;
void pool_release_worker(pool_core& core) noexcept;
}  // namespace detail

class thread_pool : public asio::execution_context {
  static constexpr unsigned blocking_never_bit = 1;
  static constexpr unsigned relationship_continuation_bit = 2;

public:
  // Asio standard executor for the pool. Bits select blocking.never and
  // relationship.continuation; blocking.possibly (the default) runs the function inline
  // when already on one of this pool's workers.
  template <unsigned Bits>
  class basic_executor {
  public:
    thread_pool& query(asio::execution::context_t) const noexcept { return *pool_; }
    static constexpr asio::execution::mapping_t query(asio::execution::mapping_t) noexcept {
      return asio::execution::mapping.thread;
    }
    static constexpr asio::execution::outstanding_work_t query(
        asio::execution::outstanding_work_t) noexcept {
      return asio::execution::outstanding_work.untracked;
    }
    constexpr asio::execution::blocking_t query(asio::execution::blocking_t) const noexcept {
      if constexpr ((Bits & blocking_never_bit) != 0) {
        return asio::execution::blocking.never;
      } else {
        return asio::execution::blocking.possibly;
      }
    }
    constexpr asio::execution::relationship_t query(
        asio::execution::relationship_t) const noexcept {
      if constexpr ((Bits & relationship_continuation_bit) != 0) {
        return asio::execution::relationship.continuation;
      } else {
        return asio::execution::relationship.fork;
      }
    }
    std::size_t query(asio::execution::occupancy_t) const noexcept { return pool_->size(); }

    basic_executor<Bits & ~blocking_never_bit> require(
        asio::execution::blocking_t::possibly_t) const noexcept {
      return {pool_};
    }
    basic_executor<Bits | blocking_never_bit> require(
        asio::execution::blocking_t::never_t) const noexcept {
      return {pool_};
    }
    basic_executor<Bits & ~relationship_continuation_bit> require(
        asio::execution::relationship_t::fork_t) const noexcept {
      return {pool_};
    }
    basic_executor<Bits | relationship_continuation_bit> require(
        asio::execution::relationship_t::continuation_t) const noexcept {
      return {pool_};
    }

    template <class F>
    void execute(F&& f) const {
      if constexpr ((Bits & blocking_never_bit) == 0) {
        if (detail::pool_on_worker(*pool_->core_)) {
          std::decay_t<F> local(std::forward<F>(f));
          std::move(local)();
          return;
        }
      }
      detail::pool_enqueue(*pool_->core_, detail::task(std::forward<F>(f)));
    }

    // True on the worker threads of this executor's pool.
    bool running_in_this_thread() const noexcept { return pool_->running_in_this_thread(); }

    friend bool operator==(const basic_executor& a, const basic_executor& b) noexcept {
      return a.pool_ == b.pool_;
    }
    friend bool operator!=(const basic_executor& a, const basic_executor& b) noexcept {
      return a.pool_ != b.pool_;
    }

  private:
    friend class thread_pool;
    template <unsigned>
    friend class basic_executor;
    basic_executor(thread_pool* p) noexcept : pool_(p) {}  // NOLINT: converting on purpose
    thread_pool* pool_;
  };

  using executor_type = basic_executor<0>;

  // A pool of thread_pool_options::default_thread_count() workers.
  thread_pool();
  // A pool of `threads` workers; zero throws ferry::error (errc::invalid_argument).
  explicit thread_pool(std::size_t threads);
  explicit thread_pool(thread_pool_options options);
  ~thread_pool();

  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  executor_type get_executor() noexcept { return executor_type(this); }
  std::size_t size() const noexcept;
  const std::string& name() const noexcept;
  bool running_in_this_thread() const noexcept { return detail::pool_on_worker(*core_); }

  // Fire and forget. Throws ferry::error(errc::pool_closed) after stop().
  template <class F>
  void post(F&& f) {
    detail::pool_enqueue(*core_, detail::task(std::forward<F>(f)));
  }

  // Submits every callable in `fns` with one bulk enqueue (elements are moved from).
  template <std::ranges::input_range R>
    requires std::is_invocable_v<std::ranges::range_value_t<R>&>
  void post_bulk(R&& fns) {
    constexpr std::size_t chunk = 64;
    detail::task buffer[chunk];
    std::size_t n = 0;
    for (auto&& f : fns) {
      buffer[n++] = detail::task(std::move(f));
      if (n == chunk) {
        detail::pool_enqueue_bulk(*core_, buffer, n);
        n = 0;
      }
    }
    if (n != 0) detail::pool_enqueue_bulk(*core_, buffer, n);
  }

  // Submits `count` tasks, the i-th calling f(i), with bulk enqueues.
  template <class F>
    requires std::is_invocable_v<F&, std::size_t> && std::is_copy_constructible_v<F>
  void post_n(std::size_t count, const F& f) {
    post_bulk(std::views::iota(std::size_t{0}, count) |
              std::views::transform([&f](std::size_t i) { return [f, i]() mutable { f(i); }; }));
  }

  // Runs `f()` on the pool and completes with `void(std::exception_ptr, R)` (or
  // `void(std::exception_ptr)` for void results): the value, or f's own exception, or a
  // ferry::error(errc::pool_closed) if the pool stops before f starts. Any completion token.
  template <class F, class CompletionToken>
  auto submit(F&& f, CompletionToken&& token);

  void stop() noexcept;
  bool stopped() const noexcept;
  void join();
  join_result join_for(std::chrono::nanoseconds timeout);
  void wait_idle();
  bool wait_idle_for(std::chrono::nanoseconds timeout);
  thread_pool_stats stats() const noexcept;

private:
  friend struct detail::pool_access;
  std::shared_ptr<detail::pool_core> core_;
};

namespace detail {
// Lets higher layers recognise a thread_pool behind a plain execution_context& (a
// coroutine running on the pool sends its blocking calls to that pool itself).
class pool_identity : public asio::execution_context::service {
public:
  using key_type = pool_identity;
  static inline asio::execution_context::id id;
  explicit pool_identity(asio::execution_context& ctx, thread_pool* p = nullptr)
      : asio::execution_context::service(ctx), pool(p) {}
  thread_pool* const pool;

private:
  void shutdown() override {}
};

// For ferry's own layers: queue a task whose waiter must hear pool_closed (via its
// ferry_abandon) instead of an exception at the submission site.
struct pool_access {
  // RAII: the calling worker is held by a long-running producer (see pool_hold_worker).
  class held_worker {
  public:
    // A null pool holds nothing.
    explicit held_worker(thread_pool* pool) noexcept
        : core_(pool && pool_hold_worker(*pool->core_) ? pool->core_.get() : nullptr) {}
    void release() noexcept {
      if (core_) pool_release_worker(*std::exchange(core_, nullptr));
    }
    ~held_worker() { release(); }
    held_worker(const held_worker&) = delete;
    held_worker& operator=(const held_worker&) = delete;

  private:
    pool_core* core_;
  };

  template <class F>
  static void post_abandonable(thread_pool& pool, F&& f) {
    pool_enqueue(*pool.core_, task(std::forward<F>(f)), when_closed::abandon);
  }
};
}  // namespace detail

namespace detail {

template <class R>
struct submit_signature_of {
  using type = void(std::exception_ptr, R);
};
template <>
struct submit_signature_of<void> {
  using type = void(std::exception_ptr);
};
template <class R>
using submit_signature = typename submit_signature_of<R>::type;

// The task submit() queues: runs the function, then hands the outcome to the completion
// handler through its associated executor (a handler without one runs inline on the
// worker, or on the thread that stopped the pool). Abandoned, it reports pool_closed.
template <class F, class Handler, class R>
class submit_op {
public:
  submit_op(F&& f, Handler&& h)
      : f_(std::move(f)),
        h_(std::move(h)),
        work_(asio::prefer(asio::get_associated_executor(h_),
                           asio::execution::outstanding_work.tracked)) {}

  void operator()() {
    std::exception_ptr ep;
    if constexpr (std::is_void_v<R>) {
      try {
        f_();
      } catch (...) {
        ep = std::current_exception();
        pool_note_failure();
      }
      complete(std::move(ep));
    } else {
      std::optional<R> result;
      try {
        result.emplace(f_());
      } catch (...) {
        ep = std::current_exception();
        pool_note_failure();
      }
      // Move the exception along: the worker must hold no reference once the waiter has it.
      if (result) {
        complete(std::move(ep), std::move(*result));
      } else {
        complete(std::move(ep), R{});
      }
    }
  }

  void ferry_abandon() noexcept {
    try {
      auto ep = std::make_exception_ptr(
          error(errc::pool_closed, "thread_pool::submit: the pool stopped before the task ran"));
      if constexpr (std::is_void_v<R>) {
        complete(std::move(ep));
      } else {
        complete(std::move(ep), R{});
      }
    } catch (...) {
      // Delivering the error failed (out of memory); nothing more can be done here.
    }
  }

private:
  template <class... Args>
  void complete(Args&&... args) {
    auto ex = std::move(work_);
    asio::dispatch(ex, [h = std::move(h_), ... a = std::forward<Args>(args)]() mutable {
      std::move(h)(std::move(a)...);
    });
  }

  F f_;
  Handler h_;
  std::decay_t<decltype(asio::prefer(
      std::declval<asio::associated_executor_t<Handler>>(),
      asio::execution::outstanding_work.tracked))>
      work_;
};

}  // namespace detail

template <class F, class CompletionToken>
auto thread_pool::submit(F&& f, CompletionToken&& token) {
  using fn_type = std::decay_t<F>;
  using result_type = std::invoke_result_t<fn_type&>;
  static_assert(std::is_void_v<result_type> || std::is_default_constructible_v<result_type>,
                "thread_pool::submit needs a void or default-constructible result");
  return asio::async_initiate<CompletionToken, detail::submit_signature<result_type>>(
      [this](auto handler, fn_type fn) {
        using op = detail::submit_op<fn_type, decltype(handler), result_type>;
        detail::pool_enqueue(*core_, detail::task(op(std::move(fn), std::move(handler))),
                             detail::when_closed::abandon);
      },
      token, std::forward<F>(f));
}

}  // namespace ferry
