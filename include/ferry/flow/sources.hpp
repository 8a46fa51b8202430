// ferry/flow/sources.hpp — ready-made sources and outputs for processor pipelines (A4, A7).
//
//     namespace fl = ferry::flow;
//     fl::rest_source quotes{mgr, "source", {.url = "http://127.0.0.1:8080/quote",
//                                            .interval = std::chrono::seconds(1),
//                                            .failure_threshold = 3,
//                                            .on_threshold = fl::threshold_action::fail}};
//     fl::cron_source every_minute{mgr, "cron", {.interval = std::chrono::minutes(1)}};
//     fl::stream_source feed{mgr, "feed", {.host = "127.0.0.1", .port = 9000}};
//     fl::csv_output<std::chrono::system_clock::time_point, double> out{
//         mgr, "writer", {.path = "prices.csv", .header = {"time", "price"}}};
//     fl::on(parser.price, out.sink());
//
// Rules (spec/flow-processors.md A4, A7):
//  * rest_source polls `url` (plain http://host[:port]/path) with a blocking HTTP/1.1 GET
//    run on a thread pool through ferry::threaded (the pool in the options, else the
//    loop's default pool), every `interval` measured from one request's start to the next.
//    A 2xx response emits data(body, time of the response). A connection error, a timeout
//    or a non-2xx status is a failure (errc::http_error, naming the URL and the status);
//    `failure_threshold` consecutive failures make an errc::failure_threshold error, which
//    is reported and then, by `on_threshold`: keep_going (reported with manager::report;
//    the count starts again), stop (reported likewise; run() returns: the source is done)
//    or fail (run() throws it: the manager fails with it, the supervisor reports that
//    failure and restarts a run-always manager). A success resets the count.
//  * cron_source emits tick(t) at every multiple of `interval` since the epoch of the
//    system clock (t is exactly that multiple); a tick missed because the loop was late
//    is skipped (counted in missed()), never emitted late in a burst.
//  * stream_source connects over TCP, reads `delimiter`-separated frames and emits
//    message(frame, time). When the connection fails or ends it reconnects after
//    `reconnect_delay`. A connection that delivered at least one frame resets the failure
//    count; a refused/failed connect or a connection that ended with nothing counts one;
//    at `max_failures` run() throws errc::connection_failed with the last cause.
//  * Every source runs until its run() is cancelled (terminal cancellation) or, with
//    `max_*` options, until it has done that much; then run() returns (it is done).
//  * csv_output<Cols...> appends one row per write (or per message through sink()) to
//    `path`, writing the header only when the file is empty or new: restarts and reruns
//    append to one file (A7). Fields: numbers in shortest round-trip form, time points as
//    ISO 8601 UTC with milliseconds, text quoted when it holds the delimiter, a quote or a
//    line break. A header with another column count is errc::invalid_argument; a file that
//    cannot be opened or written is a ferry::error naming the path.
#pragma once

#include <ferry/flow/processor.hpp>
#include <ferry/thread_pool.hpp>

#include <asio/awaitable.hpp>

#include <atomic>
#include <charconv>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <sstream>
#include <stop_token>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace ferry::flow {

// What a source does once its consecutive failures reach the threshold (after reporting).
enum class threshold_action { keep_going, stop, fail };

struct rest_options {
  std::string url{};                              // http://host[:port]/path
  std::chrono::milliseconds interval{30000};      // the seed's request_interval (seconds there)
  std::size_t failure_threshold = 10;             // the seed's exception_threshold
  threshold_action on_threshold = threshold_action::keep_going;
  std::chrono::milliseconds timeout{5000};        // per request: connect, send, receive
  ferry::thread_pool* pool = nullptr;             // where the blocking GET runs
  std::optional<std::size_t> max_requests{};        // done after this many (tests, demos)
};

struct rest_stats {
  std::size_t requests = 0;
  std::size_t successes = 0;
  std::size_t failures = 0;
  std::size_t reports = 0;                // threshold reports made
  std::size_t consecutive_failures = 0;   // now
};

// The result of one blocking HTTP GET.
struct http_response {
  int status = 0;
  std::string body;
};

// A blocking HTTP/1.1 GET of a plain http:// URL (Connection: close, Content-Length or
// chunked bodies). Throws errc::http_error on a bad URL, connect / send / receive failure
// or `timeout`; returns any status. Meant to run on a pool (rest_source wraps it in
// ferry::threaded); a stop request ends it with operation_aborted within ~50 ms.
http_response http_get(const std::string& url, std::chrono::milliseconds timeout,
                       std::stop_token stop = {});

