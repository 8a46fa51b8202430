// ferry/detail/channel_core.hpp — the storage and hand-shakes behind from_thread_channel
// and the threaded iterators.
//
// Bounded (max_size > 0): a ring of exactly max_size cells, each with a sequence number
// (Vyukov's bounded MPMC queue, with `pos % size` so the bound is exact, not rounded to a
// power of two). Sequences are doubled so that "free for position p" (2p) and "holds the
// item of position p" (2p + 1) never coincide, even with a single cell. A producer claims
// position p by CAS on tail_ when cell p's sequence is 2p, constructs the item and
// publishes it by storing 2p + 1; a consumer claims p by CAS on head_ when the sequence is
// 2p + 1, moves the item out and frees the cell for the next lap by storing 2(p + size). So at most max_size items are ever stored, and items leave in the
// order their positions were claimed. Bit 63 of tail_ is the "closed" flag: a put either
// claimed its cell before close() set the bit (the item will be delivered) or sees the bit
// and fails; nothing slips in after the consumer saw "closed and drained".
//
// Unbounded (max_size == 0): a mutex-guarded deque with an atomic count (no back-pressure,
// so no ring; use it when the producer is known to be finite and small).
//
// Waking, with seq_cst operations only (see loop_waiters.hpp for the pattern):
//  * consumer side: a reader about to suspend links itself in readers_ and re-checks the
//    head cell; a producer that published checks readers_.any once (one load when nobody
//    waits: the loop is posted to only when a reader is about to wait, H5);
//  * producer side: a full producer spins for `producer_spin`, then announces itself in
//    space_waiters_, re-tries, and parks on the space_epoch_ futex; a consumer that freed a
//    cell checks space_waiters_ once and, if set, bumps the epoch and wakes the parked
//    producers. close() always bumps it, so a blocked put returns at once.
#pragma once

#include <ferry/detail/loop_waiters.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace ferry {

// What a non-blocking put did.
enum class put_status {
  ok,      // the item is in the channel
  full,    // no room; the item was not moved from
  closed,  // the channel is closed; the item was not moved from
};

namespace detail {

inline void channel_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

template <class T>
class channel_core {
  static constexpr std::uint64_t closed_bit = std::uint64_t{1} << 63;

  struct cell {
    std::atomic<std::uint64_t> seq;
    alignas(T) unsigned char storage[sizeof(T)];
    T* item() noexcept { return std::launder(reinterpret_cast<T*>(storage)); }
  };

public:
  explicit channel_core(std::size_t max_size,
                        std::chrono::nanoseconds producer_spin = std::chrono::microseconds(50))
      : cap_(max_size),
        pow2_(max_size != 0 && (max_size & (max_size - 1)) == 0),
        producer_spin_(producer_spin) {
    if (cap_ != 0) {
      cells_ = std::make_unique<cell[]>(cap_);
      for (std::size_t i = 0; i < cap_; ++i) {
        cells_[i].seq.store(2 * std::uint64_t{i}, std::memory_order_relaxed);
      }
    }
  }

  ~channel_core() {
    if (cap_ == 0) return;
    const std::uint64_t tail = tail_.load(std::memory_order_relaxed) & ~closed_bit;
    for (std::uint64_t p = head_.load(std::memory_order_relaxed); p != tail; ++p) {
      cell& c = cells_[index(p)];
      if (c.seq.load(std::memory_order_relaxed) == 2 * p + 1) c.item()->~T();
    }
  }

  channel_core(const channel_core&) = delete;
  channel_core& operator=(const channel_core&) = delete;

  std::size_t max_size() const noexcept { return cap_; }

  // --- producer side (any thread) ---------------------------------------------------------
  put_status try_put(T& item) {
    const put_status s = cap_ == 0 ? push_unbounded(item) : push_ring(item);
    if (s == put_status::ok) readers_.wake_all();
    return s;
  }

  // Blocks while full; false once closed (the item is then not moved from).
  bool put(T& item) {
    put_status s = try_put(item);
    if (s != put_status::full) return s == put_status::ok;
    const auto t0 = std::chrono::steady_clock::now();
    const auto spin_until = t0 + producer_spin_;
    bool ok = false;
    for (unsigned i = 1;; ++i) {
      s = try_put(item);
      if (s != put_status::full) {
        ok = s == put_status::ok;
        break;
      }
      if (i % 16 == 0) {
        if (std::chrono::steady_clock::now() < spin_until) {
          std::this_thread::yield();
          continue;
        }
        const std::uint32_t epoch = space_epoch_.load(std::memory_order_seq_cst);
        space_waiters_.store(true, std::memory_order_seq_cst);
        s = try_put(item);
        if (s != put_status::full) {
          ok = s == put_status::ok;
          break;
        }
        space_epoch_.wait(epoch, std::memory_order_seq_cst);
      } else {
        channel_relax();
      }
    }
    blocked_ns_.fetch_add(
        static_cast<std::uint64_t>((std::chrono::steady_clock::now() - t0).count()),
        std::memory_order_relaxed);
    return ok;
  }

