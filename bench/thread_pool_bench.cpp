// bench_thread_pool — ferry::thread_pool against its peers, in one process, same task bodies.
//
//   peers   ferry::thread_pool (pool.post, asio::post(pool, f), pool.post_n),
//           asio::thread_pool (asio::post), oneTBB task_arena::enqueue and task_group
//           (inside a task_arena), and a mutex + condition-variable pool written here.
//   S1      empty-task throughput: 1 or 2 external submitters, 1 or 2 workers
//   S2      fan-out/fan-in latency: rounds of K = 1 and K = 16 tasks, p50 / p99 per round
//   S3      CPU an idle pool burns in the second after a burst
//   S4      heap allocations per task on the steady-state path (operator new and the C heap
//           are counted)
//
// After the usual Google Benchmark rows it prints one ratio table per scenario, with the
// goals of DESIGN.md principle 6 beside them (PASS/MISS).
//
//   bench_thread_pool            full run (about two minutes on 2 cores)
//   bench_thread_pool --quick    shortened run for the tour (< 25 s on 2 cores)
//
// Any --benchmark_* flag works as usual (e.g. --benchmark_filter=lat/); figures that were
// filtered out show "-" in the summary, tables without any as "(not run)".
//
// Fairness rules: each benchmark run creates its pool once (outside the timed loop) and
// warms it up with untimed rounds; every peer runs the same callable type; the submitting
// thread waits the same way for every peer (spin with pause, yielding every few checks).
#include "bench_report.hpp"

#include <ferry/thread_pool.hpp>

#include <asio/post.hpp>
#include <asio/thread_pool.hpp>
#include <benchmark/benchmark.h>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>
#include <oneapi/tbb/task_group.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "heap_counter.hpp"

namespace {

// --- shared helpers -----------------------------------------------------------------------

using steady = std::chrono::steady_clock;

void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// The benchmark running now, for the watchdog's message (main thread only).
std::string g_running = "start-up";
constexpr std::chrono::seconds round_limit{60};

// A peer that never finishes a round must not hang the tour: say which one and leave.
[[noreturn]] void give_up(const char* what) {
  std::fflush(stdout);
  std::fprintf(stderr, "bench_thread_pool: %s: %s; exiting instead of hanging\n",
               g_running.c_str(), what);
  std::_Exit(3);
}

// How the submitting thread waits for its round, identical for every peer: poll, pause,
// and yield every 16 polls so that on a 2-core machine the workers get the core back.
// Every 64Ki polls (a few ms) it checks the watchdog limit.
template <class Done>
void spin_until(Done done) {
  steady::time_point first_check{};
  for (unsigned polls = 1; !done(); ++polls) {
    if (polls % 16 == 0) {
      std::this_thread::yield();
      if (polls % 65536 == 0) {
        const auto now = steady::now();
        if (first_check == steady::time_point{}) {
          first_check = now;
        } else if (now - first_check > round_limit) {
          give_up("a round did not complete within 60 s");
        }
      }
    } else {
      cpu_relax();
      cpu_relax();
    }
  }
}

std::int64_t process_cpu_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 +
         static_cast<std::int64_t>(ts.tv_nsec);
}

struct alignas(64) shared_counter {
  std::atomic<std::uint64_t> value{0};
};

// The task body of S1, S3 and S4: one relaxed increment of a shared counter. 8 bytes,
// trivially copyable, so every peer can store it inline if it stores anything inline.
struct count_task {
  explicit count_task(std::atomic<std::uint64_t>* c) noexcept : counter(c) {}
  void operator()() const noexcept { counter->fetch_add(1, std::memory_order_relaxed); }
  std::atomic<std::uint64_t>* counter;
};

// The same work carrying 120 bytes of payload: too big for any inline buffer (S4, for
// information).
struct big_count_task {
  explicit big_count_task(std::atomic<std::uint64_t>* c) noexcept : counter(c), payload{} {}
  void operator()() const noexcept {
    counter->fetch_add(1 + payload[0], std::memory_order_relaxed);
  }
  std::atomic<std::uint64_t>* counter;
  std::array<std::uint8_t, 120> payload;
};
static_assert(sizeof(count_task) <= ferry::detail::task::inline_size);
static_assert(sizeof(big_count_task) == 128);

