// ferry/threaded_iterable.hpp — stream a blocking generator's output into a coroutine.
//
//     // A producer with a sink: runs on a pool worker, blocks when the consumer is behind.
//     auto lines = ferry::threaded_iterable(
//         [](ferry::sink<std::string>& out, std::string path) {
//           std::ifstream in(path);
//           for (std::string l; std::getline(in, l);)
//             if (!out(std::move(l))) return;          // false: the consumer has gone
//         },
//         {.max_size = 16});
//     auto it = lines("/etc/services");                 // nothing runs yet (lazy)
//     while (auto line = co_await it.next()) use(*line);
//
//     // A producer returning a range (any range-v3 or std view, a container, ...),
//     // iterated lazily on the producer's thread:
//     auto squares = ferry::threaded_iterable([] {
//       return ranges::views::iota(0) | ranges::views::transform([](int i) { return i * i; });
//     });
//     auto first = co_await ferry::collect(squares() , 10);  // {0, 1, 4, ..., 81}
//
// Rules (spec/iterators.md I1–I12):
//  * Producers (I1): `void(ferry::sink<T>&, args...)` calling `bool out(item)`, or
//    `R(args...)` returning an input range whose elements convert to T. A producer that also
//    takes a std::stop_token gets it right after the sink (`void(sink<T>&, std::stop_token,
//    args...)`) or first (`R(std::stop_token, args...)`): ferry's parameters come first,
//    the caller's arguments after. The sink also offers get_stop_token().
//  * threaded_iterable(producer, {.max_size = N}) is a factory; gen(args...) returns a new
//    threaded_iterator<T> each call (T deduced from the sink parameter or the range, or
//    given: threaded_iterable<T>(...)). The plain form runs the producer on a pool (the one
//    given, else the default pool of the consumer's loop) and occupies one worker for the
//    iterator's life; threaded_iterable_separate runs it on a thread of its own, named after
//    the call site or options.name — the right choice for long or infinite producers, which
//    would otherwise hold a pool worker indefinitely. iterator_wrapper(fn, pool_or_executor,
//    max_size) and iterator_wrapper_separate(fn, max_size) are the explicit one-shot forms.
//  * Lazy (I3): nothing runs until the first next(); the consumer's task-local context is
//    captured then and installed for the whole producer run, and ferry::sync_await on the
//    producer's thread reaches the consumer's loop (I10).
//  * Consumption (I4): `while (auto x = co_await it.next())`, `co_await it.next_batch(n)`
//    (up to n ready items, empty at the end), `co_await ferry::for_each(it, fn)`,
//    `co_await ferry::collect(it)`, and `co_await ferry::closing(gen(), body)` which awaits
//    close() whatever way body leaves (Python's `async with`).
//  * Items arrive in order, exactly once, then the end (I5). At most max_size items are
//    buffered, so the producer is at most max_size + 1 items ahead. max_size == 0 is
//    unbounded; the default is 64.
//  * A producer's exception — thrown while being set up (building the range, its begin()),
//    before the first item or mid-stream — is rethrown by next() after every item yielded
//    before it, and again by every later next() (I6).
//  * close() (I7) is idempotent and safe before start (the producer then never runs); it
//    completes only after the producer has returned and its destructors ran. A producer
//    blocked on a full channel is released at once (its out() returns false); one inside its
//    own blocking call gets a stop request on its std::stop_token, otherwise close waits for
//    its next out(). close_for(timeout) bounds the wait and says whether it finished. After
//    close, next() returns std::nullopt (items still buffered are dropped with the channel).
//  * Early exit (I8): destroying the iterator without close — the consumer broke out, threw
//    or was cancelled — closes and stop-requests as close() does, without waiting; the
//    producer's cleanup then runs on its own thread, exactly once. Destruction never blocks
//    and never touches the loop, which may already be gone. Destroying the consumer's loop
//    stops every producer consumed there (before the loop joins its default pool), and
//    destroys the coroutines suspended in next() with their iterators.
//  * Cancelling a consumer blocked in next() (its cancellation slot, e.g. a timer raced with
//    `||`) ends the wait at once with ferry::error(operation_aborted); the iterator stays
//    usable and no item is lost: one that arrived at that moment is returned by the next
//    next() (I9).
//  * Small pools (I11): a producer running on a ferry::thread_pool worker marks the worker as
//    held; when every worker of the pool is held the pool starts an elastic worker, so a
//    consumer awaiting ferry::threaded work on the same pool still progresses (see
//    thread_pool_stats::held / elastic). Producers on other executors get no such help.
//  * stats() (I12): items produced and consumed, time the producer spent blocked on a full
//    channel, time the consumer spent waiting for items.
//  * Speed: the consumer takes items without suspending while they are there; when the
//    channel is empty it yields to its loop for up to options.consumer_spin (default 20 µs,
//    other handlers keep running) before it suspends, and a full producer spins for
//    options.producer_spin before it parks — both below the ~50 µs a thread wake-up costs.
//    The consumer's spin adapts: spins that end in a park shrink it to nothing (a producer
//    sharing the consumer's core, or a slow one), spins that find items grow it back.
#pragma once

