// The introduction of the async-data-flow seed: a two-step package, source then destination,
// bundled with flow::seq into one flow::bundle that runs like a single coroutine. Three calls
// run at once, one per endpoint, each with its own bag. `source` is a coroutine: it fetches
// (a steady_timer of a few ms stands in for the network, longer for the far endpoints) and
// gives `source` and `data`; it runs on the loop. `destination` is a plain, blocking function
// ("writes" into one shared destination: a mutex-protected vector standing in for a DB) and
// gives `status`; `.on(db_pool)` runs it on a ferry::thread_pool, never on the loop. Each line
// says how many ms after the start a step began or ended, and on which thread kind: the three
// packages overlap, and the whole run takes about as long as the slowest one.
#include <ferry/ferry.hpp>
#include <ferry/flow/bundle.hpp>

#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

using namespace std::chrono_literals;
namespace fl = ferry::flow;

namespace {

// The seed's keyword arguments, typed.
const fl::key<std::string> endpoint{"endpoint"};
const fl::key<std::string> source{"source"};
const fl::key<std::vector<int>> data{"data"};
const fl::key<int> status{"status"};

// Prints each event with the time since the start and the kind of thread it happened on;
// keeps the events (in order) for the checks at the end. Steps call it from the loop and
// from pool workers, hence the mutex.
class timeline {
public:
  struct event {
    std::string what{};
    bool on_loop = false;
  };

  void note(const std::string& what) {
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
    const bool on_loop = std::this_thread::get_id() == loop_;
    std::lock_guard lock(mu_);
    std::printf("  %6.1f ms  [%s]  %s\n", ms, on_loop ? "loop" : "pool", what.c_str());
    events_.push_back({what, on_loop});
  }
  // The position of the first event named `what` (events_.size() when there is none).
  std::size_t index_of(const std::string& what) const {
    std::lock_guard lock(mu_);
    for (std::size_t i = 0; i < events_.size(); ++i) {
      if (events_[i].what.rfind(what, 0) == 0) return i;
    }
    return events_.size();
  }
  bool on_loop(const std::string& what) const {
    std::lock_guard lock(mu_);
    for (const auto& e : events_) {
      if (e.what.rfind(what, 0) == 0) return e.on_loop;
    }
    return false;
  }

private:
  const std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  const std::thread::id loop_ = std::this_thread::get_id();  // made on the loop's thread
  mutable std::mutex mu_;
  std::vector<event> events_;
};

// The shared destination of all three packages.
struct database {
  std::mutex mu;
  std::vector<std::string> rows;
};

// What `source` gives: one member per given key, in the order of gives(source, data).
struct fetched {
  std::string from{};
  std::vector<int> values{};
};

// How far away each endpoint is, and what it holds.
std::chrono::milliseconds latency_of(const std::string& ep) {
  if (ep == "eu.example") return 25ms;
  if (ep == "us.example") return 10ms;
  return 15ms;
}
std::vector<int> rows_of(const std::string& ep) {
  if (ep == "eu.example") return {1, 2, 3, 4, 5, 6};
  if (ep == "us.example") return {10, 20, 30};
  return {7, 8, 9, 10};
}

// How long the blocking "insert" takes.
constexpr std::chrono::milliseconds write_time{8};

}  // namespace