// S2's body: counts a round down; the submitter acquires the final zero.
struct countdown_task {
  explicit countdown_task(std::atomic<std::int64_t>* l) noexcept : left(l) {}
  void operator()() const noexcept { left->fetch_sub(1, std::memory_order_release); }
  std::atomic<std::int64_t>* left;
};

// --- peers --------------------------------------------------------------------------------
// Each peer is built as Peer(workers, submitters) and offers
//   submit_n(submitter_index, n, f)  submit n copies of f from the calling thread
//   end_round()                      after the submitter saw every task finish
// plus a `key` (benchmark names) and a `label` (summary tables).

ferry::thread_pool_options ferry_options(std::size_t threads) {
  ferry::thread_pool_options o;
  o.threads = threads;
  o.name = "bench";
  return o;  // spin stays at its default (50 us)
}

struct ferry_post_peer {
  static constexpr std::string_view key = "ferry_post";
  static constexpr std::string_view label = "ferry pool.post";
  ferry_post_peer(std::size_t threads, std::size_t) : pool(ferry_options(threads)) {}
  template <class F>
  void submit_n(std::size_t, std::size_t n, const F& f) {
    for (std::size_t i = 0; i < n; ++i) pool.post(f);
  }
  void end_round() {}
  ferry::thread_pool pool;
};

struct ferry_asio_post_peer {
  static constexpr std::string_view key = "ferry_asio_post";
  static constexpr std::string_view label = "ferry asio::post(pool)";
  ferry_asio_post_peer(std::size_t threads, std::size_t) : pool(ferry_options(threads)) {}
  template <class F>
  void submit_n(std::size_t, std::size_t n, const F& f) {
    for (std::size_t i = 0; i < n; ++i) asio::post(pool, f);
  }
  void end_round() {}
  ferry::thread_pool pool;
};

struct ferry_post_n_peer {
  static constexpr std::string_view key = "ferry_post_n";
  static constexpr std::string_view label = "ferry pool.post_n (bulk)";
  ferry_post_n_peer(std::size_t threads, std::size_t) : pool(ferry_options(threads)) {}
  template <class F>
  void submit_n(std::size_t, std::size_t n, const F& f) {
    pool.post_n(n, [f](std::size_t) { f(); });
  }
  void end_round() {}
  ferry::thread_pool pool;
};

struct asio_pool_peer {
  static constexpr std::string_view key = "asio_pool";
  static constexpr std::string_view label = "asio::thread_pool";
  asio_pool_peer(std::size_t threads, std::size_t) : pool(threads) {}
  ~asio_pool_peer() { pool.join(); }  // every round finished: join returns at once
  asio_pool_peer(const asio_pool_peer&) = delete;
  asio_pool_peer& operator=(const asio_pool_peer&) = delete;
  template <class F>
  void submit_n(std::size_t, std::size_t n, const F& f) {
    for (std::size_t i = 0; i < n; ++i) asio::post(pool, f);
  }
  void end_round() {}
  asio::thread_pool pool;
};

// TBB hands its arenas worker threads from one process-wide market, sized by default to
// hardware_concurrency - 1 (one worker on this 2-core machine). The global_control lets
// the market supply as many workers as the other peers get.
int tbb_parallelism(std::size_t workers) { return static_cast<int>(workers + 1); }

struct tbb_arena_peer {
  static constexpr std::string_view key = "tbb_arena";
  static constexpr std::string_view label = "tbb task_arena::enqueue";
  // An arena of `threads` slots, none reserved for external threads: `threads` workers.
  tbb_arena_peer(std::size_t threads, std::size_t)
      : control(tbb::global_control::max_allowed_parallelism,
                static_cast<std::size_t>(tbb_parallelism(threads))),
        arena(static_cast<int>(threads), 0) {
    arena.initialize();
  }
  template <class F>
  void submit_n(std::size_t, std::size_t n, const F& f) {
    for (std::size_t i = 0; i < n; ++i) arena.enqueue(f);
  }
  void end_round() {}
  tbb::global_control control;
  tbb::task_arena arena;
};

