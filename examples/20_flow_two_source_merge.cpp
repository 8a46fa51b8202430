// The "more complex" case of the async-data-flow seed: two sources read concurrently, a merge,
// then one destination —
//
//     dataflow_definition = ((source_a, source_b), merge, dest)
//
// in C++ `seq(par(source_a, source_b), merge, dest)`. source_a and source_b are one `source`
// step (a coroutine needing endpoint and query) with the endpoint fixed by .bind() (the seed's
// functools.partial) and its `data` written under data_a / data_b by .map_output() (the seed's
// args_mapper), so the two branches' outputs do not collide when the par merges them. `merge`
// is a plain function (it runs on the loop's default pool) zipping data_a and data_b; `dest`
// is the `store` coroutine bound to endpoint_c. Three queries run at once, each its own call
// with its own bag. Every line says when (ms since the start) and on which thread kind a step
// began or ended: source_a and source_b of a query overlap, and so do the three queries.
// The values tell the queries apart: query_N reads N01 N02 N03 from endpoint_a and N11 N12
// N13 from endpoint_b.
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

using rows_t = std::vector<std::pair<int, int>>;

const fl::key<std::string> endpoint{"endpoint"}, query{"query"};
const fl::key<std::vector<int>> data{"data"}, data_a{"data_a"}, data_b{"data_b"};
// The seed's merge gives `data` again; a key has one type here, so the zipped pairs get
// their own key.
const fl::key<rows_t> rows{"rows"};
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
  // The position of the first event starting with `what` (events_.size() when there is none).
  std::size_t index_of(const std::string& what) const {
    std::lock_guard lock(mu_);
    for (std::size_t i = 0; i < events_.size(); ++i) {
      if (events_[i].what.rfind(what, 0) == 0) return i;
    }
    return events_.size();
  }
  std::size_t count_of(const std::string& what) const {
    std::lock_guard lock(mu_);
    return static_cast<std::size_t>(std::count_if(events_.begin(), events_.end(), [&](const event& e) {
      return e.what.rfind(what, 0) == 0;
    }));
  }

private:
  const std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  const std::thread::id loop_ = std::this_thread::get_id();  // made on the loop's thread
  mutable std::mutex mu_;
  std::vector<event> events_;
};

// What each endpoint answers to a query ("query_2" at endpoint_a: 201 202 203), and how long
// it takes.
int query_number(const std::string& q) { return q.back() - '0'; }
std::vector<int> answer_of(const std::string& ep, const std::string& q) {
  const int base = query_number(q) * 100 + (ep == "endpoint_a" ? 0 : 10);
  return {base + 1, base + 2, base + 3};
}
std::chrono::milliseconds latency_of(const std::string& ep, const std::string& q) {
  return std::chrono::milliseconds((ep == "endpoint_a" ? 12 : 8) + 2 * query_number(q));
}

std::string text_of(const std::vector<int>& v) {
  std::string s = "[";
  for (int x : v) {
    if (s.size() > 1) s += ' ';
    s += std::to_string(x);
  }
  s += ']';
  return s;
}
std::string text_of(const rows_t& r) {
  std::string s;
  for (const auto& [x, y] : r) {
    if (!s.empty()) s += ' ';
    s += '(' + std::to_string(x) + ',' + std::to_string(y) + ')';
  }
  return s;
}

}  // namespace

