// The contextvars example of aiomisc's "working with threads", in C++: five tasks each set
// their own user id in a task-local context_var and write it from a pool thread into an
// audit log; the worker sees the caller's value because every threaded call carries a
// snapshot of the caller's context. (The streaming reader half comes with the threaded
// iterators; here the log is read back with one threaded call.)
#include <ferry/ferry.hpp>

#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

ferry::context_var<std::uint32_t> user_id{"user_id"};
constexpr const char* log_path = "/tmp/ferry-audit.bin";

// Blocking: appends one big-endian 32-bit record.
auto write_user = ferry::threaded([] {
  const std::uint32_t id = user_id.get();  // the caller's value, on a worker thread
  const unsigned char record[4] = {static_cast<unsigned char>(id >> 24),
                                   static_cast<unsigned char>(id >> 16),
                                   static_cast<unsigned char>(id >> 8),
                                   static_cast<unsigned char>(id)};
  std::FILE* f = std::fopen(log_path, "ab");
  if (!f) throw std::runtime_error("cannot open the audit log");
  std::fwrite(record, 1, sizeof record, f);
  std::fclose(f);
});

auto read_log = ferry::threaded([] {
  std::vector<std::uint32_t> ids;
  std::FILE* f = std::fopen(log_path, "rb");
  if (!f) return ids;
  unsigned char r[4];
  while (std::fread(r, 1, sizeof r, f) == sizeof r) {
    ids.push_back(std::uint32_t{r[0]} << 24 | std::uint32_t{r[1]} << 16 |
                  std::uint32_t{r[2]} << 8 | std::uint32_t{r[3]});
  }
  std::fclose(f);
  return ids;
});

asio::awaitable<void> write_one(std::uint32_t id) {
  user_id.set(id);  // this task's own copy of the context
  co_await write_user();
}

}  // namespace

int main() {
  std::remove(log_path);
  ferry::entrypoint ep{{.pool_size = 4}};
  ep.run([]() -> asio::awaitable<void> {
    std::mt19937 rng(std::random_device{}());
    std::uniform_int_distribution<std::uint32_t> dist(1, 65535);
    auto ex = co_await asio::this_coro::executor;
    // Five concurrent writers, each with its own user id; wait for all of them.
    int remaining = 5;
    asio::steady_timer all_done(ex, asio::steady_timer::time_point::max());
    for (int i = 0; i < 5; ++i) {
      const std::uint32_t id = dist(rng);
      std::printf("task %d sets user_id = %u\n", i, id);
      ferry::co_spawn(ex, write_one(id), [&](std::exception_ptr e) {
        if (e) std::rethrow_exception(e);
        if (--remaining == 0) all_done.cancel();
      });
    }
    try {
      co_await all_done.async_wait(asio::use_awaitable);
    } catch (const std::system_error&) {
    }
    std::printf("audit log read back (written from pool threads, order of completion):\n");
    for (std::uint32_t id : co_await read_log()) std::printf("  %u\n", id);
  });
}