struct tbb_task_group_peer {
  static constexpr std::string_view key = "tbb_task_group";
  static constexpr std::string_view label = "tbb task_group (in arena)";
  // `threads` worker slots plus one reserved slot per submitting thread, so that the same
  // number of TBB workers execute as in every other pool while the submitters only submit
  // (a submitter enters the arena through execute() to spawn, then leaves; the spawned
  // tasks stay in its slot's deque and are stolen by the workers). Each submitter has its
  // own task_group; end_round() waits on all of them (they are done by then).
  tbb_task_group_peer(std::size_t threads, std::size_t submitters)
      : control(tbb::global_control::max_allowed_parallelism,
                static_cast<std::size_t>(tbb_parallelism(threads))),
        arena(static_cast<int>(threads + submitters), static_cast<unsigned>(submitters)),
        groups(std::make_unique<tbb::task_group[]>(submitters)),
        group_count(submitters) {
    arena.initialize();
  }
  ~tbb_task_group_peer() { end_round(); }
  tbb_task_group_peer(const tbb_task_group_peer&) = delete;
  tbb_task_group_peer& operator=(const tbb_task_group_peer&) = delete;
  template <class F>
  void submit_n(std::size_t submitter, std::size_t n, const F& f) {
    tbb::task_group& g = groups[submitter];
    arena.execute([&] {
      for (std::size_t i = 0; i < n; ++i) g.run(f);
    });
  }
  void end_round() {
    arena.execute([&] {
      for (std::size_t i = 0; i < group_count; ++i) groups[i].wait();
    });
  }
  tbb::global_control control;
  tbb::task_arena arena;
  std::unique_ptr<tbb::task_group[]> groups;
  std::size_t group_count;
};

// The textbook pool, for reference: one deque, one mutex, one condition variable,
// notify_one per push.
class mutex_cv_pool {
public:
  explicit mutex_cv_pool(std::size_t threads) {
    threads_.reserve(threads);
    for (std::size_t i = 0; i < threads; ++i) threads_.emplace_back([this] { work(); });
  }
  ~mutex_cv_pool() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  mutex_cv_pool(const mutex_cv_pool&) = delete;
  mutex_cv_pool& operator=(const mutex_cv_pool&) = delete;

