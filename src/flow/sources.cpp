// Sources and the CSV output: include/ferry/flow/sources.hpp.
#include <ferry/flow/sources.hpp>
#include <ferry/flow/supervisor.hpp>
#include <ferry/threaded.hpp>

#include <asio/connect.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read_until.hpp>
#include <asio/steady_timer.hpp>
#include <asio/system_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <mutex>

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

namespace ferry::flow {

using asio::experimental::as_tuple;
using std::chrono::milliseconds;
using std::chrono::steady_clock;
using std::chrono::system_clock;

namespace {
[[noreturn]] void http_fail(const std::string& url, const std::string& why) {
  throw ferry::error(make_error_code(errc::http_error), "GET " + url + ": " + why);
}

struct parsed_url {
  std::string host;
  std::string port = "80";
  std::string target = "/";
};

parsed_url parse_url(const std::string& url) {
  const std::string scheme = "http://";
  if (url.compare(0, scheme.size(), scheme) != 0) {
    http_fail(url, "only plain http:// URLs are supported");
  }
  parsed_url u;
  const std::string rest = url.substr(scheme.size());
  const auto slash = rest.find('/');
  std::string authority = rest.substr(0, slash);
  if (slash != std::string::npos) u.target = rest.substr(slash);
  const auto colon = authority.rfind(':');
  if (colon != std::string::npos) {
    u.port = authority.substr(colon + 1);
    authority.resize(colon);
  }
  u.host = authority;
  if (u.host.empty() || u.port.empty() ||
      u.port.find_first_not_of("0123456789") != std::string::npos) {
    http_fail(url, "bad URL");
  }
  return u;
}

// A socket that closes itself.
struct fd_guard {
  int fd = -1;
  ~fd_guard() {
    if (fd >= 0) ::close(fd);
  }
};

// Waits for `events` on fd until the deadline, in 50 ms slices that look at `stop`.
void wait_fd(int fd, short events, steady_clock::time_point deadline, const std::stop_token& stop,
             const std::string& url, const char* what) {
  for (;;) {
    if (stop.stop_requested()) throw std::system_error(asio::error::operation_aborted);
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - steady_clock::now()).count();
    if (left <= 0) http_fail(url, std::string("timed out while ") + what);
    pollfd p{fd, events, 0};
    const int n = ::poll(&p, 1, static_cast<int>(std::min<long long>(left, 50)));
    if (n > 0) return;
    if (n < 0 && errno != EINTR) http_fail(url, std::string("poll: ") + std::strerror(errno));
  }
}

std::string lower(std::string s) {
  for (char& c : s) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return s;
}

std::string decode_chunked(const std::string& url, const std::string& raw) {
  std::string out;
  std::size_t pos = 0;
  for (;;) {
    const auto eol = raw.find("\r\n", pos);
    if (eol == std::string::npos) http_fail(url, "truncated chunked body");
    std::size_t size = 0;
    try {
      size = std::stoul(raw.substr(pos, eol - pos), nullptr, 16);
    } catch (const std::exception&) {
      http_fail(url, "bad chunk size");
    }
    pos = eol + 2;
    if (size == 0) return out;
    if (raw.size() < pos + size) http_fail(url, "truncated chunk");
    out.append(raw, pos, size);
    pos += size + 2;
  }
}
}  // namespace

