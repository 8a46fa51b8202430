// DFFML's URLToURLBytes (operation implementations, "context management"): the
// implementation opens an HTTP client session in enter() — the seed's __aenter__ — and
// closes it in exit(), and every run fetches its URL through that one session, returning
// {url, body}. The per-run object made by scope() is the seed's URLToURLBytesContext.
//
// The client is a small blocking HTTP/1.1 client written on Asio below (blocking connect,
// write and read; keep-alive, so the session reuses one connection; bodies framed by
// Content-Length). The per-run operator() is a plain function, so the orchestrator runs it
// on a pool worker, never on the loop. The example serves its own pages from 127.0.0.1
// (ephemeral port) with Asio coroutines on the loop, runs the flow over several URLs (one
// run context each) with two orchestrators, and counts the connections the server saw:
// one per orchestrator (per session), not one per run.
#include <ferry/ferry.hpp>
#include <ferry/flow/context.hpp>
#include <ferry/flow/orchestrator.hpp>

#include <asio/connect.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read.hpp>
#include <asio/read_until.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

using asio::ip::tcp;
using namespace std::chrono_literals;
namespace fl = ferry::flow;

namespace {

// --- a small blocking HTTP/1.1 client ---------------------------------------------------

struct parsed_url {
  std::string host;
  std::string port;
  std::string target;  // path and query, "/" at least
};

parsed_url parse_url(const std::string& url) {
  constexpr std::string_view scheme = "http://";
  if (url.compare(0, scheme.size(), scheme) != 0) {
    throw std::invalid_argument("only http:// URLs are supported: '" + url + "'");
  }
  const std::string rest = url.substr(scheme.size());
  const std::size_t slash = rest.find('/');
  const std::string authority = rest.substr(0, slash);
  parsed_url u;
  u.target = slash == std::string::npos ? "/" : rest.substr(slash);
  const std::size_t colon = authority.rfind(':');
  u.host = authority.substr(0, colon);
  u.port = colon == std::string::npos ? "80" : authority.substr(colon + 1);
  if (u.host.empty()) throw std::invalid_argument("no host in '" + url + "'");
  return u;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return std::string(s);
}

// A client session: one kept-alive connection, reused by every request, one request at a
// time (a connection pool of size one). Blocking: call get() from a worker thread, never
// from the loop. Thread-safe.
class http_session {
public:
  explicit http_session(std::string user_agent) : user_agent_(std::move(user_agent)) {}

  // GET `url`; the response's body (whatever its status, as aiohttp's resp.read()).
  std::string get(const std::string& url) {
    const parsed_url u = parse_url(url);
    std::lock_guard lock(mutex_);
    if (closed_) throw std::logic_error("http_session: get() after close()");
    for (int attempt = 1;; ++attempt) {
      const bool reused = connect_to(u);
      try {
        std::string body = round_trip(u);
        ++requests_;
        return body;
      } catch (const std::system_error&) {
        drop();
        // A kept-alive connection the server had closed meanwhile: reconnect once (GET is
        // idempotent). A fresh connection failing is a real error.
        if (!reused || attempt > 1) throw;
      }
    }
  }

  // Closes the connection (the server sees end of stream); later get()s throw.
  void close() {
    std::lock_guard lock(mutex_);
    drop();
    closed_ = true;
  }

  int connections() const {
    std::lock_guard lock(mutex_);
    return connections_;
  }
  int requests() const {
    std::lock_guard lock(mutex_);
    return requests_;
  }

private:
  // Connected to u's host and port afterwards; true when the connection was already open.
  bool connect_to(const parsed_url& u) {
    if (socket_.is_open() && u.host == host_ && u.port == port_) return true;
    drop();
    tcp::resolver resolver(io_);
    const auto endpoints = resolver.resolve(u.host, u.port);
    asio::connect(socket_, endpoints);
    socket_.set_option(tcp::no_delay(true));
    host_ = u.host;
    port_ = u.port;
    ++connections_;
    return false;
  }

