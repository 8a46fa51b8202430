#define BOOST_TEST_MODULE ferry_from_thread_channel
#include "test_support.hpp"

#include <ferry/ferry.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/detached.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <future>
#include <latch>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <typeinfo>
#include <utility>
#include <vector>

using namespace std::chrono_literals;
using namespace asio::experimental::awaitable_operators;
using ferry_test::gate;

namespace {

using steady = std::chrono::steady_clock;

// co_await yields std::tuple<std::exception_ptr, T> instead of throwing.
auto tuple_token() { return asio::experimental::as_tuple(asio::use_awaitable); }

template <class Coro>
void run_on(asio::io_context& io, Coro&& coro) {
  std::exception_ptr failure;
  ferry::co_spawn(io, std::forward<Coro>(coro), [&](std::exception_ptr e) { failure = e; });
  io.run();
  io.restart();
  if (failure) std::rethrow_exception(failure);
}

// The error code a ferry::error carries; a distinct marker for anything else; {} for null.
std::error_code code_of(const std::exception_ptr& eptr) {
  if (!eptr) return {};
  try {
    std::rethrow_exception(eptr);
  } catch (const ferry::error& err) {
    return err.code();
  } catch (...) {
    return std::make_error_code(std::errc::state_not_recoverable);
  }
}

bool is_channel_closed(const ferry::error& e) { return e.code() == ferry::errc::channel_closed; }
bool is_timed_out(const ferry::error& e) { return e.code() == ferry::errc::timed_out; }
bool is_invalid_argument(const ferry::error& e) {
  return e.code() == ferry::errc::invalid_argument;
}
bool is_aborted(const ferry::error& e) { return e.code() == asio::error::operation_aborted; }

long long ms_between(steady::time_point from, steady::time_point to) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(to - from).count();
}

struct payload_error : std::runtime_error {
  explicit payload_error(int v) : std::runtime_error("payload " + std::to_string(v)), value(v) {}
  int value;
};

// Runs `f` when the scope ends, also on a failing path (closes channels, joins threads).
template <class F>
struct on_scope_exit {
  explicit on_scope_exit(F fn) : f(std::move(fn)) {}
  F f;
  on_scope_exit(const on_scope_exit&) = delete;
  on_scope_exit& operator=(const on_scope_exit&) = delete;
  ~on_scope_exit() { f(); }
};

void join_all(std::vector<std::thread>& threads) {
  for (auto& t : threads) {
    if (t.joinable()) t.join();
  }
}

// An io_context run by `n` threads and kept alive by a work guard until finish().
class loop_threads {
public:
  explicit loop_threads(int n = 1) {
    for (int i = 0; i < n; ++i) threads_.emplace_back([this] { io.run(); });
  }
  ~loop_threads() { finish(); }
  loop_threads(const loop_threads&) = delete;
  loop_threads& operator=(const loop_threads&) = delete;

  void finish() {
    guard_.reset();
    join_all(threads_);
  }

  asio::io_context io;

private:
  asio::executor_work_guard<asio::io_context::executor_type> guard_{io.get_executor()};
  std::vector<std::thread> threads_;
};

// Items of the multi-producer tests: producer number in the high half, sequence in the low.
std::uint64_t encode(std::size_t producer, std::uint32_t seq) {
  return (static_cast<std::uint64_t>(producer) << 32) | seq;
}
std::size_t producer_of(std::uint64_t v) { return static_cast<std::size_t>(v >> 32); }
std::uint32_t seq_of(std::uint64_t v) { return static_cast<std::uint32_t>(v & 0xffffffffu); }

using u64_channel = ferry::from_thread_channel<std::uint64_t>;

// What one consumer coroutine saw (written on the loop thread, read on the main thread
// after the loop threads were joined).
struct consumer_log {
  explicit consumer_log(std::size_t producers) : next(producers, 0) {}
  std::vector<std::uint32_t> next;  // per producer: the smallest sequence not yet seen
  std::vector<std::uint64_t> values;
  bool ordered = true;             // per-producer FIFO held for this consumer
  bool bad_batch = false;          // a successful batch was empty or larger than asked
  std::exception_ptr end;          // how the stream ended
  std::exception_ptr failure;      // the coroutine itself failed
  void record(std::uint64_t v) {
    const std::size_t p = producer_of(v);
    const std::uint32_t s = seq_of(v);
    if (p >= next.size() || s < next[p]) {
      ordered = false;
    } else {
      next[p] = s + 1;
    }
    values.push_back(v);
  }
};

// Optionally closes the channel from the loop side once `at` items were received in total.
struct loop_close_plan {
  std::atomic<std::uint64_t>* received = nullptr;
  std::uint64_t at = 0;
  std::exception_ptr with;
};

// Drains `ch` until it ends: one item at a time (batch == 0) or in batches of `batch`.
asio::awaitable<void> consume_all(u64_channel& ch, consumer_log& log, std::size_t batch,
                                  loop_close_plan plan) {
  for (;;) {
    std::uint64_t got = 0;
    if (batch == 0) {
      auto [e, v] = co_await ch.async_get(tuple_token());
      if (e) {
        log.end = e;
        co_return;
      }
      log.record(v);
      got = 1;
    } else {
      auto [e, items] = co_await ch.async_get_batch(batch, tuple_token());
      if (e) {
        log.end = e;
        co_return;
      }
      if (items.empty() || items.size() > batch) log.bad_batch = true;
      for (std::uint64_t v : items) log.record(v);
      got = items.size();
    }
    if (plan.received != nullptr) {
      const std::uint64_t before = plan.received->fetch_add(got);
      if (before < plan.at && before + got >= plan.at) {
        if (plan.with) {
          ch.close(plan.with);
        } else {
          ch.close();
        }
      }
    }
  }
}

// Whether a channel of `cap` refuses an item beyond max_size. The concurrent tests skip a
// capacity for which it does not (max_size 1 today: see
// h1_max_size_one_holds_exactly_one_item), since the corrupted ring then makes any get spin
// forever and would take the whole suite down with a timeout.
bool bound_is_enforced(std::size_t cap) {
  asio::io_context io;
  ferry::from_thread_channel<std::size_t> ch{io, cap};
  for (std::size_t i = 0; i < cap; ++i) {
    if (ch.try_put(i) != ferry::put_status::ok) return false;
  }
  std::size_t extra = cap;
  return ch.try_put(extra) == ferry::put_status::full;
}

}  // namespace

// --- H1: construction and bounds ------------------------------------------------------------

FERRY_TEST_CASE(h1_constructs_from_an_executor_or_an_io_context_and_delivers_on_its_executor) {
  asio::io_context io;
  ferry::from_thread_channel<int> from_executor{io.get_executor(), 4};
  ferry::from_thread_channel<int> from_context{io, 8};
  ferry::from_thread_channel<int, asio::io_context::executor_type> typed{io.get_executor(), 2};
  BOOST_TEST(from_executor.max_size() == 4u);
  BOOST_TEST(from_context.max_size() == 8u);
  BOOST_TEST(typed.max_size() == 2u);
  BOOST_TEST((from_executor.get_executor() == asio::any_io_executor(io.get_executor())));
  BOOST_TEST((from_context.get_executor() == asio::any_io_executor(io.get_executor())));
  BOOST_TEST((typed.get_executor() == io.get_executor()));
  BOOST_TEST(from_executor.size() == 0u);
  BOOST_TEST(!from_context.closed());
  BOOST_TEST(typed.produced() == 0u);
  BOOST_TEST(typed.consumed() == 0u);

  BOOST_TEST(from_executor.put(1));
  BOOST_TEST(from_context.put(2));
  BOOST_TEST(typed.put(3));
  std::vector<int> got;
  bool all_on_loop = true;
  // A plain callback names no executor: the channel's executor runs it.
  auto record = [&](std::exception_ptr e, int v) {
    all_on_loop = all_on_loop && io.get_executor().running_in_this_thread();
    got.push_back(e ? -1 : v);
  };
  from_executor.async_get(record);
  from_context.async_get(record);
  typed.async_get(record);
  BOOST_TEST(got.empty());  // never completes inside the initiating function
  io.run();
  std::sort(got.begin(), got.end());
  BOOST_TEST(got == std::vector<int>({1, 2, 3}));
  BOOST_TEST(all_on_loop);
}

