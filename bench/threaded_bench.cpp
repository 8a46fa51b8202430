// bench_threaded — ferry's loop ↔ thread hops against the Asio patterns they replace, in one
// process, same bodies.
//
//   S1  `co_await threaded(noop)` round trip, sequential awaits from one coroutine on an
//       io_context the benchmark thread runs (the loop is idle between calls): ferry
//       (ferry::threaded on a ferry::thread_pool{2}, task spawned with ferry::co_spawn)
//       against `co_await asio::co_spawn(asio_pool, noop coroutine, use_awaitable)` on an
//       asio::thread_pool{2}; and the same ferry loop run by a ferry::entrypoint with
//       loop_spin = 50 µs (and, for reference, loop_spin = 0 with and without the
//       entrypoint's signal handling). p50 / p99 of single calls.
//   S2  100 calls in flight from one loop: 100 tasks each awaiting K calls in a row; calls/s.
//   S3  thread → loop → thread: ferry::sync_wait_coroutine against
//       asio::co_spawn(io, coro, use_future).get(), the io_context run by another thread.
//   S4  threaded_separate per call against creating and joining a std::thread (report only).
//   S5  heap allocations per threaded call (int(int) callable), steady state: every call
//       into operator new and the C heap (malloc, calloc, realloc, aligned_alloc, ...).
//   S6  what the task-local context costs per hop: ns per call with 100 calls in flight,
//       for a task spawned with asio::co_spawn (no ferry context at all), with
//       ferry::co_spawn (context carried, no variable set) and with a context_var set in
//       the task. Rounds of the three are interleaved and the differences paired.
//
// After the usual Google Benchmark rows it prints one ratio table per scenario, with the
// goals beside them (PASS/MISS).
//
//   bench_threaded            full run (about 40 s on an idle 2-core machine)
//   bench_threaded --quick    shortened run (about 4 s; < 20 s even on a busy machine)
//
// Any --benchmark_* flag works as usual (e.g. --benchmark_filter=rt/); figures filtered out
// show "-" in the summary. S1 and S3-S6 run a fixed number of calls (set by --quick, not by
// --benchmark_min_time); S2 runs for 1 s per repetition (--quick: --benchmark_min_time).
//
// The machine must be otherwise idle: ferry's pool workers spin before they park, so on an
// oversubscribed machine (load above the core count) its figures drop far more than
// Asio's. Check `uptime` first.
//
// Nothing may hang the run: a watchdog thread ends the program with a message if one
// benchmark run takes longer than a generous limit; every pool is stopped and joined by its
// destructor, every thread joined.
#include "bench_report.hpp"
#include "bench_watchdog.hpp"

#include <ferry/co_spawn.hpp>
#include <ferry/context.hpp>
#include <ferry/entrypoint.hpp>
#include <ferry/sync_wait.hpp>
#include <ferry/thread_pool.hpp>
#include <ferry/threaded.hpp>

#include <asio/awaitable.hpp>
#include <asio/co_spawn.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <asio/thread_pool.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <future>
#include <iostream>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>


#include "heap_counter.hpp"

namespace {

// --- shared helpers -----------------------------------------------------------------------

using steady = std::chrono::steady_clock;

std::int64_t ns_between(steady::time_point t0, steady::time_point t1) noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
}

// Ends the program, naming the benchmark, when one run exceeds its limit: an await that
// never completes (a lost completion, a pool that never runs the call) must not hang the
// tour. Sleeps on a condition variable until the armed deadline, so it adds no wake-ups.
using ferry_bench::guarded_run;
using ferry_bench::watchdog;

double percentile(const std::vector<std::int64_t>& sorted, double p) {
  if (sorted.empty()) return 0;
  const double rank = p / 100.0 * static_cast<double>(sorted.size());
  std::size_t index = static_cast<std::size_t>(rank);
  if (static_cast<double>(index) < rank) ++index;  // nearest rank: ceil(p * n)
  if (index > 0) --index;
  return static_cast<double>(sorted[std::min(index, sorted.size() - 1)]);
}

void report_percentiles(benchmark::State& state, std::vector<std::int64_t>& samples) {
  std::sort(samples.begin(), samples.end());
  state.counters["p50_ns"] = percentile(samples, 50);
  state.counters["p99_ns"] = percentile(samples, 99);
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t mid = v.size() / 2;
  return v.size() % 2 != 0 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
}

// The blocking function of every hop: nothing. What is measured is the round trip.
struct noop_fn {
  void operator()() const noexcept {}
};
constexpr noop_fn noop{};

// S5's callable: small, int result.
struct add_one_fn {
  int operator()(int x) const noexcept { return x + 1; }
};

// Records a task's exception (co_spawn's completion handler).
struct failure_sink {
  std::size_t* failures;
  std::exception_ptr* first;
  void operator()(std::exception_ptr e) const {
    if (!e) return;
    if (++*failures == 1) *first = e;
  }
};

std::string describe(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
    return "unknown exception";
  }
}

// --- peers --------------------------------------------------------------------------------
// A peer owns its pool and offers call() (an awaitable of one hop running noop on the pool)
// and spawn(io, awaitable, handler) (how a task is started on the loop).

