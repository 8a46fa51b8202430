#define BOOST_TEST_MODULE ferry_context
#include "test_support.hpp"

#include <ferry/ferry.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/channel.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using ferry_test::gate;

namespace {
ferry::context_var<int> user_id{"user_id"};
ferry::context_var<std::string> trace{"trace", "none"};

bool is_code(const ferry::error& e, ferry::errc c) { return e.code() == c; }
}  // namespace

// --- C1 -----------------------------------------------------------------------------------

FERRY_TEST_CASE(c1_get_without_value_or_default_names_the_variable) {
  ferry::context().run([] {
    BOOST_CHECK_EXCEPTION(user_id.get(), ferry::error, [](const ferry::error& e) {
      return is_code(e, ferry::errc::no_value) &&
             std::string(e.what()).find("user_id") != std::string::npos;
    });
    BOOST_TEST(trace.get() == "none");  // the default
    BOOST_TEST(!user_id.has_value());
    BOOST_TEST(user_id.get_or(5) == 5);
  });
}

FERRY_TEST_CASE(c1_set_returns_a_token_and_reset_restores_the_previous_value) {
  ferry::context().run([] {
    auto t1 = user_id.set(1);
    auto t2 = user_id.set(2);
    BOOST_TEST(user_id.get() == 2);
    user_id.reset(t2);
    BOOST_TEST(user_id.get() == 1);
    user_id.reset(t1);
    BOOST_TEST(!user_id.has_value());
    BOOST_CHECK_EXCEPTION(user_id.reset(t1), ferry::error, [](const ferry::error& e) {
      return is_code(e, ferry::errc::invalid_token);
    });
  });
}

FERRY_TEST_CASE(c1_a_token_is_only_valid_in_the_context_that_made_it) {
  ferry::context a, b;
  std::optional<ferry::context_var<int>::token> token;
  a.run([&] { token.emplace(user_id.set(3)); });
  b.run([&] {
    BOOST_CHECK_EXCEPTION(user_id.reset(*token), ferry::error, [](const ferry::error& e) {
      return is_code(e, ferry::errc::invalid_token);
    });
  });
  a.run([&] { BOOST_TEST(user_id.get() == 3); });  // values stay in the context object
}

FERRY_TEST_CASE(copy_context_snapshots_are_independent) {
  ferry::context().run([] {
    user_id.set(10);
    ferry::context copy = ferry::copy_context();
    user_id.set(11);
    copy.run([] {
      BOOST_TEST(user_id.get() == 10);
      user_id.set(12);
    });
    BOOST_TEST(user_id.get() == 11);
  });
}

// --- C2, C4 -------------------------------------------------------------------------------

namespace {
asio::awaitable<int> write_then_wait(int mine, std::chrono::milliseconds delay) {
  user_id.set(mine);
  asio::steady_timer timer(co_await asio::this_coro::executor, delay);
  co_await timer.async_wait(asio::use_awaitable);
  co_return user_id.get();
}
}  // namespace

FERRY_TEST_CASE(c2_spawned_tasks_write_their_own_copies) {
  asio::io_context io;
  ferry::context().run([&] {
    user_id.set(1);
    std::vector<int> seen(8, 0);
    for (int i = 0; i < 8; ++i) {
      ferry::co_spawn(io, write_then_wait(100 + i, std::chrono::milliseconds(8 - i)),
                      [&seen, i](std::exception_ptr e, int v) {
                        BOOST_TEST(!e);
                        seen[static_cast<std::size_t>(i)] = v;
                      });
    }
    io.run();
    for (int i = 0; i < 8; ++i) BOOST_TEST(seen[static_cast<std::size_t>(i)] == 100 + i);
    BOOST_TEST(user_id.get() == 1);  // the spawner's value is untouched
  });
}

FERRY_TEST_CASE(c2_a_task_starts_with_a_copy_of_its_spawners_context) {
  asio::io_context io;
  ferry::context().run([&] {
    user_id.set(41);
    int seen = 0;
    ferry::co_spawn(
        io, []() -> asio::awaitable<int> { co_return user_id.get(); },
        [&](std::exception_ptr, int v) { seen = v; });
    user_id.set(42);  // after the spawn: not seen by the task
    io.run();
    BOOST_TEST(seen == 41);
  });
}

namespace {
using channel = asio::experimental::channel<void(std::error_code, int)>;

asio::awaitable<void> survive_every_kind_of_wait(int mine, channel& in, gate& event_seen,
                                                 std::vector<int>& out) {
  user_id.set(mine);
  auto ex = co_await asio::this_coro::executor;
  asio::steady_timer timer(ex, 1ms);
  co_await timer.async_wait(asio::use_awaitable);
  out.push_back(user_id.get());
  const int from_worker = co_await ferry::threaded([] { return user_id.get(); })();
  out.push_back(from_worker);
  out.push_back(user_id.get());
  const int received = co_await in.async_receive(asio::use_awaitable);
  out.push_back(received == mine ? user_id.get() : -1);
  event_seen.open();
}
}  // namespace

