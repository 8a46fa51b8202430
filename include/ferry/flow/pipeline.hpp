// ferry/flow/pipeline.hpp — a bounded streaming pipeline: serial and parallel stages over a
// stream, with a limit on the items in flight (the TBB parallel_pipeline / Taskflow idea).
//
//     namespace fl = ferry::flow;
//     auto p = fl::make_pipeline(
//         fl::serial_in_order([](std::string line) { return parse(line); }),    // one at a time
//         fl::parallel([](record r) { return score(r); }),                        // any number
//         fl::serial_in_order([&](scored s) { out << s; }));                     // in input order
//     fl::pipeline_stats st = co_await p.run(pool, lines, {.max_in_flight = 16});
//     std::vector<scored> v = co_await p2.collect(pool, it);   // the last stage's results
//
// Rules (spec/flow-pipelines.md F11):
//  * A stage is a function of the previous stage's value (the source's for the first),
//    called with an rvalue. serial_in_order runs one item at a time in the order the source
//    gave them; serial_out_of_order one at a time in any order; parallel any number at once.
//    Stage functions run on the pool given to run() (else the loop's default pool), never on
//    the loop.
//  * At most `max_in_flight` items (default: 4 × the pool's threads) are between the source
//    and the end of the last stage at any moment; the source is not read further until one
//    finishes. That bound is the back-pressure on the source.
//  * Sources: any input range (read lazily, one item at a time, on the pool's workers, under
//    a lock), a ferry::threaded_iterator<T>& (a thread's stream, read on the loop in batches),
//    or a ferry::from_thread_channel<T>& (read on the loop until it is closed). Range and
//    channel must outlive the run.
//  * run(): the last stage must return void (it consumes the items; nothing is dropped
//    silently). collect(): the last stage's results in a vector, in source order when the
//    option `ordered` is true (the default) and in completion order otherwise.
//  * Completion, `void(std::exception_ptr, pipeline_stats)` with any completion token,
//    after every item has left the pipeline. The first exception from a stage or the source
//    stops reading the source; items in flight are discarded at their next stage boundary
//    (counted in pipeline_stats::discarded) and the exception is delivered. Cancelling the
//    operation (its cancellation slot) does the same with operation_aborted. A
//    pipeline_stats with items == source items and discarded == 0 means nothing was lost.
//  * The pipeline object may be destroyed while a run goes on: a run owns copies of the
//    stage functions. Concurrent runs of one pipeline are independent; stage functions are
//    invoked as const and may be called from several threads at once (parallel stages, or
//    serial stages of different runs).
#pragma once

#include <ferry/error.hpp>
#include <ferry/from_thread_channel.hpp>
#include <ferry/thread_pool.hpp>
#include <ferry/threaded.hpp>
#include <ferry/threaded_iterable.hpp>

#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/awaitable.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/dispatch.hpp>
#include <asio/execution/outstanding_work.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/post.hpp>
#include <asio/prefer.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <ranges>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace ferry::flow {

enum class stage_mode { serial_in_order, serial_out_of_order, parallel };

template <class F>
struct pipeline_stage {
  F fn;
  stage_mode mode = stage_mode::parallel;
};

template <class F>
pipeline_stage<std::decay_t<F>> serial_in_order(F&& f) {
  return {std::forward<F>(f), stage_mode::serial_in_order};
}
template <class F>
pipeline_stage<std::decay_t<F>> serial_out_of_order(F&& f) {
  return {std::forward<F>(f), stage_mode::serial_out_of_order};
}
template <class F>
pipeline_stage<std::decay_t<F>> parallel(F&& f) {
  return {std::forward<F>(f), stage_mode::parallel};
}

struct pipeline_options {
  std::size_t max_in_flight = 0;  // 0: 4 × the pool's threads
  bool ordered = true;            // collect(): results in source order
};

struct pipeline_stats {
  std::uint64_t items = 0;         // items that went through every stage
  std::uint64_t discarded = 0;     // items dropped after a failure or cancellation
  std::size_t peak_in_flight = 0;  // the most items in flight at once
};

