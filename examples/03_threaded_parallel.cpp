// aiomisc's @threaded example: two blocking sleeps awaited together run in parallel on the
// pool (about one sleep, not two), and the same function can be called synchronously.
#include <ferry/ferry.hpp>

#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <asio/experimental/awaitable_operators.hpp>

#include <chrono>
#include <cstdio>
#include <thread>

using namespace asio::experimental::awaitable_operators;
using namespace std::chrono_literals;

int main() {
  auto blocking_function = ferry::threaded([] { std::this_thread::sleep_for(300ms); });

  ferry::entrypoint ep{{.pool_size = 4}};
  ep.run([&]() -> asio::awaitable<void> {
    const auto start = std::chrono::steady_clock::now();
    co_await (blocking_function() && blocking_function());  // in parallel
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
        std::chrono::steady_clock::now() - start);
    std::printf("two 300 ms blocking calls awaited together took %lld ms\n",
                static_cast<long long>(ms.count()));
  });

  const auto start = std::chrono::steady_clock::now();
  blocking_function.sync_call();  // no loop needed
  std::printf("sync_call ran inline in %lld ms\n",
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                         std::chrono::steady_clock::now() - start)
                                         .count()));
}
