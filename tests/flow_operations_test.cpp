#define BOOST_TEST_MODULE ferry_flow_operations
#include "coro_test_support.hpp"

#include <ferry/flow/orchestrator.hpp>
#include <ferry/thread_pool.hpp>

#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

// House rules (g++ 12): an awaited call never has a temporary with a destructor among its
// arguments (build the awaitable in its own statement, then `co_await std::move(op)`), and
// every coroutine lambda is a named variable that outlives the coroutines it starts.

using namespace std::chrono_literals;
namespace fl = ferry::flow;

using ferry_test::contains;
using ferry_test::error_of;
using ferry_test::message_of;
using ferry_test::run;

namespace {





asio::awaitable<void> delay(std::chrono::microseconds d) {
  asio::any_io_executor ex = co_await asio::this_coro::executor;
  asio::steady_timer timer(ex, d);
  co_await timer.async_wait(asio::use_awaitable);
}

// The calculator of the examples: "a + b" / "a * b".
struct calc {
  fl::definition<std::string> line{"line"};
  fl::definition<int> lhs{"lhs"}, rhs{"rhs"}, result{"result"};
  fl::definition<bool> is_add{"is_add"}, is_mult{"is_mult"};
  fl::operation parse = fl::make_operation("parse")
                            .inputs(line)
                            .outputs(lhs, rhs, is_add, is_mult)
                            .implement([](const std::string& s) {
                              std::istringstream in(s);
                              int a = 0, b = 0;
                              char op = 0;
                              if (!(in >> a >> op >> b)) throw std::invalid_argument("cannot parse '" + s + "'");
                              return std::tuple{a, b, op == '+', op == '*'};
                            });
  fl::operation add = fl::make_operation("add")
                          .inputs(lhs, rhs)
                          .outputs(result)
                          .conditions(is_add)
                          .implement([](int a, int b) -> asio::awaitable<int> { co_return a + b; });
  fl::operation mult = fl::make_operation("mult")
                           .inputs(lhs, rhs)
                           .outputs(result)
                           .conditions(is_mult)
                           .implement([](int a, int b) -> asio::awaitable<int> { co_return a* b; });
  fl::output<int> sum = fl::get_single(result);
  fl::dataflow flow{{parse, add, mult}, {sum}, {.seeds = {line}}};
};

}  // namespace

// --- O6, O8: the calculator over several contexts at once ------------------------------------

FERRY_TEST_CASE(calculator_results_per_context_never_mix) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  calc c;
  fl::context scope{io};
  fl::orchestrator orch{scope, {.pool = &pool}};
  std::map<std::string, int> got;
  auto body = [&]() -> asio::awaitable<void> {
    std::vector<fl::input_set> sets;
    for (int i = 0; i < 20; ++i) {
      sets.emplace_back("c" + std::to_string(i),
                        std::vector{fl::seed(c.line, std::to_string(i) + (i % 2 ? " + " : " * ") + "3")});
    }
    auto op = orch.run(c.flow, std::move(sets));
    std::vector<fl::context_result> done = co_await std::move(op);
    for (const auto& r : done) got[r.name] = r[c.sum];
    auto cl = orch.close();
    co_await std::move(cl);
    auto sc = scope.close();
    co_await std::move(sc);
  };
  run(io, body);
  BOOST_REQUIRE_EQUAL(got.size(), 20u);
  for (int i = 0; i < 20; ++i) {
    BOOST_TEST(got["c" + std::to_string(i)] == (i % 2 ? i + 3 : i * 3), "context c" << i);
  }
}

namespace {

// Runs `make_flow`'s flow over `sets` on a fresh loop and scope; returns the results.
struct harness {
  asio::io_context io;
  ferry::thread_pool pool{2};
  fl::context scope{io};
  std::vector<fl::context_result> results;

  std::vector<fl::context_result>& run_flow(const fl::dataflow& f, std::vector<fl::input_set> sets,
                                            fl::orchestrator_options opts = {}) {
    if (!opts.pool) opts.pool = &pool;
    fl::orchestrator orch{scope, std::move(opts)};
    auto body = [&]() -> asio::awaitable<void> {
      auto op = orch.run(f, std::move(sets));
      results = co_await std::move(op);
      auto cl = orch.close();
      co_await std::move(cl);
      auto sc = scope.close();
      co_await std::move(sc);
    };
    run(io, body);
    return results;
  }
};

}  // namespace

// --- O7: Cartesian product, redundancy ---------------------------------------------------------

FERRY_TEST_CASE(two_by_three_inputs_run_exactly_six_times_however_they_trickle_in) {
  fl::definition<int> x{"x"}, y{"y"}, a{"a"}, b{"b"}, pair{"pair"};
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> us(0, 400);
  // Relays turn seeds x / y into a / b after a random delay, so a and b arrive interleaved.
  auto relay = [&rng, &us](const char* name, const fl::definition<int>& from, const fl::definition<int>& to) {
    return fl::make_operation(name).inputs(from).outputs(to).implement(
        [d = us(rng)](const fl::run_info& info, int v) -> asio::awaitable<int> {
          auto pause = delay(std::chrono::microseconds((d * static_cast<int>(info.inputs[0]->id())) % 500));
          co_await std::move(pause);
          co_return v;
        });
  };
  std::atomic<int> runs{0};
  auto combine = fl::make_operation("combine").inputs(a, b).outputs(pair).implement(
      [&runs](int va, int vb) -> asio::awaitable<int> {
        ++runs;
        co_return va * 100 + vb;
      });
  auto all = fl::get_multi(pair);
  fl::dataflow f{{relay("relay_x", x, a), relay("relay_y", y, b), combine}, {all}, {.seeds = {x, y}}};
  std::vector<fl::input_set> sets;
  for (int i = 0; i < 8; ++i) {
    sets.emplace_back("t" + std::to_string(i),
                      std::vector{fl::seed(x, 1), fl::seed(y, 10), fl::seed(x, 2), fl::seed(y, 20), fl::seed(y, 30)});
  }
  harness h;
  auto& res = h.run_flow(f, std::move(sets));
  BOOST_REQUIRE_EQUAL(res.size(), 8u);
  BOOST_TEST(runs.load() == 8 * 6);
  for (const auto& r : res) {
    std::vector<int> got = r[all];
    std::sort(got.begin(), got.end());
    BOOST_TEST(got == (std::vector<int>{110, 120, 130, 210, 220, 230}), r.name);
  }
}