FERRY_TEST_CASE(h1_a_channel_built_on_a_strand_runs_plain_callbacks_on_that_strand) {
  loop_threads loop(2);
  auto strand = asio::make_strand(loop.io);
  ferry::from_thread_channel<int> ch{strand, 4};
  constexpr int n = 300;
  std::vector<int> got;  // touched on the strand only, then by main after `done`
  bool off_strand = false;
  std::error_code end;
  gate done;
  struct chain {
    ferry::from_thread_channel<int>* ch;
    asio::strand<asio::io_context::executor_type> strand;
    std::vector<int>* got;
    bool* off_strand;
    std::error_code* end;
    gate* done;
    void operator()(std::exception_ptr e, int v) const {
      if (!strand.running_in_this_thread()) *off_strand = true;
      if (e) {
        *end = code_of(e);
        done->open();
        return;
      }
      got->push_back(v);
      ch->async_get(*this);
    }
  };
  ch.async_get(chain{&ch, strand, &got, &off_strand, &end, &done});
  std::thread producer([&] {
    for (int i = 0; i < n; ++i) {
      if (!ch.put(i)) break;
    }
    ch.close();
  });
  on_scope_exit cleanup{[&] {
    ch.close();
    if (producer.joinable()) producer.join();
  }};
  BOOST_TEST_REQUIRE(done.wait_for(60s));
  producer.join();
  loop.finish();
  BOOST_TEST(!off_strand);
  BOOST_TEST((end == ferry::errc::channel_closed));
  BOOST_TEST_REQUIRE(got.size() == static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) BOOST_TEST(got[static_cast<std::size_t>(i)] == i);
}

FERRY_TEST_CASE(h1_max_size_zero_is_unbounded_a_producer_puts_100k_items_with_no_consumer) {
  asio::io_context io;
  ferry::from_thread_channel<int> ch{io, 0};
  BOOST_TEST(ch.max_size() == 0u);
  constexpr int n = 100'000;
  gate done;
  int accepted = 0;
  std::thread producer([&] {
    for (int i = 0; i < n; ++i) {
      if (ch.put(i)) ++accepted;
    }
    done.open();
  });
  const bool finished = done.wait_for(60s);
  if (!finished) ch.close();  // releases a (wrongly) blocked put so that the test can end
  producer.join();
  BOOST_TEST_REQUIRE(finished, "a put blocked on an unbounded channel");
  BOOST_TEST(accepted == n);
  BOOST_TEST(ch.size() == static_cast<std::size_t>(n));
  BOOST_TEST(ch.produced() == static_cast<std::uint64_t>(n));
  BOOST_TEST(ch.producer_blocked().count() == 0);
  int expected = 0;
  bool in_order = true;
  while (auto item = ch.try_get()) {
    in_order = in_order && *item == expected;
    ++expected;
  }
  BOOST_TEST(expected == n);
  BOOST_TEST(in_order);
  BOOST_TEST(ch.size() == 0u);
  BOOST_TEST(ch.consumed() == static_cast<std::uint64_t>(n));
  io.restart();
  BOOST_TEST(io.poll() == 0u);  // nobody waited, so the loop was never posted to
}

FERRY_TEST_CASE(h1_max_size_one_holds_exactly_one_item) {
  asio::io_context io;
  ferry::from_thread_channel<int> ch{io, 1};
  int first = 1;
  int second = 2;
  BOOST_TEST((ch.try_put(first) == ferry::put_status::ok));
  const ferry::put_status s = ch.try_put(second);
  BOOST_TEST((s == ferry::put_status::full), "a second item went into a channel of max_size 1");
  BOOST_TEST(ch.size() <= 1u);
  if (s != ferry::put_status::full) return;  // the ring is corrupt: a get would spin forever
  std::optional<int> got = ch.try_get();
  BOOST_TEST_REQUIRE(got.has_value());
  BOOST_TEST(*got == 1);
  BOOST_TEST((ch.try_put(second) == ferry::put_status::ok));
  got = ch.try_get();
  BOOST_TEST_REQUIRE(got.has_value());
  BOOST_TEST(*got == 2);
}

FERRY_TEST_CASE(h1_a_bounded_channel_holds_exactly_max_size_items_for_any_capacity) {
  asio::io_context io;
  for (std::size_t cap : {std::size_t{1}, std::size_t{3}, std::size_t{5}, std::size_t{16},
                          std::size_t{1024}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      ferry::from_thread_channel<std::size_t> ch{io, cap};
      for (std::size_t i = 0; i < cap; ++i) {
        BOOST_TEST_REQUIRE((ch.try_put(i) == ferry::put_status::ok));
      }
      BOOST_TEST(ch.size() == cap);
      std::size_t extra = cap;
      const bool refused = ch.try_put(extra) == ferry::put_status::full;
      BOOST_TEST(refused, "an item beyond max_size was accepted");  // not rounded up
      if (!refused) continue;  // the ring is corrupt: a get would spin forever
      // One out, one in, over several laps of the ring: FIFO, always exactly full.
      bool in_order = true;
      bool exact = true;
      for (std::size_t k = 0; k < 3 * cap + 2; ++k) {
        const std::optional<std::size_t> v = ch.try_get();
        in_order = in_order && v.has_value() && *v == k;
        exact = exact && ch.size() == cap - 1;
        std::size_t next = cap + k;
        exact = exact && ch.try_put(next) == ferry::put_status::ok;
        exact = exact && ch.size() == cap;
        std::size_t one_more = 0;
        exact = exact && ch.try_put(one_more) == ferry::put_status::full;
      }
      BOOST_TEST(in_order);
      BOOST_TEST(exact);
    }
  }
}

FERRY_TEST_CASE(h1_size_never_exceeds_max_size_as_seen_by_the_producer_and_the_consumer) {
  for (std::size_t cap : {std::size_t{1}, std::size_t{3}, std::size_t{5}, std::size_t{16},
                          std::size_t{1024}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      if (!bound_is_enforced(cap)) {
        BOOST_ERROR("max_size " << cap << " does not refuse an extra item; concurrent check "
                                           "skipped (it would hang)");
        continue;
      }
      asio::io_context io;
      ferry::from_thread_channel<std::size_t> ch{io, cap};
      const std::size_t n = std::max<std::size_t>(4 * cap, 3000);
      std::size_t producer_max = 0;
      bool all_accepted = true;
      std::thread producer([&] {
        for (std::size_t i = 0; i < n; ++i) {
          if (!ch.put(i)) {
            all_accepted = false;
            break;
          }
          producer_max = std::max(producer_max, ch.size());
        }
        ch.close();
      });
      on_scope_exit cleanup{[&] {
        ch.close();
        if (producer.joinable()) producer.join();
      }};
      std::size_t consumer_max = 0;
      std::size_t received = 0;
      bool in_order = true;
      std::error_code end;
      run_on(io, [&]() -> asio::awaitable<void> {
        for (;;) {
          consumer_max = std::max(consumer_max, ch.size());
          auto [e, v] = co_await ch.async_get(tuple_token());
          if (e) {
            end = code_of(e);
            break;
          }
          in_order = in_order && v == received;
          ++received;
          consumer_max = std::max(consumer_max, ch.size());
        }
      });
      producer.join();
      BOOST_TEST(all_accepted);
      BOOST_TEST(producer_max <= cap);
      BOOST_TEST(consumer_max <= cap);
      BOOST_TEST(received == n);
      BOOST_TEST(in_order);
      BOOST_TEST((end == ferry::errc::channel_closed));
    }
  }
}

// --- H2: the thread side ----------------------------------------------------------------

FERRY_TEST_CASE(h2_put_blocks_while_full_until_the_loop_consumer_takes_an_item) {
  asio::io_context io;
  ferry::from_thread_channel<int> ch{io, 2};
  BOOST_TEST(ch.put(1));
  BOOST_TEST(ch.put(2));
  gate about_to_put;
  std::atomic<bool> returned{false};
  bool put_result = false;
  std::thread producer([&] {
    about_to_put.open();
    put_result = ch.put(3);
    returned = true;
  });
  on_scope_exit cleanup{[&] {
    ch.close();
    if (producer.joinable()) producer.join();
  }};
  about_to_put.wait();
  bool returned_while_full = true;
  std::size_t size_while_full = 0;
  std::vector<int> got;
  run_on(io, [&]() -> asio::awaitable<void> {
    asio::steady_timer pause(io, 50ms);  // slowness only: a put that did not block would return
    co_await pause.async_wait(asio::use_awaitable);
    returned_while_full = returned.load();
    size_while_full = ch.size();
    const int first = co_await ch.async_get(asio::use_awaitable);  // makes room
    got.push_back(first);
  });
  producer.join();  // returns only because the consumer took an item
  BOOST_TEST(!returned_while_full);
  BOOST_TEST(size_while_full == 2u);
  BOOST_TEST(put_result);
  std::optional<int> second = ch.try_get();
  std::optional<int> third = ch.try_get();
  BOOST_TEST_REQUIRE(got.size() == 1u);
  BOOST_TEST(got[0] == 1);
  BOOST_TEST_REQUIRE(second.has_value());
  BOOST_TEST(*second == 2);
  BOOST_TEST_REQUIRE(third.has_value());
  BOOST_TEST(*third == 3);  // the blocked item went in behind the others
}

