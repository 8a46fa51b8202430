#define BOOST_TEST_MODULE ferry_threaded
#include "test_support.hpp"

#include <ferry/ferry.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <algorithm>
#include <atomic>
#include <future>
#include <tuple>
#include <functional>
#include <latch>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#endif

using namespace std::chrono_literals;
using namespace asio::experimental::awaitable_operators;
using ferry_test::gate;

namespace {

struct payload_error : std::runtime_error {
  explicit payload_error(int v) : std::runtime_error("payload " + std::to_string(v)), value(v) {}
  int value;
};

template <class Coro>
void run_on(asio::io_context& io, Coro&& coro) {
  std::exception_ptr failure;
  ferry::co_spawn(io, std::forward<Coro>(coro), [&](std::exception_ptr e) { failure = e; });
  io.run();
  io.restart();
  if (failure) std::rethrow_exception(failure);
}

bool is_aborted(const std::system_error& e) { return e.code() == asio::error::operation_aborted; }

}  // namespace

// --- T1 -----------------------------------------------------------------------------------

FERRY_TEST_CASE(t1_co_await_runs_fn_on_a_pool_and_resumes_on_the_loop) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  auto where = ferry::threaded(pool, [&](int a, int b) {
    return std::make_pair(a * b, pool.running_in_this_thread());
  });
  run_on(io, [&]() -> asio::awaitable<void> {
    auto [product, on_pool] = co_await where(6, 7);
    BOOST_TEST(product == 42);
    BOOST_TEST(on_pool);
    BOOST_TEST(io.get_executor().running_in_this_thread());  // resumed on the loop
  });
}

FERRY_TEST_CASE(t1_sync_call_runs_inline_and_async_call_takes_any_token) {
  ferry::thread_pool pool{1};
  auto f = ferry::threaded(pool, [](int x) { return std::this_thread::get_id() == std::thread::id{} ? -1 : x + 1; });
  BOOST_TEST(f.sync_call(1) == 2);
  const auto caller = std::this_thread::get_id();
  auto on_caller = ferry::threaded(pool, [caller] { return std::this_thread::get_id() == caller; });
  BOOST_TEST(on_caller.sync_call());
  auto fut = on_caller.async_call(asio::use_future);
  BOOST_TEST(!fut.get());  // ran on the pool
  std::promise<int> p;
  f.async_call(41, [&](std::exception_ptr e, int v) {  // runs on the worker: no BOOST_TEST here
    p.set_value(e ? -1 : v);
  });
  BOOST_TEST(p.get_future().get() == 42);
}

// --- T2 -----------------------------------------------------------------------------------

FERRY_TEST_CASE(t2_unbound_calls_use_the_loops_default_pool_which_can_be_replaced) {
  asio::io_context io;
  ferry::thread_pool& def = ferry::default_pool(io);
  BOOST_TEST(&def == &ferry::default_pool(io));  // one per loop, created on first use
  BOOST_TEST(def.size() == ferry::thread_pool_options::default_thread_count());
  auto on_default = ferry::threaded([&] { return def.running_in_this_thread(); });
  ferry::thread_pool mine{1};
  auto on_mine = ferry::threaded([&] { return mine.running_in_this_thread(); });
  run_on(io, [&]() -> asio::awaitable<void> {
    BOOST_TEST(co_await on_default());
    ferry::set_default_pool(io, mine);
    BOOST_TEST(co_await on_mine());
    BOOST_TEST(co_await on_default.on(def)());  // f.on(pool) binds explicitly
  });
}

FERRY_TEST_CASE(t2_a_coroutine_on_a_ferry_pool_uses_that_pool) {
  ferry::thread_pool pool{2};
  auto on_pool = ferry::threaded([&] { return pool.running_in_this_thread(); });
  auto f = ferry::co_spawn(pool, [&]() -> asio::awaitable<bool> { co_return co_await on_pool(); },
                           asio::use_future);
  BOOST_TEST(f.get());
}

// --- T3 -----------------------------------------------------------------------------------