FERRY_TEST_CASE(same_input_offered_again_does_not_rerun_but_an_equal_new_value_does) {
  fl::definition<int> v{"v"}, seen{"seen"};
  fl::definition<bool> go{"go"};
  fl::definition<int> tick{"tick"};
  std::atomic<int> runs{0};
  auto use = fl::make_operation("use").inputs(v).outputs(seen).conditions(go).implement(
      [&runs](int x) -> asio::awaitable<int> {
        ++runs;
        co_return x;
      });
  // Each tick re-asserts go = true: the condition's arrival offers v's inputs to `use` again.
  auto regate = fl::make_operation("regate").inputs(tick).outputs(go).implement(
      [](int) -> asio::awaitable<bool> { co_return true; });
  auto all = fl::get_multi(seen);
  fl::dataflow f{{use, regate}, {all}, {.seeds = {v, go, tick}}};
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"once", {fl::seed(v, 5), fl::seed(go, true), fl::seed(tick, 1),
                                                    fl::seed(tick, 2), fl::seed(tick, 3)}}});
  BOOST_TEST(runs.load() == 1);
  BOOST_TEST(res.at(0)[all] == std::vector<int>{5});
  runs = 0;
  harness h2;
  auto& res2 = h2.run_flow(f, {fl::input_set{"twice", {fl::seed(v, 5), fl::seed(v, 5), fl::seed(go, true)}}});
  BOOST_TEST(runs.load() == 2);
  BOOST_TEST(res2.at(0)[all] == (std::vector<int>{5, 5}));
}

// --- O3: expand --------------------------------------------------------------------------------

FERRY_TEST_CASE(expand_of_three_gives_three_downstream_runs) {
  fl::definition<int> n{"n"}, item{"item"}, sq{"sq"};
  auto split = fl::make_operation("split").inputs(n).outputs(fl::expand(item)).implement(
      [](int k) {  // a plain function: on the pool
        std::vector<int> v;
        for (int i = 1; i <= k; ++i) v.push_back(i);
        return v;
      });
  std::atomic<int> runs{0};
  auto square = fl::make_operation("square").inputs(item).outputs(sq).implement(
      [&runs](int i) -> asio::awaitable<int> {
        ++runs;
        co_return i * i;
      });
  auto all = fl::get_multi(sq);
  fl::dataflow f{{split, square}, {all}, {.seeds = {n}}};
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"e", {fl::seed(n, 3)}}});
  BOOST_TEST(runs.load() == 3);
  std::vector<int> got = res.at(0)[all];
  std::sort(got.begin(), got.end());
  BOOST_TEST(got == (std::vector<int>{1, 4, 9}));
  // Provenance (O2): each square came from one item, which came from the seed.
  for (const auto& in : res.at(0).inputs) {
    if (in->definition().name() != "sq") continue;
    BOOST_TEST(in->from().instance == "square");
    BOOST_TEST(in->from().output == "sq");
    BOOST_REQUIRE_EQUAL(in->parents().size(), 1u);
    BOOST_TEST(in->parents()[0]->definition().name() == "item");
    BOOST_TEST(in->parents()[0]->parents().at(0)->from().seed());
  }
}

// --- O8, O9: conditions and auto-start ----------------------------------------------------------

FERRY_TEST_CASE(auto_start_runs_once_per_context_and_respects_its_condition) {
  fl::definition<bool> go{"go"};
  fl::definition<int> started{"started"}, gated{"gated"};
  std::atomic<int> plain_runs{0}, gated_runs{0};
  auto start = fl::make_operation("start").outputs(started).implement(
      [&plain_runs]() -> asio::awaitable<int> { co_return ++plain_runs; });
  auto gate = fl::make_operation("gate").outputs(gated).conditions(go).implement(
      [&gated_runs]() -> asio::awaitable<int> { co_return ++gated_runs; });
  auto s = fl::get_multi(started);
  auto g = fl::get_multi(gated);
  fl::dataflow f{{start, gate}, {s, g}, {.seeds = {go}}};
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"on", {fl::seed(go, true)}}, fl::input_set{"off", {fl::seed(go, false)}},
                             fl::input_set{"absent", {}}, fl::input_set{"late", {fl::seed(go, false), fl::seed(go, true)}}});
  BOOST_TEST(plain_runs.load() == 4);
  std::map<std::string, std::size_t> gated_count;
  for (const auto& r : res) {
    BOOST_TEST(r[s].size() == 1u, r.name);
    gated_count[r.name] = r[g].size();
  }
  BOOST_TEST(gated_count["on"] == 1u);
  BOOST_TEST(gated_count["off"] == 0u);
  BOOST_TEST(gated_count["absent"] == 0u);
  BOOST_TEST(gated_count["late"] == 1u);  // the most recent value decides
}

FERRY_TEST_CASE(a_condition_that_turns_false_blocks_later_runs) {
  fl::definition<int> v{"v"}, out{"out"};
  fl::definition<bool> ok{"ok"};
  auto use = fl::make_operation("use").inputs(v).outputs(out).conditions(ok).implement(
      [](int x) -> asio::awaitable<int> { co_return x; });
  auto all = fl::get_multi(out);
  fl::dataflow f{{use}, {all}, {.seeds = {v, ok}}};
  harness h;
  // ok=false arrives last: v's value is never run.
  auto& res = h.run_flow(f, {fl::input_set{"x", {fl::seed(ok, true), fl::seed(ok, false), fl::seed(v, 1)}}});
  BOOST_TEST(res.at(0)[all].empty());
}

// --- O10: locks ----------------------------------------------------------------------------------

namespace {
struct overlap_probe {
  int running = 0;
  int peak = 0;
  int entered = 0;
};

fl::dataflow lock_flow(bool locked, std::shared_ptr<overlap_probe> probe, int wanted_overlap) {
  fl::definition<std::string> res{"res", {.lock = locked}};
  fl::definition<int> n{"n"}, item{"item"}, done{"done"};
  auto split = fl::make_operation("split").inputs(n).outputs(fl::expand(item)).implement(
      [](int k) -> asio::awaitable<std::vector<int>> {
        std::vector<int> v(static_cast<std::size_t>(k));
        for (int i = 0; i < k; ++i) v[static_cast<std::size_t>(i)] = i;
        co_return v;
      });
  auto use = fl::make_operation("use").inputs(res, item).outputs(done).implement(
      [probe, wanted_overlap](const std::string&, int i) -> asio::awaitable<int> {
        ++probe->entered;
        probe->peak = std::max(probe->peak, ++probe->running);
        // Wait (bounded) for the others to enter too: they do unless a lock keeps them out.
        for (int spin = 0; spin < 200 && probe->running < wanted_overlap; ++spin) {
          auto d = delay(std::chrono::microseconds(500));
          co_await std::move(d);
        }
        --probe->running;
        co_return i;
      });
  return fl::dataflow{{split, use}, {fl::get_multi(done)}, {.seeds = {res, n}}};
}
}  // namespace