namespace detail {

template <class T>
using stage_value_t = std::conditional_t<std::is_void_v<T>, std::monostate, T>;

// The value types along the chain: In, then each stage's result.
template <class In, class... F>
struct chain;
template <class In>
struct chain<In> {
  using values = std::tuple<In>;
  using out = In;
};
template <class In, class F, class... Rest>
struct chain<In, F, Rest...> {
  static_assert(std::is_invocable_v<const F&, In&&>,
                "ferry::flow pipeline: a stage cannot be called with the previous stage's "
                "value (as an rvalue); note that stage functions are invoked as const");
  using R = std::invoke_result_t<const F&, In&&>;
  static_assert(!std::is_void_v<R> || sizeof...(Rest) == 0,
                "ferry::flow pipeline: only the last stage may return void");
  using next = chain<stage_value_t<R>, Rest...>;
  using values = decltype(std::tuple_cat(std::declval<std::tuple<In>>(),
                                         std::declval<typename next::values>()));
  using out = std::conditional_t<sizeof...(Rest) == 0, R, typename next::out>;
};

template <class Tuple>
struct variant_of;
template <class... T>
struct variant_of<std::tuple<T...>> {
  using type = std::variant<std::monostate, T...>;
};

// Where items come from. A range source is pulled by the workers under the input lock; a
// loop source (threaded_iterator, from_thread_channel) is pushed in by a feeder coroutine.
template <class View>
struct range_source {
  using view = View;
  using value_type = std::ranges::range_value_t<view>;
  view v;
  std::ranges::iterator_t<view> cur;
  bool started = false;
  template <class Put>
  bool pull(Put&& put) {  // false at the end
    if (!started) {
      cur = std::ranges::begin(v);
      started = true;
    }
    if (cur == std::ranges::end(v)) return false;
    put(static_cast<value_type>(*cur));
    ++cur;
    return true;
  }
};

template <class T>
struct is_loop_source : std::false_type {};
template <class T>
struct is_loop_source<threaded_iterator<T>> : std::true_type {
  using value_type = T;
};
template <class T>
struct is_loop_source<from_thread_channel<T>> : std::true_type {
  using value_type = T;
};

// A test-and-test-and-set lock for the serial stages' few-instruction critical sections:
// a std::mutex would put a contended hand-over to sleep in the kernel for microseconds.
class spin_lock {
public:
  void lock() noexcept {
    for (;;) {
      if (!locked_.exchange(true, std::memory_order_acquire)) return;
      for (int spins = 0; locked_.load(std::memory_order_relaxed); ++spins) {
        if (spins >= 64) {
          std::this_thread::yield();
          spins = 0;
        } else {
#if defined(__x86_64__) || defined(__i386__)
          __builtin_ia32_pause();
#endif
        }
      }
    }
  }
  void unlock() noexcept { locked_.store(false, std::memory_order_release); }

private:
  std::atomic<bool> locked_{false};
};

// One run. `Stages` is the tuple of stage functions, `Values` the item variant.
template <class Stages, class Item, std::size_t N>
class pipeline_run : public std::enable_shared_from_this<pipeline_run<Stages, Item, N>> {
  struct item {
    std::uint64_t seq = 0;
    std::size_t stage = 0;
    Item value;
    item* next_free = nullptr;
    item* next_ready = nullptr;
    bool owned = false;
  };
  struct serial_state {
    spin_lock mu;  // held for a few instructions, never around user code
    bool busy = false;
    std::uint64_t next_seq = 0;
    std::vector<item*> waiting;  // in-order: a min-heap on seq
  };

public:
  using completion = std::function<void(std::exception_ptr, pipeline_stats)>;

  pipeline_run(Stages stages, const std::array<stage_mode, N>& modes, thread_pool& pool,
               std::size_t capacity)
      : stages_(std::move(stages)), modes_(modes), pool_(pool), items_(capacity) {
    for (std::size_t i = 0; i < capacity; ++i) {
      items_[i].next_free = free_;
      free_ = &items_[i];
    }
    free_count_ = capacity;
    for (auto& s : serial_) s.waiting.reserve(capacity);
  }

  // --- set-up (before start) -------------------------------------------------------------
  void on_done(completion c) { done_ = std::move(c); }
  template <class Pull>
  void set_pull(Pull p) {
    pull_ = std::move(p);
  }

  // Range source: the runners pull.
  void start_pulling() { start_runners(std::min(items_.size(), pool_.size())); }