struct ferry_peer {
  static constexpr std::string_view key = "ferry";
  static constexpr std::string_view label = "ferry threaded";
  ferry::thread_pool pool{2};
  ferry::threaded_function<noop_fn> fn = ferry::threaded(pool, noop);
  auto call() const { return fn(); }
  template <class Awaitable, class Handler>
  static void spawn(asio::io_context& io, Awaitable a, Handler h) {
    ferry::co_spawn(io, std::move(a), std::move(h));
  }
};

struct asio_peer {
  static constexpr std::string_view key = "asio";
  static constexpr std::string_view label = "asio co_spawn(pool, use_awaitable)";
  asio::thread_pool pool{2};
  ~asio_peer() { pool.join(); }  // idle by then: returns at once
  asio_peer() = default;
  asio_peer(const asio_peer&) = delete;
  asio_peer& operator=(const asio_peer&) = delete;
  auto call() {
    return asio::co_spawn(
        pool,
        []() -> asio::awaitable<void> {
          noop();
          co_return;
        },
        asio::use_awaitable);
  }
  template <class Awaitable, class Handler>
  static void spawn(asio::io_context& io, Awaitable a, Handler h) {
    asio::co_spawn(io, std::move(a), std::move(h));
  }
};

// S4: every call on a thread of its own.
struct separate_peer {
  static constexpr std::string_view key = "ferry_separate";
  static constexpr std::string_view label = "ferry threaded_separate";
  ferry::threaded_separate_function<noop_fn> fn = ferry::threaded_separate(noop, "bench-separate");
  auto call() const { return fn(); }
  template <class Awaitable, class Handler>
  static void spawn(asio::io_context& io, Awaitable a, Handler h) {
    ferry::co_spawn(io, std::move(a), std::move(h));
  }
};

// S5: int(int).
asio::awaitable<int> asio_add_one(int x) { co_return x + 1; }

struct ferry_int_peer {
  static constexpr std::string_view key = "ferry";
  static constexpr std::string_view label = "ferry threaded";
  ferry::thread_pool pool{2};
  ferry::threaded_function<add_one_fn> fn = ferry::threaded(pool, add_one_fn{});
  auto call(int x) const { return fn(x); }
  template <class Awaitable, class Handler>
  static void spawn(asio::io_context& io, Awaitable a, Handler h) {
    ferry::co_spawn(io, std::move(a), std::move(h));
  }
};

struct asio_int_peer {
  static constexpr std::string_view key = "asio";
  static constexpr std::string_view label = "asio co_spawn(pool, use_awaitable)";
  asio::thread_pool pool{2};
  ~asio_int_peer() { pool.join(); }
  asio_int_peer() = default;
  asio_int_peer(const asio_int_peer&) = delete;
  asio_int_peer& operator=(const asio_int_peer&) = delete;
  auto call(int x) {
    // A non-coroutine lambda returning the coroutine: no captures live in a frame.
    return asio::co_spawn(pool, [x] { return asio_add_one(x); }, asio::use_awaitable);
  }
  template <class Awaitable, class Handler>
  static void spawn(asio::io_context& io, Awaitable a, Handler h) {
    asio::co_spawn(io, std::move(a), std::move(h));
  }
};

// --- configuration --------------------------------------------------------------------------

struct config {
  bool quick = false;
  benchmark::IterationCount rt_calls = 50000;  // S1 timed calls per run
  std::size_t rt_warmup = 2000;                // S1 untimed calls first
  std::size_t inflight_tasks = 100;            // S2, S5, S6
  std::size_t inflight_calls = 200;            // S2, S6: calls per task per round
  double inflight_min_time = 1.0;  // S2 seconds per run (0: --benchmark_min_time decides)
  benchmark::IterationCount sync_calls = 20000;  // S3 timed calls
  std::size_t sync_warmup = 500;
  benchmark::IterationCount separate_calls = 5000;  // S4 timed calls
  std::size_t separate_warmup = 100;
  std::size_t alloc_calls = 50000;              // S5 counted calls per round
  benchmark::IterationCount alloc_rounds = 5;   // S5 counted rounds
  std::size_t alloc_inflight_calls = 400;       // S5 calls per task, 100 in flight
  benchmark::IterationCount ctx_triples = 200;  // S6 interleaved rounds of the 3 modes
  int repetitions = 5;  // S1-S3, summarised by their median
};

void repeat(benchmark::internal::Benchmark* b, const config& cfg) {
  if (cfg.repetitions > 1) b->Repetitions(cfg.repetitions)->DisplayAggregatesOnly(true);
}

// --- S1 / S4: sequential round trips ---------------------------------------------------------

// One task awaiting one hop at a time; each timed individually. Runs on the benchmark
// thread (the io_context's runner), so it may drive the benchmark's state loop itself.
template <class Peer>
asio::awaitable<void> round_trip_loop(Peer& peer, benchmark::State& state, std::size_t warmup,
                                      std::vector<std::int64_t>& samples) {
  for (std::size_t i = 0; i < warmup; ++i) co_await peer.call();
  for (auto _ : state) {
    const auto t0 = steady::now();
    co_await peer.call();
    const auto t1 = steady::now();
    samples.push_back(ns_between(t0, t1));
  }
}

