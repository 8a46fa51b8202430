// aiomisc.IteratorWrapperSeparate as ferry::iterator_wrapper_separate(fn, max_size): example
// 09 without a pool. The endless /dev/urandom reader runs on a thread of its own, named
// after the call site ("file:line", cut to Linux's 15 characters): the right home for an
// infinite producer, which would otherwise hold a pool worker for as long as it runs. A hundred 1024-byte chunks are hashed inside the
// scoped form, which stops the producer and waits for it; the loop's registry joins the
// thread at shutdown. FNV-1a 64 stands in for the seed's MD5, as in 09.
#include <ferry/ferry.hpp>

#include <asio/awaitable.hpp>

#include <pthread.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <vector>

namespace {

// The seed's generator; returns once the consumer has gone.
void urandom_reader(ferry::sink<std::vector<char>>& out) {
  char name[16] = {};
  pthread_getname_np(pthread_self(), name, sizeof name);
  std::printf("producer runs on thread \"%s\"\n", name);
  std::ifstream in("/dev/urandom", std::ios::binary);
  for (;;) {
    std::vector<char> chunk(1024);
    if (!in.read(chunk.data(), 1024) || !out(std::move(chunk))) break;
  }
  std::printf("producer returns: the consumer has gone\n");
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
    fnv1a64 hash;
    co_await ferry::closing(ferry::iterator_wrapper_separate(urandom_reader, /*max_size=*/2),
                            [&](auto& gen) -> asio::awaitable<void> {
                              int counter = 0;
                              while (auto item = co_await gen.next()) {
                                hash.update(*item);
                                if (++counter >= 100) break;
                              }
                              std::printf("%d chunks hashed\n", counter);
                            });
    std::printf("closed\nfnv1a64 = %016llx\n", static_cast<unsigned long long>(hash.value));
  });
}