http_response http_get(const std::string& url, milliseconds timeout, std::stop_token stop) {
  const parsed_url u = parse_url(url);
  const auto deadline = steady_clock::now() + timeout;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (int rc = ::getaddrinfo(u.host.c_str(), u.port.c_str(), &hints, &found); rc != 0) {
    http_fail(url, std::string("cannot resolve ") + u.host + ": " + ::gai_strerror(rc));
  }
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> addrs(found, ::freeaddrinfo);
  fd_guard sock;
  std::string last = "no address";
  for (addrinfo* a = addrs.get(); a; a = a->ai_next) {
    fd_guard s{::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol)};
    if (s.fd < 0) continue;
    if (::connect(s.fd, a->ai_addr, a->ai_addrlen) != 0) {
      if (errno != EINPROGRESS) {
        last = std::strerror(errno);
        continue;
      }
      wait_fd(s.fd, POLLOUT, deadline, stop, url, "connecting");
      int err = 0;
      socklen_t len = sizeof err;
      ::getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        last = std::strerror(err);
        continue;
      }
    }
    sock.fd = std::exchange(s.fd, -1);
    break;
  }
  if (sock.fd < 0) http_fail(url, "cannot connect: " + last);

  const std::string request = "GET " + u.target + " HTTP/1.1\r\nHost: " + u.host +
                              "\r\nConnection: close\r\nUser-Agent: ferry\r\n\r\n";
  std::size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = ::send(sock.fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<std::size_t>(n);
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      wait_fd(sock.fd, POLLOUT, deadline, stop, url, "sending");
    } else if (n < 0 && errno != EINTR) {
      http_fail(url, std::string("send: ") + std::strerror(errno));
    }
  }
  std::string raw;
  char buf[8192];
  for (;;) {
    const ssize_t n = ::recv(sock.fd, buf, sizeof buf, 0);
    if (n > 0) {
      raw.append(buf, static_cast<std::size_t>(n));
      if (raw.size() > (64u << 20)) http_fail(url, "response larger than 64 MiB");
    } else if (n == 0) {
      break;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      wait_fd(sock.fd, POLLIN, deadline, stop, url, "receiving");
    } else if (errno != EINTR) {
      http_fail(url, std::string("recv: ") + std::strerror(errno));
    }
  }
  const auto head_end = raw.find("\r\n\r\n");
  if (head_end == std::string::npos) http_fail(url, "no complete response header");
  http_response r;
  const auto line_end = raw.find("\r\n");
  const std::string status_line = raw.substr(0, line_end);
  if (status_line.compare(0, 5, "HTTP/") != 0 || status_line.size() < 12) {
    http_fail(url, "bad status line '" + status_line + "'");
  }
  try {
    r.status = std::stoi(status_line.substr(9, 3));
  } catch (const std::exception&) {
    http_fail(url, "bad status line '" + status_line + "'");
  }
  bool chunked = false;
  std::optional<std::size_t> length;
  std::size_t pos = line_end + 2;
  while (pos < head_end) {
    const auto eol = raw.find("\r\n", pos);
    const std::string line = raw.substr(pos, eol - pos);
    pos = eol + 2;
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    const std::string name = lower(line.substr(0, colon));
    std::string value = line.substr(colon + 1);
    value.erase(0, value.find_first_not_of(" \t"));
    if (name == "transfer-encoding" && lower(value).find("chunked") != std::string::npos) chunked = true;
    if (name == "content-length") {
      try {
        length = std::stoul(value);
      } catch (const std::exception&) {
        http_fail(url, "bad Content-Length");
      }
    }
  }
  std::string body = raw.substr(head_end + 4);
  if (chunked) {
    body = decode_chunked(url, body);
  } else if (length) {
    if (body.size() < *length) http_fail(url, "truncated body");
    body.resize(*length);
  }
  r.body = std::move(body);
  return r;
}

namespace {
bool is_cancelled(const asio::cancellation_state& s) {
  return s.cancelled() != asio::cancellation_type::none;
}
}  // namespace

// --- rest_source -----------------------------------------------------------------------------
struct rest_source::counters {
  std::atomic<std::size_t> requests{0};
  std::atomic<std::size_t> successes{0};
  std::atomic<std::size_t> failures{0};
  std::atomic<std::size_t> reports{0};
  std::atomic<std::size_t> consecutive{0};
};

rest_source::rest_source(processor_home home, std::string name, rest_options options)
    : source(home, std::move(name)), options_(std::move(options)), counters_(std::make_shared<counters>()) {
  validate();
}

void rest_source::validate() {
  (void)parse_url(options_.url);  // a bad URL fails now, with http_error naming it
  if (options_.failure_threshold == 0 || options_.interval.count() < 0 || options_.timeout.count() <= 0) {
    throw ferry::error(ferry::errc::invalid_argument,
                       "rest_source '" + name() + "': failure_threshold must be >= 1, interval >= 0, timeout > 0");
  }
}