  template <class F>
  void post(F&& f) {
    {
      std::lock_guard lock(mu_);
      queue_.emplace_back(std::forward<F>(f));
    }
    cv_.notify_one();
  }

private:
  void work() {
    for (;;) {
      std::function<void()> f;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, and nothing left to run
        f = std::move(queue_.front());
        queue_.pop_front();
      }
      f();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

struct mutex_pool_peer {
  static constexpr std::string_view key = "mutex_cv_pool";
  static constexpr std::string_view label = "mutex+condvar pool";
  mutex_pool_peer(std::size_t threads, std::size_t) : pool(threads) {}
  template <class F>
  void submit_n(std::size_t, std::size_t n, const F& f) {
    for (std::size_t i = 0; i < n; ++i) pool.post(f);
  }
  void end_round() {}
  mutex_cv_pool pool;
};

template <class... Peers>
struct peer_list {};

using throughput_peers = peer_list<ferry_post_peer, ferry_asio_post_peer, ferry_post_n_peer,
                                   asio_pool_peer, tbb_arena_peer, tbb_task_group_peer,
                                   mutex_pool_peer>;
using core_peers = peer_list<ferry_post_peer, asio_pool_peer, tbb_arena_peer,
                             tbb_task_group_peer, mutex_pool_peer>;

struct peer_info {
  std::string key;
  std::string label;
};

template <class... Peers>
std::vector<peer_info> infos(peer_list<Peers...>) {
  return {peer_info{std::string(Peers::key), std::string(Peers::label)}...};
}

// --- extra submitting threads (S1 with 2 submitters) ----------------------------------------
// Helper threads live as long as the benchmark run; each round releases them through a
// generation counter (futex wait, so they cost nothing between rounds) and they report
// when their own submissions are done.
class submitter_team {
public:
  submitter_team(std::size_t helpers, std::function<void(std::size_t)> work)
      : work_(std::move(work)) {
    threads_.reserve(helpers);
    for (std::size_t i = 0; i < helpers; ++i) {
      threads_.emplace_back([this, i] { run(i + 1); });
    }
  }
  ~submitter_team() {
    quit_.store(true, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  submitter_team(const submitter_team&) = delete;
  submitter_team& operator=(const submitter_team&) = delete;

  void start_round() {
    if (threads_.empty()) return;
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
  }
  void finish_round() {
    if (threads_.empty()) return;
    expected_done_ += threads_.size();
    spin_until([&] { return done_.load(std::memory_order_acquire) == expected_done_; });
  }

private:
  void run(std::size_t submitter_index) {
    std::uint32_t seen = 0;
    for (;;) {
      generation_.wait(seen, std::memory_order_acquire);
      seen = generation_.load(std::memory_order_acquire);
      if (quit_.load(std::memory_order_relaxed)) return;
      work_(submitter_index);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  std::function<void(std::size_t)> work_;
  std::atomic<std::uint32_t> generation_{0};
  std::atomic<std::uint64_t> done_{0};
  std::atomic<bool> quit_{false};
  std::uint64_t expected_done_ = 0;  // main thread only
  std::vector<std::thread> threads_;
};

// --- the scenarios ----------------------------------------------------------------------

std::string throughput_name(std::size_t submitters, std::size_t threads, std::string_view key) {
  return "tp/sub" + std::to_string(submitters) + "/w" + std::to_string(threads) + "/" +
         std::string(key);
}
std::string latency_name(std::size_t k, std::string_view key) {
  return "lat/k" + std::to_string(k) + "/" + std::string(key);
}
std::string idle_name(std::string_view key) { return "idle/" + std::string(key); }
std::string alloc_name(std::string_view size, std::string_view key) {
  return "alloc/" + std::string(size) + "/" + std::string(key);
}

constexpr std::size_t latency_workers = 2;
constexpr std::size_t idle_workers = 2;
constexpr std::size_t alloc_workers = 2;

struct config {
  bool quick = false;
  std::size_t per_submitter = 20000;      // S1 tasks per submitter per round
  std::size_t latency_warmup = 500;       // S2 untimed rounds
  std::size_t idle_burst = 100000;        // S3
  double idle_sleep_s = 1.0;              // S3
  std::size_t alloc_round = 20000;        // S4 tasks per counted round
  benchmark::IterationCount alloc_rounds = 20;
  // S1 and S2 are repeated and summarised by their median: on a shared 2-core VM a single
  // run can land on a noisy second.
  int repetitions = 3;
};

// Repetitions for the timing-sensitive scenarios; only the aggregates are displayed and
// the summary reads the median.
void repeat(benchmark::internal::Benchmark* b, const config& cfg) {
  if (cfg.repetitions > 1) b->Repetitions(cfg.repetitions)->DisplayAggregatesOnly(true);
}

template <class Peer>
void bm_throughput(benchmark::State& state, std::size_t threads, std::size_t submitters,
                   std::size_t per_submitter) {
  g_running = throughput_name(submitters, threads, Peer::key);
  shared_counter counter;
  const count_task body(&counter.value);
  Peer peer(threads, submitters);
  submitter_team team(submitters - 1,
                      [&](std::size_t index) { peer.submit_n(index, per_submitter, body); });
  const std::uint64_t total = per_submitter * submitters;
  auto round = [&] {
    counter.value.store(0, std::memory_order_relaxed);  // the previous round is all done
    team.start_round();
    peer.submit_n(0, per_submitter, body);
    spin_until([&] { return counter.value.load(std::memory_order_acquire) == total; });
    team.finish_round();
    peer.end_round();
  };
  round();  // warm-up: threads started, queues grown, allocator caches primed
  round();
  for (auto _ : state) round();
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(total));
}

double percentile(const std::vector<std::int64_t>& sorted, double p) {
  if (sorted.empty()) return 0;
  const double rank = p / 100.0 * static_cast<double>(sorted.size());
  std::size_t index = static_cast<std::size_t>(rank);
  if (static_cast<double>(index) < rank) ++index;  // nearest rank: ceil(p * n)
  if (index > 0) --index;
  return static_cast<double>(sorted[std::min(index, sorted.size() - 1)]);
}

template <class Peer>
void bm_latency(benchmark::State& state, std::size_t k, std::size_t warmup) {
  g_running = latency_name(k, Peer::key);
  struct alignas(64) countdown {
    std::atomic<std::int64_t> left{0};
  } cd;
  const countdown_task body(&cd.left);
  Peer peer(latency_workers, 1);
  const auto tasks = static_cast<std::int64_t>(k);
  auto round = [&] {
    cd.left.store(tasks, std::memory_order_relaxed);
    peer.submit_n(0, k, body);
    spin_until([&] { return cd.left.load(std::memory_order_acquire) == 0; });
  };
  for (std::size_t i = 0; i < warmup; ++i) {
    round();
    peer.end_round();
  }
  std::vector<std::int64_t> samples;
  samples.reserve(static_cast<std::size_t>(state.max_iterations));
  for (auto _ : state) {
    const auto t0 = steady::now();
    round();
    const auto t1 = steady::now();
    peer.end_round();
    samples.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
  }
  std::sort(samples.begin(), samples.end());
  state.counters["p50_ns"] = percentile(samples, 50);
  state.counters["p99_ns"] = percentile(samples, 99);
}

template <class Peer>
void bm_idle_cpu(benchmark::State& state, std::size_t burst, double sleep_s) {
  g_running = idle_name(Peer::key);
  shared_counter counter;
  const count_task body(&counter.value);
  Peer peer(idle_workers, 1);
  double cpu_ms_per_s = 0;
  for (auto _ : state) {
    counter.value.store(0, std::memory_order_relaxed);
    peer.submit_n(0, burst, body);
    spin_until([&] { return counter.value.load(std::memory_order_acquire) == burst; });
    peer.end_round();
    const std::int64_t c0 = process_cpu_ns();
    std::this_thread::sleep_for(std::chrono::duration<double>(sleep_s));
    const std::int64_t c1 = process_cpu_ns();
    cpu_ms_per_s = static_cast<double>(c1 - c0) / 1e6 / sleep_s;
  }
  state.counters["idle_cpu_ms_per_s"] = cpu_ms_per_s;
}

template <class Peer, class Body>
void bm_allocations(benchmark::State& state, std::size_t n) {
  g_running = alloc_name(sizeof(Body) > ferry::detail::task::inline_size ? "big" : "small",
                         Peer::key);
  shared_counter counter;
  const Body body(&counter.value);
  Peer peer(alloc_workers, 1);
  auto round = [&](std::size_t tasks) {
    counter.value.store(0, std::memory_order_relaxed);
    peer.submit_n(0, tasks, body);
    spin_until([&] { return counter.value.load(std::memory_order_acquire) >= tasks; });
    peer.end_round();
  };
  // Steady state: a queue that grows in blocks (ferry's moodycamel queue, std::deque) keeps
  // its high-water mark of blocks for reuse. One oversized round first makes sure the
  // counted rounds never outgrow what warm-up already allocated, however far the submitter
  // runs ahead of the workers; growth beyond a burst seen before is not per-task cost.
  // The queue's block recycling takes a few more rounds to settle.
  round(4 * n);
  for (int i = 0; i < 10; ++i) round(n);
  std::uint64_t allocations = 0;
  std::uint64_t new_calls = 0;
  std::uint64_t tasks = 0;
  for (auto _ : state) {
    const std::uint64_t heap_before = heap_allocations();
    const std::uint64_t new_before = g_new_calls.load(std::memory_order_relaxed);
    g_count_allocations.store(true, std::memory_order_seq_cst);
    round(n);
    g_count_allocations.store(false, std::memory_order_seq_cst);
    allocations += heap_allocations() - heap_before;
    new_calls += g_new_calls.load(std::memory_order_relaxed) - new_before;
    tasks += n;
  }
  const double per = tasks != 0 ? 1.0 / static_cast<double>(tasks) : 0.0;
  state.counters["allocs_per_task"] = static_cast<double>(allocations) * per;
  state.counters["new_per_task"] = static_cast<double>(new_calls) * per;
}

// --- names and registration -----------------------------------------------------------------

constexpr std::size_t s1_submitters[] = {1, 2};
constexpr std::size_t s1_workers[] = {1, 2};
constexpr std::size_t s2_sizes[] = {1, 16};

template <class... Peers>
void register_throughput(const config& cfg, std::size_t submitters, std::size_t threads,
                         peer_list<Peers...>) {
  const std::size_t n = cfg.per_submitter;
  (repeat(benchmark::RegisterBenchmark(
              throughput_name(submitters, threads, Peers::key).c_str(),
              [=](benchmark::State& st) { bm_throughput<Peers>(st, threads, submitters, n); })
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond),
          cfg),
   ...);
}

template <class... Peers>
void register_latency(const config& cfg, std::size_t k, peer_list<Peers...>) {
  const std::size_t warmup = cfg.latency_warmup;
  (repeat(benchmark::RegisterBenchmark(
              latency_name(k, Peers::key).c_str(),
              [=](benchmark::State& st) { bm_latency<Peers>(st, k, warmup); })
              ->UseRealTime()
              ->Unit(benchmark::kMicrosecond),
          cfg),
   ...);
}

template <class... Peers>
void register_idle(const config& cfg, peer_list<Peers...>) {
  const std::size_t burst = cfg.idle_burst;
  const double sleep_s = cfg.idle_sleep_s;
  (benchmark::RegisterBenchmark(
       idle_name(Peers::key).c_str(),
       [=](benchmark::State& st) { bm_idle_cpu<Peers>(st, burst, sleep_s); })
       ->Iterations(1)
       ->UseRealTime()
       ->Unit(benchmark::kMillisecond),
   ...);
}

template <class Body, class... Peers>
void register_allocations(const config& cfg, std::string_view size, peer_list<Peers...>) {
  const std::size_t n = cfg.alloc_round;
  (benchmark::RegisterBenchmark(
       alloc_name(size, Peers::key).c_str(),
       [=](benchmark::State& st) { bm_allocations<Peers, Body>(st, n); })
       ->Iterations(cfg.alloc_rounds)
       ->UseRealTime()
       ->Unit(benchmark::kMillisecond),
   ...);
}

void register_all(const config& cfg) {
  for (std::size_t submitters : s1_submitters) {
    for (std::size_t threads : s1_workers) {
      register_throughput(cfg, submitters, threads, throughput_peers{});
    }
  }
  for (std::size_t k : s2_sizes) register_latency(cfg, k, core_peers{});
  register_idle(cfg, core_peers{});
  register_allocations<count_task>(cfg, "small", throughput_peers{});
  register_allocations<big_count_task>(cfg, "big", throughput_peers{});
}

// --- the summary ----------------------------------------------------------------------------

void print_summary(const ferry_bench::result_store& r, const config& cfg) {
  using ferry_bench::better;
  using ferry_bench::column_spec;
  using ferry_bench::goal;
  using ferry_bench::ratio_table;
  const std::string base(ferry_post_peer::label);
  ferry_bench::goal_tally tally;
  std::ostream& os = std::cout;

  os << "\n==================== summary: ferry::thread_pool against its peers "
        "====================\n";
  os << "(" << (cfg.quick ? "--quick run: short timings, expect noise"
                          : "full run: S1/S2 figures are medians of " +
                                std::to_string(cfg.repetitions) + " repetitions")
     << "; 2 workers unless stated; baseline = " << base << ")\n";

  // S1
  for (std::size_t submitters : s1_submitters) {
    for (std::size_t threads : s1_workers) {
      ratio_table t("S1 empty-task throughput: " + std::to_string(submitters) + " submitter" +
                        (submitters > 1 ? "s" : "") + ", " + std::to_string(threads) +
                        " worker" + (threads > 1 ? "s" : "") + ", " +
                        std::to_string(cfg.per_submitter) + " tasks per submitter per round",
                    base, {column_spec{"Mitems/s", better::higher, 1e-6, 2}});
      const bool goals = submitters == 1 && threads == 2;
      for (const peer_info& p : infos(throughput_peers{})) {
        std::optional<goal> g;
        if (goals && p.key == asio_pool_peer::key) g = goal::advantage_at_least(3.0);
        if (goals && p.key == tbb_arena_peer::key) g = goal::advantage_at_least(2.0);
        t.add_row(p.label, {r.items_per_second(throughput_name(submitters, threads, p.key))}, g);
      }
      t.print(os, &tally);
    }
  }

  // S2
  for (std::size_t k : s2_sizes) {
    ratio_table t("S2 fan-out/fan-in latency: rounds of K=" + std::to_string(k) +
                      " tasks, 2 workers, wall time per round",
                  base,
                  {column_spec{"p50 ns", better::lower, 1.0, 0},
                   column_spec{"p99 ns", better::lower, 1.0, 0}});
    for (const peer_info& p : infos(core_peers{})) {
      std::optional<goal> g;
      if (k == 16 && p.key == asio_pool_peer::key) {
        g = goal::advantage_at_least(10.0, 0, "ferry p50 <= 1/10 of asio's");
      }
      const std::string name = latency_name(k, p.key);
      t.add_row(p.label, {r.counter(name, "p50_ns"), r.counter(name, "p99_ns")}, g);
    }
    t.print(os, &tally);
  }

  // S3
  {
    char sleep_text[32];
    std::snprintf(sleep_text, sizeof sleep_text, "%.1f", cfg.idle_sleep_s);
    ratio_table t("S3 idle CPU: process CPU time while the main thread sleeps " +
                      std::string(sleep_text) + " s after a burst of " +
                      std::to_string(cfg.idle_burst) + " tasks (2 workers), per second",
                  base, {column_spec{"CPU ms/s", better::lower, 1.0, 2}});
    for (const peer_info& p : infos(core_peers{})) {
      std::optional<goal> g;
      if (p.key == ferry_post_peer::key) g = goal::value_below(5.0, 0, "ferry < 5 ms/s");
      t.add_row(p.label, {r.counter(idle_name(p.key), "idle_cpu_ms_per_s")}, g);
    }
    t.print(os, &tally);
  }

  // S4
  {
    ratio_table t("S4 heap allocations per task, steady state (" +
                      std::to_string(cfg.alloc_round) + " tasks per round, 2 workers)",
                  base,
                  {column_spec{"allocs/task 8 B", better::lower, 1.0, 3},
                   column_spec{"allocs/task 128 B", better::lower, 1.0, 3}});
    t.add_note("every call into the heap from any thread during the rounds: operator new and");
    t.add_note("malloc/calloc/realloc/aligned_alloc/posix_memalign (Asio uses aligned_alloc).");
    t.add_note("oneTBB's task objects come from its own scalable allocator, which takes memory");
    t.add_note("from the OS in large chunks: invisible here, so TBB's figures are a lower bound");
    for (const peer_info& p : infos(throughput_peers{})) {
      std::optional<goal> g;
      if (p.key == ferry_post_peer::key) g = goal::value_at_most(0.0, 0, "ferry 0 (8 B callable)");
      t.add_row(p.label,
                {r.counter(alloc_name("small", p.key), "allocs_per_task"),
                 r.counter(alloc_name("big", p.key), "allocs_per_task")},
                g);
    }
    t.print(os, &tally);
  }

  os << '\n';
  tally.print(os);
  for (const ferry_bench::run_record* f : r.failures()) {
    os << "benchmark " << f->name << " failed: " << f->error_message << '\n';
  }
}

// Joins oneTBB's worker threads. tbb::finalize has been seen to wait forever (yielding in
// a loop while its workers sleep) when the process is confined to a single CPU
// (taskset -c 0); bounded here so the program always ends.
bool finalize_tbb(tbb::task_scheduler_handle& handle) {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::thread watchdog([&] {
    std::unique_lock lock(mu);
    if (!cv.wait_for(lock, std::chrono::seconds(10), [&] { return done; })) {
      std::fflush(stdout);
      std::fprintf(stderr,
                   "warning: tbb::finalize did not join oneTBB's workers within 10 s; "
                   "exiting without it\n");
      std::_Exit(0);
    }
  });
  const bool ok = tbb::finalize(handle, std::nothrow);
  {
    std::lock_guard lock(mu);
    done = true;
  }
  cv.notify_one();
  watchdog.join();
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  // Joined by tbb::finalize at the end, so no TBB worker outlives main.
  tbb::task_scheduler_handle tbb_handle{tbb::attach{}};

  config cfg;
  ferry_bench::command_line cmd = ferry_bench::split_quick_flag(argc, argv);
  cfg.quick = cmd.quick;
  if (cfg.quick) {
    cfg.latency_warmup = 200;
    cfg.idle_sleep_s = 0.3;
    cfg.alloc_round = 10000;
    cfg.alloc_rounds = 5;
    cfg.repetitions = 1;
  }
  benchmark::Initialize(&cmd.argc, cmd.argv.data());
  if (benchmark::ReportUnrecognizedArguments(cmd.argc, cmd.argv.data())) return 1;

  register_all(cfg);
  {
    ferry_bench::collecting_reporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    print_summary(reporter.results(), cfg);
  }
  benchmark::Shutdown();

  g_running = "exit";
  if (!finalize_tbb(tbb_handle)) {
    std::cerr << "warning: oneTBB worker threads could not be joined at exit\n";
  }
  return 0;
}