#include <ferry/context.hpp>
#include <ferry/detail/channel_core.hpp>
#include <ferry/detail/current_loop.hpp>
#include <ferry/detail/loop_executor.hpp>
#include <ferry/detail/loop_waiters.hpp>
#include <ferry/error.hpp>
#include <ferry/thread_pool.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/error.hpp>
#include <asio/execution.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/post.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <source_location>
#include <stop_token>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace ferry {

struct iterator_options {
  // Items buffered between producer and consumer; 0: unbounded (no back-pressure).
  std::size_t max_size = 64;
  // How long next() keeps yielding to its loop for an item before it suspends.
  std::chrono::nanoseconds consumer_spin = std::chrono::microseconds(20);
  // How long a producer facing a full channel spins before it parks.
  std::chrono::nanoseconds producer_spin = std::chrono::microseconds(50);
  // The _separate forms name their thread this (default: the call site, "file:line").
  std::string name{};
};

struct iterator_stats {
  std::uint64_t produced = 0;                    // items the producer put in the channel
  std::uint64_t consumed = 0;                    // items the consumer took out
  std::chrono::nanoseconds producer_blocked{0};  // producer waiting on a full channel
  std::chrono::nanoseconds consumer_waited{0};   // consumer waiting for an item
};

template <class T>
class threaded_iterator;

// The producer's end of a threaded iterator.
template <class T>
class sink {
public:
  // Blocks while the channel is full; false once the consumer has gone (closed the
  // iterator or dropped it): the producer should then return.
  bool operator()(T item) { return core_->put(item); }
  // Never blocks: ok, full (item untouched) or closed.
  put_status try_put(T& item) { return core_->try_put(item); }
  std::stop_token get_stop_token() const noexcept { return stop_; }
  bool stop_requested() const noexcept { return stop_.stop_requested(); }

  sink(detail::channel_core<T>& core, std::stop_token stop) noexcept
      : core_(&core), stop_(std::move(stop)) {}
  sink(const sink&) = delete;
  sink& operator=(const sink&) = delete;

private:
  detail::channel_core<T>* core_;
  std::stop_token stop_;
};