rest_stats rest_source::stats() const {
  rest_stats s;
  s.requests = counters_->requests.load();
  s.successes = counters_->successes.load();
  s.failures = counters_->failures.load();
  s.reports = counters_->reports.load();
  s.consecutive_failures = counters_->consecutive.load();
  return s;
}

asio::awaitable<void> rest_source::run() {
  const rest_options opts = options_;
  const std::shared_ptr<counters> c = counters_;
  auto fetch = [url = opts.url, timeout = opts.timeout](std::stop_token st) {
    return http_get(url, timeout, std::move(st));
  };
  const ferry::threaded_function<decltype(fetch)> get(std::move(fetch), opts.pool);
  auto ex = co_await asio::this_coro::executor;
  asio::steady_timer timer(ex);
  auto next = steady_clock::now();
  for (;;) {
    if (opts.max_requests && c->requests.load() >= *opts.max_requests) co_return;
    http_response response;
    std::exception_ptr failure;
    try {
      auto op = get();
      response = co_await std::move(op);
    } catch (...) {
      failure = std::current_exception();
    }
    if (failure) {
      asio::cancellation_state cs = co_await asio::this_coro::cancellation_state;
      if (is_cancelled(cs)) std::rethrow_exception(failure);
    }
    c->requests.fetch_add(1);
    if (!failure && (response.status < 200 || response.status > 299)) {
      failure = std::make_exception_ptr(ferry::error(
          make_error_code(errc::http_error),
          "GET " + opts.url + ": status " + std::to_string(response.status)));
    }
    if (failure) {
      c->failures.fetch_add(1);
      const std::size_t n = c->consecutive.fetch_add(1) + 1;
      if (n >= opts.failure_threshold) {
        auto e = std::make_exception_ptr(ferry::error(
            make_error_code(errc::failure_threshold),
            "rest_source '" + name() + "': " + std::to_string(n) + " consecutive failures; last: " +
                describe_exception(failure)));
        c->consecutive.store(0);
        if (opts.on_threshold == threshold_action::fail) std::rethrow_exception(e);
        c->reports.fetch_add(1);
        report(e);
        if (opts.on_threshold == threshold_action::stop) co_return;
      }
    } else {
      c->successes.fetch_add(1);
      c->consecutive.store(0);
      auto op = emit(data, std::move(response.body), system_clock::now());
      co_await std::move(op);
    }
    next += opts.interval;
    const auto now = steady_clock::now();
    if (next < now) next = now;  // late: the next request goes now, no burst to catch up
    timer.expires_at(next);
    auto op = timer.async_wait(asio::use_awaitable);
    co_await std::move(op);
  }
}

// --- cron_source -----------------------------------------------------------------------------
cron_source::cron_source(processor_home home, std::string name, cron_options options)
    : source(home, std::move(name)), options_(options) {
  if (options_.interval.count() <= 0) {
    throw ferry::error(ferry::errc::invalid_argument, "cron_source '" + this->name() + "': interval must be > 0");
  }
}

asio::awaitable<void> cron_source::run() {
  const cron_options opts = options_;
  const auto iv = std::chrono::duration_cast<system_clock::duration>(opts.interval);
  auto ex = co_await asio::this_coro::executor;
  asio::system_timer timer(ex);
  // The first multiple of the interval after now.
  auto next = system_clock::time_point((system_clock::now().time_since_epoch() / iv + 1) * iv);
  for (;;) {
    if (opts.max_ticks && ticks_.load() >= *opts.max_ticks) co_return;
    timer.expires_at(next);
    auto wait = timer.async_wait(asio::use_awaitable);
    co_await std::move(wait);
    const auto now = system_clock::now();
    if (now - next >= iv) {  // late by whole intervals: those ticks are skipped
      const auto skipped = (now - next) / iv;
      missed_.fetch_add(static_cast<std::size_t>(skipped));
      next += skipped * iv;
    }
    ticks_.fetch_add(1);
    auto op = emit(tick, next);
    co_await std::move(op);
    next += iv;
  }
}

