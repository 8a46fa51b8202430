// Short-lived contexts, one per unit of work: a tiny loopback server handles each
// connection in a child context of the server's context. The request sees the shared
// resources of its parent, gets its own per-request value from a factory, and its
// teardown runs when the request ends. The example starts its own listener and client.
#include <ferry/ferry.hpp>
#include <ferry/flow/context.hpp>

#include <asio/ip/tcp.hpp>
#include <asio/read_until.hpp>
#include <asio/streambuf.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>

#include <atomic>
#include <cstdio>
#include <istream>
#include <memory>
#include <string>

using asio::ip::tcp;

namespace {

struct greeting {
  std::string text;
};
struct request_id {
  int value;
};

asio::awaitable<void> handle(ferry::flow::context& request, tcp::socket socket) {
  const int id = request.require<request_id>()->value;  // generated for this request
  request.add_teardown_callback([id] { std::printf("  request %d: context closed\n", id); });
  asio::streambuf buf;
  co_await asio::async_read_until(socket, buf, '\n', asio::use_awaitable);
  std::istream in(&buf);
  std::string name;
  std::getline(in, name);
  std::string reply = request.require<greeting>()->text + ", " + name + " (request " +
                      std::to_string(id) + ")\n";
  co_await asio::async_write(socket, asio::buffer(reply), asio::use_awaitable);
}

asio::awaitable<void> serve(ferry::flow::context& server, tcp::acceptor& acceptor, int requests) {
  for (int i = 0; i < requests; ++i) {
    tcp::socket socket = co_await acceptor.async_accept(asio::use_awaitable);
    co_await ferry::flow::scoped(server, [&](ferry::flow::context& request) {
      return handle(request, std::move(socket));
    });
  }
}

asio::awaitable<std::string> ask(tcp::endpoint at, std::string name) {
  tcp::socket s(co_await asio::this_coro::executor);
  co_await s.async_connect(at, asio::use_awaitable);
  name += "\n";
  co_await asio::async_write(s, asio::buffer(name), asio::use_awaitable);
  asio::streambuf buf;
  co_await asio::async_read_until(s, buf, '\n', asio::use_awaitable);
  std::istream in(&buf);
  std::string line;
  std::getline(in, line);
  co_return line;
}

}  // namespace

int main() {
  ferry::entrypoint ep;
  return ep.run([&]() -> asio::awaitable<int> {
    ferry::flow::context server{ep.get_executor()};
    server.add_resource(greeting{"hello"});
    auto next_id = std::make_shared<std::atomic<int>>(0);
    server.add_resource_factory<request_id>(
        [next_id](ferry::flow::context&) { return request_id{++*next_id}; });

    tcp::acceptor acceptor(ep.get_executor(), {asio::ip::make_address("127.0.0.1"), 0});
    const tcp::endpoint at = acceptor.local_endpoint();
    server.spawn(serve(server, acceptor, 3));
    for (const char* name : {"ada", "grace", "edsger"}) {
      std::string reply = co_await ask(at, name);
      std::printf("client got: %s\n", reply.c_str());
    }
    std::printf("request ids generated: %d (one per request context)\n", next_id->load());
    co_await server.close();
    co_return 0;
  });
}
