// Proves the installed package works: headers found (the base layer and the opt-in flow
// headers), library linked, pool runs work, a step flow, a pipeline and a processor run.
#include <ferry/ferry.hpp>
#include <ferry/flow/bundle.hpp>
#include <ferry/flow/pipeline.hpp>
#include <ferry/flow/processor.hpp>
#include <ferry/flow/supervisor.hpp>

#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/use_future.hpp>

#include <cstdio>
#include <exception>
#include <vector>

namespace fl = ferry::flow;

namespace {
struct numbers : fl::processor {
  using fl::processor::processor;
  fl::event<int> value{*this, "value"};
};
}  // namespace

int main() {
  ferry::thread_pool pool{2};
  auto answer = pool.submit([] { return 6 * 7; }, asio::use_future);
  const int v = answer.get();
  std::printf("ferry consumer: pool of %zu answered %d\n", pool.size(), v);

  const fl::key<int> a{"a"}, b{"b"};
  fl::bundle twice{fl::step("twice", fl::needs(a), fl::gives(b), [](int x) { return 2 * x; }).on(pool)};
  auto p = fl::make_pipeline(fl::parallel([](int x) { return x + 1; }));
  asio::io_context io;
  int flow_result = 0;
  std::vector<int> piped;
  fl::queued_handler handler{io};
  numbers src{handler, "src"};
  int received = 0;
  fl::on(src.value, [&](int x) { received += x; });
  std::exception_ptr failure;
  auto body = [&]() -> asio::awaitable<void> {
    auto call = twice(fl::bag{a(21)});
    fl::bag out = co_await std::move(call);
    flow_result = out.at(b);
    auto run = p.collect(pool, std::vector<int>{1, 2, 3});
    piped = co_await std::move(run);
    for (int i = 1; i <= 3; ++i) {
      auto op = fl::emit(src.value, i);
      co_await std::move(op);
    }
    auto drained = handler.drain();
    co_await std::move(drained);
  };
  asio::co_spawn(io, body(), [&](std::exception_ptr e) { failure = e; });
  io.run();
  if (failure) std::rethrow_exception(failure);
  std::printf("ferry consumer: flow gave %d, pipeline gave %zu items, processor received %d\n",
              flow_result, piped.size(), received);
  return v == 42 && flow_result == 42 && piped == std::vector<int>{2, 3, 4} && received == 6 ? 0 : 1;
}