class rest_source : public source {
public:
  rest_source(processor_home home, std::string name, rest_options options);

  // The response body and the time it arrived.
  event<std::string, std::chrono::system_clock::time_point> data{*this, "data"};

  asio::awaitable<void> run() override;
  rest_stats stats() const;

private:
  void validate();
  rest_options options_;
  struct counters;
  std::shared_ptr<counters> counters_;
};

struct cron_options {
  std::chrono::milliseconds interval{60000};
  std::optional<std::size_t> max_ticks{};
};

class cron_source : public source {
public:
  cron_source(processor_home home, std::string name, cron_options options);

  event<std::chrono::system_clock::time_point> tick{*this, "tick"};

  asio::awaitable<void> run() override;
  std::size_t ticks() const noexcept { return ticks_.load(std::memory_order_relaxed); }
  std::size_t missed() const noexcept { return missed_.load(std::memory_order_relaxed); }

private:
  cron_options options_;
  std::atomic<std::size_t> ticks_{0};
  std::atomic<std::size_t> missed_{0};
};

struct stream_options {
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;
  char delimiter = '\n';
  std::chrono::milliseconds reconnect_delay{500};
  std::chrono::milliseconds connect_timeout{5000};
  std::size_t max_failures = 5;
  std::size_t max_frame = 1 << 20;               // a longer frame is a failed connection
  std::optional<std::size_t> max_messages{};       // done after this many (tests, demos)
};

struct stream_stats {
  std::size_t connects = 0;       // connections established
  std::size_t messages = 0;
  std::size_t failures = 0;       // all failures so far
  std::size_t consecutive_failures = 0;
};

class stream_source : public source {
public:
  stream_source(processor_home home, std::string name, stream_options options);

  event<std::string, std::chrono::system_clock::time_point> message{*this, "message"};

  asio::awaitable<void> run() override;
  stream_stats stats() const;

private:
  void validate();
  stream_options options_;
  struct counters;
  std::shared_ptr<counters> counters_;
};

struct csv_options {
  std::string path{};
  std::vector<std::string> header{};  // empty: no header row
  char delimiter = ';';
};

namespace detail {
// The file side of csv_output: opens for append, writes the header once, appends rows.
class csv_file {
public:
  csv_file(csv_options options, std::size_t columns);
  ~csv_file();
  void append_row(const std::vector<std::string>& fields);
  std::size_t rows() const;
  const std::string& path() const noexcept { return options_.path; }

private:
  csv_options options_;
  struct impl;
  std::unique_ptr<impl> impl_;
};

std::string csv_field(std::chrono::system_clock::time_point t);
std::string csv_field(std::string_view s);
std::string csv_field(double v);
std::string csv_field(long long v);
std::string csv_field(unsigned long long v);

template <class T>
std::string to_csv_field(const T& v) {
  if constexpr (std::is_same_v<T, std::chrono::system_clock::time_point>) {
    return csv_field(v);
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    return csv_field(std::string_view(v));
  } else if constexpr (std::is_floating_point_v<T>) {
    return csv_field(static_cast<double>(v));
  } else if constexpr (std::is_integral_v<T> && std::is_signed_v<T>) {
    return csv_field(static_cast<long long>(v));
  } else if constexpr (std::is_integral_v<T>) {
    return csv_field(static_cast<unsigned long long>(v));
  } else {
    std::ostringstream out;
    out << v;
    return csv_field(std::string_view(out.str()));
  }
}
}  // namespace detail

// An output processor: one CSV row per write, appended (A7).
template <class... Cols>
class csv_output : public processor {
public:
  csv_output(processor_home home, std::string name, csv_options options)
      : processor(home, std::move(name)), file_(std::move(options), sizeof...(Cols)) {}

  void write(const Cols&... cols) {
    file_.append_row(std::vector<std::string>{detail::to_csv_field(cols)...});
  }
  // A plain handler for a port of event<Cols...>: on(port, out.sink()).
  auto sink() {
    return [this](const Cols&... cols) { write(cols...); };
  }
  std::size_t rows() const { return file_.rows(); }
  const std::string& path() const noexcept { return file_.path(); }

private:
  detail::csv_file file_;
};

}  // namespace ferry::flow
