// Asphalt's @context_teardown: one coroutine does the set-up, waits for the context to
// close, and then does the cleanup — start and stop of a service side by side.
#include <ferry/ferry.hpp>
#include <ferry/flow/context.hpp>

#include <cstdio>
#include <memory>
#include <string>

namespace {

struct some_service {
  std::string state = "created";
};

asio::awaitable<void> component(ferry::flow::context& ctx, ferry::flow::closing_signal closing) {
  auto service = std::make_shared<some_service>();
  service->state = "running";
  ctx.add_resource(service);
  std::printf("  set-up done: service %s\n", service->state.c_str());

  std::exception_ptr e = co_await closing.wait();  // the context is closing

  service->state = "stopped";
  std::printf("  cleanup: service %s (context closed %s)\n", service->state.c_str(),
              e ? "by an error" : "cleanly");
}

}  // namespace

int main() {
  ferry::entrypoint ep;
  return ep.run([&]() -> asio::awaitable<int> {
    ferry::flow::context root{ep.get_executor()};
    co_await ferry::flow::context_teardown(root, component);  // returns after the set-up
    std::printf("service is %s while the context is open\n",
                root.require<some_service>()->state.c_str());
    co_await root.close();
    std::printf("closed\n");
    co_return 0;
  });
}