FERRY_TEST_CASE(h2_put_after_close_returns_false_without_throwing_and_leaves_the_item_intact) {
  asio::io_context io;
  const std::string original = std::string(64, 'x') + " long enough to live on the heap";
  for (std::size_t cap : {std::size_t{0}, std::size_t{1}, std::size_t{4}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      ferry::from_thread_channel<std::string> ch{io, cap};
      ch.close();
      BOOST_TEST(ch.closed());
      std::string s = original;
      bool accepted = true;
      BOOST_CHECK_NO_THROW(accepted = ch.put(std::move(s)));
      BOOST_TEST(!accepted);
      BOOST_TEST(s == original);  // not moved from
      BOOST_TEST(!ch.put(original));  // the copying overload too
      BOOST_TEST(ch.produced() == 0u);
      BOOST_TEST(ch.size() == 0u);
    }
  }
  // While open, the copying overload copies: the caller's item stays as it was.
  ferry::from_thread_channel<std::string> open{io, 2};
  BOOST_TEST(open.put(original));
  std::optional<std::string> copy = open.try_get();
  BOOST_TEST_REQUIRE(copy.has_value());
  BOOST_TEST(*copy == original);
  for (std::size_t cap : {std::size_t{0}, std::size_t{2}}) {
    ferry::from_thread_channel<std::unique_ptr<int>> owners{io, cap};
    owners.close();
    auto p = std::make_unique<int>(7);
    BOOST_TEST(!owners.put(std::move(p)));
    BOOST_TEST_REQUIRE(static_cast<bool>(p));
    BOOST_TEST(*p == 7);
  }
}

FERRY_TEST_CASE(h2_a_put_blocked_on_a_full_channel_returns_false_on_close_with_its_item_intact) {
  asio::io_context io;
  ferry::from_thread_channel<std::unique_ptr<int>> ch{io, 2};
  BOOST_TEST(ch.put(std::make_unique<int>(0)));
  BOOST_TEST(ch.put(std::make_unique<int>(1)));
  gate about_to_put;
  bool put_result = true;
  bool intact = false;
  std::thread producer([&] {
    auto p = std::make_unique<int>(2);
    about_to_put.open();
    put_result = ch.put(std::move(p));
    intact = p && *p == 2;
  });
  on_scope_exit cleanup{[&] {
    ch.close();
    if (producer.joinable()) producer.join();
  }};
  about_to_put.wait();
  std::this_thread::sleep_for(20ms);  // slowness only: lets the put park
  ch.close();
  producer.join();
  BOOST_TEST(!put_result);
  BOOST_TEST(intact);
  for (int i = 0; i < 2; ++i) {  // the items put before the close are still delivered
    std::optional<std::unique_ptr<int>> item = ch.try_get();
    BOOST_TEST_REQUIRE(item.has_value());
    BOOST_TEST_REQUIRE(static_cast<bool>(*item));
    BOOST_TEST(**item == i);
  }
  BOOST_TEST(!ch.try_get().has_value());
}

FERRY_TEST_CASE(h2_try_put_reports_ok_full_or_closed_and_moves_only_on_ok) {
  asio::io_context io;
  ferry::from_thread_channel<std::unique_ptr<int>> ch{io, 2};
  auto a = std::make_unique<int>(1);
  auto a2 = std::make_unique<int>(11);
  auto b = std::make_unique<int>(2);
  auto c = std::make_unique<int>(3);
  BOOST_TEST((ch.try_put(a) == ferry::put_status::ok));
  BOOST_TEST(!a);  // moved into the channel
  BOOST_TEST((ch.try_put(std::move(a2)) == ferry::put_status::ok));
  BOOST_TEST(!a2);
  BOOST_TEST((ch.try_put(b) == ferry::put_status::full));
  BOOST_TEST_REQUIRE(static_cast<bool>(b));
  BOOST_TEST(*b == 2);
  BOOST_TEST((ch.try_put(std::move(b)) == ferry::put_status::full));
  BOOST_TEST_REQUIRE(static_cast<bool>(b));  // the rvalue overload does not move either
  BOOST_TEST(ch.size() == 2u);
  ch.close();
  BOOST_TEST((ch.try_put(c) == ferry::put_status::closed));
  BOOST_TEST_REQUIRE(static_cast<bool>(c));
  BOOST_TEST(*c == 3);
  BOOST_TEST((ch.try_put(std::move(c)) == ferry::put_status::closed));
  BOOST_TEST_REQUIRE(static_cast<bool>(c));
  std::optional<std::unique_ptr<int>> got = ch.try_get();
  BOOST_TEST_REQUIRE(got.has_value());
  BOOST_TEST(**got == 1);
  BOOST_TEST((ch.try_put(b) == ferry::put_status::closed));  // room now, but still closed
  BOOST_TEST_REQUIRE(static_cast<bool>(b));
  BOOST_TEST(ch.produced() == 2u);

  ferry::from_thread_channel<std::unique_ptr<int>> unbounded{io, 0};
  bool all_ok = true;
  for (int i = 0; i < 1000; ++i) {
    auto p = std::make_unique<int>(i);
    all_ok = all_ok && unbounded.try_put(p) == ferry::put_status::ok && !p;
  }
  BOOST_TEST(all_ok);  // never full
  unbounded.close();
  auto late = std::make_unique<int>(-1);
  BOOST_TEST((unbounded.try_put(late) == ferry::put_status::closed));
  BOOST_TEST_REQUIRE(static_cast<bool>(late));
  BOOST_TEST(unbounded.size() == 1000u);
}

FERRY_TEST_CASE(h2_several_producer_threads_every_item_delivered_once_in_per_producer_order) {
  for (std::size_t cap : {std::size_t{0}, std::size_t{3}, std::size_t{8}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      asio::io_context io;
      u64_channel ch{io, cap};
      constexpr std::size_t producers = 4;
      constexpr std::uint32_t per = 20'000;
      std::atomic<std::size_t> finished{0};
      std::vector<std::thread> threads;
      on_scope_exit cleanup{[&] {
        ch.close();
        join_all(threads);
      }};
      for (std::size_t p = 0; p < producers; ++p) {
        threads.emplace_back([&, p] {
          for (std::uint32_t i = 0; i < per; ++i) {
            if (!ch.put(encode(p, i))) break;
          }
          if (finished.fetch_add(1) + 1 == producers) ch.close();  // the last one ends it
        });
      }
      consumer_log log(producers);
      run_on(io, consume_all(ch, log, 0, {}));
      join_all(threads);
      BOOST_TEST(log.ordered);
      BOOST_TEST(log.values.size() == producers * per);
      for (std::size_t p = 0; p < producers; ++p) BOOST_TEST(log.next[p] == per);
      BOOST_TEST((code_of(log.end) == ferry::errc::channel_closed));
    }
  }
}

// --- H3: the loop side ------------------------------------------------------------------

FERRY_TEST_CASE(h3_async_get_is_fifo_and_reports_channel_closed_only_after_the_last_item) {
  for (std::size_t cap : {std::size_t{0}, std::size_t{4}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      asio::io_context io;
      ferry::from_thread_channel<int> ch{io, cap};
      constexpr int n = 1000;
      std::thread producer([&] {
        for (int i = 0; i < n; ++i) {
          if (!ch.put(i)) break;
        }
        ch.close();
      });
      on_scope_exit cleanup{[&] {
        ch.close();
        if (producer.joinable()) producer.join();
      }};
      int received = 0;
      bool in_order = true;
      bool closed_early = false;
      std::error_code end;
      run_on(io, [&]() -> asio::awaitable<void> {
        for (;;) {
          try {
            const int v = co_await ch.async_get(asio::use_awaitable);
            in_order = in_order && v == received;
            ++received;
          } catch (const ferry::error& e) {
            end = e.code();
            closed_early = received != n;
            break;
          }
        }
      });
      producer.join();
      BOOST_TEST(received == n);
      BOOST_TEST(in_order);
      BOOST_TEST(!closed_early);
      BOOST_TEST((end == ferry::errc::channel_closed));
    }
  }
}