namespace detail {

std::exception_ptr make_iterator_launch_error(const char* what);
std::string call_site_name(const std::source_location& where);
void start_separate_thread(std::string name, std::function<void()> body);

// --- producer shapes ------------------------------------------------------------------------
template <class T>
struct is_sink : std::false_type {};
template <class T>
struct is_sink<sink<T>> : std::true_type {};

template <class F>
struct call_signature : call_signature<decltype(&F::operator())> {};
template <class R, class... A>
struct call_signature<R (*)(A...)> {
  using args = std::tuple<A...>;
};
template <class R, class... A>
struct call_signature<R (*)(A...) noexcept> : call_signature<R (*)(A...)> {};
template <class R, class C, class... A>
struct call_signature<R (C::*)(A...)> : call_signature<R (*)(A...)> {};
template <class R, class C, class... A>
struct call_signature<R (C::*)(A...) const> : call_signature<R (*)(A...)> {};
template <class R, class C, class... A>
struct call_signature<R (C::*)(A...) noexcept> : call_signature<R (*)(A...)> {};
template <class R, class C, class... A>
struct call_signature<R (C::*)(A...) const noexcept> : call_signature<R (*)(A...)> {};

// The T of a producer whose first parameter is a sink<T>& (void when it is not one or the
// producer is generic).
template <class P, class = void>
struct sink_element {
  using type = void;
};
template <class P>
struct sink_element<P, std::void_t<typename call_signature<P>::args>> {
  template <class Tuple>
  struct first {
    using type = void;
  };
  template <class A0, class... A>
  struct first<std::tuple<A0, A...>> {
    using type = std::remove_cvref_t<A0>;
  };
  using param = typename first<typename call_signature<P>::args>::type;
  template <class S>
  struct unwrap {
    using type = void;
  };
  template <class U>
  struct unwrap<sink<U>> {
    using type = U;
  };
  using type = typename unwrap<param>::type;
};

struct deduce_element {};

enum class producer_kind { sink_stop, sink_plain, range_stop, range_plain, invalid };

template <class R>
using range_element_t = std::remove_cvref_t<decltype(*std::begin(std::declval<R&>()))>;

template <class R>
concept iterable = requires(R& r) {
  std::begin(r) != std::end(r);
  *std::begin(r);
};

template <class T, class P, class... Args>
constexpr producer_kind kind_of() {
  if constexpr (!std::is_void_v<T> &&
                std::is_invocable_v<P&, sink<T>&, std::stop_token, Args&&...>) {
    return producer_kind::sink_stop;
  } else if constexpr (!std::is_void_v<T> && std::is_invocable_v<P&, sink<T>&, Args&&...>) {
    return producer_kind::sink_plain;
  } else if constexpr (std::is_invocable_v<P&, std::stop_token, Args&&...>) {
    if constexpr (iterable<std::invoke_result_t<P&, std::stop_token, Args&&...>>) {
      return producer_kind::range_stop;
    } else {
      return producer_kind::invalid;
    }
  } else if constexpr (std::is_invocable_v<P&, Args&&...>) {
    if constexpr (iterable<std::invoke_result_t<P&, Args&&...>>) {
      return producer_kind::range_plain;
    } else {
      return producer_kind::invalid;
    }
  } else {
    return producer_kind::invalid;
  }
}

// The element type: given, or from the sink parameter, or from the returned range.
template <class Given, class P, class... Args>
struct element_of {
  using type = Given;
};
template <class P, class... Args>
auto range_element_probe() {
  if constexpr (std::is_invocable_v<P&, std::stop_token, Args&&...>) {
    using R = std::invoke_result_t<P&, std::stop_token, Args&&...>;
    if constexpr (iterable<R>) {
      return std::type_identity<range_element_t<R>>{};
    } else {
      return std::type_identity<void>{};
    }
  } else if constexpr (std::is_invocable_v<P&, Args&&...>) {
    using R = std::invoke_result_t<P&, Args&&...>;
    if constexpr (iterable<R>) {
      return std::type_identity<range_element_t<R>>{};
    } else {
      return std::type_identity<void>{};
    }
  } else {
    return std::type_identity<void>{};
  }
}

template <class P, class... Args>
struct element_of<deduce_element, P, Args...> {
  using from_sink = typename sink_element<P>::type;
  using type = std::conditional_t<!std::is_void_v<from_sink>, from_sink,
                                  typename decltype(range_element_probe<P, Args...>())::type>;
};

template <class T>
struct producer_base {
  virtual ~producer_base() = default;
  virtual void run(sink<T>& out, std::stop_token stop) = 0;
};

template <class T, class P, class... Args>
class producer_impl final : public producer_base<T> {
  static constexpr producer_kind kind = kind_of<T, P, Args...>();

public:
  template <class F, class... A>
  explicit producer_impl(F&& fn, A&&... args)
      : fn_(std::forward<F>(fn)), args_(std::forward<A>(args)...) {}

  void run(sink<T>& out, std::stop_token stop) override {
    std::apply(
        [&](auto&... a) {
          if constexpr (kind == producer_kind::sink_stop) {
            std::invoke(fn_, out, std::move(stop), std::move(a)...);
          } else if constexpr (kind == producer_kind::sink_plain) {
            std::invoke(fn_, out, std::move(a)...);
          } else if constexpr (kind == producer_kind::range_stop) {
            drain_range(out, std::invoke(fn_, std::move(stop), std::move(a)...));
          } else {
            drain_range(out, std::invoke(fn_, std::move(a)...));
          }
        },
        args_);
  }

private:
  template <class R>
  static void drain_range(sink<T>& out, R&& range) {
    for (auto&& x : range) {
      if (!out(T(std::forward<decltype(x)>(x)))) return;
    }
  }

