// ferry/detail/completion_queue.hpp — how results travel from threads back to a loop.
//
// Every execution context that awaits threaded work gets one completion_queue (through an
// Asio service). A thread that finished a call pushes the call's node onto a lock-free
// stack; only the push that finds the stack empty posts a "drain" handler to the loop, so
// a burst of completions costs one hand-off, not one per item (DESIGN principle 6). The
// drain takes the whole stack with one exchange, restores FIFO order and delivers each
// result on the loop. The drain's own Asio operation is carved from a small arena in the
// queue (at most one drain is ever pending), so the steady state allocates nothing.
//
// Lifetime: the queue is shared (the service and every in-flight call hold it). When the
// loop's context is destroyed the service closes the queue: pending nodes are discarded
// while the loop's services still exist; a call that completes after that finds the queue
// closed and leaks its completion handler instead of running or destroying it against a
// dead loop (the entrypoint waits for running calls before it destroys its loop, E3).
#pragma once

#include <asio/execution_context.hpp>
#include <asio/post.hpp>

#include <atomic>
#include <cstddef>
#include <memory>
#include <mutex>
#include <new>

namespace ferry::detail {

struct completion_node {
  completion_node* next = nullptr;
  // On the loop: hand the result to the waiter and release the node.
  void (*deliver)(completion_node*) = nullptr;
  // At loop shutdown: destroy the node without delivering.
  void (*discard)(completion_node*) noexcept = nullptr;
};

class completion_queue : public std::enable_shared_from_this<completion_queue> {
public:
  // Any thread. `loop` is an executor of the loop the node belongs to.
  template <class Executor>
  void push(completion_node* node, const Executor& loop) {
    completion_node* prev = head_.load(std::memory_order_relaxed);
    do {
      node->next = prev;
    } while (!head_.compare_exchange_weak(prev, node, std::memory_order_release,
                                          std::memory_order_relaxed));
    if (prev != nullptr) return;  // a drain is already on its way and will see this node
    std::lock_guard lock(post_mu_);
    if (closed_) return;  // the loop is gone: leak, never touch it (see above)
    asio::post(loop, drain_handler<Executor>{shared_from_this(), loop});
  }

  // On the loop.
  template <class Executor>
  void drain(const Executor& loop) {
    completion_node* lifo = head_.exchange(nullptr, std::memory_order_acquire);
    completion_node* fifo = nullptr;
    while (lifo) {
      completion_node* next = lifo->next;
      lifo->next = fifo;
      fifo = lifo;
      lifo = next;
    }
    while (fifo) {
      completion_node* next = fifo->next;
      try {
        fifo->deliver(fifo);
      } catch (...) {
        // A handler threw out of the loop (Asio semantics: it propagates from run()). The
        // rest of the batch is pushed back, in order, and delivered by the next drain.
        while (next) {
          completion_node* after = next->next;
          push(next, loop);
          next = after;
        }
        throw;
      }
      fifo = next;
    }
  }

  void close() noexcept {
    {
      std::lock_guard lock(post_mu_);
      closed_ = true;
    }
    completion_node* n = head_.exchange(nullptr, std::memory_order_acquire);
    while (n) {
      completion_node* next = n->next;
      n->discard(n);
      n = next;
    }
  }

  // The single-slot arena the drain handler's Asio operation lives in.
  void* arena_allocate(std::size_t size) {
    if (size <= sizeof(arena_) && !arena_busy_.exchange(true, std::memory_order_acquire)) {
      return arena_;
    }
    return ::operator new(size);
  }
  void arena_deallocate(void* p) noexcept {
    if (p == static_cast<void*>(arena_)) {
      arena_busy_.store(false, std::memory_order_release);
    } else {
      ::operator delete(p);
    }
  }

private:
  template <class T>
  struct arena_allocator {
    using value_type = T;
    completion_queue* q;
    explicit arena_allocator(completion_queue* queue) noexcept : q(queue) {}
    template <class U>
    arena_allocator(const arena_allocator<U>& o) noexcept : q(o.q) {}  // NOLINT
    T* allocate(std::size_t n) { return static_cast<T*>(q->arena_allocate(n * sizeof(T))); }
    void deallocate(T* p, std::size_t) noexcept { q->arena_deallocate(p); }
    friend bool operator==(const arena_allocator& a, const arena_allocator& b) noexcept {
      return a.q == b.q;
    }
  };

  template <class Executor>
  struct drain_handler {
    std::shared_ptr<completion_queue> q;
    Executor loop;
    using allocator_type = arena_allocator<void>;
    allocator_type get_allocator() const noexcept { return allocator_type(q.get()); }
    void operator()() { q->drain(loop); }
  };

private:
  std::atomic<completion_node*> head_{nullptr};
  std::mutex post_mu_;
  bool closed_ = false;  // guarded by post_mu_
  std::atomic<bool> arena_busy_{false};
  alignas(std::max_align_t) unsigned char arena_[256];
};

}  // namespace ferry::detail