FERRY_TEST_CASE(a_locked_definition_is_never_used_by_two_runs_at_once) {
  auto probe = std::make_shared<overlap_probe>();
  fl::dataflow f = lock_flow(true, probe, 2);
  fl::definition<std::string> res{"res", {.lock = true}};
  fl::definition<int> n{"n"};
  harness h;
  auto& r = h.run_flow(f, {fl::input_set{"l", {fl::seed(res, "db"), fl::seed(n, 4)}}});
  BOOST_TEST(r.at(0).ok());
  BOOST_TEST(probe->entered == 4);
  BOOST_TEST(probe->peak == 1);
}

FERRY_TEST_CASE(unlocked_runs_on_one_input_overlap) {
  auto probe = std::make_shared<overlap_probe>();
  fl::dataflow f = lock_flow(false, probe, 4);
  fl::definition<std::string> res{"res"};
  fl::definition<int> n{"n"};
  harness h;
  auto& r = h.run_flow(f, {fl::input_set{"u", {fl::seed(res, "db"), fl::seed(n, 4)}}});
  BOOST_TEST(r.at(0).ok());
  BOOST_TEST(probe->entered == 4);
  BOOST_TEST(probe->peak == 4);
}

FERRY_TEST_CASE(runs_taking_two_locks_in_any_order_do_not_deadlock) {
  fl::definition<int> p{"p", {.lock = true}}, q{"q", {.lock = true}}, out{"out"};
  std::atomic<int> runs{0};
  // Two operations take the same two locked inputs through ports in opposite orders.
  auto pq = fl::make_operation("pq").inputs(p, q).outputs(out).implement(
      [&runs](int a, int b) -> asio::awaitable<int> {
        auto d = delay(200us);
        co_await std::move(d);
        ++runs;
        co_return a + b;
      });
  auto qp = fl::make_operation("qp").inputs(q, p).outputs(out).implement(
      [&runs](int b, int a) -> asio::awaitable<int> {
        auto d = delay(200us);
        co_await std::move(d);
        ++runs;
        co_return a - b;
      });
  auto all = fl::get_multi(out);
  fl::dataflow f{{pq, qp}, {all}, {.seeds = {p, q}}};
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"d", {fl::seed(p, 1), fl::seed(q, 2), fl::seed(p, 3), fl::seed(q, 4)}}});
  BOOST_TEST(runs.load() == 8);
  BOOST_TEST(res.at(0)[all].size() == 8u);
}

// --- O4: implementations with lifetimes ----------------------------------------------------------

namespace {
struct lifecycle_log {
  std::vector<std::string> events;
  int scopes_made = 0;
  int scopes_alive = 0;
};

// enter/exit per orchestrator per instance; one per-run scope per run.
struct session_impl {
  std::shared_ptr<lifecycle_log> log;
  std::string tag;
  bool open = false;

  asio::awaitable<void> enter(fl::context&) {
    log->events.push_back("enter " + tag);
    open = true;
    co_return;
  }
  void exit(std::exception_ptr) {
    log->events.push_back("exit " + tag);
    open = false;
  }
  struct run_scope {
    session_impl* owner;
    std::shared_ptr<lifecycle_log> log;
    run_scope(session_impl* o, std::shared_ptr<lifecycle_log> l) : owner(o), log(std::move(l)) {
      ++log->scopes_made;
      ++log->scopes_alive;
    }
    run_scope(run_scope&& o) noexcept : owner(o.owner), log(o.log) { ++log->scopes_alive; }
    ~run_scope() { --log->scopes_alive; }
    asio::awaitable<int> operator()(int v) {
      if (!owner->open) throw std::logic_error("run outside enter/exit");
      co_return v + 1;
    }
  };
  run_scope scope(const fl::run_info&) { return run_scope(this, log); }
};
}  // namespace

FERRY_TEST_CASE(enter_and_exit_once_per_orchestrator_per_instance_in_reverse_order) {
  auto log = std::make_shared<lifecycle_log>();
  fl::definition<int> v{"v"}, w{"w"}, z{"z"};
  auto first = fl::make_operation("first").inputs(v).outputs(w).implement<session_impl>(log, std::string("first"));
  auto second = fl::make_operation("second").inputs(w).outputs(z).implement<session_impl>(log, std::string("second"));
  auto zs = fl::get_multi(z);
  fl::dataflow f{{first, second}, {zs}, {.seeds = {v}}};
  asio::io_context io;
  fl::context scope{io};
  fl::orchestrator orch{scope};
  std::vector<int> got;
  auto body = [&]() -> asio::awaitable<void> {
    for (int round = 0; round < 3; ++round) {
      auto op = orch.run(f, {fl::input_set{"a", {fl::seed(v, 1)}}, fl::input_set{"b", {fl::seed(v, 10)}}});
      std::vector<fl::context_result> r = co_await std::move(op);
      for (const auto& c : r) got.push_back(c[zs].at(0));
    }
    BOOST_TEST(log->events == (std::vector<std::string>{"enter first", "enter second"}));
    auto cl = orch.close();
    co_await std::move(cl);
    auto cl2 = orch.close();  // idempotent
    co_await std::move(cl2);
  };
  run(io, body);
  BOOST_TEST(log->events ==
             (std::vector<std::string>{"enter first", "enter second", "exit second", "exit first"}));
  BOOST_TEST(log->scopes_made == 12);  // 3 rounds x 2 contexts x 2 instances
  BOOST_TEST(log->scopes_alive == 0);
  std::sort(got.begin(), got.end());
  BOOST_TEST(got == (std::vector<int>{3, 3, 3, 12, 12, 12}));
}

FERRY_TEST_CASE(instances_of_one_operation_are_independent) {
  auto log = std::make_shared<lifecycle_log>();
  fl::definition<int> v{"v"}, w{"w"};
  auto op = fl::make_operation("bump").inputs(v).outputs(w).implement<session_impl>(log, std::string("x"));
  auto ws = fl::get_multi(w);
  fl::dataflow f{{op, op.as("bump2")}, {ws}, {.seeds = {v}}};
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"i", {fl::seed(v, 1)}}});
  BOOST_TEST(res.at(0)[ws] == (std::vector<int>{2, 2}));
  BOOST_TEST(log->events == (std::vector<std::string>{"enter x", "enter x", "exit x", "exit x"}));
}

