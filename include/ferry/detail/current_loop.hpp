// ferry/detail/current_loop.hpp — "which loop called into this thread": set by every hop
// that runs user code on a thread on behalf of a loop (threaded, threaded_separate, a
// threaded generator), read by ferry::sync_await. A thread-local of the "what is running
// here now" kind (DESIGN principle 5).
#pragma once

#include <asio/any_io_executor.hpp>

namespace ferry::detail {

struct loop_ref {
  const void* executor = nullptr;  // owned by the running hop, valid while it runs
  asio::any_io_executor (*make)(const void*) = nullptr;
  explicit operator bool() const noexcept { return make != nullptr; }
  asio::any_io_executor get() const { return make(executor); }
};

template <class Executor>
loop_ref make_loop_ref(const Executor& ex) noexcept {
  return {&ex, [](const void* p) {
            return asio::any_io_executor(*static_cast<const Executor*>(p));
          }};
}

loop_ref current_loop() noexcept;

class loop_scope {
public:
  explicit loop_scope(loop_ref loop) noexcept;
  ~loop_scope();
  loop_scope(const loop_scope&) = delete;
  loop_scope& operator=(const loop_scope&) = delete;

private:
  loop_ref previous_;
};

}  // namespace ferry::detail
