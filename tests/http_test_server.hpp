// A small HTTP/1.1 server on 127.0.0.1 for the processor suite: it runs on its own thread
// and io_context, answers every GET with `body()` (status 200), or with 500 while told to
// fail, and counts the requests it saw. Connection: close, one request per connection.
#pragma once

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/read_until.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace ferry_test {

class http_test_server {
public:
  explicit http_test_server(std::function<std::string()> body)
      : body_(std::move(body)), acceptor_(io_, {asio::ip::make_address("127.0.0.1"), 0}) {
    asio::co_spawn(io_, accept_loop(), asio::detached);
    thread_ = std::thread([this] { io_.run(); });
  }
  ~http_test_server() {
    io_.stop();
    thread_.join();
  }
  http_test_server(const http_test_server&) = delete;
  http_test_server& operator=(const http_test_server&) = delete;

  std::uint16_t port() const { return acceptor_.local_endpoint().port(); }
  std::string url(const std::string& path = "/quote") const {
    return "http://127.0.0.1:" + std::to_string(port()) + path;
  }
  void set_failing(bool failing) { failing_.store(failing); }
  // Request i (counting from 0) fails when script[i] is true; past the script, set_failing
  // decides. Set before the first request.
  void set_script(std::vector<bool> script) {
    std::lock_guard lock(mu_);
    script_ = std::move(script);
  }
  std::size_t requests() const { return requests_.load(); }

private:
  asio::awaitable<void> accept_loop() {
    for (;;) {
      auto op = acceptor_.async_accept(asio::use_awaitable);
      asio::ip::tcp::socket s = co_await std::move(op);
      asio::co_spawn(io_, serve(std::move(s)), asio::detached);
    }
  }

  asio::awaitable<void> serve(asio::ip::tcp::socket s) {
    std::string request;
    auto reading = asio::async_read_until(s, asio::dynamic_buffer(request), "\r\n\r\n",
                                          asio::use_awaitable);
    co_await std::move(reading);
    const std::size_t index = requests_.fetch_add(1);
    bool fail = failing_.load();
    {
      std::lock_guard lock(mu_);
      if (index < script_.size()) fail = script_[index];
    }
    std::string response;
    if (fail) {
      response = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\nfail";
    } else {
      const std::string body = body_();
      response = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " +
                 std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
    }
    auto writing = asio::async_write(s, asio::buffer(response), asio::use_awaitable);
    co_await std::move(writing);
    std::error_code ignored;
    s.shutdown(asio::ip::tcp::socket::shutdown_both, ignored);
  }

  std::function<std::string()> body_;
  asio::io_context io_;
  asio::ip::tcp::acceptor acceptor_;
  std::atomic<bool> failing_{false};
  std::mutex mu_;
  std::vector<bool> script_;
  std::atomic<std::size_t> requests_{0};
  std::thread thread_;
};

}  // namespace ferry_test