FERRY_TEST_CASE(h3_items_put_before_close_are_all_delivered_before_channel_closed) {
  for (std::size_t cap : {std::size_t{0}, std::size_t{5}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      asio::io_context io;
      ferry::from_thread_channel<std::string> ch{io, cap};
      for (int i = 0; i < 5; ++i) BOOST_TEST(ch.put("item " + std::to_string(i)));
      ch.close();
      BOOST_TEST(ch.closed());
      BOOST_TEST(ch.size() == 5u);
      std::vector<std::string> got;
      std::vector<std::error_code> ends;
      run_on(io, [&]() -> asio::awaitable<void> {
        for (int i = 0; i < 5; ++i) {
          auto [e, v] = co_await ch.async_get(tuple_token());
          if (e) {
            ends.push_back(code_of(e));
            co_return;
          }
          got.push_back(std::move(v));
        }
        // Closed and drained: every further get, single or batch, says channel_closed.
        auto [e1, v1] = co_await ch.async_get(tuple_token());
        ends.push_back(code_of(e1));
        BOOST_TEST(v1.empty());
        auto [e2, v2] = co_await ch.async_get(tuple_token());
        ends.push_back(code_of(e2));
        auto [e3, batch] = co_await ch.async_get_batch(3, tuple_token());
        ends.push_back(code_of(e3));
        BOOST_TEST(batch.empty());
        auto [e4, v4] = co_await ch.async_get_for(10s, tuple_token());
        ends.push_back(code_of(e4));
      });
      BOOST_TEST_REQUIRE(got.size() == 5u);
      for (std::size_t i = 0; i < 5; ++i) BOOST_TEST(got[i] == "item " + std::to_string(i));
      BOOST_TEST_REQUIRE(ends.size() == 4u);
      for (const auto& ec : ends) BOOST_TEST((ec == ferry::errc::channel_closed));
      BOOST_TEST(!ch.try_get().has_value());
    }
  }
}

