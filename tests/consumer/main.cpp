// Proves the installed package works: headers found, library linked, pool runs work.
#include <ferry/ferry.hpp>

#include <asio/post.hpp>
#include <asio/use_future.hpp>

#include <cstdio>

int main() {
  ferry::thread_pool pool{2};
  auto answer = pool.submit([] { return 6 * 7; }, asio::use_future);
  const int v = answer.get();
  std::printf("ferry consumer: pool of %zu answered %d\n", pool.size(), v);
  return v == 42 ? 0 : 1;
}
