// The thread pool's machinery. moodycamel's queue lives only here, so public headers stay
// light and the queue's configuration cannot diverge between translation units.
#include <ferry/thread_pool.hpp>

// g++ 12 at -O2/-O3 reports a false -Wstringop-overflow inside moodycamel's enqueue_bulk once
// it is inlined into this file's functions; the warning is not about ferry's code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#endif
#include <concurrentqueue.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#define FERRY_HAS_RDTSC 1
#endif
#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif
#if defined(__SANITIZE_THREAD__)
#define FERRY_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define FERRY_TSAN 1
#endif
#endif
#ifdef FERRY_TSAN
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

namespace ferry {

std::size_t thread_pool_options::default_thread_count() noexcept {
  const std::size_t hw = std::thread::hardware_concurrency();
  return std::min<std::size_t>(std::max<std::size_t>(hw, 4), 32);
}

namespace detail {
namespace {

// --- time -------------------------------------------------------------------------------
// Per-task timing uses the TSC where there is one (~11 ns a read here against ~29 ns for
// steady_clock); it is converted to nanoseconds with a ratio measured against steady_clock.
using steady = std::chrono::steady_clock;

std::uint64_t ticks() noexcept {
#ifdef FERRY_HAS_RDTSC
  return __rdtsc();
#else
  return static_cast<std::uint64_t>(steady::now().time_since_epoch().count());
#endif
}

double ticks_per_ns() noexcept {
#ifdef FERRY_HAS_RDTSC
  static const double ratio = [] {
    const auto s0 = steady::now();
    const std::uint64_t t0 = ticks();
    while (steady::now() - s0 < std::chrono::microseconds(200)) {
    }
    const auto s1 = steady::now();
    const std::uint64_t t1 = ticks();
    const double ns = static_cast<double>((s1 - s0).count());
    return ns > 0 ? static_cast<double>(t1 - t0) / ns : 1.0;
  }();
  return ratio;
#else
  return 1.0;
#endif
}

std::uint64_t to_ticks(std::chrono::nanoseconds d) noexcept {
  return static_cast<std::uint64_t>(static_cast<double>(d.count()) * ticks_per_ns());
}

void cpu_relax() noexcept {
#ifdef FERRY_HAS_RDTSC
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// --- the queue ----------------------------------------------------------------------------
struct queue_traits : moodycamel::ConcurrentQueueDefaultTraits {
  // 128 tasks of 64 bytes: fewer block hand-offs on the hot path than the default 32.
  static const std::size_t BLOCK_SIZE = 128;
};
// moodycamel recycles a block's slots after checking, with relaxed loads and an acquire
// *fence*, that consumers have moved every element out. TSan does not model fences, so it
// would report the next producer's write into a recycled slot as racing with the earlier
// consumer's move-out. Under TSan, slot_handoff states exactly that ordering per slot: a
// slot's destruction (after the move-out) releases, its next construction acquires. In
// other builds it is an empty base and costs nothing.
struct slot_handoff {
#ifdef FERRY_TSAN
  slot_handoff() noexcept { __tsan_acquire(this); }
  slot_handoff(slot_handoff&&) noexcept { __tsan_acquire(this); }
  slot_handoff& operator=(slot_handoff&&) noexcept { return *this; }
  ~slot_handoff() { __tsan_release(this); }
#endif
};

// The queue's element type.
struct queued_task : slot_handoff {
  task t;
  queued_task() noexcept = default;
  queued_task(task&& x) noexcept : t(std::move(x)) {}  // NOLINT: implicit for bulk enqueue
  queued_task(queued_task&& o) noexcept : slot_handoff(std::move(o)), t(std::move(o.t)) {}
  queued_task& operator=(queued_task&& o) noexcept {
    t = std::move(o.t);
    return *this;
  }
  ~queued_task() = default;
  void run() { t.run(); }
  void abandon() noexcept { t.abandon(); }
};
static_assert(sizeof(queued_task) == sizeof(task));

using task_queue = moodycamel::ConcurrentQueue<queued_task, queue_traits>;

constexpr std::size_t max_batch = 32;
constexpr std::size_t submit_stripes = 8;
// Elastic workers (standing in for workers held by long-running producers) per pool, at most.
constexpr std::size_t max_elastic = 64;
// A batch that has run this long hands its unstarted tasks back when a worker is idle, so
// a slow task never holds finished-looking work hostage behind it.
constexpr std::chrono::microseconds give_back_after{50};

// state_ packs the idle bookkeeping into one word so a submitter reads it with one load:
// bits 0..15 spinning workers, bits 16..31 parked workers, bit 63 stopped.
constexpr std::uint64_t one_spinner = 1;
constexpr std::uint64_t one_sleeper = std::uint64_t{1} << 16;
constexpr std::uint64_t stopped_bit = std::uint64_t{1} << 63;
constexpr std::uint64_t spinners(std::uint64_t s) noexcept { return s & 0xffff; }
constexpr std::uint64_t sleepers(std::uint64_t s) noexcept { return (s >> 16) & 0xffff; }

// Single-writer counter: only its owning worker writes it, anyone may read it.
void bump(std::atomic<std::uint64_t>& c, std::uint64_t by = 1) noexcept {
  c.store(c.load(std::memory_order_relaxed) + by, std::memory_order_relaxed);
}

// Same, for the completion counter that wait_idle() reads: the release store publishes
// everything the worker's tasks did to whoever acquires the new value. (A plain mov on
// x86; relaxed here was a real ordering bug that TSan caught on weakly-ordered paths.)
void bump_release(std::atomic<std::uint64_t>& c, std::uint64_t by = 1) noexcept {
  c.store(c.load(std::memory_order_relaxed) + by, std::memory_order_release);
}

struct alignas(64) padded_counter {
  std::atomic<std::uint64_t> value{0};
};

}  // namespace

struct alignas(64) worker {
  // Written by this worker only.
  std::atomic<std::uint64_t> started{0};
  std::atomic<std::uint64_t> completed{0};
  std::atomic<std::uint64_t> failed{0};
  std::atomic<std::uint64_t> user_ticks{0};
  std::atomic<std::uint64_t> busy_since{0};  // tick its batch began; 0 while idle
  // Futex word: 1 while parked; cleared by whoever wakes it. Own cache line.
  alignas(64) std::atomic<std::uint32_t> parked{0};
  bool in_idle_list = false;  // guarded by pool_core::idle_mu_
  bool elastic = false;       // an extra worker standing in for held ones
  bool retiring = false;      // written by this worker only
  std::atomic<bool> slot_free{true};  // elastic slots: the thread has left worker_main
  std::size_t index = 0;
  std::string name;
  std::thread thread;
  std::optional<moodycamel::ConsumerToken> consumer;
  std::optional<moodycamel::ProducerToken> producer;
};

namespace {
thread_local pool_core* tls_core = nullptr;
thread_local worker* tls_worker = nullptr;
}  // namespace

class pool_core : public std::enable_shared_from_this<pool_core> {
public:
  explicit pool_core(thread_pool_options options)
      : options_(std::move(options)),
        queue_(max_batch * 8),
        size_(options_.threads),
        workers_(std::make_unique<worker[]>(options_.threads + max_elastic)),
        slots_used_(options_.threads),
        spin_ticks_(to_ticks(options_.spin)),
        give_back_ticks_(to_ticks(give_back_after)),
        spin_cap_(options_.max_spinning == 0 ? options_.threads
                                             : std::min(options_.max_spinning, options_.threads)),
        start_ticks_(ticks()),
        start_time_(steady::now()) {
    idle_.reserve(size_);
    for (std::size_t i = 0; i < size_; ++i) {
      worker& w = workers_[i];
      w.index = i;
      w.name = options_.name + ":" + std::to_string(i);
      w.consumer.emplace(queue_);
      w.producer.emplace(queue_);
      w.slot_free.store(false, std::memory_order_relaxed);
    }
  }