FERRY_TEST_CASE(c4_context_survives_a_timer_a_threaded_call_and_a_channel_wait) {
  asio::io_context io;
  channel a(io, 1), b(io, 1);
  gate seen_a, seen_b;
  std::vector<int> out_a, out_b;
  ferry::co_spawn(io, survive_every_kind_of_wait(1, a, seen_a, out_a), asio::detached);
  ferry::co_spawn(io, survive_every_kind_of_wait(2, b, seen_b, out_b), asio::detached);
  // Another task sends on the channels (the "event set by another task").
  ferry::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        user_id.set(99);
        asio::steady_timer t(io, 20ms);
        co_await t.async_wait(asio::use_awaitable);
        co_await b.async_send(std::error_code{}, 2, asio::use_awaitable);
        co_await a.async_send(std::error_code{}, 1, asio::use_awaitable);
      },
      asio::detached);
  io.run();
  BOOST_TEST(out_a == (std::vector<int>{1, 1, 1, 1}), boost::test_tools::per_element());
  BOOST_TEST(out_b == (std::vector<int>{2, 2, 2, 2}), boost::test_tools::per_element());
}

// --- C3 -----------------------------------------------------------------------------------

FERRY_TEST_CASE(c3_a_threaded_call_runs_in_a_snapshot_taken_at_initiation) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  gate started, release;
  auto blocked_read = ferry::threaded(pool, [&] {
    started.open();
    release.wait();
    const int seen = user_id.get();
    user_id.set(-1);  // a worker's write never flows back
    return seen;
  });
  ferry::context().run([&] {
    user_id.set(7);
    auto f = blocked_read.async_call(asio::use_future);  // starts at initiation
    started.wait();
    user_id.set(8);  // after initiation: not seen by the call
    release.open();
    auto w = asio::make_work_guard(io);
    std::thread loop([&] { io.run_for(5s); });
    BOOST_TEST(f.get() == 7);
    w.reset();
    io.stop();
    loop.join();
    BOOST_TEST(user_id.get() == 8);
  });
}

FERRY_TEST_CASE(c3_eight_concurrent_calls_with_eight_values_each_see_their_own) {
  asio::io_context io;
  ferry::thread_pool pool{4};
  auto echo = ferry::threaded(pool, [](int expected) {
    std::this_thread::sleep_for(1ms);
    return user_id.get() == expected ? expected : -1;
  });
  std::vector<int> results;
  for (int i = 0; i < 8; ++i) {
    ferry::co_spawn(
        io,
        [&, i]() -> asio::awaitable<void> {
          user_id.set(i);
          const int r = co_await echo(i);
          results.push_back(r);
        },
        asio::detached);
  }
  io.run();
  std::sort(results.begin(), results.end());
  BOOST_TEST(results == (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}), boost::test_tools::per_element());
}

FERRY_TEST_CASE(c3_threaded_separate_sees_the_callers_context) {
  asio::io_context io;
  auto read = ferry::threaded_separate([] { return user_id.get(); }, "ctx-sep");
  int seen = 0;
  ferry::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        user_id.set(77);
        seen = co_await read();
      },
      asio::detached);
  io.run();
  BOOST_TEST(seen == 77);
}

// --- C6 -----------------------------------------------------------------------------------

FERRY_TEST_CASE(c6_shared_context_can_be_awaited_before_and_after_it_is_set) {
  asio::io_context io;
  auto& shared = ferry::shared_context::of(io);
  BOOST_TEST(&shared == &ferry::shared_context::of(io));
  std::vector<std::string> got;
  ferry::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        got.push_back(co_await shared.async_get<std::string>("greeting", asio::use_awaitable));
        got.push_back(co_await shared.async_get<std::string>("greeting", asio::use_awaitable));
      },
      asio::detached);
  io.poll();  // the first wait is now pending
  BOOST_TEST(got.empty());
  std::thread setter([&] { shared.set("greeting", std::string("hello")); });  // any thread
  setter.join();
  io.run();
  BOOST_TEST(got == (std::vector<std::string>{"hello", "hello"}), boost::test_tools::per_element());
  shared.set("greeting", std::string("again"));  // re-set replaces for later readers
  BOOST_TEST(*shared.get<std::string>("greeting") == "again");
  BOOST_TEST(shared.contains("greeting"));
  BOOST_CHECK_EXCEPTION(shared.get<int>("greeting"), ferry::error, [](const ferry::error& e) {
    return is_code(e, ferry::errc::invalid_argument) &&
           std::string(e.what()).find("greeting") != std::string::npos;
  });
}

FERRY_TEST_CASE(c6_shared_context_is_not_copied_per_task) {
  asio::io_context io;
  auto& shared = ferry::shared_context::of(io);
  ferry::co_spawn(
      io, [&]() -> asio::awaitable<void> { shared.set("from_task", 5); co_return; },
      asio::detached);
  io.run();
  BOOST_TEST(*shared.get<int>("from_task") == 5);  // visible to everyone, unlike context_var
}

FERRY_TEST_CASE(c6_clear_and_cancellation_complete_pending_waits_with_operation_aborted) {
  asio::io_context io;
  auto& shared = ferry::shared_context::of(io);
  std::error_code cleared, cancelled;
  shared.async_get<int>("never",
                        asio::bind_executor(io, [&](std::error_code ec, int) { cleared = ec; }));
  asio::cancellation_signal signal;
  shared.async_get<int>(
      "never2", asio::bind_cancellation_slot(
                    signal.slot(),
                    asio::bind_executor(io, [&](std::error_code ec, int) { cancelled = ec; })));
  io.poll();
  signal.emit(asio::cancellation_type::terminal);
  shared.clear();
  io.run();
  BOOST_TEST((cleared == asio::error::operation_aborted));
  BOOST_TEST((cancelled == asio::error::operation_aborted));
  BOOST_TEST(!shared.contains("never"));
}