// --- stream_source ---------------------------------------------------------------------------
struct stream_source::counters {
  std::atomic<std::size_t> connects{0};
  std::atomic<std::size_t> messages{0};
  std::atomic<std::size_t> failures{0};
  std::atomic<std::size_t> consecutive{0};
};

stream_source::stream_source(processor_home home, std::string name, stream_options options)
    : source(home, std::move(name)), options_(std::move(options)), counters_(std::make_shared<counters>()) {
  validate();
}

void stream_source::validate() {
  if (options_.port == 0 || options_.host.empty() || options_.max_failures == 0 ||
      options_.max_frame == 0 || options_.connect_timeout.count() <= 0) {
    throw ferry::error(ferry::errc::invalid_argument,
                       "stream_source '" + name() + "': needs a host, a port, max_failures >= 1, "
                       "max_frame >= 1 and connect_timeout > 0");
  }
}

stream_stats stream_source::stats() const {
  stream_stats s;
  s.connects = counters_->connects.load();
  s.messages = counters_->messages.load();
  s.failures = counters_->failures.load();
  s.consecutive_failures = counters_->consecutive.load();
  return s;
}

asio::awaitable<void> stream_source::run() {
  const stream_options opts = options_;
  const std::shared_ptr<counters> c = counters_;
  auto ex = co_await asio::this_coro::executor;
  asio::ip::tcp::resolver resolver(ex);
  for (;;) {
    std::string cause;
    bool got_one = false;
    {
      auto sock = std::make_shared<asio::ip::tcp::socket>(ex);
      auto resolving = resolver.async_resolve(opts.host, std::to_string(opts.port),
                                              as_tuple(asio::use_awaitable));
      auto [rec, endpoints] = co_await std::move(resolving);
      if (rec) {
        cause = "resolve " + opts.host + ": " + rec.message();
      } else {
        // The connect gets one deadline for all addresses: a timer that closes the socket
        // and stops further attempts (the connect condition skips the rest).
        auto timed_out = std::make_shared<std::atomic<bool>>(false);
        asio::steady_timer deadline(ex, opts.connect_timeout);
        deadline.async_wait([sock, timed_out](const std::error_code& ec) {
          if (!ec) {
            *timed_out = true;
            std::error_code ignored;
            sock->close(ignored);
          }
        });
        auto connecting = asio::async_connect(
            *sock, endpoints, [timed_out](const std::error_code&, const auto&) { return !*timed_out; },
            as_tuple(asio::use_awaitable));
        auto [cec, ep] = co_await std::move(connecting);
        deadline.cancel();
        if (cec || *timed_out) {
          cause = "connect " + opts.host + ":" + std::to_string(opts.port) + ": " +
                  (*timed_out ? std::string("timed out") : cec.message());
        } else {
          c->connects.fetch_add(1);
          std::string buffer;
          for (;;) {
            auto reading = asio::async_read_until(*sock, asio::dynamic_buffer(buffer, opts.max_frame),
                                                  opts.delimiter, as_tuple(asio::use_awaitable));
            auto [ec, n] = co_await std::move(reading);
            if (ec) {
              cause = ec == asio::error::not_found ? "a frame longer than max_frame"
                                                   : "connection ended: " + ec.message();
              break;
            }
            std::string frame = buffer.substr(0, n - 1);
            buffer.erase(0, n);
            got_one = true;
            c->consecutive.store(0);
            c->messages.fetch_add(1);
            auto op = emit(message, std::move(frame), system_clock::now());
            co_await std::move(op);
            if (opts.max_messages && c->messages.load() >= *opts.max_messages) co_return;
          }
        }
      }
    }
    asio::cancellation_state cs = co_await asio::this_coro::cancellation_state;
    if (is_cancelled(cs)) throw std::system_error(asio::error::operation_aborted);
    if (!got_one) {
      c->failures.fetch_add(1);
      const std::size_t n = c->consecutive.fetch_add(1) + 1;
      if (n >= opts.max_failures) {
        throw ferry::error(make_error_code(errc::connection_failed),
                           "stream_source '" + name() + "': " + std::to_string(n) +
                               " consecutive connection failures; last: " + cause);
      }
    }
    asio::steady_timer pause(ex, opts.reconnect_delay);
    auto wait = pause.async_wait(asio::use_awaitable);
    co_await std::move(wait);
  }
}