FERRY_TEST_CASE(the_scope_closing_exits_an_orchestrator_never_closed) {
  auto log = std::make_shared<lifecycle_log>();
  fl::definition<int> v{"v"}, w{"w"};
  auto op = fl::make_operation("bump").inputs(v).outputs(w).implement<session_impl>(log, std::string("s"));
  fl::dataflow f{{op}, {fl::get_multi(w)}, {.seeds = {v}}};
  asio::io_context io;
  fl::context scope{io};
  fl::orchestrator orch{scope};
  auto body = [&]() -> asio::awaitable<void> {
    auto r = orch.run(f, {fl::input_set{"i", {fl::seed(v, 1)}}});
    co_await std::move(r);
    auto sc = scope.close();
    co_await std::move(sc);
  };
  run(io, body);
  BOOST_TEST(log->events == (std::vector<std::string>{"enter s", "exit s"}));
}

// --- O4: plain functions run on the pool, coroutines on the loop -------------------------------------

FERRY_TEST_CASE(plain_functions_run_on_the_pool_and_coroutines_on_the_loop) {
  fl::definition<int> v{"v"}, a{"a"}, b{"b"};
  std::thread::id blocking_thread, coroutine_thread;
  auto blocking = fl::make_operation("blocking").inputs(v).outputs(a).implement([&](int x) {
    blocking_thread = std::this_thread::get_id();
    return x;
  });
  auto coro = fl::make_operation("coro").inputs(a).outputs(b).implement([&](int x) -> asio::awaitable<int> {
    coroutine_thread = std::this_thread::get_id();
    co_return x;
  });
  fl::dataflow f{{blocking, coro}, {fl::get_single(b)}, {.seeds = {v}}};
  harness h;
  h.run_flow(f, {fl::input_set{"t", {fl::seed(v, 1)}}});
  BOOST_TEST(coroutine_thread == std::this_thread::get_id());  // io.run() ran here
  BOOST_TEST((blocking_thread != std::this_thread::get_id()));
  BOOST_TEST((blocking_thread != std::thread::id{}));
  BOOST_TEST(h.pool.stats().submitted >= 1u);  // the orchestrator's pool, not the default one
}

// --- O12: errors and retry --------------------------------------------------------------------------

namespace {
fl::dataflow flaky_flow(unsigned attempts, int failures, std::shared_ptr<int> calls) {
  fl::definition<int> v{"v"}, w{"w"};
  auto op = fl::make_operation("flaky").inputs(v).outputs(w).retry(attempts).implement(
      [calls, failures](const fl::run_info& info, int x) -> asio::awaitable<int> {
        ++*calls;
        if (static_cast<int>(info.attempt) <= failures) {
          throw std::runtime_error("failure " + std::to_string(info.attempt));
        }
        co_return x;
      });
  return fl::dataflow{{op}, {fl::get_single(w)}, {.seeds = {v}}};
}
}  // namespace

FERRY_TEST_CASE(retry_three_with_two_failures_succeeds) {
  auto calls = std::make_shared<int>(0);
  fl::dataflow f = flaky_flow(3, 2, calls);
  fl::definition<int> v{"v"};
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"r", {fl::seed(v, 7)}}});
  BOOST_TEST(res.at(0).ok());
  BOOST_TEST(res.at(0).results.get<int>("w") == 7);
  BOOST_TEST(*calls == 3);
}

FERRY_TEST_CASE(retry_two_surfaces_the_second_failure_as_the_cause) {
  auto calls = std::make_shared<int>(0);
  fl::dataflow f = flaky_flow(2, 2, calls);
  fl::definition<int> v{"v"};
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"r", {fl::seed(v, 7)}}});
  BOOST_TEST(*calls == 2);
  BOOST_REQUIRE(!res.at(0).ok());
  try {
    res.at(0).rethrow_if_failed();
    BOOST_FAIL("no error");
  } catch (const fl::operation_error& e) {
    BOOST_TEST(e.code() == fl::make_error_code(fl::errc::operation_failed));
    BOOST_TEST(e.instance() == "flaky");
    BOOST_TEST(e.context_name() == "r");
    BOOST_REQUIRE_EQUAL(e.inputs().size(), 1u);
    BOOST_TEST(e.inputs()[0]->value<int>() == 7);
    BOOST_TEST(message_of(e.cause()) == "failure 2");
    BOOST_TEST(contains(e.what(), "flaky"));
    BOOST_TEST(contains(e.what(), "failure 2"));
  }
}

FERRY_TEST_CASE(a_strict_failure_cancels_the_contexts_other_runs) {
  fl::definition<int> v{"v"}, slow_out{"slow_out"}, bad_out{"bad_out"};
  auto cancelled = std::make_shared<int>(0);
  auto slow = fl::make_operation("slow").inputs(v).outputs(slow_out).implement(
      [cancelled](int x) -> asio::awaitable<int> {
        try {
          auto d = delay(std::chrono::seconds(20));
          co_await std::move(d);
        } catch (const std::system_error& e) {
          if (e.code() == asio::error::operation_aborted) ++*cancelled;
          throw;
        }
        co_return x;
      });
  auto bad = fl::make_operation("bad").inputs(v).outputs(bad_out).implement(
      [](int) -> asio::awaitable<int> {
        auto d = delay(1ms);
        co_await std::move(d);
        throw std::runtime_error("boom");
      });
  fl::dataflow f{{slow, bad}, {}, {.seeds = {v}}};
  harness h;
  const auto t0 = std::chrono::steady_clock::now();
  auto& res = h.run_flow(f, {fl::input_set{"s", {fl::seed(v, 1), fl::seed(v, 2)}}});
  BOOST_TEST((std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10)));
  BOOST_TEST(*cancelled == 2);
  BOOST_REQUIRE(!res.at(0).ok());
  BOOST_CHECK_THROW(res.at(0).rethrow_if_failed(), fl::operation_error);
}

FERRY_TEST_CASE(non_strict_failures_are_reported_and_the_context_goes_on) {
  fl::definition<int> v{"v"}, out{"out"};
  auto half = fl::make_operation("half").inputs(v).outputs(out).implement([](int x) -> asio::awaitable<int> {
    if (x % 2) throw std::runtime_error("odd " + std::to_string(x));
    co_return x / 2;
  });
  auto all = fl::get_multi(out);
  fl::dataflow f{{half}, {all}, {.seeds = {v}}};
  std::vector<std::string> reports;
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"n", {fl::seed(v, 1), fl::seed(v, 2), fl::seed(v, 3), fl::seed(v, 4)}}},
                         {.strict = false, .on_error = [&](const fl::operation_error& e) {
                            reports.push_back(message_of(e.cause()));
                          }});
  BOOST_REQUIRE(res.at(0).ok());
  BOOST_TEST(res.at(0)[all] == (std::vector<int>{1, 2}));
  BOOST_TEST(res.at(0).errors.size() == 2u);
  BOOST_TEST(reports == (std::vector<std::string>{"odd 1", "odd 3"}));
}