  // Loop source (the feeder, on its strand): how many items it may read now. Zero while
  // every token is in flight — then the next released token wakes the feeder — or once
  // the run is stopping (the feeder checks stopping()).
  std::size_t room() {
    std::lock_guard lock(input_mu_);
    if (stopping_.load(std::memory_order_relaxed)) return 0;
    if (free_count_ == 0) feeder_waiting_ = true;
    return free_count_;
  }
  item* acquire_for_feeder() {
    std::lock_guard lock(input_mu_);
    if (stopping_.load(std::memory_order_relaxed)) return nullptr;
    return take_free_locked();
  }
  template <class V>
  void feed(item* it, V&& v) {
    try {
      it->value.template emplace<1>(std::forward<V>(v));
    } catch (...) {
      give_back(it);  // a throwing move: the token must not be lost
      throw;
    }
    it->seq = feed_seq_++;
    schedule(it, false);
  }
  // Items read from a loop source that never got a token (the run stopped meanwhile).
  void count_discarded(std::size_t n) {
    std::lock_guard lock(input_mu_);
    discarded_ += n;
  }
  void feeder_finished() {
    bool complete = false;
    {
      std::lock_guard lock(input_mu_);
      input_done_ = true;
      complete = finished_locked();
    }
    if (complete) finish();
  }
  void set_feeder_wake(std::function<void()> wake) { wake_feeder_ = std::move(wake); }

  // From the loop (the completion's cancellation slot) or a worker (a failure).
  void fail(std::exception_ptr e) {
    {
      std::lock_guard lock(input_mu_);
      if (!error_) error_ = std::move(e);
    }
    stop();
  }
  bool stopping() const noexcept { return stopping_.load(std::memory_order_acquire); }

private:
  item* take_free_locked() {
    item* it = free_;
    if (it == nullptr) return nullptr;
    free_ = it->next_free;
    --free_count_;
    it->stage = 0;
    const std::size_t in_flight = items_.size() - free_count_;
    if (in_flight > peak_) peak_ = in_flight;
    return it;
  }

  // Under input_mu_. The run completes once every token is back, the input has ended, and
  // no runner is left: after the completion nothing of this run touches the pool, which the
  // caller may then stop or destroy.
  bool finished_locked() {
    if (completed_ || free_count_ != items_.size() || !input_done_) return false;
    {
      std::lock_guard lock(ready_mu_);  // lock order: input_mu_, then ready_mu_
      if (runners_ != 0) return false;
    }
    completed_ = true;
    return true;
  }

  void check_finished() {
    bool complete = false;
    {
      std::lock_guard lock(input_mu_);
      complete = finished_locked();
    }
    if (complete) finish();
  }

  // Sets the stop flag, then empties every serial stage's waiting list. A worker about to
  // park an item in a list checks the flag under that list's lock, after this store, so no
  // item can be parked once its list has been emptied here.
  void stop() {
    stopping_.store(true, std::memory_order_release);
    for (auto& s : serial_) {
      std::vector<item*> dropped;
      {
        std::lock_guard lock(s.mu);
        dropped.swap(s.waiting);
      }
      for (item* it : dropped) release(it, false);
    }
    bool complete = false;
    std::function<void()> wake;
    {
      std::lock_guard lock(input_mu_);
      if (!pull_) {
        wake = wake_feeder_;  // the feeder ends the input itself
      } else {
        input_done_ = true;
        complete = finished_locked();
      }
    }
    if (wake) wake();
    if (complete) finish();
  }

  // Returns a token that never carried an item.
  void give_back(item* it) noexcept {
    it->value.template emplace<0>();
    std::lock_guard lock(input_mu_);
    it->next_free = free_;
    free_ = it;
    ++free_count_;
  }

  // Returns an item's token (finished: it went through every stage; else discarded).
  void release(item* it, bool finished_all) {
    it->value.template emplace<0>();
    bool complete = false;
    bool wake = false;
    {
      std::lock_guard lock(input_mu_);
      if (finished_all) {
        ++items_done_;
      } else {
        ++discarded_;
      }
      it->next_free = free_;
      free_ = it;
      ++free_count_;
      if (feeder_waiting_) {
        feeder_waiting_ = false;
        wake = true;
      }
      complete = finished_locked();
    }
    if (wake && wake_feeder_) wake_feeder_();
    if (complete) finish();
  }