  P fn_;
  std::tuple<Args...> args_;
};

// Where the producer runs.
struct launch_spec {
  enum class kind { default_pool, pool, separate, executor };
  kind where = kind::default_pool;
  thread_pool* pool = nullptr;
  std::string name;
  std::function<void(std::function<void()>)> post;  // kind::executor
};

// Shared by the iterator (on the loop) and the producer run (on its thread).
template <class T>
class iterator_state : public std::enable_shared_from_this<iterator_state<T>> {
public:
  iterator_state(const iterator_options& opts, launch_spec launch,
                 std::unique_ptr<producer_base<T>> producer)
      : channel(opts.max_size, opts.producer_spin),
        consumer_spin(opts.consumer_spin),
        spin_budget_(opts.consumer_spin),
        launch_(std::move(launch)),
        producer_(std::move(producer)) {}

  channel_core<T> channel;
  loop_waiters done_waiters;
  const std::chrono::nanoseconds consumer_spin;
  std::atomic<std::uint64_t> consumer_wait_ns{0};

  // Adaptive consumer spin (consumer side only). A spin that ends in a park halves the
  // budget, one that finds an item doubles it back towards consumer_spin. When the producer
  // shares the consumer's core, or is simply slow, spinning only burns the time the producer
  // needs, so the budget falls to zero; every 64th wait probes with the full budget again.
  std::chrono::nanoseconds next_spin_budget() noexcept {
    if (spin_budget_.count() == 0 && ++spin_probe_ % 64 == 0) return consumer_spin;
    return spin_budget_;
  }
  void spin_failed() noexcept {
    spin_budget_ /= 2;
    if (spin_budget_ < std::chrono::microseconds(1)) spin_budget_ = std::chrono::nanoseconds(0);
  }
  void spin_succeeded() noexcept {
    spin_budget_ = std::min(consumer_spin, spin_budget_ * 2 + std::chrono::microseconds(1));
  }

  // --- consumer side (the iterator's owner; one at a time) ---------------------------------
  bool started() const noexcept { return phase_ != phase::idle; }
  bool finished() const noexcept { return finished_.load(std::memory_order_seq_cst); }

  // First pull: capture the consumer's context and loop, then launch.
  void start(const asio::any_io_executor& consumer) {
    if (phase_ != phase::idle) return;
    phase_ = phase::launched;
    consumer_ = consumer;
    snapshot_ = current_frame().snapshot;
    auto self = this->shared_from_this();
    try {
      {
        auto& ctx = static_cast<asio::execution_context&>(loop_context_of(consumer_));
        registry_ = loop_service::of(ctx).producers();
        std::weak_ptr<iterator_state> weak = self;
        registry_id_ = registry_->add([weak] {
          if (auto s = weak.lock()) s->stop_producer();
        });
      }
      switch (launch_.where) {
        case launch_spec::kind::default_pool: {
          auto& ctx = static_cast<asio::execution_context&>(loop_context_of(consumer_));
          run_on_pool(default_pool(ctx));
          break;
        }
        case launch_spec::kind::pool:
          run_on_pool(*launch_.pool);
          break;
        case launch_spec::kind::separate: {
          auto& ctx = static_cast<asio::execution_context&>(loop_context_of(consumer_));
          std::shared_ptr<separate_thread_registry> registry =
              loop_service::of(ctx).separate_threads();
          const std::uint64_t id = registry->add(launch_.name);
          try {
            start_separate_thread(launch_.name, [self, registry, id] {
              self->run(nullptr);
              registry->remove(id);
            });
          } catch (...) {
            registry->remove(id);
            throw;
          }
          break;
        }
        case launch_spec::kind::executor: {
          // Copies of the posted function share one guard: dropped by the executor without
          // ever running, the last copy reports the failure.
          auto once = std::make_shared<launch_once>(self);
          launch_.post([once] { once->run(); });
          break;
        }
      }
    } catch (...) {
      fail(std::current_exception());
    }
  }

  // close() and the iterator's destructor: never blocks.
  void request_close() noexcept {
    consumer_closed_ = true;
    if (phase_ == phase::idle) {
      phase_ = phase::never_started;
      producer_.reset();  // it never ran; its captures go now
      channel.close();
      mark_finished();
      return;
    }
    stop_producer();
  }

  // After close() the consumer sees the end, whatever is still buffered.
  bool consumer_closed() const noexcept { return consumer_closed_; }

  // Any thread: the consumer left, or its loop is being destroyed.
  void stop_producer() noexcept {
    stop_.request_stop();
    channel.close();
  }

