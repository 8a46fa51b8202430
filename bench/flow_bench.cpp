// bench_flow — what ferry::flow costs per context and per operation run, in one process:
// the calculator flow of tests/flow_operations_test.cpp (parse a line -> lhs, rhs, is_add,
// is_mult; add / mult gated by is_add / is_mult; get_single(result)) with trivial bodies,
// against the same steps written by hand as plain Asio coroutines.
//
//   F1  throughput: N contexts per orch.run() call (N = 1 and N = 64), one io_context run
//       by the benchmark thread, one orchestrator kept across calls (its implementations
//       entered once, before the timed calls). Every line is an addition, so each context
//       makes two operation runs (parse, add; mult's condition is false) and one output
//       (get_single(result)). Rows:
//         ferry, parse coroutine   every body a coroutine: nothing leaves the loop
//         ferry, parse on pool     parse a plain function, run on a ferry::thread_pool{2}
//                                  through ferry::threaded (orchestrator_options::pool):
//                                  one pool hop per context
//         asio by hand             per context asio::co_spawn of a coroutine that co_awaits
//                                  three coroutine calls: parse(line), add(lhs, rhs) (or
//                                  mult), get_single(result)
//       contexts/s, operation runs/s (parse + add bodies actually executed, counted by the
//       bodies) and ns per context, all from wall time of whole rounds (building the input
//       sets, orch.run(), reading every result, io.run() / restart()); and the loop thread's
//       CPU time per context (steadier than wall time on a busy machine). Every round's
//       results are checked (their sum, and exactly two body runs per context).
//   F2  heap allocations per context and per operation run, the same rounds: every call
//       into the heap from any thread (operator new, and malloc / calloc / realloc /
//       aligned_alloc / posix_memalign on glibc: bench/heap_counter.hpp) while a round runs,
//       after warm-up rounds.
//
// Report only: the issue sets no goals. The hand-written peer is far faster; the ratio
// says by how much (adv = ferry / peer, < 1: ferry is slower).
//
//   bench_flow            full run (about 25 s on a 2-core machine)
//   bench_flow --quick    shortened run (about 2 s)
//
// Any --benchmark_* flag works as usual (e.g. --benchmark_filter=rate/); figures filtered
// out show "-" in the summary. F1 runs for --benchmark_min_time per repetition (5
// repetitions, median, in a full run); F2 runs a fixed number of rounds (set by --quick).
//
// The machine should be otherwise idle (the pool row especially: ferry's workers spin
// before they park). Check `uptime` first.
//
// Nothing may hang the run: a watchdog thread ends the program with a message if one
// benchmark run takes longer than a generous limit.
#include "bench_report.hpp"
#include "bench_watchdog.hpp"

#include <ferry/flow/orchestrator.hpp>
#include <ferry/thread_pool.hpp>

#include <asio/awaitable.hpp>
#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "heap_counter.hpp"

namespace {

namespace fl = ferry::flow;
using steady = std::chrono::steady_clock;

// --- watchdog (bench_watchdog.hpp) -----------------------------------------------------------

// Ends the program, naming the benchmark, when one run exceeds its limit: a context that
// never completes must not hang the tour. Sleeps on a condition variable until the armed
// deadline, so it adds no wake-ups.
using ferry_bench::guarded_run;
using ferry_bench::watchdog;

std::string describe(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
    return "unknown exception";
  }
}

// --- the calculator's bodies, shared by ferry and the peer ------------------------------------

// Operation runs actually executed (parse, add and mult bodies), from any thread.
std::atomic<std::uint64_t> g_runs{0};

void count_run() noexcept { g_runs.fetch_add(1, std::memory_order_relaxed); }

// parse's outputs, one member per output port (lhs, rhs, is_add, is_mult).
struct parsed {
  int lhs = 0;
  int rhs = 0;
  bool is_add = false;
  bool is_mult = false;
};