  std::string round_trip(const parsed_url& u) {
    const std::string request = "GET " + u.target + " HTTP/1.1\r\nHost: " + u.host + ":" + u.port +
                                "\r\nUser-Agent: " + user_agent_ +
                                "\r\nConnection: keep-alive\r\n\r\n";
    asio::write(socket_, asio::buffer(request));

    const std::size_t head_size = asio::read_until(socket_, asio::dynamic_buffer(buffer_), "\r\n\r\n");
    const std::string head = buffer_.substr(0, head_size);
    buffer_.erase(0, head_size);

    std::optional<std::size_t> length;
    bool server_closes = false;
    std::size_t pos = head.find("\r\n");  // skip the status line ("HTTP/1.1 200 OK")
    if (head.compare(0, 5, "HTTP/") != 0) throw std::runtime_error("not an HTTP response");
    while (pos != std::string::npos && pos + 2 < head.size()) {
      const std::size_t start = pos + 2;
      const std::size_t end = head.find("\r\n", start);
      const std::string line = head.substr(start, end - start);
      pos = end;
      const std::size_t colon = line.find(':');
      if (colon == std::string::npos) continue;
      const std::string name = lower(line.substr(0, colon));
      const std::string value = trim(std::string_view(line).substr(colon + 1));
      if (name == "content-length") {
        std::size_t n = 0;
        const auto [ptr, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
        if (ec != std::errc() || ptr != value.data() + value.size()) {
          throw std::runtime_error("bad Content-Length '" + value + "'");
        }
        length = n;
      } else if (name == "connection") {
        server_closes = lower(value) == "close";
      }
    }
    if (!length) throw std::runtime_error("response without Content-Length (unsupported)");

    if (buffer_.size() < *length) {
      asio::read(socket_, asio::dynamic_buffer(buffer_), asio::transfer_exactly(*length - buffer_.size()));
    }
    std::string body = buffer_.substr(0, *length);
    buffer_.erase(0, *length);
    if (server_closes) drop();
    return body;
  }

  void drop() {
    if (socket_.is_open()) {
      std::error_code ignored;
      socket_.shutdown(tcp::socket::shutdown_both, ignored);
      socket_.close(ignored);
    }
    buffer_.clear();
  }

  const std::string user_agent_;
  mutable std::mutex mutex_;
  asio::io_context io_;  // only for the blocking socket: never run
  tcp::socket socket_{io_};
  std::string host_, port_;
  std::string buffer_;  // bytes read past the current response
  int connections_ = 0;
  int requests_ = 0;
  bool closed_ = false;
};

// --- the operation ----------------------------------------------------------------------

// The seed's URLBytesObject.
struct url_bytes {
  std::string url{};
  std::string body{};
};

// Read by enter() from the orchestrator's scope.
struct client_config {
  std::string user_agent{};
};

// The seed's URLToURLBytes: one per orchestrator (per operation instance).
class url_to_url_bytes {
public:
  // The seed's __aenter__: runs on the loop, once, before the first run.
  void enter(fl::context& scope) {
    auto config = scope.get<client_config>();  // settings from the orchestrator's scope
    const std::string user_agent = config ? config->user_agent : "ferry-example";
    session_ = std::make_shared<http_session>(user_agent);
    std::printf("  [url_to_url_bytes] enter: session opened (User-Agent %s)\n", user_agent.c_str());
  }

  // The seed's __aexit__: when the orchestrator closes.
  void exit(std::exception_ptr) {
    session_->close();
    std::printf("  [url_to_url_bytes] exit: session closed after %d request(s) on %d connection(s)\n",
                session_->requests(), session_->connections());
    session_.reset();
  }