FERRY_TEST_CASE(h3_async_get_for_times_out_with_timed_out_when_nothing_arrives) {
  asio::io_context io;
  ferry::from_thread_channel<int> ch{io, 4};
  std::error_code first;
  long long waited_ms = -1;
  std::exception_ptr second_error;
  int second = -1;
  run_on(io, [&]() -> asio::awaitable<void> {
    const auto t0 = steady::now();
    auto [e, v] = co_await ch.async_get_for(30ms, tuple_token());
    waited_ms = ms_between(t0, steady::now());
    first = code_of(e);
    // The timeout took nothing and left the channel usable.
    BOOST_TEST((ch.try_put(5) == ferry::put_status::ok));
    auto [e2, v2] = co_await ch.async_get_for(10s, tuple_token());
    second_error = e2;
    second = v2;
  });
  BOOST_TEST((first == ferry::errc::timed_out));
  BOOST_TEST(waited_ms >= 30);
  BOOST_TEST(waited_ms < 10'000);
  BOOST_TEST(!second_error);
  BOOST_TEST(second == 5);
  BOOST_TEST(ch.consumed() == 1u);
  BOOST_TEST(!ch.closed());
}

FERRY_TEST_CASE(h3_async_get_for_returns_an_item_that_arrives_before_the_timeout) {
  asio::io_context io;
  ferry::from_thread_channel<int> ch{io, 4};
  gate consumer_waiting;
  std::thread producer([&] {
    consumer_waiting.wait();
    std::this_thread::sleep_for(20ms);  // slowness only: the get is pending by then
    ch.put(42);
  });
  on_scope_exit cleanup{[&] {
    consumer_waiting.open();
    if (producer.joinable()) producer.join();
  }};
  std::exception_ptr err1, err2;
  int v1 = -1, v2 = -1;
  long long waited_ms = -1;
  run_on(io, [&]() -> asio::awaitable<void> {
    const auto t0 = steady::now();
    consumer_waiting.open();
    auto [e, v] = co_await ch.async_get_for(30s, tuple_token());
    waited_ms = ms_between(t0, steady::now());
    err1 = e;
    v1 = v;
    // An item already there wins even over a zero timeout.
    BOOST_TEST((ch.try_put(43) == ferry::put_status::ok));
    auto [e2, w] = co_await ch.async_get_for(0ms, tuple_token());
    err2 = e2;
    v2 = w;
  });
  producer.join();
  BOOST_TEST(!err1);
  BOOST_TEST(v1 == 42);
  BOOST_TEST(waited_ms < 10'000);  // long before the 30 s timeout
  BOOST_TEST(!err2);
  BOOST_TEST(v2 == 43);
}

FERRY_TEST_CASE(h3_async_get_batch_takes_up_to_n_ready_items_in_order_then_channel_closed) {
  for (std::size_t cap : {std::size_t{0}, std::size_t{16}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      asio::io_context io;
      ferry::from_thread_channel<int> ch{io, cap};
      for (int i = 0; i < 10; ++i) BOOST_TEST(ch.put(i));
      gate consumer_waiting;
      std::thread producer([&] {
        consumer_waiting.wait();
        std::this_thread::sleep_for(10ms);  // slowness only: the batch is pending by then
        ch.put(10);
        ch.put(11);
        ch.close();
      });
      on_scope_exit cleanup{[&] {
        consumer_waiting.open();
        ch.close();
        if (producer.joinable()) producer.join();
      }};
      std::vector<std::vector<int>> batches;
      std::vector<int> late;
      bool empty_success = false;
      std::error_code end;
      run_on(io, [&]() -> asio::awaitable<void> {
        for (int k = 0; k < 3; ++k) {
          auto [e, b] = co_await ch.async_get_batch(4, tuple_token());
          BOOST_TEST(!e);
          batches.push_back(std::move(b));
        }
        consumer_waiting.open();  // the channel is empty: the next batch waits
        for (;;) {
          auto [e, b] = co_await ch.async_get_batch(4, tuple_token());
          if (e) {
            end = code_of(e);
            BOOST_TEST(b.empty());
            break;
          }
          empty_success = empty_success || b.empty();
          late.insert(late.end(), b.begin(), b.end());
        }
      });
      producer.join();
      BOOST_TEST_REQUIRE(batches.size() == 3u);
      BOOST_TEST(batches[0] == std::vector<int>({0, 1, 2, 3}));
      BOOST_TEST(batches[1] == std::vector<int>({4, 5, 6, 7}));
      BOOST_TEST(batches[2] == std::vector<int>({8, 9}));  // up to n: what was ready
      BOOST_TEST(late == std::vector<int>({10, 11}));
      BOOST_TEST(!empty_success);
      BOOST_TEST((end == ferry::errc::channel_closed));
      BOOST_TEST(ch.consumed() == 12u);
    }
  }
}

FERRY_TEST_CASE(h3_batches_of_a_stream_are_non_empty_bounded_in_order_and_end_with_channel_closed) {
  for (std::size_t cap : {std::size_t{0}, std::size_t{5}, std::size_t{16}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      asio::io_context io;
      ferry::from_thread_channel<int> ch{io, cap};
      constexpr int n = 10'000;
      std::thread producer([&] {
        for (int i = 0; i < n; ++i) {
          if (!ch.put(i)) break;
        }
        ch.close();
      });
      on_scope_exit cleanup{[&] {
        ch.close();
        if (producer.joinable()) producer.join();
      }};
      int next = 0;
      bool in_order = true;
      bool bad_size = false;
      std::error_code end;
      run_on(io, [&]() -> asio::awaitable<void> {
        for (;;) {
          auto [e, b] = co_await ch.async_get_batch(7, tuple_token());
          if (e) {
            end = code_of(e);
            break;
          }
          bad_size = bad_size || b.empty() || b.size() > 7u;
          for (int v : b) {
            in_order = in_order && v == next;
            ++next;
          }
        }
      });
      producer.join();
      BOOST_TEST(next == n);
      BOOST_TEST(in_order);
      BOOST_TEST(!bad_size);
      BOOST_TEST((end == ferry::errc::channel_closed));
    }
  }
}

FERRY_TEST_CASE(h3_async_get_batch_of_zero_throws_invalid_argument_and_takes_nothing) {
  asio::io_context io;
  ferry::from_thread_channel<int> ch{io, 4};
  BOOST_TEST(ch.put(1));
  bool called = false;
  BOOST_CHECK_EXCEPTION(ch.async_get_batch(0, [&](std::exception_ptr, std::vector<int>) { called = true; }),
                        ferry::error, is_invalid_argument);
  std::error_code from_coroutine;
  run_on(io, [&]() -> asio::awaitable<void> {
    try {
      std::vector<int> b = co_await ch.async_get_batch(0, asio::use_awaitable);
      BOOST_FAIL("no exception, got " << b.size() << " items");
    } catch (const ferry::error& e) {
      from_coroutine = e.code();
    }
  });
  BOOST_TEST(!called);
  BOOST_TEST((from_coroutine == ferry::errc::invalid_argument));
  BOOST_TEST(ch.size() == 1u);
  BOOST_TEST(ch.consumed() == 0u);
}

FERRY_TEST_CASE(h3_async_get_works_with_a_plain_callback_run_on_the_loop_thread) {
  loop_threads loop(1);
  ferry::from_thread_channel<int> ch{loop.io, 4};
  std::promise<std::pair<int, bool>> result;
  ch.async_get([&](std::exception_ptr e, int v) {  // on the loop thread: record, no BOOST_TEST
    result.set_value({e ? -1 : v, loop.io.get_executor().running_in_this_thread()});
  });
  std::thread producer([&] { ch.put(9); });
  auto fut = result.get_future();
  BOOST_TEST_REQUIRE((fut.wait_for(60s) == std::future_status::ready));
  producer.join();
  const auto [v, on_loop] = fut.get();
  BOOST_TEST(v == 9);
  BOOST_TEST(on_loop);
}

// The body shared by the use_future tests; make_token(loop executor) gives asio::use_future,
// plain or bound to the loop's executor.
template <class MakeToken>
void check_use_future_from_another_thread(MakeToken make_token) {
  loop_threads loop(1);
  auto future_token = make_token(loop.io.get_executor());
  ferry::from_thread_channel<std::string> ch{loop.io, 4};
  // Issued from the main thread, which is not the loop's; completed by a producer thread.
  std::shared_future<std::string> first = ch.async_get(future_token).share();
  std::shared_future<std::string> second = ch.async_get(future_token).share();
  std::thread producer([&] {
    ch.put("hello");
    ch.put("world");
  });
  BOOST_TEST_REQUIRE((first.wait_for(60s) == std::future_status::ready));
  BOOST_TEST_REQUIRE((second.wait_for(60s) == std::future_status::ready));
  producer.join();
  std::vector<std::string> got{first.get(), second.get()};
  std::sort(got.begin(), got.end());
  BOOST_TEST(got == std::vector<std::string>({"hello", "world"}));

  BOOST_TEST(ch.put("third"));
  std::shared_future<std::string> ready = ch.async_get(future_token).share();
  BOOST_TEST_REQUIRE((ready.wait_for(60s) == std::future_status::ready));
  BOOST_TEST(ready.get() == "third");

  ch.close();
  std::shared_future<std::string> closed = ch.async_get(future_token).share();
  BOOST_TEST_REQUIRE((closed.wait_for(60s) == std::future_status::ready));
  BOOST_CHECK_EXCEPTION(closed.get(), ferry::error, is_channel_closed);

  ferry::from_thread_channel<int> quiet{loop.io, 1};
  std::shared_future<int> timed = quiet.async_get_for(20ms, future_token).share();
  BOOST_TEST_REQUIRE((timed.wait_for(60s) == std::future_status::ready));
  BOOST_CHECK_EXCEPTION(timed.get(), ferry::error, is_timed_out);

  std::shared_future<std::vector<int>> batch = quiet.async_get_batch(3, future_token).share();
  std::thread late([&] { quiet.put(5); });
  BOOST_TEST_REQUIRE((batch.wait_for(60s) == std::future_status::ready));
  late.join();
  BOOST_TEST(batch.get() == std::vector<int>({5}));
}

FERRY_TEST_CASE(h3_async_get_works_with_use_future_bound_to_the_loop_from_another_thread) {
  check_use_future_from_another_thread(
      [](auto ex) { return asio::bind_executor(ex, asio::use_future); });
}

FERRY_TEST_CASE(h3_async_get_works_with_plain_use_future_from_another_thread) {
  check_use_future_from_another_thread([](auto) { return asio::use_future; });
}

FERRY_TEST_CASE(h3_async_get_works_with_use_awaitable_and_errors_are_thrown) {
  asio::io_context io;
  ferry::from_thread_channel<std::unique_ptr<int>> ch{io, 2};
  std::thread producer([&] {
    for (int i = 0; i < 50; ++i) {
      if (!ch.put(std::make_unique<int>(i))) break;
    }
    ch.close();
  });
  on_scope_exit cleanup{[&] {
    ch.close();
    if (producer.joinable()) producer.join();
  }};
  int received = 0;
  bool in_order = true;
  std::error_code end;
  run_on(io, [&]() -> asio::awaitable<void> {
    try {
      for (;;) {
        std::unique_ptr<int> p = co_await ch.async_get(asio::use_awaitable);
        in_order = in_order && p && *p == received;
        ++received;
      }
    } catch (const ferry::error& e) {
      end = e.code();
    }
  });
  producer.join();
  BOOST_TEST(received == 50);
  BOOST_TEST(in_order);
  BOOST_TEST((end == ferry::errc::channel_closed));
}

FERRY_TEST_CASE(h3_try_get_takes_the_next_ready_item_without_waiting) {
  asio::io_context io;
  for (std::size_t cap : {std::size_t{0}, std::size_t{3}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      ferry::from_thread_channel<int> ch{io, cap};
      BOOST_TEST(!ch.try_get().has_value());
      BOOST_TEST(ch.put(1));
      BOOST_TEST(ch.put(2));
      std::optional<int> a = ch.try_get();
      BOOST_TEST_REQUIRE(a.has_value());
      BOOST_TEST(*a == 1);
      BOOST_TEST(ch.put(3));
      ch.close();
      std::optional<int> b = ch.try_get();  // items put before the close are still there
      std::optional<int> c = ch.try_get();
      BOOST_TEST_REQUIRE(b.has_value());
      BOOST_TEST_REQUIRE(c.has_value());
      BOOST_TEST(*b == 2);
      BOOST_TEST(*c == 3);
      BOOST_TEST(!ch.try_get().has_value());
      BOOST_TEST(ch.consumed() == 3u);
    }
  }
  io.restart();
  BOOST_TEST(io.poll() == 0u);
}

// --- H4: close ----------------------------------------------------------------------------

namespace {
void check_close_releases_every_blocked_put(bool from_loop) {
  loop_threads loop(1);
  ferry::from_thread_channel<std::unique_ptr<int>> ch{loop.io, 2};
  BOOST_TEST(ch.put(std::make_unique<int>(0)));
  BOOST_TEST(ch.put(std::make_unique<int>(0)));
  constexpr std::size_t n = 4;
  std::latch started{static_cast<std::ptrdiff_t>(n)};
  std::vector<int> results(n, -1);  // -1: no result, 0: false, 1: true
  std::vector<int> intact(n, 0);
  std::vector<steady::time_point> returned_at(n);
  std::vector<std::thread> threads;
  on_scope_exit cleanup{[&] {
    ch.close();
    join_all(threads);
  }};
  for (std::size_t i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      const int value = static_cast<int>(i) + 1;
      auto p = std::make_unique<int>(value);
      started.count_down();
      const bool ok = ch.put(std::move(p));
      returned_at[i] = steady::now();
      results[i] = ok ? 1 : 0;
      intact[i] = p && *p == value ? 1 : 0;
    });
  }
  started.wait();
  std::this_thread::sleep_for(50ms);  // slowness only: every producer is past its spin, parked
  const auto t0 = steady::now();
  if (from_loop) {
    asio::post(loop.io, [&] { ch.close(); });
  } else {
    ch.close();
  }
  join_all(threads);
  loop.finish();  // the posted close() may still be running on the loop thread
  for (std::size_t i = 0; i < n; ++i) {
    BOOST_TEST_CONTEXT("producer " << i) {
      BOOST_TEST(results[i] == 0);
      BOOST_TEST(intact[i] == 1);
      BOOST_TEST(ms_between(t0, returned_at[i]) < 1000);
    }
  }
  BOOST_TEST(ch.size() == 2u);  // only the two items put before the close
}

void check_close_releases_every_pending_get(bool from_loop) {
  asio::io_context io;
  ferry::from_thread_channel<int> ch{io, 4};
  constexpr std::size_t n = 4;
  std::vector<std::error_code> outcomes(n);
  std::vector<steady::time_point> completed_at(n);
  std::vector<int> completions(n, 0);
  for (std::size_t i = 0; i < n; ++i) {
    ferry::co_spawn(
        io,
        [&, i]() -> asio::awaitable<void> {
          auto [e, v] = co_await ch.async_get(tuple_token());
          outcomes[i] = code_of(e);
          completed_at[i] = steady::now();
          ++completions[i];
        },
        asio::detached);
  }
  steady::time_point closed_at{};
  std::thread closer;
  // Posted after the spawns: runs once every getter is suspended in async_get.
  asio::post(io, [&] {
    if (from_loop) {
      closed_at = steady::now();
      ch.close();
    } else {
      closer = std::thread([&] {
        std::this_thread::sleep_for(20ms);  // slowness only
        closed_at = steady::now();
        ch.close();
      });
    }
  });
  io.run();
  if (closer.joinable()) closer.join();
  for (std::size_t i = 0; i < n; ++i) {
    BOOST_TEST_CONTEXT("getter " << i) {
      BOOST_TEST(completions[i] == 1);
      BOOST_TEST((outcomes[i] == ferry::errc::channel_closed));
      BOOST_TEST(ms_between(closed_at, completed_at[i]) < 1000);
    }
  }
}
}  // namespace