  // --- producer side ---------------------------------------------------------------------
  void run(thread_pool* pool) noexcept {
    pool_access::held_worker hold(pool);
    std::exception_ptr failure;
    {
      context_frame frame{std::move(snapshot_)};
      context_scope context(frame);
      loop_scope loop(make_loop_ref(consumer_));
      try {
        if (!channel.closed()) {
          sink<T> out(channel, stop_.get_token());
          producer_->run(out, stop_.get_token());
        }
      } catch (...) {
        failure = std::current_exception();
      }
      producer_.reset();  // the producer's own cleanup, on its thread
    }
    hold.release();
    channel.close(std::move(failure));
    mark_finished();
  }

  // Launching failed or the pool stopped before the producer ran.
  void fail(std::exception_ptr e) noexcept {
    producer_.reset();
    channel.close(std::move(e));
    mark_finished();
  }

private:
  enum class phase { idle, launched, never_started };

  struct launch_task {
    std::shared_ptr<iterator_state> self;
    thread_pool* pool = nullptr;
    launch_task(std::shared_ptr<iterator_state> s, thread_pool* p = nullptr) noexcept
        : self(std::move(s)), pool(p) {}
    launch_task(launch_task&& o) noexcept : self(std::move(o.self)), pool(o.pool) {}
    launch_task& operator=(launch_task&&) = delete;
    void operator()() {
      auto s = std::move(self);
      s->run(pool);
    }
    // The pool stopped before running us.
    void ferry_abandon() noexcept {
      if (auto s = std::move(self)) {
        s->fail(make_iterator_launch_error("the pool stopped before the producer started"));
      }
    }
    // Dropped by an executor without running (its context went away).
    ~launch_task() {
      if (self) self->fail(make_iterator_launch_error("the executor dropped the producer"));
    }
  };

  struct launch_once {
    std::shared_ptr<iterator_state> self;
    std::atomic<bool> ran{false};
    explicit launch_once(std::shared_ptr<iterator_state> s) noexcept : self(std::move(s)) {}
    launch_once(const launch_once&) = delete;
    launch_once& operator=(const launch_once&) = delete;
    void run() {
      if (!ran.exchange(true)) self->run(nullptr);
    }
    ~launch_once() {
      if (!ran.load()) self->fail(make_iterator_launch_error("the executor dropped the producer"));
    }
  };

  void run_on_pool(thread_pool& pool) {
    pool_access::post_abandonable(pool, launch_task{this->shared_from_this(), &pool});
  }

  void mark_finished() noexcept {
    if (registry_) registry_->remove(registry_id_);
    finished_.store(true, std::memory_order_seq_cst);
    done_waiters.wake_all();
  }

  phase phase_ = phase::idle;     // consumer side only
  bool consumer_closed_ = false;  // consumer side only
  std::chrono::nanoseconds spin_budget_;  // consumer side only
  unsigned spin_probe_ = 0;               // consumer side only
  std::shared_ptr<producer_registry> registry_;  // set before launch
  std::uint64_t registry_id_ = 0;
  launch_spec launch_;
  std::unique_ptr<producer_base<T>> producer_;
  std::stop_source stop_;
  asio::any_io_executor consumer_;
  context_snapshot snapshot_;
  std::atomic<bool> finished_{false};
};

}  // namespace detail

// An asynchronous iterator over what a producer thread yields. Move-only; see the rules at
// the top of this header.
template <class T>
class threaded_iterator {
public:
  using value_type = T;

  explicit threaded_iterator(std::shared_ptr<detail::iterator_state<T>> state) noexcept
      : state_(std::move(state)) {}
  threaded_iterator(threaded_iterator&&) noexcept = default;
  threaded_iterator& operator=(threaded_iterator&& other) noexcept {
    if (this != &other) {
      if (state_) state_->request_close();
      state_ = std::move(other.state_);
    }
    return *this;
  }
  threaded_iterator(const threaded_iterator&) = delete;
  threaded_iterator& operator=(const threaded_iterator&) = delete;

  ~threaded_iterator() {
    if (state_) state_->request_close();
  }

