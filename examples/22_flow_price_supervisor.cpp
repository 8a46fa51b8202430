// The aiopype seed's example, as a C++ twin: an "Apple stock processor". A REST source polls
// a price endpoint, a processor extracts the price from the JSON, and a CSV output appends
// one row per price. The seed polled Yahoo Finance; here the example starts its own small
// HTTP server on 127.0.0.1 whose price moves on every request, so it runs anywhere.
//
// The flow (supervisor) runs the manager with restart_policy::always on a queued message
// handler (the seed's AsyncFlow). About 1.2 s in, the server is made to fail for a while:
// the source sees three consecutive failures (its threshold), fails "for a restart", and the
// supervisor reports it, tears the manager down (its context's teardown callback prints)
// and builds a fresh one after a back-off. After about 3 s the flow is stopped: the source
// stops, the queue is drained, the manager is torn down. Then the CSV file is printed.
#include <ferry/flow/context.hpp>
#include <ferry/flow/processor.hpp>
#include <ferry/flow/sources.hpp>
#include <ferry/flow/supervisor.hpp>

#include <nlohmann/json.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read_until.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <utility>

using namespace std::chrono_literals;
namespace fl = ferry::flow;
using std::chrono::system_clock;

namespace {

const auto started = std::chrono::steady_clock::now();

void say(const std::string& what) {
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
  std::printf("  %7.1f ms  %s\n", ms, what.c_str());
  std::fflush(stdout);
}

// A quote server standing in for Yahoo: each GET answers the seed's JSON shape with a price
// that moves a little every time, or 500 while `failing` is set.
class quote_server {
public:
  quote_server() : acceptor_(io_, {asio::ip::make_address("127.0.0.1"), 0}) {
    asio::co_spawn(io_, accept(), asio::detached);
    thread_ = std::thread([this] { io_.run(); });
  }
  ~quote_server() {
    io_.stop();
    thread_.join();
  }
  std::string base_url() const {
    return "http://127.0.0.1:" + std::to_string(acceptor_.local_endpoint().port());
  }
  void set_failing(bool f) { failing_ = f; }

private:
  asio::awaitable<void> accept() {
    for (;;) {
      auto op = acceptor_.async_accept(asio::use_awaitable);
      asio::ip::tcp::socket s = co_await std::move(op);
      asio::co_spawn(io_, answer(std::move(s)), asio::detached);
    }
  }
  asio::awaitable<void> answer(asio::ip::tcp::socket s) {
    std::string request;
    auto reading = asio::async_read_until(s, asio::dynamic_buffer(request), "\r\n\r\n", asio::use_awaitable);
    co_await std::move(reading);
    std::string response;
    if (failing_) {
      response = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    } else {
      price_cents_ += (++tick_ % 3 == 0) ? -7 : 11;  // a deterministic wiggle upwards
      nlohmann::json quote = {
          {"list", {{"resources", {{{"resource", {{"fields", {{"symbol", "AAPL"}, {"price", static_cast<double>(price_cents_) / 100.0}}}}}}}}}}};
      const std::string body = quote.dump();
      response = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " +
                 std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
    }
    auto writing = asio::async_write(s, asio::buffer(response), asio::use_awaitable);
    co_await std::move(writing);
  }

  asio::io_context io_;
  asio::ip::tcp::acceptor acceptor_;
  std::atomic<bool> failing_{false};
  long price_cents_ = 18950;  // touched on the server's thread only
  long tick_ = 0;
  std::thread thread_;
};

// The seed's YahooRestSource: a RestSource with the symbol's URL, a threshold and an interval.
class yahoo_rest_source : public fl::rest_source {
public:
  yahoo_rest_source(fl::manager& m, std::string name, const std::string& base, const std::string& symbol)
      : fl::rest_source(m, std::move(name),
                        {.url = base + "/webservice/v1/symbols/" + symbol + "/quote?format=json&view=detail",
                         .interval = 150ms,
                         .failure_threshold = 3,
                         .on_threshold = fl::threshold_action::fail,
                         .timeout = 2000ms}) {}
};

// The seed's HandleRawData: extracts the price and emits it with the time.
class handle_raw_data : public fl::processor {
public:
  using fl::processor::processor;
  fl::event<system_clock::time_point, double> price{*this, "price"};

