// ferry/threaded.hpp — blocking functions as awaitables (loop → thread).
//
//     auto read_file = ferry::threaded([](std::string path) { return slurp(path); });
//     std::string text = co_await read_file("/etc/hostname");      // runs on a pool worker
//     read_file.async_call("/etc/hosts", [](std::exception_ptr e, std::string s) { ... });
//     std::string now = read_file.sync_call("/etc/hostname");      // inline, no loop needed
//
//     auto watch = ferry::threaded_separate([](std::stop_token st, int fd) { ... }, "watch");
//     co_await watch(fd);                                          // a thread of its own
//
// Rules (spec/core.md T1–T9):
//  * `co_await f(args...)` runs fn(args...) on a pool and resumes the coroutine on its own
//    executor with the result (T1). The call starts when awaited (T7); `async_call` with a
//    callback or use_future starts at initiation. Completion signature:
//    `void(std::exception_ptr, R)` (`void(std::exception_ptr)` for void results).
//  * The pool: the one bound with threaded(pool, fn) / f.on(pool); else the default pool of
//    the awaiting handler's execution context (a coroutine on a ferry::thread_pool uses that
//    pool; otherwise a per-loop pool created on first use, replaceable with
//    ferry::set_default_pool and by the entrypoint) (T2).
//  * Arguments are decay-copied or moved at initiation; pass std::ref to share. Move-only
//    arguments and results work; void works (T3). R must be default-constructible (it is
//    passed, unspecified, beside an exception).
//  * fn's own exception is rethrown in the awaiting coroutine, type and payload intact (T4).
//  * Cancellation (the completion handler's cancellation slot): a call not yet started never
//    runs and completes at once with operation_aborted; a running call whose fn takes a
//    std::stop_token first gets a stop request; otherwise it runs to the end. A cancelled
//    running call completes, with operation_aborted and its result discarded, when fn
//    returns, so nothing it references is released under it. One completion, always (T6).
//  * Each call runs fn inside a snapshot of the caller's task-local context taken at
//    initiation; writes in fn never flow back (C3). fn can reach the calling loop through
//    ferry::sync_await (S4).
//  * threaded_separate runs each call on a new thread named after the call site or a given
//    name, for long blocking calls that must not occupy a pool worker; the loop keeps a
//    registry of those threads, waits for them at shutdown and reports the ones still
//    running (T8). Creating a thread costs tens of µs: use it for long calls only.
//  * The loop never blocks (T9). Results return through a per-loop completion queue: one
//    hand-off to the loop per burst of completions, no allocation per call in steady state
//    for calls awaited on an io_context (the call's state comes from Asio's per-thread
//    recycling allocator and is freed on the loop).
#pragma once

#include <ferry/co_spawn.hpp>
#include <ferry/context.hpp>
#include <ferry/detail/completion_queue.hpp>
#include <ferry/detail/current_loop.hpp>
#include <ferry/detail/loop_executor.hpp>
#include <ferry/detail/loop_service.hpp>
#include <ferry/error.hpp>
#include <ferry/thread_pool.hpp>

#include <asio/associated_allocator.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/dispatch.hpp>
#include <asio/error.hpp>
#include <asio/io_context.hpp>
#include <asio/recycling_allocator.hpp>
#include <asio/system_executor.hpp>
#include <asio/use_awaitable.hpp>

#include <atomic>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <source_location>
#include <stop_token>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>

namespace ferry {

namespace detail {

template <class F, class... Args>
inline constexpr bool takes_stop_token_v = std::is_invocable_v<F&, std::stop_token, Args&&...>;

template <class F, class... Args>
struct threaded_result {
  using type = std::invoke_result_t<F&, Args&&...>;
};
template <class F, class... Args>
  requires takes_stop_token_v<F, Args...>
struct threaded_result<F, Args...> {
  using type = std::invoke_result_t<F&, std::stop_token, Args&&...>;
};
template <class F, class... Args>
using threaded_result_t = typename threaded_result<F, Args...>::type;

std::exception_ptr make_aborted_error();
std::exception_ptr make_pool_closed_error();

// The state of one threaded call, from initiation on the loop to delivery on the loop.
//
// Two references keep it alive: the launch (the pool task or the separate thread) and the
// delivery (the completion queue). `state_` decides, with one CAS per transition, which of
// the racing parties (worker starting, canceller, pool shutting down) owns the outcome:
//   queued ──worker──▶ running ──worker──▶ done
//     │                   └──canceller──▶ running_cancelled ──worker──▶ done (aborted)
//     └──canceller / pool closed──▶ done (aborted / pool_closed, delivered without running)
template <class Handler, class Fn, class R, class... Args>
class threaded_op final : public completion_node {
  using allocator_type = typename std::allocator_traits<
      asio::associated_allocator_t<Handler, asio::recycling_allocator<void>>>::
      template rebind_alloc<threaded_op>;
  using loop_executor = asio::associated_executor_t<Handler>;
  using work_executor = std::decay_t<decltype(asio::prefer(
      std::declval<const loop_executor&>(), asio::execution::outstanding_work.tracked))>;
  static constexpr bool with_stop = takes_stop_token_v<Fn, Args...>;

