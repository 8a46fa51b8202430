// bench_pipeline — the step-flow layer (ferry/flow/bundle.hpp) and the streaming pipeline
// (ferry/flow/pipeline.hpp) against their baselines, in one run.
//
//  1. Overhead of a 5-step bundle of trivial steps against calling the five functions
//     directly: coroutine steps (co_await each one) and plain steps (each one through
//     ferry::threaded on a pool, as the bundle runs them).
//  2. A serial_in_order -> parallel -> serial_in_order pipeline with ~W µs of busy work per
//     stage, ferry::flow::pipeline on a ferry::thread_pool against oneTBB's
//     parallel_pipeline, both with the same number of threads and tokens in flight.
//
//     ./build/release/bench/bench_pipeline            # full run, then the ratio tables
//     ./build/release/bench/bench_pipeline --quick    # short timings (noisy)
#include "bench_report.hpp"
#include "bench_watchdog.hpp"

#include <ferry/flow/bundle.hpp>
#include <ferry/flow/pipeline.hpp>
#include <ferry/thread_pool.hpp>
#include <ferry/threaded.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>

#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/parallel_pipeline.h>
#include <oneapi/tbb/task_arena.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <future>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace fl = ferry::flow;
using ferry_bench::guarded_run;
using ferry_bench::watchdog;