// --- O13: max_contexts --------------------------------------------------------------------------------

FERRY_TEST_CASE(at_most_max_contexts_run_at_once) {
  fl::definition<int> v{"v"}, out{"out"};
  auto probe = std::make_shared<overlap_probe>();
  auto work = fl::make_operation("work").inputs(v).outputs(out).implement(
      [probe](int x) -> asio::awaitable<int> {
        probe->peak = std::max(probe->peak, ++probe->running);
        auto d = delay(2ms);
        co_await std::move(d);
        --probe->running;
        co_return x;
      });
  fl::dataflow f{{work}, {fl::get_single(out)}, {.seeds = {v}}};
  std::vector<fl::input_set> sets;
  for (int i = 0; i < 7; ++i) sets.emplace_back("m" + std::to_string(i), std::vector{fl::seed(v, i)});
  harness h;
  auto& res = h.run_flow(f, std::move(sets), {.max_contexts = 2});
  BOOST_TEST(res.size() == 7u);
  BOOST_TEST(probe->peak == 2);
  BOOST_CHECK_THROW((fl::orchestrator{h.scope, {.max_contexts = 0}}), ferry::error);
}

// --- O11: completion, stages, outputs ------------------------------------------------------------------

FERRY_TEST_CASE(output_specs_pick_group_and_associate) {
  fl::definition<std::string> word{"word"};
  fl::definition<int> len{"len"};
  fl::definition<char> initial{"initial"};
  auto measure = fl::make_operation("measure").inputs(word).outputs(len, initial).implement(
      [](const std::string& w) -> asio::awaitable<std::pair<int, char>> {
        co_return std::pair{static_cast<int>(w.size()), w.at(0)};
      });
  auto first = fl::get_single(word, fl::pick::first);
  auto lens = fl::get_multi(len);
  auto by_word = fl::associate(word, len);
  fl::dataflow f{{measure}, {first, lens, by_word}, {.seeds = {word}}};
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"w", {fl::seed(word, "ab"), fl::seed(word, "cd"), fl::seed(word, "xyz")}}});
  const auto& r = res.at(0);
  BOOST_REQUIRE(r.ok());
  BOOST_TEST(r[first] == "ab");
  BOOST_TEST(r[lens].size() == 3u);
  BOOST_TEST(r[by_word].at("ab") == 2);
  BOOST_TEST(r[by_word].at("xyz") == 3);
  BOOST_TEST(r.results.contains("word"));
  BOOST_CHECK_THROW((void)r.results.get<int>("word"), ferry::error);  // wrong type
  // initial and len are siblings: neither is the other's ancestor, so group_by says so.
  fl::dataflow f2{{measure}, {fl::group_by(initial, len)}, {.seeds = {word}}};
  harness h2;
  auto& res2 = h2.run_flow(f2, {fl::input_set{"sib", {fl::seed(word, "ab")}}});
  BOOST_TEST(contains(message_of(res2.at(0).error), "no ancestor"));
}

FERRY_TEST_CASE(group_by_follows_provenance_and_missing_outputs_name_context_and_definition) {
  fl::definition<std::string> word{"word"};
  fl::definition<char> letter{"letter"};
  auto letters = fl::make_operation("letters").inputs(word).outputs(fl::expand(letter)).implement(
      [](const std::string& w) { return std::vector<char>(w.begin(), w.end()); });
  auto grouped = fl::group_by(letter, word);
  fl::dataflow f{{letters}, {grouped}, {.seeds = {word}}};
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"g", {fl::seed(word, "hi"), fl::seed(word, "yo")}}});
  const auto& g = res.at(0)[grouped];
  BOOST_TEST(g.at("hi") == (std::vector<char>{'h', 'i'}));
  BOOST_TEST(g.at("yo") == (std::vector<char>{'y', 'o'}));

  // get_single of a definition with no value, and with two under pick::only.
  fl::definition<int> v{"v"}, never{"never"};
  auto nothing = fl::make_operation("nothing").inputs(v).outputs(never).implement(
      [](int) -> asio::awaitable<std::optional<int>> { co_return std::nullopt; });  // no output
  auto single_never = fl::get_single(never);
  fl::dataflow f2{{nothing}, {single_never}, {.seeds = {v}}};
  harness h2;
  auto& res2 = h2.run_flow(f2, {fl::input_set{"ctx-missing", {fl::seed(v, 1)}}});
  BOOST_REQUIRE(!res2.at(0).ok());
  const std::string m = message_of(res2.at(0).error);
  BOOST_TEST(contains(m, "ctx-missing"));
  BOOST_TEST(contains(m, "never"));
  BOOST_CHECK_EXCEPTION(res2.at(0).rethrow_if_failed(), ferry::error, [](const ferry::error& e) {
    return e.code() == fl::make_error_code(fl::errc::output_missing);
  });
  auto only_v = fl::get_single(v);
  fl::dataflow f3{{}, {only_v}, {.seeds = {v}}};
  harness h3;
  auto& res3 = h3.run_flow(f3, {fl::input_set{"two", {fl::seed(v, 1), fl::seed(v, 2)}}});
  BOOST_TEST(contains(message_of(res3.at(0).error), "pick::only"));
}

FERRY_TEST_CASE(cleanup_and_output_stages_run_after_processing) {
  fl::definition<int> v{"v"}, w{"w"}, c{"c"}, o{"o"};
  std::vector<std::string> order;
  auto work = fl::make_operation("work").inputs(v).outputs(w).implement([&](int x) -> asio::awaitable<int> {
    auto d = delay(1ms);
    co_await std::move(d);
    order.push_back("work");
    co_return x;
  });
  auto clean = fl::make_operation("clean").inputs(w).outputs(c).stage(fl::stage::cleanup).implement(
      [&](int x) -> asio::awaitable<int> {
        order.push_back("cleanup");
        co_return x;
      });
  auto out = fl::make_operation("out").inputs(c).outputs(o).stage(fl::stage::output).implement(
      [&](int x) -> asio::awaitable<int> {
        order.push_back("output");
        co_return x * 10;
      });
  auto os = fl::get_multi(o);
  fl::dataflow f{{out, clean, work}, {os}, {.seeds = {v}}};
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"s", {fl::seed(v, 1), fl::seed(v, 2)}}});
  BOOST_TEST(order == (std::vector<std::string>{"work", "work", "cleanup", "cleanup", "output", "output"}));
  BOOST_TEST(res.at(0)[os].size() == 2u);
}