  // The next item; std::nullopt at the end; rethrows the producer's exception.
  asio::awaitable<std::optional<T>> next() {
    detail::iterator_state<T>& s = checked("next");
    std::optional<T> item;
    if (s.consumer_closed()) co_return item;
    for (;;) {
      if (s.channel.try_pop(item)) co_return item;
      bool more = false;
      bool aborted = false;
      try {
        more = co_await wait_for_items(s);
      } catch (const std::system_error& e) {
        // Asio's own check reports a cancellation that arrives while the consumer still
        // yields to its loop as a plain system_error: give it the documented type.
        if (e.code() != asio::error::operation_aborted || dynamic_cast<const error*>(&e)) throw;
        aborted = true;
      }
      if (aborted) throw_cancelled();
      if (!more) co_return item;
    }
  }

  // Up to max_items ready items (at least one); empty at the end.
  asio::awaitable<std::vector<T>> next_batch(std::size_t max_items) {
    detail::iterator_state<T>& s = checked("next_batch");
    if (max_items == 0) {
      throw error(errc::invalid_argument, "threaded_iterator::next_batch: max_items must be > 0");
    }
    std::vector<T> items;
    if (s.consumer_closed()) co_return items;
    for (;;) {
      if (s.channel.try_pop_batch(items, max_items) != 0) co_return items;
      bool more = false;
      bool aborted = false;
      try {
        more = co_await wait_for_items(s);
      } catch (const std::system_error& e) {
        if (e.code() != asio::error::operation_aborted || dynamic_cast<const error*>(&e)) throw;
        aborted = true;
      }
      if (aborted) throw_cancelled();
      if (!more) co_return items;
    }
  }

  // Stops the producer and waits until it has returned and cleaned up. Idempotent.
  asio::awaitable<void> close() {
    if (!state_) co_return;
    state_->request_close();
    co_await wait_finished(std::nullopt);
  }

  // close() with a bound; false if the producer had not finished within `timeout`.
  asio::awaitable<bool> close_for(std::chrono::nanoseconds timeout) {
    if (!state_) co_return true;
    state_->request_close();
    const bool done = co_await wait_finished(std::chrono::steady_clock::now() + timeout);
    co_return done;
  }

  // True once the producer has returned (or will never run).
  bool finished() const noexcept { return state_ && state_->finished(); }

  iterator_stats stats() const noexcept {
    iterator_stats st;
    if (!state_) return st;
    st.produced = state_->channel.produced();
    st.consumed = state_->channel.consumed();
    st.producer_blocked = state_->channel.producer_blocked();
    st.consumer_waited = std::chrono::nanoseconds(
        static_cast<std::int64_t>(state_->consumer_wait_ns.load(std::memory_order_relaxed)));
    return st;
  }

private:
  detail::iterator_state<T>& checked(const char* what) const {
    if (!state_) {
      throw error(errc::invalid_argument,
                  std::string("threaded_iterator::") + what + ": moved-from iterator");
    }
    return *state_;
  }

  [[noreturn]] static void throw_cancelled() {
    throw error(make_error_code(asio::error::operation_aborted),
                "threaded_iterator::next: cancelled");
  }

  // True once an item can be popped; false at the end (rethrowing the producer's error).
  asio::awaitable<bool> wait_for_items(detail::iterator_state<T>& s) {
    asio::any_io_executor ex = co_await asio::this_coro::executor;
    if (!s.started()) s.start(ex);
    const auto t0 = std::chrono::steady_clock::now();
    const auto spin_until = t0 + s.next_spin_budget();
    bool spun = false;
    detail::channel_core<T>* c = &s.channel;
    for (unsigned round = 1;; ++round) {
      if (c->has_item()) break;
      if (c->drained()) {
        note_wait(s, t0);
        if (std::exception_ptr e = c->error()) std::rethrow_exception(e);
        co_return false;
      }
      if (!s.finished() && std::chrono::steady_clock::now() < spin_until) {
        // Yield to the loop (its other handlers run) and look again; now and then give the
        // CPU away too, in case the producer waits for this very core.
        if (round % 8 == 0) std::this_thread::yield();
        spun = true;
        co_await asio::post(ex, asio::use_awaitable);
        continue;
      }
      if (spun) s.spin_failed();
      spun = false;
      // Built in its own statement: no temporary with a destructor may live across the
      // suspension (g++ 12 destroys such temporaries wrongly).
      auto wait = detail::async_wait_until(
          c->readers(), state_, [c] { return c->readable(); }, std::nullopt,
          asio::experimental::as_tuple(asio::use_awaitable));
      std::tuple<std::error_code> r = co_await std::move(wait);
      if (std::get<0>(r)) {
        note_wait(s, t0);
        if (std::get<0>(r) == asio::error::operation_aborted) throw_cancelled();
        throw error(std::get<0>(r), "threaded_iterator::next: wait failed");
      }
    }
    if (spun) s.spin_succeeded();
    note_wait(s, t0);
    co_return true;
  }