int main() {
  ferry::entrypoint ep{{.pool_size = 2}};
  timeline log;
  std::vector<std::string> destination;  // endpoint_c; only the store coroutine (on the loop) writes it

  // async def source(endpoint, query): ... return {'data': [...]}
  auto fetch = [&log](const std::string& where, const std::string& q) -> asio::awaitable<std::vector<int>> {
    const std::string who = (where == "endpoint_a" ? "source_a(" : "source_b(") + q + ")";
    log.note(who + " fetching from " + where);
    auto ex = co_await asio::this_coro::executor;
    asio::steady_timer io_wait(ex, latency_of(where, q));
    auto wait = io_wait.async_wait(asio::use_awaitable);
    co_await std::move(wait);
    std::vector<int> got = answer_of(where, q);
    log.note(who + " got " + text_of(got));
    co_return got;
  };
  const fl::step source = fl::step("source", fl::needs(endpoint, query), fl::gives(data), fetch);

  // async def merge(data_a, data_b): return {'data': zip(data_a, data_b)}   (plain: on a pool)
  auto zip = [&log](const std::vector<int>& a, const std::vector<int>& b) {
    log.note("merge zips " + text_of(a) + " with " + text_of(b));
    rows_t out;
    for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) out.emplace_back(a[i], b[i]);
    return out;
  };
  const fl::step merge = fl::step("merge", fl::needs(data_a, data_b), fl::gives(rows), zip);

  // async def destination(endpoint, data): ... return {'status': 0}
  auto write_rows = [&log, &destination](const std::string& where, const rows_t& r) -> asio::awaitable<int> {
    log.note("dest writing " + text_of(r) + " to " + where);
    auto ex = co_await asio::this_coro::executor;
    asio::steady_timer io_wait(ex, 3ms);
    auto wait = io_wait.async_wait(asio::use_awaitable);
    co_await std::move(wait);
    for (const auto& [x, y] : r) destination.push_back("(" + std::to_string(x) + "," + std::to_string(y) + ")");
    log.note("dest wrote " + std::to_string(r.size()) + " rows to " + where);
    co_return 0;
  };
  const fl::step store = fl::step("store", fl::needs(endpoint, rows), fl::gives(status), write_rows);

  // source_a = args_mapper(partial(source, endpoint='endpoint_a'), output={'data': 'data_a'})
  const fl::step source_a = source.bind(endpoint, "endpoint_a").map_output(data, data_a).renamed("source_a");
  const fl::step source_b = source.bind(endpoint, "endpoint_b").map_output(data, data_b).renamed("source_b");
  // dest = partial(destination, endpoint='endpoint_c')
  const fl::step dest = store.bind(endpoint, "endpoint_c").renamed("dest");
  const fl::bundle flow{fl::seq(fl::par(source_a, source_b), merge, dest)};
  std::printf("source_a needs:");
  for (const auto& k : source_a.needs()) std::printf(" %s", k.name.c_str());
  std::printf("; gives:");
  for (const auto& k : source_a.gives()) std::printf(" %s", k.name.c_str());
  std::printf("   dest needs:");
  for (const auto& k : dest.needs()) std::printf(" %s", k.name.c_str());
  std::printf("\n");

  const std::vector<std::string> queries = {"query_1", "query_2", "query_3"};

  auto main_task = [&]() -> asio::awaitable<int> {
    std::printf("flow %s, one call per query, all at once:\n", flow.root().describe().c_str());
    auto ex = co_await asio::this_coro::executor;
    const auto started = std::chrono::steady_clock::now();
    // for query in (query_1, query_2, query_3): asyncio.create_task(dataflow(query=query))
    std::vector<int> statuses(queries.size(), -1);
    std::vector<std::string> failures;
    std::size_t remaining = queries.size();
    asio::steady_timer all_done(ex, asio::steady_timer::time_point::max());
    for (std::size_t i = 0; i < queries.size(); ++i) {
      flow.async_run(ex, fl::bag{query(queries[i])}, [&, i](std::exception_ptr e, fl::bag out) {
        if (e) {
          try {
            std::rethrow_exception(e);
          } catch (const std::exception& x) {
            failures.push_back(queries[i] + ": " + x.what());
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
    for (std::size_t i = 0; i < queries.size(); ++i) {
      std::printf(" %s=%d", queries[i].c_str(), statuses[i]);
      if (statuses[i] != 0) ++bad;
    }
    std::printf("\nendpoint_c holds %zu rows:", destination.size());
    for (const auto& r : destination) std::printf(" %s", r.c_str());
    std::printf("\n");
    if (destination.size() != 9) ++bad;
    // Within each query the two sources overlap: both started before either got its data
    // (checked on the order of events, not on their times, so a busy machine cannot make
    // this flaky).
    for (const auto& q : queries) {
      const std::size_t first_got =
          std::min(log.index_of("source_a(" + q + ") got"), log.index_of("source_b(" + q + ") got"));
      if (log.index_of("source_a(" + q + ") fetching") > first_got ||
          log.index_of("source_b(" + q + ") fetching") > first_got) {
        std::printf("unexpected: the sources of %s did not overlap\n", q.c_str());
        ++bad;
      }
    }
    if (log.count_of("merge") != 3 || log.count_of("dest wrote") != 3) {
      std::printf("unexpected: merge or store did not run once per query\n");
      ++bad;
    }
    std::chrono::milliseconds serial{0};
    for (const auto& q : queries) serial += latency_of("endpoint_a", q) + latency_of("endpoint_b", q) + 3ms;
    std::printf("all three queries done in %.1f ms (one step after another: at least %lld ms)\n", total,
                static_cast<long long>(serial.count()));
    co_return bad == 0 ? 0 : 1;
  };
  return ep.run(main_task);
}