FERRY_TEST_CASE(aggregate_results_map_to_outputs_and_defaults_fill_empty_definitions) {
  struct parsed {
    int a;
    std::string b;
  };
  fl::definition<std::string> line{"line"}, b{"b"};
  fl::definition<int> a{"a"};
  fl::definition<int> factor{"factor", {.default_value = 3}};
  fl::definition<int> scaled{"scaled"};
  auto split = fl::make_operation("split").inputs(line).outputs(a, b).implement(
      [](const std::string& s) { return parsed{static_cast<int>(s.size()), s + "!"}; });
  auto scale = fl::make_operation("scale").inputs(a, factor).outputs(scaled).implement(
      [](int x, int k) -> asio::awaitable<int> { co_return x* k; });
  auto sa = fl::get_single(scaled);
  auto sb = fl::get_single(b);
  fl::dataflow f{{split, scale}, {sa, sb}, {.seeds = {line}}};
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"d", {fl::seed(line, "abcd")}}, fl::input_set{"k", {fl::seed(line, "ab"), fl::seed(factor, 5)}}});
  for (const auto& r : res) {
    if (r.name == "d") {
      BOOST_TEST(r[sa] == 12);  // the default 3
      BOOST_TEST(r[sb] == "abcd!");
    } else {
      BOOST_TEST(r[sa] == 10);  // the seeded 5; the default is not added
    }
  }
}

FERRY_TEST_CASE(validators_refuse_values_with_a_typed_error) {
  fl::definition<int> pos{"pos", {.validator = [](const int& x) { return x > 0; }}};
  fl::definition<int> out{"out"};
  auto neg = fl::make_operation("neg").inputs(pos).outputs(out).implement([](int x) -> asio::awaitable<int> { co_return x; });
  fl::dataflow f{{neg}, {fl::get_single(out)}, {.seeds = {pos}}};
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"v", {fl::seed(pos, -1)}}});
  BOOST_REQUIRE(!res.at(0).ok());
  BOOST_TEST(contains(message_of(res.at(0).error), "pos"));
  BOOST_CHECK_EXCEPTION(res.at(0).rethrow_if_failed(), ferry::error, [](const ferry::error& e) {
    return e.code() == fl::make_error_code(fl::errc::invalid_input);
  });
}

// --- O5: construction errors ---------------------------------------------------------------------------

FERRY_TEST_CASE(flow_construction_rejects_bad_wiring_with_clear_errors) {
  fl::definition<int> a{"a"}, b{"b"};
  fl::definition<std::string> a_str{"a"};
  auto inc = fl::make_operation("inc").inputs(a).outputs(b).implement([](int x) -> asio::awaitable<int> { co_return x + 1; });
  auto show = fl::make_operation("show").inputs(a_str).outputs(b).implement(
      [](const std::string& s) -> asio::awaitable<int> { co_return static_cast<int>(s.size()); });
  auto code_of = [](auto&& make) { return error_of(make); };

  std::string what;
  try {
    fl::dataflow f{{inc, show}, {}, {.seeds = {a}}};
  } catch (const ferry::error& e) {
    what = e.what();
    BOOST_TEST(e.code() == fl::make_error_code(fl::errc::type_mismatch));
  }
  BOOST_TEST(contains(what, "'a'"));
  BOOST_TEST(contains(what, "inc"));
  BOOST_TEST(contains(what, "show"));

  BOOST_TEST(code_of([&] { fl::dataflow f{{inc, inc}, {}, {.seeds = {a}}}; }) ==
             fl::make_error_code(fl::errc::duplicate_instance));
  BOOST_TEST(code_of([&] { fl::dataflow f{{inc, inc.as("inc2")}, {}, {.seeds = {a}}}; }) == std::error_code{});
  BOOST_TEST(code_of([&] { fl::dataflow f{{inc}}; }) == fl::make_error_code(fl::errc::unfilled_input));
  BOOST_TEST(code_of([&] { fl::dataflow f{{inc}, {}, {.strict = false}}; }) == std::error_code{});
  fl::definition<int> ghost{"ghost"};
  BOOST_TEST(code_of([&] { fl::dataflow f{{inc}, {fl::get_single(ghost)}, {.seeds = {a}}}; }) ==
             fl::make_error_code(fl::errc::unknown_definition));
  BOOST_TEST(code_of([&] { fl::dataflow f{{inc}, {fl::get_single(b), fl::get_multi(b)}, {.seeds = {a}}}; }) ==
             fl::make_error_code(fl::errc::duplicate_output));
  BOOST_TEST(code_of([&] {
               fl::dataflow f{{inc}, {}, {.seeds = {a}, .wiring = {{"nope", "a", {fl::source::any("a")}}}}};
             }) == fl::make_error_code(fl::errc::unknown_instance));
  BOOST_TEST(code_of([&] {
               fl::dataflow f{{inc}, {}, {.seeds = {a}, .wiring = {{"inc", "zz", {fl::source::any("a")}}}}};
             }) == fl::make_error_code(fl::errc::unknown_instance));
  BOOST_TEST(code_of([&] { (void)fl::make_operation(""); }) == fl::make_error_code(fl::errc::invalid_name));
  BOOST_TEST(code_of([&] { fl::definition<int> d{""}; }) == fl::make_error_code(fl::errc::invalid_name));
}

FERRY_TEST_CASE(seeds_the_flow_does_not_know_are_refused) {
  fl::definition<int> a{"a"}, b{"b"};
  fl::definition<std::string> a_str{"a"};
  auto inc = fl::make_operation("inc").inputs(a).outputs(b).implement([](int x) -> asio::awaitable<int> { co_return x + 1; });
  fl::dataflow f{{inc}, {}, {.seeds = {a}}};
  asio::io_context io;
  fl::context scope{io};
  fl::orchestrator orch{scope};
  fl::definition<int> stranger{"stranger"};
  BOOST_TEST(error_of([&] { (void)orch.stream(f, {fl::input_set{"x", {fl::seed(stranger, 1)}}}); }) ==
             fl::make_error_code(fl::errc::unknown_definition));
  BOOST_TEST(error_of([&] { (void)orch.stream(f, {fl::input_set{"x", {fl::seed(a_str, "1")}}}); }) ==
             fl::make_error_code(fl::errc::type_mismatch));
}

