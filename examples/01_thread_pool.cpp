// ferry::thread_pool as an Asio execution context (the twin of aiomisc's fast
// ThreadPoolExecutor): post, submit with any completion token, coroutines on the pool,
// bulk submission, statistics, and the orderly stop that never loses a waiter.
#include <ferry/thread_pool.hpp>

#include <asio/awaitable.hpp>
#include <asio/co_spawn.hpp>
#include <asio/post.hpp>
#include <asio/use_future.hpp>

#include <atomic>
#include <cstdio>
#include <numeric>
#include <vector>

namespace {

asio::awaitable<long> sum_on_pool(ferry::thread_pool& pool, long n) {
  long sum = 0;
  for (long i = 1; i <= n; ++i) sum += i;
  std::printf("  coroutine ran on a pool worker: %s\n", pool.running_in_this_thread() ? "yes" : "no");
  co_return sum;
}

}  // namespace

int main() {
  ferry::thread_pool pool{4};
  std::printf("pool of %zu workers\n", pool.size());

  // 1. Fire and forget through Asio.
  std::atomic<int> counter{0};
  for (int i = 0; i < 1000; ++i) asio::post(pool, [&] { counter.fetch_add(1); });
  pool.wait_idle();
  std::printf("asio::post x1000 -> counter = %d\n", counter.load());

  // 2. A result (or the task's own exception) through any completion token.
  auto answer = pool.submit([] { return 6 * 7; }, asio::use_future);
  std::printf("submit(use_future) -> %d\n", answer.get());
  auto failing = pool.submit([]() -> int { throw std::runtime_error("disk on fire"); },
                             asio::use_future);
  try {
    failing.get();
  } catch (const std::exception& e) {
    std::printf("submit of a throwing task -> caught \"%s\"; the worker lives on\n", e.what());
  }

  // 3. Coroutines run on the pool like on any Asio executor.
  auto sum = asio::co_spawn(pool, sum_on_pool(pool, 1000), asio::use_future);
  std::printf("co_spawn(pool) -> sum 1..1000 = %ld\n", sum.get());

  // 4. Bulk submission: many tasks, one enqueue per 64.
  std::vector<int> squares(10000);
  pool.post_n(squares.size(), [&](std::size_t i) { squares[i] = static_cast<int>(i * i % 1000); });
  pool.wait_idle();
  std::printf("post_n x10000 -> checksum %ld\n",
              std::accumulate(squares.begin(), squares.end(), 0L));

  const auto s = pool.stats();
  std::printf("stats: submitted %llu, completed %llu, failed %llu, queued %llu, busy %zu\n",
              static_cast<unsigned long long>(s.submitted),
              static_cast<unsigned long long>(s.completed),
              static_cast<unsigned long long>(s.failed),
              static_cast<unsigned long long>(s.queued), s.busy);

  // 5. stop(): queued work never runs, and its waiters hear "pool closed".
  pool.stop();
  auto late = pool.submit([] { return 1; }, asio::use_future);
  try {
    late.get();
  } catch (const ferry::error& e) {
    std::printf("submit after stop -> ferry::error: %s\n", e.what());
  }
  return 0;
}
