// Asphalt's "add a resource and a teardown callback that stops it": a component starts a
// service, publishes it in the context, and registers service.stop as a teardown callback.
// Closing the context runs the callbacks newest first, one at a time.
#include <ferry/ferry.hpp>
#include <ferry/flow/context.hpp>

#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

using namespace std::chrono_literals;

namespace {

class some_service {
public:
  explicit some_service(std::string name) : name_(std::move(name)) {}
  asio::awaitable<void> start() {
    asio::steady_timer t(co_await asio::this_coro::executor, 10ms);  // pretend to connect
    co_await t.async_wait(asio::use_awaitable);
    std::printf("  %s started\n", name_.c_str());
  }
  asio::awaitable<void> stop() {  // a coroutine teardown: awaited before the next callback
    asio::steady_timer t(co_await asio::this_coro::executor, 10ms);
    co_await t.async_wait(asio::use_awaitable);
    std::printf("  %s stopped\n", name_.c_str());
  }
  std::string greet() const { return "hello from " + name_; }

private:
  std::string name_;
};

// The component: start the service, schedule its stop, publish it.
asio::awaitable<void> start_component(ferry::flow::context& ctx, std::string name) {
  auto service = std::make_shared<some_service>(name);
  co_await service->start();
  ctx.add_teardown_callback([service] { return service->stop(); });
  ctx.add_resource(service, name);
}

}  // namespace

int main() {
  ferry::entrypoint ep;
  return ep.run([&]() -> asio::awaitable<int> {
    ferry::flow::context root{ep.get_executor()};
    co_await start_component(root, "database");
    co_await start_component(root, "cache");  // uses nothing yet; stopped first
    std::printf("%s\n", root.require<some_service>("database")->greet().c_str());
    std::printf("closing the context\n");
    co_await root.close();  // cache stops, then database
    co_return 0;
  });
}