template <class Peer>
void bm_round_trip(benchmark::State& state, const std::string& name, std::size_t warmup) {
  guarded_run guard(name);
  Peer peer;  // before the loop: the loop goes first
  asio::io_context io;
  std::vector<std::int64_t> samples;
  samples.reserve(static_cast<std::size_t>(state.max_iterations));
  std::size_t failures = 0;
  std::exception_ptr first;
  Peer::spawn(io, round_trip_loop(peer, state, warmup, samples), failure_sink{&failures, &first});
  io.run();
  if (failures != 0) {
    state.SkipWithError(("a call failed: " + describe(first)).c_str());
    return;
  }
  report_percentiles(state, samples);
}

// The same loop as the main coroutine of a ferry::entrypoint (threaded unbound: the
// entrypoint's pool is the loop's default pool).
struct entrypoint_peer {
  ferry::threaded_function<noop_fn> fn = ferry::threaded(noop);
  auto call() const { return fn(); }
};

// The entrypoint variants of S1: pool_size = 2 and the loop_spin shown, everything else at
// its default (handle_signals = true) unless stated. The spin0 pair isolates what the
// entrypoint's signal handling costs a round trip when the loop does not spin.
struct entrypoint_variant {
  std::string name;
  std::string label;
  std::chrono::nanoseconds loop_spin{0};
  bool handle_signals = true;
};

const std::vector<entrypoint_variant>& entrypoint_variants() {
  static const std::vector<entrypoint_variant> v{
      {"rt/ferry_entrypoint_spin50us", "ferry entrypoint, loop_spin=50us",
       std::chrono::microseconds(50), true},
      {"rt/ferry_entrypoint_spin0", "ferry entrypoint, loop_spin=0", std::chrono::nanoseconds(0),
       true},
      {"rt/ferry_entrypoint_spin0_nosignals", "ferry entrypoint, loop_spin=0, no signals",
       std::chrono::nanoseconds(0), false},
  };
  return v;
}

void bm_round_trip_entrypoint(benchmark::State& state, const entrypoint_variant& variant,
                              std::size_t warmup) {
  const std::string& name = variant.name;
  guarded_run guard(name);
  std::vector<std::int64_t> samples;
  samples.reserve(static_cast<std::size_t>(state.max_iterations));
  entrypoint_peer peer;
  try {
    ferry::entrypoint ep{{.pool_size = 2,
                          .handle_signals = variant.handle_signals,
                          .loop_spin = variant.loop_spin}};
    ep.run(round_trip_loop(peer, state, warmup, samples));
  } catch (const std::exception& e) {
    state.SkipWithError((std::string("entrypoint run failed: ") + e.what()).c_str());
    return;
  }
  report_percentiles(state, samples);
}

// S4's peer: create a thread that runs noop, join it.
void bm_std_thread(benchmark::State& state, const std::string& name, std::size_t warmup) {
  guarded_run guard(name);
  for (std::size_t i = 0; i < warmup; ++i) std::thread(noop).join();
  std::vector<std::int64_t> samples;
  samples.reserve(static_cast<std::size_t>(state.max_iterations));
  for (auto _ : state) {
    const auto t0 = steady::now();
    std::thread t(noop);
    t.join();
    const auto t1 = steady::now();
    samples.push_back(ns_between(t0, t1));
  }
  report_percentiles(state, samples);
}

// --- S2: many calls in flight -----------------------------------------------------------------

template <class Peer>
asio::awaitable<void> inflight_task(Peer& peer, std::size_t calls) {
  for (std::size_t i = 0; i < calls; ++i) co_await peer.call();
}

template <class Peer>
void bm_inflight(benchmark::State& state, const std::string& name, std::size_t tasks,
                 std::size_t calls) {
  guarded_run guard(name);
  Peer peer;
  asio::io_context io;
  std::size_t failures = 0;
  std::exception_ptr first;
  auto round = [&] {
    for (std::size_t t = 0; t < tasks; ++t) {
      Peer::spawn(io, inflight_task(peer, calls), failure_sink{&failures, &first});
    }
    io.run();
    io.restart();
  };
  round();  // warm-up: threads started, caches primed
  round();
  for (auto _ : state) round();
  if (failures != 0) {
    state.SkipWithError(("a call failed: " + describe(first)).c_str());
    return;
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(tasks * calls));
}

// --- S3: thread → loop → thread --------------------------------------------------------------

// An io_context run by a thread of its own, kept alive by a work guard until destroyed.
struct loop_thread {
  asio::io_context io;
  asio::executor_work_guard<asio::io_context::executor_type> work{io.get_executor()};
  std::thread runner{[this] { io.run(); }};
  loop_thread() = default;
  ~loop_thread() {
    work.reset();
    io.stop();
    runner.join();
  }
  loop_thread(const loop_thread&) = delete;
  loop_thread& operator=(const loop_thread&) = delete;
};

constexpr auto noop_coroutine = []() -> asio::awaitable<void> {
  noop();
  co_return;
};