  enum : unsigned char { queued, running, running_cancelled, done };

public:
  template <class H, class F, class... A>
  static threaded_op* create(H&& handler, F&& fn, A&&... args) {
    allocator_type alloc(
        asio::get_associated_allocator(handler, asio::recycling_allocator<void>()));
    threaded_op* op = std::allocator_traits<allocator_type>::allocate(alloc, 1);
    try {
      ::new (static_cast<void*>(op)) threaded_op(alloc, std::forward<H>(handler),
                                                 std::forward<F>(fn), std::forward<A>(args)...);
    } catch (...) {
      std::allocator_traits<allocator_type>::deallocate(alloc, op, 1);
      throw;
    }
    return op;
  }

  const loop_executor& loop() const noexcept { return loop_; }
  decltype(auto) loop_context() const { return loop_context_of(loop_); }
  const std::shared_ptr<separate_thread_registry>& registry() const {
    return loop_service::of(static_cast<asio::execution_context&>(loop_context_of(loop_)))
        .separate_threads();
  }

  // Connects cancellation; call once the op is fully set up, before launching.
  void connect_cancellation() {
    slot_ = asio::get_associated_cancellation_slot(*handler_);
    if (slot_.is_connected()) slot_.template emplace<cancel_handler>(this);
  }

  // On the worker (pool task or separate thread).
  void run() noexcept {
    unsigned char expected = queued;
    if (!state_.compare_exchange_strong(expected, running, std::memory_order_acq_rel)) {
      release();  // cancelled before it started: the canceller delivered already
      return;
    }
    {
      context_frame frame{std::move(snapshot_)};
      context_scope context(frame);
      loop_scope loop(this_loop());
      try {
        invoke();
      } catch (...) {
        error_ = std::current_exception();
        pool_note_failure();
      }
    }
    if (state_.exchange(done, std::memory_order_acq_rel) == running_cancelled) {
      discard_result();
      error_ = make_aborted_error();
    }
    finish_from_launch();
  }

  // The pool stopped before the task ran.
  void abandon() noexcept {
    unsigned char expected = queued;
    if (state_.compare_exchange_strong(expected, done, std::memory_order_acq_rel)) {
      error_ = make_pool_closed_error();
      finish_from_launch();
    } else {
      release();
    }
  }

  // Launching failed (e.g. no thread could be created): deliver that error.
  void launch_failed(std::exception_ptr e) noexcept {
    state_.store(done, std::memory_order_relaxed);
    error_ = std::move(e);
    finish_from_launch();
  }

private:
  template <class H, class F, class... A>
  threaded_op(const allocator_type& alloc, H&& handler, F&& fn, A&&... args)
      : alloc_(alloc),
        handler_(std::in_place, std::forward<H>(handler)),
        loop_(asio::get_associated_executor(*handler_)),
        work_(asio::prefer(loop_, asio::execution::outstanding_work.tracked)),
        fn_(std::forward<F>(fn)),
        args_(std::forward<A>(args)...),
        snapshot_(current_frame().snapshot) {
    queue_ = loop_service::of(static_cast<asio::execution_context&>(loop_context_of(loop_)))
                 .completions();
    this->deliver = &threaded_op::do_deliver;
    this->discard = &threaded_op::do_discard;
  }

  struct cancel_handler {
    threaded_op* op;
    void operator()(asio::cancellation_type type) {
      if ((type & (asio::cancellation_type::terminal | asio::cancellation_type::partial |
                   asio::cancellation_type::total)) != asio::cancellation_type::none) {
        op->cancel();
      }
    }
  };

  // On the loop (the cancellation slot's signal is emitted there).
  void cancel() {
    unsigned char s = state_.load(std::memory_order_acquire);
    for (;;) {
      if (s == queued) {
        if (state_.compare_exchange_weak(s, done, std::memory_order_acq_rel)) {
          error_ = make_aborted_error();
          push();  // the delivery reference; the launch's goes when the worker sees `done`
          return;
        }
      } else if (s == running) {
        if (state_.compare_exchange_weak(s, running_cancelled, std::memory_order_acq_rel)) {
          if constexpr (with_stop) stop_.request_stop();
          return;
        }
      } else {
        return;  // already finishing
      }
    }
  }

