#define BOOST_TEST_MODULE ferry_entrypoint
#include "test_support.hpp"

#include <ferry/ferry.hpp>

#include <asio/bind_executor.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <atomic>
#include <csignal>
#include <stdexcept>
#include <thread>

using namespace std::chrono_literals;
using ferry_test::gate;

namespace {
ferry::entrypoint_options quiet(std::size_t pool = 2) {
  ferry::entrypoint_options o;
  o.pool_size = pool;
  o.shutdown_timeout = 2s;
  return o;
}
bool is_aborted(const std::system_error& e) { return e.code() == asio::error::operation_aborted; }
}  // namespace

FERRY_TEST_CASE(e1_run_returns_mains_value_and_installs_the_pool) {
  ferry::entrypoint ep{quiet(3)};
  BOOST_TEST(ep.pool().size() == 3u);
  BOOST_TEST(&ferry::default_pool(ep.context()) == &ep.pool());
  auto on_pool = ferry::threaded([&] { return ep.pool().running_in_this_thread(); });
  const int v = ep.run([&]() -> asio::awaitable<int> {
    const bool used = co_await on_pool();
    co_return used ? 42 : -1;
  });
  BOOST_TEST(v == 42);
}

FERRY_TEST_CASE(e1_run_rethrows_mains_exception) {
  ferry::entrypoint ep{quiet()};
  BOOST_CHECK_THROW(ep.run([]() -> asio::awaitable<void> {
                      throw std::logic_error("main failed");
                      co_return;
                    }),
                    std::logic_error);
}

FERRY_TEST_CASE(e2_request_stop_cancels_main_and_spawned_tasks) {
  ferry::entrypoint ep{quiet()};
  std::atomic<bool> task_cancelled{false};
  ep.spawn([&]() -> asio::awaitable<void> {
    asio::steady_timer t(co_await asio::this_coro::executor, 1h);
    try {
      co_await t.async_wait(asio::use_awaitable);
    } catch (const std::system_error&) {
      task_cancelled = true;
    }
  });
  std::thread stopper([&] {
    std::this_thread::sleep_for(20ms);
    ep.request_stop();
  });
  BOOST_CHECK_EXCEPTION(ep.run([]() -> asio::awaitable<void> {
                          asio::steady_timer t(co_await asio::this_coro::executor, 1h);
                          co_await t.async_wait(asio::use_awaitable);
                        }),
                        std::system_error, is_aborted);
  stopper.join();
  BOOST_TEST(task_cancelled.load());
}

FERRY_TEST_CASE(e2_sigint_cancels_main) {
  ferry::entrypoint ep{quiet()};
  BOOST_CHECK_EXCEPTION(ep.run([]() -> asio::awaitable<void> {
                          asio::steady_timer t(co_await asio::this_coro::executor, 10ms);
                          co_await t.async_wait(asio::use_awaitable);
                          std::raise(SIGINT);  // delivered to the entrypoint's signal_set
                          asio::steady_timer forever(co_await asio::this_coro::executor, 1h);
                          co_await forever.async_wait(asio::use_awaitable);
                        }),
                        std::system_error, is_aborted);
}

FERRY_TEST_CASE(e3_shutdown_with_a_call_still_running_finishes_within_its_bound) {
  // Shared, not on the stack: the stuck call outlives the entrypoint by design.
  auto entered = std::make_shared<gate>();
  auto release = std::make_shared<gate>();
  auto finished = std::make_shared<gate>();
  const auto start = std::chrono::steady_clock::now();
  {
    ferry::entrypoint_options o = quiet(1);
    o.shutdown_timeout = 200ms;
    ferry::entrypoint ep{o};
    auto stuck = ferry::threaded([entered, release, finished] {
      entered->open();
      release->wait();
      finished->open();
    });
    ep.run([&]() -> asio::awaitable<void> {
      // Left running when main returns (bound to the loop, so it runs on ep.pool()).
      stuck.async_call(asio::bind_executor(ep.context(), [](std::exception_ptr) {}));
      entered->wait();  // it is running, not merely queued
      co_return;
    });
    BOOST_TEST(!ep.report().clean());
    BOOST_TEST_REQUIRE(ep.report().busy_workers.size() == 1u);
    BOOST_TEST(ep.report().busy_workers[0].name.find("ferry-ep") == 0u);
  }
  const auto took = std::chrono::steady_clock::now() - start;
  BOOST_TEST((took < 2s));
  release->open();  // the detached worker finishes on its own
  BOOST_TEST(finished->wait_for(30s));
}

FERRY_TEST_CASE(e3_queued_calls_complete_with_pool_closed_and_the_shared_context_is_cleared) {
  ferry::entrypoint ep{quiet(1)};
  gate entered, release;
  auto hold = ferry::threaded([&] {
    entered.open();
    release.wait();
  });
  auto queued = ferry::threaded([] { return 1; });
  std::exception_ptr queued_outcome;
  std::error_code shared_wait;
  ep.run([&]() -> asio::awaitable<void> {
    ep.shared().set("k", 1);
    hold.async_call(asio::bind_executor(ep.context(), [](std::exception_ptr) {}));
    entered.wait();
    queued.async_call(asio::bind_executor(ep.context(),
                                          [&](std::exception_ptr e, int) { queued_outcome = e; }));
    ep.shared().async_get<int>("not-yet", asio::bind_executor(ep.context(), [&](std::error_code ec, int) {
      shared_wait = ec;
    }));
    std::thread([&] {
      std::this_thread::sleep_for(20ms);
      release.open();
    }).detach();
    co_return;
  });
  BOOST_TEST(ep.report().clean());
  BOOST_TEST_REQUIRE(static_cast<bool>(queued_outcome));
  BOOST_CHECK_EXCEPTION(std::rethrow_exception(queued_outcome), ferry::error,
                        [](const ferry::error& e) { return e.code() == ferry::errc::pool_closed; });
  BOOST_TEST((shared_wait == asio::error::operation_aborted));
}

FERRY_TEST_CASE(e4_low_latency_option_spins_before_blocking_and_still_works) {
  ferry::entrypoint_options o = quiet();
  o.loop_spin = 200us;
  ferry::entrypoint ep{o};
  auto inc = ferry::threaded([](int x) { return x + 1; });
  const int v = ep.run([&]() -> asio::awaitable<int> {
    int x = 0;
    for (int i = 0; i < 1000; ++i) x = co_await inc(x);
    co_return x;
  });
  BOOST_TEST(v == 1000);
}