struct ferry_sync_peer {
  static constexpr std::string_view key = "ferry";
  static constexpr std::string_view label = "ferry sync_wait_coroutine";
  static void call(asio::io_context& io) { ferry::sync_wait_coroutine(io, noop_coroutine); }
};

struct asio_future_peer {
  static constexpr std::string_view key = "asio_future";
  static constexpr std::string_view label = "asio co_spawn(io, use_future).get()";
  static void call(asio::io_context& io) {
    asio::co_spawn(io, noop_coroutine, asio::use_future).get();
  }
};

template <class Peer>
void bm_sync(benchmark::State& state, const std::string& name, std::size_t warmup) {
  guarded_run guard(name);
  std::vector<std::int64_t> samples;
  samples.reserve(static_cast<std::size_t>(state.max_iterations));
  loop_thread loop;
  try {
    for (std::size_t i = 0; i < warmup; ++i) Peer::call(loop.io);
    for (auto _ : state) {
      const auto t0 = steady::now();
      Peer::call(loop.io);
      const auto t1 = steady::now();
      samples.push_back(ns_between(t0, t1));
    }
  } catch (const std::exception& e) {
    state.SkipWithError((std::string("a call failed: ") + e.what()).c_str());
    return;
  }
  report_percentiles(state, samples);
}

// --- S5: heap allocations per call ----------------------------------------------------------

struct heap_count {
  std::uint64_t heap = 0;  // every heap entry point
  std::uint64_t news = 0;  // of which operator new
};

heap_count read_counts() noexcept {
  return {heap_allocations(), g_new_calls.load(std::memory_order_relaxed)};
}

heap_count start_counting() noexcept {
  const heap_count before = read_counts();
  g_count_allocations.store(true, std::memory_order_seq_cst);
  return before;
}

heap_count stop_counting(const heap_count& before) noexcept {
  g_count_allocations.store(false, std::memory_order_seq_cst);
  const heap_count after = read_counts();
  return {after.heap - before.heap, after.news - before.news};
}

// One task: warm-up calls, then `n` counted calls (counting on while they run).
template <class Peer>
asio::awaitable<void> alloc_sequential(Peer& peer, std::size_t warmup, std::size_t n,
                                       heap_count& out, int& sink) {
  int acc = 0;
  for (std::size_t i = 0; i < warmup; ++i) {
    const int v = co_await peer.call(static_cast<int>(i & 0xffff));
    acc += v;
  }
  const heap_count before = start_counting();
  for (std::size_t i = 0; i < n; ++i) {
    const int v = co_await peer.call(static_cast<int>(i & 0xffff));
    acc += v;
  }
  out = stop_counting(before);
  sink += acc;
}

// The counting window of S5's in-flight rounds: it opens when the last of the tasks has made
// its warm-up calls (all of them in flight from then on) and closes when the first task
// runs out of calls, so only calls made with every task in flight are counted. Everything
// here is touched on the loop thread only.
struct inflight_window {
  std::size_t tasks = 0;
  std::size_t warmed = 0;
  bool open = false;
  bool closed = false;
  std::uint64_t calls = 0;  // calls completed by all tasks so far
  std::uint64_t calls_at_open = 0;
  heap_count before{};
  heap_count counted{};
  std::uint64_t counted_calls = 0;

  void reset(std::size_t n) {
    *this = inflight_window{};
    tasks = n;
  }
  void task_warmed() {
    if (++warmed == tasks) {
      calls_at_open = calls;
      open = true;
      before = start_counting();
    }
  }
  void task_done() {
    if (open && !closed) {
      counted = stop_counting(before);
      counted_calls = calls - calls_at_open;
      closed = true;
    }
  }
};

template <class Peer>
asio::awaitable<void> alloc_inflight_task(Peer& peer, std::size_t warmup, std::size_t calls,
                                          inflight_window& w, int& sink) {
  int acc = 0;
  for (std::size_t i = 0; i < warmup + calls; ++i) {
    if (i == warmup) w.task_warmed();
    const int v = co_await peer.call(static_cast<int>(i & 0xffff));
    acc += v;
    ++w.calls;
  }
  w.task_done();
  sink += acc;
}

template <class Peer>
void bm_alloc_sequential(benchmark::State& state, const std::string& name, std::size_t n) {
  guarded_run guard(name);
  Peer peer;
  asio::io_context io;
  std::size_t failures = 0;
  std::exception_ptr first;
  int sink = 0;
  heap_count total{};
  std::uint64_t calls = 0;
  std::size_t warmup = 2000;  // the first round warms up longer
  for (auto _ : state) {
    heap_count round{};
    Peer::spawn(io, alloc_sequential(peer, warmup, n, round, sink),
                failure_sink{&failures, &first});
    io.run();
    io.restart();
    total.heap += round.heap;
    total.news += round.news;
    calls += n;
    warmup = 100;
  }
  benchmark::DoNotOptimize(sink);
  if (failures != 0) {
    state.SkipWithError(("a call failed: " + describe(first)).c_str());
    return;
  }
  const double per = calls != 0 ? 1.0 / static_cast<double>(calls) : 0.0;
  state.counters["allocs_per_call"] = static_cast<double>(total.heap) * per;
  state.counters["new_per_call"] = static_cast<double>(total.news) * per;
}