FERRY_TEST_CASE(explicit_wiring_takes_a_port_from_one_instance_only) {
  fl::definition<int> v{"v"}, n{"n"}, out{"out"};
  auto twice = fl::make_operation("twice").inputs(v).outputs(n).implement([](int x) -> asio::awaitable<int> { co_return 2 * x; });
  auto thrice = fl::make_operation("thrice").inputs(v).outputs(n).implement([](int x) -> asio::awaitable<int> { co_return 3 * x; });
  auto keep = fl::make_operation("keep").inputs(n).outputs(out).implement([](int x) -> asio::awaitable<int> { co_return x; });
  auto all = fl::get_multi(out);
  fl::dataflow by_name{{twice, thrice, keep}, {all}, {.seeds = {v}}};
  fl::dataflow wired{{twice, thrice, keep}, {all},
                     {.seeds = {v}, .wiring = {{"keep", "n", {fl::source::output("thrice", "n")}}}}};
  harness h1, h2;
  auto& r1 = h1.run_flow(by_name, {fl::input_set{"w", {fl::seed(v, 1)}}});
  auto& r2 = h2.run_flow(wired, {fl::input_set{"w", {fl::seed(v, 1)}}});
  std::vector<int> got1 = r1.at(0)[all];
  std::sort(got1.begin(), got1.end());
  BOOST_TEST(got1 == (std::vector<int>{2, 3}));
  BOOST_TEST(r2.at(0)[all] == std::vector<int>{3});
}

// --- O14: subflows --------------------------------------------------------------------------------------

FERRY_TEST_CASE(a_subflow_runs_its_child_with_forwarded_definitions) {
  fl::definition<int> x{"x"}, scale{"scale"}, y{"y"};
  auto mul = fl::make_operation("mul").inputs(x, scale).outputs(y).implement(
      [](int a, int k) -> asio::awaitable<int> { co_return a* k; });
  fl::dataflow child{{mul}, {}, {.seeds = {x, scale}}};
  // The parent feeds x through the subflow; scale only reaches the child by forwarding.
  auto sub = fl::make_subflow("scaled", child, {x}, {y}, {scale});
  auto ys = fl::get_multi(y);
  fl::dataflow parent{{sub}, {ys}, {.seeds = {x, scale}}};
  harness h;
  auto& res = h.run_flow(parent, {fl::input_set{"p", {fl::seed(scale, 10), fl::seed(x, 4)}},
                                  fl::input_set{"q", {fl::seed(scale, 100), fl::seed(x, 4)}}});
  for (const auto& r : res) {
    BOOST_TEST(r[ys] == (std::vector<int>{r.name == "p" ? 40 : 400}), r.name);
  }
  fl::definition<int> alien{"alien"};
  BOOST_TEST(error_of([&] { (void)fl::make_subflow("bad", child, {alien}, {y}); }) ==
             fl::make_error_code(fl::errc::unknown_definition));
}

// --- O15: JSON descriptions ------------------------------------------------------------------------------

FERRY_TEST_CASE(a_flow_loads_from_json_with_operations_from_a_registry) {
  calc c;
  fl::registry reg;
  reg.add(c.parse);
  reg.add(c.add);
  reg.add(c.mult);
  reg.add(c.line);
  reg.add(c.result);
  const std::string text = R"({
    "operations": { "parse": {"operation": "parse"},
                    "add": {"operation": "add", "inputs": {"lhs": ["lhs"], "rhs": {"instance": "parse", "output": "rhs"}}},
                    "times": {"operation": "mult"} },
    "seeds": ["line"],
    "outputs": [ {"get_single": "result", "pick": "last"} ]
  })";
  fl::dataflow f = fl::load_flow(text, reg);
  BOOST_TEST(f.operations().size() == 3u);
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"j1", {fl::seed(c.line, "6 * 7")}}, fl::input_set{"j2", {fl::seed(c.line, "6 + 7")}}});
  for (const auto& r : res) {
    BOOST_TEST(r.results.get<int>("result") == (r.name == "j1" ? 42 : 13), r.name);
  }
}

FERRY_TEST_CASE(bad_json_descriptions_give_clear_errors) {
  calc c;
  fl::registry reg;
  reg.add(c.parse);
  reg.add(c.add);
  reg.add(c.line);
  reg.add(c.result);
  auto failure = [&](const std::string& text) {
    try {
      (void)fl::load_flow(text, reg);
    } catch (const ferry::error& e) {
      return std::pair{e.code(), std::string(e.what())};
    }
    return std::pair{std::error_code{}, std::string()};
  };
  const auto bad = fl::make_error_code(fl::errc::invalid_description);
  struct cse {
    std::string text;
    std::error_code code;
    std::string mentions;
  };
  const std::vector<cse> cases = {
      {"", bad, "not valid JSON"},
      {"{", bad, "not valid JSON"},
      {"[]", bad, "must be an object"},
      {"{}", bad, "\"operations\" is missing"},
      {R"({"operations": 3})", bad, "must be an object"},
      {R"({"operations": {"p": {"operation": "nope"}}})", bad, "'nope'"},
      {R"({"operations": {"p": {}}})", bad, "\"operation\" is missing"},
      {R"({"operations": {"p": {"operation": "parse", "extra": 1}}})", bad, "unknown key 'extra'"},
      {R"({"operations": {"p": {"operation": "parse"}}, "seeds": ["ghost"]})", bad, "'ghost'"},
      {R"({"operations": {"p": {"operation": "parse"}}, "seeds": [1]})", bad, "must be a string"},
      {R"({"operations": {"p": {"operation": "parse"}}, "seeds": ["line"], "outputs": [{"get_single": "result", "pick": "middle"}]})", bad, "'middle'"},
      {R"({"operations": {"p": {"operation": "parse"}}, "seeds": ["line"], "outputs": [{"average": "result"}]})", bad, "get_single"},
      {R"({"operations": {"p": {"operation": "parse"}}, "strict": "yes"})", bad, "strict"},
      {R"({"operations": {"p": {"operation": "parse"}}})", fl::make_error_code(fl::errc::unfilled_input), "line"},
      {R"({"operations": {"p": {"operation": "parse"}, "a": {"operation": "add", "inputs": {"lhs": "line"}}}, "seeds": ["line"]})",
       fl::make_error_code(fl::errc::type_mismatch), "lhs"},
      {R"({"operations": {"p": {"operation": "parse"}, "a": {"operation": "add", "inputs": {"lhs": {"instance": "zz", "output": "lhs"}}}}, "seeds": ["line"]})",
       fl::make_error_code(fl::errc::unknown_instance), "zz"},
      {R"({"operations": {"p": {"operation": "parse", "inputs": {"line": []}}}, "seeds": ["line"]})", bad, "no sources"},
      {std::string(100, '[') + std::string(100, ']'), bad, "deeper"},
  };
  for (const auto& k : cases) {
    auto [code, what] = failure(k.text);
    BOOST_TEST(code == k.code, k.text << " -> " << what);
    BOOST_TEST(contains(what, k.mentions), k.text << " -> " << what);
  }
}