FERRY_TEST_CASE(h4_close_from_a_thread_wakes_every_blocked_put_at_once) {
  check_close_releases_every_blocked_put(false);
}

FERRY_TEST_CASE(h4_close_from_the_loop_wakes_every_blocked_put_at_once) {
  check_close_releases_every_blocked_put(true);
}

FERRY_TEST_CASE(h4_close_from_a_thread_wakes_every_pending_async_get_at_once) {
  check_close_releases_every_pending_get(false);
}

FERRY_TEST_CASE(h4_close_from_the_loop_wakes_every_pending_async_get_at_once) {
  check_close_releases_every_pending_get(true);
}

FERRY_TEST_CASE(h4_close_with_an_exception_delivers_the_earlier_items_then_rethrows_it) {
  for (std::size_t cap : {std::size_t{0}, std::size_t{4}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      asio::io_context io;
      ferry::from_thread_channel<int> ch{io, cap};
      for (int i = 1; i <= 3; ++i) BOOST_TEST(ch.put(i));
      ch.close(std::make_exception_ptr(std::runtime_error("x")));
      BOOST_TEST(ch.closed());
      BOOST_TEST(!ch.put(4));
      std::vector<int> got;
      int rethrown = 0;
      bool exact_type = true;
      std::vector<std::string> messages;
      std::exception_ptr batch_error;
      std::vector<int> batch;
      run_on(io, [&]() -> asio::awaitable<void> {
        for (int i = 0; i < 3; ++i) {
          const int v = co_await ch.async_get(asio::use_awaitable);
          got.push_back(v);
        }
        for (int k = 0; k < 2; ++k) {  // every later get rethrows it
          try {
            const int v = co_await ch.async_get(asio::use_awaitable);
            BOOST_FAIL("no exception, got " << v);
          } catch (const std::runtime_error& e) {
            ++rethrown;
            exact_type = exact_type && typeid(e) == typeid(std::runtime_error);
            messages.emplace_back(e.what());
          }
        }
        auto [e, b] = co_await ch.async_get_batch(8, tuple_token());
        batch_error = e;
        batch = std::move(b);
      });
      BOOST_TEST(got == std::vector<int>({1, 2, 3}));
      BOOST_TEST(rethrown == 2);
      BOOST_TEST(exact_type);
      BOOST_TEST(messages == std::vector<std::string>({"x", "x"}));
      BOOST_TEST(batch.empty());
      BOOST_CHECK_EXCEPTION(std::rethrow_exception(batch_error), std::runtime_error,
                            [](const std::runtime_error& e) {
                              return typeid(e) == typeid(std::runtime_error) &&
                                     std::string(e.what()) == "x";
                            });
    }
  }
}

FERRY_TEST_CASE(h4_a_producer_failing_mid_stream_reaches_the_consumer_after_its_items) {
  asio::io_context io;
  ferry::from_thread_channel<int> ch{io, 4};
  constexpr int n = 500;
  std::thread producer([&] {
    for (int i = 0; i < n; ++i) {
      if (!ch.put(i)) return;
    }
    ch.close(std::make_exception_ptr(payload_error(7)));
  });
  on_scope_exit cleanup{[&] {
    ch.close();
    if (producer.joinable()) producer.join();
  }};
  int received = 0;
  bool in_order = true;
  int payload = -1;
  run_on(io, [&]() -> asio::awaitable<void> {
    try {
      for (;;) {
        const int v = co_await ch.async_get(asio::use_awaitable);
        in_order = in_order && v == received;
        ++received;
      }
    } catch (const payload_error& e) {
      payload = e.value;
    }
  });
  producer.join();
  BOOST_TEST(received == n);
  BOOST_TEST(in_order);
  BOOST_TEST(payload == 7);
}

FERRY_TEST_CASE(h4_close_is_idempotent_and_the_first_close_wins) {
  asio::io_context io;
  ferry::from_thread_channel<int> failing{io, 2};
  BOOST_TEST(failing.put(1));
  failing.close(std::make_exception_ptr(std::runtime_error("first")));
  failing.close(std::make_exception_ptr(std::runtime_error("second")));
  failing.close();
  BOOST_TEST(failing.closed());
  ferry::from_thread_channel<int> clean{io, 2};
  clean.close();
  clean.close(std::make_exception_ptr(std::runtime_error("late")));
  int first_item = -1;
  std::vector<std::string> failing_messages;
  std::error_code clean_end;
  run_on(io, [&]() -> asio::awaitable<void> {
    first_item = co_await failing.async_get(asio::use_awaitable);
    for (int k = 0; k < 2; ++k) {
      try {
        co_await failing.async_get(asio::use_awaitable);
      } catch (const std::runtime_error& e) {
        failing_messages.emplace_back(e.what());
      }
    }
    auto [e, v] = co_await clean.async_get(tuple_token());
    clean_end = code_of(e);
  });
  BOOST_TEST(first_item == 1);
  BOOST_TEST(failing_messages == std::vector<std::string>({"first", "first"}));
  BOOST_TEST((clean_end == ferry::errc::channel_closed));
}

FERRY_TEST_CASE(h4_destroying_the_channel_closes_it_and_a_pending_get_completes_with_channel_closed) {
  for (std::size_t cap : {std::size_t{0}, std::size_t{4}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      asio::io_context io;
      auto ch = std::make_unique<ferry::from_thread_channel<int>>(io, cap);
      std::error_code outcome;
      int calls = 0;
      ch->async_get([&](std::exception_ptr e, int) {  // holds no reference to the channel
        outcome = code_of(e);
        ++calls;
      });
      // A coroutine getter too: it touches the channel only while initiating.
      std::error_code coroutine_outcome;
      ferry::from_thread_channel<int>* raw = ch.get();
      ferry::co_spawn(
          io,
          [&coroutine_outcome, raw]() -> asio::awaitable<void> {
            auto [e, v] = co_await raw->async_get(tuple_token());
            coroutine_outcome = code_of(e);
          },
          asio::detached);
      asio::post(io, [&] { ch.reset(); });  // runs after both gets are suspended
      io.run();
      BOOST_TEST(!ch);
      BOOST_TEST(calls == 1);
      BOOST_TEST((outcome == ferry::errc::channel_closed));
      BOOST_TEST((coroutine_outcome == ferry::errc::channel_closed));
    }
  }
}

FERRY_TEST_CASE(destroying_the_loop_drops_a_pending_get_and_a_later_put_does_not_touch_it) {
  auto io = std::make_unique<asio::io_context>();
  ferry::from_thread_channel<std::string> ch{*io, 4};
  bool resumed = false;
  auto frame_alive = std::make_shared<int>(0);
  ferry::co_spawn(
      *io,
      [&ch, &resumed, alive = frame_alive]() -> asio::awaitable<void> {
        auto [e, v] = co_await ch.async_get(tuple_token());
        resumed = true;
      },
      asio::detached);
  io->poll();  // the coroutine is now suspended in async_get
  BOOST_TEST(frame_alive.use_count() == 2);
  io.reset();  // destroys the suspended coroutine without resuming it
  BOOST_TEST(!resumed);
  BOOST_TEST(frame_alive.use_count() == 1);
  // The dropped wait left nothing behind that a producer would touch.
  std::thread producer([&] {
    ch.put("after");
    ch.close();
  });
  producer.join();
  std::optional<std::string> got = ch.try_get();
  BOOST_TEST_REQUIRE(got.has_value());
  BOOST_TEST(*got == "after");
}

