#define BOOST_TEST_MODULE ferry_flow_processor
#include "coro_test_support.hpp"
#include "http_test_server.hpp"

#include <ferry/flow/context.hpp>
#include <ferry/flow/processor.hpp>
#include <ferry/flow/sources.hpp>
#include <ferry/flow/supervisor.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

// House rules (g++ 12): an awaited call never has a temporary with a destructor among its
// arguments (build the awaitable in its own statement, then `co_await std::move(op)`), and
// every coroutine lambda is a named variable that outlives the coroutines it starts.

using namespace std::chrono_literals;
namespace fl = ferry::flow;
using ferry_test::code_of;
using ferry_test::contains;
using ferry_test::message_of;
using std::chrono::system_clock;

namespace {

asio::awaitable<void> sleep_for(std::chrono::milliseconds d) {
  asio::steady_timer t(co_await asio::this_coro::executor, d);
  auto op = t.async_wait(asio::use_awaitable);
  co_await std::move(op);
}

// A processor with a few ports, standing alone on a handler.
struct numbers : fl::processor {
  using fl::processor::processor;
  fl::event<int> value{*this, "value"};
  fl::event<int, std::string> pair{*this, "pair"};
};

// A source that emits 0..count-1 on `value` and is then done (or fails at `fail_at`).
struct counting_source : fl::source {
  counting_source(fl::manager& m, std::string name, int count, int fail_at = -1)
      : fl::source(m, std::move(name)), count_(count), fail_at_(fail_at) {}
  fl::event<int> value{*this, "value"};
  asio::awaitable<void> run() override {
    const int count = count_;
    const int fail_at = fail_at_;
    for (int i = 0; i < count; ++i) {
      if (i == fail_at) throw std::runtime_error("source failed at " + std::to_string(i));
      auto op = emit(value, i);
      co_await std::move(op);
    }
  }

private:
  int count_;
  int fail_at_;
};

std::string temp_path(const std::string& stem) {
  static std::atomic<int> n{0};
  auto p = std::filesystem::temp_directory_path() /
           ("ferry_" + stem + "_" + std::to_string(::getpid()) + "_" + std::to_string(n++) + ".csv");
  std::filesystem::remove(p);
  return p.string();
}

std::vector<std::string> lines_of(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

}  // namespace

// ---- A1: typed ports ----------------------------------------------------------------------

namespace {
[[maybe_unused]] auto good_plain = [](const int&) {};
[[maybe_unused]] auto good_coro = [](int) -> asio::awaitable<void> { co_return; };
[[maybe_unused]] auto wrong_args = [](const std::string&) {};
[[maybe_unused]] auto wrong_count = [](int, int) {};
[[maybe_unused]] auto wrong_result = [](int) { return 1; };
template <class Port, class H>
constexpr bool can_connect = requires(Port& p, H h) { fl::on(p, h); };
}  // namespace

static_assert(can_connect<fl::event<int>, decltype(good_plain)>);
static_assert(can_connect<fl::event<int>, decltype(good_coro)>);
static_assert(!can_connect<fl::event<int>, decltype(wrong_args)>, "a handler of other arguments must not compile");
static_assert(!can_connect<fl::event<int>, decltype(wrong_count)>);
static_assert(!can_connect<fl::event<int>, decltype(wrong_result)>);
static_assert(fl::port_handler<decltype(good_plain), int>);
static_assert(!fl::port_handler<decltype(wrong_args), int>);

FERRY_TEST_CASE(a1_emit_reaches_every_handler_with_its_arguments) {
  asio::io_context io;
  fl::inline_handler h;
  numbers n{h, "n"};
  BOOST_TEST(n.pair.topic_name() == "n.pair");
  std::vector<std::string> seen;
  fl::on(n.pair, [&](int i, const std::string& s) { seen.push_back("plain " + std::to_string(i) + s); });
  fl::on(n.pair, [&](int i, std::string s) -> asio::awaitable<void> {
    co_await sleep_for(1ms);
    seen.push_back("coro " + std::to_string(i) + s);
  });
  BOOST_TEST(n.pair.connections() == 2u);
  auto body = [&]() -> asio::awaitable<void> {
    auto op = fl::emit(n.pair, 7, std::string("x"));
    co_await std::move(op);
    auto op2 = fl::emit(n.value, 1);  // no handler: taken and dropped
    co_await std::move(op2);
  };
  ferry_test::run(io, body);
  BOOST_TEST(seen == (std::vector<std::string>{"plain 7x", "coro 7x"}));
}

// ---- A2: inline ---------------------------------------------------------------------------

FERRY_TEST_CASE(a2_inline_emit_awaits_every_handler_in_order_coroutines_too) {
  asio::io_context io;
  fl::inline_handler h;
  numbers n{h, "n"};
  std::vector<std::string> log;
  fl::on(n.value, [&](int v) -> asio::awaitable<void> {
    log.push_back("slow start " + std::to_string(v));
    co_await sleep_for(20ms);
    log.push_back("slow end " + std::to_string(v));
  });
  fl::on(n.value, [&](int v) { log.push_back("plain " + std::to_string(v)); });
  auto body = [&]() -> asio::awaitable<void> {
    for (int i = 0; i < 2; ++i) {
      auto op = fl::emit(n.value, i);
      co_await std::move(op);
      log.push_back("emit returned " + std::to_string(i));
    }
  };
  ferry_test::run(io, body);
  BOOST_TEST(log == (std::vector<std::string>{"slow start 0", "slow end 0", "plain 0", "emit returned 0",
                                              "slow start 1", "slow end 1", "plain 1", "emit returned 1"}),
             boost::test_tools::per_element());
}

// ---- A2: queued ---------------------------------------------------------------------------

FERRY_TEST_CASE(a2_queued_emit_returns_first_and_delivers_all_in_order_while_the_handler_is_slow) {
  asio::io_context io;
  fl::queued_handler h{io, {.capacity = 1000}};
  numbers n{h, "n"};
  constexpr int count = 300;
  std::vector<int> got;
  int emitted = 0;
  int emitted_when_first_delivered = -1;
  fl::on(n.value, [&](int v) -> asio::awaitable<void> {
    if (got.empty()) emitted_when_first_delivered = emitted;
    if (v % 50 == 0) co_await sleep_for(2ms);  // slow now and then: messages pile up
    got.push_back(v);
  });
  auto body = [&]() -> asio::awaitable<void> {
    for (int i = 0; i < count; ++i) {
      auto op = fl::emit(n.value, i);
      co_await std::move(op);
      ++emitted;
    }
    BOOST_TEST(got.empty());  // nothing was delivered inside emit
    auto d = h.drain();
    co_await std::move(d);
  };
  ferry_test::run(io, body);
  BOOST_TEST(emitted_when_first_delivered == count);
  BOOST_REQUIRE(got.size() == static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) BOOST_TEST(got[static_cast<std::size_t>(i)] == i);
  const auto s = h.stats();
  BOOST_TEST(s.published == static_cast<std::uint64_t>(count));
  BOOST_TEST(s.acknowledged == static_cast<std::uint64_t>(count));
  BOOST_TEST(s.pending == 0u);
}

FERRY_TEST_CASE(a2_queued_is_fifo_per_port_and_runs_handlers_on_its_strand_one_at_a_time) {
  asio::io_context io;
  fl::queued_handler h{io};
  numbers n{h, "n"};
  std::vector<int> values;
  std::vector<int> pairs;
  std::atomic<int> inside{0};
  int overlap = 0;
  auto strand = h.get_strand();
  // The synchronous part of a handler never overlaps another's, with two threads running
  // the loop; coroutine handlers may interleave at their co_await points.
  auto check = [&]() -> asio::awaitable<void> {
    if (inside.fetch_add(1) != 0) ++overlap;
    BOOST_TEST(strand.running_in_this_thread());
    const auto until = std::chrono::steady_clock::now() + 50us;
    while (std::chrono::steady_clock::now() < until) {
    }
    inside.fetch_sub(1);
    co_await sleep_for(1ms);
  };
  fl::on(n.value, [&](int v) -> asio::awaitable<void> {
    co_await check();
    values.push_back(v);
  });
  fl::on(n.pair, [&](int v, const std::string&) -> asio::awaitable<void> {
    co_await check();
    pairs.push_back(v);
  });
  // Emitted from four threads' worth of interleaving: two producers per port.
  auto producer = [&](int base) -> asio::awaitable<void> {
    for (int i = 0; i < 30; ++i) {
      auto op = fl::emit(n.value, base + i);
      co_await std::move(op);
      auto op2 = fl::emit(n.pair, base + i, std::string("p"));
      co_await std::move(op2);
    }
  };
  asio::co_spawn(io, producer(0), asio::detached);
  asio::co_spawn(io, producer(1000), asio::detached);
  std::thread second([&] { io.run(); });
  io.run();
  second.join();
  BOOST_TEST(values.size() == 60u);
  BOOST_TEST(pairs.size() == 60u);
  // Per producer, the order is kept on each port.
  for (const auto* list : {&values, &pairs}) {
    int last_low = -1, last_high = 999;
    for (int v : *list) {
      if (v < 1000) {
        BOOST_TEST(v > last_low);
        last_low = v;
      } else {
        BOOST_TEST(v > last_high);
        last_high = v;
      }
    }
  }
  // Handlers of one queued handler never run at once: they share its strand.
  BOOST_TEST(overlap == 0);
}

FERRY_TEST_CASE(a2_queued_full_topic_makes_emit_wait_and_loses_nothing) {
  asio::io_context io;
  constexpr std::size_t capacity = 4;
  fl::queued_handler h{io, {.capacity = capacity}};
  numbers n{h, "n"};
  std::vector<int> got;
  int emitted = 0;
  std::size_t max_backlog = 0;
  fl::on(n.value, [&](int v) -> asio::awaitable<void> {
    co_await sleep_for(2ms);
    got.push_back(v);
  });
  auto body = [&]() -> asio::awaitable<void> {
    for (int i = 0; i < 40; ++i) {
      auto op = fl::emit(n.value, i);
      co_await std::move(op);
      ++emitted;
      // Accepted but not yet handled: never more than the capacity.
      max_backlog = std::max(max_backlog, static_cast<std::size_t>(emitted) - got.size());
    }
    auto d = h.drain();
    co_await std::move(d);
  };
  ferry_test::run(io, body);
  BOOST_TEST(got.size() == 40u);
  for (int i = 0; i < 40; ++i) BOOST_TEST(got[static_cast<std::size_t>(i)] == i);
  BOOST_TEST(max_backlog <= capacity);
  BOOST_TEST(max_backlog >= capacity - 1);  // the bound was actually reached
  BOOST_TEST(h.stats().waits > 0u);
}

FERRY_TEST_CASE(a2_queued_waiting_emit_is_cancellable) {
  asio::io_context io;
  fl::queued_handler h{io, {.capacity = 1}};
  numbers n{h, "n"};
  auto gate = std::make_shared<asio::steady_timer>(io, asio::steady_timer::time_point::max());
  std::vector<int> got;
  fl::on(n.value, [&, gate](int v) -> asio::awaitable<void> {
    auto op = gate->async_wait(asio::experimental::as_tuple(asio::use_awaitable));
    co_await std::move(op);
    got.push_back(v);
  });
  asio::cancellation_signal cancel;
  std::exception_ptr outcome;
  bool done = false;
  auto body = [&]() -> asio::awaitable<void> {
    auto op = fl::emit(n.value, 1);  // delivered, blocked on the gate: the topic is full
    co_await std::move(op);
    auto op2 = fl::emit(n.value, 2);
    co_await std::move(op2);
  };
  asio::co_spawn(io, body(), asio::bind_cancellation_slot(cancel.slot(), [&](std::exception_ptr e) {
                   outcome = e;
                   done = true;
                 }));
  asio::steady_timer later(io, 20ms);
  later.async_wait([&](std::error_code) {
    BOOST_TEST(!done);  // still waiting for room
    cancel.emit(asio::cancellation_type::terminal);
  });
  asio::steady_timer open(io, 40ms);
  open.async_wait([&](std::error_code) { gate->cancel(); });
  io.run();
  BOOST_REQUIRE(done);
  BOOST_TEST(code_of(outcome) == asio::error::operation_aborted);
  BOOST_TEST(got == std::vector<int>{1});
}

FERRY_TEST_CASE(a2_queued_stop_drains_then_refuses) {
  asio::io_context io;
  fl::queued_handler h{io};
  numbers n{h, "n"};
  std::vector<int> got;
  fl::on(n.value, [&](int v) -> asio::awaitable<void> {
    co_await sleep_for(1ms);
    got.push_back(v);
  });
  std::error_code after_stop;
  auto body = [&]() -> asio::awaitable<void> {
    for (int i = 0; i < 10; ++i) {
      auto op = fl::emit(n.value, i);
      co_await std::move(op);
    }
    auto s = h.stop();
    co_await std::move(s);
    BOOST_TEST(got.size() == 10u);  // all delivered before stop returned
    try {
      auto op = fl::emit(n.value, 99);
      co_await std::move(op);
    } catch (const ferry::error& e) {
      after_stop = e.code();
    }
  };
  ferry_test::run(io, body);
  BOOST_TEST(after_stop == fl::errc::handler_stopped);
  BOOST_TEST(got.size() == 10u);
}

FERRY_TEST_CASE(a2_queued_messages_wait_for_the_next_subscriber_after_a_disconnect) {
  asio::io_context io;
  fl::queued_handler h{io};
  auto producer = std::make_unique<numbers>(h, "p");
  std::vector<std::string> got;
  auto gate = std::make_shared<asio::steady_timer>(io, asio::steady_timer::time_point::max());
  // The first consumer takes message 0 and blocks; 1..4 wait in the queue.
  auto first = std::make_unique<numbers>(h, "c1");
  fl::on(producer->value, [&, gate](int v) -> asio::awaitable<void> {
    got.push_back("first " + std::to_string(v));
    auto op = gate->async_wait(asio::experimental::as_tuple(asio::use_awaitable));
    co_await std::move(op);
  });
  auto body = [&]() -> asio::awaitable<void> {
    for (int i = 0; i < 5; ++i) {
      auto op = fl::emit(producer->value, i);
      co_await std::move(op);
    }
    while (got.empty()) co_await sleep_for(1ms);  // message 0 is in the first handler
    gate->cancel();
    auto d = producer->disconnect();  // waits for the delivery in flight (message 0)
    co_await std::move(d);
    // A new producer instance on the same topic, as a restarted manager builds it.
    producer = std::make_unique<numbers>(h, "p");
    fl::on(producer->value, [&](int v) { got.push_back("second " + std::to_string(v)); });
    auto dr = h.drain();
    co_await std::move(dr);
  };
  ferry_test::run(io, body);
  BOOST_TEST(got == (std::vector<std::string>{"first 0", "second 1", "second 2", "second 3", "second 4"}),
             boost::test_tools::per_element());
}

FERRY_TEST_CASE(a2_zero_capacity_and_mismatched_topic_types_are_refused) {
  asio::io_context io;
  BOOST_TEST(ferry_test::error_of([&] { fl::queued_handler bad{io, {.capacity = 0}}; }) ==
             ferry::errc::invalid_argument);
  fl::inline_handler h;
  numbers a{h, "same"};
  struct other : fl::processor {
    using fl::processor::processor;
    fl::event<std::string> value{*this, "value"};  // "same.value" with another type
  };
  BOOST_TEST(ferry_test::error_of([&] { other b{h, "same"}; }) == fl::errc::type_mismatch);
}

// ---- A3: errors ---------------------------------------------------------------------------

FERRY_TEST_CASE(a3_error_event_without_a_handler_is_a_clear_error) {
  asio::io_context io;
  fl::inline_handler h;
  numbers n{h, "n"};
  std::string what;
  std::exception_ptr cause;
  std::vector<std::string> handled;
  auto body = [&]() -> asio::awaitable<void> {
    auto boom = std::make_exception_ptr(std::runtime_error("disk full"));
    try {
      auto op = fl::emit(n.error, boom);
      co_await std::move(op);
    } catch (const fl::unhandled_error_event& e) {
      what = e.what();
      cause = e.cause();
      BOOST_TEST(e.code() == fl::errc::unhandled_error_event);
      BOOST_TEST(e.port() == "n.error");
    }
    fl::on(n.error, [&](const std::exception_ptr& e) { handled.push_back(message_of(e)); });
    auto op = fl::emit(n.error, boom);
    co_await std::move(op);
  };
  ferry_test::run(io, body);
  BOOST_TEST(contains(what, "n.error"));
  BOOST_TEST(contains(what, "disk full"));
  BOOST_TEST(message_of(cause) == "disk full");
  BOOST_TEST(handled == std::vector<std::string>{"disk full"});
}

FERRY_TEST_CASE(a3_handler_exception_without_a_manager_reaches_the_emitter_or_drain) {
  asio::io_context io;
  {
    fl::inline_handler h;
    numbers n{h, "n"};
    std::vector<int> after;
    fl::on(n.value, [](int) { throw std::runtime_error("handler broke"); });
    fl::on(n.value, [&](int v) { after.push_back(v); });
    std::string caught;
    auto body = [&]() -> asio::awaitable<void> {
      try {
        auto op = fl::emit(n.value, 3);
        co_await std::move(op);
      } catch (const std::runtime_error& e) {
        caught = e.what();
      }
    };
    ferry_test::run(io, body);
    BOOST_TEST(caught == "handler broke");
    BOOST_TEST(after == std::vector<int>{3});  // the other handler still ran
  }
  {
    fl::queued_handler h{io};
    numbers n{h, "n"};
    std::vector<int> got;
    fl::on(n.value, [&](int v) {
      if (v == 1) throw std::runtime_error("queued handler broke");
      got.push_back(v);
    });
    std::string caught;
    auto body = [&]() -> asio::awaitable<void> {
      for (int i = 0; i < 3; ++i) {
        auto op = fl::emit(n.value, i);
        co_await std::move(op);
      }
      try {
        auto d = h.drain();
        co_await std::move(d);
      } catch (const std::runtime_error& e) {
        caught = e.what();
      }
    };
    ferry_test::run(io, body);
    BOOST_TEST(caught == "queued handler broke");
    BOOST_TEST(got == (std::vector<int>{0, 2}));
  }
}

namespace {
// source → doubler → sink, with a handler that throws at `bad`.
class doubling_manager : public fl::manager {
public:
  doubling_manager(fl::manager_args a, int count, int bad, std::vector<int>* out)
      : fl::manager(std::move(a)), source_(*this, "source", count) {
    fl::on(source_.value, [this, bad](int v) -> asio::awaitable<void> {
      if (v == bad) throw std::runtime_error("cannot double " + std::to_string(v));
      auto op = emit(doubled_.value, 2 * v);
      co_await std::move(op);
    });
    fl::on(doubled_.value, [out](int v) { out->push_back(v); });
    set_source(source_);
  }

private:
  counting_source source_;
  numbers doubled_{*this, "doubler"};
};
}  // namespace

FERRY_TEST_CASE(a3_a5_handler_exception_goes_to_the_manager_error_path) {
  for (const bool queued : {false, true}) {
    BOOST_TEST_CONTEXT("queued " << queued) {
      asio::io_context io;
      fl::inline_handler ih;
      fl::queued_handler qh{io};
      fl::message_handler& h = queued ? static_cast<fl::message_handler&>(qh) : ih;
      fl::context root{io};
      std::vector<int> out;
      // A healthy run is done when its source is done (A5).
      std::string failure;
      auto body = [&]() -> asio::awaitable<void> {
        {
          doubling_manager ok{fl::manager_args{"ok", &h, root.make_child(), {}}, 5, -1, &out};
          BOOST_TEST(ok.build_processor_name("x") == "ok.x");
          auto op = ok.run();
          co_await std::move(op);
          auto c = ok.close(true);
          co_await std::move(c);
        }
        BOOST_TEST(out == (std::vector<int>{0, 2, 4, 6, 8}));
        doubling_manager bad{fl::manager_args{"bad", &h, root.make_child(), {}}, 1000000, 3, &out};
        try {
          auto op = bad.run();
          co_await std::move(op);
        } catch (const std::runtime_error& e) {
          failure = e.what();
        }
        BOOST_TEST(message_of(bad.failure()) == "cannot double 3");
        auto c = bad.close();
        co_await std::move(c);
        auto cl = root.close();
        co_await std::move(cl);
      };
      ferry_test::run(io, body);
      BOOST_TEST(failure == "cannot double 3");
    }
  }
}

FERRY_TEST_CASE(a5_manager_without_source_is_refused) {
  asio::io_context io;
  fl::inline_handler h;
  fl::context root{io};
  struct empty : fl::manager {
    using fl::manager::manager;
  };
  std::error_code code;
  auto body = [&]() -> asio::awaitable<void> {
    empty m{fl::manager_args{"empty", &h, root.make_child(), {}}};
    try {
      auto op = m.run();
      co_await std::move(op);
    } catch (const ferry::error& e) {
      code = e.code();
    }
    auto cl = root.close();
    co_await std::move(cl);
  };
  ferry_test::run(io, body);
  BOOST_TEST(code == fl::errc::no_source);
}

// ---- A4: sources --------------------------------------------------------------------------

namespace {
// A manager around one source, reporting into `reports`.
template <class Source, class Options>
struct one_source_manager : fl::manager {
  one_source_manager(fl::manager_args a, Options o) : fl::manager(std::move(a)), src(*this, "source", std::move(o)) {
    set_source(src);
  }
  Source src;
};

fl::error_reporter collect_into(std::vector<fl::failure_report>& out) {
  return [&out](const fl::failure_report& r) { out.push_back(r); };
}
}  // namespace

FERRY_TEST_CASE(a4_rest_source_counts_consecutive_failures_reports_at_the_threshold_and_resets_on_success) {
  std::atomic<int> price{100};
  ferry_test::http_test_server server([&] { return "{\"price\": " + std::to_string(price++) + "}"; });
  asio::io_context io;
  fl::inline_handler h;
  fl::context root{io};
  std::vector<fl::failure_report> reports;
  using manager_t = one_source_manager<fl::rest_source, fl::rest_options>;
  // Script: ok, fail, fail, ok (resets), fail, fail, fail (threshold 3: report), ok.
  const std::vector<bool> script{false, true, true, false, true, true, true, false};
  manager_t m{fl::manager_args{"rest", &h, root.make_child(), collect_into(reports)},
              fl::rest_options{.url = server.url(), .interval = 5ms, .failure_threshold = 3,
                               .max_requests = script.size()}};
  server.set_script(script);
  std::vector<std::string> bodies;
  auto& src = m.src;
  fl::on(src.data, [&](const std::string& body, system_clock::time_point t) {
    BOOST_TEST(((system_clock::now() - t) < 10s));
    bodies.push_back(body);
  });
  auto body = [&]() -> asio::awaitable<void> {
    auto op = m.run();  // done after max_requests
    co_await std::move(op);
    auto c = m.close();
    co_await std::move(c);
    auto cl = root.close();
    co_await std::move(cl);
  };
  ferry_test::run(io, body);
  const auto s = src.stats();
  BOOST_TEST(s.requests == script.size());
  BOOST_TEST(s.successes == 3u);
  BOOST_TEST(s.failures == 5u);
  BOOST_TEST(s.reports == 1u);
  BOOST_TEST(bodies.size() == 3u);
  BOOST_TEST(contains(bodies[0], "\"price\""));
  BOOST_REQUIRE(reports.size() == 1u);
  BOOST_TEST(!reports[0].fatal);
  BOOST_TEST(reports[0].manager == "rest");
  BOOST_TEST(code_of(reports[0].error) == fl::errc::failure_threshold);
  BOOST_TEST(contains(message_of(reports[0].error), "3 consecutive failures"));
  BOOST_TEST(contains(message_of(reports[0].error), "status 500"));
}

FERRY_TEST_CASE(a4_rest_source_threshold_actions_stop_and_fail) {
  ferry_test::http_test_server server([] { return std::string("{}"); });
  server.set_failing(true);
  for (const auto action : {fl::threshold_action::stop, fl::threshold_action::fail}) {
    asio::io_context io;
    fl::inline_handler h;
    fl::context root{io};
    std::vector<fl::failure_report> reports;
    using manager_t = one_source_manager<fl::rest_source, fl::rest_options>;
    manager_t m{fl::manager_args{"rest", &h, root.make_child(), collect_into(reports)},
                fl::rest_options{.url = server.url(), .interval = 1ms, .failure_threshold = 2,
                                 .on_threshold = action}};
    std::exception_ptr outcome;
    auto body = [&]() -> asio::awaitable<void> {
      try {
        auto op = m.run();
        co_await std::move(op);
      } catch (...) {
        outcome = std::current_exception();
      }
      auto c = m.close();
      co_await std::move(c);
      auto cl = root.close();
      co_await std::move(cl);
    };
    ferry_test::run(io, body);
    BOOST_TEST(m.src.stats().requests == 2u);
    if (action == fl::threshold_action::stop) {
      BOOST_TEST(!outcome);  // done
      BOOST_REQUIRE(reports.size() == 1u);
      BOOST_TEST(code_of(reports[0].error) == fl::errc::failure_threshold);
    } else {
      BOOST_TEST(code_of(outcome) == fl::errc::failure_threshold);  // for a restart
    }
  }
}

FERRY_TEST_CASE(a4_rest_source_refuses_bad_options_and_reports_connection_failures) {
  asio::io_context io;
  fl::inline_handler h;
  BOOST_TEST(ferry_test::error_of([&] { fl::rest_source s{h, "s", {.url = "ftp://x/"}}; }) ==
             fl::errc::http_error);
  BOOST_TEST(ferry_test::error_of([&] {
               fl::rest_source s{h, "s", {.url = "http://127.0.0.1:1/", .failure_threshold = 0}};
             }) == ferry::errc::invalid_argument);
  // Nothing listens on this port: every request fails to connect.
  asio::ip::tcp::acceptor probe(io, {asio::ip::make_address("127.0.0.1"), 0});
  const auto port = probe.local_endpoint().port();
  probe.close();
  BOOST_TEST(ferry_test::error_of([&] {
               fl::http_get("http://127.0.0.1:" + std::to_string(port) + "/", 1000ms);
             }) == fl::errc::http_error);
}

FERRY_TEST_CASE(a4_cron_timestamps_are_aligned_to_the_interval) {
  asio::io_context io;
  fl::inline_handler h;
  fl::cron_source cron{h, "cron", {.interval = 30ms, .max_ticks = 4}};
  std::vector<system_clock::time_point> ticks;
  fl::on(cron.tick, [&](system_clock::time_point t) {
    BOOST_TEST((system_clock::now() >= t));  // never early
    ticks.push_back(t);
  });
  auto body = [&]() -> asio::awaitable<void> {
    auto op = cron.run();
    co_await std::move(op);
  };
  ferry_test::run(io, body);
  BOOST_REQUIRE(ticks.size() == 4u);
  const auto iv = std::chrono::duration_cast<system_clock::duration>(30ms);
  for (std::size_t i = 0; i < ticks.size(); ++i) {
    BOOST_TEST((ticks[i].time_since_epoch() % iv).count() == 0);
    if (i > 0) BOOST_TEST(((ticks[i] - ticks[i - 1]) % iv).count() == 0);
    if (i > 0) BOOST_TEST((ticks[i] > ticks[i - 1]));
  }
  // Consecutive ticks are one interval apart unless the loop was late (then counted missed).
  const auto span = (ticks.back() - ticks.front()) / iv;
  BOOST_TEST(static_cast<std::size_t>(span) == 3u + cron.missed());
  BOOST_TEST(ferry_test::error_of([&] { fl::cron_source c{h, "c", {.interval = 0ms}}; }) ==
             ferry::errc::invalid_argument);
}

namespace {
// A TCP server that, per connection, sends `lines` newline-terminated and closes; after
// `serve_connections` connections it stops accepting (closes the acceptor): connects fail.
class line_server {
public:
  line_server(std::vector<std::string> lines, int serve_connections)
      : lines_(std::move(lines)), left_(serve_connections), acceptor_(io_, {asio::ip::make_address("127.0.0.1"), 0}) {
    port_ = acceptor_.local_endpoint().port();
    asio::co_spawn(io_, loop(), asio::detached);
    thread_ = std::thread([this] { io_.run(); });
  }
  ~line_server() {
    io_.stop();
    thread_.join();
  }
  std::uint16_t port() const { return port_; }

private:
  asio::awaitable<void> loop() {
    while (left_-- > 0) {
      auto op = acceptor_.async_accept(asio::use_awaitable);
      asio::ip::tcp::socket s = co_await std::move(op);
      std::string out;
      for (const auto& l : lines_) out += l + "\n";
      auto w = asio::async_write(s, asio::buffer(out), asio::use_awaitable);
      co_await std::move(w);
      s.close();
    }
    acceptor_.close();
  }
  std::vector<std::string> lines_;
  int left_;
  asio::io_context io_;
  asio::ip::tcp::acceptor acceptor_;
  std::uint16_t port_ = 0;
  std::thread thread_;
};
}  // namespace

FERRY_TEST_CASE(a4_stream_source_reconnects_and_fails_after_its_failure_limit) {
  line_server server({"a", "b"}, 2);
  asio::io_context io;
  fl::inline_handler h;
  fl::stream_source src{h, "feed", {.port = server.port(), .reconnect_delay = 5ms, .max_failures = 3}};
  std::vector<std::string> frames;
  fl::on(src.message, [&](const std::string& f, system_clock::time_point) { frames.push_back(f); });
  std::exception_ptr outcome;
  auto body = [&]() -> asio::awaitable<void> {
    try {
      auto op = src.run();
      co_await std::move(op);
    } catch (...) {
      outcome = std::current_exception();
    }
  };
  ferry_test::run(io, body);
  // Two connections delivered a, b each; then three failed connects in a row.
  BOOST_TEST(frames == (std::vector<std::string>{"a", "b", "a", "b"}));
  const auto s = src.stats();
  // A connect racing the server's close of its acceptor may still be taken by the kernel
  // (then reset with nothing read): a failure too, so only "at least two" is certain.
  BOOST_TEST(s.connects >= 2u);
  BOOST_TEST(s.consecutive_failures == 3u);
  BOOST_TEST(code_of(outcome) == fl::errc::connection_failed);
  BOOST_TEST(contains(message_of(outcome), "3 consecutive connection failures"));
}

FERRY_TEST_CASE(a4_a5_stream_source_with_max_messages_is_done) {
  line_server server({"x", "y", "z"}, 5);
  asio::io_context io;
  fl::inline_handler h;
  fl::stream_source src{h, "feed", {.port = server.port(), .reconnect_delay = 1ms, .max_messages = 5}};
  std::vector<std::string> frames;
  fl::on(src.message, [&](const std::string& f, system_clock::time_point) { frames.push_back(f); });
  auto body = [&]() -> asio::awaitable<void> {
    auto op = src.run();
    co_await std::move(op);
  };
  ferry_test::run(io, body);
  BOOST_TEST(frames == (std::vector<std::string>{"x", "y", "z", "x", "y"}));
}

// ---- A7: CSV output -----------------------------------------------------------------------

FERRY_TEST_CASE(a7_csv_output_appends_with_the_header_once) {
  const std::string path = temp_path("csv");
  fl::inline_handler h;
  const auto t0 = system_clock::time_point(std::chrono::milliseconds(1700000000123));
  {
    fl::csv_output<system_clock::time_point, double> out{h, "w", {.path = path, .header = {"time", "price"}}};
    out.write(t0, 101.5);
    out.write(t0 + 1s, 102.25);
  }
  {
    // A second instance (a restart, a rerun) appends under the same header.
    fl::csv_output<system_clock::time_point, double> out{h, "w", {.path = path, .header = {"time", "price"}}};
    out.write(t0 + 2s, 99.0);
    BOOST_TEST(out.rows() == 1u);
  }
  const auto lines = lines_of(path);
  BOOST_TEST(lines == (std::vector<std::string>{"time;price", "2023-11-14T22:13:20.123Z;101.5",
                                                "2023-11-14T22:13:21.123Z;102.25",
                                                "2023-11-14T22:13:22.123Z;99"}),
             boost::test_tools::per_element());
  std::filesystem::remove(path);
}

FERRY_TEST_CASE(a7_csv_output_quotes_text_and_refuses_bad_shapes) {
  const std::string path = temp_path("quote");
  fl::inline_handler h;
  {
    fl::csv_output<std::string, int> out{h, "w", {.path = path, .header = {"name", "n"}}};
    out.write("plain", 1);
    out.write("semi;colon", 2);
    out.write("say \"hi\"", -3);
  }
  BOOST_TEST(lines_of(path) == (std::vector<std::string>{"name;n", "plain;1", "\"semi;colon\";2",
                                                         "\"say \"\"hi\"\"\";-3"}),
             boost::test_tools::per_element());
  std::filesystem::remove(path);
  BOOST_TEST(ferry_test::error_of([&] {
               fl::csv_output<int, int> out{h, "w", {.path = path, .header = {"only one"}}};
             }) == ferry::errc::invalid_argument);
  const auto code = ferry_test::error_of([&] {
    fl::csv_output<int> out{h, "w", {.path = "/nonexistent-dir/x.csv"}};
  });
  BOOST_TEST((code == std::errc::no_such_file_or_directory));
}

// ---- A6: the supervisor -------------------------------------------------------------------

namespace {
// Fails `fail_times` times (its source throws at once), then runs until stopped. Logs the
// life of every instance, including its resource's teardown.
struct flaky_log {
  std::vector<std::string> events;
  std::vector<std::chrono::steady_clock::time_point> starts;
  int instances = 0;
};

class flaky_manager : public fl::manager {
public:
  flaky_manager(fl::manager_args a, flaky_log* log, int fail_times)
      : fl::manager(std::move(a)), log_(log), id_(log->instances++),
        source_(*this, "source", id_ < fail_times ? 1 : 1000000, id_ < fail_times ? 0 : -1) {
    log_->events.push_back("start " + std::to_string(id_));
    log_->starts.push_back(std::chrono::steady_clock::now());
    ctx().add_teardown_callback([log = log_, id = id_] { log->events.push_back("teardown " + std::to_string(id)); });
    fl::on(source_.value, [](int) -> asio::awaitable<void> { co_await sleep_for(1ms); });
    set_source(source_);
  }

private:
  flaky_log* log_;
  int id_;
  counting_source source_;
};
}  // namespace

FERRY_TEST_CASE(a6_failing_manager_restarts_with_growing_delays_then_gives_up) {
  asio::io_context io;
  fl::queued_handler h{io};
  fl::context root{io};
  std::vector<fl::failure_report> reports;
  flaky_log log;
  fl::supervisor sup{root, h, collect_into(reports)};
  sup.add<flaky_manager>("flaky",
                         {.policy = fl::restart_policy::always, .initial_delay = 20ms, .max_delay = 1000ms,
                          .factor = 2.0, .max_restarts = 3, .window = 60000ms},
                         &log, 100);
  auto body = [&]() -> asio::awaitable<void> {
    auto op = sup.run();  // ends: the only manager gave up
    co_await std::move(op);
    auto cl = root.close();
    co_await std::move(cl);
  };
  ferry_test::run(io, body);
  // 1 start + 3 restarts; each old instance torn down before the next one starts.
  BOOST_TEST(log.events == (std::vector<std::string>{"start 0", "teardown 0", "start 1", "teardown 1",
                                                     "start 2", "teardown 2", "start 3", "teardown 3"}),
             boost::test_tools::per_element());
  BOOST_REQUIRE(reports.size() == 4u);
  for (std::size_t i = 0; i < 3; ++i) {
    BOOST_TEST(reports[i].fatal);
    BOOST_TEST(!reports[i].gave_up);
    BOOST_TEST(reports[i].restarts == i);
    BOOST_TEST(message_of(reports[i].error) == "source failed at 0");
    BOOST_REQUIRE(reports[i].restart_in.has_value());
  }
  using std::chrono::milliseconds;
  BOOST_TEST(std::chrono::duration_cast<milliseconds>(*reports[0].restart_in).count() == 20);
  BOOST_TEST(std::chrono::duration_cast<milliseconds>(*reports[1].restart_in).count() == 40);
  BOOST_TEST(std::chrono::duration_cast<milliseconds>(*reports[2].restart_in).count() == 80);
  BOOST_TEST(reports[3].gave_up);
  BOOST_TEST(!reports[3].restart_in.has_value());
  // The delays were really waited (at least; a busy machine may add).
  BOOST_REQUIRE(log.starts.size() == 4u);
  BOOST_TEST(((log.starts[1] - log.starts[0]) >= 20ms));
  BOOST_TEST(((log.starts[2] - log.starts[1]) >= 40ms));
  BOOST_TEST(((log.starts[3] - log.starts[2]) >= 80ms));
  const auto st = sup.status();
  BOOST_REQUIRE(st.size() == 1u);
  BOOST_TEST(st[0].starts == 4u);
  BOOST_TEST(st[0].failures == 4u);
  BOOST_TEST(st[0].gave_up);
  BOOST_TEST(st[0].done);
  BOOST_TEST(!st[0].running);
}

FERRY_TEST_CASE(a6_restarted_manager_recovers_and_stop_ends_it) {
  asio::io_context io;
  fl::inline_handler h;
  fl::context root{io};
  std::vector<fl::failure_report> reports;
  flaky_log log;
  fl::supervisor sup{root, h, collect_into(reports)};
  sup.add<flaky_manager>("flaky", {.policy = fl::restart_policy::always, .initial_delay = 1ms}, &log, 2);
  auto stopper = [&]() -> asio::awaitable<void> {
    while (log.instances < 3) co_await sleep_for(1ms);
    co_await sleep_for(10ms);
    auto st = sup.status();
    BOOST_TEST(st[0].running);
    auto op = sup.stop();
    co_await std::move(op);
  };
  auto body = [&]() -> asio::awaitable<void> {
    auto ex = co_await asio::this_coro::executor;
    asio::co_spawn(ex, stopper(), asio::detached);
    auto op = sup.run();
    co_await std::move(op);
    auto cl = root.close();
    co_await std::move(cl);
  };
  ferry_test::run(io, body);
  BOOST_TEST(log.events == (std::vector<std::string>{"start 0", "teardown 0", "start 1", "teardown 1",
                                                     "start 2", "teardown 2"}),
             boost::test_tools::per_element());
  BOOST_TEST(reports.size() == 2u);  // the two failures; the stop is not one
  BOOST_TEST(sup.status()[0].failures == 2u);
  BOOST_TEST(!sup.status()[0].gave_up);
}

namespace {
// source → slow writer (a queued handler makes the messages pile up).
class slow_writer_manager : public fl::manager {
public:
  slow_writer_manager(fl::manager_args a, std::vector<int>* out, std::vector<std::string>* order)
      : fl::manager(std::move(a)), source_(*this, "source", 1000000) {
    fl::on(source_.value, [out](int v) -> asio::awaitable<void> {
      co_await sleep_for(1ms);
      out->push_back(v);
    });
    ctx().add_teardown_callback([order, n = name()] { order->push_back("teardown " + n); });
    set_source(source_);
  }

private:
  counting_source source_;
};
}  // namespace

FERRY_TEST_CASE(a6_stop_drains_the_queue_and_ends_managers_in_order) {
  asio::io_context io;
  fl::queued_handler h{io, {.capacity = 64}};
  fl::context root{io};
  std::vector<fl::failure_report> reports;
  std::vector<int> first, second;
  std::vector<std::string> order;
  fl::supervisor sup{root, h, collect_into(reports)};
  sup.add<slow_writer_manager>("first", {}, &first, &order);
  sup.add<slow_writer_manager>("second", {}, &second, &order);
  std::uint64_t published_at_stop = 0;
  auto stopper = [&]() -> asio::awaitable<void> {
    while (h.stats().pending < 40) co_await sleep_for(1ms);  // a backlog exists
    auto op = sup.stop();
    co_await std::move(op);
    published_at_stop = h.stats().published;
  };
  auto body = [&]() -> asio::awaitable<void> {
    auto ex = co_await asio::this_coro::executor;
    asio::co_spawn(ex, stopper(), asio::detached);
    auto op = sup.run();
    co_await std::move(op);
    auto cl = root.close();
    co_await std::move(cl);
  };
  ferry_test::run(io, body);
  // Every message any source emitted was written: the queue was drained, nothing lost.
  BOOST_TEST(first.size() + second.size() == published_at_stop);
  BOOST_TEST(h.stats().pending == 0u);
  for (std::size_t i = 0; i < first.size(); ++i) BOOST_TEST(first[i] == static_cast<int>(i));
  for (std::size_t i = 0; i < second.size(); ++i) BOOST_TEST(second[i] == static_cast<int>(i));
  BOOST_TEST(order == (std::vector<std::string>{"teardown first", "teardown second"}));
  BOOST_TEST(reports.empty());
}

FERRY_TEST_CASE(a6_done_and_never_policy_managers_are_not_restarted) {
  asio::io_context io;
  fl::inline_handler h;
  fl::context root{io};
  std::vector<fl::failure_report> reports;
  flaky_log failing;
  std::vector<int> out;
  fl::supervisor sup{root, h, collect_into(reports)};
  sup.add<flaky_manager>("fails_once", {}, &failing, 100);             // never: reported, stays down
  sup.add<doubling_manager>("finishes", {.policy = fl::restart_policy::always}, 3, -1, &out);  // done
  BOOST_TEST(ferry_test::error_of([&] { sup.add<doubling_manager>("finishes", {}, 3, -1, &out); }) ==
             ferry::errc::invalid_argument);
  auto body = [&]() -> asio::awaitable<void> {
    auto op = sup.run();
    co_await std::move(op);
    auto cl = root.close();
    co_await std::move(cl);
  };
  ferry_test::run(io, body);
  BOOST_TEST(failing.instances == 1);
  BOOST_TEST(out == (std::vector<int>{0, 2, 4}));
  BOOST_REQUIRE(reports.size() == 1u);
  BOOST_TEST(reports[0].manager == "fails_once");
  BOOST_TEST(!reports[0].restart_in.has_value());
  const auto st = sup.status();
  BOOST_TEST(st[1].starts == 1u);
  BOOST_TEST(st[1].failures == 0u);
  BOOST_TEST(st[1].done);
}

FERRY_TEST_CASE(a6_a_failing_factory_is_a_reported_failure) {
  asio::io_context io;
  fl::inline_handler h;
  fl::context root{io};
  std::vector<fl::failure_report> reports;
  int calls = 0;
  fl::supervisor sup{root, h, collect_into(reports)};
  sup.add("broken",
          [&](fl::manager_args) -> std::unique_ptr<fl::manager> {
            ++calls;
            throw std::runtime_error("cannot build");
          },
          {.policy = fl::restart_policy::always, .initial_delay = 1ms, .max_restarts = 2});
  auto body = [&]() -> asio::awaitable<void> {
    auto op = sup.run();
    co_await std::move(op);
    auto cl = root.close();
    co_await std::move(cl);
  };
  ferry_test::run(io, body);
  BOOST_TEST(calls == 3);
  BOOST_REQUIRE(reports.size() == 3u);
  BOOST_TEST(reports.back().gave_up);
  BOOST_TEST(message_of(reports.back().error) == "cannot build");
}

namespace {
// Emits the next value of a counter shared by every instance (advanced only once the emit
// went through), until `limit`: values are unique across restarts.
struct shared_counter_source : fl::source {
  shared_counter_source(fl::manager& m, std::string name, int* next, int limit)
      : fl::source(m, std::move(name)), next_(next), limit_(limit) {}
  fl::event<int> value{*this, "value"};
  asio::awaitable<void> run() override {
    int* next = next_;
    const int limit = limit_;
    while (*next < limit) {
      auto op = emit(value, *next);
      co_await std::move(op);
      ++*next;
    }
  }

private:
  int* next_;
  int limit_;
};

// source -> forwarder -> writer; the writer throws once, at `bad`.
class redelivery_manager : public fl::manager {
public:
  redelivery_manager(fl::manager_args a, int* next, bool* thrown, std::vector<int>* out)
      : fl::manager(std::move(a)), source_(*this, "source", next, 200) {
    fl::on(source_.value, [this](int v) -> asio::awaitable<void> {
      auto op = emit(forward_.value, v);
      co_await std::move(op);
    });
    fl::on(forward_.value, [thrown, out](int v) -> asio::awaitable<void> {
      co_await sleep_for(std::chrono::milliseconds(v % 7 == 0 ? 1 : 0));
      if (v == 5 && !*thrown) {
        *thrown = true;
        throw std::runtime_error("writer failed at 5");
      }
      out->push_back(v);
    });
    set_source(source_);
  }

private:
  shared_counter_source source_;
  numbers forward_{*this, "forward"};
};
}  // namespace

FERRY_TEST_CASE(a6_a8_queued_messages_of_a_failed_manager_go_to_its_next_instance) {
  // Once on one thread; once with two threads running the loop, the supervisor and its
  // managers on a strand and the handler's deliveries on the handler's own strand.
  for (const bool threads : {false, true}) {
    BOOST_TEST_CONTEXT("two threads " << threads) {
      asio::io_context io;
      fl::queued_handler h{io, {.capacity = 16}};
      fl::context root{asio::any_io_executor(asio::make_strand(io))};
      std::vector<fl::failure_report> reports;
      int next = 0;
      bool thrown = false;
      std::vector<int> out;
      fl::supervisor sup{root, h, collect_into(reports)};
      sup.add<redelivery_manager>("redeliver", {.policy = fl::restart_policy::always, .initial_delay = 1ms},
                                  &next, &thrown, &out);
      auto body = [&]() -> asio::awaitable<void> {
        auto op = sup.run();  // the second instance's source is done at 200
        co_await std::move(op);
        auto cl = root.close();
        co_await std::move(cl);
      };
      std::exception_ptr failure;
      asio::co_spawn(root.get_executor(), body(), [&](std::exception_ptr e) { failure = e; });
      std::thread second;
      if (threads) second = std::thread([&] { io.run(); });
      io.run();
      if (second.joinable()) second.join();
      if (failure) std::rethrow_exception(failure);
      BOOST_TEST(thrown);
      BOOST_TEST(sup.status()[0].starts == 2u);
      BOOST_TEST(reports.size() >= 1u);
      // Every value reached the writer at least once (the one it failed on, too).
      std::vector<int> sorted = out;
      std::sort(sorted.begin(), sorted.end());
      sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
      BOOST_REQUIRE(sorted.size() == 200u);
      for (int i = 0; i < 200; ++i) BOOST_TEST(sorted[static_cast<std::size_t>(i)] == i);
      BOOST_TEST(h.stats().pending == 0u);
    }
  }
}

FERRY_TEST_CASE(a2_a_cancelled_disconnect_still_disconnects_every_handler) {
  asio::io_context io;
  fl::queued_handler h{io};
  auto producer = std::make_unique<numbers>(h, "p");
  auto gate = std::make_shared<asio::steady_timer>(io, asio::steady_timer::time_point::max());
  int first_calls = 0, second_calls = 0;
  fl::on(producer->value, [&, gate](int) -> asio::awaitable<void> {
    ++first_calls;
    auto op = gate->async_wait(asio::experimental::as_tuple(asio::use_awaitable));
    co_await std::move(op);
  });
  fl::on(producer->value, [&](int) { ++second_calls; });
  asio::cancellation_signal cancel;
  std::exception_ptr outcome;
  bool disconnecting = false;
  auto start = [&]() -> asio::awaitable<void> {
    auto op = fl::emit(producer->value, 1);
    co_await std::move(op);
    while (first_calls == 0) co_await sleep_for(1ms);  // message 1 is in the first handler, blocked
    disconnecting = true;
    auto d = producer->disconnect();  // waits for that delivery ...
    co_await std::move(d);
  };
  asio::co_spawn(io, start(), asio::bind_cancellation_slot(cancel.slot(), [&](std::exception_ptr e) { outcome = e; }));
  // ... and is cancelled while it waits; then the check, then the gate opens.
  std::size_t connections_after = 99;
  asio::steady_timer later(io);
  std::function<void()> poke = [&] {
    later.expires_after(5ms);
    later.async_wait([&](std::error_code) {
      if (!disconnecting) {
        poke();
        return;
      }
      cancel.emit(asio::cancellation_type::terminal);
      connections_after = producer->value.connections();
      gate->cancel();  // lets the delivery in flight finish
    });
  };
  poke();
  io.run();
  io.restart();
  BOOST_TEST(code_of(outcome) == asio::error::operation_aborted);
  BOOST_TEST(connections_after == 0u);
  // A new instance on the same topic: the old handlers get nothing more.
  producer = std::make_unique<numbers>(h, "p");
  int third_calls = 0;
  fl::on(producer->value, [&](int) { ++third_calls; });
  auto more = [&]() -> asio::awaitable<void> {
    auto op = fl::emit(producer->value, 2);
    co_await std::move(op);
    auto d = h.drain();
    co_await std::move(d);
  };
  ferry_test::run(io, more);
  BOOST_TEST(first_calls == 1);
  BOOST_TEST(second_calls == 0);  // closed by the disconnect before its turn came
  BOOST_TEST(third_calls == 1);
}

FERRY_TEST_CASE(a8_subscriber_run_is_the_delivery_step_for_other_implementations) {
  asio::io_context io;
  auto s = std::make_shared<fl::subscriber>();
  std::vector<int> got;
  s->deliver = [&](const void* p) {
    const auto& [v] = *static_cast<const std::tuple<int>*>(p);
    if (v < 0) throw std::runtime_error("negative");
    got.push_back(v);
  };
  const std::tuple<int> one{1}, bad{-1}, two{2};
  std::exception_ptr first, second, third;
  auto body = [&]() -> asio::awaitable<void> {
    auto a = s->run(&one);
    first = co_await std::move(a);
    auto b = s->run(&bad);
    second = co_await std::move(b);
    auto c = s->close();  // nothing in flight: returns at once
    co_await std::move(c);
    auto d = s->run(&two);  // closed: skipped
    third = co_await std::move(d);
  };
  ferry_test::run(io, body);
  BOOST_TEST(!first);
  BOOST_TEST(message_of(second) == "negative");
  BOOST_TEST(!third);
  BOOST_TEST(got == std::vector<int>{1});
  BOOST_TEST(s->in_flight.load() == 0);
}