// "a + b" / "a * b", without allocating (a trivial body: the flow's cost is what is measured).
parsed parse_line(std::string_view s) noexcept {
  parsed p;
  const char* q = s.data();
  const char* const end = q + s.size();
  q = std::from_chars(q, end, p.lhs).ptr;
  while (q != end && *q == ' ') ++q;
  const char op = q != end ? *q++ : '\0';
  while (q != end && *q == ' ') ++q;
  std::from_chars(q, end, p.rhs);
  p.is_add = op == '+';
  p.is_mult = op == '*';
  return p;
}

enum class parse_kind { coroutine, plain };

// The calculator flow of tests/flow_operations_test.cpp with trivial bodies.
struct calc_flow {
  fl::definition<std::string> line{"line"};
  fl::definition<int> lhs{"lhs"}, rhs{"rhs"}, result{"result"};
  fl::definition<bool> is_add{"is_add"}, is_mult{"is_mult"};
  fl::operation parse;
  fl::operation add = fl::make_operation("add")
                          .inputs(lhs, rhs)
                          .outputs(result)
                          .conditions(is_add)
                          .implement([](int a, int b) -> asio::awaitable<int> {
                            count_run();
                            co_return a + b;
                          });
  fl::operation mult = fl::make_operation("mult")
                           .inputs(lhs, rhs)
                           .outputs(result)
                           .conditions(is_mult)
                           .implement([](int a, int b) -> asio::awaitable<int> {
                             count_run();
                             co_return a * b;
                           });
  fl::output<int> sum = fl::get_single(result);
  fl::dataflow flow;

  explicit calc_flow(parse_kind kind)
      : parse(make_parse(kind)), flow({parse, add, mult}, {sum}, {.seeds = {line}}) {}

private:
  fl::operation make_parse(parse_kind kind) const {
    auto b = fl::make_operation("parse").inputs(line).outputs(lhs, rhs, is_add, is_mult);
    if (kind == parse_kind::coroutine) {
      return std::move(b).implement([](const std::string& s) -> asio::awaitable<parsed> {
        count_run();
        co_return parse_line(s);
      });
    }
    return std::move(b).implement([](const std::string& s) {
      count_run();
      return parse_line(s);
    });
  }
};

// The input lines: 64 different additions, and what each one sums to.
struct line_table {
  std::vector<std::string> text;
  std::vector<int> value;

  line_table() {
    for (int i = 0; i < 64; ++i) {
      const int a = i * 37 % 1000;
      const int b = (i * 11 + 5) % 100;
      text.push_back(std::to_string(a) + " + " + std::to_string(b));
      value.push_back(a + b);
    }
  }
  std::size_t size() const noexcept { return text.size(); }
  const std::string& at(std::size_t k) const { return text[k % text.size()]; }
  // The sum of contexts 0..count-1 (context k reads line k mod size).
  long long expected(std::uint64_t count) const {
    long long s = 0;
    for (std::uint64_t k = 0; k < count; ++k) s += value[static_cast<std::size_t>(k % value.size())];
    return s;
  }
};

// What the rounds of one benchmark run saw.
struct tally {
  std::uint64_t contexts = 0;  // contexts that completed with a result
  long long sum = 0;           // of their results
  std::size_t failures = 0;    // failed contexts or tasks
  std::string first_error;

  void fail(std::string what) {
    if (++failures == 1) first_error = std::move(what);
  }
};

// co_spawn's completion handler: records a task's exception.
struct failure_sink {
  tally* t;
  void operator()(std::exception_ptr e) const {
    if (e) t->fail(describe(e));
  }
};

// --- runners: one round = N contexts, the io_context run until they are all done ------------

class runner {
public:
  virtual ~runner() = default;
  // Contexts first .. first+n-1 (context k reads line k mod 64), the loop run until done.
  virtual void round(std::size_t first, std::size_t n) = 0;
  // Closes what the rounds used (ferry: the orchestrator and its scope); failures go to seen().
  virtual void finish() {}
  tally& seen() noexcept { return tally_; }

protected:
  tally tally_;
};