FERRY_TEST_CASE(h4_destroying_a_channel_destroys_the_items_left_in_it) {
  asio::io_context io;
  for (std::size_t cap : {std::size_t{0}, std::size_t{3}, std::size_t{4}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      auto token = std::make_shared<int>(1);
      {
        ferry::from_thread_channel<std::shared_ptr<int>> ch{io, cap};
        BOOST_TEST(ch.put(token));
        BOOST_TEST(ch.put(token));
        BOOST_TEST(ch.try_get().has_value());
        BOOST_TEST(ch.try_get().has_value());
        for (int i = 0; i < 3; ++i) BOOST_TEST(ch.put(token));  // wraps around the ring
        BOOST_TEST(token.use_count() == 4);
      }
      BOOST_TEST(token.use_count() == 1);
    }
  }
}

// --- Cancellation -------------------------------------------------------------------------

FERRY_TEST_CASE(cancelling_a_pending_async_get_completes_it_with_operation_aborted_and_takes_nothing) {
  for (std::size_t cap : {std::size_t{0}, std::size_t{4}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      asio::io_context io;
      ferry::from_thread_channel<int> ch{io, cap};
      asio::cancellation_signal signal;
      std::exception_ptr first;
      int calls = 0;
      ch.async_get(asio::bind_cancellation_slot(signal.slot(), [&](std::exception_ptr e, int) {
        first = e;
        ++calls;
      }));
      BOOST_TEST(io.poll() == 0u);  // suspended
      signal.emit(asio::cancellation_type::terminal);
      io.restart();
      io.run();
      BOOST_TEST(calls == 1);
      BOOST_CHECK_EXCEPTION(std::rethrow_exception(first), ferry::error, is_aborted);
      BOOST_TEST(!ch.closed());
      // It took nothing: an item put afterwards goes to the next get.
      BOOST_TEST(ch.put(42));
      BOOST_TEST(ch.size() == 1u);
      BOOST_TEST(ch.consumed() == 0u);
      int second = -1;
      ch.async_get([&](std::exception_ptr e, int v) { second = e ? -1 : v; });
      io.restart();
      io.run();
      BOOST_TEST(second == 42);
    }
  }
}

FERRY_TEST_CASE(a_get_that_loses_a_race_against_a_timer_is_cancelled_and_the_next_get_gets_the_item) {
  asio::io_context io;
  ferry::from_thread_channel<int> ch{io, 4};
  std::size_t winner = 99;
  int next = -1;
  run_on(io, [&]() -> asio::awaitable<void> {
    asio::steady_timer timer(io, 10ms);
    auto r = co_await (ch.async_get(asio::use_awaitable) || timer.async_wait(asio::use_awaitable));
    winner = r.index();
    BOOST_TEST((ch.try_put(7) == ferry::put_status::ok));
    next = co_await ch.async_get(asio::use_awaitable);
  });
  BOOST_TEST(winner == 1u);
  BOOST_TEST(next == 7);
}

FERRY_TEST_CASE(cancelling_with_partial_or_total_also_aborts_a_pending_get_as_documented) {
  for (auto type : {asio::cancellation_type::partial, asio::cancellation_type::total}) {
    BOOST_TEST_CONTEXT("cancellation type " << static_cast<unsigned>(type)) {
      asio::io_context io;
      ferry::from_thread_channel<int> ch{io, 4};
      asio::cancellation_signal signal;
      std::exception_ptr outcome;
      int calls = 0;
      ch.async_get(asio::bind_cancellation_slot(signal.slot(), [&](std::exception_ptr e, int) {
        outcome = e;
        ++calls;
      }));
      signal.emit(type);
      io.poll();  // the aborted completion, if any, is posted: it runs here
      const bool aborted_at_once = calls == 1;
      ch.close();  // ends a get the cancellation did not reach, so the test finishes
      io.restart();
      io.run();
      BOOST_TEST(aborted_at_once, "the get ignored the cancellation and waited for close()");
      BOOST_TEST(calls == 1);
      BOOST_CHECK_EXCEPTION(std::rethrow_exception(outcome), ferry::error, is_aborted);
    }
  }
}

FERRY_TEST_CASE(cancelling_a_get_while_an_item_arrives_never_loses_or_duplicates_the_item) {
  asio::io_context io;
  ferry::from_thread_channel<int> ch{io, 4};
  constexpr int rounds = 300;
  int via_get = 0;
  int via_channel = 0;
  int lost = 0;
  int bad = 0;
  for (int i = 0; i < rounds; ++i) {
    asio::cancellation_signal signal;
    std::exception_ptr err;
    int value = -1;
    int calls = 0;
    ch.async_get(asio::bind_cancellation_slot(signal.slot(), [&](std::exception_ptr e, int v) {
      err = e;
      value = v;
      ++calls;
    }));
    std::thread producer([&] { ch.put(i); });
    signal.emit(asio::cancellation_type::terminal);  // races with the put
    producer.join();
    io.restart();
    io.run();
    if (calls != 1) {
      ++bad;
    } else if (!err) {
      if (value == i) {
        ++via_get;
      } else {
        ++bad;
      }
      if (ch.try_get().has_value()) ++bad;  // duplicated
    } else if (code_of(err) == asio::error::operation_aborted) {
      std::optional<int> left = ch.try_get();
      if (left && *left == i) {
        ++via_channel;
      } else {
        ++lost;
      }
    } else {
      ++bad;
    }
  }
  BOOST_TEST(bad == 0);
  BOOST_TEST(lost == 0);
  BOOST_TEST(via_get + via_channel == rounds);
  BOOST_TEST(ch.size() == 0u);
}

// --- H5: batched wake-ups -------------------------------------------------------------------

FERRY_TEST_CASE(h5_puts_with_no_waiting_consumer_post_nothing_to_the_loop) {
  for (std::size_t cap : {std::size_t{0}, std::size_t{64}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      asio::io_context io;
      ferry::from_thread_channel<int> ch{io, cap};
      std::thread producer([&] {
        for (int i = 0; i < 50; ++i) ch.put(i);
      });
      producer.join();
      BOOST_TEST(io.poll() == 0u);
      // A consumer that takes items without waiting costs nothing either.
      for (int i = 0; i < 20; ++i) BOOST_TEST(ch.try_get().has_value());
      std::thread more([&] {
        for (int i = 0; i < 20; ++i) ch.put(i);
      });
      more.join();
      io.restart();
      BOOST_TEST(io.poll() == 0u);
      BOOST_TEST(ch.size() == 50u);
    }
  }
}

FERRY_TEST_CASE(h5_a_burst_of_puts_wakes_the_pending_gets_with_a_single_post) {
  for (std::size_t cap : {std::size_t{0}, std::size_t{64}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      asio::io_context io;
      ferry::from_thread_channel<int> ch{io, cap};
      std::vector<int> got;
      for (int k = 0; k < 3; ++k) {
        ch.async_get([&](std::exception_ptr e, int v) { got.push_back(e ? -1 : v); });
      }
      BOOST_TEST(io.poll() == 0u);  // three readers suspended, nothing posted yet
      std::thread producer([&] {
        for (int i = 0; i < 50; ++i) ch.put(i);
      });
      producer.join();
      io.restart();
      const std::size_t handlers = io.poll();
      BOOST_TEST(handlers == 1u);  // one hand-off for the whole burst and all three readers
      BOOST_TEST(got == std::vector<int>({0, 1, 2}));
      BOOST_TEST(ch.size() == 47u);
      // A single pending get and one put: exactly one wake as well.
      while (ch.try_get()) {
      }
      ch.async_get([&](std::exception_ptr e, int v) { got.push_back(e ? -1 : v); });
      io.restart();
      BOOST_TEST(io.poll() == 0u);
      std::thread one([&] { ch.put(100); });
      one.join();
      io.restart();
      BOOST_TEST(io.poll() == 1u);
      BOOST_TEST_REQUIRE(got.size() == 4u);
      BOOST_TEST(got[3] == 100);
    }
  }
}

// --- Statistics ---------------------------------------------------------------------------

