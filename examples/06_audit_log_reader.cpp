// The reader half of aiomisc's contextvars example (02 is the writer half): the seed's
// `read_log` is a blocking generator consumed with `async for data in read_log()`. Here it is
// a ferry::threaded_iterable producer that reads /tmp/ferry-audit.bin record by record on a
// pool worker and hands each user id to the coroutine through a bounded channel. Run
// example_02 first to write the log; if it is missing, this example writes five records
// the same way 02 does (context_var + threaded write) so that it also runs on its own.
#include <ferry/ferry.hpp>

#include <asio/awaitable.hpp>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>

namespace {

ferry::context_var<std::uint32_t> user_id{"user_id"};
constexpr const char* log_path = "/tmp/ferry-audit.bin";

// As in 02: appends the caller's user id as one big-endian 32-bit record.
auto write_user = ferry::threaded([] {
  const std::uint32_t id = user_id.get();
  const char record[4] = {static_cast<char>(id >> 24), static_cast<char>(id >> 16),
                          static_cast<char>(id >> 8), static_cast<char>(id)};
  std::ofstream(log_path, std::ios::binary | std::ios::app).write(record, sizeof record);
});

// The seed's generator: one item per record, read lazily on a pool worker. out() blocks
// while the channel is full (64 items by default) and returns false once the consumer has
// gone.
auto read_log = ferry::threaded_iterable(
    [](ferry::sink<std::uint32_t>& out) {
      std::ifstream in(log_path, std::ios::binary);
      if (!in) throw std::runtime_error("cannot open the audit log");
      char r[4];
      while (in.read(r, sizeof r)) {
        const auto b = [&](int i) { return std::uint32_t{static_cast<unsigned char>(r[i])}; };
        if (!out(b(0) << 24 | b(1) << 16 | b(2) << 8 | b(3))) return;
      }
    });

}  // namespace

int main() {
  ferry::entrypoint ep{{.pool_size = 2}};
  return ep.run([]() -> asio::awaitable<int> {
    if (!std::filesystem::exists(log_path)) {
      std::printf("%s not found (example_02 writes it); writing five records as 02 does\n",
                  log_path);
      std::mt19937 rng(std::random_device{}());
      std::uniform_int_distribution<std::uint32_t> dist(1, 65535);
      for (int i = 0; i < 5; ++i) {
        user_id.set(dist(rng));  // the threaded call carries this value to the worker
        co_await write_user();
      }
    }
    std::printf("user ids streamed from %s:\n", log_path);
    auto it = read_log();  // lazy: the producer starts on the first next()
    std::size_t count = 0;
    while (auto id = co_await it.next()) {
      std::printf("  %u\n", *id);
      ++count;
    }
    co_await it.close();  // already finished; close() just confirms the producer is done
    std::printf("%zu records\n", count);
    co_return 0;
  });
}