  // The next source item in a fresh token, or null (no token, end of input, stopping). The
  // token comes from the spin-locked bookkeeping; the read itself, user code that may take
  // its time, runs under pull_mu_, a plain mutex, which also orders the sequence numbers.
  item* pull() {
    item* it = nullptr;
    {
      std::lock_guard lock(input_mu_);
      if (!pull_ || input_done_ || stopping_.load(std::memory_order_relaxed)) return nullptr;
      it = take_free_locked();
      if (it == nullptr) return nullptr;
    }
    bool got = false;
    std::exception_ptr failure;
    {
      std::lock_guard lock(pull_mu_);
      if (!source_ended_) {
        try {
          got = pull_([&](auto&& v) { it->value.template emplace<1>(std::forward<decltype(v)>(v)); });
        } catch (...) {
          failure = std::current_exception();
        }
        if (got) {
          it->seq = next_seq_++;
        } else {
          source_ended_ = true;
        }
      }
    }
    if (got) return it;
    it->value.template emplace<0>();
    bool complete = false;
    bool failed = false;
    {
      std::lock_guard lock(input_mu_);
      it->next_free = free_;
      free_ = it;
      ++free_count_;
      input_done_ = true;
      if (failure) {
        failed = true;
        if (!error_) error_ = std::move(failure);
      }
      complete = finished_locked();
    }
    if (failed) stop();
    if (complete) finish();
    return nullptr;
  }

  template <std::size_t K>
  void run_stage_k(item* it) {
    auto& in = std::get<K + 1>(it->value);
    const auto& f = std::get<K>(stages_).fn;
    using R = std::invoke_result_t<decltype(f), decltype(std::move(in))>;
    if constexpr (std::is_void_v<R>) {
      std::invoke(f, std::move(in));
      it->value.template emplace<K + 2>();
    } else {
      R r = std::invoke(f, std::move(in));
      it->value.template emplace<K + 2>(std::move(r));
    }
  }

  template <std::size_t... K>
  void run_stage(item* it, std::index_sequence<K...>) {
    const std::size_t k = it->stage;
    ((k == K ? (run_stage_k<K>(it), true) : false) || ...);
  }

  // --- scheduling ------------------------------------------------------------------------
  //
  // Work is items ready to continue (a FIFO of this run) plus source items to pull. At most
  // pool-size "runner" tasks process it; a new runner is posted only when fewer are active,
  // so the pool never holds queued runners hostage behind a long one, and a runner re-posts
  // itself after a budget of chains so that a pool worker is never monopolised.

  // Runners start one by one: each new runner posts the next only once it is running, so
  // a pool worker taking a batch of tasks never takes two runners at once and leaves the
  // other worker idle while one of them waits behind the other.
  void start_runners(std::size_t n) {
    {
      std::lock_guard lock(ready_mu_);
      wanted_ = n;
      ++runners_;
    }
    post_runner();
  }

  void spawn_more() {
    {
      std::lock_guard lock(ready_mu_);
      if (runners_ >= wanted_) return;
      ++runners_;
    }
    post_runner();
  }

  // A runner as a pool task. A pool that stops before running it calls ferry_abandon:
  // the run then fails with pool_closed and gives back what nobody will carry on.
  struct runner_task {
    std::shared_ptr<pipeline_run> run;
    void operator()() const { run->runner(); }
    void ferry_abandon() noexcept { run->runner_abandoned(); }
  };

  void post_runner() {
    ferry::detail::pool_access::post_abandonable(pool_, runner_task{this->shared_from_this()});
  }

  void runner_abandoned() noexcept {
    try {
      fail(ferry::detail::make_pool_closed_error());
    } catch (...) {  // only the delivery can throw; nothing is left to tell
    }
    std::vector<item*> orphans;
    {
      std::lock_guard lock(ready_mu_);
      --runners_;
      for (item* it = ready_head_; it != nullptr; it = it->next_ready) orphans.push_back(it);
      ready_head_ = ready_tail_ = nullptr;
    }
    try {
      for (item* it : orphans) release(it, false);
      check_finished();
    } catch (...) {
    }
  }

  // Queues `it` to continue at its stage (`owned`: it already holds that serial stage).
  void schedule(item* it, bool owned) {
    it->owned = owned;
    it->next_ready = nullptr;
    bool post = false;
    {
      std::lock_guard lock(ready_mu_);
      if (ready_tail_ != nullptr) {
        ready_tail_->next_ready = it;
      } else {
        ready_head_ = it;
      }
      ready_tail_ = it;
      if (runners_ < pool_.size()) {
        ++runners_;
        post = true;
      }
    }
    if (post) post_runner();
  }

  item* take_ready() {
    std::lock_guard lock(ready_mu_);
    item* it = ready_head_;
    if (it != nullptr) {
      ready_head_ = it->next_ready;
      if (ready_head_ == nullptr) ready_tail_ = nullptr;
    }
    return it;
  }

