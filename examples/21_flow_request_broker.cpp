// The request broker of the async-data-flow seed:
//
//     seq(receive_request, dispatch_request,
//         par(seq(ask_system_a, transform_data_a), seq(ask_system_b, transform_data_b)),
//         compose_response)
//
// receive_request reads a request line ("r1 widget price,stock"); dispatch_request decides
// which third systems must answer it (A: pricing, B: stock) and returns a flow::bag holding
// only the keys of those systems' first steps — a step declared with gives(...) whose
// function returns a bag may give any subset of its keys. A par starts only the branches
// whose first step finds its keys, so for a price-only request the stock branch never
// starts, and the other way round. For each system it leaves out, dispatch_request gives a
// "not asked" answer instead, so compose_response (which needs both answers) runs whatever
// was asked. The ask_* steps are coroutines (a timer stands in for the remote call) and run
// on the loop; dispatch, the transforms and compose are plain functions on the loop's
// default pool. Each request prints which steps ran, when (ms since the request arrived) and
// on which thread kind; for a request asking both systems, A and B are asked concurrently.
// Last, a request that wants nothing: a lenient bundle passes over the empty par and answers
// "nothing to ask"; the same flow with bundle_options{.strict = true} fails it with
// errc::no_branch_ran.
#include <ferry/ferry.hpp>
#include <ferry/flow/bundle.hpp>

#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using namespace std::chrono_literals;
namespace fl = ferry::flow;

namespace {

struct request {
  std::string id{};
  std::string item{};
  bool wants_price = false;  // system A
  bool wants_stock = false;  // system B
  bool operator==(const request&) const = default;
};

// A system's part of the response. `asked == false`: dispatch_request left the system out.
struct answer {
  bool asked = false;
  std::string text{};
  bool operator==(const answer&) const = default;
};

const fl::key<std::string> inbox{"inbox"};          // the raw request line (the call's input)
const fl::key<request> req{"request"};
const fl::key<std::string> query_a{"query_a"}, query_b{"query_b"};  // what to ask A / B
const fl::key<std::string> reply_a{"reply_a"}, reply_b{"reply_b"};  // their raw replies
const fl::key<answer> answer_a{"answer_a"}, answer_b{"answer_b"};
const fl::key<std::string> response{"response"};

// Prints each step's events with the time since the request arrived and the kind of thread
// they happened on; remembers which steps ran (in order) and when each event happened.
class timeline {
public:
  struct event {
    std::string step{};
    std::string what{};
    std::size_t index = 0;
  };

  void restart() {
    std::lock_guard lock(mu_);
    start_ = std::chrono::steady_clock::now();
    events_.clear();
  }
  void note(const std::string& step, const std::string& what) {
    std::lock_guard lock(mu_);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
    const bool on_loop = std::this_thread::get_id() == loop_;
    std::printf("    %5.1f ms  [%s]  %-17s %s\n", ms, on_loop ? "loop" : "pool", step.c_str(), what.c_str());
    events_.push_back({step, what, events_.size()});
  }
  // The steps that ran, in the order they first noted something.
  std::vector<std::string> steps() const {
    std::lock_guard lock(mu_);
    std::vector<std::string> out;
    for (const auto& e : events_) {
      if (std::find(out.begin(), out.end(), e.step) == out.end()) out.push_back(e.step);
    }
    return out;
  }
  // The position of the first event of `step` whose text starts with `what`.
  std::size_t index_of(const std::string& step, const std::string& what) const {
    std::lock_guard lock(mu_);
    for (const auto& e : events_) {
      if (e.step == step && e.what.rfind(what, 0) == 0) return e.index;
    }
    return events_.size();
  }

private:
  const std::thread::id loop_ = std::this_thread::get_id();  // made on the loop's thread
  mutable std::mutex mu_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  std::vector<event> events_;
};

asio::awaitable<void> sleep_for(std::chrono::milliseconds d) {
  auto ex = co_await asio::this_coro::executor;
  asio::steady_timer t(ex, d);
  auto wait = t.async_wait(asio::use_awaitable);
  co_await std::move(wait);
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) {
    if (!s.empty()) s += ", ";
    s += x;
  }
  return s;
}

// The seed's functions, as steps. They log to `*log`, which outlives every call.
struct broker_steps {
  timeline* log = nullptr;

