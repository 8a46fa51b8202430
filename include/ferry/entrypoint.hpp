// ferry/entrypoint.hpp — owns a loop, its default pool and its shared context; runs a main
// coroutine and shuts everything down in order.
//
//     int main() {
//       ferry::entrypoint ep{{.pool_size = 4}};
//       return ep.run([]() -> asio::awaitable<int> {
//         co_await ferry::threaded([] { blocking_work(); })();
//         co_return 0;
//       });
//     }
//
// Rules (spec/core.md E1–E4):
//  * The entrypoint owns an io_context, a thread_pool of options.pool_size workers installed
//    as that loop's default pool, and the loop's shared_context. run(main) runs the loop
//    until main completes and returns its value or rethrows its exception (E1). main runs
//    as a ferry task (ferry::co_spawn).
//  * SIGINT/SIGTERM (unless options.handle_signals is false) and request_stop() cancel main
//    (terminal cancellation) and the tasks started with spawn() (E2).
//  * Shutdown, after main completes: cancel the spawn()ed tasks still running and run the
//    loop while they unwind; stop the pool (queued calls complete with pool_closed and are
//    delivered) and join it; wait for threaded_separate threads; clear the shared context;
//    stop and destroy the loop. The whole sequence is bounded by options.shutdown_timeout:
//    what is still running then is reported on stderr and in shutdown_report(), and left
//    detached rather than waited for (E3).
//  * options.loop_spin > 0 makes the loop poll for that long before it blocks when idle:
//    lower latency for threaded round trips at the cost of CPU while spinning; 0 (the
//    default) blocks at once and uses no CPU when idle (E4).
//
// Thread safety: request_stop() may be called from any thread; everything else from the
// thread that created the entrypoint.
#pragma once

#include <ferry/co_spawn.hpp>
#include <ferry/detail/loop_service.hpp>
#include <ferry/shared_context.hpp>
#include <ferry/thread_pool.hpp>
#include <ferry/threaded.hpp>

#include <asio/awaitable.hpp>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/io_context.hpp>

#include <chrono>
#include <exception>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace ferry {

struct entrypoint_options {
  std::size_t pool_size = thread_pool_options::default_thread_count();
  std::chrono::nanoseconds pool_spin = std::chrono::microseconds(50);
  bool handle_signals = true;
  std::chrono::nanoseconds shutdown_timeout = std::chrono::seconds(5);
  std::chrono::nanoseconds loop_spin{0};
};

// What shutdown found still running when its time ran out.
struct shutdown_report {
  std::size_t tasks_still_running = 0;
  std::vector<busy_worker> busy_workers;
  std::vector<running_thread> separate_threads;
  bool clean() const noexcept {
    return tasks_still_running == 0 && busy_workers.empty() && separate_threads.empty();
  }
};

class entrypoint {
public:
  explicit entrypoint(entrypoint_options options = {});
  ~entrypoint();
  entrypoint(const entrypoint&) = delete;
  entrypoint& operator=(const entrypoint&) = delete;

  // The loop and the pool exist until run() returns (run() shuts them down; an entrypoint
  // runs one main). Afterwards these throw ferry::error(loop_gone).
  asio::io_context& context() { return *live().io_; }
  asio::io_context::executor_type get_executor() { return live().io_->get_executor(); }
  thread_pool& pool() { return *live().pool_; }
  ferry::shared_context& shared() { return shared_context::of(*live().io_); }
  const entrypoint_options& options() const noexcept { return options_; }

  // Runs the loop until `main` (an awaitable, or a function returning one) completes.
  template <class Main>
  auto run(Main&& main);

  // Starts a background task, cancelled and awaited at shutdown.
  template <class Task>
  void spawn(Task&& task);

  // Any thread: cancel main and the spawned tasks (what SIGINT does).
  void request_stop();

  const shutdown_report& report() const noexcept { return report_; }

private:
  struct tracked_task {
    asio::cancellation_signal signal;
    bool done = false;
  };

  template <class Main>
  static auto awaitable_of(Main&& main) {
    if constexpr (requires { main.await_ready(); }) {
      return std::forward<Main>(main);
    } else {
      return std::forward<Main>(main)();
    }
  }

  entrypoint& live() {
    if (shut_down_ || !io_ || !pool_) {
      throw error(errc::loop_gone, "ferry::entrypoint: run() has finished and shut the loop down");
    }
    return *this;
  }
  void start_signals();
  static void report_task_failure(const std::exception_ptr& e) noexcept;
  // Runs the loop until `done` is true (spinning first when loop_spin > 0). False when the
  // loop ran out of work or was stopped before that.
  bool run_until(const bool& done);
  void shutdown() noexcept;

  entrypoint_options options_;
  std::unique_ptr<thread_pool> pool_;
  std::unique_ptr<asio::io_context> io_;
  asio::cancellation_signal main_signal_;
  std::list<tracked_task> tasks_;
  struct signal_state;
  std::unique_ptr<signal_state> signals_;
  shutdown_report report_;
  bool shut_down_ = false;
};

template <class Main>
auto entrypoint::run(Main&& main) {
  live();
  using awaitable_type = decltype(awaitable_of(std::forward<Main>(main)));
  using T = typename detail::awaitable_value<std::decay_t<awaitable_type>>::type;
  bool done = false;
  std::exception_ptr failure;
  std::conditional_t<std::is_void_v<T>, bool, std::optional<T>> value{};
  start_signals();
  auto on_done = [&](std::exception_ptr e, auto&&... v) {
    failure = std::move(e);
    if constexpr (!std::is_void_v<T>) {
      if (!failure) value.emplace(std::forward<decltype(v)>(v)...);
    }
    done = true;
  };
  ferry::co_spawn(*io_, awaitable_of(std::forward<Main>(main)),
                  asio::bind_cancellation_slot(main_signal_.slot(), on_done));
  const bool finished = run_until(done);
  shutdown();
  if (!finished) {
    throw error(errc::loop_gone, "ferry::entrypoint: the loop stopped before main completed");
  }
  if (failure) std::rethrow_exception(failure);
  if constexpr (!std::is_void_v<T>) return std::move(*value);
}

template <class Task>
void entrypoint::spawn(Task&& task) {
  tracked_task& t = tasks_.emplace_back();
  ferry::co_spawn(*io_, awaitable_of(std::forward<Task>(task)),
                  asio::bind_cancellation_slot(t.signal.slot(),
                                               [&t](std::exception_ptr e, auto&&...) {
                                                 t.done = true;
                                                 if (e) report_task_failure(e);
                                               }));
}

}  // namespace ferry
