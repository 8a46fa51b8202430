// ferry/detail/loop_service.hpp — the per-loop state the base layer keeps (DESIGN principle
// 5: no hidden globals). One Asio service per execution context holds:
//  * the completion queue threaded results return through,
//  * the default pool for threaded calls awaited on that loop (rule T2),
//  * the registry of threads started by threaded_separate (rule T8),
//  * the waits suspended on that loop by ferry's channels and iterators, so that destroying
//    the loop destroys their handlers (and with them the coroutine frames that own the
//    iterators, whose destructors then stop the producers), as Asio does with its own
//    pending operations.
#pragma once

#include <ferry/detail/completion_queue.hpp>
#include <ferry/thread_pool.hpp>

#include <asio/execution_context.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace ferry {

// A thread started by threaded_separate that is still running.
struct running_thread {
  std::string name;
  std::chrono::nanoseconds running_for{0};
};

namespace detail {

// Threads started by threaded_separate on behalf of one loop. Shared with the threads
// themselves, so it outlives the loop if one of them does.
class separate_thread_registry {
public:
  std::uint64_t add(std::string name);
  void remove(std::uint64_t id) noexcept;
  // Waits until no thread is running or the timeout expires; returns those still running.
  std::vector<running_thread> wait_all_for(std::chrono::nanoseconds timeout);
  std::vector<running_thread> running() const;

private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::uint64_t next_id_ = 1;
  struct entry {
    std::string name;
    std::chrono::steady_clock::time_point started;
  };
  std::map<std::uint64_t, entry> threads_;
};

// Tells threads that watch a loop from outside whether it is still there. Set, under the
// mutex, while the loop is being destroyed (before its scheduler goes), so a watcher that
// holds the mutex may safely ask the loop whether it stopped.
struct loop_liveness {
  std::mutex mu;
  bool gone = false;
};

// Producers (threaded iterators) working on behalf of one loop. Destroying the loop stops
// them all before it joins its default pool, so a producer blocked on a full channel whose
// consumer coroutine is being destroyed cannot hold the shutdown up. Shared with the
// producers, so it outlives the loop if one of them does.
class producer_registry {
public:
  // Registers `stop` (any thread); called at once if the loop is already shutting down.
  std::uint64_t add(std::function<void()> stop);
  void remove(std::uint64_t id) noexcept;
  void stop_all() noexcept;

private:
  std::mutex mu_;
  std::uint64_t next_id_ = 1;
  bool closed_ = false;
  std::map<std::uint64_t, std::function<void()>> stops_;
};

// A wait suspended on a loop (see loop_service::add_pending).
struct pending_wait {
  pending_wait* pending_prev = nullptr;
  pending_wait* pending_next = nullptr;
  // The loop is being destroyed: drop the wait without completing it.
  void (*abort_pending)(pending_wait*) noexcept = nullptr;
};

class loop_service : public asio::execution_context::service {
public:
  using key_type = loop_service;
  static inline asio::execution_context::id id;

  explicit loop_service(asio::execution_context& ctx);
  ~loop_service() override;

  // asio::use_service<loop_service>(ctx), without its registry mutex on the hot path: a
  // per-thread one-entry cache, invalidated whenever any loop_service is created or
  // destroyed (so a new context at a dead one's address is never confused with it).
  static loop_service& of(asio::execution_context& ctx);

  const std::shared_ptr<completion_queue>& completions() const noexcept { return completions_; }
  const std::shared_ptr<separate_thread_registry>& separate_threads() const noexcept {
    return threads_;
  }
  const std::shared_ptr<loop_liveness>& liveness() const noexcept { return liveness_; }
  const std::shared_ptr<producer_registry>& producers() const noexcept { return producers_; }

  // Registers a suspended wait; false once the loop is shutting down (the caller then
  // drops the wait itself). remove_pending is a no-op for a wait already taken by shutdown.
  bool add_pending(pending_wait* w) noexcept;
  void remove_pending(pending_wait* w) noexcept;

  thread_pool& default_pool();
  void set_default_pool(thread_pool& pool);

  // How long destroying the loop waits for threaded_separate threads (default 10 s; the
  // entrypoint, which waits itself within its own bound, sets 0).
  void set_separate_thread_wait(std::chrono::nanoseconds wait) noexcept {
    separate_wait_ = wait;
  }

private:
  void shutdown() override;

  std::shared_ptr<completion_queue> completions_;
  std::shared_ptr<separate_thread_registry> threads_;
  std::shared_ptr<loop_liveness> liveness_ = std::make_shared<loop_liveness>();
  std::shared_ptr<producer_registry> producers_ = std::make_shared<producer_registry>();
  std::mutex pending_mu_;
  pending_wait* pending_ = nullptr;  // guarded by pending_mu_
  bool pending_closed_ = false;      // guarded by pending_mu_
  std::mutex pool_mu_;
  std::unique_ptr<thread_pool> owned_pool_;
  std::chrono::nanoseconds separate_wait_ = std::chrono::seconds(10);
  thread_pool* pool_ = nullptr;
};

}  // namespace detail
}  // namespace ferry