  void spawn_elastic_locked() noexcept {
    for (std::size_t i = size_; i < size_ + max_elastic; ++i) {
      worker& w = workers_[i];
      if (!w.slot_free.load(std::memory_order_acquire)) continue;
      try {
        if (w.thread.joinable()) w.thread.join();  // a retired occupant, already leaving
        if (!w.consumer) {
          w.consumer.emplace(queue_);
          w.producer.emplace(queue_);
          w.index = i;
          w.name = options_.name + ":e" + std::to_string(i - size_);
          w.elastic = true;
        }
        w.retiring = false;
        w.slot_free.store(false, std::memory_order_relaxed);
        {
          std::lock_guard lock(exit_mu_);
          ++alive_;
        }
        if (slots_used() < i + 1) slots_used_.store(i + 1, std::memory_order_release);
        auto self = shared_from_this();
        w.thread = std::thread([self, &w] { self->worker_main(w); });
#if defined(__linux__)
        std::string short_name = w.name.substr(0, 15);
        pthread_setname_np(w.thread.native_handle(), short_name.c_str());
#endif
        ++elastic_active_;
      } catch (...) {
        // No thread could be started: the pool keeps going without the stand-in.
        w.slot_free.store(true, std::memory_order_release);
        std::lock_guard lock(exit_mu_);
        --alive_;
      }
      return;
    }
  }