// 100 tasks in flight, counted only while all of them are (see inflight_window).
template <class Peer>
void bm_alloc_inflight(benchmark::State& state, const std::string& name, std::size_t tasks,
                       std::size_t calls) {
  guarded_run guard(name);
  Peer peer;
  asio::io_context io;
  std::size_t failures = 0;
  std::exception_ptr first;
  int sink = 0;
  inflight_window window;
  const std::size_t warmup = calls / 4;
  auto round = [&] {
    window.reset(tasks);
    for (std::size_t t = 0; t < tasks; ++t) {
      Peer::spawn(io, alloc_inflight_task(peer, warmup, calls, window, sink),
                  failure_sink{&failures, &first});
    }
    io.run();
    io.restart();
    if (window.open && !window.closed) window.task_done();  // cannot happen; never leave it on
  };
  for (int i = 0; i < 3; ++i) round();
  heap_count total{};
  std::uint64_t counted_calls = 0;
  for (auto _ : state) {
    round();
    total.heap += window.counted.heap;
    total.news += window.counted.news;
    counted_calls += window.counted_calls;
  }
  benchmark::DoNotOptimize(sink);
  if (failures != 0) {
    state.SkipWithError(("a call failed: " + describe(first)).c_str());
    return;
  }
  const double per = counted_calls != 0 ? 1.0 / static_cast<double>(counted_calls) : 0.0;
  state.counters["allocs_per_call"] = static_cast<double>(total.heap) * per;
  state.counters["new_per_call"] = static_cast<double>(total.news) * per;
  state.counters["counted_calls"] = static_cast<double>(counted_calls);
}

// --- S6: what the context costs per hop --------------------------------------------------------

template <class Fn>
asio::awaitable<void> context_task(const Fn& fn, std::size_t calls,
                                   ferry::context_var<int>* var, int value) {
  std::optional<ferry::context_var<int>::token> token;
  if (var) token.emplace(var->set(value));
  for (std::size_t i = 0; i < calls; ++i) co_await fn();
  if (token) var->reset(*token);
}

enum context_mode : std::size_t { asio_task = 0, ferry_task = 1, ferry_task_var = 2 };
constexpr std::size_t context_modes = 3;

void bm_context_cost(benchmark::State& state, const std::string& name, std::size_t tasks,
                     std::size_t calls) {
  guarded_run guard(name);
  ferry::thread_pool pool{2};
  asio::io_context io;
  const auto fn = ferry::threaded(pool, noop);
  ferry::context_var<int> var{"bench_request_id"};
  std::size_t failures = 0;
  std::exception_ptr first;
  auto round = [&](std::size_t mode) -> double {
    const auto t0 = steady::now();
    for (std::size_t t = 0; t < tasks; ++t) {
      if (mode == asio_task) {
        asio::co_spawn(io, context_task(fn, calls, nullptr, 0), failure_sink{&failures, &first});
      } else {
        ferry::co_spawn(io,
                        context_task(fn, calls, mode == ferry_task_var ? &var : nullptr,
                                     static_cast<int>(t)),
                        failure_sink{&failures, &first});
      }
    }
    io.run();
    io.restart();
    return static_cast<double>(ns_between(t0, steady::now())) /
           static_cast<double>(tasks * calls);
  };
  for (std::size_t m = 0; m < context_modes; ++m) {
    round(m);
    round(m);
  }
  std::vector<double> per_mode[context_modes];
  std::vector<double> var_added;
  std::vector<double> task_added;
  std::size_t rotation = 0;
  for (auto _ : state) {
    double ns[context_modes] = {};
    // Rotate the order so that no mode always runs right after the same other one.
    for (std::size_t k = 0; k < context_modes; ++k) {
      const std::size_t m = (rotation + k) % context_modes;
      ns[m] = round(m);
    }
    ++rotation;
    for (std::size_t m = 0; m < context_modes; ++m) per_mode[m].push_back(ns[m]);
    var_added.push_back(ns[ferry_task_var] - ns[ferry_task]);
    task_added.push_back(ns[ferry_task] - ns[asio_task]);
  }
  if (failures != 0) {
    state.SkipWithError(("a call failed: " + describe(first)).c_str());
    return;
  }
  state.counters["asio_task_ns"] = median(per_mode[asio_task]);
  state.counters["ferry_task_ns"] = median(per_mode[ferry_task]);
  state.counters["ferry_var_ns"] = median(per_mode[ferry_task_var]);
  state.counters["var_added_ns"] = median(var_added);
  state.counters["task_added_ns"] = median(task_added);
  state.SetItemsProcessed(state.iterations() *
                          static_cast<std::int64_t>(context_modes * tasks * calls));
}

// --- names and registration -------------------------------------------------------------------

const std::string sep_std_thread = "separate/std_thread";
const std::string ctx_name = "context/100_in_flight";