  // --- consumer side -------------------------------------------------------------------
  bool try_pop(std::optional<T>& out) {
    const bool got = cap_ == 0 ? pop_unbounded(out) : pop_ring(out);
    if (got) wake_space_if_waiting();
    return got;
  }

  // Appends up to `max_items` ready items to `out`; returns how many.
  std::size_t try_pop_batch(std::vector<T>& out, std::size_t max_items) {
    const std::size_t n = cap_ == 0 ? pop_unbounded_batch(out, max_items)
                                    : pop_ring_batch(out, max_items);
    if (n != 0) wake_space_if_waiting();
    return n;
  }

  // An item is published at the head, or the channel is closed: a reader need not wait.
  bool readable() const noexcept {
    if (cap_ == 0) {
      return count_.load(std::memory_order_seq_cst) != 0 ||
             closed_flag_.load(std::memory_order_seq_cst);
    }
    const std::uint64_t head = head_.load(std::memory_order_seq_cst);
    if (cells_[index(head)].seq.load(std::memory_order_seq_cst) == 2 * head + 1) return true;
    return (tail_.load(std::memory_order_seq_cst) & closed_bit) != 0;
  }

  // An item is published at the head (a pop would succeed unless another consumer wins).
  bool has_item() const noexcept {
    if (cap_ == 0) return count_.load(std::memory_order_seq_cst) != 0;
    const std::uint64_t head = head_.load(std::memory_order_seq_cst);
    return cells_[index(head)].seq.load(std::memory_order_seq_cst) == 2 * head + 1;
  }

  // Closed, and every item put before the close has been taken.
  bool drained() const noexcept {
    if (cap_ == 0) {
      std::lock_guard lock(mu_);
      return closed_flag_.load(std::memory_order_relaxed) && items_.empty();
    }
    const std::uint64_t tail = tail_.load(std::memory_order_seq_cst);
    return (tail & closed_bit) != 0 && (tail & ~closed_bit) == head_.load(std::memory_order_seq_cst);
  }

  bool closed() const noexcept { return closed_flag_.load(std::memory_order_acquire); }

  // Idempotent; the first close's exception is the one readers see after the items.
  void close(std::exception_ptr error = nullptr) noexcept {
    {
      std::lock_guard lock(mu_);
      if (closed_flag_.load(std::memory_order_relaxed)) return;
      error_ = std::move(error);
      closed_flag_.store(true, std::memory_order_seq_cst);
    }
    if (cap_ != 0) tail_.fetch_or(closed_bit, std::memory_order_seq_cst);
    space_waiters_.store(false, std::memory_order_relaxed);
    space_epoch_.fetch_add(1, std::memory_order_seq_cst);
    space_epoch_.notify_all();
    readers_.wake_all();
  }

  // The exception close() was given (null for a clean close). Stable once closed.
  std::exception_ptr error() const {
    std::lock_guard lock(mu_);
    return error_;
  }

  std::size_t size() const noexcept {
    if (cap_ == 0) return count_.load(std::memory_order_relaxed);
    // tail first: head only grows, so a later head can only make the difference smaller.
    const std::uint64_t tail = tail_.load(std::memory_order_acquire) & ~closed_bit;
    const std::uint64_t head = head_.load(std::memory_order_acquire);
    const std::uint64_t n = tail > head ? tail - head : 0;
    return static_cast<std::size_t>(n < cap_ ? n : cap_);
  }

  std::uint64_t produced() const noexcept {
    if (cap_ == 0) return produced_.load(std::memory_order_relaxed);
    return tail_.load(std::memory_order_relaxed) & ~closed_bit;
  }
  std::uint64_t consumed() const noexcept {
    if (cap_ == 0) return consumed_.load(std::memory_order_relaxed);
    return head_.load(std::memory_order_relaxed);
  }
  std::chrono::nanoseconds producer_blocked() const noexcept {
    return std::chrono::nanoseconds(
        static_cast<std::int64_t>(blocked_ns_.load(std::memory_order_relaxed)));
  }

  loop_waiters& readers() noexcept { return readers_; }

private:
  std::size_t index(std::uint64_t pos) const noexcept {
    return static_cast<std::size_t>(pow2_ ? pos & (cap_ - 1) : pos % cap_);
  }

  put_status push_ring(T& item) {
    std::uint64_t pos = tail_.load(std::memory_order_relaxed);
    cell* c;
    for (;;) {
      if ((pos & closed_bit) != 0) return put_status::closed;
      c = &cells_[index(pos)];
      const std::uint64_t seq = c->seq.load(std::memory_order_seq_cst);
      const auto dif = static_cast<std::int64_t>(seq - 2 * pos);
      if (dif == 0) {
        if (tail_.compare_exchange_weak(pos, pos + 1, std::memory_order_seq_cst,
                                        std::memory_order_relaxed)) {
          break;
        }
      } else if (dif < 0) {
        // The cell still holds the item from the previous lap. Re-read tail_ so a close
        // that raced with us reports closed rather than full.
        const std::uint64_t now = tail_.load(std::memory_order_seq_cst);
        if ((now & closed_bit) != 0) return put_status::closed;
        if (now == pos) return put_status::full;
        pos = now;
      } else {
        pos = tail_.load(std::memory_order_relaxed);
      }
    }
    // The cell is ours; a throwing move leaves a hole the consumer must skip, so require
    // nothrow moves for the ring (static_assert in the public types) or fall back to copy.
    ::new (static_cast<void*>(c->storage)) T(std::move(item));
    c->seq.store(2 * pos + 1, std::memory_order_seq_cst);
    return put_status::ok;
  }

