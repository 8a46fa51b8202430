#define BOOST_TEST_MODULE ferry_flow_pipeline
#include "coro_test_support.hpp"

#include <ferry/flow/pipeline.hpp>
#include <ferry/from_thread_channel.hpp>
#include <ferry/thread_pool.hpp>
#include <ferry/threaded_iterable.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

// House rules (g++ 12): an awaited call never has a temporary with a destructor among its
// arguments (build the awaitable in its own statement, then `co_await std::move(op)`), and
// every coroutine lambda is a named variable that outlives the coroutines it starts.

using namespace std::chrono_literals;
namespace fl = ferry::flow;
using ferry_test::code_of;
using ferry_test::message_of;

namespace {

// Tracks how many callers are inside a region at once, and the most ever seen.
struct occupancy {
  std::atomic<int> now{0};
  std::atomic<int> peak{0};
  void enter() {
    const int n = ++now;
    int p = peak.load();
    while (n > p && !peak.compare_exchange_weak(p, n)) {
    }
  }
  void leave() { --now; }
};

std::vector<int> iota_vector(int n) {
  std::vector<int> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  return v;
}

void spin_for(std::chrono::microseconds us) {
  const auto until = std::chrono::steady_clock::now() + us;
  while (std::chrono::steady_clock::now() < until) {
  }
}

template <class T>
T run_awaitable(asio::io_context& io, asio::awaitable<T> aw) {
  std::shared_future<T> f = asio::co_spawn(io, std::move(aw), asio::use_future).share();
  io.run();
  io.restart();
  return f.get();
}

}  // namespace

FERRY_TEST_CASE(f11_serial_parallel_serial_over_a_range_delivers_every_item_in_order) {
  asio::io_context io;
  ferry::thread_pool pool{4};
  std::vector<int> sink;
  occupancy first_stage, last_stage;
  auto p = fl::make_pipeline(fl::serial_in_order([&](int v) {
                               first_stage.enter();
                               first_stage.leave();
                               return v * 2;
                             }),
                             fl::parallel([](int v) { return std::to_string(v); }),
                             fl::serial_in_order([&](std::string s) {
                               last_stage.enter();
                               sink.push_back(std::stoi(s));
                               last_stage.leave();
                             }));
  const std::vector<int> input = iota_vector(5000);
  auto op = p.run(pool, input, {.max_in_flight = 16});
  fl::pipeline_stats st = run_awaitable(io, std::move(op));
  BOOST_TEST(st.items == 5000u);
  BOOST_TEST(st.discarded == 0u);
  BOOST_REQUIRE(sink.size() == 5000u);
  for (std::size_t i = 0; i < sink.size(); ++i) BOOST_TEST_REQUIRE(sink[i] == static_cast<int>(2 * i));
  BOOST_TEST(first_stage.peak.load() == 1);
  BOOST_TEST(last_stage.peak.load() == 1);
  BOOST_TEST(st.peak_in_flight <= 16u);
}

FERRY_TEST_CASE(f11_items_in_flight_never_exceed_the_bound_and_reach_it) {
  asio::io_context io;
  ferry::thread_pool pool{4};
  occupancy in_flight, parallel_stage;
  auto p = fl::make_pipeline(fl::serial_in_order([&](int v) {
                               in_flight.enter();
                               return v;
                             }),
                             fl::parallel([&](int v) {
                               parallel_stage.enter();
                               std::this_thread::sleep_for(2ms);
                               parallel_stage.leave();
                               return v;
                             }),
                             fl::serial_in_order([&](int) { in_flight.leave(); }));
  auto op = p.run(pool, iota_vector(300), {.max_in_flight = 3});
  fl::pipeline_stats st = run_awaitable(io, std::move(op));
  BOOST_TEST(st.items == 300u);
  BOOST_TEST(in_flight.peak.load() <= 3);
  BOOST_TEST(st.peak_in_flight == 3u);       // the bound is reached: items overlap
  BOOST_TEST(parallel_stage.peak.load() >= 2);  // and the parallel stage runs them at once
}