  void start() {
    auto self = shared_from_this();
    alive_ = size_;
    for (std::size_t i = 0; i < size_; ++i) {
      worker& w = workers_[i];
      w.thread = std::thread([self, &w] { self->worker_main(w); });
#if defined(__linux__)
      std::string short_name = w.name.substr(0, 15);
      pthread_setname_np(w.thread.native_handle(), short_name.c_str());
#endif
    }
  }

  std::size_t size() const noexcept { return size_; }
  const std::string& name() const noexcept { return options_.name; }
  bool on_worker() const noexcept { return tls_core == this; }
  bool stopped() const noexcept { return stop_flag_.load(std::memory_order_acquire); }

  // --- submission --------------------------------------------------------------------------
  void enqueue(task&& t, when_closed policy) {
    if (stop_flag_.load(std::memory_order_relaxed)) {
      reject(t, policy);
      return;
    }
    const bool ok = tls_core == this ? queue_.enqueue(*tls_worker->producer, std::move(t))
                                     : queue_.enqueue(std::move(t));
    if (!ok) throw std::bad_alloc();
    count_submitted(1);
    after_enqueue();
  }

  void enqueue_bulk(task* first, std::size_t n) {
    if (stop_flag_.load(std::memory_order_relaxed)) {
      throw error(errc::pool_closed, "thread_pool '" + options_.name + "': post after stop()");
    }
    auto it = std::make_move_iterator(first);
    const bool ok = tls_core == this ? queue_.enqueue_bulk(*tls_worker->producer, it, n)
                                     : queue_.enqueue_bulk(it, n);
    if (!ok) throw std::bad_alloc();
    count_submitted(n);
    after_enqueue();
  }

  // --- lifetime ----------------------------------------------------------------------------
  void stop() noexcept {
    if (stop_flag_.exchange(true, std::memory_order_acq_rel)) return;
    state_.fetch_or(stopped_bit, std::memory_order_seq_cst);
    // Every submitter that enqueued before seeing stopped_bit is visible to this drain; the
    // ones after it drain for themselves (after_enqueue).
    {
      std::lock_guard lock(idle_mu_);
      for (worker* w : idle_) {
        w->in_idle_list = false;
        w->parked.store(0, std::memory_order_release);
        w->parked.notify_one();
      }
      idle_.clear();
    }
    drain_abandon();
  }

  void join_threads() {
    std::lock_guard lock(join_mu_);
    std::vector<std::thread> threads;
    for (std::size_t i = 0; i < size_; ++i) threads.push_back(std::move(workers_[i].thread));
    {
      // Elastic threads are taken out under the mutex (spawning may reuse a slot), joined
      // outside it: one of them may be running a producer that is about to release.
      std::lock_guard elastic_lock(elastic_mu_);
      for (std::size_t i = size_; i < slots_used(); ++i) {
        threads.push_back(std::move(workers_[i].thread));
      }
    }
    for (std::thread& t : threads) {
      if (!t.joinable()) continue;
      if (t.get_id() == std::this_thread::get_id()) {
        t.detach();  // the pool is being destroyed by its own task; see ~thread_pool
      } else {
        t.join();
      }
    }
  }