template <class Peer>
std::string rt_name() {
  return "rt/" + std::string(Peer::key);
}
template <class Peer>
std::string inflight_name() {
  return "inflight/" + std::string(Peer::key);
}
template <class Peer>
std::string sync_name() {
  return "sync/" + std::string(Peer::key);
}
template <class Peer>
std::string alloc_seq_name() {
  return "alloc/sequential/" + std::string(Peer::key);
}
template <class Peer>
std::string alloc_inflight_name() {
  return "alloc/in_flight/" + std::string(Peer::key);
}

template <class Peer>
void register_round_trip(const config& cfg, benchmark::IterationCount calls,
                         std::size_t warmup, const std::string& name, bool repeated) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) {
              bm_round_trip<Peer>(st, name, warmup);
            })
                ->Iterations(calls)
                ->UseRealTime()
                ->Unit(benchmark::kMicrosecond);
  if (repeated) repeat(b, cfg);
}

void register_all(const config& cfg) {
  // S1
  register_round_trip<ferry_peer>(cfg, cfg.rt_calls, cfg.rt_warmup, rt_name<ferry_peer>(), true);
  register_round_trip<asio_peer>(cfg, cfg.rt_calls, cfg.rt_warmup, rt_name<asio_peer>(), true);
  for (const entrypoint_variant& v : entrypoint_variants()) {
    const std::size_t warmup = cfg.rt_warmup;
    const entrypoint_variant* variant = &v;
    repeat(benchmark::RegisterBenchmark(v.name.c_str(),
                                        [=](benchmark::State& st) {
                                          bm_round_trip_entrypoint(st, *variant, warmup);
                                        })
               ->Iterations(cfg.rt_calls)
               ->UseRealTime()
               ->Unit(benchmark::kMicrosecond),
           cfg);
  }

  // S2
  {
    const std::size_t tasks = cfg.inflight_tasks;
    const std::size_t calls = cfg.inflight_calls;
    const std::string fn = inflight_name<ferry_peer>();
    const std::string an = inflight_name<asio_peer>();
    auto* f = benchmark::RegisterBenchmark(fn.c_str(), [=](benchmark::State& st) {
      bm_inflight<ferry_peer>(st, fn, tasks, calls);
    });
    auto* a = benchmark::RegisterBenchmark(an.c_str(), [=](benchmark::State& st) {
      bm_inflight<asio_peer>(st, an, tasks, calls);
    });
    for (auto* b : {f, a}) {
      b->UseRealTime()->Unit(benchmark::kMillisecond);
      if (cfg.inflight_min_time > 0) b->MinTime(cfg.inflight_min_time);
      repeat(b, cfg);
    }
  }

  // S3
  {
    const std::size_t warmup = cfg.sync_warmup;
    const std::string fn = sync_name<ferry_sync_peer>();
    const std::string an = sync_name<asio_future_peer>();
    repeat(benchmark::RegisterBenchmark(
               fn.c_str(),
               [=](benchmark::State& st) { bm_sync<ferry_sync_peer>(st, fn, warmup); })
               ->Iterations(cfg.sync_calls)
               ->UseRealTime()
               ->Unit(benchmark::kMicrosecond),
           cfg);
    repeat(benchmark::RegisterBenchmark(
               an.c_str(),
               [=](benchmark::State& st) { bm_sync<asio_future_peer>(st, an, warmup); })
               ->Iterations(cfg.sync_calls)
               ->UseRealTime()
               ->Unit(benchmark::kMicrosecond),
           cfg);
  }

  // S4 (report only: one run each)
  {
    register_round_trip<separate_peer>(cfg, cfg.separate_calls, cfg.separate_warmup,
                                       "separate/" + std::string(separate_peer::key), false);
    const std::size_t warmup = cfg.separate_warmup;
    const std::string n = sep_std_thread;
    benchmark::RegisterBenchmark(n.c_str(),
                                 [=](benchmark::State& st) { bm_std_thread(st, n, warmup); })
        ->Iterations(cfg.separate_calls)
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
  }

  // S5
  {
    const std::size_t n = cfg.alloc_calls;
    const std::size_t tasks = cfg.inflight_tasks;
    const std::size_t calls = cfg.alloc_inflight_calls;
    const std::string fs = alloc_seq_name<ferry_int_peer>();
    const std::string as = alloc_seq_name<asio_int_peer>();
    const std::string fi = alloc_inflight_name<ferry_int_peer>();
    const std::string ai = alloc_inflight_name<asio_int_peer>();
    benchmark::RegisterBenchmark(fs.c_str(),
                                 [=](benchmark::State& st) {
                                   bm_alloc_sequential<ferry_int_peer>(st, fs, n);
                                 })
        ->Iterations(cfg.alloc_rounds)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(as.c_str(),
                                 [=](benchmark::State& st) {
                                   bm_alloc_sequential<asio_int_peer>(st, as, n);
                                 })
        ->Iterations(cfg.alloc_rounds)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(fi.c_str(),
                                 [=](benchmark::State& st) {
                                   bm_alloc_inflight<ferry_int_peer>(st, fi, tasks, calls);
                                 })
        ->Iterations(cfg.alloc_rounds)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(ai.c_str(),
                                 [=](benchmark::State& st) {
                                   bm_alloc_inflight<asio_int_peer>(st, ai, tasks, calls);
                                 })
        ->Iterations(cfg.alloc_rounds)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }

  // S6
  {
    const std::size_t tasks = cfg.inflight_tasks;
    const std::size_t calls = cfg.inflight_calls;
    const std::string n = ctx_name;
    benchmark::RegisterBenchmark(n.c_str(),
                                 [=](benchmark::State& st) {
                                   bm_context_cost(st, n, tasks, calls);
                                 })
        ->Iterations(cfg.ctx_triples)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

// --- the summary ----------------------------------------------------------------------------

void print_summary(const ferry_bench::result_store& r, const config& cfg) {
  using ferry_bench::better;
  using ferry_bench::column_spec;
  using ferry_bench::goal;
  using ferry_bench::ratio_table;
  ferry_bench::goal_tally tally;
  std::ostream& os = std::cout;

  os << "\n==================== summary: ferry's loop <-> thread hops against Asio "
        "====================\n";
  os << "(" << (cfg.quick ? "--quick run: short timings, expect noise"
                          : "full run: S1-S3 figures are medians of " +
                                std::to_string(cfg.repetitions) + " repetitions")
     << "; pools of 2 workers; the io_context is run by the benchmark thread unless stated)\n";

  // S1
  {
    const std::string base(ferry_peer::label);
    ratio_table t("S1 co_await threaded(noop) round trip: sequential awaits from one task, "
                      "loop idle between calls (" +
                      std::to_string(cfg.rt_calls) + " timed calls)",
                  base,
                  {column_spec{"p50 ns", better::lower, 1.0, 0},
                   column_spec{"p99 ns", better::lower, 1.0, 0},
                   column_spec{"mean ns", better::lower, 1.0, 0}});
    t.add_note("ferry: ferry::threaded(ferry::thread_pool{2}, noop) in a ferry::co_spawn'd task");
    t.add_note("asio: co_await asio::co_spawn(asio::thread_pool{2}, noop coroutine, "
               "use_awaitable)");
    t.add_note("entrypoint rows: the same loop as ep.run(main), ferry::threaded(noop) on the "
               "entrypoint's pool (pool_size = 2),");
    t.add_note("other options at their defaults (handle_signals = true) unless stated");
    t.add_note("mean: wall time per timed call, timing overhead included. A loop that does not");
    t.add_note("spin is bimodal: a call either completes before the loop thread falls asleep");
    t.add_note("or pays for waking it, and p50 can land in either mode from run to run");
    const auto row = [&](const std::string& label, const std::string& name,
                         std::optional<goal> g) {
      t.add_row(label, {r.counter(name, "p50_ns"), r.counter(name, "p99_ns"), r.real_ns(name)},
                std::move(g));
    };
    row(base, rt_name<ferry_peer>(), std::nullopt);
    row(std::string(asio_peer::label), rt_name<asio_peer>(),
        goal::advantage_at_least(2.0, 0, "ferry p50 <= 0.5x asio's"));
    for (const entrypoint_variant& v : entrypoint_variants()) {
      std::optional<goal> g;
      if (v.loop_spin > std::chrono::nanoseconds(0)) g = goal::value_below(5000.0, 0, "p50 < 5 us");
      row(v.label, v.name, g);
    }
    t.print(os, &tally);
  }

  // S2
  {
    const std::string base(ferry_peer::label);
    ratio_table t("S2 " + std::to_string(cfg.inflight_tasks) +
                      " calls in flight from one loop: " + std::to_string(cfg.inflight_tasks) +
                      " tasks x " + std::to_string(cfg.inflight_calls) +
                      " sequential threaded(noop) calls per round",
                  base, {column_spec{"Mcalls/s", better::higher, 1e-6, 3}});
    t.add_note("wall time of whole rounds, task spawning included");
    t.add_row(base, {r.items_per_second(inflight_name<ferry_peer>())});
    t.add_row(std::string(asio_peer::label), {r.items_per_second(inflight_name<asio_peer>())},
              goal::advantage_at_least(4.0, 0, "ferry >= 4x asio"));
    t.print(os, &tally);
  }

  // S3
  {
    const std::string base(ferry_sync_peer::label);
    ratio_table t("S3 thread -> loop -> thread: a plain thread runs a noop coroutine on a loop "
                      "run by another thread and waits (" +
                      std::to_string(cfg.sync_calls) + " timed calls)",
                  base,
                  {column_spec{"p50 ns", better::lower, 1.0, 0},
                   column_spec{"p99 ns", better::lower, 1.0, 0},
                   column_spec{"mean ns", better::lower, 1.0, 0}});
    const auto row = [&](const std::string& label, const std::string& name,
                         std::optional<goal> g) {
      t.add_row(label, {r.counter(name, "p50_ns"), r.counter(name, "p99_ns"), r.real_ns(name)},
                std::move(g));
    };
    row(base, sync_name<ferry_sync_peer>(), std::nullopt);
    row(std::string(asio_future_peer::label), sync_name<asio_future_peer>(),
        goal::advantage_at_least(2.0, 0, "ferry p50 <= 0.5x asio's"));
    t.print(os, &tally);
  }

  // S4
  {
    const std::string base(separate_peer::label);
    const std::string sep = "separate/" + std::string(separate_peer::key);
    ratio_table t("S4 threaded_separate(noop) per call, sequential from one task, against "
                      "std::thread create + join (report only)",
                  base,
                  {column_spec{"mean us", better::lower, 1e-3, 1},
                   column_spec{"p50 us", better::lower, 1e-3, 1},
                   column_spec{"p99 us", better::lower, 1e-3, 1}});
    t.add_note("ferry's figure includes the hop back to the loop; std::thread's does not");
    t.add_row(base, {r.real_ns(sep), r.counter(sep, "p50_ns"), r.counter(sep, "p99_ns")});
    t.add_row("std::thread(noop).join()",
              {r.real_ns(sep_std_thread), r.counter(sep_std_thread, "p50_ns"),
               r.counter(sep_std_thread, "p99_ns")});
    t.print(os, &tally);
  }

  // S5
  {
    const std::string base(ferry_int_peer::label);
    ratio_table t("S5 heap allocations per threaded call, steady state (int(int) callable, "
                      "int result)",
                  base,
                  {column_spec{"allocs/call 1 in flight", better::lower, 1.0, 3},
                   column_spec{"allocs/call " + std::to_string(cfg.inflight_tasks) +
                                   " in flight",
                               better::lower, 1.0, 3}});
    t.add_note("every call into the heap from any thread while the counted calls run: "
               "operator new and");
    t.add_note("malloc/calloc/realloc/aligned_alloc/posix_memalign; " +
               std::to_string(cfg.alloc_calls) + " calls x " +
               std::to_string(cfg.alloc_rounds) + " rounds (1 in flight),");
    t.add_note("in flight: counted only while all " + std::to_string(cfg.inflight_tasks) +
               " tasks have a call in flight (after warm-up, before the first task ends)");
    t.add_row(base,
              {r.counter(alloc_seq_name<ferry_int_peer>(), "allocs_per_call"),
               r.counter(alloc_inflight_name<ferry_int_peer>(), "allocs_per_call")},
              goal::value_at_most(0.0, 0, "ferry 0 per call"));
    t.add_row(std::string(asio_int_peer::label),
              {r.counter(alloc_seq_name<asio_int_peer>(), "allocs_per_call"),
               r.counter(alloc_inflight_name<asio_int_peer>(), "allocs_per_call")});
    t.print(os, &tally);
  }

  // S6
  {
    const std::string base = "ferry::co_spawn task, no var set";
    ratio_table t("S6 context cost per hop: ns per threaded(noop) call, " +
                      std::to_string(cfg.inflight_tasks) + " calls in flight (medians of " +
                      std::to_string(cfg.ctx_triples) + " interleaved rounds per mode)",
                  base, {column_spec{"ns/call", better::lower, 1.0, 1}});
    t.add_row("asio::co_spawn task (no ferry context)", {r.counter(ctx_name, "asio_task_ns")});
    t.add_row(base, {r.counter(ctx_name, "ferry_task_ns")});
    t.add_row("ferry::co_spawn task, context_var<int> set", {r.counter(ctx_name, "ferry_var_ns")});
    t.print(os, &tally);

    ratio_table d("S6 context cost per hop: added ns per call (median of paired round "
                      "differences)",
                  base, {column_spec{"added ns/call", better::lower, 1.0, 1, false}});
    d.add_row("context_var set vs not set", {r.counter(ctx_name, "var_added_ns")},
              goal::value_below(50.0, 0, "< 50 ns added"));
    d.add_row("ferry task (no var) vs asio task", {r.counter(ctx_name, "task_added_ns")});
    d.print(os, &tally);
  }

  os << '\n';
  tally.print(os);
  for (const ferry_bench::run_record* f : r.failures()) {
    os << "benchmark " << f->name << " failed: " << f->error_message << '\n';
  }
}

}  // namespace

int main(int argc, char** argv) {
  config cfg;
  ferry_bench::command_line cmd = ferry_bench::split_quick_flag(argc, argv);
  cfg.quick = cmd.quick;
  if (cfg.quick) {
    cfg.rt_calls = 5000;
    cfg.inflight_min_time = 0;
    cfg.rt_warmup = 500;
    cfg.sync_calls = 3000;
    cfg.sync_warmup = 200;
    cfg.separate_calls = 1000;
    cfg.separate_warmup = 50;
    cfg.alloc_calls = 10000;
    cfg.alloc_rounds = 3;
    cfg.ctx_triples = 40;
    cfg.repetitions = 1;
  }
  benchmark::Initialize(&cmd.argc, cmd.argv.data());
  if (benchmark::ReportUnrecognizedArguments(cmd.argc, cmd.argv.data())) return 1;

  watchdog dog{"bench_threaded"};
  register_all(cfg);
  {
    ferry_bench::collecting_reporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    print_summary(reporter.results(), cfg);
  }
  benchmark::Shutdown();
  return 0;
}