FERRY_TEST_CASE(t3_move_only_arguments_and_results_void_and_explicit_references) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  auto take = ferry::threaded(pool, [](std::unique_ptr<int> p) { return std::make_unique<int>(*p * 2); });
  auto nothing = ferry::threaded(pool, [] {});
  int shared = 0;
  auto by_ref = ferry::threaded(pool, [](std::reference_wrapper<int> r) { r.get() = 5; });
  auto by_value = ferry::threaded(pool, [](int copy) { copy = 9; return copy; });
  run_on(io, [&]() -> asio::awaitable<void> {
    std::unique_ptr<int> r = co_await take(std::make_unique<int>(21));
    BOOST_TEST(*r == 42);
    co_await nothing();
    co_await by_ref(std::ref(shared));
    BOOST_TEST(shared == 5);
    int local = 1;
    BOOST_TEST(co_await by_value(local) == 9);
    BOOST_TEST(local == 1);  // decay-copied
  });
}

// --- T4 -----------------------------------------------------------------------------------

FERRY_TEST_CASE(t4_exceptions_arrive_intact_with_their_type_and_payload) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  auto throw_int = ferry::threaded(pool, []() -> int { throw 17; });
  auto throw_custom = ferry::threaded(pool, [] { throw payload_error(5); });
  auto throw_system = ferry::threaded(pool, [] {
    throw std::system_error(std::make_error_code(std::errc::no_such_file_or_directory), "open");
  });
  run_on(io, [&]() -> asio::awaitable<void> {
    try {
      co_await throw_int();
      BOOST_FAIL("no exception");
    } catch (int v) {
      BOOST_TEST(v == 17);
    }
    try {
      co_await throw_custom();
      BOOST_FAIL("no exception");
    } catch (const payload_error& e) {
      BOOST_TEST(e.value == 5);
    }
    try {
      co_await throw_system();
      BOOST_FAIL("no exception");
    } catch (const std::system_error& e) {
      BOOST_TEST((e.code() == std::errc::no_such_file_or_directory));
    }
  });
}

FERRY_TEST_CASE(t4_ninety_throwing_calls_each_report_their_own_exception) {
  asio::io_context io;
  ferry::thread_pool pool{4};
  auto fail = ferry::threaded(pool, [](int i) -> int { throw payload_error(i); });
  std::vector<int> seen;
  for (int i = 0; i < 90; ++i) {
    ferry::co_spawn(
        io,
        [&, i]() -> asio::awaitable<void> {
          try {
            co_await fail(i);
          } catch (const payload_error& e) {
            seen.push_back(e.value == i ? i : -1);
          }
        },
        asio::detached);
  }
  io.run();
  std::sort(seen.begin(), seen.end());
  BOOST_TEST_REQUIRE(seen.size() == 90u);
  for (int i = 0; i < 90; ++i) BOOST_TEST(seen[static_cast<std::size_t>(i)] == i);
}

// --- T5 -----------------------------------------------------------------------------------

FERRY_TEST_CASE(t5_four_100ms_calls_on_four_workers_run_in_parallel) {
  asio::io_context io;
  ferry::thread_pool pool{4};
  auto nap = ferry::threaded(pool, [] { std::this_thread::sleep_for(100ms); });
  const auto start = std::chrono::steady_clock::now();
  run_on(io, [&]() -> asio::awaitable<void> {
    co_await (nap() && nap() && nap() && nap());
  });
  const auto took = std::chrono::steady_clock::now() - start;
  // Serial would be 400 ms; allow generous slack for slow (sanitizer) builds.
  BOOST_TEST(took < 350ms, "took " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms");
}

// --- T6 -----------------------------------------------------------------------------------

FERRY_TEST_CASE(t6_a_call_cancelled_before_it_starts_never_runs) {
  asio::io_context io;
  ferry::thread_pool pool{1};
  gate entered, release;
  pool.post([&] {
    entered.open();
    release.wait();
  });
  entered.wait();  // the only worker is busy: the next call stays queued
  std::atomic<bool> ran{false};
  auto f = ferry::threaded(pool, [&] { ran = true; return 1; });
  asio::cancellation_signal signal;
  std::exception_ptr outcome;
  bool completed = false;
  f.async_call(asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(io,
      [&](std::exception_ptr e, int) {
        outcome = e;
        completed = true;
      })));
  asio::post(io, [&] { signal.emit(asio::cancellation_type::terminal); });
  io.run();  // completes at once, while the worker is still blocked
  BOOST_TEST(completed);
  BOOST_CHECK_EXCEPTION(std::rethrow_exception(outcome), std::system_error, is_aborted);
  release.open();
  pool.wait_idle();
  BOOST_TEST(!ran.load());
}