  // --- elastic workers (rule I11) ------------------------------------------------------------
  // A producer holding a worker for an iterator's life would starve the pool once every
  // worker is held. hold() counts it; when no worker is left free an elastic worker starts
  // (a full worker in its own slot). release() retires one once two are free again: a parked
  // elastic worker is woken to exit, a busy or spinning one exits the next time it is idle.
  bool hold() noexcept {
    if (!on_worker()) return false;
    std::lock_guard lock(elastic_mu_);
    ++held_;
    if (held_ >= size_ + elastic_active_ && !stop_flag_.load(std::memory_order_acquire)) {
      spawn_elastic_locked();
    }
    return true;
  }

  void release() noexcept {
    std::lock_guard lock(elastic_mu_);
    --held_;
    if (elastic_active_ == 0 || size_ + elastic_active_ - held_ < 2) return;
    --elastic_active_;
    retire_pending_.fetch_add(1, std::memory_order_acq_rel);
    std::lock_guard idle_lock(idle_mu_);
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      worker* w = *it;
      if (!w->elastic) continue;
      idle_.erase(it);
      w->in_idle_list = false;
      state_.fetch_add(one_spinner - one_sleeper, std::memory_order_acq_rel);
      w->parked.store(0, std::memory_order_release);
      w->parked.notify_one();
      break;
    }
  }

  bool take_retirement(worker& w) noexcept {
    if (!w.elastic) return false;
    std::size_t n = retire_pending_.load(std::memory_order_acquire);
    while (n != 0) {
      if (retire_pending_.compare_exchange_weak(n, n - 1, std::memory_order_acq_rel)) {
        w.retiring = true;
        return true;
      }
    }
    return false;
  }

  std::size_t slots_used() const noexcept { return slots_used_.load(std::memory_order_acquire); }

  bool wait_exit_until(steady::time_point deadline) {
    std::unique_lock lock(exit_mu_);
    return exit_cv_.wait_until(lock, deadline, [&] { return alive_ == 0; });
  }

  std::vector<busy_worker> busy_workers() const {
    std::vector<busy_worker> out;
    const std::uint64_t now = ticks();
    for (std::size_t i = 0; i < slots_used(); ++i) {
      const std::uint64_t since = workers_[i].busy_since.load(std::memory_order_relaxed);
      if (since == 0) continue;
      const auto ns = static_cast<std::int64_t>(static_cast<double>(now - since) / ticks_per_ns());
      out.push_back({i, workers_[i].name, std::chrono::nanoseconds(ns)});
    }
    return out;
  }