// ferry: one orchestrator, one orch.run() call per round.
asio::awaitable<void> flow_round(fl::orchestrator& orch, const calc_flow& c, const line_table& lines,
                                 std::size_t first, std::size_t n, tally& t) {
  std::vector<fl::input_set> sets;
  sets.reserve(n);
  for (std::size_t i = 0; i < n; ++i) sets.push_back(fl::input_set{fl::seed(c.line, lines.at(first + i))});
  auto op = orch.run(c.flow, std::move(sets));
  std::vector<fl::context_result> done = co_await std::move(op);
  for (const fl::context_result& r : done) {
    if (!r.ok()) {
      t.fail("context '" + r.name + "' failed: " + describe(r.error));
      continue;
    }
    t.sum += r.results[c.sum];
    ++t.contexts;
  }
}

asio::awaitable<void> flow_close(fl::orchestrator& orch, fl::context& scope) {
  auto cl = orch.close();
  co_await std::move(cl);
  auto sc = scope.close();
  co_await std::move(sc);
}

class flow_runner final : public runner {
public:
  explicit flow_runner(parse_kind kind)
      : pool_(kind == parse_kind::plain ? std::make_unique<ferry::thread_pool>(2) : nullptr),
        calc_(kind),
        orch_(scope_, {.pool = pool_.get()}) {}

  ~flow_runner() override { finish(); }
  flow_runner(const flow_runner&) = delete;
  flow_runner& operator=(const flow_runner&) = delete;

  void round(std::size_t first, std::size_t n) override {
    asio::co_spawn(io_, flow_round(orch_, calc_, lines_, first, n, tally_), failure_sink{&tally_});
    io_.run();
    io_.restart();
  }

  void finish() override {
    if (closed_) return;
    closed_ = true;
    asio::co_spawn(io_, flow_close(orch_, scope_), failure_sink{&tally_});
    io_.run();
    io_.restart();
  }

private:
  bool closed_ = false;
  std::unique_ptr<ferry::thread_pool> pool_;  // first: the loop and the flow go before it
  asio::io_context io_;
  line_table lines_;
  calc_flow calc_;
  fl::context scope_{io_};
  fl::orchestrator orch_;
};

// The peer: the same three steps by hand, one co_spawn'ed coroutine per context.
asio::awaitable<parsed> peer_parse(const std::string& s) {
  count_run();
  co_return parse_line(s);
}
asio::awaitable<int> peer_add(int a, int b) {
  count_run();
  co_return a + b;
}
asio::awaitable<int> peer_mult(int a, int b) {
  count_run();
  co_return a * b;
}
asio::awaitable<int> peer_get_single(std::optional<int> r) {
  if (!r) throw std::runtime_error("get_single(result): no value");
  co_return *r;
}

// One context: its own copy of the line (as a seed is), three awaited coroutine calls.
asio::awaitable<void> peer_context(std::string line, tally& t) {
  auto p_op = peer_parse(line);
  const parsed p = co_await std::move(p_op);
  std::optional<int> result;
  if (p.is_add) {
    auto a_op = peer_add(p.lhs, p.rhs);
    result = co_await std::move(a_op);
  } else if (p.is_mult) {
    auto m_op = peer_mult(p.lhs, p.rhs);
    result = co_await std::move(m_op);
  }
  auto g_op = peer_get_single(result);
  const int v = co_await std::move(g_op);
  t.sum += v;
  ++t.contexts;
}

class peer_runner final : public runner {
public:
  void round(std::size_t first, std::size_t n) override {
    for (std::size_t i = 0; i < n; ++i) {
      asio::co_spawn(io_, peer_context(lines_.at(first + i), tally_), failure_sink{&tally_});
    }
    io_.run();
    io_.restart();
  }

private:
  asio::io_context io_;
  line_table lines_;
};

enum class mode { ferry_coroutine, ferry_pool, asio_by_hand };

std::unique_ptr<runner> make_runner(mode m) {
  switch (m) {
    case mode::ferry_coroutine: return std::make_unique<flow_runner>(parse_kind::coroutine);
    case mode::ferry_pool: return std::make_unique<flow_runner>(parse_kind::plain);
    case mode::asio_by_hand: return std::make_unique<peer_runner>();
  }
  return nullptr;
}