namespace {

constexpr int calls_per_round = 1000;
constexpr std::size_t pipeline_threads = 2;
constexpr std::size_t tokens = 16;
constexpr int pipeline_items = 20000;

// --- 1. bundle overhead ---------------------------------------------------------------------

const fl::key<int> k0{"k0"}, k1{"k1"}, k2{"k2"}, k3{"k3"}, k4{"k4"}, k5{"k5"};

asio::awaitable<int> inc(int v) { co_return v + 1; }
int inc_plain(int v) { return v + 1; }

fl::bundle coroutine_bundle() {
  auto f = [](int v) -> asio::awaitable<int> { co_return v + 1; };
  return fl::bundle{fl::seq(fl::step("s1", fl::needs(k0), fl::gives(k1), f),
                            fl::step("s2", fl::needs(k1), fl::gives(k2), f),
                            fl::step("s3", fl::needs(k2), fl::gives(k3), f),
                            fl::step("s4", fl::needs(k3), fl::gives(k4), f),
                            fl::step("s5", fl::needs(k4), fl::gives(k5), f)),
                    {.visible = fl::visibility::none}};
}

fl::bundle plain_bundle(ferry::thread_pool& pool) {
  auto f = [](int v) { return v + 1; };
  return fl::bundle{fl::seq(fl::step("s1", fl::needs(k0), fl::gives(k1), f).on(pool),
                            fl::step("s2", fl::needs(k1), fl::gives(k2), f).on(pool),
                            fl::step("s3", fl::needs(k2), fl::gives(k3), f).on(pool),
                            fl::step("s4", fl::needs(k3), fl::gives(k4), f).on(pool),
                            fl::step("s5", fl::needs(k4), fl::gives(k5), f).on(pool)),
                    {.visible = fl::visibility::none}};
}

// Runs `body` (a coroutine doing calls_per_round calls) per iteration on one io_context.
template <class Body>
void run_rounds(benchmark::State& state, Body& body) {
  asio::io_context io;
  std::int64_t sink = 0;
  for (auto _ : state) {
    asio::co_spawn(io, body(sink), asio::detached);
    io.run();
    io.restart();
  }
  benchmark::DoNotOptimize(sink);
  state.SetItemsProcessed(state.iterations() * calls_per_round);
}

void bm_bundle_coroutine(benchmark::State& state) {
  guarded_run guard("bundle/coroutine");
  const fl::bundle f = coroutine_bundle();
  auto body = [&](std::int64_t& sink) -> asio::awaitable<void> {
    for (int i = 0; i < calls_per_round; ++i) {
      auto op = f(fl::bag{k0(i)});
      fl::bag out = co_await std::move(op);
      sink += out.at(k5);
    }
  };
  run_rounds(state, body);
}

void bm_direct_coroutine(benchmark::State& state) {
  guarded_run guard("direct/coroutine");
  auto body = [&](std::int64_t& sink) -> asio::awaitable<void> {
    for (int i = 0; i < calls_per_round; ++i) {
      int v = co_await inc(i);
      v = co_await inc(v);
      v = co_await inc(v);
      v = co_await inc(v);
      v = co_await inc(v);
      sink += v;
    }
  };
  run_rounds(state, body);
}

void bm_bundle_plain(benchmark::State& state) {
  guarded_run guard("bundle/plain");
  ferry::thread_pool pool{1};
  const fl::bundle f = plain_bundle(pool);
  auto body = [&](std::int64_t& sink) -> asio::awaitable<void> {
    for (int i = 0; i < calls_per_round; ++i) {
      auto op = f(fl::bag{k0(i)});
      fl::bag out = co_await std::move(op);
      sink += out.at(k5);
    }
  };
  run_rounds(state, body);
}

void bm_direct_threaded(benchmark::State& state) {
  guarded_run guard("direct/threaded");
  ferry::thread_pool pool{1};
  auto call = ferry::threaded(pool, inc_plain);
  auto body = [&](std::int64_t& sink) -> asio::awaitable<void> {
    for (int i = 0; i < calls_per_round; ++i) {
      int v = co_await call(i);
      v = co_await call(v);
      v = co_await call(v);
      v = co_await call(v);
      v = co_await call(v);
      sink += v;
    }
  };
  run_rounds(state, body);
}

// --- 2. serial -> parallel -> serial ----------------------------------------------------------

// Busy work of about `ns` nanoseconds (a clock loop: no sleeping, no memory traffic).
int work(int v, std::int64_t ns) {
  if (ns <= 0) return v + 1;
  const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(ns);
  int x = v;
  while (std::chrono::steady_clock::now() < until) x = x * 31 + 7;
  return v + (x == 42 ? 1 : 0);
}

void bm_ferry_pipeline(benchmark::State& state) {
  guarded_run guard("pipeline/ferry");
  const std::int64_t ns = state.range(0);
  ferry::thread_pool pool{pipeline_threads};
  std::vector<int> input(pipeline_items);
  for (int i = 0; i < pipeline_items; ++i) input[static_cast<std::size_t>(i)] = i;
  std::int64_t total = 0;
  auto p = fl::make_pipeline(fl::serial_in_order([ns](int v) { return work(v, ns); }),
                             fl::parallel([ns](int v) { return work(v, ns); }),
                             fl::serial_in_order([ns, &total](int v) { total += work(v, ns); }));
  for (auto _ : state) {
    std::promise<void> done;
    p.run(pool, input, {.max_in_flight = tokens}, [&](std::exception_ptr e, fl::pipeline_stats st) {
      if (e || st.items != static_cast<std::uint64_t>(pipeline_items)) std::abort();
      done.set_value();
    });
    done.get_future().wait();
  }
  benchmark::DoNotOptimize(total);
  state.SetItemsProcessed(state.iterations() * pipeline_items);
}

void bm_tbb_pipeline(benchmark::State& state) {
  guarded_run guard("pipeline/tbb");
  const std::int64_t ns = state.range(0);
  oneapi::tbb::task_arena arena(static_cast<int>(pipeline_threads));
  std::int64_t total = 0;
  for (auto _ : state) {
    arena.execute([&] {
      int next = 0;
      oneapi::tbb::parallel_pipeline(
          tokens,
          oneapi::tbb::make_filter<void, int>(oneapi::tbb::filter_mode::serial_in_order,
                                              [&](oneapi::tbb::flow_control& fc) {
                                                if (next == pipeline_items) {
                                                  fc.stop();
                                                  return 0;
                                                }
                                                return work(next++, ns);
                                              }) &
              oneapi::tbb::make_filter<int, int>(oneapi::tbb::filter_mode::parallel,
                                                 [ns](int v) { return work(v, ns); }) &
              oneapi::tbb::make_filter<int, void>(oneapi::tbb::filter_mode::serial_in_order,
                                                  [&](int v) { total += work(v, ns); }));
    });
  }
  benchmark::DoNotOptimize(total);
  state.SetItemsProcessed(state.iterations() * pipeline_items);
}

// Joins its parts with append (g++ 12 reports a false -Wrestrict for literal + string&&).
template <class... Parts>
std::string cat(const Parts&... parts) {
  std::string out;
  (out.append(parts), ...);
  return out;
}

void register_all() {
  benchmark::RegisterBenchmark("bundle/coroutine", bm_bundle_coroutine)->UseRealTime();
  benchmark::RegisterBenchmark("direct/coroutine", bm_direct_coroutine)->UseRealTime();
  benchmark::RegisterBenchmark("bundle/plain", bm_bundle_plain)->UseRealTime();
  benchmark::RegisterBenchmark("direct/threaded", bm_direct_threaded)->UseRealTime();
  for (std::int64_t ns : {0, 1000}) {
    benchmark::RegisterBenchmark(cat("pipeline/ferry/", std::to_string(ns)).c_str(), bm_ferry_pipeline)
        ->Arg(ns)
        ->UseRealTime();
    benchmark::RegisterBenchmark(cat("pipeline/tbb/", std::to_string(ns)).c_str(), bm_tbb_pipeline)
        ->Arg(ns)
        ->UseRealTime();
  }
}

// ns per call, from the items (calls) per second a benchmark reported.
std::optional<double> ns_per_call(const ferry_bench::result_store& r, const std::string& name) {
  std::optional<double> rate = r.counter(name, "items_per_second");
  if (!rate || *rate <= 0) return std::nullopt;
  return 1e9 / *rate;
}

void print_summary(const ferry_bench::result_store& r) {
  std::ostream& os = std::cout;
  ferry_bench::goal_tally tally;
  {
    ferry_bench::ratio_table t("5-step flow of trivial steps, one loop thread", "bundle",
                               {{"ns/call", ferry_bench::better::lower, 1.0}});
    t.add_row("bundle", {ns_per_call(r, "bundle/coroutine")});
    t.add_row("direct: 5 coroutines co_awaited", {ns_per_call(r, "direct/coroutine")});
    t.add_note("bundle: seq of 5 coroutine steps over a bag; adv < 1 is the bundle's overhead");
    t.print(os);
  }
  {
    ferry_bench::ratio_table t("5-step flow of plain steps (each on a 1-thread pool)", "bundle",
                               {{"ns/call", ferry_bench::better::lower, 1.0}});
    t.add_row("bundle", {ns_per_call(r, "bundle/plain")});
    t.add_row("direct: 5 ferry::threaded calls", {ns_per_call(r, "direct/threaded")});
    t.print(os);
  }
  for (int ns : {0, 1000}) {
    const std::string n = std::to_string(ns);
    ferry_bench::ratio_table t(cat("serial -> parallel -> serial, ~", n, " ns work per stage, ",
                                   std::to_string(pipeline_threads), " threads, ",
                                   std::to_string(tokens), " tokens"),
                               "ferry", {{"Mitems/s", ferry_bench::better::higher, 1e-6}});
    t.add_row("ferry", {r.counter(cat("pipeline/ferry/", n), "items_per_second")});
    if (ns == 1000) {
      t.add_row("oneTBB parallel_pipeline", {r.counter(cat("pipeline/tbb/", n), "items_per_second")},
                ferry_bench::goal::advantage_at_least(0.95, 0, "ferry at least on par with oneTBB (>= 0.95x)"));
    } else {
      t.add_row("oneTBB parallel_pipeline", {r.counter(cat("pipeline/tbb/", n), "items_per_second")});
    }
    t.print(os, &tally);
  }
  tally.print(os);
  for (const ferry_bench::run_record* f : r.failures()) {
    os << "benchmark " << f->name << " failed: " << f->error_message << '\n';
  }
}

}  // namespace

int main(int argc, char** argv) {
  ferry_bench::command_line cmd = ferry_bench::split_quick_flag(argc, argv);
  benchmark::Initialize(&cmd.argc, cmd.argv.data());
  if (benchmark::ReportUnrecognizedArguments(cmd.argc, cmd.argv.data())) return 1;
  watchdog dog{"bench_pipeline"};
  register_all();
  {
    ferry_bench::collecting_reporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    print_summary(reporter.results());
  }
  benchmark::Shutdown();
  return 0;
}