  void invoke() {
    auto call = [this](auto&&... a) -> R {
      if constexpr (with_stop) {
        return std::invoke(fn_, stop_.get_token(), std::move(a)...);
      } else {
        return std::invoke(fn_, std::move(a)...);
      }
    };
    if constexpr (std::is_void_v<R>) {
      std::apply(call, std::move(args_));
    } else {
      value_.emplace(std::apply(call, std::move(args_)));
    }
  }

  void discard_result() noexcept {
    if constexpr (!std::is_void_v<R>) value_.reset();
  }

  // The launch side is done with the op: give up its reference, then hand the op to the
  // loop. After push() the loop may free the op, so push() copies what it needs first.
  void finish_from_launch() noexcept {
    release();
    push();
  }

  loop_ref this_loop() const noexcept {
    using plain = std::decay_t<decltype(unwrap_context(loop_))>;
    if constexpr (std::is_constructible_v<asio::any_io_executor, const plain&> &&
                  !delivers_inline_v<loop_executor>) {
      return make_loop_ref(unwrap_context(loop_));
    } else {
      return {};
    }
  }

  void push() noexcept {
    if constexpr (delivers_inline_v<loop_executor>) {
      try {
        do_deliver(this);
      } catch (...) {
        // A plain callback threw on the worker; the pool's exception handler sees it.
        pool_note_failure();
      }
      return;
    }
    // Only one push per op: take the queue reference along, the op may be freed after it.
    std::shared_ptr<completion_queue> q = std::move(queue_);
    try {
      push_to_loop(*q, this, loop_);
    } catch (...) {
      // Posting the drain failed (out of memory): nothing can be delivered now.
    }
  }

  void release() noexcept {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      allocator_type alloc(alloc_);
      this->~threaded_op();
      std::allocator_traits<allocator_type>::deallocate(alloc, this, 1);
    }
  }

  static void do_deliver(completion_node* node) {
    auto* op = static_cast<threaded_op*>(node);
    if (op->slot_.is_connected()) op->slot_.clear();
    // Move out what the waiter needs and release the op before running the handler: the
    // handler may start the next call, which can then reuse this memory.
    Handler handler(std::move(*op->handler_));
    op->handler_.reset();
    work_executor work(std::move(op->work_));
    std::exception_ptr e = std::move(op->error_);
    if constexpr (std::is_void_v<R>) {
      op->release();
      asio::dispatch(work, [h = std::move(handler), e = std::move(e)]() mutable {
        std::move(h)(std::move(e));
      });
    } else {
      std::optional<R> v = std::move(op->value_);
      op->release();
      asio::dispatch(work, [h = std::move(handler), e = std::move(e), v = std::move(v)]() mutable {
        if (v) {
          std::move(h)(std::move(e), std::move(*v));
        } else {
          std::move(h)(std::move(e), R{});
        }
      });
    }
  }

  static void do_discard(completion_node* node) noexcept {
    auto* op = static_cast<threaded_op*>(node);
    if (op->slot_.is_connected()) op->slot_.clear();
    op->handler_.reset();
    op->release();
  }

  allocator_type alloc_;
  std::optional<Handler> handler_;
  loop_executor loop_;
  work_executor work_;
  Fn fn_;
  std::tuple<Args...> args_;
  context_snapshot snapshot_;
  std::shared_ptr<completion_queue> queue_;
  asio::cancellation_slot slot_;
  [[no_unique_address]] std::conditional_t<with_stop, std::stop_source, std::monostate> stop_;
  std::exception_ptr error_;
  [[no_unique_address]] std::conditional_t<std::is_void_v<R>, std::monostate, std::optional<R>>
      value_;
  std::atomic<unsigned char> state_{queued};
  std::atomic<unsigned char> refs_{2};
};

template <class Op>
struct pool_task {
  Op* op;
  void operator()() const noexcept { op->run(); }
  void ferry_abandon() noexcept { op->abandon(); }
};

template <class R>
using threaded_signature = submit_signature<R>;

void start_separate_thread(std::string name, std::function<void()> body);

// Splits "args..., token" and initiates.
template <class Self, class Tuple, std::size_t... I>
auto initiate_with_token(const Self& self, Tuple&& t, std::index_sequence<I...>) {
  return self.initiate(std::get<sizeof...(I)>(std::move(t)), std::get<I>(std::move(t))...);
}

template <class Derived, class F>
class threaded_base {
public:
  // Starts the call; the last argument is the completion token.
  template <class... ArgsAndToken>
  auto async_call(ArgsAndToken&&... a) const {
    static_assert(sizeof...(ArgsAndToken) >= 1, "async_call needs a completion token last");
    return initiate_with_token(static_cast<const Derived&>(*this),
                               std::forward_as_tuple(std::forward<ArgsAndToken>(a)...),
                               std::make_index_sequence<sizeof...(ArgsAndToken) - 1>{});
  }

