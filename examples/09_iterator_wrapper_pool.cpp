// aiomisc.IteratorWrapper as ferry::iterator_wrapper(fn, pool, max_size): an endless
// /dev/urandom reader runs on a dedicated one-thread pool with a two-chunk buffer. The
// coroutine hashes a hundred 1024-byte chunks inside the scoped form (the seed's
// `async with wrapper as gen`), which closes the producer; then the pool is stopped.
// The seed hashes with MD5; to stay short this uses FNV-1a 64 (example 07 has an MD5).
// The hash differs on every run: the input is random.
#include <ferry/ferry.hpp>

#include <asio/awaitable.hpp>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <vector>

namespace {

// The seed's generator; returns once the consumer has gone.
void urandom_reader(ferry::sink<std::vector<char>>& out) {
  std::ifstream in("/dev/urandom", std::ios::binary);
  for (;;) {
    std::vector<char> chunk(1024);
    if (!in.read(chunk.data(), 1024) || !out(std::move(chunk))) return;
  }
}

// FNV-1a, 64 bits: not cryptographic, but three lines.
struct fnv1a64 {
  std::uint64_t value = 0xcbf29ce484222325;
  void update(const std::vector<char>& bytes) {
    for (const char b : bytes) value = (value ^ static_cast<unsigned char>(b)) * 0x100000001b3;
  }
};

}  // namespace

int main() {
  ferry::entrypoint ep{{.pool_size = 2}};
  ep.run([]() -> asio::awaitable<void> {
    ferry::thread_pool pool{1};  // the seed's ThreadPoolExecutor(1)
    fnv1a64 hash;
    co_await ferry::closing(
        ferry::iterator_wrapper(urandom_reader, pool, /*max_size=*/2),
        [&](auto& gen) -> asio::awaitable<void> {
          int counter = 0;
          while (auto item = co_await gen.next()) {
            hash.update(*item);
            if (++counter >= 100) break;
          }
          const ferry::thread_pool_stats s = pool.stats();
          std::printf("%d chunks hashed; pool of %zu: %zu worker held by the producer, "
                      "%zu elastic\n", counter, pool.size(), s.held, s.elastic);
        });
    std::printf("closed; held workers now %zu\n", pool.stats().held);
    pool.stop();  // the seed's pool.shutdown()
    pool.join();
    std::printf("pool stopped\nfnv1a64 = %016llx\n", static_cast<unsigned long long>(hash.value));
  });
}
