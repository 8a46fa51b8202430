#define BOOST_TEST_MODULE ferry_sync_wait
#include "test_support.hpp"

#include <ferry/ferry.hpp>

#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <atomic>
#include <memory>
#include <stdexcept>
#include <thread>

using namespace std::chrono_literals;
using ferry_test::gate;

namespace {

ferry::context_var<int> request{"request"};

bool has_code(const ferry::error& e, ferry::errc c) { return e.code() == c; }

// Runs `io` on a background thread for the test's duration.
class loop_thread {
public:
  explicit loop_thread(asio::io_context& io) : io_(io), work_(asio::make_work_guard(io)) {
    thread_ = std::thread([this] { io_.run(); });
  }
  ~loop_thread() { stop(); }
  void stop() {
    work_.reset();
    io_.stop();
    if (thread_.joinable()) thread_.join();
  }

private:
  asio::io_context& io_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  std::thread thread_;
};

asio::awaitable<int> add_later(int a, int b) {
  asio::steady_timer t(co_await asio::this_coro::executor, 1ms);
  co_await t.async_wait(asio::use_awaitable);
  co_return a + b;
}

}  // namespace

FERRY_TEST_CASE(s1_a_thread_runs_a_coroutine_on_the_loop_and_gets_its_value) {
  asio::io_context io;
  loop_thread loop(io);
  BOOST_TEST(ferry::sync_wait_coroutine(io, add_later, 2, 3) == 5);
  BOOST_TEST(ferry::sync_wait_coroutine(io.get_executor(), add_later, 4, 5) == 9);
  bool ran_on_loop = false;
  ferry::sync_wait_coroutine(io, [&]() -> asio::awaitable<void> {
    ran_on_loop = io.get_executor().running_in_this_thread();
    co_return;
  });
  BOOST_TEST(ran_on_loop);
}

FERRY_TEST_CASE(s1_the_coroutines_exception_is_rethrown_in_the_thread) {
  asio::io_context io;
  loop_thread loop(io);
  BOOST_CHECK_EXCEPTION(
      ferry::sync_wait_coroutine(io, []() -> asio::awaitable<int> {
        throw std::out_of_range("bad index");
        co_return 0;
      }),
      std::out_of_range, [](const std::out_of_range& e) { return std::string(e.what()) == "bad index"; });
}

FERRY_TEST_CASE(s2_on_the_loops_own_thread_it_refuses_at_once) {
  asio::io_context io;
  bool refused = false;
  asio::post(io, [&] {
    try {
      ferry::sync_wait_coroutine(io, add_later, 1, 1);
    } catch (const ferry::error& e) {
      refused = has_code(e, ferry::errc::would_deadlock);
    }
  });
  io.run();
  BOOST_TEST(refused);
}

FERRY_TEST_CASE(s3_a_loop_that_stops_releases_the_waiting_thread_with_an_error) {
  asio::io_context io;
  loop_thread loop(io);
  std::thread stopper([&] {
    std::this_thread::sleep_for(30ms);
    io.stop();
  });
  const auto start = std::chrono::steady_clock::now();
  BOOST_CHECK_EXCEPTION(ferry::sync_wait_coroutine(io, []() -> asio::awaitable<void> {
                          asio::steady_timer t(co_await asio::this_coro::executor, 1h);
                          co_await t.async_wait(asio::use_awaitable);
                        }),
                        ferry::error, [](const ferry::error& e) { return has_code(e, ferry::errc::loop_gone); });
  BOOST_TEST((std::chrono::steady_clock::now() - start < 1s));
  stopper.join();
}

FERRY_TEST_CASE(s3_a_loop_destroyed_first_releases_the_waiting_thread) {
  auto io = std::make_unique<asio::io_context>();
  asio::io_context::executor_type ex = io->get_executor();
  gate started;
  std::atomic<bool> released{false};
  std::thread waiter([&released, &started, ex] {
    try {
      ferry::sync_wait_coroutine(ex, [&started]() -> asio::awaitable<void> {
        started.open();
        asio::steady_timer t(co_await asio::this_coro::executor, 1h);
        co_await t.async_wait(asio::use_awaitable);
      });
    } catch (const ferry::error& e) {
      released = has_code(e, ferry::errc::loop_gone);
    }
  });
  auto work = asio::make_work_guard(*io);  // run() must not return before the spawn
  std::thread loop([&] { io->run(); });
  started.wait();  // the coroutine is suspended on its timer
  io->stop();
  loop.join();
  work.reset();
  io.reset();  // destroys the pending coroutine and its completion handler
  waiter.join();
  BOOST_TEST(released.load());
}

FERRY_TEST_CASE(s3_an_optional_timeout_gives_up_and_cancels_the_coroutine) {
  asio::io_context io;
  loop_thread loop(io);
  auto cancelled = std::make_shared<std::atomic<bool>>(false);
  BOOST_CHECK_EXCEPTION(
      ferry::sync_wait_coroutine_for(30ms, io, [cancelled]() -> asio::awaitable<void> {
        asio::steady_timer t(co_await asio::this_coro::executor, 1h);
        try {
          co_await t.async_wait(asio::use_awaitable);
        } catch (const std::system_error&) {
          *cancelled = true;
        }
      }),
      ferry::error, [](const ferry::error& e) { return has_code(e, ferry::errc::timed_out); });
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (!cancelled->load() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
  BOOST_TEST(cancelled->load());
}

FERRY_TEST_CASE(s4_sync_await_inside_threaded_code_reaches_the_calling_loop) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  auto in_thread = ferry::threaded(pool, [&] {
    return ferry::sync_await([&]() -> asio::awaitable<bool> {
      co_return io.get_executor().running_in_this_thread();
    });
  });
  bool reached = false;
  ferry::co_spawn(io, [&]() -> asio::awaitable<void> { reached = co_await in_thread(); },
                  asio::detached);
  io.run();
  BOOST_TEST(reached);
}

FERRY_TEST_CASE(s4_sync_await_without_a_known_loop_fails_at_once) {
  BOOST_CHECK_EXCEPTION(ferry::sync_await([]() -> asio::awaitable<void> { co_return; }),
                        ferry::error, [](const ferry::error& e) {
                          return has_code(e, ferry::errc::no_loop) &&
                                 std::string(e.what()).find("sync_await") != std::string::npos;
                        });
}

FERRY_TEST_CASE(s5_nesting_loop_threaded_sync_await_coroutine_threaded) {
  asio::io_context io;
  ferry::thread_pool outer{1}, inner{1};
  auto deepest = ferry::threaded(inner, [&] { return inner.running_in_this_thread() ? 10 : -1; });
  auto middle = ferry::threaded(outer, [&] {
    return ferry::sync_await([&]() -> asio::awaitable<int> {
      const int v = co_await deepest();
      co_return v + 1;
    });
  });
  int result = 0;
  ferry::co_spawn(io, [&]() -> asio::awaitable<void> { result = co_await middle(); }, asio::detached);
  io.run();
  BOOST_TEST(result == 11);
}

FERRY_TEST_CASE(c3_sync_wait_coroutines_see_the_calling_threads_context) {
  asio::io_context io;
  loop_thread loop(io);
  ferry::context().run([&] {
    request.set(31);
    const int seen = ferry::sync_wait_coroutine(io, []() -> asio::awaitable<int> {
      const int v = request.get();
      request.set(32);  // invisible to the caller
      co_return v;
    });
    BOOST_TEST(seen == 31);
    BOOST_TEST(request.get() == 31);
  });
}
