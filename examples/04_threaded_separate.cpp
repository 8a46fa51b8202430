// aiomisc's @threaded_separate example: a long blocking function runs on a thread of its
// own until an event set by the loop stops it, in parallel with a pooled blocking call.
// The C++ twin of the threading.Event is a std::stop_token: ferry passes one to functions
// that take it first, and cancelling the await requests the stop.
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
  auto blocking_function = ferry::threaded([] { std::this_thread::sleep_for(200ms); });
  auto long_blocking_function = ferry::threaded_separate(
      [](std::stop_token stop) {
        while (!stop.stop_requested()) {
          std::printf("  running (on its own thread)\n");
          std::this_thread::sleep_for(100ms);
        }
        std::printf("  exiting: stop requested\n");
      },
      "long-blocking");

  ferry::entrypoint ep{{.pool_size = 2}};
  ep.run([&]() -> asio::awaitable<void> {
    asio::steady_timer event(co_await asio::this_coro::executor, 450ms);
    // The pooled call and the separate thread run in parallel; when the timer (the
    // "event") fires, || cancels the long function, which sees its stop token.
    co_await (blocking_function() && (long_blocking_function() ||
                                      event.async_wait(asio::use_awaitable)));
    std::printf("both done; the separate thread was joined by the loop's registry\n");
  });
}