int main() {
  ferry::entrypoint ep{{.pool_size = 2}};
  ferry::thread_pool db_pool{ferry::thread_pool_options{.threads = 2, .name = "db"}};
  timeline log;
  database db;

  // async def source(endpoint): ... return {'source': endpoint, 'data': [...]}
  // (`where` refers into the call's bag, which outlives the step.)
  auto fetch = [&log](const std::string& where) -> asio::awaitable<fetched> {
    log.note("source(" + where + ") fetching");
    auto ex = co_await asio::this_coro::executor;
    asio::steady_timer io_wait(ex, latency_of(where));
    auto wait = io_wait.async_wait(asio::use_awaitable);
    co_await std::move(wait);
    fetched got{where, rows_of(where)};
    log.note("source(" + where + ") got " + std::to_string(got.values.size()) + " values");
    co_return got;
  };
  const fl::step source_step = fl::step("source", fl::needs(endpoint), fl::gives(source, data), fetch);

  // def destination(source, data): ... return {'status': 0}   (blocking: on db_pool)
  auto store = [&log, &db](const std::string& from, const std::vector<int>& values) {
    log.note("destination(" + from + ") storing " + std::to_string(values.size()) + " values");
    std::this_thread::sleep_for(write_time);  // a blocking driver call
    {
      std::lock_guard lock(db.mu);
      for (int v : values) db.rows.push_back(from + ":" + std::to_string(v));
    }
    log.note("destination(" + from + ") stored");
    return 0;
  };
  const fl::step destination_step =
      fl::step("destination", fl::needs(source, data), fl::gives(status), store).on(db_pool);

  // dataflow_definition = (source, destination)
  const fl::bundle flow{fl::seq(source_step, destination_step)};
  const std::vector<std::string> endpoints = {"eu.example", "us.example", "asia.example"};

  auto main_task = [&]() -> asio::awaitable<int> {
    std::printf("flow %s, one call per endpoint, all at once:\n", flow.root().describe().c_str());
    auto ex = co_await asio::this_coro::executor;
    const auto started = std::chrono::steady_clock::now();
    // tasks.append(asyncio.create_task(dataflow(endpoint=endpoint))); gather(*tasks)
    std::vector<int> statuses(endpoints.size(), -1);
    std::vector<std::string> failures;
    std::size_t remaining = endpoints.size();
    asio::steady_timer all_done(ex, asio::steady_timer::time_point::max());
    for (std::size_t i = 0; i < endpoints.size(); ++i) {
      flow.async_run(ex, fl::bag{endpoint(endpoints[i])}, [&, i](std::exception_ptr e, fl::bag out) {
        if (e) {
          try {
            std::rethrow_exception(e);
          } catch (const std::exception& x) {
            failures.push_back(endpoints[i] + ": " + x.what());
          }
        } else {
          statuses[i] = out.at(status);
        }
        if (--remaining == 0) all_done.cancel();
      });
    }
    try {
      auto wait = all_done.async_wait(asio::use_awaitable);
      co_await std::move(wait);
    } catch (const std::system_error&) {
      // cancelled: every call has completed
    }
    const double total =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();

    int bad = 0;
    for (const auto& f : failures) {
      std::printf("unexpected failure: %s\n", f.c_str());
      ++bad;
    }
    std::printf("statuses:");
    for (std::size_t i = 0; i < endpoints.size(); ++i) {
      std::printf(" %s=%d", endpoints[i].c_str(), statuses[i]);
      if (statuses[i] != 0) ++bad;
    }
    std::printf("\n");
    {
      std::lock_guard lock(db.mu);
      std::printf("destination holds %zu rows:", db.rows.size());
      for (const auto& r : db.rows) std::printf(" %s", r.c_str());
      std::printf("\n");
      if (db.rows.size() != 13) ++bad;
    }
    // The packages overlap: every source started fetching before the first one got its data
    // (the order of events, not their times, so a busy machine cannot make this flaky).
    std::size_t first_got = SIZE_MAX;
    for (const auto& e : endpoints) first_got = std::min(first_got, log.index_of("source(" + e + ") got"));
    for (const auto& e : endpoints) {
      if (log.index_of("source(" + e + ") fetching") > first_got) {
        std::printf("unexpected: source(%s) did not overlap the others\n", e.c_str());
        ++bad;
      }
      if (!log.on_loop("source(" + e + ")") || log.on_loop("destination(" + e + ")")) {
        std::printf("unexpected: %s's steps ran on the wrong kind of thread\n", e.c_str());
        ++bad;
      }
    }
    std::chrono::milliseconds serial{0};
    for (const auto& e : endpoints) serial += latency_of(e) + write_time;
    std::printf("all three packages done in %.1f ms (one after another: at least %lld ms)\n", total,
                static_cast<long long>(serial.count()));
    co_return bad == 0 ? 0 : 1;
  };
  return ep.run(main_task);
}