FERRY_TEST_CASE(f11_ordered_collect_keeps_source_order_and_unordered_keeps_every_item) {
  asio::io_context io;
  ferry::thread_pool pool{4};
  auto jitter = [](int v) {
    // Later items often finish first.
    std::this_thread::sleep_for(std::chrono::microseconds((v * 7919) % 500));
    return v;
  };
  auto p = fl::make_pipeline(fl::parallel(jitter), fl::parallel([](int v) { return v + 1; }));
  auto ordered = p.collect(pool, iota_vector(400), {.max_in_flight = 16});
  std::vector<int> in_order = run_awaitable(io, std::move(ordered));
  std::vector<int> expected = iota_vector(400);
  for (auto& v : expected) ++v;
  BOOST_TEST(in_order == expected);

  auto unordered = p.collect(pool, iota_vector(400), {.max_in_flight = 16, .ordered = false});
  std::vector<int> any_order = run_awaitable(io, std::move(unordered));
  BOOST_TEST(any_order.size() == 400u);
  std::vector<int> sorted = any_order;
  std::sort(sorted.begin(), sorted.end());
  BOOST_TEST(sorted == expected);
}

FERRY_TEST_CASE(f11_serial_out_of_order_runs_one_at_a_time) {
  asio::io_context io;
  ferry::thread_pool pool{4};
  occupancy serial;
  std::atomic<int> seen{0};
  auto p = fl::make_pipeline(fl::parallel([](int v) {
                               spin_for(std::chrono::microseconds(v % 50));
                               return v;
                             }),
                             fl::serial_out_of_order([&](int) {
                               serial.enter();
                               ++seen;
                               serial.leave();
                             }));
  auto op = p.run(pool, iota_vector(2000), {.max_in_flight = 8});
  BOOST_TEST(run_awaitable(io, std::move(op)).items == 2000u);
  BOOST_TEST(seen.load() == 2000);
  BOOST_TEST(serial.peak.load() == 1);
}

FERRY_TEST_CASE(f11_a_failing_stage_stops_the_source_and_delivers_the_exception) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  std::atomic<int> pulled{0}, consumed{0};
  auto source = iota_vector(100000);
  auto counting = source;  // the range itself is read lazily: count reads in stage one
  auto p = fl::make_pipeline(fl::serial_in_order([&](int v) {
                               ++pulled;
                               return v;
                             }),
                             fl::parallel([](int v) {
                               if (v == 50) throw std::runtime_error("item 50 is bad");
                               return v;
                             }),
                             fl::serial_in_order([&](int) { ++consumed; }));
  std::exception_ptr failure;
  fl::pipeline_stats stats;
  p.run(pool, counting, {.max_in_flight = 8},
        asio::bind_executor(io, [&](std::exception_ptr e, fl::pipeline_stats s) {
          failure = e;
          stats = s;
        }));
  io.run();
  BOOST_REQUIRE(failure);
  BOOST_TEST(message_of(failure) == "item 50 is bad");
  BOOST_TEST(pulled.load() < 1000);  // the source stopped early
  BOOST_TEST(consumed.load() <= 50);
  // Every item that entered is accounted for: finished or discarded (the failing one too).
  BOOST_TEST(stats.items + stats.discarded == static_cast<std::uint64_t>(pulled.load()));
}

FERRY_TEST_CASE(f11_cancelling_a_run_ends_it_with_operation_aborted) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  std::atomic<int> consumed{0};
  auto p = fl::make_pipeline(fl::parallel([](int v) {
                               std::this_thread::sleep_for(1ms);
                               return v;
                             }),
                             fl::serial_in_order([&](int) { ++consumed; }));
  asio::cancellation_signal cancel;
  std::exception_ptr failure;
  bool done = false;
  p.run(pool, iota_vector(1000000), {.max_in_flight = 4},
        asio::bind_cancellation_slot(cancel.slot(),
                                     asio::bind_executor(io, [&](std::exception_ptr e, fl::pipeline_stats) {
                                       failure = e;
                                       done = true;
                                     })));
  asio::steady_timer t(io, 30ms);
  t.async_wait([&](std::error_code) { cancel.emit(asio::cancellation_type::terminal); });
  io.run();
  BOOST_TEST(done);
  BOOST_TEST(code_of(failure) == asio::error::operation_aborted);
  BOOST_TEST(consumed.load() < 1000000);
}

FERRY_TEST_CASE(f11_a_threaded_iterator_feeds_the_pipeline) {
  asio::io_context io;
  ferry::thread_pool pool{3};
  auto numbers = ferry::threaded_iterable(
      [](ferry::sink<int>& out) {
        for (int i = 0; i < 3000; ++i) {
          if (!out(i)) return;
        }
      },
      {.max_size = 64});
  std::vector<int> sink;
  auto p = fl::make_pipeline(fl::parallel([](int v) { return v * 3; }),
                             fl::serial_in_order([&](int v) { sink.push_back(v); }));
  auto body = [&]() -> asio::awaitable<fl::pipeline_stats> {
    auto it = numbers();
    auto op = p.run(pool, it, {.max_in_flight = 8});
    co_return co_await std::move(op);
  };
  fl::pipeline_stats st = run_awaitable(io, body());
  BOOST_TEST(st.items == 3000u);
  BOOST_REQUIRE(sink.size() == 3000u);
  for (std::size_t i = 0; i < sink.size(); ++i) BOOST_TEST_REQUIRE(sink[i] == static_cast<int>(3 * i));
}