  // The seed's URLToURLBytesContext: made for each run, destroyed when the run ends.
  struct run_context {
    std::shared_ptr<http_session> session;
    // Plain (not a coroutine): the orchestrator runs it on a pool worker.
    url_bytes operator()(const std::string& url) const { return {url, session->get(url)}; }
  };
  run_context scope(const fl::run_info&) const { return {session_}; }

private:
  std::shared_ptr<http_session> session_;
};

struct fetch_flow {
  fl::definition<std::string> url{"URL"};
  fl::definition<url_bytes> download{"download"};
  fl::operation url_to_urlbytes =
      fl::make_operation("url_to_urlbytes").inputs(url).outputs(download).implement<url_to_url_bytes>();
  fl::output<url_bytes> result = fl::get_single(download);
  fl::dataflow flow{{url_to_urlbytes}, {result}, {.seeds = {url}}};
};

// The seed's __repr__: URLBytesObject(URL=..., body=b'first ten '...).
std::string repr(const url_bytes& u) {
  std::string shown;
  for (char c : u.body.substr(0, 10)) shown += c == '\n' ? std::string("\\n") : std::string(1, c);
  return "url_bytes(url=" + u.url + ", body=b'" + shown + "'..., " + std::to_string(u.body.size()) +
         " bytes)";
}

// --- the test server --------------------------------------------------------------------

struct server_stats {
  int connections = 0;
  int closed = 0;
  int requests = 0;
};

std::string page(const std::string& path) {
  if (path == "/hello") return "hello, world\n";
  if (path == "/seed") return "url_to_urlbytes: one aiohttp ClientSession per implementation\n";
  if (path == "/numbers") {
    std::string s;
    for (int i = 1; i <= 100; ++i) s += std::to_string(i) + (i < 100 ? " " : "\n");
    return s;
  }
  if (path == "/big") {  // several reads' worth: the client reads exactly Content-Length bytes
    std::string s(200'000, ' ');
    for (std::size_t i = 0; i < s.size(); ++i) s[i] = static_cast<char>('a' + i % 26);
    return s;
  }
  return "no page at " + path + "\n";
}

asio::awaitable<void> serve_connection(tcp::socket socket, std::shared_ptr<server_stats> stats, int id) {
  std::string buffer;
  int served = 0;
  for (;;) {
    auto read_op = asio::async_read_until(socket, asio::dynamic_buffer(buffer), "\r\n\r\n",
                                          asio::experimental::as_tuple(asio::use_awaitable));
    auto [ec, head_size] = co_await std::move(read_op);
    if (ec) break;  // end of stream: the client closed its session
    const std::string head = buffer.substr(0, head_size);
    buffer.erase(0, head_size);
    // "GET /path HTTP/1.1"
    const std::size_t sp1 = head.find(' ');
    const std::size_t sp2 = head.find(' ', sp1 + 1);
    const std::string path = head.substr(sp1 + 1, sp2 - sp1 - 1);
    const bool found = path == "/hello" || path == "/seed" || path == "/numbers" || path == "/big";
    const std::string body = page(path);
    const std::string response = std::string(found ? "HTTP/1.1 200 OK" : "HTTP/1.1 404 Not Found") +
                                 "\r\nContent-Type: text/plain\r\nContent-Length: " +
                                 std::to_string(body.size()) + "\r\nConnection: keep-alive\r\n\r\n" + body;
    auto write_op = asio::async_write(socket, asio::buffer(response), asio::use_awaitable);
    co_await std::move(write_op);
    ++served;
    ++stats->requests;
  }
  ++stats->closed;
  std::printf("  [server] connection #%d ended by the client after %d request(s)\n", id, served);
}

asio::awaitable<void> serve(tcp::acceptor& acceptor, fl::context& scope, std::shared_ptr<server_stats> stats) {
  for (;;) {
    auto accept_op = acceptor.async_accept(asio::use_awaitable);
    tcp::socket socket = co_await std::move(accept_op);
    const int id = ++stats->connections;
    std::printf("  [server] connection #%d accepted\n", id);
    scope.spawn(serve_connection(std::move(socket), stats, id));
  }
}

// Waits (bounded) until the server has seen every connection end.
asio::awaitable<void> server_settles(const server_stats& stats) {
  asio::steady_timer timer(co_await asio::this_coro::executor);
  for (int i = 0; i < 1000 && stats.closed < stats.connections; ++i) {
    timer.expires_after(1ms);
    auto wait_op = timer.async_wait(asio::use_awaitable);
    co_await std::move(wait_op);
  }
}

void print_results(std::vector<fl::context_result>& done, const fetch_flow& f) {
  std::sort(done.begin(), done.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  for (const auto& r : done) {
    if (r.ok()) {
      std::printf("  %-8s %s\n", r.name.c_str(), repr(r[f.result]).c_str());
    } else {
      try {
        r.rethrow_if_failed();
      } catch (const std::exception& e) {
        std::printf("  %-8s failed: %s\n", r.name.c_str(), e.what());
      }
    }
  }
}

}  // namespace

int main() {
  ferry::entrypoint ep{{.pool_size = 2}};
  auto main_task = [&]() -> asio::awaitable<int> {
    fetch_flow f;
    fl::context scope{ep.get_executor()};
    scope.add_resource(client_config{"ferry-flow-example/0.1"});

    tcp::acceptor acceptor(ep.get_executor(), {asio::ip::make_address("127.0.0.1"), 0});
    auto stats = std::make_shared<server_stats>();
    scope.spawn(serve(acceptor, scope, stats));
    const std::string base = "http://127.0.0.1:" + std::to_string(acceptor.local_endpoint().port());
    std::printf("server on %s\n", base.c_str());
    auto url_set = [&](std::string name, const std::string& path) {
      return fl::input_set{std::move(name), {fl::seed(f.url, base + path)}};
    };

    std::printf("orchestrator A, first run (4 contexts at once):\n");
    fl::orchestrator a{scope};
    auto run_a1 = a.run(f.flow, url_set("a1", "/hello"), url_set("a2", "/numbers"), url_set("a3", "/big"),
                        url_set("a4", "/seed"));
    std::vector<fl::context_result> done = co_await std::move(run_a1);
    print_results(done, f);

    std::printf("orchestrator A, second run (same session):\n");
    auto run_a2 = a.run(f.flow, url_set("a5", "/hello"), url_set("a6", "/missing"));
    done = co_await std::move(run_a2);
    print_results(done, f);
    std::printf("closing orchestrator A:\n");
    auto close_a = a.close();
    co_await std::move(close_a);
    auto settle_a = server_settles(*stats);
    co_await std::move(settle_a);
    const int after_a = stats->connections;

    std::printf("orchestrator B (a new orchestrator enters its own session):\n");
    fl::orchestrator b{scope};
    auto run_b = b.run(f.flow, url_set("b1", "/seed"), url_set("b2", "/numbers"));
    done = co_await std::move(run_b);
    print_results(done, f);
    std::printf("closing orchestrator B:\n");
    auto close_b = b.close();
    co_await std::move(close_b);
    auto settle_b = server_settles(*stats);
    co_await std::move(settle_b);

    std::printf("server saw %d connection(s) for %d request(s): %d for orchestrator A's 6 runs, %d for B's 2\n",
                stats->connections, stats->requests, after_a, stats->connections - after_a);
    auto close_scope = scope.close();  // cancels the accept loop
    co_await std::move(close_scope);
    co_return stats->connections == 2 && stats->requests == 8 ? 0 : 1;
  };
  return ep.run(main_task);
}