// Checks what the rounds produced: every context's result, every body run exactly once.
// Returns an error message, empty when all is well.
std::string check(const tally& t, std::uint64_t contexts, std::uint64_t runs) {
  if (t.failures != 0) {
    return std::to_string(t.failures) + " failure(s), the first: " + t.first_error;
  }
  if (t.contexts != contexts) {
    return std::to_string(t.contexts) + " contexts gave a result, " + std::to_string(contexts) +
           " expected";
  }
  static const line_table lines;
  if (t.sum != lines.expected(contexts)) return "wrong results (their sum does not match)";
  if (runs != 2 * contexts) {
    return std::to_string(runs) + " operation runs for " + std::to_string(contexts) +
           " contexts (2 per context expected)";
  }
  return {};
}

// --- configuration ----------------------------------------------------------------------------

struct config {
  bool quick = false;
  std::vector<std::size_t> batch{1, 64};  // contexts per orch.run() call
  std::size_t warmup_rounds = 20;
  benchmark::IterationCount alloc_rounds_1 = 2000;  // F2 counted rounds at N = 1
  benchmark::IterationCount alloc_rounds_64 = 100;  // ... at N = 64
  int repetitions = 5;                              // F1, summarised by the median
};

// --- F1: throughput ---------------------------------------------------------------------------

void bm_rate(benchmark::State& state, const std::string& name, mode m, std::size_t n,
             std::size_t warmup_rounds) {
  guarded_run guard(name);
  std::unique_ptr<runner> r = make_runner(m);
  std::size_t first = 0;
  for (std::size_t i = 0; i < warmup_rounds; ++i) {  // implementations entered, caches primed
    r->round(first, n);
    first += n;
  }
  r->seen() = tally{};
  first = 0;
  const std::uint64_t runs_before = g_runs.load(std::memory_order_relaxed);
  for (auto _ : state) {
    r->round(first, n);
    first += n;
  }
  const std::uint64_t runs = g_runs.load(std::memory_order_relaxed) - runs_before;
  const std::uint64_t contexts = static_cast<std::uint64_t>(state.iterations()) * n;
  r->finish();
  const std::string bad = check(r->seen(), contexts, runs);
  r.reset();
  if (!bad.empty()) {
    state.SkipWithError(bad.c_str());
    return;
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(contexts));
  state.counters["runs_per_second"] =
      benchmark::Counter(static_cast<double>(runs), benchmark::Counter::kIsRate);
  state.counters["contexts_per_round"] = static_cast<double>(n);
}

// --- F2: heap allocations ---------------------------------------------------------------------

struct heap_count {
  std::uint64_t heap = 0;  // every heap entry point
  std::uint64_t news = 0;  // of which operator new
};

heap_count read_counts() noexcept {
  return {heap_allocations(), g_new_calls.load(std::memory_order_relaxed)};
}

void bm_alloc(benchmark::State& state, const std::string& name, mode m, std::size_t n,
              std::size_t warmup_rounds) {
  guarded_run guard(name);
  std::unique_ptr<runner> r = make_runner(m);
  std::size_t first = 0;
  for (std::size_t i = 0; i < warmup_rounds; ++i) {
    r->round(first, n);
    first += n;
  }
  r->seen() = tally{};
  first = 0;
  heap_count total{};
  std::uint64_t runs = 0;
  for (auto _ : state) {
    const std::uint64_t runs_before = g_runs.load(std::memory_order_relaxed);
    const heap_count before = read_counts();
    g_count_allocations.store(true, std::memory_order_seq_cst);
    r->round(first, n);
    g_count_allocations.store(false, std::memory_order_seq_cst);
    const heap_count after = read_counts();
    runs += g_runs.load(std::memory_order_relaxed) - runs_before;
    total.heap += after.heap - before.heap;
    total.news += after.news - before.news;
    first += n;
  }
  const std::uint64_t contexts = static_cast<std::uint64_t>(state.iterations()) * n;
  r->finish();
  const std::string bad = check(r->seen(), contexts, runs);
  r.reset();
  if (!bad.empty()) {
    state.SkipWithError(bad.c_str());
    return;
  }
  const double per_context = contexts != 0 ? 1.0 / static_cast<double>(contexts) : 0.0;
  const double per_run = runs != 0 ? 1.0 / static_cast<double>(runs) : 0.0;
  state.counters["allocs_per_context"] = static_cast<double>(total.heap) * per_context;
  state.counters["new_per_context"] = static_cast<double>(total.news) * per_context;
  state.counters["allocs_per_run"] = static_cast<double>(total.heap) * per_run;
  state.counters["new_per_run"] = static_cast<double>(total.news) * per_run;
}