// --- running: streams, run_one, close ------------------------------------------------------------------

FERRY_TEST_CASE(stream_yields_each_context_as_it_completes_and_run_one_throws_failures) {
  fl::definition<int> ms_def{"ms"}, out{"out"};
  auto wait = fl::make_operation("wait").inputs(ms_def).outputs(out).implement([](int m) -> asio::awaitable<int> {
    if (m < 0) throw std::runtime_error("negative");
    auto d = delay(std::chrono::milliseconds(m));
    co_await std::move(d);
    co_return m;
  });
  auto o = fl::get_single(out);
  fl::dataflow f{{wait}, {o}, {.seeds = {ms_def}}};
  asio::io_context io;
  fl::context scope{io};
  fl::orchestrator orch{scope};
  std::vector<std::string> order;
  int single = 0;
  bool threw = false;
  auto body = [&]() -> asio::awaitable<void> {
    {
      fl::result_stream s = orch.stream(f, {fl::input_set{"slow", {fl::seed(ms_def, 40)}},
                                            fl::input_set{"fast", {fl::seed(ms_def, 1)}}});
      for (;;) {
        auto n = s.next();
        std::optional<fl::context_result> r = co_await std::move(n);
        if (!r) break;
        order.push_back(r->name);
      }
    }
    auto one = orch.run_one(f, fl::input_set{"one", {fl::seed(ms_def, 2)}});
    fl::results r1 = co_await std::move(one);
    single = r1[o];
    try {
      auto bad = orch.run_one(f, fl::input_set{"bad", {fl::seed(ms_def, -1)}});
      co_await std::move(bad);
    } catch (const fl::operation_error& e) {
      threw = e.instance() == "wait" && e.context_name() == "bad";
    }
    auto cl = orch.close();
    co_await std::move(cl);
    auto sc = scope.close();
    co_await std::move(sc);
  };
  run(io, body);
  BOOST_TEST(order == (std::vector<std::string>{"fast", "slow"}));
  BOOST_TEST(single == 2);
  BOOST_TEST(threw);
}

FERRY_TEST_CASE(close_cancels_running_contexts_and_dropping_a_stream_cancels_its_own) {
  fl::definition<int> v{"v"}, out{"out"};
  auto aborted = std::make_shared<int>(0);
  auto forever = fl::make_operation("forever").inputs(v).outputs(out).implement(
      [aborted](int x) -> asio::awaitable<int> {
        try {
          auto d = delay(std::chrono::seconds(60));
          co_await std::move(d);
        } catch (const std::system_error&) {
          ++*aborted;
          throw;
        }
        co_return x;
      });
  fl::dataflow f{{forever}, {}, {.seeds = {v}}};
  asio::io_context io;
  fl::context scope{io};
  fl::orchestrator orch{scope};
  std::optional<fl::context_result> got;
  auto body = [&]() -> asio::awaitable<void> {
    {
      fl::result_stream dropped = orch.stream(f, {fl::input_set{"d", {fl::seed(v, 1)}}});
      auto d = delay(2ms);
      co_await std::move(d);
    }  // dropped: its context is cancelled
    fl::result_stream kept = orch.stream(f, {fl::input_set{"k", {fl::seed(v, 2)}}});
    auto d = delay(2ms);
    co_await std::move(d);
    auto cl = orch.close();  // cancels "k" and waits for it
    co_await std::move(cl);
    auto n = kept.next();
    got = co_await std::move(n);
    BOOST_CHECK_THROW(orch.stream(f, {fl::input_set{"late", {fl::seed(v, 3)}}}), ferry::error);
    auto sc = scope.close();
    co_await std::move(sc);
  };
  const auto t0 = std::chrono::steady_clock::now();
  run(io, body);
  BOOST_TEST((std::chrono::steady_clock::now() - t0 < std::chrono::seconds(30)));
  BOOST_TEST(*aborted == 2);
  BOOST_REQUIRE(got.has_value());
  BOOST_TEST(!got->ok());
}

FERRY_TEST_CASE(a_failing_enter_fails_the_contexts_and_names_the_instance) {
  struct broken {
    asio::awaitable<void> enter(fl::context&) {
      throw std::runtime_error("no session");
      co_return;
    }
    int operator()(int x) const { return x; }
  };
  fl::definition<int> v{"v"}, out{"out"};
  auto op = fl::make_operation("broken").inputs(v).outputs(out).implement(broken{});
  fl::dataflow f{{op}, {}, {.seeds = {v}}};
  harness h;
  auto& res = h.run_flow(f, {fl::input_set{"e1", {fl::seed(v, 1)}}, fl::input_set{"e2", {fl::seed(v, 2)}}});
  for (const auto& r : res) {
    BOOST_REQUIRE(!r.ok());
    BOOST_TEST(contains(message_of(r.error), "broken"));
    BOOST_TEST(contains(message_of(r.error), "no session"));
  }
}

FERRY_TEST_CASE(the_scope_closing_with_an_exception_passes_it_to_exit) {
  struct watcher {
    std::shared_ptr<std::string> seen;
    void exit(std::exception_ptr e) { *seen = e ? message_of(e) : "null"; }
    int operator()(int x) const { return x; }
  };
  auto seen = std::make_shared<std::string>();
  fl::definition<int> v{"v"}, w{"w"};
  auto op = fl::make_operation("watch").inputs(v).outputs(w).implement(watcher{seen});
  fl::dataflow f{{op}, {}, {.seeds = {v}}};
  asio::io_context io;
  fl::context scope{io};
  fl::orchestrator orch{scope};
  auto body = [&]() -> asio::awaitable<void> {
    auto r = orch.run(f, {fl::input_set{"i", {fl::seed(v, 1)}}});
    co_await std::move(r);
    auto sc = scope.close(std::make_exception_ptr(std::runtime_error("request failed")));
    co_await std::move(sc);
  };
  run(io, body);
  BOOST_TEST(*seen == "request failed");
}