FERRY_TEST_CASE(t6_a_running_call_gets_its_stop_token_requested) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  gate entered;
  std::atomic<bool> saw_stop{false};
  auto watch = ferry::threaded(pool, [&](std::stop_token st) {
    entered.open();
    while (!st.stop_requested()) std::this_thread::sleep_for(1ms);
    saw_stop = true;
    return 3;
  });
  run_on(io, [&]() -> asio::awaitable<void> {
    asio::steady_timer timeout(io, 20ms);
    try {
      // The timer wins the race; || cancels the threaded call, whose stop token fires.
      auto r = co_await (watch() || timeout.async_wait(asio::use_awaitable));
      BOOST_TEST(r.index() == 1u);
    } catch (const std::system_error& e) {
      BOOST_FAIL(e.what());
    }
  });
  BOOST_TEST(entered.is_open());
  BOOST_TEST(saw_stop.load());
}

FERRY_TEST_CASE(t6_a_running_call_without_stop_token_finishes_and_its_result_is_discarded) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  gate entered, release;
  std::atomic<bool> finished{false};
  auto busy = ferry::threaded(pool, [&] {
    entered.open();
    release.wait();
    finished = true;
    return 8;
  });
  asio::cancellation_signal signal;
  std::exception_ptr outcome;
  int calls = 0;
  busy.async_call(asio::bind_cancellation_slot(signal.slot(), asio::bind_executor(io,
      [&](std::exception_ptr e, int) {
        outcome = e;
        ++calls;
      })));
  entered.wait();
  std::thread releaser([&] {
    std::this_thread::sleep_for(20ms);
    release.open();
  });
  asio::post(io, [&] { signal.emit(asio::cancellation_type::terminal); });
  io.run();  // returns once the call has finished and reported, once
  releaser.join();
  BOOST_TEST(finished.load());
  BOOST_TEST(calls == 1);
  BOOST_CHECK_EXCEPTION(std::rethrow_exception(outcome), std::system_error, is_aborted);
}

// --- T7 -----------------------------------------------------------------------------------

FERRY_TEST_CASE(t7_co_await_form_starts_only_when_awaited) {
  asio::io_context io;
  ferry::thread_pool pool{1};
  std::atomic<int> runs{0};
  auto f = ferry::threaded(pool, [&] { ++runs; });
  run_on(io, [&]() -> asio::awaitable<void> {
    {
      auto never_awaited = f();  // made, dropped: never starts
    }
    auto later = f();
    BOOST_TEST(runs.load() == 0);
    co_await std::move(later);
    BOOST_TEST(runs.load() == 1);
  });
  pool.wait_idle();
  BOOST_TEST(runs.load() == 1);
  BOOST_TEST(pool.stats().submitted == 1u);
}

// --- T8 -----------------------------------------------------------------------------------

namespace {
std::string thread_name() {
#if defined(__linux__)
  char buf[32] = {};
  pthread_getname_np(pthread_self(), buf, sizeof buf);
  return buf;
#else
  return {};
#endif
}
}  // namespace