  static void note_wait(detail::iterator_state<T>& s, std::chrono::steady_clock::time_point t0) {
    s.consumer_wait_ns.fetch_add(
        static_cast<std::uint64_t>((std::chrono::steady_clock::now() - t0).count()),
        std::memory_order_relaxed);
  }

  asio::awaitable<bool> wait_finished(
      std::optional<std::chrono::steady_clock::time_point> deadline) {
    detail::iterator_state<T>* s = state_.get();
    auto wait = detail::async_wait_until(s->done_waiters, state_, [s] { return s->finished(); },
                                         deadline, asio::experimental::as_tuple(asio::use_awaitable));
    std::tuple<std::error_code> r = co_await std::move(wait);
    const std::error_code ec = std::get<0>(r);
    if (ec == errc::timed_out) co_return false;
    if (ec) throw error(ec, "threaded_iterator::close: cancelled");
    co_return true;
  }

  std::shared_ptr<detail::iterator_state<T>> state_;
};

namespace detail {

template <class T, class P, class... Args>
threaded_iterator<T> make_iterator(const iterator_options& opts, launch_spec launch, P fn,
                                   Args&&... args) {
  static_assert(!std::is_void_v<T>,
                "ferry: cannot deduce the element type: the producer must take a "
                "ferry::sink<T>& first or return a range; or name T explicitly");
  static_assert(kind_of<T, P, std::decay_t<Args>...>() != producer_kind::invalid,
                "ferry: a producer is void(ferry::sink<T>&, [std::stop_token,] args...) or "
                "returns a range from ([std::stop_token,] args...)");
  if (opts.consumer_spin.count() < 0 || opts.producer_spin.count() < 0) {
    throw error(errc::invalid_argument, "ferry::iterator_options: spin times must not be negative");
  }
  auto producer = std::make_unique<producer_impl<T, P, std::decay_t<Args>...>>(
      std::move(fn), std::forward<Args>(args)...);
  return threaded_iterator<T>(
      std::make_shared<iterator_state<T>>(opts, std::move(launch), std::move(producer)));
}

}  // namespace detail

// A factory of threaded iterators over one producer.
template <class Given, class P>
class threaded_iterable_function {
public:
  threaded_iterable_function(P fn, iterator_options opts, detail::launch_spec launch)
      : fn_(std::move(fn)), opts_(std::move(opts)), launch_(std::move(launch)) {}

  template <class... Args>
  auto operator()(Args&&... args) const {
    using T = typename detail::element_of<Given, P, std::decay_t<Args>...>::type;
    return detail::make_iterator<T>(opts_, launch_, fn_, std::forward<Args>(args)...);
  }

  // The same producer on `pool` (plain form).
  threaded_iterable_function on(thread_pool& pool) const {
    detail::launch_spec l;
    l.where = detail::launch_spec::kind::pool;
    l.pool = &pool;
    return threaded_iterable_function(fn_, opts_, std::move(l));
  }

  const iterator_options& options() const noexcept { return opts_; }

private:
  P fn_;
  iterator_options opts_;
  detail::launch_spec launch_;
};

// Producer on a pool worker (the default pool of the consumer's loop).
template <class T = detail::deduce_element, class P>
threaded_iterable_function<T, std::decay_t<P>> threaded_iterable(P&& producer,
                                                                 iterator_options opts = {}) {
  return {std::forward<P>(producer), std::move(opts), detail::launch_spec{}};
}

// Producer on a worker of `pool`.
template <class T = detail::deduce_element, class P>
threaded_iterable_function<T, std::decay_t<P>> threaded_iterable(thread_pool& pool, P&& producer,
                                                                 iterator_options opts = {}) {
  detail::launch_spec l;
  l.where = detail::launch_spec::kind::pool;
  l.pool = &pool;
  return {std::forward<P>(producer), std::move(opts), std::move(l)};
}