// --- csv_output ------------------------------------------------------------------------------
namespace detail {

struct csv_file::impl {
  std::mutex mu;
  std::FILE* file = nullptr;
  std::size_t rows = 0;
  ~impl() {
    if (file) std::fclose(file);
  }
};

namespace {
[[noreturn]] void csv_fail(const std::string& path, const char* what, int err) {
  throw ferry::error(std::error_code(err, std::generic_category()),
                     std::string("csv_output: cannot ") + what + " '" + path + "'");
}

// RFC 4180 quoting: a field holding the delimiter, a quote or a line break is quoted.
std::string join_row(const std::vector<std::string>& fields, char delimiter) {
  std::string line;
  for (std::size_t i = 0; i < fields.size(); ++i) {
    if (i) line += delimiter;
    const std::string& f = fields[i];
    if (f.find_first_of(std::string{delimiter, '"', '\n', '\r'}) == std::string::npos) {
      line += f;
      continue;
    }
    line += '"';
    for (char ch : f) {
      if (ch == '"') line += '"';
      line += ch;
    }
    line += '"';
  }
  line += '\n';
  return line;
}
}  // namespace

csv_file::csv_file(csv_options options, std::size_t columns)
    : options_(std::move(options)), impl_(std::make_unique<impl>()) {
  if (options_.path.empty()) {
    throw ferry::error(ferry::errc::invalid_argument, "csv_output: the path must not be empty");
  }
  if (!options_.header.empty() && options_.header.size() != columns) {
    throw ferry::error(ferry::errc::invalid_argument,
                       "csv_output '" + options_.path + "': the header has " +
                           std::to_string(options_.header.size()) + " names for " +
                           std::to_string(columns) + " columns");
  }
  if (options_.delimiter == '"' || options_.delimiter == '\n' || options_.delimiter == '\r') {
    throw ferry::error(ferry::errc::invalid_argument, "csv_output: the delimiter cannot be a quote or a line break");
  }
  impl_->file = std::fopen(options_.path.c_str(), "a");
  if (!impl_->file) csv_fail(options_.path, "open for appending", errno);
  std::fseek(impl_->file, 0, SEEK_END);
  if (std::ftell(impl_->file) == 0 && !options_.header.empty()) {
    const std::string line = join_row(options_.header, options_.delimiter);
    if (std::fwrite(line.data(), 1, line.size(), impl_->file) != line.size() || std::fflush(impl_->file) != 0) {
      csv_fail(options_.path, "write the header to", errno);
    }
  }
}

csv_file::~csv_file() = default;

void csv_file::append_row(const std::vector<std::string>& fields) {
  const std::string line = join_row(fields, options_.delimiter);
  std::lock_guard lock(impl_->mu);
  if (std::fwrite(line.data(), 1, line.size(), impl_->file) != line.size() || std::fflush(impl_->file) != 0) {
    csv_fail(options_.path, "append to", errno);
  }
  ++impl_->rows;
}

std::size_t csv_file::rows() const {
  std::lock_guard lock(impl_->mu);
  return impl_->rows;
}

std::string csv_field(system_clock::time_point t) {
  const auto ms = std::chrono::duration_cast<milliseconds>(t.time_since_epoch()).count();
  long long secs = ms / 1000;
  long long rem = ms % 1000;
  if (rem < 0) {
    rem += 1000;
    secs -= 1;
  }
  const std::time_t tt = static_cast<std::time_t>(secs);
  std::tm tm{};
  ::gmtime_r(&tt, &tm);
  char buf[96];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03lldZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, rem);
  return buf;
}

std::string csv_field(std::string_view s) { return std::string(s); }

std::string csv_field(double v) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, end);
}

std::string csv_field(long long v) { return std::to_string(v); }
std::string csv_field(unsigned long long v) { return std::to_string(v); }

}  // namespace detail
}  // namespace ferry::flow
