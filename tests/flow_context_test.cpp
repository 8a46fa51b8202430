#define BOOST_TEST_MODULE ferry_flow_context
#include "coro_test_support.hpp"

#include <ferry/flow/context.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/error.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <exception>
#include <latch>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

// House rules for the coroutines below (g++ 12): an awaited call never has a temporary with a
// destructor among its arguments (the awaitable is built in its own statement, then
// `co_await std::move(op)`), no co_await in conditions or initializer lists, and every
// coroutine lambda is a named variable that outlives the coroutines it starts.

using namespace std::chrono_literals;
using namespace asio::experimental::awaitable_operators;
namespace flow = ferry::flow;
using flow::context;
using steady = std::chrono::steady_clock;

namespace flow_test {

struct widget {
  explicit widget(int v, std::string o = {}) : value(v), origin(std::move(o)) {}
  int value;
  std::string origin;
};

struct gadget {
  explicit gadget(std::string l) : label(std::move(l)) {}
  std::string label;
};

struct database {
  virtual ~database() = default;
  virtual std::string kind() const = 0;
};

struct sql_database : database {
  std::string kind() const override { return "sql"; }
};

// The R9 stand-in: a database whose transaction outcome is recorded in a log.
struct fake_database {
  explicit fake_database(std::vector<std::string>& l) : log(&l) {}
  void commit() { log->push_back("commit"); }
  void rollback() { log->push_back("rollback"); }
  std::vector<std::string>* log;
};

struct block_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace flow_test

using flow_test::block_error;
using flow_test::database;
using flow_test::fake_database;
using flow_test::gadget;
using flow_test::sql_database;
using flow_test::widget;

using ferry_test::contains;
using ferry_test::error_of;
using ferry_test::message_of;
using ferry_test::run;

namespace {

// The outcome of a coroutine started with `start`; checked after io.run().
struct outcome {
  bool done = false;
  std::exception_ptr failure;
};

template <class Body>
void start(asio::io_context& io, Body& body, outcome& out) {
  asio::co_spawn(io, body(), [&out](std::exception_ptr e) {
    out.done = true;
    out.failure = e;
  });
}

void check(const outcome& out) {
  BOOST_REQUIRE(out.done);
  if (out.failure) std::rethrow_exception(out.failure);
}

std::error_code code(flow::errc e) {
  return flow::make_error_code(e);
}


// A duration in whole milliseconds (printable in a failed assertion).
long long ms(steady::duration d) {
  return static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
}


asio::awaitable<void> delay(std::chrono::milliseconds d) {
  asio::any_io_executor ex = co_await asio::this_coro::executor;
  asio::steady_timer timer(ex, d);
  co_await timer.async_wait(asio::use_awaitable);
}

// Appends `what` to `events` when destroyed (RAII cleanup inside a task).
struct record_on_exit {
  record_on_exit(std::vector<std::string>& ev, std::string w) : events(&ev), what(std::move(w)) {}
  record_on_exit(const record_on_exit&) = delete;
  record_on_exit& operator=(const record_on_exit&) = delete;
  ~record_on_exit() { events->push_back(what); }
  std::vector<std::string>* events;
  std::string what;
};

}  // namespace

// =============================================================================================
// R1 — keys, names, several types, null values
// =============================================================================================

FERRY_TEST_CASE(r1_resources_are_keyed_by_type_and_name_and_the_name_defaults_to_default) {
  asio::io_context io;
  context ctx{io};
  ctx.add_resource(widget{1});  // "default"
  ctx.add_resource(widget{2}, "other");
  ctx.add_resource(std::make_shared<gadget>("g"));  // same name, another type: no conflict
  ctx.add_resource(42, "answer");                   // a plain value, wrapped in a shared_ptr
  BOOST_TEST(ctx.get<widget>()->value == 1);
  BOOST_TEST(ctx.get<widget>("default")->value == 1);
  BOOST_TEST(ctx.get<widget>("other")->value == 2);
  BOOST_TEST(ctx.get<gadget>()->label == "g");
  BOOST_TEST(*ctx.get<int>("answer") == 42);
  BOOST_TEST(!ctx.get<widget>("missing"));
  BOOST_TEST(!ctx.get<int>());
  BOOST_TEST(!ctx.get<gadget>("other"));
  std::shared_ptr<widget> first = ctx.get<widget>("other");
  BOOST_TEST(first == ctx.get<widget>("other"));  // the same object every time
  // Identifiers of letters, digits and underscores are fine.
  for (const std::string good : {"A_b9", "_", "0", "snake_case_name"}) {
    BOOST_TEST(error_of([&] { ctx.add_resource(widget{3}, good); }) == std::error_code{});
    BOOST_TEST(ctx.get<widget>(good)->value == 3);
  }
}

FERRY_TEST_CASE(r1_one_value_under_several_types_is_one_object_reachable_by_each_type) {
  asio::io_context io;
  context ctx{io};
  auto impl = std::make_shared<sql_database>();
  ctx.add_resource(impl, "main", flow::types<database, sql_database>);
  std::shared_ptr<database> as_interface = ctx.get<database>("main");
  std::shared_ptr<sql_database> as_implementation = ctx.get<sql_database>("main");
  BOOST_REQUIRE(as_interface);
  BOOST_REQUIRE(as_implementation);
  BOOST_TEST(as_implementation == impl);
  BOOST_TEST(as_interface.get() == static_cast<database*>(impl.get()));
  BOOST_TEST(as_interface->kind() == "sql");

  // Only the listed types are registered.
  ctx.add_resource(impl, "interface_only", flow::types<database>);
  BOOST_TEST(ctx.get<database>("interface_only").get() == static_cast<database*>(impl.get()));
  BOOST_TEST(!ctx.get<sql_database>("interface_only"));

  // A factory registered under several types generates one object for all of them.
  int calls = 0;
  ctx.add_resource_factory<sql_database>(
      [&](context&) {
        ++calls;
        return std::make_shared<sql_database>();
      },
      "made", flow::types<database, sql_database>);
  std::shared_ptr<database> made_interface = ctx.get<database>("made");
  std::shared_ptr<sql_database> made_implementation = ctx.get<sql_database>("made");
  BOOST_REQUIRE(made_interface);
  BOOST_REQUIRE(made_implementation);
  BOOST_TEST(calls == 1);
  BOOST_TEST(made_interface.get() == static_cast<database*>(made_implementation.get()));

  // A conflict on one of the types adds the value under none of them.
  ctx.add_resource(std::make_shared<sql_database>(), "half", flow::types<sql_database>);
  auto other = std::make_shared<sql_database>();
  BOOST_TEST(error_of([&] {
               ctx.add_resource(other, "half", flow::types<database, sql_database>);
             }) == code(flow::errc::resource_conflict));
  BOOST_TEST(!ctx.get<database>("half"));
  BOOST_TEST(ctx.get<sql_database>("half") != other);
}

FERRY_TEST_CASE(r1_names_that_are_not_identifiers_are_refused_with_invalid_name) {
  asio::io_context io;
  context ctx{io};
  const std::vector<std::string> bad_names{"", "a-b", "with space", "a.b"};
  for (const std::string& bad : bad_names) {
    BOOST_TEST_CONTEXT("name '" << bad << "'") {
      BOOST_TEST(error_of([&] { ctx.add_resource(widget{1}, bad); }) ==
                 code(flow::errc::invalid_name));
      BOOST_TEST(error_of([&] { ctx.add_resource(std::make_shared<widget>(1), bad); }) ==
                 code(flow::errc::invalid_name));
      BOOST_TEST(error_of([&] {
                   ctx.add_resource_factory<widget>(
                       [](context&) { return std::make_shared<widget>(1); }, bad);
                 }) == code(flow::errc::invalid_name));
      BOOST_TEST(error_of([&] { (void)ctx.get<widget>(bad); }) == code(flow::errc::invalid_name));
      BOOST_TEST(error_of([&] { (void)ctx.require<widget>(bad); }) ==
                 code(flow::errc::invalid_name));
      try {
        ctx.add_resource(widget{1}, bad);
      } catch (const ferry::error& e) {
        BOOST_CHECK_MESSAGE(contains(e.what(), "'" + bad + "'"), "what() = " << e.what());
      }
    }
  }
  // request() refuses them too (when awaited).
  std::vector<std::error_code> request_codes;
  auto body = [&]() -> asio::awaitable<void> {
    for (const std::string& bad : bad_names) {
      std::error_code ec;
      try {
        auto op = ctx.request<widget>(bad, std::chrono::milliseconds(1));
        auto w = co_await std::move(op);
        (void)w;
      } catch (const std::system_error& e) {
        ec = e.code();
      }
      request_codes.push_back(ec);
    }
  };
  run(io, body);
  BOOST_REQUIRE(request_codes.size() == bad_names.size());
  for (const auto& ec : request_codes)
    BOOST_TEST(ec == code(flow::errc::invalid_name));
}

FERRY_TEST_CASE(r1_null_values_are_refused_with_null_resource) {
  asio::io_context io;
  context ctx{io};
  BOOST_TEST(error_of([&] { ctx.add_resource(std::shared_ptr<widget>{}); }) ==
             code(flow::errc::null_resource));
  BOOST_TEST(!ctx.get<widget>());
  BOOST_TEST(error_of([&] {
               ctx.add_resource(std::shared_ptr<sql_database>{}, "x",
                                flow::types<database, sql_database>);
             }) == code(flow::errc::null_resource));
  BOOST_TEST(!ctx.get<database>("x"));
  // The key stays free: a real value can still be added under it.
  BOOST_TEST(error_of([&] { ctx.add_resource(widget{1}); }) == std::error_code{});
  // A factory that produces nothing is refused when it runs.
  ctx.add_resource_factory<widget>([](context&) { return std::shared_ptr<widget>{}; }, "nothing");
  BOOST_TEST(error_of([&] { (void)ctx.get<widget>("nothing"); }) ==
             code(flow::errc::null_resource));
}

// =============================================================================================
// R2 — conflicts and shadowing
// =============================================================================================

FERRY_TEST_CASE(r2_a_duplicate_key_in_one_context_is_a_conflict_naming_type_and_name) {
  asio::io_context io;
  context ctx{io};
  ctx.add_resource(widget{1}, "primary");
  bool thrown = false;
  try {
    ctx.add_resource(widget{2}, "primary");
  } catch (const flow::resource_conflict& e) {
    thrown = true;
    const std::string what = e.what();
    BOOST_TEST(e.code() == code(flow::errc::resource_conflict));
    BOOST_CHECK_MESSAGE(contains(what, "flow_test::widget"), "what() = " << what);
    BOOST_CHECK_MESSAGE(contains(what, "primary"), "what() = " << what);
    BOOST_TEST(e.type_name() == "flow_test::widget");
    BOOST_TEST(e.name() == "primary");
  }
  BOOST_TEST(thrown);
  BOOST_TEST(ctx.get<widget>("primary")->value == 1);  // the first value stays
  // The shared_ptr overload, and a catch as ferry::error, see the same.
  BOOST_TEST(error_of([&] { ctx.add_resource(std::make_shared<widget>(3), "primary"); }) ==
             code(flow::errc::resource_conflict));
  // Another name, or another type under the same name, is no conflict.
  BOOST_TEST(error_of([&] { ctx.add_resource(widget{4}, "secondary"); }) == std::error_code{});
  BOOST_TEST(error_of([&] { ctx.add_resource(gadget{"g"}, "primary"); }) == std::error_code{});
}

FERRY_TEST_CASE(r2_the_same_key_in_a_child_context_is_allowed_and_shadows_the_parents) {
  asio::io_context io;
  context root{io};
  root.add_resource(widget{1, "root"});
  context child = root.make_child();
  context sibling = root.make_child();
  BOOST_TEST(error_of([&] { child.add_resource(widget{2, "child"}); }) == std::error_code{});
  context grandchild = child.make_child();
  BOOST_TEST(child.get<widget>()->origin == "child");
  BOOST_TEST(grandchild.get<widget>()->origin == "child");  // nearest ancestor
  BOOST_TEST(root.get<widget>()->origin == "root");
  BOOST_TEST(sibling.get<widget>()->origin == "root");
  // The shadowed key is still a conflict in the child itself.
  BOOST_TEST(error_of([&] { child.add_resource(widget{3}); }) ==
             code(flow::errc::resource_conflict));
}

FERRY_TEST_CASE(r2_a_second_factory_for_one_key_in_one_context_is_a_conflict) {
  asio::io_context io;
  context root{io};
  root.add_resource_factory<widget>([](context&) { return std::make_shared<widget>(1, "first"); },
                                    "made");
  bool thrown = false;
  try {
    root.add_resource_factory<widget>(
        [](context&) { return std::make_shared<widget>(2, "second"); }, "made");
  } catch (const flow::resource_conflict& e) {
    thrown = true;
    BOOST_TEST(e.code() == code(flow::errc::resource_conflict));
    BOOST_TEST(e.name() == "made");
    BOOST_TEST(e.type_name() == "flow_test::widget");
    BOOST_CHECK_MESSAGE(contains(e.what(), "flow_test::widget") && contains(e.what(), "made"),
                        "what() = " << e.what());
  }
  BOOST_TEST(thrown);
  // Another name, a child, or a plain resource for the same key: no conflict.
  auto second = [](context&) { return std::make_shared<widget>(2, "second"); };
  context child = root.make_child();
  BOOST_TEST(error_of([&] { root.add_resource_factory<widget>(second, "other"); }) ==
             std::error_code{});
  BOOST_TEST(error_of([&] { child.add_resource_factory<widget>(second, "made"); }) ==
             std::error_code{});
  // The first factory is the one in use.
  context sibling = root.make_child();
  BOOST_TEST(sibling.get<widget>("made")->origin == "first");
  BOOST_TEST(child.get<widget>("made")->origin == "second");  // its own factory is nearer
}

// =============================================================================================
// R3 — factories: one value per requesting context
// =============================================================================================

FERRY_TEST_CASE(r3_a_factory_makes_one_value_per_requesting_context_and_receives_that_context) {
  asio::io_context io;
  context parent{io};
  parent.add_resource(gadget{"parent"}, "where");
  int calls = 0;
  std::vector<std::string> requesters;
  std::vector<bool> saw_child_only;
  parent.add_resource_factory<widget>([&](context& requester) {
    ++calls;
    auto where = requester.require<gadget>("where");  // looked up from the requesting context
    requesters.push_back(where->label);
    saw_child_only.push_back(requester.get<gadget>("child_only") != nullptr);
    return std::make_shared<widget>(calls, where->label);
  });
  context child = parent.make_child();
  child.add_resource(gadget{"child"}, "where");  // shadows the parent's
  child.add_resource(gadget{"only here"}, "child_only");

  std::shared_ptr<widget> c1 = child.get<widget>();
  std::shared_ptr<widget> c2 = child.get<widget>();
  std::shared_ptr<widget> c3 = child.require<widget>();
  BOOST_TEST(calls == 1);
  BOOST_TEST(c1 == c2);
  BOOST_TEST(c1 == c3);
  BOOST_TEST(c1->origin == "child");

  std::shared_ptr<widget> p1 = parent.get<widget>();
  std::shared_ptr<widget> p2 = parent.get<widget>();
  BOOST_TEST(calls == 2);
  BOOST_TEST(p1 == p2);
  BOOST_TEST(p1 != c1);
  BOOST_TEST(p1->origin == "parent");
  BOOST_TEST(child.get<widget>() == c1);  // still the child's own
  BOOST_TEST(calls == 2);

  // A second child gets its own value too (from the parent's "where").
  context child2 = parent.make_child();
  std::shared_ptr<widget> s1 = child2.get<widget>();
  BOOST_TEST(calls == 3);
  BOOST_TEST(s1 != p1);
  BOOST_TEST(s1 != c1);
  BOOST_TEST(s1->origin == "parent");

  const std::vector<std::string> expected_requesters{"child", "parent", "parent"};
  BOOST_TEST(requesters == expected_requesters, boost::test_tools::per_element());
  const std::vector<bool> expected_child_only{true, false, false};
  BOOST_TEST(saw_child_only == expected_child_only, boost::test_tools::per_element());

  // A factory may return the value itself; it is wrapped.
  parent.add_resource_factory<gadget>([](context&) { return gadget{"by value"}; }, "plain");
  BOOST_TEST(child.get<gadget>("plain")->label == "by value");
}

// =============================================================================================
// R4 — lookup order
// =============================================================================================

FERRY_TEST_CASE(r4_lookup_order_is_local_resource_then_nearest_factory_then_ancestor_resource) {
  asio::io_context io;
  context parent{io};
  int calls = 0;
  auto factory = [&](context& requester) {
    ++calls;
    return std::make_shared<widget>(100 + calls, requester.require<gadget>("name")->label);
  };
  parent.add_resource(gadget{"parent"}, "name");
  parent.add_resource(widget{1, "parent resource"});
  // A factory and a plain resource for the same key coexist in one context.
  BOOST_TEST(error_of([&] { parent.add_resource_factory<widget>(factory); }) == std::error_code{});

  // From the child: the parent's factory beats the parent's resource; the value is
  // generated into the child.
  context child = parent.make_child();
  child.add_resource(gadget{"child"}, "name");
  std::shared_ptr<widget> from_child = child.get<widget>();
  BOOST_TEST(from_child->origin == "child");
  BOOST_TEST(calls == 1);
  BOOST_TEST(child.get<widget>() == from_child);
  BOOST_TEST(calls == 1);

  // From the parent itself: its local resource beats its own factory.
  BOOST_TEST(parent.get<widget>()->origin == "parent resource");
  BOOST_TEST(calls == 1);

  // A local resource in a child beats the parent's factory.
  context local = parent.make_child();
  local.add_resource(widget{2, "local resource"});
  BOOST_TEST(local.get<widget>()->origin == "local resource");
  BOOST_TEST(calls == 1);

  // Below `local`: the parent's factory (nearest factory) beats `local`'s resource (an
  // ancestor's resource).
  context below_local = local.make_child();
  below_local.add_resource(gadget{"below"}, "name");
  BOOST_TEST(below_local.get<widget>()->origin == "below");
  BOOST_TEST(calls == 2);

  // Registered the other way round (factory first), the local resource still wins.
  context other{io};
  other.add_resource(gadget{"other"}, "name");
  other.add_resource_factory<widget>(factory);
  BOOST_TEST(error_of([&] {
               other.add_resource(widget{3, "other resource"});
             }) == std::error_code{});
  BOOST_TEST(other.get<widget>()->origin == "other resource");
  BOOST_TEST(calls == 2);
}

FERRY_TEST_CASE(r4_a_factory_on_the_grandparent_beats_a_resource_on_the_parent) {
  asio::io_context io;
  context grandparent{io};
  int calls = 0;
  grandparent.add_resource(gadget{"grandparent"}, "name");
  grandparent.add_resource_factory<widget>([&](context& requester) {
    ++calls;
    return std::make_shared<widget>(calls, requester.require<gadget>("name")->label);
  });
  context parent = grandparent.make_child();
  parent.add_resource(gadget{"parent"}, "name");
  parent.add_resource(widget{0, "parent resource"});
  context child = parent.make_child();
  child.add_resource(gadget{"child"}, "name");

  BOOST_TEST(child.get<widget>()->origin == "child");  // the grandparent's factory wins
  BOOST_TEST(calls == 1);
  BOOST_TEST(parent.get<widget>()->origin == "parent resource");  // local resource wins
  BOOST_TEST(calls == 1);
  BOOST_TEST(grandparent.get<widget>()->origin == "grandparent");  // generated there
  BOOST_TEST(calls == 2);

  // The nearest factory wins: one on the parent shadows the grandparent's.
  context parent2 = grandparent.make_child();
  parent2.add_resource_factory<widget>(
      [](context&) { return std::make_shared<widget>(-1, "parent factory"); });
  context child2 = parent2.make_child();
  BOOST_TEST(child2.get<widget>()->origin == "parent factory");
  BOOST_TEST(calls == 2);
}

// =============================================================================================
// R5 — get, require, request
// =============================================================================================

FERRY_TEST_CASE(r5_get_is_empty_and_require_throws_resource_not_found_naming_type_and_name) {
  asio::io_context io;
  context root{io};
  context child = root.make_child();
  child.add_resource(widget{1}, "child_only");
  BOOST_TEST(!root.get<widget>("missing_one"));
  bool thrown = false;
  try {
    (void)root.require<widget>("missing_one");
  } catch (const flow::resource_not_found& e) {
    thrown = true;
    const std::string what = e.what();
    BOOST_TEST(e.code() == code(flow::errc::resource_not_found));
    BOOST_CHECK_MESSAGE(contains(what, "flow_test::widget"), "what() = " << what);
    BOOST_CHECK_MESSAGE(contains(what, "missing_one"), "what() = " << what);
    BOOST_TEST(e.type_name() == "flow_test::widget");
    BOOST_TEST(e.name() == "missing_one");
  }
  BOOST_TEST(thrown);
  // The parent does not see the child's resources; the child sees the parent's.
  BOOST_TEST(!root.get<widget>("child_only"));
  BOOST_TEST(error_of([&] { (void)root.require<widget>("child_only"); }) ==
             code(flow::errc::resource_not_found));
  root.add_resource(widget{2}, "from_root");
  BOOST_TEST(child.require<widget>("from_root")->value == 2);
  // The default name shows up in the message too.
  try {
    (void)root.require<gadget>();
  } catch (const flow::resource_not_found& e) {
    BOOST_CHECK_MESSAGE(contains(e.what(), "flow_test::gadget") && contains(e.what(), "default"),
                        "what() = " << e.what());
  }
}

FERRY_TEST_CASE(r5_request_returns_at_once_when_the_resource_or_a_factory_is_present) {
  asio::io_context io;
  context root{io};
  root.add_resource(widget{7});
  root.add_resource_factory<gadget>(
      [](context& requester) {
        return std::make_shared<gadget>(requester.parent() ? "child" : "root");
      },
      "made");
  context child = root.make_child();
  int value = 0;
  std::string made_for;
  auto body = [&]() -> asio::awaitable<void> {
    auto op = child.request<widget>();
    std::shared_ptr<widget> w = co_await std::move(op);
    value = w->value;
    auto op2 = child.request<gadget>("made", std::chrono::seconds(60));
    std::shared_ptr<gadget> g = co_await std::move(op2);
    made_for = g->label;
  };
  run(io, body);
  BOOST_TEST(value == 7);
  BOOST_TEST(made_for == "child");
}

FERRY_TEST_CASE(r5_request_is_satisfied_by_a_resource_added_later_on_the_parent) {
  asio::io_context io;
  context root{io};
  context child = root.make_child();
  context sibling = root.make_child();
  std::vector<std::string> events;
  std::shared_ptr<widget> got;
  auto requester = [&]() -> asio::awaitable<void> {
    events.push_back("request started");
    auto op = child.request<widget>("late", std::chrono::seconds(60));
    got = co_await std::move(op);
    events.push_back("request done");
  };
  auto adder = [&]() -> asio::awaitable<void> {
    co_await delay(20ms);
    events.push_back("added to a sibling");
    sibling.add_resource(widget{1}, "late");  // not an ancestor of `child`: no effect
    co_await delay(20ms);
    events.push_back("added to the parent");
    root.add_resource(widget{2}, "late");
  };
  // A second request, satisfied from a plain timer handler (no coroutine involved).
  std::shared_ptr<gadget> got_gadget;
  auto gadget_requester = [&]() -> asio::awaitable<void> {
    auto op = child.request<gadget>("from_timer");
    got_gadget = co_await std::move(op);
  };
  asio::steady_timer timer(io, 30ms);
  timer.async_wait([&](std::error_code) { root.add_resource(gadget{"timer"}, "from_timer"); });

  outcome r1, r2, a;
  start(io, requester, r1);
  start(io, adder, a);
  start(io, gadget_requester, r2);
  io.run();
  check(r1);
  check(r2);
  check(a);
  const std::vector<std::string> expected{"request started", "added to a sibling",
                                          "added to the parent", "request done"};
  BOOST_TEST(events == expected, boost::test_tools::per_element());
  BOOST_REQUIRE(got);
  BOOST_TEST(got->value == 2);
  BOOST_REQUIRE(got_gadget);
  BOOST_TEST(got_gadget->label == "timer");
}

FERRY_TEST_CASE(r5_request_is_satisfied_by_a_factory_added_later_and_generates_into_the_requester) {
  asio::io_context io;
  context root{io};
  context child = root.make_child();
  child.add_resource(gadget{"child"}, "where");
  int calls = 0;
  std::shared_ptr<widget> got;
  bool pending_when_added = false;
  auto requester = [&]() -> asio::awaitable<void> {
    auto op = child.request<widget>("made", std::chrono::seconds(60));
    got = co_await std::move(op);
  };
  auto adder = [&]() -> asio::awaitable<void> {
    co_await delay(20ms);
    pending_when_added = !got;
    root.add_resource_factory<widget>(
        [&](context& requester_ctx) {
          ++calls;
          return std::make_shared<widget>(calls, requester_ctx.require<gadget>("where")->label);
        },
        "made");
  };
  outcome r, a;
  start(io, requester, r);
  start(io, adder, a);
  io.run();
  check(r);
  check(a);
  BOOST_TEST(pending_when_added);
  BOOST_REQUIRE(got);
  BOOST_TEST(got->origin == "child");
  BOOST_TEST(calls == 1);
  BOOST_TEST(child.get<widget>("made") == got);  // stored in the child, reused
  BOOST_TEST(calls == 1);
}

FERRY_TEST_CASE(r5_request_gives_up_after_its_timeout_with_timed_out) {
  asio::io_context io;
  context root{io};
  context child = root.make_child();
  std::error_code ec;
  std::string what;
  bool is_ferry_error = false;
  steady::duration elapsed{};
  std::shared_ptr<widget> in_time;
  auto body = [&]() -> asio::awaitable<void> {
    const auto t0 = steady::now();
    try {
      auto op = child.request<widget>("never", std::chrono::milliseconds(50));
      auto w = co_await std::move(op);
      (void)w;
    } catch (const ferry::error& e) {
      is_ferry_error = true;
      ec = e.code();
      what = e.what();
    }
    elapsed = steady::now() - t0;
    // With a timeout that is not reached, the value arrives.
    auto add_soon = [&]() { root.add_resource(widget{5}, "soon"); };
    asio::post(io, add_soon);
    auto op2 = child.request<widget>("soon", std::chrono::seconds(60));
    in_time = co_await std::move(op2);
  };
  run(io, body);
  BOOST_TEST(is_ferry_error);
  BOOST_TEST(ec == ferry::make_error_code(ferry::errc::timed_out));
  BOOST_TEST(ms(elapsed) >= 50);
  BOOST_TEST(ms(elapsed) < 30000);
  BOOST_CHECK_MESSAGE(contains(what, "flow_test::widget") && contains(what, "never"),
                      "what() = " << what);
  BOOST_REQUIRE(in_time);
  BOOST_TEST(in_time->value == 5);
}

FERRY_TEST_CASE(r5_request_cancelled_through_its_cancellation_slot_ends_with_operation_aborted) {
  asio::io_context io;
  context root{io};
  context child = root.make_child();
  asio::cancellation_signal signal;
  outcome req;
  std::shared_ptr<widget> got;
  steady::time_point cancelled_at{}, completed_at{};
  bool pending_when_cancelled = false;
  auto requester = [&]() -> asio::awaitable<void> {
    auto op = child.request<widget>("absent");  // no timeout: only cancellation ends it
    got = co_await std::move(op);
  };
  asio::co_spawn(io, requester(),
                 asio::bind_cancellation_slot(signal.slot(), [&](std::exception_ptr e) {
                   req.done = true;
                   req.failure = e;
                   completed_at = steady::now();
                 }));
  auto canceller = [&]() -> asio::awaitable<void> {
    co_await delay(20ms);  // lets the request start waiting (not needed for correctness)
    pending_when_cancelled = !req.done;
    cancelled_at = steady::now();
    signal.emit(asio::cancellation_type::terminal);
  };
  outcome c;
  start(io, canceller, c);
  io.run();
  io.restart();
  check(c);
  BOOST_TEST(pending_when_cancelled);
  BOOST_REQUIRE(req.done);
  BOOST_REQUIRE(req.failure);
  std::error_code ec;
  try {
    std::rethrow_exception(req.failure);
  } catch (const std::system_error& e) {
    ec = e.code();
  }
  BOOST_TEST(ec == std::error_code(asio::error::operation_aborted));
  BOOST_TEST(!got);
  BOOST_TEST(ms(completed_at - cancelled_at) < 30000);
  // The context is unaffected: a later request still works.
  root.add_resource(widget{9}, "absent");
  int later = 0;
  auto again = [&]() -> asio::awaitable<void> {
    auto op = child.request<widget>("absent");
    std::shared_ptr<widget> w = co_await std::move(op);
    later = w->value;
  };
  run(io, again);
  BOOST_TEST(later == 9);
}

FERRY_TEST_CASE(r5_request_raced_against_a_timer_with_or_is_cancelled_when_the_timer_wins) {
  asio::io_context io;
  context ctx{io};
  std::size_t first_winner = 99, second_winner = 99;
  steady::duration first_elapsed{};
  int second_value = 0;
  auto body = [&]() -> asio::awaitable<void> {
    {
      asio::steady_timer timer(io, 30ms);
      auto req = ctx.request<widget>("absent");
      auto tick = timer.async_wait(asio::use_awaitable);
      auto race = std::move(req) || std::move(tick);
      const auto t0 = steady::now();
      std::variant<std::shared_ptr<widget>, std::monostate> winner = co_await std::move(race);
      first_elapsed = steady::now() - t0;
      first_winner = winner.index();
    }
    {
      // The other way round: the resource arrives long before the timer.
      auto add_soon = [&]() { ctx.add_resource(widget{4}, "soon"); };
      asio::post(io, add_soon);
      asio::steady_timer timer(io, 60s);
      auto req = ctx.request<widget>("soon");
      auto tick = timer.async_wait(asio::use_awaitable);
      auto race = std::move(req) || std::move(tick);
      std::variant<std::shared_ptr<widget>, std::monostate> winner = co_await std::move(race);
      second_winner = winner.index();
      if (winner.index() == 0) second_value = std::get<0>(winner)->value;
    }
  };
  const auto t0 = steady::now();
  run(io, body);  // returns only once the loser of each race has completed too
  BOOST_TEST(first_winner == 1u);
  BOOST_TEST(ms(first_elapsed) < 30000);
  BOOST_TEST(second_winner == 0u);
  BOOST_TEST(second_value == 4);
  BOOST_TEST(ms(steady::now() - t0) < 30000);  // the 60 s timer was cancelled
}

// =============================================================================================
// R6 — teardown callbacks: order, sequencing, errors, the closing exception
// =============================================================================================

FERRY_TEST_CASE(r6_teardown_callbacks_of_every_form_run_in_reverse_order_of_registration) {
  asio::io_context io;
  context ctx{io};
  std::vector<std::string> events;
  ctx.add_teardown_callback([&] { events.push_back("1 plain"); });
  ctx.add_teardown_callback([&](std::exception_ptr) { events.push_back("2 plain(exception)"); });
  ctx.add_teardown_callback([&]() -> asio::awaitable<void> {
    co_await delay(1ms);
    events.push_back("3 coroutine");
  });
  ctx.add_teardown_callback(
      [&](std::exception_ptr) -> asio::awaitable<void> {
        co_await delay(1ms);
        events.push_back("4 coroutine(exception), pass_exception");
      },
      flow::pass_exception);
  ctx.add_teardown_callback(
      [&](std::exception_ptr) { events.push_back("5 plain, pass_exception"); },
      flow::pass_exception);
  bool closing_before = true, closed_before = true;
  auto body = [&]() -> asio::awaitable<void> {
    closing_before = ctx.closing();
    closed_before = ctx.closed();
    events.push_back("closing");
    auto op = ctx.close();
    co_await std::move(op);
    events.push_back("closed");
  };
  run(io, body);
  const std::vector<std::string> expected{
      "closing",     "5 plain, pass_exception", "4 coroutine(exception), pass_exception",
      "3 coroutine", "2 plain(exception)",      "1 plain",
      "closed"};
  BOOST_TEST(events == expected, boost::test_tools::per_element());
  BOOST_TEST(!closing_before);
  BOOST_TEST(!closed_before);
  BOOST_TEST(ctx.closing());
  BOOST_TEST(ctx.closed());
}

FERRY_TEST_CASE(r6_a_coroutine_callback_finishes_before_the_next_callback_starts) {
  asio::io_context io;
  context ctx{io};
  std::vector<std::string> events;
  for (int i = 1; i <= 3; ++i) {
    ctx.add_teardown_callback([&events, &io, i]() -> asio::awaitable<void> {
      events.push_back("start " + std::to_string(i));
      asio::steady_timer timer(io, 20ms);
      co_await timer.async_wait(asio::use_awaitable);
      events.push_back("end " + std::to_string(i));
    });
    if (i == 2) ctx.add_teardown_callback([&events] { events.push_back("plain"); });
  }
  // Something else running on the loop meanwhile must not let the next callback start early.
  auto bystander = [&]() -> asio::awaitable<void> {
    for (int k = 0; k < 20; ++k)
      co_await asio::post(io, asio::use_awaitable);
  };
  outcome b;
  auto body = [&]() -> asio::awaitable<void> {
    start(io, bystander, b);
    auto op = ctx.close();
    co_await std::move(op);
  };
  run(io, body);
  check(b);
  const std::vector<std::string> expected{"start 3", "end 3",   "plain", "start 2",
                                          "end 2",   "start 1", "end 1"};
  BOOST_TEST(events == expected, boost::test_tools::per_element());
}

FERRY_TEST_CASE(r6_every_callback_runs_when_two_throw_and_the_errors_come_in_run_order) {
  asio::io_context io;
  context ctx{io};
  std::vector<std::string> events;
  bool fail = true;
  ctx.add_teardown_callback([&] { events.push_back("1"); });
  ctx.add_teardown_callback([&] {
    events.push_back("2");
    if (fail) throw std::runtime_error("registered second, ran fourth");
  });
  ctx.add_teardown_callback([&] { events.push_back("3"); });
  ctx.add_teardown_callback([&]() -> asio::awaitable<void> {
    events.push_back("4");
    co_await delay(1ms);
    if (fail) throw std::logic_error("registered fourth, ran second");
  });
  ctx.add_teardown_callback([&] { events.push_back("5"); });
  bool caught = false;
  std::error_code ec;
  std::string what;
  std::vector<std::exception_ptr> errors;
  auto body = [&]() -> asio::awaitable<void> {
    try {
      auto op = ctx.close();
      co_await std::move(op);
    } catch (const flow::teardown_error& e) {
      caught = true;
      ec = e.code();
      what = e.what();
      errors = e.exceptions();
    }
  };
  run(io, body);
  BOOST_TEST(caught);
  BOOST_TEST(ec == code(flow::errc::teardown_failed));
  const std::vector<std::string> expected{"5", "4", "3", "2", "1"};
  BOOST_TEST(events == expected, boost::test_tools::per_element());
  BOOST_REQUIRE(errors.size() == 2u);
  BOOST_TEST(message_of(errors[0]) == "registered fourth, ran second");
  BOOST_TEST(message_of(errors[1]) == "registered second, ran fourth");
  bool first_is_logic_error = false;
  try {
    std::rethrow_exception(errors[0]);
  } catch (const std::logic_error&) {
    first_is_logic_error = true;
  } catch (...) {
  }
  BOOST_TEST(first_is_logic_error);  // the original exceptions, not copies of their text
  BOOST_CHECK_MESSAGE(contains(what, "registered fourth, ran second") &&
                          contains(what, "registered second, ran fourth"),
                      "what() = " << what);
  BOOST_TEST(ctx.closed());
}

FERRY_TEST_CASE(r6_pass_exception_callbacks_receive_the_closing_exception_or_null) {
  asio::io_context io;
  const std::exception_ptr closing =
      std::make_exception_ptr(std::runtime_error("the scope failed"));
  std::vector<std::exception_ptr> seen_failing, seen_clean;
  context failing{io};
  context clean{io};
  // The same four forms on both contexts.
  for (auto* target : {&failing, &clean}) {
    std::vector<std::exception_ptr>& seen = target == &failing ? seen_failing : seen_clean;
    target->add_teardown_callback([&seen](std::exception_ptr e) { seen.push_back(e); });
    target->add_teardown_callback([&seen](std::exception_ptr e) { seen.push_back(e); },
                                  flow::pass_exception);
    target->add_teardown_callback([&seen](std::exception_ptr e) -> asio::awaitable<void> {
      co_await delay(1ms);
      seen.push_back(e);
    });
    target->add_teardown_callback(
        [&seen](std::exception_ptr e) -> asio::awaitable<void> {
          co_await delay(1ms);
          seen.push_back(e);
        },
        flow::pass_exception);
  }
  bool close_threw = false;
  auto body = [&]() -> asio::awaitable<void> {
    try {
      auto op = failing.close(closing);
      co_await std::move(op);
      auto op2 = clean.close();
      co_await std::move(op2);
    } catch (...) {
      close_threw = true;  // the closing exception is for the callbacks, not rethrown
    }
  };
  run(io, body);
  BOOST_TEST(!close_threw);
  BOOST_REQUIRE(seen_failing.size() == 4u);
  for (const auto& e : seen_failing) {
    BOOST_TEST((e == closing));
  }
  BOOST_TEST(message_of(seen_failing.front()) == "the scope failed");
  BOOST_REQUIRE(seen_clean.size() == 4u);
  for (const auto& e : seen_clean) {
    BOOST_TEST(!e);
  }
}

// =============================================================================================
// R7 — closing: late callbacks, lookups, double close, use after close
// =============================================================================================

FERRY_TEST_CASE(r7_callbacks_added_during_teardown_run_after_the_current_batch_newest_first) {
  asio::io_context io;
  context ctx{io};
  std::vector<std::string> events;
  auto e_cb = [&] { events.push_back("E"); };
  auto c_cb = [&]() -> asio::awaitable<void> {
    co_await delay(1ms);
    events.push_back("C");
    ctx.add_teardown_callback(e_cb);  // third batch
  };
  ctx.add_teardown_callback([&] { events.push_back("A"); });
  ctx.add_teardown_callback([&] {
    events.push_back("B");
    ctx.add_teardown_callback(c_cb);  // second batch, after A
    ctx.add_teardown_callback([&] { events.push_back("D"); });
  });
  auto body = [&]() -> asio::awaitable<void> {
    auto op = ctx.close();
    co_await std::move(op);
  };
  run(io, body);
  const std::vector<std::string> expected{"B", "A", "D", "C", "E"};
  BOOST_TEST(events == expected, boost::test_tools::per_element());
  BOOST_TEST(ctx.closed());
}

FERRY_TEST_CASE(r7_lookups_keep_working_inside_teardown_callbacks_including_factories) {
  asio::io_context io;
  context root{io};
  context child = root.make_child();
  root.add_resource(widget{1}, "plain");
  int calls = 0;
  root.add_resource_factory<gadget>(
      [&](context&) {
        ++calls;
        return std::make_shared<gadget>("made during teardown");
      },
      "made");
  bool closing_inside = false, closed_inside = true;
  int plain_value = 0, requested_value = 0, child_value = 0;
  std::string made_label;
  std::shared_ptr<gadget> made_first, made_second;
  std::error_code sync_error, async_error;
  // Registered first: runs second, after the plain one generated the factory value.
  root.add_teardown_callback([&]() -> asio::awaitable<void> {
    try {
      co_await delay(1ms);
      made_second = root.get<gadget>("made");
      auto op = root.request<widget>("plain");
      std::shared_ptr<widget> w = co_await std::move(op);
      requested_value = w->value;
    } catch (const std::system_error& e) {
      async_error = e.code();
    }
  });
  root.add_teardown_callback([&] {
    try {
      closing_inside = root.closing();
      closed_inside = root.closed();
      plain_value = root.require<widget>("plain")->value;
      made_first = root.get<gadget>("made");  // the factory runs during teardown
      if (made_first) made_label = made_first->label;
      child_value = child.require<widget>("plain")->value;  // children still see it
    } catch (const std::system_error& e) {
      sync_error = e.code();
    }
  });
  auto body = [&]() -> asio::awaitable<void> {
    auto op = root.close();
    co_await std::move(op);
  };
  run(io, body);
  BOOST_TEST(sync_error == std::error_code{});
  BOOST_TEST(async_error == std::error_code{});
  BOOST_TEST(closing_inside);
  BOOST_TEST(!closed_inside);
  BOOST_TEST(plain_value == 1);
  BOOST_TEST(child_value == 1);
  BOOST_TEST(made_label == "made during teardown");
  BOOST_TEST(calls == 1);
  BOOST_TEST(made_first == made_second);  // generated once, reused
  BOOST_TEST(requested_value == 1);
}

FERRY_TEST_CASE(r7_closing_twice_is_refused_with_context_closed) {
  asio::io_context io;
  context ctx{io};
  std::vector<std::string> events;
  std::error_code while_closing, after_closed;
  bool second_attempt_done = false;
  auto second_closer = [&]() -> asio::awaitable<void> {
    try {
      auto op = ctx.close();
      co_await std::move(op);
      events.push_back("second close returned");
    } catch (const ferry::error& e) {
      while_closing = e.code();
    }
    second_attempt_done = true;
  };
  outcome second;
  ctx.add_teardown_callback([&]() -> asio::awaitable<void> {
    events.push_back("callback started");
    start(io, second_closer, second);  // another coroutine closes while this one runs
    for (int i = 0; i < 10000 && !second_attempt_done; ++i)
      co_await delay(1ms);
    events.push_back("callback done");
  });
  auto body = [&]() -> asio::awaitable<void> {
    auto op = ctx.close();
    co_await std::move(op);
    events.push_back("first close returned");
    try {
      auto op2 = ctx.close();
      co_await std::move(op2);
      events.push_back("third close returned");
    } catch (const ferry::error& e) {
      after_closed = e.code();
    }
  };
  run(io, body);
  check(second);
  const std::vector<std::string> expected{"callback started", "callback done",
                                          "first close returned"};
  BOOST_TEST(events == expected, boost::test_tools::per_element());
  BOOST_TEST(while_closing == code(flow::errc::context_closed));
  BOOST_TEST(after_closed == code(flow::errc::context_closed));
}

FERRY_TEST_CASE(r7_closing_from_inside_a_teardown_callback_is_refused_with_context_closed) {
  asio::io_context io;
  context ctx{io};
  context other{io};
  std::error_code inside;
  bool inner_returned = false;
  ctx.add_teardown_callback([&]() -> asio::awaitable<void> {
    try {
      auto op = ctx.close();
      co_await std::move(op);
      inner_returned = true;
    } catch (const ferry::error& e) {
      inside = e.code();
    }
  });
  // Left uncaught, the refusal is one of the teardown errors.
  other.add_teardown_callback([&]() -> asio::awaitable<void> {
    auto op = other.close();
    co_await std::move(op);
  });
  bool outer_threw = false;
  std::vector<std::exception_ptr> other_errors;
  auto body = [&]() -> asio::awaitable<void> {
    try {
      auto op = ctx.close();
      co_await std::move(op);
    } catch (...) {
      outer_threw = true;
    }
    try {
      auto op2 = other.close();
      co_await std::move(op2);
    } catch (const flow::teardown_error& e) {
      other_errors = e.exceptions();
    }
  };
  run(io, body);
  BOOST_TEST(!inner_returned);
  BOOST_TEST(inside == code(flow::errc::context_closed));
  BOOST_TEST(!outer_threw);
  BOOST_TEST(ctx.closed());
  BOOST_REQUIRE(other_errors.size() == 1u);
  std::error_code other_code;
  try {
    std::rethrow_exception(other_errors[0]);
  } catch (const std::system_error& e) {
    other_code = e.code();
  } catch (...) {
  }
  BOOST_TEST(other_code == code(flow::errc::context_closed));
  BOOST_TEST(other.closed());
}

FERRY_TEST_CASE(r7_using_a_closed_context_is_refused_with_context_closed) {
  asio::io_context io;
  context ctx{io};
  ctx.add_resource(widget{1});
  auto close_it = [&]() -> asio::awaitable<void> {
    auto op = ctx.close();
    co_await std::move(op);
  };
  run(io, close_it);
  BOOST_TEST(ctx.closed());
  const std::error_code closed = code(flow::errc::context_closed);
  BOOST_TEST(error_of([&] { ctx.add_resource(widget{2}, "late"); }) == closed);
  BOOST_TEST(error_of([&] { ctx.add_resource(std::make_shared<widget>(3), "late"); }) == closed);
  BOOST_TEST(error_of([&] {
               ctx.add_resource_factory<widget>(
                   [](context&) { return std::make_shared<widget>(4); }, "late");
             }) == closed);
  BOOST_TEST(error_of([&] { ctx.add_teardown_callback([] {}); }) == closed);
  auto coroutine_callback = []() -> asio::awaitable<void> { co_return; };
  BOOST_TEST(error_of([&] { ctx.add_teardown_callback(coroutine_callback); }) == closed);
  BOOST_TEST(error_of([&] { (void)ctx.get<widget>(); }) == closed);
  BOOST_TEST(error_of([&] { (void)ctx.require<widget>(); }) == closed);
  BOOST_TEST(error_of([&] { (void)ctx.make_child(); }) == closed);
  bool task_ran = false;
  auto task = [&]() -> asio::awaitable<void> {
    task_ran = true;
    co_return;
  };
  BOOST_TEST(error_of([&] { ctx.spawn(task()); }) == closed);
  std::error_code request_code;
  auto request_it = [&]() -> asio::awaitable<void> {
    try {
      auto op = ctx.request<widget>();
      auto w = co_await std::move(op);
      (void)w;
    } catch (const std::system_error& e) {
      request_code = e.code();
    }
  };
  run(io, request_it);
  BOOST_TEST(request_code == closed);
  BOOST_TEST(!task_ran);
}

// =============================================================================================
// R8 — scoped()
// =============================================================================================

FERRY_TEST_CASE(r8_scoped_returns_the_block_result_and_closes_the_child_on_exit) {
  asio::io_context io;
  context root{io};
  std::vector<std::string> events;
  std::optional<context> seen_child;
  auto block = [&](context& child) -> asio::awaitable<int> {
    seen_child = child;
    child.add_teardown_callback([&](std::exception_ptr e) {
      events.push_back(e ? "child teardown with an exception" : "child teardown, clean");
    });
    co_await delay(1ms);
    events.push_back("block done");
    co_return 42;
  };
  auto void_block = [&](context& child) -> asio::awaitable<void> {
    child.add_teardown_callback([&] { events.push_back("void block child teardown"); });
    co_await delay(1ms);
  };
  int result = 0;
  bool child_closed = false, child_had_parent = false, root_open = false;
  auto body = [&]() -> asio::awaitable<void> {
    auto op = flow::scoped(root, block);
    result = co_await std::move(op);
    events.push_back("scoped returned");
    child_closed = seen_child && seen_child->closed();
    child_had_parent = seen_child && seen_child->parent().has_value();
    root_open = !root.closing();
    auto op2 = flow::scoped(root, void_block);
    co_await std::move(op2);
    auto op3 = root.close();
    co_await std::move(op3);
  };
  run(io, body);
  BOOST_TEST(result == 42);
  const std::vector<std::string> expected{"block done", "child teardown, clean", "scoped returned",
                                          "void block child teardown"};
  BOOST_TEST(events == expected, boost::test_tools::per_element());
  BOOST_TEST(child_closed);
  BOOST_TEST(child_had_parent);
  BOOST_TEST(root_open);
}

FERRY_TEST_CASE(r8_scoped_passes_the_block_exception_to_the_child_callbacks_and_rethrows_it) {
  asio::io_context io;
  context root{io};
  std::vector<std::string> events;
  std::optional<context> seen_child;
  std::exception_ptr passed_plain, passed_coroutine;
  bool fail = true;
  auto block = [&](context& child) -> asio::awaitable<int> {
    seen_child = child;
    child.add_teardown_callback([&](std::exception_ptr e) { passed_plain = e; },
                                flow::pass_exception);
    child.add_teardown_callback(
        [&](std::exception_ptr e) -> asio::awaitable<void> {
          co_await delay(1ms);
          passed_coroutine = e;
        },
        flow::pass_exception);
    co_await delay(1ms);
    if (fail) throw block_error("block failed");
    co_return 0;
  };
  // When a callback fails too, the block's exception still wins.
  auto block_and_teardown_fail = [&](context& child) -> asio::awaitable<void> {
    child.add_teardown_callback([] { throw std::runtime_error("teardown failed too"); });
    co_await delay(1ms);
    if (fail) throw block_error("block failed again");
  };
  std::exception_ptr caught;
  std::string caught_what, second_what;
  bool second_is_block_error = false;
  auto body = [&]() -> asio::awaitable<void> {
    try {
      auto op = flow::scoped(root, block);
      int r = co_await std::move(op);
      (void)r;
      events.push_back("scoped returned");
    } catch (const block_error& e) {
      caught = std::current_exception();
      caught_what = e.what();
    }
    try {
      auto op2 = flow::scoped(root, block_and_teardown_fail);
      co_await std::move(op2);
    } catch (const block_error& e) {
      second_is_block_error = true;
      second_what = e.what();
    } catch (const std::exception& e) {
      second_what = e.what();
    }
    auto op3 = root.close();
    co_await std::move(op3);
  };
  run(io, body);
  BOOST_TEST(events.empty());
  BOOST_REQUIRE(caught);
  BOOST_TEST(caught_what == "block failed");
  BOOST_TEST((passed_plain == caught));  // the same exception object, not a copy
  BOOST_TEST((passed_coroutine == caught));
  BOOST_TEST(seen_child.has_value());
  if (seen_child) BOOST_TEST(seen_child->closed());
  BOOST_TEST(second_is_block_error);
  BOOST_TEST(second_what == "block failed again");
}

FERRY_TEST_CASE(r8_the_scoped_child_sees_the_parents_resources_but_not_the_reverse) {
  asio::io_context io;
  context root{io};
  root.add_resource(widget{1}, "shared_one");
  int seen_in_child = 0, shadowed_in_child = 0;
  bool parent_saw_child_resource = true;
  auto block = [&](context& child) -> asio::awaitable<void> {
    seen_in_child = child.require<widget>("shared_one")->value;
    child.add_resource(gadget{"child only"});
    child.add_resource(widget{2}, "shared_one");  // shadows the parent's
    shadowed_in_child = child.require<widget>("shared_one")->value;
    parent_saw_child_resource = root.get<gadget>() != nullptr;
    co_await delay(1ms);
  };
  auto body = [&]() -> asio::awaitable<void> {
    auto op = flow::scoped(root, block);
    co_await std::move(op);
  };
  run(io, body);
  BOOST_TEST(seen_in_child == 1);
  BOOST_TEST(shadowed_in_child == 2);
  BOOST_TEST(!parent_saw_child_resource);
  BOOST_TEST(!root.get<gadget>());
  BOOST_TEST(root.get<widget>("shared_one")->value == 1);
}

FERRY_TEST_CASE(r8_scoped_throws_the_teardown_error_when_only_the_teardown_fails) {
  asio::io_context io;
  context root{io};
  auto block = [&](context& child) -> asio::awaitable<int> {
    child.add_teardown_callback([] { throw std::runtime_error("child teardown failed"); });
    co_await delay(1ms);
    co_return 1;
  };
  std::vector<std::exception_ptr> errors;
  auto body = [&]() -> asio::awaitable<void> {
    try {
      auto op = flow::scoped(root, block);
      int r = co_await std::move(op);
      (void)r;
    } catch (const flow::teardown_error& e) {
      errors = e.exceptions();
    }
  };
  run(io, body);
  BOOST_REQUIRE(errors.size() == 1u);
  BOOST_TEST(message_of(errors[0]) == "child teardown failed");
}

// =============================================================================================
// R9 — context_teardown
// =============================================================================================

FERRY_TEST_CASE(r9_context_teardown_runs_setup_before_returning_and_commits_on_a_clean_close) {
  asio::io_context io;
  context ctx{io};
  std::vector<std::string> log;
  std::exception_ptr received = std::make_exception_ptr(std::runtime_error("not yet received"));
  auto component = [&](context& c, flow::closing_signal closing) -> asio::awaitable<void> {
    auto db = std::make_shared<fake_database>(log);
    c.add_resource(db);
    log.push_back("setup");
    auto wait = closing.wait();
    std::exception_ptr e = co_await std::move(wait);
    received = e;
    if (e) {
      db->rollback();
    } else {
      db->commit();
    }
  };
  std::vector<std::string> after_setup, before_close;
  bool db_available = false;
  auto body = [&]() -> asio::awaitable<void> {
    auto setup = flow::context_teardown(ctx, component);
    co_await std::move(setup);
    after_setup = log;
    db_available = ctx.get<fake_database>() != nullptr;
    co_await delay(5ms);  // nothing else happens until the context closes
    before_close = log;
    auto op = ctx.close();
    co_await std::move(op);
  };
  run(io, body);
  const std::vector<std::string> setup_only{"setup"};
  BOOST_TEST(after_setup == setup_only, boost::test_tools::per_element());
  BOOST_TEST(before_close == setup_only, boost::test_tools::per_element());
  BOOST_TEST(db_available);
  const std::vector<std::string> expected{"setup", "commit"};
  BOOST_TEST(log == expected, boost::test_tools::per_element());
  BOOST_TEST(!received);
}

FERRY_TEST_CASE(r9_context_teardown_rolls_back_with_the_closing_exception) {
  asio::io_context io;
  context ctx{io};
  context root{io};
  std::vector<std::string> log;
  std::vector<std::exception_ptr> received;
  auto component = [&](context& c, flow::closing_signal closing) -> asio::awaitable<void> {
    auto db = std::make_shared<fake_database>(log);
    c.add_resource(db);
    log.push_back("setup");
    auto wait = closing.wait();
    std::exception_ptr e = co_await std::move(wait);
    received.push_back(e);
    if (e) {
      db->rollback();
    } else {
      db->commit();
    }
  };
  const std::exception_ptr failure = std::make_exception_ptr(std::runtime_error("request failed"));
  bool fail = true;
  // The same pattern inside scoped(): the block's exception rolls the transaction back.
  auto block = [&](context& child) -> asio::awaitable<void> {
    auto setup = flow::context_teardown(child, component);
    co_await std::move(setup);
    if (fail) throw block_error("handler failed");
  };
  std::string block_what;
  auto body = [&]() -> asio::awaitable<void> {
    auto setup = flow::context_teardown(ctx, component);
    co_await std::move(setup);
    auto op = ctx.close(failure);
    co_await std::move(op);
    try {
      auto op2 = flow::scoped(root, block);
      co_await std::move(op2);
    } catch (const block_error& e) {
      block_what = e.what();
    }
    auto op3 = root.close();
    co_await std::move(op3);
  };
  run(io, body);
  const std::vector<std::string> expected{"setup", "rollback", "setup", "rollback"};
  BOOST_TEST(log == expected, boost::test_tools::per_element());
  BOOST_REQUIRE(received.size() == 2u);
  BOOST_TEST((received[0] == failure));
  BOOST_TEST(message_of(received[1]) == "handler failed");
  BOOST_TEST(block_what == "handler failed");
}

FERRY_TEST_CASE(r9_a_setup_failure_is_rethrown_from_context_teardown_and_nothing_is_registered) {
  asio::io_context io;
  context ctx{io};
  std::vector<std::string> log;
  bool fail = true;
  auto component = [&](context& c, flow::closing_signal closing) -> asio::awaitable<void> {
    log.push_back("setup");
    co_await delay(1ms);
    if (fail) throw std::runtime_error("setup failed");
    c.add_resource(widget{1});
    auto wait = closing.wait();
    std::exception_ptr e = co_await std::move(wait);
    (void)e;
    log.push_back("after the wait");
  };
  std::string what;
  bool closed_cleanly = false;
  auto body = [&]() -> asio::awaitable<void> {
    try {
      auto setup = flow::context_teardown(ctx, component);
      co_await std::move(setup);
      log.push_back("context_teardown returned");
    } catch (const std::runtime_error& e) {
      what = e.what();
    }
    // Had a callback been registered it would wait for a function that already ended.
    auto op = ctx.close();
    co_await std::move(op);
    closed_cleanly = true;
  };
  run(io, body);
  BOOST_TEST(what == "setup failed");
  const std::vector<std::string> expected{"setup"};
  BOOST_TEST(log == expected, boost::test_tools::per_element());
  BOOST_TEST(closed_cleanly);
  BOOST_TEST(ctx.closed());
}

FERRY_TEST_CASE(r9_an_exception_after_the_wait_joins_the_teardown_error_in_sequence) {
  asio::io_context io;
  context ctx{io};
  std::vector<std::string> log;
  bool fail = true;
  auto component = [&](context&, flow::closing_signal closing) -> asio::awaitable<void> {
    log.push_back("setup");
    auto wait = closing.wait();
    std::exception_ptr e = co_await std::move(wait);
    (void)e;
    log.push_back("cleanup start");
    co_await delay(10ms);
    log.push_back("cleanup end");
    if (fail) throw std::runtime_error("cleanup failed");
  };
  ctx.add_teardown_callback([&] {
    log.push_back("registered before");
    if (fail) throw std::runtime_error("plain callback failed");
  });
  std::vector<std::exception_ptr> errors;
  auto body = [&]() -> asio::awaitable<void> {
    auto setup = flow::context_teardown(ctx, component);
    co_await std::move(setup);
    ctx.add_teardown_callback([&] { log.push_back("registered after"); });
    try {
      auto op = ctx.close();
      co_await std::move(op);
    } catch (const flow::teardown_error& e) {
      errors = e.exceptions();
    }
  };
  run(io, body);
  const std::vector<std::string> expected{"setup", "registered after", "cleanup start",
                                          "cleanup end", "registered before"};
  BOOST_TEST(log == expected, boost::test_tools::per_element());
  BOOST_REQUIRE(errors.size() == 2u);
  BOOST_TEST(message_of(errors[0]) == "cleanup failed");
  BOOST_TEST(message_of(errors[1]) == "plain callback failed");
}

FERRY_TEST_CASE(r9_context_teardown_on_a_closed_context_is_refused_and_leaves_nothing_suspended) {
  asio::io_context io;
  context ctx{io};
  auto close_it = [&]() -> asio::awaitable<void> {
    auto op = ctx.close();
    co_await std::move(op);
  };
  run(io, close_it);
  std::vector<std::string> log;
  auto component = [&](context&, flow::closing_signal closing) -> asio::awaitable<void> {
    log.push_back("setup");
    auto wait = closing.wait();
    std::exception_ptr e = co_await std::move(wait);
    (void)e;
    log.push_back("after the wait");
  };
  std::error_code ec;
  auto body = [&]() -> asio::awaitable<void> {
    try {
      auto setup = flow::context_teardown(ctx, component);
      co_await std::move(setup);
    } catch (const std::system_error& e) {
      ec = e.code();
    }
  };
  outcome out;
  start(io, body, out);
  // Bounded instead of io.run(): a component left suspended on closing.wait() forever would
  // keep the loop busy for good.
  io.run_for(std::chrono::seconds(5));
  check(out);
  BOOST_TEST(ec == code(flow::errc::context_closed));
  BOOST_CHECK_MESSAGE(io.stopped(),
                      "the loop still has work: the component is suspended on closing.wait() "
                      "of a context that will never close again");
}

// =============================================================================================
// R10 — spawned tasks
// =============================================================================================

FERRY_TEST_CASE(r10_spawned_tasks_are_cancelled_and_awaited_before_the_teardown_callbacks) {
  asio::io_context io;
  context ctx{io};
  std::vector<std::string> events;
  bool waiting = false, quick_done = false;
  auto long_task = [&]() -> asio::awaitable<void> {
    record_on_exit cleanup{events, "long task cleanup"};
    asio::steady_timer timer(io, std::chrono::hours(1));
    waiting = true;
    try {
      co_await timer.async_wait(asio::use_awaitable);
      events.push_back("long task timer fired");
    } catch (const std::system_error& e) {
      if (e.code() == asio::error::operation_aborted) {
        events.push_back("long task cancelled");
      } else {
        events.push_back("long task failed: " + e.code().message());
      }
      throw;
    }
  };
  auto quick_task = [&]() -> asio::awaitable<void> {
    co_await asio::post(io, asio::use_awaitable);
    events.push_back("quick task done");
    quick_done = true;
  };
  ctx.add_teardown_callback([&] { events.push_back("first teardown callback"); });
  steady::duration elapsed{};
  bool close_threw = false;
  auto body = [&]() -> asio::awaitable<void> {
    ctx.spawn(long_task());
    ctx.spawn(quick_task());
    for (int i = 0; i < 100000 && !(waiting && quick_done); ++i) {
      co_await asio::post(io, asio::use_awaitable);
    }
    events.push_back("closing");
    const auto t0 = steady::now();
    try {
      auto op = ctx.close();
      co_await std::move(op);
    } catch (...) {
      close_threw = true;  // a cancelled task is not an error
    }
    elapsed = steady::now() - t0;
    events.push_back("closed");
  };
  run(io, body);
  const std::vector<std::string> expected{"quick task done",         "closing",
                                          "long task cancelled",     "long task cleanup",
                                          "first teardown callback", "closed"};
  BOOST_TEST(events == expected, boost::test_tools::per_element());
  BOOST_TEST(!close_threw);
  BOOST_TEST(ms(elapsed) < 30000);
}

FERRY_TEST_CASE(r10_a_task_spawned_just_before_close_is_cancelled_before_the_teardown_callbacks) {
  asio::io_context io;
  context ctx{io};
  std::vector<std::string> events;
  auto long_task = [&]() -> asio::awaitable<void> {
    record_on_exit cleanup{events, "task cleanup"};
    asio::steady_timer timer(io, std::chrono::hours(1));
    co_await timer.async_wait(asio::use_awaitable);
    events.push_back("task timer fired");
  };
  ctx.add_teardown_callback([&] { events.push_back("teardown callback"); });
  bool spawn_during_teardown_refused = false;
  ctx.add_teardown_callback([&] {
    spawn_during_teardown_refused =
        error_of([&] { ctx.spawn(long_task()); }) == code(flow::errc::context_closed);
  });
  auto body = [&]() -> asio::awaitable<void> {
    ctx.spawn(long_task());  // has not started yet when close() cancels it
    auto op = ctx.close();
    co_await std::move(op);
  };
  const auto t0 = steady::now();
  run(io, body);
  BOOST_TEST(ms(steady::now() - t0) < 30000);
  // The task's frame is gone (cleanup recorded) before any callback ran; if it never got
  // to start, its body (and cleanup) never ran at all, which is fine as well.
  BOOST_TEST(std::count(events.begin(), events.end(), "task timer fired") == 0);
  BOOST_REQUIRE(!events.empty());
  BOOST_TEST(events.back() == "teardown callback");
  if (events.size() == 2u) BOOST_TEST(events.front() == "task cleanup");
  BOOST_TEST(events.size() <= 2u);
  BOOST_TEST(spawn_during_teardown_refused);
}

FERRY_TEST_CASE(r10_a_task_that_fails_with_its_own_exception_shows_up_in_the_teardown_error) {
  asio::io_context io;
  context ctx{io};
  std::vector<std::string> events;
  bool failed_task_done = false, stubborn_waiting = false;
  bool fail = true;
  auto failing_task = [&]() -> asio::awaitable<void> {
    co_await asio::post(io, asio::use_awaitable);
    failed_task_done = true;
    if (fail) throw std::runtime_error("task exploded");
  };
  // Turns its cancellation into a failure of its own.
  auto stubborn_task = [&]() -> asio::awaitable<void> {
    asio::steady_timer timer(io, std::chrono::hours(1));
    stubborn_waiting = true;
    std::error_code ec;
    try {
      co_await timer.async_wait(asio::use_awaitable);
    } catch (const std::system_error& e) {
      ec = e.code();
    }
    if (ec) throw std::logic_error("task cleanup failed");
  };
  auto finishing_task = [&]() -> asio::awaitable<void> {
    co_await asio::post(io, asio::use_awaitable);
    events.push_back("finishing task done");
  };
  ctx.add_teardown_callback([&] { events.push_back("teardown ran"); });
  std::vector<std::exception_ptr> errors;
  bool caught = false;
  auto body = [&]() -> asio::awaitable<void> {
    ctx.spawn(failing_task());
    ctx.spawn(stubborn_task());
    ctx.spawn(finishing_task());
    for (int i = 0; i < 100000 && !(failed_task_done && stubborn_waiting); ++i) {
      co_await asio::post(io, asio::use_awaitable);
    }
    try {
      auto op = ctx.close();
      co_await std::move(op);
    } catch (const flow::teardown_error& e) {
      caught = true;
      errors = e.exceptions();
    }
  };
  run(io, body);
  BOOST_TEST(caught);
  BOOST_REQUIRE(errors.size() == 2u);
  BOOST_TEST(message_of(errors[0]) == "task exploded");
  BOOST_TEST(message_of(errors[1]) == "task cleanup failed");
  const std::vector<std::string> expected{"finishing task done", "teardown ran"};
  BOOST_TEST(events == expected, boost::test_tools::per_element());
}

// =============================================================================================
// R11 — threads
// =============================================================================================
//
// What the header promises (include/ferry/flow/context.hpp, "Threads (R11)"): the synchronous
// members — add_resource, add_resource_factory, add_teardown_callback, get, require and
// make_child — are thread-safe and may be called from any thread while the loop runs. A
// context belongs to one executor: its spawned tasks run there, and close(), request() and
// the teardown coroutines must be awaited on that executor (an io_context run by one thread
// or a strand), never concurrently from several threads. The tests below therefore call only
// the synchronous members from the worker threads, and await request()/close() on the loop
// (run by the main thread). A resource added from a thread wakes a request waiting on the
// loop. Worker threads only record what they see; the assertions run after join().

FERRY_TEST_CASE(r11_threads_add_and_look_up_concurrently_while_the_loop_runs) {
  constexpr int thread_count = 4;
  constexpr int per_thread = 100;
  asio::io_context io;
  context root{io};
  context child = root.make_child();
  std::atomic<int> factory_calls{0};
  root.add_resource_factory<gadget>(
      [&](context&) {
        factory_calls.fetch_add(1);
        return std::make_shared<gadget>("generated");
      },
      "generated");
  struct record {
    int own_found = 0;
    int wrong = 0;
    int errors = 0;
    int children = 0;
    std::string error_text;
    std::vector<const gadget*> generated;
  };
  std::vector<record> records(static_cast<std::size_t>(thread_count));
  std::atomic<int> callbacks_run{0};
  std::latch go{thread_count};
  std::vector<std::thread> threads;
  auto name_of = [](int t, int i) { return "t" + std::to_string(t) + "_" + std::to_string(i); };
  for (int t = 0; t < thread_count; ++t) {
    threads.emplace_back([&, t] {
      record& rec = records[static_cast<std::size_t>(t)];
      go.arrive_and_wait();
      try {
        for (int i = 0; i < per_thread; ++i) {
          const std::string name = name_of(t, i);
          root.add_resource(widget{t * 1000 + i}, name);
          root.add_teardown_callback([&callbacks_run] { callbacks_run.fetch_add(1); });
          std::shared_ptr<widget> mine = child.get<widget>(name);  // through the parent
          if (mine && mine->value == t * 1000 + i) {
            ++rec.own_found;
          } else {
            ++rec.wrong;
          }
          // Another thread's resource: absent so far, or exactly what it added.
          const int other = (t + 1) % thread_count;
          std::shared_ptr<widget> theirs = child.get<widget>(name_of(other, i));
          if (theirs && theirs->value != other * 1000 + i) ++rec.wrong;
          rec.generated.push_back(child.get<gadget>("generated").get());
          context grandchild = child.make_child();
          if (grandchild.require<widget>(name)->value == t * 1000 + i) ++rec.children;
        }
        // Last: the loop waits for these, then closes `root`.
        root.add_resource(widget{t}, "t" + std::to_string(t) + "_last");
      } catch (const std::exception& e) {
        ++rec.errors;
        rec.error_text = e.what();
      }
    });
  }
  std::vector<int> received(static_cast<std::size_t>(thread_count), -1);
  auto body = [&]() -> asio::awaitable<void> {
    for (int t = 0; t < thread_count; ++t) {
      auto op = child.request<widget>("t" + std::to_string(t) + "_last", std::chrono::seconds(60));
      std::shared_ptr<widget> w = co_await std::move(op);
      received[static_cast<std::size_t>(t)] = w->value;
    }
    auto op = root.close();
    co_await std::move(op);
  };
  outcome out;
  start(io, body, out);
  io.run();
  for (auto& th : threads)
    th.join();
  check(out);
  const gadget* generated = child.get<gadget>("generated").get();
  BOOST_TEST(generated != nullptr);
  for (int t = 0; t < thread_count; ++t) {
    const record& rec = records[static_cast<std::size_t>(t)];
    BOOST_TEST_CONTEXT("thread " << t) {
      BOOST_CHECK_MESSAGE(rec.errors == 0, "error: " << rec.error_text);
      BOOST_TEST(rec.wrong == 0);
      BOOST_TEST(rec.own_found == per_thread);
      BOOST_TEST(rec.children == per_thread);
      BOOST_TEST(received[static_cast<std::size_t>(t)] == t);
      // One factory value per requesting context, even when generated concurrently.
      BOOST_TEST(std::count(rec.generated.begin(), rec.generated.end(), generated) ==
                 static_cast<std::ptrdiff_t>(rec.generated.size()));
    }
  }
  BOOST_TEST(callbacks_run.load() == thread_count * per_thread);
  BOOST_TEST(factory_calls.load() >= 1);  // may run more than once when raced; one value kept
}

FERRY_TEST_CASE(r11_concurrent_adds_of_one_key_have_exactly_one_winner) {
  constexpr int thread_count = 4;
  asio::io_context io;
  context root{io};
  context child = root.make_child();
  std::vector<int> won(static_cast<std::size_t>(thread_count), 0);
  std::vector<int> conflicts(static_cast<std::size_t>(thread_count), 0);
  std::vector<int> other_errors(static_cast<std::size_t>(thread_count), 0);
  std::latch go{thread_count};
  std::vector<std::thread> threads;
  for (int t = 0; t < thread_count; ++t) {
    threads.emplace_back([&, t] {
      const auto i = static_cast<std::size_t>(t);
      go.arrive_and_wait();
      try {
        root.add_resource(widget{t}, "contested");
        won[i] = 1;
      } catch (const flow::resource_conflict&) {
        conflicts[i] = 1;
      } catch (...) {
        other_errors[i] = 1;
      }
    });
  }
  int received = -1;
  auto body = [&]() -> asio::awaitable<void> {
    auto op = child.request<widget>("contested", std::chrono::seconds(60));
    std::shared_ptr<widget> w = co_await std::move(op);
    received = w->value;
  };
  outcome out;
  start(io, body, out);
  io.run();
  for (auto& th : threads)
    th.join();
  check(out);
  int winners = 0, losers = 0, others = 0, winner = -1;
  for (int t = 0; t < thread_count; ++t) {
    const auto i = static_cast<std::size_t>(t);
    winners += won[i];
    losers += conflicts[i];
    others += other_errors[i];
    if (won[i] != 0) winner = t;
  }
  BOOST_TEST(winners == 1);
  BOOST_TEST(losers == thread_count - 1);
  BOOST_TEST(others == 0);
  BOOST_TEST(root.get<widget>("contested")->value == winner);
  BOOST_TEST(received == winner);
}