  bool wait_idle_until(std::optional<steady::time_point> deadline) {
    if (on_worker()) {
      throw error(errc::would_deadlock, "thread_pool '" + options_.name +
                                            "': wait_idle() called from one of its own workers");
    }
    const std::uint64_t target = submitted_total();
    std::unique_lock lock(wait_mu_);
    idle_waiters_.fetch_add(1, std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    const auto done = [&] { return finished_total() >= target; };
    bool ok = true;
    if (deadline) {
      ok = wait_cv_.wait_until(lock, *deadline, done);
    } else {
      wait_cv_.wait(lock, done);
    }
    idle_waiters_.fetch_sub(1, std::memory_order_relaxed);
    return ok;
  }

  thread_pool_stats stats() const noexcept {
    thread_pool_stats s;
    s.threads = size_;
    s.submitted = submitted_total();
    std::uint64_t started = 0, user = 0;
    for (std::size_t i = 0; i < slots_used(); ++i) {
      const worker& w = workers_[i];
      started += w.started.load(std::memory_order_relaxed);
      s.completed += w.completed.load(std::memory_order_relaxed);
      s.failed += w.failed.load(std::memory_order_relaxed);
      user += w.user_ticks.load(std::memory_order_relaxed);
      if (w.busy_since.load(std::memory_order_relaxed) != 0) ++s.busy;
    }
    s.abandoned = abandoned_.load(std::memory_order_relaxed);
    const std::uint64_t st = state_.load(std::memory_order_relaxed);
    if ((st & stopped_bit) == 0) {
      s.spinning = static_cast<std::size_t>(spinners(st));
      s.parked = static_cast<std::size_t>(sleepers(st));
    }
    s.wakeups = wakeups_.load(std::memory_order_relaxed);
    {
      std::lock_guard lock(elastic_mu_);
      s.held = held_;
      s.elastic = elastic_active_;
    }
    const std::uint64_t gone = started + s.abandoned;
    s.queued = s.submitted > gone ? s.submitted - gone : 0;
    // Long-span ratio: more exact than the start-up calibration.
    const double span_ticks = static_cast<double>(ticks() - start_ticks_);
    const double span_ns = static_cast<double>((steady::now() - start_time_).count());
    const double ns_per_tick = span_ticks > 0 && span_ns > 0 ? span_ns / span_ticks
                                                               : 1.0 / ticks_per_ns();
    s.user_time = std::chrono::nanoseconds(
        static_cast<std::int64_t>(static_cast<double>(user) * ns_per_tick));
    return s;
  }

  void note_failure() noexcept {
    if (tls_worker) bump(tls_worker->failed);
  }

private:
  void reject(task& t, when_closed policy) {
    if (policy == when_closed::abandon) {
      count_submitted(1);
      t.abandon();
      abandoned_.fetch_add(1, std::memory_order_release);
      notify_idle_waiters();
      return;
    }
    throw error(errc::pool_closed, "thread_pool '" + options_.name + "': submit after stop()");
  }

  void count_submitted(std::size_t n) noexcept {
    thread_local const std::size_t stripe =
        next_stripe_.fetch_add(1, std::memory_order_relaxed) % submit_stripes;
    submitted_[stripe].value.fetch_add(n, std::memory_order_relaxed);
  }

  std::uint64_t submitted_total() const noexcept {
    std::uint64_t sum = 0;
    for (const auto& c : submitted_) sum += c.value.load(std::memory_order_relaxed);
    return sum;
  }

  std::uint64_t finished_total() const noexcept {
    // Acquire pairs with bump_release / the release increments of abandoned_: a waiter
    // that sees a task counted also sees what the task (or its abandonment) did.
    std::uint64_t sum = abandoned_.load(std::memory_order_acquire);
    for (std::size_t i = 0; i < slots_used(); ++i) {
      sum += workers_[i].completed.load(std::memory_order_acquire);
    }
    return sum;
  }

  // The submitter's half of the "no lost wake-up" handshake. A worker about to park first
  // announces itself in state_ (an RMW), then looks at the queue once more. A submitter
  // first makes its item visible in the queue, then reads state_. With a full fence
  // between each side's write and read (Dekker), at least one of them sees the other: the
  // worker finds the item, or the submitter sees a parked worker and wakes it. Under TSan,
  // which does not model fences, both sides use read-modify-writes on state_ instead: the
  // RMWs form one modification order, so the later one acquires what the earlier released.
  void after_enqueue() {
#ifdef FERRY_TSAN
    const std::uint64_t s = state_.fetch_add(0, std::memory_order_acq_rel);
#else
    std::atomic_thread_fence(std::memory_order_seq_cst);
    const std::uint64_t s = state_.load(std::memory_order_relaxed);
#endif
    if ((s & stopped_bit) != 0) {
      drain_abandon();  // we raced with stop(): our item must not stay in the queue
      return;
    }
    if (spinners(s) == 0 && sleepers(s) != 0) wake_one();
  }

  // Moves one parked worker to the spinning state and wakes it, unless someone is already
  // spinning (that one will find the work). Taken only on the slow path.
  void wake_one() {
    worker* w = nullptr;
    {
      std::lock_guard lock(idle_mu_);
      const std::uint64_t s = state_.load(std::memory_order_relaxed);
      if (spinners(s) != 0 || idle_.empty() || (s & stopped_bit) != 0) return;
      w = idle_.back();
      idle_.pop_back();
      w->in_idle_list = false;
      state_.fetch_add(one_spinner - one_sleeper, std::memory_order_acq_rel);
      w->parked.store(0, std::memory_order_release);
      wakeups_.fetch_add(1, std::memory_order_relaxed);
    }
    w->parked.notify_one();
  }

  bool try_enter_spinning() noexcept {
    if (spin_ticks_ == 0) return false;
    std::uint64_t s = state_.load(std::memory_order_relaxed);
    while (spinners(s) < spin_cap_ && (s & stopped_bit) == 0) {
      if (state_.compare_exchange_weak(s, s + one_spinner, std::memory_order_acq_rel)) return true;
    }
    return false;
  }

  // A spinner that found work stops spinning. If it was the last spinner, workers are
  // parked and work is still queued, it wakes one to take over the searching, so a burst
  // spreads over the pool; a lone item (the ping-pong case) costs no wake-up at all.
  void leave_spinning() {
    const std::uint64_t prev = state_.fetch_sub(one_spinner, std::memory_order_acq_rel);
    if (spinners(prev) == 1 && sleepers(prev) != 0 && queue_.size_approx() != 0) wake_one();
  }

  std::size_t spin(worker& w, queued_task* buf, std::size_t limit) {
    const std::uint64_t deadline = ticks() + spin_ticks_;
    for (unsigned iteration = 1;; ++iteration) {
      if (const std::size_t k = pop(w, buf, limit)) return k;
      if (stop_flag_.load(std::memory_order_relaxed)) return 0;
      if (ticks() >= deadline) return 0;
      if (iteration % 8 == 0) {
        // On an oversubscribed machine the submitter may share our core: let it run.
        std::this_thread::yield();
      } else {
        for (int i = 0; i < 4; ++i) cpu_relax();
      }
    }
  }

  // Idle path: spin for the configured time, then park until a submitter (or a spinner
  // that found work) wakes us. Returns the number of tasks dequeued into buf, or 0 when
  // the pool is stopping.
  std::size_t idle(worker& w, queued_task* buf, std::size_t limit) {
    bool spinning = try_enter_spinning();
    for (;;) {
      if (spinning) {
        if (const std::size_t k = spin(w, buf, limit)) {
          leave_spinning();
          return k;
        }
        if (stop_flag_.load(std::memory_order_acquire)) return 0;
      }
      if (take_retirement(w)) {
        if (spinning) leave_spinning();
        return 0;
      }
      {
        std::lock_guard lock(idle_mu_);
        if (stop_flag_.load(std::memory_order_relaxed)) return 0;
        idle_.push_back(&w);
        w.in_idle_list = true;
        w.parked.store(1, std::memory_order_relaxed);
        state_.fetch_add(spinning ? one_sleeper - one_spinner : one_sleeper,
                         std::memory_order_seq_cst);
      }
#ifndef FERRY_TSAN
      std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
      const std::size_t k = pop(w, buf, limit);
      if (k != 0 || stop_flag_.load(std::memory_order_acquire)) {
        bool woken_as_spinner;
        {
          std::lock_guard lock(idle_mu_);
          woken_as_spinner = !w.in_idle_list;
          if (w.in_idle_list) {
            idle_.erase(std::find(idle_.begin(), idle_.end(), &w));
            w.in_idle_list = false;
            state_.fetch_sub(one_sleeper, std::memory_order_acq_rel);
          }
        }
        if (k == 0) return 0;  // stopping
        if (woken_as_spinner) leave_spinning();
        return k;
      }
      while (w.parked.load(std::memory_order_acquire) == 1) {
        w.parked.wait(1, std::memory_order_acquire);
      }
      if (stop_flag_.load(std::memory_order_acquire)) return 0;
      spinning = true;  // wake_one (or release) made us a spinner
      if (take_retirement(w)) {
        leave_spinning();
        return 0;
      }
    }
  }

  void worker_main(worker& w) {
    tls_core = this;
    tls_worker = &w;
    queued_task buf[max_batch];
    std::size_t limit = 1;
    while (!stop_flag_.load(std::memory_order_acquire)) {
      if (take_retirement(w)) break;
      std::size_t k = pop(w, buf, limit);
      if (k == 0) {
        k = idle(w, buf, limit);
        if (k == 0) break;
      }
      run_batch(w, buf, k);
      // Grow the batch while the queue keeps filling it; shrink when it runs dry.
      limit = k == limit ? std::min(limit * 2, max_batch) : std::max<std::size_t>(k, 1);
    }
    tls_core = nullptr;
    tls_worker = nullptr;
    if (!w.retiring) drain_abandon();
    if (w.elastic) w.slot_free.store(true, std::memory_order_release);
    {
      std::lock_guard lock(exit_mu_);
      --alive_;
    }
    exit_cv_.notify_all();
  }

  void run_batch(worker& w, queued_task* buf, std::size_t k) {
    const std::uint64_t start = ticks();
    w.busy_since.store(start, std::memory_order_relaxed);
    std::uint64_t now = start;
    std::size_t i = 0;
    for (; i < k; ++i) {
      if (i != 0) {
        if (stop_flag_.load(std::memory_order_relaxed)) break;
        if (now - start > give_back_ticks_ && idle_workers()) break;
      }
      bump(w.started);
      try {
        buf[i].run();
      } catch (...) {
        bump(w.failed);
        report(std::current_exception());
      }
      bump_release(w.completed);
      now = ticks();
    }
    bump(w.user_ticks, now - start);
    w.busy_since.store(0, std::memory_order_relaxed);
    if (i < k) give_back(w, buf + i, k - i);
    notify_idle_waiters();
  }

  std::size_t pop(worker& w, queued_task* buf, std::size_t limit) {
    return queue_.try_dequeue_bulk(*w.consumer, buf, limit);
  }

  bool idle_workers() const noexcept {
    const std::uint64_t s = state_.load(std::memory_order_relaxed);
    return spinners(s) + sleepers(s) != 0;
  }

  void give_back(worker& w, queued_task* rest, std::size_t n) {
    if (!stop_flag_.load(std::memory_order_relaxed) &&
        queue_.enqueue_bulk(*w.producer, std::make_move_iterator(rest), n)) {
      after_enqueue();
      return;
    }
    for (std::size_t i = 0; i < n; ++i) rest[i].abandon();
    abandoned_.fetch_add(n, std::memory_order_release);
  }

  void drain_abandon() noexcept {
    queued_task buf[max_batch];
    std::size_t total = 0;
    for (;;) {
      const std::size_t k = queue_.try_dequeue_bulk(buf, max_batch);
      if (k == 0) break;
      for (std::size_t i = 0; i < k; ++i) buf[i].abandon();
      abandoned_.fetch_add(k, std::memory_order_release);
      total += k;
    }
    if (total != 0) notify_idle_waiters();
  }

  // Worker's half of the wait_idle handshake (same Dekker pattern as after_enqueue).
  void notify_idle_waiters() noexcept {
#ifdef FERRY_TSAN
    const bool waiting = idle_waiters_.fetch_add(0, std::memory_order_acq_rel) != 0;
#else
    std::atomic_thread_fence(std::memory_order_seq_cst);
    const bool waiting = idle_waiters_.load(std::memory_order_relaxed) != 0;
#endif
    if (waiting) {
      { std::lock_guard lock(wait_mu_); }
      wait_cv_.notify_all();
    }
  }

  void report(std::exception_ptr ep) noexcept {
    if (options_.on_task_exception) {
      try {
        options_.on_task_exception(ep);
      } catch (...) {
      }
      return;
    }
    if (reported_.exchange(true, std::memory_order_relaxed)) return;
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    std::fprintf(stderr,
                 "ferry: a task on thread_pool '%s' threw: %s (further exceptions are only "
                 "counted in stats().failed)\n",
                 options_.name.c_str(), what.c_str());
  }

  const thread_pool_options options_;
  task_queue queue_;
  const std::size_t size_;
  std::unique_ptr<worker[]> workers_;
  std::atomic<std::size_t> slots_used_;  // high-water mark of used worker slots
  const std::uint64_t spin_ticks_;
  const std::uint64_t give_back_ticks_;
  const std::size_t spin_cap_;
  const std::uint64_t start_ticks_;
  const steady::time_point start_time_;

  alignas(64) std::atomic<bool> stop_flag_{false};  // read by workers, written once
  alignas(64) std::atomic<std::uint64_t> state_{0};
  std::mutex idle_mu_;
  std::vector<worker*> idle_;

  padded_counter submitted_[submit_stripes];
  inline static std::atomic<std::size_t> next_stripe_{0};
  alignas(64) std::atomic<std::uint64_t> abandoned_{0};
  std::atomic<std::uint64_t> wakeups_{0};
  std::atomic<bool> reported_{false};

  alignas(64) std::atomic<std::uint32_t> idle_waiters_{0};
  std::mutex wait_mu_;
  std::condition_variable wait_cv_;

  std::mutex exit_mu_;
  std::condition_variable exit_cv_;
  std::size_t alive_ = 0;  // guarded by exit_mu_
  std::mutex join_mu_;

  mutable std::mutex elastic_mu_;
  std::size_t held_ = 0;            // guarded by elastic_mu_
  std::size_t elastic_active_ = 0;  // guarded by elastic_mu_
  std::atomic<std::size_t> retire_pending_{0};
};

void pool_enqueue(pool_core& core, task&& t, when_closed policy) {
  core.enqueue(std::move(t), policy);
}
void pool_enqueue_bulk(pool_core& core, task* first, std::size_t n) {
  core.enqueue_bulk(first, n);
}
bool pool_on_worker(const pool_core& core) noexcept { return core.on_worker(); }
bool pool_hold_worker(pool_core& core) noexcept { return core.hold(); }
void pool_release_worker(pool_core& core) noexcept { core.release(); }
void pool_note_failure() noexcept {
  if (tls_core) tls_core->note_failure();
}

}  // namespace detail

// --- thread_pool -------------------------------------------------------------------------

thread_pool::thread_pool() : thread_pool(thread_pool_options{}) {}

thread_pool::thread_pool(std::size_t threads)
    : thread_pool([threads] {
        thread_pool_options o;
        o.threads = threads;
        return o;
      }()) {}

thread_pool::thread_pool(thread_pool_options options) {
  if (options.threads == 0) {
    throw error(errc::invalid_argument, "ferry::thread_pool: the number of threads must be > 0");
  }
  if (options.spin.count() < 0) {
    throw error(errc::invalid_argument, "ferry::thread_pool: the spin time must not be negative");
  }
  core_ = std::make_shared<detail::pool_core>(std::move(options));
  core_->start();
  asio::make_service<detail::pool_identity>(*this, this);
}

thread_pool::~thread_pool() {
  core_->stop();
  // On one of our own workers (a task destroying its pool) join_threads() detaches that
  // worker: it finishes the task, sees the stop and exits; it co-owns the core, so nothing
  // it touches afterwards is freed under it.
  core_->join_threads();
  shutdown();
}

std::size_t thread_pool::size() const noexcept { return core_->size(); }
const std::string& thread_pool::name() const noexcept { return core_->name(); }
void thread_pool::stop() noexcept { core_->stop(); }
bool thread_pool::stopped() const noexcept { return core_->stopped(); }

void thread_pool::join() {
  if (core_->on_worker()) {
    throw error(errc::would_deadlock,
                "thread_pool '" + core_->name() + "': join() called from one of its own workers");
  }
  if (!core_->stopped()) {
    core_->wait_idle_until(std::nullopt);
    core_->stop();
  }
  core_->join_threads();
}

join_result thread_pool::join_for(std::chrono::nanoseconds timeout) {
  if (core_->on_worker()) {
    throw error(errc::would_deadlock, "thread_pool '" + core_->name() +
                                          "': join_for() called from one of its own workers");
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  if (!core_->stopped()) {
    if (!core_->wait_idle_until(deadline)) return {false, core_->busy_workers()};
    core_->stop();
  }
  if (!core_->wait_exit_until(deadline)) return {false, core_->busy_workers()};
  core_->join_threads();
  return {true, {}};
}

void thread_pool::wait_idle() { core_->wait_idle_until(std::nullopt); }

bool thread_pool::wait_idle_for(std::chrono::nanoseconds timeout) {
  return core_->wait_idle_until(std::chrono::steady_clock::now() + timeout);
}

thread_pool_stats thread_pool::stats() const noexcept { return core_->stats(); }

}  // namespace ferry

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