// Producer on a thread of its own per iterator.
template <class T = detail::deduce_element, class P>
threaded_iterable_function<T, std::decay_t<P>> threaded_iterable_separate(
    P&& producer, iterator_options opts = {},
    std::source_location where = std::source_location::current()) {
  detail::launch_spec l;
  l.where = detail::launch_spec::kind::separate;
  l.name = opts.name.empty() ? detail::call_site_name(where) : opts.name;
  return {std::forward<P>(producer), std::move(opts), std::move(l)};
}

namespace detail {
template <class E>
launch_spec launch_on(E&& target) {
  launch_spec l;
  using D = std::remove_cvref_t<E>;
  if constexpr (std::is_same_v<D, thread_pool>) {
    l.where = launch_spec::kind::pool;
    l.pool = &target;
  } else if constexpr (std::is_same_v<D, thread_pool::executor_type>) {
    l.where = launch_spec::kind::pool;
    l.pool = &asio::query(target, asio::execution::context);
  } else if constexpr (requires { target.get_executor(); }) {
    l.where = launch_spec::kind::executor;
    l.post = [ex = target.get_executor()](std::function<void()> f) { asio::post(ex, std::move(f)); };
  } else {
    l.where = launch_spec::kind::executor;
    l.post = [ex = target](std::function<void()> f) { asio::post(ex, std::move(f)); };
  }
  return l;
}
}  // namespace detail

// One iterator over `producer()` run on `pool_or_executor` (a ferry::thread_pool, its
// executor, or any Asio executor or execution context).
template <class T = detail::deduce_element, class P, class PoolOrExecutor>
auto iterator_wrapper(P&& producer, PoolOrExecutor&& pool_or_executor, std::size_t max_size = 64) {
  using fn_type = std::decay_t<P>;
  using E = typename detail::element_of<T, fn_type>::type;
  iterator_options opts;
  opts.max_size = max_size;
  return detail::make_iterator<E>(opts, detail::launch_on(pool_or_executor),
                                  fn_type(std::forward<P>(producer)));
}

// One iterator over `producer()` run on a thread of its own, named `name` (default: the
// call site, "file:line").
template <class T = detail::deduce_element, class P>
auto iterator_wrapper_separate(P&& producer, std::size_t max_size = 64, std::string name = {},
                               std::source_location where = std::source_location::current()) {
  using fn_type = std::decay_t<P>;
  using E = typename detail::element_of<T, fn_type>::type;
  iterator_options opts;
  opts.max_size = max_size;
  detail::launch_spec l;
  l.where = detail::launch_spec::kind::separate;
  l.name = name.empty() ? detail::call_site_name(where) : std::move(name);
  return detail::make_iterator<E>(opts, std::move(l), fn_type(std::forward<P>(producer)));
}

// Calls fn(item) for every item (co_awaiting fn's result when it is an awaitable).
template <class T, class F>
asio::awaitable<void> for_each(threaded_iterator<T>& it, F fn) {
  for (;;) {
    std::optional<T> item = co_await it.next();
    if (!item) break;
    if constexpr (std::is_same_v<std::invoke_result_t<F&, T&&>, asio::awaitable<void>>) {
      asio::awaitable<void> step = fn(std::move(*item));
      co_await std::move(step);
    } else {
      fn(std::move(*item));
    }
  }
}

// Every item until the end (or the first `limit`), in order.
template <class T>
asio::awaitable<std::vector<T>> collect(threaded_iterator<T>& it,
                                        std::size_t limit = static_cast<std::size_t>(-1)) {
  std::vector<T> out;
  while (out.size() < limit) {
    std::vector<T> batch = co_await it.next_batch(std::min<std::size_t>(limit - out.size(), 4096));
    if (batch.empty()) break;
    for (auto& x : batch) out.push_back(std::move(x));
  }
  co_return out;
}

template <class T>
asio::awaitable<std::vector<T>> collect(threaded_iterator<T>&& it,
                                        std::size_t limit = static_cast<std::size_t>(-1)) {
  threaded_iterator<T> owned(std::move(it));
  std::vector<T> out = co_await collect(owned, limit);
  co_await owned.close();
  co_return out;
}

// Runs body(it) and then awaits it.close(), however body ends (Python's `async with`);
// body's exception is rethrown after the close.
template <class T, class Body>
asio::awaitable<void> closing(threaded_iterator<T> it, Body body) {
  std::exception_ptr failure;
  try {
    co_await body(it);
  } catch (...) {
    failure = std::current_exception();
  }
  co_await it.close();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace ferry