  void runner() {
    // A slice: after about 200 µs the runner re-posts itself, so other work on the pool
    // (threaded calls, other runs) waits at most that long behind it.
    constexpr auto slice = std::chrono::microseconds(200);
    const auto slice_end = std::chrono::steady_clock::now() + slice;
    spawn_more();
    for (unsigned chains = 1;; ++chains) {
      item* it = take_ready();
      if (it == nullptr) it = pull();
      if (it == nullptr) {
        bool exiting = false;
        {
          std::lock_guard lock(ready_mu_);
          if (ready_head_ == nullptr) {
            --runners_;
            exiting = true;
          }
        }
        if (!exiting) continue;
        check_finished();  // the last runner out may be what completes the run
        return;
      }
      drive(it, it->owned);
      if (chains % 16 == 0 && std::chrono::steady_clock::now() >= slice_end) {
        post_runner();  // keeps its place in runners_
        return;
      }
    }
  }

  // Carries `it` through the stages (`owned`: it already holds its current serial stage)
  // until it finishes, waits at a serial stage, or the run stops.
  void drive(item* it, bool owned) {
    it->owned = false;
    while (it->stage < N) {
      if (stopping()) break;
      const std::size_t k = it->stage;
      const stage_mode mode = modes_[k];
      if (mode != stage_mode::parallel && !owned) {
        serial_state& s = serial_[k];
        std::lock_guard lock(s.mu);
        if (stopping()) break;
        if (s.busy || (mode == stage_mode::serial_in_order && it->seq != s.next_seq)) {
          s.waiting.push_back(it);
          if (mode == stage_mode::serial_in_order) {
            std::push_heap(s.waiting.begin(), s.waiting.end(), later);
          }
          return;  // hand_over() schedules it when its turn comes
        }
        s.busy = true;
      }
      owned = false;
      // The exception leaves the catch block before it is handed on, so that its last
      // reference is dropped by whoever receives it, after a lock or a post (the hand-off
      // TSan can see; libstdc++'s exception reference counts are not instrumented).
      std::exception_ptr failure;
      try {
        run_stage(it, std::make_index_sequence<N>{});
      } catch (...) {
        failure = std::current_exception();
      }
      if (failure) {
        fail(std::move(failure));
        break;  // the stage stays busy: nothing runs after a failure
      }
      ++it->stage;
      if (mode == stage_mode::parallel) continue;
      item* next = hand_over(k);
      if (next == nullptr) continue;
      // Serial stages are where a pipeline queues up: keep this one running here with the
      // next waiting item, and let another runner carry the finished one on.
      if (it->stage == N) {
        release(it, true);
      } else {
        schedule(it, false);
      }
      it = next;
      owned = true;
    }
    release(it, it->stage == N);
  }

  // After an item left serial stage k: the stage goes to the next waiting item, if any,
  // which is returned holding the stage (the caller runs it).
  item* hand_over(std::size_t k) {
    serial_state& s = serial_[k];
    item* next = nullptr;
    {
      std::lock_guard lock(s.mu);
      s.busy = false;
      ++s.next_seq;
      if (!s.waiting.empty()) {
        if (modes_[k] == stage_mode::serial_in_order) {
          if (s.waiting.front()->seq == s.next_seq) {
            std::pop_heap(s.waiting.begin(), s.waiting.end(), later);
            next = s.waiting.back();
            s.waiting.pop_back();
          }
        } else {
          next = s.waiting.back();
          s.waiting.pop_back();
        }
      }
      if (next != nullptr) s.busy = true;
    }
    return next;
  }

  static bool later(const item* a, const item* b) noexcept { return a->seq > b->seq; }

  void finish() {
    pipeline_stats st;
    std::exception_ptr e;
    {
      std::lock_guard lock(input_mu_);
      st.items = items_done_;
      st.discarded = discarded_;
      st.peak_in_flight = peak_;
      e = std::move(error_);
    }
    completion done = std::move(done_);
    done(std::move(e), st);
  }

  Stages stages_;
  std::array<stage_mode, N> modes_;
  thread_pool& pool_;
  std::vector<item> items_;
  std::array<serial_state, N> serial_;
  std::atomic<bool> stopping_{false};

  spin_lock ready_mu_;  // guards the ready FIFO and runners_
  item* ready_head_ = nullptr;
  item* ready_tail_ = nullptr;
  std::size_t runners_ = 0;
  std::size_t wanted_ = 0;  // runners to start with (range sources)