// --- names and registration -------------------------------------------------------------------

struct mode_info {
  mode m;
  std::string key;
  std::string label;
};

const std::vector<mode_info>& modes() {
  static const std::vector<mode_info> v{
      {mode::ferry_coroutine, "ferry_coro", "ferry flow, parse coroutine"},
      {mode::ferry_pool, "ferry_pool", "ferry flow, parse on thread_pool{2}"},
      {mode::asio_by_hand, "asio", "asio by hand: co_spawn + 3 co_awaits"},
  };
  return v;
}

std::string rate_name(const mode_info& mi, std::size_t n) {
  return "rate/" + mi.key + "/N" + std::to_string(n);
}
std::string alloc_name(const mode_info& mi, std::size_t n) {
  return "alloc/" + mi.key + "/N" + std::to_string(n);
}

void register_all(const config& cfg) {
  for (std::size_t n : cfg.batch) {
    for (const mode_info& mi : modes()) {
      const std::string name = rate_name(mi, n);
      const mode m = mi.m;
      const std::size_t warmup = cfg.warmup_rounds;
      auto* b = benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) {
                  bm_rate(st, name, m, n, warmup);
                })
                    ->UseRealTime()
                    ->Unit(benchmark::kMicrosecond);
      if (cfg.repetitions > 1) b->Repetitions(cfg.repetitions)->DisplayAggregatesOnly(true);
    }
  }
  for (std::size_t n : cfg.batch) {
    for (const mode_info& mi : modes()) {
      const std::string name = alloc_name(mi, n);
      const mode m = mi.m;
      const std::size_t warmup = cfg.warmup_rounds;
      benchmark::RegisterBenchmark(name.c_str(),
                                   [=](benchmark::State& st) { bm_alloc(st, name, m, n, warmup); })
          ->Iterations(n == 1 ? cfg.alloc_rounds_1 : cfg.alloc_rounds_64)
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond);
    }
  }
}

// --- the summary ----------------------------------------------------------------------------

// "0.05 (ferry takes 20.0x the peer's time per context)"
std::string ferry_ratio_text(double ferry_rate, double peer_rate) {
  const double ratio = ferry_rate / peer_rate;
  return ferry_bench::format_fixed(ratio, 3) + " (ferry takes " +
         ferry_bench::format_fixed(peer_rate / ferry_rate, 1) + "x the peer's time per context)";
}