  asio::awaitable<void> handle(const std::string& data, system_clock::time_point time) {
    const auto json = nlohmann::json::parse(data);
    const double p = json.at("list").at("resources").at(0).at("resource").at("fields").at("price").get<double>();
    auto op = emit(price, time, p);
    co_await std::move(op);
  }
};

// The seed's YahooManager: source.data -> processor.handle, processor.price -> writer.write.
class yahoo_manager : public fl::manager {
public:
  yahoo_manager(fl::manager_args args, std::string base, std::string csv_path, int* instances)
      : fl::manager(std::move(args)),
        instance_(++*instances),
        source_(*this, "source", base, "AAPL"),
        processor_(*this, "processor"),
        writer_(*this, "writer", {.path = std::move(csv_path), .header = {"time", "price"}}) {
    fl::on(source_.data, [this](const std::string& data, system_clock::time_point t) {
      return processor_.handle(data, t);
    });
    fl::on(processor_.price, [this](system_clock::time_point t, double p) {
      writer_.write(t, p);
      char line[64];
      std::snprintf(line, sizeof line, ": price %.2f appended", p);
      say(name() + " #" + std::to_string(instance_) + line);
    });
    set_source(source_);
    say(name() + " #" + std::to_string(instance_) + " started (a fresh child context)");
    ctx().add_teardown_callback([n = name(), i = instance_] {
      say(n + " #" + std::to_string(i) + ": context closed, resources torn down");
    });
  }

private:
  int instance_;
  yahoo_rest_source source_;
  handle_raw_data processor_;
  fl::csv_output<system_clock::time_point, double> writer_;
};

}  // namespace

int main() {
  quote_server server;
  const std::string csv_path = (std::filesystem::temp_directory_path() / "ferry_yahoo_aapl.csv").string();
  std::filesystem::remove(csv_path);  // a fresh file for the demo; reruns would append
  std::printf("quote server on %s, CSV at %s\n", server.base_url().c_str(), csv_path.c_str());

  asio::io_context io;
  fl::context root{io};
  fl::queued_handler handler{io, {.capacity = 256}};  // the seed's AsyncProtocol
  int instances = 0;
  int restarts_reported = 0;
  fl::supervisor flow{root, handler, [&](const fl::failure_report& r) {
                        std::string line = "REPORT " + r.manager + (r.fatal ? " failed: " : ": ") +
                                           fl::describe_exception(r.error);
                        if (r.restart_in) {
                          ++restarts_reported;
                          line += " -> restart in " +
                                  std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(*r.restart_in).count()) +
                                  " ms";
                        }
                        if (r.gave_up) line += " -> gave up";
                        say(line);
                      }};
  flow.add<yahoo_manager>("yahoo_apple",
                          {.policy = fl::restart_policy::always, .initial_delay = 300ms, .max_restarts = 5},
                          server.base_url(), csv_path, &instances);

  auto script = [&]() -> asio::awaitable<void> {
    asio::steady_timer t(io, 1200ms);
    auto w1 = t.async_wait(asio::use_awaitable);
    co_await std::move(w1);
    say("server: failing now (503)");
    server.set_failing(true);
    t.expires_after(700ms);
    auto w2 = t.async_wait(asio::use_awaitable);
    co_await std::move(w2);
    say("server: healthy again");
    server.set_failing(false);
    t.expires_after(1100ms);
    auto w3 = t.async_wait(asio::use_awaitable);
    co_await std::move(w3);
    say("stopping the flow: source stopped, queue drained, manager torn down");
    auto stopping = flow.stop();
    co_await std::move(stopping);
  };
  auto main_task = [&]() -> asio::awaitable<void> {
    asio::co_spawn(io, script(), asio::detached);
    auto op = flow.run();
    co_await std::move(op);
    say("flow ended");
    auto closing = root.close();
    co_await std::move(closing);
  };
  std::exception_ptr failure;
  asio::co_spawn(io, main_task(), [&](std::exception_ptr e) { failure = e; });
  io.run();
  if (failure) {
    std::printf("the flow failed: %s\n", fl::describe_exception(failure).c_str());
    return 1;
  }

  std::printf("\n%s:\n", csv_path.c_str());
  std::ifstream in(csv_path);
  int rows = -1;
  for (std::string line; std::getline(in, line); ++rows) std::printf("  %s\n", line.c_str());
  std::printf("\n%d price rows from %d manager instance(s), %d restart(s) after a failure\n", rows, instances,
              restarts_reported);
  const bool ok = rows > 5 && instances >= 2 && restarts_reported >= 1;
  std::printf("%s\n", ok ? "OK: prices written, the failure was reported and the manager restarted"
                         : "UNEXPECTED: see above");
  return ok ? 0 : 1;
}