  // `co_await f(args...)`: starts when awaited.
  template <class... Args>
  auto operator()(Args&&... args) const {
    return async_call(std::forward<Args>(args)..., asio::use_awaitable);
  }

  // Calls fn inline on this thread (a fn taking a stop_token gets one never stopped).
  template <class... Args>
  decltype(auto) sync_call(Args&&... args) const {
    if constexpr (takes_stop_token_v<const F, Args...>) {
      return std::invoke(fn_, std::stop_token{}, std::forward<Args>(args)...);
    } else {
      return std::invoke(fn_, std::forward<Args>(args)...);
    }
  }

  const F& function() const noexcept { return fn_; }

protected:
  explicit threaded_base(F fn) : fn_(std::move(fn)) {}

  template <class Launch, class Token, class... Args>
  auto initiate_on(Launch launch, Token&& token, Args&&... args) const {
    using R = threaded_result_t<F, std::decay_t<Args>...>;
    static_assert(std::is_void_v<R> || std::is_default_constructible_v<R>,
                  "ferry::threaded: the result type must be void or default-constructible");
    return asio::async_initiate<Token, threaded_signature<R>>(
        [launch](auto handler, F fn, std::decay_t<Args>... a) {
          using op_type = threaded_op<decltype(handler), F, R, std::decay_t<Args>...>;
          op_type* op = op_type::create(std::move(handler), std::move(fn), std::move(a)...);
          op->connect_cancellation();
          try {
            launch(op);
          } catch (...) {
            op->launch_failed(std::current_exception());
          }
        },
        token, fn_, std::forward<Args>(args)...);
  }

  F fn_;
};

}  // namespace detail

// A blocking function run on a pool when awaited.
template <class F>
class threaded_function : public detail::threaded_base<threaded_function<F>, F> {
  using base = detail::threaded_base<threaded_function<F>, F>;

public:
  explicit threaded_function(F fn, thread_pool* pool = nullptr)
      : base(std::move(fn)), pool_(pool) {}

  // The same function bound to `pool`.
  threaded_function on(thread_pool& pool) const { return threaded_function(this->fn_, &pool); }
  thread_pool* bound_pool() const noexcept { return pool_; }

  template <class Token, class... Args>
  auto initiate(Token&& token, Args&&... args) const {
    thread_pool* bound = pool_;
    return this->initiate_on(
        [bound](auto* op) {
          thread_pool& pool = bound ? *bound : default_pool(op->loop_context());
          detail::pool_access::post_abandonable(
              pool, detail::pool_task<std::remove_pointer_t<decltype(op)>>{op});
        },
        std::forward<Token>(token), std::forward<Args>(args)...);
  }

private:
  thread_pool* pool_;
};

// A blocking function run on a new thread of its own per call.
template <class F>
class threaded_separate_function
    : public detail::threaded_base<threaded_separate_function<F>, F> {
  using base = detail::threaded_base<threaded_separate_function<F>, F>;

public:
  threaded_separate_function(F fn, std::string name) : base(std::move(fn)), name_(std::move(name)) {}

  const std::string& name() const noexcept { return name_; }

  template <class Token, class... Args>
  auto initiate(Token&& token, Args&&... args) const {
    std::string name = name_;
    return this->initiate_on(
        [name](auto* op) {
          auto registry = op->registry();
          const std::uint64_t id = registry->add(name);
          try {
            detail::start_separate_thread(name, [op, registry, id] {
              op->run();
              registry->remove(id);
            });
          } catch (...) {
            registry->remove(id);
            throw;
          }
        },
        std::forward<Token>(token), std::forward<Args>(args)...);
  }

private:
  std::string name_;
};

template <class F>
threaded_function<std::decay_t<F>> threaded(F&& fn) {
  return threaded_function<std::decay_t<F>>(std::forward<F>(fn));
}

template <class F>
threaded_function<std::decay_t<F>> threaded(thread_pool& pool, F&& fn) {
  return threaded_function<std::decay_t<F>>(std::forward<F>(fn), &pool);
}

namespace detail {
std::string call_site_name(const std::source_location& where);
}

// Each call on a new thread, named `name` (or after the call site when empty).
template <class F>
threaded_separate_function<std::decay_t<F>> threaded_separate(
    F&& fn, std::string name = {}, std::source_location where = std::source_location::current()) {
  if (name.empty()) name = detail::call_site_name(where);
  return threaded_separate_function<std::decay_t<F>>(std::forward<F>(fn), std::move(name));
}

}  // namespace ferry