  bool pop_ring(std::optional<T>& out) {
    std::uint64_t pos = head_.load(std::memory_order_relaxed);
    cell* c;
    for (;;) {
      c = &cells_[index(pos)];
      const std::uint64_t seq = c->seq.load(std::memory_order_seq_cst);
      const auto dif = static_cast<std::int64_t>(seq - (2 * pos + 1));
      if (dif == 0) {
        if (head_.compare_exchange_weak(pos, pos + 1, std::memory_order_seq_cst,
                                        std::memory_order_relaxed)) {
          break;
        }
      } else if (dif < 0) {
        return false;  // empty, or the producer has not published this cell yet
      } else {
        pos = head_.load(std::memory_order_relaxed);
      }
    }
    T* p = c->item();
    out.emplace(std::move(*p));
    p->~T();
    c->seq.store(2 * (pos + cap_), std::memory_order_seq_cst);
    return true;
  }

  std::size_t pop_ring_batch(std::vector<T>& out, std::size_t max_items) {
    std::uint64_t pos = head_.load(std::memory_order_relaxed);
    std::size_t n = 0;
    for (;;) {
      // Count the published cells from pos on, then claim them all with one CAS.
      n = 0;
      while (n < max_items && n < cap_) {
        const cell& c = cells_[index(pos + n)];
        if (c.seq.load(std::memory_order_seq_cst) != 2 * (pos + n) + 1) break;
        ++n;
      }
      if (n == 0) {
        const std::uint64_t now = head_.load(std::memory_order_relaxed);
        if (now == pos) return 0;
        pos = now;
        continue;
      }
      if (head_.compare_exchange_weak(pos, pos + n, std::memory_order_seq_cst,
                                      std::memory_order_relaxed)) {
        break;
      }
    }
    out.reserve(out.size() + n);
    for (std::size_t i = 0; i < n; ++i) {
      cell& c = cells_[index(pos + i)];
      T* p = c.item();
      out.push_back(std::move(*p));
      p->~T();
      c.seq.store(2 * (pos + i + cap_), std::memory_order_seq_cst);
    }
    return n;
  }

  put_status push_unbounded(T& item) {
    {
      std::lock_guard lock(mu_);
      if (closed_flag_.load(std::memory_order_relaxed)) return put_status::closed;
      items_.push_back(std::move(item));
      produced_.fetch_add(1, std::memory_order_relaxed);
      count_.fetch_add(1, std::memory_order_seq_cst);
    }
    return put_status::ok;
  }

  bool pop_unbounded(std::optional<T>& out) {
    std::lock_guard lock(mu_);
    if (items_.empty()) return false;
    out.emplace(std::move(items_.front()));
    items_.pop_front();
    consumed_.fetch_add(1, std::memory_order_relaxed);
    count_.fetch_sub(1, std::memory_order_seq_cst);
    return true;
  }

  std::size_t pop_unbounded_batch(std::vector<T>& out, std::size_t max_items) {
    std::lock_guard lock(mu_);
    std::size_t n = 0;
    while (n < max_items && !items_.empty()) {
      out.push_back(std::move(items_.front()));
      items_.pop_front();
      ++n;
    }
    consumed_.fetch_add(n, std::memory_order_relaxed);
    count_.fetch_sub(n, std::memory_order_seq_cst);
    return n;
  }

  void wake_space_if_waiting() noexcept {
    if (cap_ == 0) return;
    if (space_waiters_.load(std::memory_order_seq_cst) &&
        space_waiters_.exchange(false, std::memory_order_seq_cst)) {
      space_epoch_.fetch_add(1, std::memory_order_seq_cst);
      space_epoch_.notify_all();
    }
  }

  const std::size_t cap_;
  const bool pow2_;
  const std::chrono::nanoseconds producer_spin_;
  std::unique_ptr<cell[]> cells_;
  alignas(64) std::atomic<std::uint64_t> tail_{0};
  alignas(64) std::atomic<std::uint64_t> head_{0};
  alignas(64) std::atomic<bool> space_waiters_{false};
  std::atomic<std::uint32_t> space_epoch_{0};
  std::atomic<std::uint64_t> blocked_ns_{0};
  alignas(64) loop_waiters readers_;
  mutable std::mutex mu_;  // close() bookkeeping; the whole state when unbounded
  std::atomic<bool> closed_flag_{false};
  std::exception_ptr error_;  // guarded by mu_
  std::deque<T> items_;       // unbounded only, guarded by mu_
  std::atomic<std::size_t> count_{0};
  std::atomic<std::uint64_t> produced_{0};
  std::atomic<std::uint64_t> consumed_{0};
};

}  // namespace detail
}  // namespace ferry
