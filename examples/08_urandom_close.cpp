// aiomisc's "use async context managers when your generator is infinite" example: an
// endless /dev/urandom reader with a two-chunk buffer (max_size = 2) is read for ten chunks
// and then stopped, once with `co_await gen.close()` and once with the scoped form
// `co_await ferry::closing(gen(), body)` (the seed's `async with`). Either way close
// completes only after the producer has returned and its destructors ran on its own thread:
// "reader closed" is printed before "close() returned". Last, the seed's unbounded
// threaded_iterable_separate reader goes through a file line by line on a thread of its own.
#include <ferry/ferry.hpp>

#include <asio/awaitable.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <pthread.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

using namespace std::chrono_literals;

namespace {

using chunk = std::array<char, 8>;
std::thread::id loop_thread;

const char* where() {
  return std::this_thread::get_id() == loop_thread ? "the loop thread" : "the producer's thread";
}

// The producer's cleanup: shows when and where it runs.
struct reader_closed {
  ~reader_closed() { std::printf("  reader closed (on %s)\n", where()); }
};

// Endless: stops only when out() says the consumer has gone.
auto urandom_reader = ferry::threaded_iterable(
    [](ferry::sink<chunk>& out) {
      std::ifstream in("/dev/urandom", std::ios::binary);
      reader_closed cleanup;
      for (chunk c; in.read(c.data(), 8);) {
        if (!out(c)) return;
      }
    },
    {.max_size = 2});

// Unbounded (max_size = 0), on a thread of its own named "line-reader".
auto blocking_reader = ferry::threaded_iterable_separate(
    [](ferry::sink<std::string>& out, std::string path) {
      char name[16] = {};
      pthread_getname_np(pthread_self(), name, sizeof name);
      std::printf("  producer runs on thread \"%s\"\n", name);
      std::ifstream in(path);
      for (std::string line; std::getline(in, line);) {
        if (!out(std::move(line))) return;
      }
    },
    {.max_size = 0, .name = "line-reader"});

std::string hex(const chunk& c) {
  std::string s;
  for (const char byte : c) {
    s += "0123456789abcdef"[static_cast<unsigned char>(byte) >> 4];
    s += "0123456789abcdef"[static_cast<unsigned char>(byte) & 0xf];
  }
  return s;
}

}  // namespace

int main() {
  loop_thread = std::this_thread::get_id();
  ferry::entrypoint ep{{.pool_size = 2}};
  ep.run([]() -> asio::awaitable<void> {
    std::printf("1. ten chunks, then co_await gen.close():\n");
    auto gen = urandom_reader();
    int counter = 0;
    while (auto c = co_await gen.next()) {
      std::printf("  %2d: %s\n", ++counter, hex(*c).c_str());
      if (counter == 10) break;
    }
    // Meanwhile the producer fills the two-chunk buffer and blocks: it is never more than
    // max_size chunks ahead.
    asio::steady_timer pause(co_await asio::this_coro::executor, 50ms);
    co_await pause.async_wait(asio::use_awaitable);
    const ferry::iterator_stats st = gen.stats();
    std::printf("  produced %llu, consumed %llu; closing\n",
                static_cast<unsigned long long>(st.produced),
                static_cast<unsigned long long>(st.consumed));
    co_await gen.close();  // releases the producer blocked on the full channel
    std::printf("  close() returned\n");

    std::printf("2. the scoped form, co_await ferry::closing(urandom_reader(), body):\n");
    co_await ferry::closing(urandom_reader(), [](auto& it) -> asio::awaitable<void> {
      int taken = 0;
      while (auto c = co_await it.next()) {
        if (++taken == 10) break;
      }
      std::printf("  body took %d chunks and breaks out\n", taken);
    });
    std::printf("  closing() returned\n");

    const char* path = std::filesystem::exists(__FILE__) ? __FILE__ : "/etc/passwd";
    std::printf("3. threaded_iterable_separate reading %s line by line:\n", path);
    auto lines = blocking_reader(path);
    std::size_t n = 0;
    std::string first;
    while (auto line = co_await lines.next()) {
      if (n++ == 0) first = *line;
    }
    std::printf("  %zu lines, the first: %s\n", n, first.c_str());
  });
}
