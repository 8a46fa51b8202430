// bench_processor — messages per second through source -> processor -> output
// (ferry/flow/processor.hpp), in-process, one loop thread, with each message handler:
//
//  * inline: emit runs the processor's coroutine handler, which emits to the output's plain
//    handler, before the source goes on (the seed's SyncProtocol);
//  * queued: every emit enqueues (capacity 1024 per topic) and per-topic consumers on the
//    handler's strand deliver (the seed's AsyncProtocol);
//  * peers: the same two hops as direct calls (the floor: no ports at all), and as two
//    asio::experimental::channel<void(error_code, int)> of capacity 1024 with a consumer
//    coroutine each (what one would write with plain Asio for a queued hand-off).
//
//     ./build/release/bench/bench_processor            # full run, then the ratio tables
//     ./build/release/bench/bench_processor --quick    # short timings (noisy)
#include "bench_report.hpp"
#include "bench_watchdog.hpp"

#include <ferry/flow/processor.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/channel.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>

#include <cstdint>
#include <iostream>
#include <optional>
#include <string>

namespace fl = ferry::flow;
using ferry_bench::guarded_run;
using ferry_bench::watchdog;

namespace {

constexpr int messages_per_round = 10000;

struct source_proc : fl::processor {
  using fl::processor::processor;
  fl::event<int> value{*this, "value"};
};

struct doubler : fl::processor {
  using fl::processor::processor;
  fl::event<int> out{*this, "out"};
  asio::awaitable<void> handle(int v) {
    auto op = emit(out, 2 * v);
    co_await std::move(op);
  }
};

// source -> doubler -> sum, through `h`; `finish` waits until everything was delivered.
template <class Handler>
void run_ports(benchmark::State& state, asio::io_context& io, Handler& h) {
  source_proc src{h, "src"};
  doubler dbl{h, "dbl"};
  std::int64_t sum = 0;
  fl::on(src.value, [&dbl](int v) { return dbl.handle(v); });
  fl::on(dbl.out, [&sum](int v) { sum += v; });
  auto round = [&]() -> asio::awaitable<void> {
    for (int i = 0; i < messages_per_round; ++i) {
      auto op = fl::emit(src.value, i);
      co_await std::move(op);
    }
    auto d = h.drain();
    co_await std::move(d);
  };
  for (auto _ : state) {
    asio::co_spawn(io, round(), asio::detached);
    io.run();
    io.restart();
  }
  const std::int64_t per_round = std::int64_t{messages_per_round} * (messages_per_round - 1);
  if (sum != per_round * static_cast<std::int64_t>(state.iterations())) {
    state.SkipWithError("lost or duplicated messages");
  }
  state.SetItemsProcessed(state.iterations() * messages_per_round);
}

void bm_inline(benchmark::State& state) {
  guarded_run guard("processor/inline");
  asio::io_context io;
  fl::inline_handler h;
  run_ports(state, io, h);
}

void bm_queued(benchmark::State& state) {
  guarded_run guard("processor/queued");
  asio::io_context io;
  fl::queued_handler h{io, {.capacity = 1024}};
  run_ports(state, io, h);
}

asio::awaitable<void> doubled(int v, std::int64_t& sum) {
  sum += 2 * v;
  co_return;
}

void bm_direct(benchmark::State& state) {
  guarded_run guard("direct");
  asio::io_context io;
  std::int64_t sum = 0;
  auto round = [&]() -> asio::awaitable<void> {
    for (int i = 0; i < messages_per_round; ++i) {
      auto op = doubled(i, sum);
      co_await std::move(op);
    }
  };
  for (auto _ : state) {
    asio::co_spawn(io, round(), asio::detached);
    io.run();
    io.restart();
  }
  benchmark::DoNotOptimize(sum);
  state.SetItemsProcessed(state.iterations() * messages_per_round);
}

using int_channel = asio::experimental::channel<void(std::error_code, int)>;

void bm_asio_channels(benchmark::State& state) {
  guarded_run guard("asio_channels");
  asio::io_context io;
  std::int64_t sum = 0;
  int_channel a(io, 1024), b(io, 1024);
  // Producer and middle stage are spawned; the round itself is the last stage, so it ends
  // only after every message went through both channels.
  auto producer = [&]() -> asio::awaitable<void> {
    for (int i = 0; i < messages_per_round; ++i) {
      auto s = a.async_send(std::error_code{}, i, asio::use_awaitable);
      co_await std::move(s);
    }
  };
  auto middle = [&]() -> asio::awaitable<void> {
    for (int i = 0; i < messages_per_round; ++i) {
      auto r = a.async_receive(asio::use_awaitable);
      const int v = co_await std::move(r);
      auto s = b.async_send(std::error_code{}, 2 * v, asio::use_awaitable);
      co_await std::move(s);
    }
  };
  auto round = [&]() -> asio::awaitable<void> {
    asio::co_spawn(io, producer(), asio::detached);
    asio::co_spawn(io, middle(), asio::detached);
    for (int i = 0; i < messages_per_round; ++i) {
      auto r = b.async_receive(asio::use_awaitable);
      sum += co_await std::move(r);
    }
  };
  for (auto _ : state) {
    asio::co_spawn(io, round(), asio::detached);
    io.run();
    io.restart();
  }
  const std::int64_t per_round = std::int64_t{messages_per_round} * (messages_per_round - 1);
  if (sum != per_round * static_cast<std::int64_t>(state.iterations())) {
    state.SkipWithError("lost or duplicated messages");
  }
  state.SetItemsProcessed(state.iterations() * messages_per_round);
}

void print_summary(const ferry_bench::result_store& r) {
  std::ostream& os = std::cout;
  ferry_bench::goal_tally tally;
  {
    ferry_bench::ratio_table t("source -> processor -> output, 1 loop thread, queued (capacity 1024)",
                               "queued", {{"Mmsg/s", ferry_bench::better::higher, 1e-6}});
    t.add_row("queued", {r.items_per_second("processor/queued")});
    t.add_row("asio: 2 experimental::channel + 2 consumer coroutines", {r.items_per_second("asio_channels")},
              ferry_bench::goal::advantage_at_least(0.8, 0, "queued handler at least 0.8x plain Asio channels"));
    t.add_note("both hand every message over twice through a bounded queue; ferry also fans out");
    t.add_note("to every subscriber and acknowledges after delivery");
    t.print(os, &tally);
  }
  {
    ferry_bench::ratio_table t("source -> processor -> output, 1 loop thread, inline", "inline",
                               {{"Mmsg/s", ferry_bench::better::higher, 1e-6}});
    t.add_row("inline", {r.items_per_second("processor/inline")});
    t.add_row("queued", {r.items_per_second("processor/queued")});
    t.add_row("direct: the two handlers called as coroutines", {r.items_per_second("direct")});
    t.add_note("direct is the floor (no ports, no payload): adv < 1 is what ports cost");
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
  watchdog dog{"bench_processor"};
  benchmark::RegisterBenchmark("processor/inline", bm_inline)->UseRealTime();
  benchmark::RegisterBenchmark("processor/queued", bm_queued)->UseRealTime();
  benchmark::RegisterBenchmark("direct", bm_direct)->UseRealTime();
  benchmark::RegisterBenchmark("asio_channels", bm_asio_channels)->UseRealTime();
  {
    ferry_bench::collecting_reporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    print_summary(reporter.results());
  }
  benchmark::Shutdown();
  return 0;
}