  // Reads the request off the connection (a timer) and parses "id item price,stock".
  fl::step receive_request() const {
    timeline* l = log;
    return fl::step("receive_request", fl::needs(inbox), fl::gives(req),
                    [l](const std::string& line) -> asio::awaitable<request> {
                      l->note("receive_request", "reading \"" + line + "\"");
                      auto op = sleep_for(2ms);
                      co_await std::move(op);
                      std::istringstream in(line);
                      request r;
                      std::string wants;
                      in >> r.id >> r.item >> wants;
                      r.wants_price = wants.find("price") != std::string::npos;
                      r.wants_stock = wants.find("stock") != std::string::npos;
                      l->note("receive_request", r.id + " asks about " + r.item + " (" + wants + ")");
                      co_return r;
                    });
  }

  // Prepares the arguments of only the branches that must run (the seed: "dispatch_request()
  // should prepare arguments for only this functions which want to be executed").
  fl::step dispatch_request() const {
    timeline* l = log;
    return fl::step("dispatch_request", fl::needs(req), fl::gives(query_a, query_b, answer_a, answer_b),
                    [l](const request& r) {
                      fl::bag out;
                      std::string to;
                      if (r.wants_price) {
                        out.set(query_a, "PRICE? " + r.item);
                        to = "system A";
                      } else {
                        out.set(answer_a, answer{});
                      }
                      if (r.wants_stock) {
                        out.set(query_b, "STOCK? " + r.item);
                        to += to.empty() ? "system B" : " and system B";
                      } else {
                        out.set(answer_b, answer{});
                      }
                      l->note("dispatch_request", "to " + (to.empty() ? std::string("no system") : to));
                      return out;
                    });
  }

  // System A, the price list: slow.
  fl::step ask_system_a() const {
    timeline* l = log;
    return fl::step("ask_system_a", fl::needs(query_a), fl::gives(reply_a),
                    [l](const std::string& q) -> asio::awaitable<std::string> {
                      l->note("ask_system_a", "sends \"" + q + "\"");
                      auto op = sleep_for(15ms);
                      co_await std::move(op);
                      std::string reply = "PRICE " + q.substr(7) + " 1999";
                      l->note("ask_system_a", "got \"" + reply + "\"");
                      co_return reply;
                    });
  }
  fl::step transform_data_a() const {
    timeline* l = log;
    return fl::step("transform_data_a", fl::needs(reply_a), fl::gives(answer_a), [l](const std::string& reply) {
      const int cents = std::stoi(reply.substr(reply.rfind(' ') + 1));
      answer a{true, "price " + std::to_string(cents / 100) + (cents % 100 < 10 ? ".0" : ".") +
                              std::to_string(cents % 100) + " EUR"};
      l->note("transform_data_a", "-> " + a.text);
      return a;
    });
  }

  // System B, the warehouse: faster, another reply format.
  fl::step ask_system_b() const {
    timeline* l = log;
    return fl::step("ask_system_b", fl::needs(query_b), fl::gives(reply_b),
                    [l](const std::string& q) -> asio::awaitable<std::string> {
                      l->note("ask_system_b", "sends \"" + q + "\"");
                      auto op = sleep_for(8ms);
                      co_await std::move(op);
                      std::string reply = "STOCK;" + q.substr(7) + ";42";
                      l->note("ask_system_b", "got \"" + reply + "\"");
                      co_return reply;
                    });
  }
  fl::step transform_data_b() const {
    timeline* l = log;
    return fl::step("transform_data_b", fl::needs(reply_b), fl::gives(answer_b), [l](const std::string& reply) {
      answer a{true, reply.substr(reply.rfind(';') + 1) + " in stock"};
      l->note("transform_data_b", "-> " + a.text);
      return a;
    });
  }

  fl::step compose_response() const {
    timeline* l = log;
    return fl::step("compose_response", fl::needs(req, answer_a, answer_b), fl::gives(response),
                    [l](const request& r, const answer& a, const answer& b) {
                      std::string parts;
                      for (const answer* x : {&a, &b}) {
                        if (!x->asked) continue;
                        if (!parts.empty()) parts += "; ";
                        parts += x->text;
                      }
                      std::string text = r.id + ": " + r.item + ": " + (parts.empty() ? "nothing to ask" : parts);
                      l->note("compose_response", "\"" + text + "\"");
                      return text;
                    });
  }
};

}  // namespace