  // Guards everything below, and reading the range source. A spin lock: the sections are
  // short (a range source is read one item at a time; a source that blocks per item belongs
  // in a threaded_iterator), and a contended std::mutex would park a worker in the kernel.
  spin_lock input_mu_;
  std::function<bool(const std::function<void(std::variant_alternative_t<1, Item>&&)>&)> pull_;
  item* free_ = nullptr;
  std::size_t free_count_ = 0;
  std::uint64_t next_seq_ = 0;   // range sources: under pull_mu_
  std::uint64_t feed_seq_ = 0;   // loop sources: the feeder's own
  std::mutex pull_mu_;           // serialises reads of a range source
  bool source_ended_ = false;    // under pull_mu_
  std::uint64_t items_done_ = 0;
  std::uint64_t discarded_ = 0;
  std::size_t peak_ = 0;
  bool input_done_ = false;
  bool completed_ = false;
  bool feeder_waiting_ = false;
  std::exception_ptr error_;
  std::function<void()> wake_feeder_;
  completion done_;
};


// --- launching a run -------------------------------------------------------------------------

// The feeder of a loop source: reads batches on the loop and hands each item a free token.
struct feeder_state {
  explicit feeder_state(const asio::any_io_executor& ex)
      : wake(ex, asio::steady_timer::time_point::max()) {}
  asio::steady_timer wake;
  asio::cancellation_signal cancel;
};

bool is_channel_closed(const std::exception_ptr& e);

template <class T>
asio::awaitable<std::vector<T>> next_items(threaded_iterator<T>& it, std::size_t n) {
  auto op = it.next_batch(n);
  co_return co_await std::move(op);  // empty at the end
}
template <class T>
asio::awaitable<std::vector<T>> next_items(from_thread_channel<T>& ch, std::size_t n) {
  auto op = ch.async_get_batch(n, asio::experimental::as_tuple(asio::use_awaitable));
  auto [e, batch] = co_await std::move(op);
  if (e && !is_channel_closed(e)) std::rethrow_exception(e);
  co_return std::move(batch);  // empty once closed and drained
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsubobject-linkage"
#endif
// Runs on a strand of the completion's executor: the wake-ups below and this coroutine never
// run at once, so a wake posted by a worker cannot slip in between room() and the wait.
template <class Run, class Src>
asio::awaitable<void> feed(std::shared_ptr<Run> run, Src* src, std::shared_ptr<feeder_state> fs) {
  co_await asio::this_coro::throw_if_cancelled(false);
  try {
    while (!run->stopping()) {
      // Read no more than there are free tokens: the bound is the source's back-pressure.
      const std::size_t room = run->room();
      if (room == 0) {
        if (run->stopping()) break;
        auto wait = fs->wake.async_wait(asio::experimental::as_tuple(asio::use_awaitable));
        co_await std::move(wait);
        continue;
      }
      auto op = next_items(*src, room);
      auto batch = co_await std::move(op);
      if (batch.empty()) break;
      std::size_t fed = 0;
      for (auto& v : batch) {
        auto* it = run->acquire_for_feeder();
        if (it == nullptr) break;  // stopping
        run->feed(it, std::move(v));
        ++fed;
      }
      if (fed != batch.size()) {
        run->count_discarded(batch.size() - fed);
        break;
      }
    }
  } catch (...) {
    std::exception_ptr failure = std::current_exception();
    if (!run->stopping()) run->fail(std::move(failure));
  }
  run->feeder_finished();
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

std::exception_ptr make_pipeline_aborted();

template <class In, class Stages, std::size_t... K>
auto make_run_type(std::index_sequence<K...>) {
  using chain_t = chain<In, decltype(std::get<K>(std::declval<Stages&>()).fn)...>;
  using item_t = typename variant_of<typename chain_t::values>::type;
  return std::type_identity<pipeline_run<Stages, item_t, sizeof...(K)>>{};
}

template <class In, class Stages, std::size_t N, class Source, class Token>
auto launch_pipeline(thread_pool* pool, Stages stages, const std::array<stage_mode, N>& modes,
                     Source&& source, pipeline_options options, Token&& token) {
  using run_t = typename decltype(make_run_type<In, Stages>(std::make_index_sequence<N>{}))::type;
  using src_t = std::remove_cvref_t<Source>;
  constexpr bool loop_source = is_loop_source<src_t>::value;
  if constexpr (loop_source) {
    static_assert(std::is_lvalue_reference_v<Source>,
                  "ferry::flow pipeline: pass a threaded_iterator or from_thread_channel as an "
                  "lvalue; it must outlive the run");
  }
  auto init = [pool, modes, options](auto handler, Stages st, auto src) mutable {
    constexpr bool from_loop = is_loop_source<src_t>::value;
    using handler_t = decltype(handler);
    // The completion's executor: the handler's own, else the pool's (a plain callback then
    // runs on a pool thread; bind it to a loop with asio::bind_executor to have it there).
    asio::any_io_executor ex =
        pool != nullptr ? asio::any_io_executor(asio::get_associated_executor(handler, pool->get_executor()))
                        : asio::any_io_executor(asio::get_associated_executor(handler));
    thread_pool& p = pool != nullptr ? *pool : ferry::default_pool(ferry::detail::loop_context_of(ex));
    std::size_t cap = options.max_in_flight != 0 ? options.max_in_flight : 4 * p.size();
    auto run = std::make_shared<run_t>(std::move(st), modes, p, cap);
    auto slot = asio::get_associated_cancellation_slot(handler);
    auto work = asio::prefer(ex, asio::execution::outstanding_work.tracked);
    auto h = std::make_shared<std::optional<handler_t>>(std::move(handler));
    run->on_done([h, work](std::exception_ptr e, pipeline_stats stats) {
      // The outcome travels in a shared box: whichever thread drops the last reference,
      // the exception inside is released after a synchronising reference-count update.
      struct outcome {
        std::exception_ptr error;
        pipeline_stats stats;
      };
      auto box = std::make_shared<outcome>(outcome{std::move(e), stats});
      auto deliver = [h, box] {
        handler_t done = std::move(**h);
        h->reset();
        asio::get_associated_cancellation_slot(done).clear();
        std::move(done)(std::move(box->error), box->stats);
      };
      try {
        asio::post(work, deliver);
      } catch (...) {
        deliver();  // the handler's executor refuses work (a stopped pool): deliver here
      }
    });
    if (slot.is_connected()) {
      std::weak_ptr<run_t> weak = run;
      slot.assign([weak](asio::cancellation_type) {
        if (auto r = weak.lock()) r->fail(make_pipeline_aborted());
      });
    }
    // The handler is owned by the run from here on: nothing below may throw past this
    // point (an initiation that throws after taking the handler would lose it), so a
    // failure to start is delivered as the run's outcome.
    try {
      if constexpr (from_loop) {
        asio::any_io_executor strand = asio::make_strand(ex);
        auto fs = std::make_shared<feeder_state>(strand);
        run->set_feeder_wake([fs, strand, weak = std::weak_ptr<run_t>(run)] {
          asio::post(strand, [fs, weak] {
            fs->wake.cancel();
            auto r = weak.lock();
            if (r && r->stopping()) fs->cancel.emit(asio::cancellation_type::terminal);
          });
        });
        asio::co_spawn(strand, feed(run, src, fs),
                       asio::bind_cancellation_slot(fs->cancel.slot(), [fs](std::exception_ptr) {}));
      } else {
        using view_t = decltype(src);
        auto rs = std::make_shared<range_source<view_t>>(range_source<view_t>{std::move(src), {}, false});
        run->set_pull([rs](const auto& put) { return rs->pull(put); });
        run->start_pulling();
      }
    } catch (...) {
      std::exception_ptr failure = std::current_exception();
      run->fail(std::move(failure));
      run->feeder_finished();  // no input will come; completes once nothing is in flight
    }
  };
  // The source travels as a pointer (loop sources) or a view (ranges: a ref_view of an
  // lvalue, an owning_view of an rvalue), since completion tokens may copy arguments.
  if constexpr (loop_source) {
    return asio::async_initiate<Token, void(std::exception_ptr, pipeline_stats)>(
        std::move(init), token, std::move(stages), &source);
  } else {
    return asio::async_initiate<Token, void(std::exception_ptr, pipeline_stats)>(
        std::move(init), token, std::move(stages), std::views::all(std::forward<Source>(source)));
  }
}

}  // namespace detail

// Stages composed into a pipeline; run it over sources with run() / collect().
template <class... F>
class pipeline {
  static constexpr std::size_t N = sizeof...(F);
  static_assert(N > 0, "ferry::flow pipeline: at least one stage");

public:
  explicit pipeline(pipeline_stage<F>... stages)
      : stages_(std::move(stages)...), modes_{stages.mode...} {}

  // Runs every item of `source` through the stages on `pool` (null: the default pool of the
  // completion handler's loop). Completion: void(std::exception_ptr, pipeline_stats).
  template <class Source, class Token = asio::use_awaitable_t<>>
  auto run(thread_pool& pool, Source&& source, pipeline_options options = {},
           Token&& token = {}) const {
    return start(&pool, std::forward<Source>(source), options, std::forward<Token>(token));
  }
  template <class Source, class Token = asio::use_awaitable_t<>>
  auto run(Source&& source, pipeline_options options = {}, Token&& token = {}) const {
    return start(nullptr, std::forward<Source>(source), options, std::forward<Token>(token));
  }

  // The last stage's results, in source order (options.ordered) or completion order.
  template <class Source>
  auto collect(thread_pool& pool, Source&& source, pipeline_options options = {}) const {
    return collect_on(&pool, std::forward<Source>(source), options);
  }
  template <class Source>
  auto collect(Source&& source, pipeline_options options = {}) const {
    return collect_on(nullptr, std::forward<Source>(source), options);
  }

  const std::array<stage_mode, N>& modes() const noexcept { return modes_; }

private:
  template <class Source>
  static auto input_of() {
    using S = std::remove_cvref_t<Source>;
    if constexpr (detail::is_loop_source<S>::value) {
      return std::type_identity<typename detail::is_loop_source<S>::value_type>{};
    } else {
      return std::type_identity<std::ranges::range_value_t<std::views::all_t<Source>>>{};
    }
  }

  template <class Source, class Token>
  auto start(thread_pool* pool, Source&& source, pipeline_options options, Token&& token) const {
    using in = typename decltype(input_of<Source>())::type;
    using out = typename detail::chain<in, F...>::out;
    static_assert(std::is_void_v<out>,
                  "ferry::flow pipeline: run() needs a last stage that returns void (it consumes "
                  "the items); use collect() to gather the last stage's results");
    return detail::launch_pipeline<in>(pool, stages_, modes_, std::forward<Source>(source),
                                       options, std::forward<Token>(token));
  }

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsubobject-linkage"
#endif
  template <class Source>
  auto collect_on(thread_pool* pool, Source&& source, pipeline_options options) const {
    using in = typename decltype(input_of<Source>())::type;
    using out = typename detail::chain<in, F...>::out;
    static_assert(!std::is_void_v<out>,
                  "ferry::flow pipeline: collect() needs a last stage that returns a value");
    // S is T& for an lvalue source (kept by reference) and T for an rvalue (moved into the
    // coroutine frame, so the awaitable may be awaited later).
    return collect_impl<in, out, Source>(pool, stages_, modes_, std::forward<Source>(source),
                                         options);
  }

  template <class In, class Out, class S>
  static asio::awaitable<std::vector<Out>> collect_impl(thread_pool* pool,
                                                       std::tuple<pipeline_stage<F>...> stages,
                                                       std::array<stage_mode, N> modes, S source,
                                                       pipeline_options options) {
    auto results = std::make_shared<std::vector<Out>>();
    auto sink = [results](Out&& v) { results->push_back(std::move(v)); };
    using sink_t = decltype(sink);
    std::tuple<pipeline_stage<F>..., pipeline_stage<sink_t>> all = std::tuple_cat(
        std::move(stages),
        std::tuple<pipeline_stage<sink_t>>{pipeline_stage<sink_t>{
            sink, options.ordered ? stage_mode::serial_in_order : stage_mode::serial_out_of_order}});
    std::array<stage_mode, N + 1> all_modes{};
    std::copy(modes.begin(), modes.end(), all_modes.begin());
    all_modes[N] = options.ordered ? stage_mode::serial_in_order : stage_mode::serial_out_of_order;
    auto op = detail::launch_pipeline<In>(pool, std::move(all), all_modes,
                                          std::forward<S>(source), options, asio::use_awaitable);
    (void)co_await std::move(op);
    co_return std::move(*results);
  }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

  std::tuple<pipeline_stage<F>...> stages_;
  std::array<stage_mode, N> modes_;
};

template <class... F>
pipeline<F...> make_pipeline(pipeline_stage<F>... stages) {
  return pipeline<F...>(std::move(stages)...);
}

}  // namespace ferry::flow