FERRY_TEST_CASE(f11_a_threaded_iterators_error_is_delivered) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  auto numbers = ferry::threaded_iterable([](ferry::sink<int>& out) {
    for (int i = 0; i < 10; ++i) out(i);
    throw std::runtime_error("producer broke");
  });
  std::atomic<int> consumed{0};
  auto p = fl::make_pipeline(fl::serial_in_order([&](int) { ++consumed; }));
  auto body = [&]() -> asio::awaitable<std::string> {
    auto it = numbers();
    try {
      auto op = p.run(pool, it);
      (void)co_await std::move(op);
    } catch (const std::runtime_error& e) {
      co_return e.what();
    }
    co_return "no error";
  };
  BOOST_TEST(run_awaitable(io, body()) == "producer broke");
  BOOST_TEST(consumed.load() <= 10);
}

FERRY_TEST_CASE(f11_a_from_thread_channel_feeds_the_pipeline_until_closed) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  ferry::from_thread_channel<int> ch{io.get_executor(), 8};
  std::thread producer([&] {
    for (int i = 0; i < 1000; ++i) ch.put(i);
    ch.close();
  });
  auto p = fl::make_pipeline(fl::parallel([](int v) { return v + 1; }));
  auto op = p.collect(pool, ch, {.max_in_flight = 4});
  std::vector<int> out = run_awaitable(io, std::move(op));
  producer.join();
  std::vector<int> expected = iota_vector(1000);
  for (auto& v : expected) ++v;
  BOOST_TEST(out == expected);
}

FERRY_TEST_CASE(f11_default_pool_and_bound_from_the_pool_size) {
  asio::io_context io;
  std::atomic<int> seen{0};
  auto p = fl::make_pipeline(fl::serial_in_order([&](int) { ++seen; }));
  auto op = p.run(iota_vector(100));
  fl::pipeline_stats st = run_awaitable(io, std::move(op));
  BOOST_TEST(st.items == 100u);
  BOOST_TEST(seen.load() == 100);
}

FERRY_TEST_CASE(f11_an_empty_source_completes_at_once) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  auto p = fl::make_pipeline(fl::parallel([](int v) { return v; }));
  auto op = p.collect(pool, std::vector<int>{});
  BOOST_TEST(run_awaitable(io, std::move(op)).empty());
}

FERRY_TEST_CASE(f11_a_run_on_a_stopped_pool_completes_with_pool_closed_instead_of_hanging) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  pool.stop();
  auto p = fl::make_pipeline(fl::parallel([](int) {}));
  std::exception_ptr failure;
  bool done = false;
  p.run(pool, iota_vector(100), {},
        asio::bind_executor(io, [&](std::exception_ptr e, fl::pipeline_stats) {
          failure = e;
          done = true;
        }));
  io.run();
  BOOST_TEST(done);
  BOOST_TEST(code_of(failure) == ferry::errc::pool_closed);
}

FERRY_TEST_CASE(f11_a_channel_source_is_read_no_further_than_the_bound_allows) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  constexpr std::size_t channel_size = 4, in_flight = 2;
  ferry::from_thread_channel<int> ch{io.get_executor(), channel_size};
  std::atomic<int> put{0}, finished{0}, worst_gap{0};
  std::thread producer([&] {
    for (int i = 0; i < 300; ++i) {
      if (!ch.put(i)) break;
      ++put;
    }
    ch.close();
  });
  auto p = fl::make_pipeline(fl::serial_in_order([&](int) {
    std::this_thread::sleep_for(200us);
    const int gap = put.load() - finished.load();
    int w = worst_gap.load();
    while (gap > w && !worst_gap.compare_exchange_weak(w, gap)) {
    }
    ++finished;
  }));
  auto op = p.run(pool, ch, {.max_in_flight = in_flight});
  fl::pipeline_stats st = run_awaitable(io, std::move(op));
  producer.join();
  BOOST_TEST(st.items == 300u);
  // Out of the producer but not finished: the channel, the tokens, one put in progress.
  BOOST_TEST(worst_gap.load() <= static_cast<int>(channel_size + in_flight + 1));
}
