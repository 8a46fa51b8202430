#define BOOST_TEST_MODULE ferry_flow_bundle
#include "coro_test_support.hpp"

#include <ferry/flow/bundle.hpp>
#include <ferry/thread_pool.hpp>
#include <ferry/threaded_iterable.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/use_future.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
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
using ferry_test::code_of;
using ferry_test::message_of;
using ferry_test::run;

namespace {

const fl::key<int> a{"a"}, b{"b"}, c{"c"}, d{"d"}, x{"x"}, y{"y"};
const fl::key<std::string> text{"text"};

asio::awaitable<void> sleep_for(std::chrono::milliseconds ms) {
  asio::steady_timer t(co_await asio::this_coro::executor, ms);
  auto op = t.async_wait(asio::use_awaitable);
  co_await std::move(op);
}

// Runs one bundle call on `io` and returns its bag (rethrowing its failure). Everything,
// the failure's exception_ptr included, stays on this thread: no futures (TSan cannot see
// libstdc++'s exception_ptr reference counts across threads).
fl::bag call(asio::io_context& io, const fl::bundle& f, fl::bag in, std::optional<fl::visibility> v = std::nullopt) {
  std::exception_ptr failure;
  std::optional<fl::bag> result;
  auto body = [&]() -> asio::awaitable<fl::bag> {
    if (v) {
      auto op = f(std::move(in), *v);
      co_return co_await std::move(op);
    }
    auto op = f(std::move(in));
    co_return co_await std::move(op);
  };
  asio::co_spawn(io, body(), [&](std::exception_ptr e, fl::bag out) {
    failure = e;
    if (!e) result = std::move(out);
  });
  io.run();
  io.restart();
  if (failure) std::rethrow_exception(failure);
  BOOST_REQUIRE(result.has_value());
  return std::move(*result);
}

std::exception_ptr failure_of(asio::io_context& io, const fl::bundle& f, fl::bag in) {
  try {
    call(io, f, std::move(in));
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

struct custom_failure : std::runtime_error {
  explicit custom_failure(int v) : std::runtime_error("custom failure"), value(v) {}
  int value;
};

// Coroutine steps record the order they ran in.
struct journal {
  std::vector<std::string> entries;
  fl::step add(std::string name, const fl::key<int>& in, const fl::key<int>& out, int delta) {
    return fl::step(name, fl::needs(in), fl::gives(out),
                    [this, name, delta](int v) -> asio::awaitable<int> {
                      entries.push_back(name);
                      co_return v + delta;
                    });
  }
};

}  // namespace

// --- F1: keys and bags ----------------------------------------------------------------------

FERRY_TEST_CASE(f1_bag_holds_typed_values_and_names_missing_or_mistyped_keys) {
  fl::bag bg{a(1), text("hello")};
  BOOST_TEST(bg.size() == 2u);
  BOOST_TEST(bg.at(a) == 1);
  BOOST_TEST(bg.at(text) == "hello");
  bg.set(a, 5);
  BOOST_TEST(bg.at(a) == 5);
  BOOST_TEST(bg.size() == 2u);
  BOOST_TEST(bg.find(b) == nullptr);
  BOOST_CHECK_EXCEPTION(bg.at(b), fl::missing_key, [](const fl::missing_key& e) {
    return e.key() == "b" && e.code() == fl::errc::missing_key && contains(e.what(), "'b'");
  });
  const fl::key<double> a_as_double{"a"};
  BOOST_CHECK_EXCEPTION(bg.at(a_as_double), ferry::error, [](const ferry::error& e) {
    return e.code() == fl::errc::type_mismatch && contains(e.what(), "'a'") &&
           contains(e.what(), "int") && contains(e.what(), "double");
  });
  BOOST_TEST(!bg.contains(a_as_double));
  BOOST_TEST(bg.contains(a));
  BOOST_TEST(error_of([] { fl::key<int> k{""}; }) == fl::errc::invalid_name);
  BOOST_TEST((fl::bag{a(1), text("hello")} == fl::bag{text("hello"), a(1)}));
  BOOST_TEST(!(fl::bag{a(1)} == fl::bag{a(2)}));
  BOOST_TEST(bg.erase("a"));
  BOOST_TEST(!bg.contains("a"));
}

FERRY_TEST_CASE(f1_plain_functions_run_on_a_pool_and_coroutines_on_the_loop) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  const std::thread::id loop_thread = std::this_thread::get_id();
  std::atomic<bool> plain_on_loop{true}, coro_on_loop{false}, plain_on_pool{false};
  auto plain = fl::step("plain", fl::needs(a), fl::gives(b), [&](int v) {
                 plain_on_loop = std::this_thread::get_id() == loop_thread;
                 plain_on_pool = pool.running_in_this_thread();
                 return v * 2;
               }).on(pool);
  auto coro = fl::step("coro", fl::needs(b), fl::gives(c), [&](int v) -> asio::awaitable<int> {
    coro_on_loop = std::this_thread::get_id() == loop_thread;
    co_return v + 1;
  });
  BOOST_TEST(!plain.is_coroutine());
  BOOST_TEST(coro.is_coroutine());
  fl::bundle f{fl::seq(plain, coro)};
  fl::bag out = call(io, f, fl::bag{a(20)});
  BOOST_TEST(out.at(c) == 41);
  BOOST_TEST(!plain_on_loop.load());
  BOOST_TEST(coro_on_loop.load());
  BOOST_TEST(plain_on_pool.load());
}

FERRY_TEST_CASE(f1_plain_step_without_a_pool_uses_the_loops_default_pool) {
  asio::io_context io;
  const std::thread::id loop_thread = std::this_thread::get_id();
  std::atomic<bool> on_loop{true};
  fl::bundle f{fl::step("plain", fl::needs(a), fl::gives(b), [&](int v) {
    on_loop = std::this_thread::get_id() == loop_thread;
    return v + 1;
  })};
  BOOST_TEST(call(io, f, fl::bag{a(1)}).at(b) == 2);
  BOOST_TEST(!on_loop.load());
}

// --- F2: the seed's shapes ------------------------------------------------------------------

FERRY_TEST_CASE(f2_seed_shape_foo_bar_runs_in_sequence) {
  asio::io_context io;
  journal j;
  fl::bundle f{fl::seq(j.add("foo", a, b, 1), j.add("bar", b, c, 10))};
  fl::bag out = call(io, f, fl::bag{a(1)});
  BOOST_TEST(out.at(c) == 12);
  BOOST_TEST((j.entries == std::vector<std::string>{"foo", "bar"}));
}

FERRY_TEST_CASE(f2_seed_shape_foo_then_bar_and_baz_concurrently) {
  asio::io_context io;
  journal j;
  fl::bundle f{fl::seq(j.add("foo", a, b, 1), fl::par(j.add("bar", b, c, 10), j.add("baz", b, d, 100)))};
  fl::bag out = call(io, f, fl::bag{a(1)});
  BOOST_TEST(out.at(c) == 12);
  BOOST_TEST(out.at(d) == 102);
  BOOST_TEST(j.entries.front() == "foo");
  BOOST_TEST(j.entries.size() == 3u);
}

FERRY_TEST_CASE(f2_seed_shape_foo_par_bar_baz_then_buz_sees_both_outputs) {
  asio::io_context io;
  journal j;
  auto buz = fl::step("buz", fl::needs(c, d), fl::gives(x), [](int cv, int dv) { return cv + dv; });
  fl::bundle f{fl::seq(j.add("foo", a, b, 1), fl::par(j.add("bar", b, c, 10), j.add("baz", b, d, 100)), buz)};
  fl::bag out = call(io, f, fl::bag{a(1)});
  BOOST_TEST(out.at(x) == 114);
  BOOST_TEST(f.root().describe() == "seq(foo, par(bar, baz), buz)");
}

FERRY_TEST_CASE(f2_a_seq_branch_inside_par_overlaps_its_sibling_in_time) {
  asio::io_context io;
  using clock = std::chrono::steady_clock;
  clock::time_point seq_started{}, seq_ended{}, sibling_started{}, sibling_ended{};
  auto first = fl::step("first", fl::needs(a), fl::gives(b), [&](int v) -> asio::awaitable<int> {
    seq_started = clock::now();
    co_await sleep_for(100ms);
    co_return v;
  });
  auto second = fl::step("second", fl::needs(b), fl::gives(c), [&](int v) -> asio::awaitable<int> {
    co_await sleep_for(100ms);
    seq_ended = clock::now();
    co_return v;
  });
  auto sibling = fl::step("sibling", fl::needs(a), fl::gives(d), [&](int v) -> asio::awaitable<int> {
    sibling_started = clock::now();
    co_await sleep_for(150ms);
    sibling_ended = clock::now();
    co_return v;
  });
  fl::bundle f{fl::par(fl::seq(first, second), sibling)};
  const auto t0 = clock::now();
  fl::bag out = call(io, f, fl::bag{a(7)});
  const auto total = clock::now() - t0;
  BOOST_TEST(out.at(c) == 7);
  BOOST_TEST(out.at(d) == 7);
  // Overlap: the sibling starts before the seq ends and ends after the seq starts.
  BOOST_TEST((sibling_started < seq_ended));
  BOOST_TEST((sibling_ended > seq_started));
  // Sequentially it would be 350 ms; concurrently about 200 ms.
  BOOST_TEST(std::chrono::duration<double>(total).count() < 0.33);
}

FERRY_TEST_CASE(f2_plain_function_branches_run_in_parallel_on_the_pool) {
  asio::io_context io;
  ferry::thread_pool pool{4};
  auto slow = [](int v) {
    std::this_thread::sleep_for(100ms);
    return v;
  };
  fl::bundle f{fl::par(fl::step("s1", fl::needs(a), fl::gives(b), slow).on(pool),
                       fl::step("s2", fl::needs(a), fl::gives(c), slow).on(pool),
                       fl::step("s3", fl::needs(a), fl::gives(d), slow).on(pool),
                       fl::step("s4", fl::needs(a), fl::gives(x), slow).on(pool))};
  const auto t0 = std::chrono::steady_clock::now();
  fl::bag out = call(io, f, fl::bag{a(3)});
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  BOOST_TEST(out.at(b) + out.at(c) + out.at(d) + out.at(x) == 12);
  BOOST_TEST(s < 0.3);  // 4 x 100 ms one by one would be 0.4 s
}

FERRY_TEST_CASE(f2_empty_compositions_are_refused) {
  BOOST_TEST(error_of([] { fl::seq(std::vector<fl::node>{}); }) == ferry::errc::invalid_argument);
  BOOST_TEST(error_of([] { fl::par(std::vector<fl::node>{}); }) == ferry::errc::invalid_argument);
}

// --- F3: skipping ---------------------------------------------------------------------------

FERRY_TEST_CASE(f3_a_step_missing_a_key_is_skipped_and_the_bag_passes_through) {
  asio::io_context io;
  journal j;
  fl::bundle f{fl::seq(j.add("foo", a, b, 1), j.add("needs_x", x, y, 1), j.add("bar", b, c, 10))};
  fl::bag out = call(io, f, fl::bag{a(1)});
  BOOST_TEST(out.at(c) == 12);
  BOOST_TEST((j.entries == std::vector<std::string>{"foo", "bar"}));
  BOOST_TEST(!out.contains("y"));
}

FERRY_TEST_CASE(f3_par_starts_only_branches_whose_first_step_can_run) {
  asio::io_context io;
  journal j;
  auto dispatch = fl::step("dispatch", fl::needs(a), fl::gives(b, x), [](int v) {
    fl::bag out;
    if (v > 0) out.set(b, v);  // only system "b" should answer
    else out.set(x, v);
    return out;
  });
  fl::bundle f{fl::seq(dispatch, fl::par(fl::seq(j.add("ask_b", b, c, 1), j.add("transform_b", c, d, 1)),
                                         fl::seq(j.add("ask_x", x, y, 1), j.add("transform_x", y, d, 1))))};
  fl::bag out = call(io, f, fl::bag{a(5)});
  BOOST_TEST(out.at(d) == 7);
  BOOST_TEST((j.entries == std::vector<std::string>{"ask_b", "transform_b"}));
  j.entries.clear();
  out = call(io, f, fl::bag{a(-5)});
  BOOST_TEST(out.at(d) == -3);
  BOOST_TEST((j.entries == std::vector<std::string>{"ask_x", "transform_x"}));
}

FERRY_TEST_CASE(f3_a_par_where_no_branch_can_run_is_an_error_in_strict_mode_and_a_pass_through_otherwise) {
  asio::io_context io;
  journal j;
  auto shape = fl::seq(j.add("first", a, b, 1), fl::par(j.add("p", x, y, 1), j.add("q", y, x, 1)));
  fl::bundle lenient{shape};
  fl::bag out = call(io, lenient, fl::bag{a(1)});
  BOOST_TEST(out.at(b) == 2);
  fl::bundle strict{shape, {.strict = true, .inputs = {a, x, y}}};  // declared: construction passes
  auto e = failure_of(io, strict, fl::bag{a(1)});
  BOOST_REQUIRE(e);
  BOOST_TEST(code_of(e) == fl::errc::no_branch_ran);
  BOOST_TEST(contains(message_of(e), "par(p, q)"));
}

FERRY_TEST_CASE(f3_strict_construction_rejects_a_step_that_can_never_run_naming_it_and_the_key) {
  journal j;
  auto ok = fl::seq(j.add("foo", a, b, 1), fl::par(j.add("bar", b, c, 1), j.add("baz", b, d, 1)),
                    fl::step("buz", fl::needs(c, d), fl::gives(x), [](int p, int q) { return p + q; }));
  BOOST_CHECK_NO_THROW(fl::bundle(ok, {.strict = true, .inputs = {a}}));
  try {
    fl::bundle bad{fl::seq(j.add("foo", a, b, 1), j.add("orphan", y, c, 1)), {.strict = true, .inputs = {a}}};
    BOOST_FAIL("a step needing an unknown key was accepted");
  } catch (const ferry::error& e) {
    BOOST_TEST(e.code() == fl::errc::never_runs);
    BOOST_TEST(contains(e.what(), "'orphan'"));
    BOOST_TEST(contains(e.what(), "'y'"));
  }
  // Visibility matters: with `none`, step two no longer sees the initial key a.
  auto uses_a_late = fl::seq(j.add("one", a, b, 1), fl::step("two", fl::needs(a, b), fl::gives(c),
                                                              [](int p, int q) { return p + q; }));
  BOOST_CHECK_NO_THROW(fl::bundle(uses_a_late, {.visible = fl::visibility::initial, .strict = true, .inputs = {a}}));
  BOOST_TEST(error_of([&] {
               fl::bundle(uses_a_late, {.visible = fl::visibility::none, .strict = true, .inputs = {a}});
             }) == fl::errc::never_runs);
  // A type clash between what is given and what is needed.
  const fl::key<std::string> b_text{"b"};
  auto clash = fl::seq(j.add("one", a, b, 1),
                       fl::step("two", fl::needs(b_text), [](const std::string&) {}));
  BOOST_TEST(error_of([&] { fl::bundle(clash, {.strict = true, .inputs = {a}}); }) == fl::errc::type_mismatch);
  // Non-strict bundles accept all of them.
  BOOST_CHECK_NO_THROW(fl::bundle(fl::seq(j.add("orphan", y, c, 1))));
}

FERRY_TEST_CASE(f3_a_key_of_the_wrong_type_at_run_time_is_an_error_not_a_skip) {
  asio::io_context io;
  fl::bundle f{fl::step("wants_int", fl::needs(a), fl::gives(b), [](int v) { return v; })};
  const fl::key<std::string> a_text{"a"};
  auto e = failure_of(io, f, fl::bag{a_text("one")});
  BOOST_TEST(code_of(e) == fl::errc::type_mismatch);
  BOOST_TEST(contains(message_of(e), "'wants_int'"));
}

// --- F4: merging ----------------------------------------------------------------------------

FERRY_TEST_CASE(f4_equal_values_merge_and_different_values_conflict_naming_key_and_steps) {
  asio::io_context io;
  auto left = fl::step("left", fl::needs(a), fl::gives(b), [](int v) -> asio::awaitable<int> { co_return v; });
  auto right_same = fl::step("right_same", fl::needs(a), fl::gives(b), [](int v) { return v; });
  auto right_diff = fl::step("right_diff", fl::needs(a), fl::gives(b), [](int v) -> asio::awaitable<int> { co_return v + 1; });
  fl::bundle agree{fl::par(left, right_same)};
  BOOST_TEST(call(io, agree, fl::bag{a(4)}).at(b) == 4);
  fl::bundle disagree{fl::par(left, right_diff)};
  auto e = failure_of(io, disagree, fl::bag{a(4)});
  BOOST_REQUIRE(e);
  try {
    std::rethrow_exception(e);
  } catch (const fl::merge_conflict& mc) {
    BOOST_TEST(mc.code() == fl::errc::merge_conflict);
    BOOST_TEST(mc.key() == "b");
    const bool named = (mc.first_step() == "left" && mc.second_step() == "right_diff") ||
                       (mc.first_step() == "right_diff" && mc.second_step() == "left");
    BOOST_TEST(named);
    BOOST_TEST(contains(mc.what(), "'b'"));
  }
}

// --- F5: visibility -------------------------------------------------------------------------

FERRY_TEST_CASE(f5_the_three_visibility_modes_on_the_same_flow) {
  asio::io_context io;
  // one: a -> b; two: b -> c; three needs a and b (only visible in some modes) -> d.
  journal j;
  auto three = fl::step("three", fl::needs(a, b), fl::gives(d), [](int p, int q) { return p * 100 + q; });
  fl::bundle f{fl::seq(j.add("one", a, b, 1), j.add("two", b, c, 1), three)};

  fl::bag none = call(io, f, fl::bag{a(1)}, fl::visibility::none);
  BOOST_TEST(!none.contains("d"));  // three skipped: neither a nor b visible after two
  BOOST_TEST(none.at(c) == 3);
  BOOST_TEST(!none.contains("a"));

  fl::bag initial = call(io, f, fl::bag{a(1)}, fl::visibility::initial);
  BOOST_TEST(!initial.contains("d"));  // a visible, b (an output of one) no longer
  BOOST_TEST(initial.at(a) == 1);
  BOOST_TEST(initial.at(c) == 3);
  BOOST_TEST(!initial.contains("b"));

  fl::bag all = call(io, f, fl::bag{a(1)}, fl::visibility::all);
  BOOST_TEST(all.at(d) == 102);
  BOOST_TEST(all.at(a) == 1);
  BOOST_TEST(all.at(b) == 2);
  BOOST_TEST(all.at(c) == 3);

  // The default is the bundle's option.
  fl::bundle g{fl::seq(j.add("one", a, b, 1), j.add("two", b, c, 1), three), {.visible = fl::visibility::all}};
  BOOST_TEST(call(io, g, fl::bag{a(1)}).at(d) == 102);
}

FERRY_TEST_CASE(f5_two_concurrent_calls_of_one_bundle_never_see_each_others_values) {
  asio::io_context io;
  auto slow_echo = fl::step("slow_echo", fl::needs(a), fl::gives(b), [](int v) -> asio::awaitable<int> {
    co_await sleep_for(std::chrono::milliseconds(10 * (v % 5)));
    co_return v;
  });
  auto check = fl::step("check", fl::needs(a, b), fl::gives(c), [](int p, int q) -> asio::awaitable<int> {
    if (p != q) throw std::logic_error("mixed calls");
    co_return p * 2;
  });
  fl::bundle f{fl::seq(slow_echo, check), {.visible = fl::visibility::all}};
  std::vector<std::shared_future<fl::bag>> futures;
  for (int i = 0; i < 20; ++i) {
    futures.push_back(f.async_run(io.get_executor(), fl::bag{a(i)}, asio::use_future).share());
  }
  io.run();
  for (int i = 0; i < 20; ++i) {
    fl::bag out = futures[static_cast<std::size_t>(i)].get();
    BOOST_TEST(out.at(c) == 2 * i);
    BOOST_TEST(out.at(a) == i);
  }
}

// --- F6: mapping and binding ----------------------------------------------------------------

FERRY_TEST_CASE(f6_map_input_map_output_and_bind) {
  asio::io_context io;
  const fl::key<int> endpoint{"endpoint"}, data{"data"}, data_a{"data_a"}, data_b{"data_b"};
  const fl::key<int> query{"query"};
  auto source = fl::step("source", fl::needs(endpoint, query), fl::gives(data),
                         [](int ep, int q) -> asio::awaitable<int> { co_return ep * 1000 + q; });
  auto source_a = source.bind(endpoint, 1).map_output(data, data_a).renamed("source_a");
  auto source_b = source.bind(endpoint, 2).map_output(data, data_b).renamed("source_b");
  auto merge = fl::step("merge", fl::needs(data_a, data_b), fl::gives(data), [](int p, int q) { return p + q; });
  fl::bundle f{fl::seq(fl::par(source_a, source_b), merge)};
  BOOST_TEST(call(io, f, fl::bag{query(7)}).at(data) == 1007 + 2007);
  // bind removes the key from what is needed; map_input renames it.
  BOOST_TEST(source_a.needs().size() == 1u);
  BOOST_TEST(source_a.needs().front().name == "query");
  auto from_x = source.bind(endpoint, 3).map_input(query, x);
  BOOST_TEST(from_x.needs().front().name == "x");
  fl::bundle g{from_x};
  BOOST_TEST(call(io, g, fl::bag{x(5)}).at(data) == 3005);
  BOOST_TEST(source.needs().size() == 2u);  // the original is unchanged
}

FERRY_TEST_CASE(f6_the_three_output_forms) {
  asio::io_context io;
  const fl::key<int> source{"source"}, data{"data"}, source_a{"source_a"}, data_a{"data_a"};
  // One name.
  fl::bundle one{fl::step("one", fl::needs(a), fl::gives(data), [](int v) { return v; })};
  BOOST_TEST(call(io, one, fl::bag{a(9)}).at(data) == 9);
  // Several names: a tuple (or an aggregate).
  fl::bundle several{fl::step("several", fl::needs(a), fl::gives(source, data),
                              [](int v) { return std::tuple{v, v * 2}; })};
  fl::bag s = call(io, several, fl::bag{a(9)});
  BOOST_TEST(s.at(source) == 9);
  BOOST_TEST(s.at(data) == 18);
  struct pair_result {
    int first;
    int second;
  };
  fl::bundle aggregate{fl::step("aggregate", fl::needs(a), fl::gives(source, data),
                                [](int v) -> asio::awaitable<pair_result> { co_return pair_result{v, v + 1}; })};
  BOOST_TEST(call(io, aggregate, fl::bag{a(9)}).at(data) == 10);
  // A renaming map over a step that returns a bag.
  auto dict = fl::step("dict", fl::needs(a), fl::gives(source, data), [&](int v) {
    return fl::bag{source(v), data(v + 1)};
  });
  fl::bundle renamed{dict.map_output(source, source_a).map_output(data, data_a)};
  fl::bag r = call(io, renamed, fl::bag{a(1)});
  BOOST_TEST(r.at(source_a) == 1);
  BOOST_TEST(r.at(data_a) == 2);
  BOOST_TEST(!r.contains("source"));
}

FERRY_TEST_CASE(f6_mapping_errors_name_the_key) {
  auto s = fl::step("s", fl::needs(a), fl::gives(b), [](int v) { return v; });
  try {
    (void)s.map_input(x, y);
    BOOST_FAIL("mapping an unknown parameter was accepted");
  } catch (const ferry::error& e) {
    BOOST_TEST(e.code() == fl::errc::invalid_mapping);
    BOOST_TEST(contains(e.what(), "'x'"));
    BOOST_TEST(contains(e.what(), "'s'"));
  }
  BOOST_TEST(error_of([&] { (void)s.map_output(x, y); }) == fl::errc::invalid_mapping);
  BOOST_TEST(error_of([&] { (void)s.bind(x, 1); }) == fl::errc::invalid_mapping);
  BOOST_TEST(error_of([&] { (void)s.bind(a, 1).map_input(a, c); }) == fl::errc::invalid_mapping);
  BOOST_TEST(error_of([&] { (void)s.map_input(a, c).bind(a, 1); }) == fl::errc::invalid_mapping);
  const fl::key<std::string> a_text{"a"};
  BOOST_TEST(error_of([&] { (void)s.bind(a_text, "one"); }) == fl::errc::type_mismatch);
  const fl::key<int> b2{"b2"};
  auto two = fl::step("two", fl::needs(a), fl::gives(b, b2), [](int v) { return std::tuple{v, v}; });
  BOOST_TEST(error_of([&] { (void)two.map_output(b, b2); }) == fl::errc::invalid_mapping);
}

FERRY_TEST_CASE(f6_a_bag_result_with_an_undeclared_key_is_an_error_naming_it) {
  asio::io_context io;
  fl::bundle f{fl::step("sloppy", fl::needs(a), fl::gives(b), [](int v) { return fl::bag{b(v), c(v)}; })};
  auto e = failure_of(io, f, fl::bag{a(1)});
  BOOST_TEST(code_of(e) == fl::errc::undeclared_output);
  BOOST_TEST(contains(message_of(e), "'c'"));
  BOOST_TEST(contains(message_of(e), "'sloppy'"));
}

// --- F7: zero-argument steps ----------------------------------------------------------------

FERRY_TEST_CASE(f7_zero_argument_steps_run) {
  asio::io_context io;
  std::atomic<int> ran{0};
  auto tick = fl::step("tick", [&] { ++ran; });
  auto make = fl::step("make", fl::gives(a), []() -> asio::awaitable<int> { co_return 42; });
  auto coro_tick = fl::step("coro_tick", [&]() -> asio::awaitable<void> {
    ++ran;
    co_return;
  });
  fl::bundle f{fl::seq(tick, make, coro_tick), {.visible = fl::visibility::all}};
  fl::bag out = call(io, f, fl::bag{});
  BOOST_TEST(ran.load() == 2);
  BOOST_TEST(out.at(a) == 42);
}

// --- F8: repeat -----------------------------------------------------------------------------

FERRY_TEST_CASE(f8_repeat_runs_with_the_same_initial_values_until_the_stop_token) {
  asio::io_context io;
  std::vector<int> seen;
  std::stop_source stop;
  auto record = fl::step("record", fl::needs(a), [&](int v) -> asio::awaitable<void> {
    seen.push_back(v);
    if (seen.size() == 5) stop.request_stop();
    co_return;
  });
  fl::bundle f{record};
  auto body = [&]() -> asio::awaitable<std::uint64_t> {
    auto op = f.repeat(fl::bag{a(3)}, {.period = 1ms, .stop = stop.get_token()});
    co_return co_await std::move(op);
  };
  std::future<std::uint64_t> n = asio::co_spawn(io, body(), asio::use_future);
  io.run();
  BOOST_TEST(n.get() == 5u);
  BOOST_TEST((seen == std::vector<int>(5, 3)));
}

FERRY_TEST_CASE(f8_repeat_stops_during_the_period_when_stopped_from_another_thread) {
  asio::io_context io;
  std::stop_source stop;
  std::atomic<int> runs{0};
  fl::bundle f{fl::step("count", [&] { ++runs; })};
  auto body = [&]() -> asio::awaitable<std::uint64_t> {
    auto op = f.repeat(fl::bag{}, {.period = 30s, .stop = stop.get_token()});
    co_return co_await std::move(op);
  };
  std::future<std::uint64_t> n = asio::co_spawn(io, body(), asio::use_future);
  std::thread stopper([&] {
    while (runs.load() == 0) std::this_thread::yield();
    stop.request_stop();
  });
  const auto t0 = std::chrono::steady_clock::now();
  io.run();
  stopper.join();
  BOOST_TEST(n.get() == 1u);
  BOOST_TEST((std::chrono::steady_clock::now() - t0 < 10s));
}

FERRY_TEST_CASE(f8_repeat_stopped_by_cancellation_is_operation_aborted) {
  asio::io_context io;
  std::atomic<int> runs{0};
  fl::bundle f{fl::step("slowly", [&]() -> asio::awaitable<void> {
    ++runs;
    co_await sleep_for(5ms);
  })};
  asio::cancellation_signal cancel;
  std::error_code result;
  bool done = false;
  auto body = [&]() -> asio::awaitable<std::uint64_t> {
    auto op = f.repeat(fl::bag{});
    co_return co_await std::move(op);
  };
  asio::co_spawn(io, body(), asio::bind_cancellation_slot(cancel.slot(), [&](std::exception_ptr e, std::uint64_t) {
                   result = code_of(e);
                   done = true;
                 }));
  asio::steady_timer t(io, 60ms);
  t.async_wait([&](std::error_code) { cancel.emit(asio::cancellation_type::terminal); });
  io.run();
  BOOST_TEST(done);
  BOOST_TEST(result == asio::error::operation_aborted);
  BOOST_TEST(runs.load() >= 2);
}

FERRY_TEST_CASE(f8_repeat_honours_max_iterations) {
  asio::io_context io;
  std::atomic<int> runs{0};
  fl::bundle f{fl::step("count", [&] { ++runs; })};
  auto body = [&]() -> asio::awaitable<std::uint64_t> {
    auto op = f.repeat(fl::bag{}, {.max_iterations = 4});
    co_return co_await std::move(op);
  };
  std::future<std::uint64_t> n = asio::co_spawn(io, body(), asio::use_future);
  io.run();
  BOOST_TEST(n.get() == 4u);
  BOOST_TEST(runs.load() == 4);
}

// --- F9: errors -----------------------------------------------------------------------------

FERRY_TEST_CASE(f9_a_steps_exception_propagates_unchanged) {
  asio::io_context io;
  fl::bundle f{fl::seq(fl::step("ok", fl::needs(a), fl::gives(b), [](int v) { return v; }),
                       fl::step("boom", fl::needs(b), [](int v) { throw custom_failure(v); }))};
  auto e = failure_of(io, f, fl::bag{a(17)});
  BOOST_REQUIRE(e);
  try {
    std::rethrow_exception(e);
  } catch (const custom_failure& cf) {
    BOOST_TEST(cf.value == 17);
  }
}

FERRY_TEST_CASE(f9_a_failing_branch_cancels_its_siblings_and_is_rethrown_after_they_stop) {
  asio::io_context io;
  ferry::thread_pool pool{2};
  std::atomic<bool> coro_sibling_aborted{false}, plain_sibling_stopped{false}, coro_sibling_ended{false};
  auto failing = fl::step("failing", fl::needs(a), [](int v) -> asio::awaitable<void> {
    co_await sleep_for(20ms);
    throw custom_failure(v);
  });
  auto coro_sibling = fl::step("coro_sibling", fl::needs(a), fl::gives(b), [&](int v) -> asio::awaitable<int> {
    try {
      co_await sleep_for(20s);
    } catch (const std::system_error& e) {
      coro_sibling_aborted = e.code() == asio::error::operation_aborted;
      coro_sibling_ended = true;
      throw;
    }
    co_return v;
  });
  auto plain_sibling = fl::step("plain_sibling", fl::needs(a), fl::gives(c), [&](std::stop_token st, int v) {
                         const auto until = std::chrono::steady_clock::now() + 20s;
                         while (!st.stop_requested() && std::chrono::steady_clock::now() < until) {
                           std::this_thread::sleep_for(1ms);
                         }
                         plain_sibling_stopped = st.stop_requested();
                         return v;
                       }).on(pool);
  fl::bundle f{fl::par(failing, fl::seq(coro_sibling, fl::step("never", fl::needs(b), [](int) {})), plain_sibling)};
  const auto t0 = std::chrono::steady_clock::now();
  auto e = failure_of(io, f, fl::bag{a(5)});
  BOOST_TEST((std::chrono::steady_clock::now() - t0 < 10s));
  BOOST_REQUIRE(e);
  try {
    std::rethrow_exception(e);
  } catch (const custom_failure& cf) {
    BOOST_TEST(cf.value == 5);
  }
  // Rethrown only after the siblings stopped.
  BOOST_TEST(coro_sibling_ended.load());
  BOOST_TEST(coro_sibling_aborted.load());
  BOOST_TEST(plain_sibling_stopped.load());
}

FERRY_TEST_CASE(f9_cancelling_a_call_cancels_its_running_branches) {
  asio::io_context io;
  std::atomic<int> aborted{0};
  auto waiter = [&](int v) -> asio::awaitable<int> {
    try {
      co_await sleep_for(20s);
    } catch (const std::system_error&) {
      ++aborted;
      throw;
    }
    co_return v;
  };
  fl::bundle f{fl::par(fl::step("w1", fl::needs(a), fl::gives(b), waiter),
                       fl::step("w2", fl::needs(a), fl::gives(c), waiter))};
  asio::cancellation_signal cancel;
  std::error_code result;
  auto body = [&]() -> asio::awaitable<fl::bag> {
    auto op = f(fl::bag{a(1)});
    co_return co_await std::move(op);
  };
  asio::co_spawn(io, body(), asio::bind_cancellation_slot(cancel.slot(), [&](std::exception_ptr e, fl::bag) {
                   result = code_of(e);
                 }));
  asio::steady_timer t(io, 30ms);
  t.async_wait([&](std::error_code) { cancel.emit(asio::cancellation_type::terminal); });
  const auto t0 = std::chrono::steady_clock::now();
  io.run();
  BOOST_TEST((std::chrono::steady_clock::now() - t0 < 10s));
  BOOST_TEST(result == asio::error::operation_aborted);
  BOOST_TEST(aborted.load() == 2);
}

// --- lifetimes and the loop -------------------------------------------------------------------

FERRY_TEST_CASE(a_call_and_a_repeat_outlive_the_bundle_object_that_started_them) {
  asio::io_context io;
  fl::bag out;
  bool called = false;
  {
    fl::bundle temporary{fl::step("twice", fl::needs(a), fl::gives(b), [](int v) -> asio::awaitable<int> {
      co_return 2 * v;
    })};
    temporary.async_run(io.get_executor(), fl::bag{a(21)}, [&](std::exception_ptr e, fl::bag r) {
      called = !e;
      out = std::move(r);
    });
  }  // the bundle is gone before the call starts
  std::atomic<int> runs{0};
  std::uint64_t repeated = 0;
  {
    fl::bundle counting{fl::step("count", [&] { ++runs; })};
    asio::co_spawn(io, counting.repeat(fl::bag{}, {.max_iterations = 3}),
                   [&](std::exception_ptr e, std::uint64_t n) { repeated = e ? 0 : n; });
  }
  io.run();
  BOOST_TEST(called);
  BOOST_TEST(out.at(b) == 42);
  BOOST_TEST(repeated == 3u);
  BOOST_TEST(runs.load() == 3);
}

FERRY_TEST_CASE(repeat_of_steps_that_never_suspend_still_yields_to_the_loop_and_can_be_cancelled) {
  asio::io_context io;
  std::uint64_t runs = 0;
  fl::bundle f{fl::step("instant", [&]() -> asio::awaitable<void> {
    ++runs;
    co_return;
  })};
  asio::cancellation_signal cancel;
  std::error_code result;
  asio::co_spawn(io, f.repeat(fl::bag{}),
                 asio::bind_cancellation_slot(cancel.slot(), [&](std::exception_ptr e, std::uint64_t) {
                   result = code_of(e);
                 }));
  bool timer_ran = false;
  asio::steady_timer t(io, 20ms);
  t.async_wait([&](std::error_code) {
    timer_ran = true;  // other handlers get their turn
    cancel.emit(asio::cancellation_type::terminal);
  });
  io.run();
  BOOST_TEST(timer_ran);
  BOOST_TEST(result == asio::error::operation_aborted);
  BOOST_TEST(runs > 1u);
}

// --- F11: a flow fed a stream -----------------------------------------------------------------

FERRY_TEST_CASE(f11_stream_keeps_at_most_max_in_flight_calls_and_delivers_in_source_order) {
  asio::io_context io;
  int running = 0, peak = 0;
  auto slow = fl::step("slow", fl::needs(a), fl::gives(b), [&](int v) -> asio::awaitable<int> {
    peak = std::max(peak, ++running);
    co_await sleep_for(std::chrono::milliseconds((v * 7) % 5));  // later items often finish first
    --running;
    co_return v * 10;
  });
  fl::bundle f{slow};
  std::vector<fl::bag> input;
  for (int i = 0; i < 60; ++i) input.push_back(fl::bag{a(i)});
  std::vector<int> got;
  auto body = [&]() -> asio::awaitable<std::uint64_t> {
    auto op = f.stream(input, [&](fl::bag out) { got.push_back(out.at(b)); }, {.max_in_flight = 4});
    co_return co_await std::move(op);
  };
  std::uint64_t n = 0;
  asio::co_spawn(io, body(), [&](std::exception_ptr e, std::uint64_t count) {
    if (e) std::rethrow_exception(e);
    n = count;
  });
  io.run();
  BOOST_TEST(n == 60u);
  BOOST_TEST(peak == 4);  // reached, never exceeded
  BOOST_REQUIRE(got.size() == 60u);
  for (std::size_t i = 0; i < got.size(); ++i) BOOST_TEST_REQUIRE(got[i] == static_cast<int>(10 * i));
}

FERRY_TEST_CASE(f11_unordered_stream_delivers_every_result_as_it_finishes) {
  asio::io_context io;
  fl::bundle f{fl::step("jitter", fl::needs(a), fl::gives(b), [](int v) -> asio::awaitable<int> {
    co_await sleep_for(std::chrono::milliseconds(v % 2 == 0 ? 40 : 1));
    co_return v;
  })};
  std::vector<fl::bag> input;
  for (int i = 0; i < 20; ++i) input.push_back(fl::bag{a(i)});
  std::vector<int> got;
  auto body = [&]() -> asio::awaitable<std::uint64_t> {
    auto op = f.stream(input, [&](fl::bag out) { got.push_back(out.at(b)); },
                       {.max_in_flight = 20, .ordered = false});
    co_return co_await std::move(op);
  };
  asio::co_spawn(io, body(), [](std::exception_ptr e, std::uint64_t) {
    if (e) std::rethrow_exception(e);
  });
  io.run();
  BOOST_REQUIRE(got.size() == 20u);
  BOOST_TEST(got.front() % 2 == 1);  // a fast (odd) one came first
  std::vector<int> sorted = got;
  std::sort(sorted.begin(), sorted.end());
  for (std::size_t i = 0; i < sorted.size(); ++i) BOOST_TEST(sorted[i] == static_cast<int>(i));
}

FERRY_TEST_CASE(f11_a_failing_call_stops_the_stream_and_cancels_the_calls_in_flight) {
  asio::io_context io;
  int aborted = 0, started = 0;
  fl::bundle f{fl::step("maybe", fl::needs(a), fl::gives(b), [&](int v) -> asio::awaitable<int> {
    ++started;
    if (v == 3) throw custom_failure(v);
    try {
      co_await sleep_for(20s);
    } catch (const std::system_error&) {
      ++aborted;
      throw;
    }
    co_return v;
  })};
  std::vector<fl::bag> input;
  for (int i = 0; i < 100; ++i) input.push_back(fl::bag{a(i)});
  std::exception_ptr failure;
  auto body = [&]() -> asio::awaitable<std::uint64_t> {
    auto op = f.stream(input, [](fl::bag) {}, {.max_in_flight = 4});
    co_return co_await std::move(op);
  };
  asio::co_spawn(io, body(), [&](std::exception_ptr e, std::uint64_t) { failure = e; });
  const auto t0 = std::chrono::steady_clock::now();
  io.run();
  BOOST_TEST((std::chrono::steady_clock::now() - t0 < 10s));
  BOOST_REQUIRE(failure);
  BOOST_CHECK_THROW(std::rethrow_exception(failure), custom_failure);
  BOOST_TEST(started == 4);  // nothing read after the failure
  BOOST_TEST(aborted == 3);  // the three others in flight were cancelled
}

FERRY_TEST_CASE(f11_a_threaded_iterator_of_bags_feeds_a_bundle) {
  asio::io_context io;
  auto bags = ferry::threaded_iterable([](ferry::sink<fl::bag>& out) {
    for (int i = 0; i < 50; ++i) {
      if (!out(fl::bag{a(i)})) return;
    }
  });
  fl::bundle f{fl::step("square", fl::needs(a), fl::gives(b), [](int v) { return v * v; })};
  std::vector<int> got;
  auto body = [&]() -> asio::awaitable<std::uint64_t> {
    auto it = bags();
    auto op = f.stream(it, [&](fl::bag out) { got.push_back(out.at(b)); }, {.max_in_flight = 8});
    co_return co_await std::move(op);
  };
  asio::co_spawn(io, body(), [](std::exception_ptr e, std::uint64_t) {
    if (e) std::rethrow_exception(e);
  });
  io.run();
  BOOST_REQUIRE(got.size() == 50u);
  for (std::size_t i = 0; i < got.size(); ++i) BOOST_TEST_REQUIRE(got[i] == static_cast<int>(i * i));
}

FERRY_TEST_CASE(f11_stream_refuses_a_zero_bound) {
  asio::io_context io;
  fl::bundle f{fl::step("noop", [] {})};
  std::error_code code;
  auto body = [&]() -> asio::awaitable<std::uint64_t> {
    auto op = f.stream(std::vector<fl::bag>{}, [](fl::bag) {}, {.max_in_flight = 0});
    co_return co_await std::move(op);
  };
  asio::co_spawn(io, body(), [&](std::exception_ptr e, std::uint64_t) { code = code_of(e); });
  io.run();
  BOOST_TEST(code == ferry::errc::invalid_argument);
}