void print_summary(const ferry_bench::result_store& r, const config& cfg) {
  using ferry_bench::better;
  using ferry_bench::column_spec;
  using ferry_bench::ratio_table;
  std::ostream& os = std::cout;

  os << "\n==================== summary: ferry::flow against the same steps by hand "
        "====================\n";
  os << "(report only: no goals; " << (cfg.quick ? "--quick run: short timings, expect noise"
                                                 : "full run: F1 figures are medians of " +
                                                       std::to_string(cfg.repetitions) +
                                                       " repetitions")
     << "; one io_context run by the benchmark thread)\n";

  const mode_info& base = modes().front();
  const mode_info& peer = modes().back();
  for (std::size_t n : cfg.batch) {
    ratio_table t("F1 calculator flow (parse -> add -> get_single), " + std::to_string(n) +
                      " context" + (n == 1 ? "" : "s") + " per orch.run() call, trivial bodies",
                  base.label,
                  {column_spec{"kcontexts/s", better::higher, 1e-3, 1},
                   column_spec{"kruns/s", better::higher, 1e-3, 1, false},
                   column_spec{"ns/context", better::lower, 1.0, 0, false},
                   column_spec{"loop CPU ns/context", better::lower, 1.0, 0, false}});
    t.add_note("operation runs: parse + add bodies executed (2 per context); wall time of "
               "whole rounds");
    t.add_note("asio row: the same bodies as coroutines, one asio::co_spawn per context, "
               "no flow machinery");
    t.add_note("loop CPU: CPU time of the benchmark thread (the loop) per context; less "
               "sensitive to a busy machine");
    t.add_note("than wall time, and without the pool workers' time in the pool row");
    for (const mode_info& mi : modes()) {
      const std::string name = rate_name(mi, n);
      std::optional<double> ns_per_context;
      std::optional<double> cpu_per_context;
      if (const ferry_bench::run_record* rec = r.find(name)) {
        ns_per_context = rec->real_ns / static_cast<double>(n);
        cpu_per_context = rec->cpu_ns / static_cast<double>(n);
      }
      t.add_row(mi.label, {r.items_per_second(name), r.counter(name, "runs_per_second"),
                           ns_per_context, cpu_per_context});
    }
    t.print(os);
    const auto ferry_rate = r.items_per_second(rate_name(base, n));
    const auto peer_rate = r.items_per_second(rate_name(peer, n));
    if (ferry_rate && peer_rate && *ferry_rate > 0) {
      os << "  ferry/peer (contexts/s): " << ferry_ratio_text(*ferry_rate, *peer_rate) << '\n';
    }
    const auto pool_ns = r.real_ns(rate_name(modes()[1], n));
    const auto coro_ns = r.real_ns(rate_name(base, n));
    if (pool_ns && coro_ns) {
      const double d = (*pool_ns - *coro_ns) / static_cast<double>(n);
      os << "  pool hop: parse on the pool minus parse as a coroutine: "
         << (d >= 0 ? "+" : "") << ferry_bench::format_fixed(d, 0)
         << " ns per context (wall time)\n";
    }
  }

  {
    ratio_table t("F2 heap allocations per context and per operation run (every thread, "
                      "operator new and the C heap)",
                  base.label + ", N=1",
                  {column_spec{"allocs/context", better::lower, 1.0, 1, false},
                   column_spec{"new/context", better::lower, 1.0, 1, false},
                   column_spec{"allocs/run", better::lower, 1.0, 1, false},
                   column_spec{"new/run", better::lower, 1.0, 1, false}});
    t.add_note("counted over whole rounds after " + std::to_string(cfg.warmup_rounds) +
               " warm-up rounds: " + std::to_string(cfg.alloc_rounds_1) +
               " rounds at N=1, " + std::to_string(cfg.alloc_rounds_64) + " at N=64");
    t.add_note("a round: building the input sets, orch.run(), reading the results (peer: "
               "N co_spawns)");
    t.add_note("allocs: every heap entry point; new: of which through operator new");
    for (std::size_t n : cfg.batch) {
      for (const mode_info& mi : modes()) {
        const std::string name = alloc_name(mi, n);
        t.add_row(mi.label + ", N=" + std::to_string(n),
                  {r.counter(name, "allocs_per_context"), r.counter(name, "new_per_context"),
                   r.counter(name, "allocs_per_run"), r.counter(name, "new_per_run")});
      }
    }
    t.print(os);
  }

  os << "\nreport only: the issue sets no goals\n";
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
    cfg.warmup_rounds = 10;
    cfg.alloc_rounds_1 = 200;
    cfg.alloc_rounds_64 = 10;
    cfg.repetitions = 1;
  }
  benchmark::Initialize(&cmd.argc, cmd.argv.data());
  if (benchmark::ReportUnrecognizedArguments(cmd.argc, cmd.argv.data())) return 1;

  watchdog dog{"bench_flow"};
  register_all(cfg);
  {
    ferry_bench::collecting_reporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    print_summary(reporter.results(), cfg);
  }
  benchmark::Shutdown();
  return 0;
}