FERRY_TEST_CASE(t8_threaded_separate_runs_each_call_on_a_named_thread_of_its_own) {
  asio::io_context io;
  ferry::thread_pool& def = ferry::default_pool(io);
  auto named = ferry::threaded_separate(
      [&] { return std::make_tuple(thread_name(), std::this_thread::get_id(), def.running_in_this_thread()); },
      "sep-worker");
  auto unnamed = ferry::threaded_separate([] { return thread_name(); });
  std::latch both{2};
  auto meet = ferry::threaded_separate([&] { both.arrive_and_wait(); }, "meet");
  run_on(io, [&]() -> asio::awaitable<void> {
    auto [name1, id1, on_pool1] = co_await named();
    BOOST_TEST(name1 == "sep-worker");
    BOOST_TEST(!on_pool1);
    BOOST_TEST((id1 != std::this_thread::get_id()));
    co_await (meet() && meet());  // both calls are inside the latch at once: two threads
    const std::string site = co_await unnamed();
    BOOST_TEST(site.find("threaded_test") == 0u);  // named after the call site
  });
}

FERRY_TEST_CASE(t8_separate_threads_are_accounted_for_by_the_loop) {
  asio::io_context io;
  gate entered, release;
  auto slow = ferry::threaded_separate([&] {
    entered.open();
    release.wait();
  }, "accounted");
  slow.async_call(asio::bind_executor(io, [](std::exception_ptr) {}));
  entered.wait();
  auto registry = asio::use_service<ferry::detail::loop_service>(io).separate_threads();
  auto running = registry->running();
  BOOST_TEST_REQUIRE(running.size() == 1u);
  BOOST_TEST(running[0].name == "accounted");
  BOOST_TEST(registry->wait_all_for(10ms).size() == 1u);
  release.open();
  BOOST_TEST(registry->wait_all_for(30s).empty());
  io.run();
}

// --- T9 and pool closed -----------------------------------------------------------------

FERRY_TEST_CASE(t9_the_loop_keeps_running_while_fn_blocks) {
  asio::io_context io;
  ferry::thread_pool pool{1};
  gate release;
  auto blocked = ferry::threaded(pool, [&] {
    release.wait();
    return 1;
  });
  bool timer_fired_while_blocked = false;
  run_on(io, [&]() -> asio::awaitable<void> {
    asio::steady_timer t(io, 5ms);
    t.async_wait([&](std::error_code) {
      timer_fired_while_blocked = !release.is_open();
      release.open();  // only the loop can unblock the call: proves it is not blocked
    });
    BOOST_TEST(co_await blocked() == 1);
  });
  BOOST_TEST(timer_fired_while_blocked);
}

FERRY_TEST_CASE(a_call_on_a_stopped_pool_completes_with_pool_closed) {
  asio::io_context io;
  ferry::thread_pool pool{1};
  pool.stop();
  auto f = ferry::threaded(pool, [] { return 1; });
  run_on(io, [&]() -> asio::awaitable<void> {
    try {
      co_await f();
      BOOST_FAIL("no exception");
    } catch (const ferry::error& e) {
      BOOST_TEST((e.code() == ferry::errc::pool_closed));
    }
  });
}

FERRY_TEST_CASE(many_calls_in_flight_all_complete_exactly_once) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  auto square = ferry::threaded(pool, [](int i) { return i * i; });
  long sum = 0;
  int done = 0;
  for (int i = 0; i < 2000; ++i) {
    ferry::co_spawn(
        io,
        [&, i]() -> asio::awaitable<void> {
          sum += co_await square(i);
          ++done;
        },
        asio::detached);
  }
  io.run();
  BOOST_TEST(done == 2000);
  long expected = 0;
  for (long i = 0; i < 2000; ++i) expected += i * i;
  BOOST_TEST(sum == expected);
}

FERRY_TEST_CASE(a_new_loop_at_a_dead_loops_address_gets_its_own_services) {
  // The per-thread cache of loop services must never hand a new loop its predecessor's.
  for (int round = 0; round < 3; ++round) {
    auto io = std::make_unique<asio::io_context>();
    ferry::thread_pool& def = ferry::default_pool(*io);
    auto on_default = ferry::threaded([&] { return def.running_in_this_thread(); });
    bool ok = false;
    ferry::co_spawn(*io, [&]() -> asio::awaitable<void> { ok = co_await on_default(); },
                    asio::detached);
    io->run();
    BOOST_TEST(ok);
  }
}
