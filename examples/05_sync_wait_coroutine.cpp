// aiomisc's sync_wait_coroutine example: a function running on a pool thread calls a
// coroutine on the loop and waits for it; sync_await finds the loop by itself.
#include <ferry/ferry.hpp>

#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <chrono>
#include <cstdio>

using namespace std::chrono_literals;

namespace {

asio::awaitable<int> coro() {
  std::printf("  coroutine started on the loop\n");
  asio::steady_timer t(co_await asio::this_coro::executor, 100ms);
  co_await t.async_wait(asio::use_awaitable);
  std::printf("  coroutine done\n");
  co_return 42;
}

}  // namespace

int main() {
  ferry::entrypoint ep{{.pool_size = 2}};
  auto loop = ep.get_executor();
  auto in_thread = ferry::threaded([loop] {
    std::printf("thread started\n");
    const int a = ferry::sync_wait_coroutine(loop, coro);  // explicit loop
    const int b = ferry::sync_await(coro);                 // the loop that called us
    std::printf("thread finished: %d and %d\n", a, b);
    return a + b;
  });
  const int sum = ep.run([&]() -> asio::awaitable<int> {
    const int v = co_await in_thread();
    try {
      ferry::sync_wait_coroutine(loop, coro);  // on the loop's own thread: refused at once
    } catch (const ferry::error& e) {
      std::printf("sync_wait_coroutine on the loop's own thread: %s\n", e.what());
    }
    co_return v;
  });
  std::printf("main got %d\n", sum);
}