FERRY_TEST_CASE(stats_produced_and_consumed_are_exact_and_refused_puts_do_not_count) {
  for (std::size_t cap : {std::size_t{0}, std::size_t{4}}) {
    BOOST_TEST_CONTEXT("max_size " << cap) {
      asio::io_context io;
      ferry::from_thread_channel<int> ch{io, cap};
      for (int i = 0; i < 3; ++i) BOOST_TEST(ch.put(i));
      BOOST_TEST(ch.produced() == 3u);
      BOOST_TEST(ch.consumed() == 0u);
      BOOST_TEST(ch.try_get().has_value());
      BOOST_TEST(ch.consumed() == 1u);
      BOOST_TEST((ch.try_put(3) == ferry::put_status::ok));
      BOOST_TEST((ch.try_put(4) == ferry::put_status::ok));
      if (cap != 0) BOOST_TEST((ch.try_put(5) == ferry::put_status::full));
      BOOST_TEST(ch.produced() == 5u);
      std::size_t batch_size = 0;
      int single = -1;
      run_on(io, [&]() -> asio::awaitable<void> {
        std::vector<int> b = co_await ch.async_get_batch(3, asio::use_awaitable);
        batch_size = b.size();
        single = co_await ch.async_get(asio::use_awaitable);
      });
      BOOST_TEST(batch_size == 3u);
      BOOST_TEST(single == 4);
      BOOST_TEST(ch.consumed() == 5u);
      ch.close();
      BOOST_TEST(!ch.put(9));
      BOOST_TEST((ch.try_put(9) == ferry::put_status::closed));
      BOOST_TEST(ch.produced() == 5u);
      BOOST_TEST(ch.consumed() == 5u);
      BOOST_TEST(ch.size() == 0u);
      BOOST_TEST(ch.producer_blocked().count() == 0);  // no put ever waited
    }
  }
}

FERRY_TEST_CASE(stats_producer_blocked_grows_once_a_put_had_to_wait) {
  asio::io_context io;
  ferry::from_thread_channel<int> ch{io, 2};
  bool never_early = true;
  // Normally one round; repeated only if the producer thread was descheduled for the whole
  // pause before its put even started (then nothing blocked and nothing is measured).
  for (int attempt = 0; attempt < 5 && ch.producer_blocked().count() == 0; ++attempt) {
    BOOST_TEST_REQUIRE(ch.put(attempt));
    BOOST_TEST_REQUIRE(ch.put(attempt));
    gate about_to_put;
    std::atomic<bool> returned{false};
    std::thread producer([&] {
      about_to_put.open();
      ch.put(100 + attempt);
      returned = true;
    });
    about_to_put.wait();
    std::this_thread::sleep_for(30ms);  // slowness only
    never_early = never_early && !returned.load();
    const std::optional<int> taken = ch.try_get();
    producer.join();
    BOOST_TEST_REQUIRE(taken.has_value());
    BOOST_TEST(*taken == attempt);
    BOOST_TEST(ch.try_get().has_value());
    BOOST_TEST(ch.try_get().has_value());
  }
  BOOST_TEST(never_early);
  BOOST_TEST(ch.producer_blocked().count() > 0);
  BOOST_TEST(ch.consumed() == ch.produced());
}

// --- Stress -------------------------------------------------------------------------------

namespace {

struct stress_outcome {
  std::vector<std::uint32_t> accepted;  // per producer: the count of puts that returned true
  std::vector<consumer_log> logs;
};

// `producers` threads put `per` items each into a channel of `cap` consumed by two
// coroutines (one single, one batched) on an io_context run by two threads. The channel is
// closed after the producers finish (close_after_us < 0), or by a thread after
// close_after_us microseconds, or from the loop once `loop_close_at` items arrived.
stress_outcome run_stress(std::size_t cap, std::size_t producers, std::uint32_t per,
                          long close_after_us, std::uint64_t loop_close_at,
                          std::exception_ptr close_with) {
  asio::io_context io;
  u64_channel ch{io, cap};
  stress_outcome out;
  out.accepted.assign(producers, 0);
  out.logs.assign(2, consumer_log(producers));
  std::atomic<std::uint64_t> received{0};
  loop_close_plan plan;
  if (loop_close_at != 0) plan = {&received, loop_close_at, close_with};
  ferry::co_spawn(io, consume_all(ch, out.logs[0], 0, plan),
                  [&log = out.logs[0]](std::exception_ptr e) { log.failure = e; });
  ferry::co_spawn(io, consume_all(ch, out.logs[1], 32, plan),
                  [&log = out.logs[1]](std::exception_ptr e) { log.failure = e; });
  std::vector<std::thread> loop_threads_;
  std::vector<std::thread> threads;
  std::thread closer;
  on_scope_exit cleanup{[&] {
    ch.close();
    join_all(threads);
    if (closer.joinable()) closer.join();
    join_all(loop_threads_);
  }};
  for (int i = 0; i < 2; ++i) loop_threads_.emplace_back([&io] { io.run(); });
  for (std::size_t p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      for (std::uint32_t i = 0; i < per; ++i) {
        if (!ch.put(encode(p, i))) break;
        out.accepted[p] = i + 1;
      }
    });
  }
  if (close_after_us >= 0) {
    closer = std::thread([&] {
      std::this_thread::sleep_for(std::chrono::microseconds(close_after_us));
      if (close_with) {
        ch.close(close_with);
      } else {
        ch.close();
      }
    });
  }
  join_all(threads);
  if (closer.joinable()) closer.join();
  if (close_with) {
    ch.close(close_with);
  } else {
    ch.close();
  }
  join_all(loop_threads_);
  return out;
}

void check_exactly_once(const stress_outcome& out, const std::exception_ptr& close_with) {
  std::vector<std::uint64_t> all;
  std::uint64_t sum = 0;
  for (const auto& log : out.logs) {
    BOOST_TEST(!log.failure);
    BOOST_TEST(log.ordered);
    BOOST_TEST(!log.bad_batch);
    if (close_with) {
      BOOST_TEST((log.end == close_with));
    } else {
      BOOST_TEST((code_of(log.end) == ferry::errc::channel_closed));
    }
    all.insert(all.end(), log.values.begin(), log.values.end());
    for (std::uint64_t v : log.values) sum += v;
  }
  std::vector<std::uint64_t> expected;
  std::uint64_t expected_sum = 0;
  for (std::size_t p = 0; p < out.accepted.size(); ++p) {
    for (std::uint32_t i = 0; i < out.accepted[p]; ++i) {
      expected.push_back(encode(p, i));
      expected_sum += encode(p, i);
    }
  }
  std::sort(all.begin(), all.end());
  BOOST_TEST(all.size() == expected.size());
  BOOST_TEST(sum == expected_sum);
  BOOST_TEST((all == expected));  // every accepted item exactly once, nothing else
}

}  // namespace

FERRY_TEST_CASE(stress_four_producers_two_consumers_on_two_loop_threads_deliver_every_item_once) {
  constexpr std::size_t producers = 4;
  constexpr std::uint32_t per = 100'000;
  const auto t0 = steady::now();
  const stress_outcome out = run_stress(16, producers, per, -1, 0, nullptr);
  BOOST_TEST_MESSAGE("4 x 100k items through max_size 16 in " << ms_between(t0, steady::now())
                                                              << " ms");
  for (std::size_t p = 0; p < producers; ++p) BOOST_TEST(out.accepted[p] == per);
  check_exactly_once(out, nullptr);
  BOOST_TEST(out.logs[0].values.size() + out.logs[1].values.size() == producers * per);
}

FERRY_TEST_CASE(stress_closing_at_a_random_moment_delivers_every_accepted_item_exactly_once) {
  constexpr std::size_t producers = 4;
  constexpr std::uint32_t per = 20'000;
  std::mt19937 rng(20240611u);
  const std::size_t caps[] = {1, 3, 16, 0};
  for (int round = 0; round < 8; ++round) {
    const std::size_t cap = caps[static_cast<std::size_t>(round) % 4];
    const bool from_loop = round % 2 == 1;
    const std::exception_ptr with =
        round % 3 == 2 ? std::make_exception_ptr(payload_error(round)) : nullptr;
    const long after_us = from_loop ? -1 : static_cast<long>(rng() % 5000);
    const std::uint64_t at = from_loop ? 1 + rng() % (producers * per / 2) : 0;
    BOOST_TEST_CONTEXT("round " << round << " max_size " << cap << " close "
                                << (from_loop ? "from the loop after " : "from a thread after ")
                                << (from_loop ? static_cast<long long>(at)
                                              : static_cast<long long>(after_us))
                                << (from_loop ? " items" : " us")) {
      if (cap != 0 && !bound_is_enforced(cap)) {
        BOOST_ERROR("max_size " << cap << " does not refuse an extra item; round skipped "
                                           "(it would hang)");
        continue;
      }
      const stress_outcome out = run_stress(cap, producers, per, after_us, at, with);
      check_exactly_once(out, with);
      std::uint64_t accepted = 0;
      for (auto a : out.accepted) accepted += a;
      BOOST_TEST_MESSAGE("round " << round << ": " << accepted << " items accepted");
      if (from_loop) BOOST_TEST(accepted >= at);
    }
  }
}