int main() {
  ferry::entrypoint ep{{.pool_size = 2}};
  timeline log;
  const broker_steps s{&log};

  const fl::node shape = fl::seq(s.receive_request(), s.dispatch_request(),
                                 fl::par(fl::seq(s.ask_system_a(), s.transform_data_a()),
                                         fl::seq(s.ask_system_b(), s.transform_data_b())),
                                 s.compose_response());
  // Visibility `all`: compose_response needs `request`, given by receive_request three
  // elements earlier, and the "not asked" answers dispatch_request gives for the systems it
  // leaves out. With the default `initial`, after the par only the call's initial values
  // (`inbox`) and the par's outputs would be visible: compose_response would lack those keys
  // and be skipped.
  const fl::bundle broker{shape, {.visible = fl::visibility::all}};
  // The same flow, strict. Construction checks that every step can run from the declared
  // inputs (dispatch_request may give each key, so the branches can run); at run time a par
  // none of whose branches can start is an error instead of a pass-through.
  const fl::bundle strict_broker{shape, {.visible = fl::visibility::all, .strict = true, .inputs = {inbox}}};

  struct expectation {
    std::string line{};
    std::vector<std::string> steps{};
  };
  const std::vector<expectation> requests = {
      {"r1 widget price,stock",
       {"receive_request", "dispatch_request", "ask_system_a", "ask_system_b", "transform_data_b",
        "transform_data_a", "compose_response"}},
      {"r2 widget price", {"receive_request", "dispatch_request", "ask_system_a", "transform_data_a", "compose_response"}},
      {"r3 gadget stock", {"receive_request", "dispatch_request", "ask_system_b", "transform_data_b", "compose_response"}},
      {"r4 gizmo none", {"receive_request", "dispatch_request", "compose_response"}},
  };

  auto main_task = [&]() -> asio::awaitable<int> {
    int bad = 0;
    std::printf("broker %s\n", broker.root().describe().c_str());
    for (const auto& r : requests) {
      std::printf("request \"%s\":\n", r.line.c_str());
      log.restart();
      std::string answer_text;
      try {
        auto op = broker(fl::bag{inbox(r.line)});
        fl::bag out = co_await std::move(op);
        answer_text = out.at(response);
      } catch (const std::exception& e) {
        answer_text = std::string("unexpected failure: ") + e.what();
        ++bad;
      }
      const std::vector<std::string> ran = log.steps();
      std::printf("  ran: %s\n  response: %s\n", joined(ran).c_str(), answer_text.c_str());
      std::vector<std::string> want = r.steps, got = ran;
      std::sort(want.begin(), want.end());
      std::sort(got.begin(), got.end());
      if (got != want) {
        std::printf("  unexpected: the steps that ran should be %s\n", joined(r.steps).c_str());
        ++bad;
      }
      // Both systems asked: their branches overlap (A and B are both asked before either
      // replies; the order of events, not their times, so a busy machine cannot break it).
      if (r.line.rfind("r1 ", 0) == 0) {
        const std::size_t first_reply =
            std::min(log.index_of("ask_system_a", "got"), log.index_of("ask_system_b", "got"));
        if (log.index_of("ask_system_a", "sends") > first_reply || log.index_of("ask_system_b", "sends") > first_reply) {
          std::printf("  unexpected: systems A and B were not asked concurrently\n");
          ++bad;
        }
      }
    }

    std::printf("strict broker, request \"r2 widget price\":\n");
    log.restart();
    try {
      auto op = strict_broker(fl::bag{inbox("r2 widget price")});
      fl::bag out = co_await std::move(op);
      std::printf("  response: %s\n", out.at(response).c_str());
    } catch (const std::exception& e) {
      std::printf("  unexpected failure: %s\n", e.what());
      ++bad;
    }
    std::printf("strict broker, request \"r4 gizmo none\" (no system to ask):\n");
    log.restart();
    bool failed_as_expected = false;
    try {
      auto op = strict_broker(fl::bag{inbox("r4 gizmo none")});
      fl::bag out = co_await std::move(op);
      std::printf("  unexpected: it answered %s\n", out.at(response).c_str());
    } catch (const ferry::error& e) {
      failed_as_expected = e.code() == fl::errc::no_branch_ran;
      std::printf("  failed%s: %s\n", failed_as_expected ? " with errc::no_branch_ran" : " unexpectedly",
                  e.what());
    }
    std::printf("  ran: %s\n", joined(log.steps()).c_str());
    if (!failed_as_expected) ++bad;
    co_return bad == 0 ? 0 : 1;
  };
  return ep.run(main_task);
}
