// ferry/detail/task.hpp — the type-erased unit of work a ferry::thread_pool queues.
//
// A task is one 64-byte object: a pointer to a static table of operations plus 56 bytes of
// inline storage. Callables that fit (size <= task::inline_size, alignment <= 8, nothrow
// move) live inside the task, so queuing them allocates nothing; larger ones are moved to
// the heap once. Trivially copyable callables are relocated with memcpy, the common case
// for lambdas capturing pointers and integers.
//
// A callable may define `void ferry_abandon() noexcept`: the pool calls it instead of
// running the callable when it was stopped first (rule P4: whoever waits on the work gets
// "pool closed" rather than silence).
#pragma once

#include <asio/detail/bind_handler.hpp>
#include <asio/detail/work_dispatcher.hpp>

#include <cstddef>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>

namespace ferry::detail {

template <class F>
concept abandonable = requires(F& f) {
  { f.ferry_abandon() } noexcept;
};

// Whether moving F cannot throw. Asio's handler wrappers (binder0, work_dispatcher) do not
// declare their moves noexcept, though they only move what they wrap; without this
// every asio::post to a pool would fall back to the heap.
template <class F>
struct nothrow_relocatable : std::is_nothrow_move_constructible<F> {};
template <class H>
struct nothrow_relocatable<asio::detail::binder0<H>> : nothrow_relocatable<H> {};
template <class H, class E>
struct nothrow_relocatable<asio::detail::work_dispatcher<H, E>>
    : std::bool_constant<nothrow_relocatable<H>::value &&
                         std::is_nothrow_move_constructible_v<E>> {};

class task {
public:
  static constexpr std::size_t inline_size = 56;
  static constexpr std::size_t inline_align = alignof(void*);

  template <class F>
  static constexpr bool stored_inline =
      sizeof(F) <= inline_size && alignof(F) <= inline_align &&
      nothrow_relocatable<F>::value;

  task() noexcept = default;

  template <class F, class D = std::decay_t<F>>
    requires(!std::is_same_v<D, task> && std::is_invocable_v<D&>)
  explicit task(F&& f) {
    if constexpr (stored_inline<D>) {
      ::new (static_cast<void*>(storage_)) D(std::forward<F>(f));
      ops_ = &inline_ops<D>;
    } else {
      D* p = new D(std::forward<F>(f));
      std::memcpy(storage_, &p, sizeof p);
      ops_ = &heap_ops<D>;
    }
  }

  task(task&& other) noexcept { take(other); }

  task& operator=(task&& other) noexcept {
    if (this != &other) {
      reset();
      take(other);
    }
    return *this;
  }

  task(const task&) = delete;
  task& operator=(const task&) = delete;
  ~task() { reset(); }

  explicit operator bool() const noexcept { return ops_ != nullptr; }

  // Invokes the callable once and destroys it, also when it throws (the exception
  // propagates). The task is empty afterwards.
  void run() {
    const ops* o = std::exchange(ops_, nullptr);
    o->run(storage_);
  }

  // The pool will never run this task: tell its waiter, then destroy it.
  void abandon() noexcept {
    if (const ops* o = std::exchange(ops_, nullptr)) o->abandon(storage_);
  }

private:
  struct ops {
    void (*run)(void* storage);                     // invoke + destroy
    void (*abandon)(void* storage) noexcept;        // ferry_abandon (if any) + destroy
    void (*destroy)(void* storage) noexcept;        // nullptr: trivially destructible
    void (*relocate)(void* dst, void* src) noexcept;  // nullptr: memcpy the storage
  };

  template <class D>
  static D* inline_ptr(void* s) noexcept { return std::launder(static_cast<D*>(s)); }
  template <class D>
  static D* heap_ptr(void* s) noexcept {
    D* p;
    std::memcpy(&p, s, sizeof p);
    return p;
  }

  template <class D>
  struct inline_destroyer {
    D* p;
    ~inline_destroyer() { p->~D(); }
  };

  template <class D>
  static constexpr ops inline_ops{
      [](void* s) {
        inline_destroyer<D> guard{inline_ptr<D>(s)};
        (*guard.p)();
      },
      [](void* s) noexcept {
        D* p = inline_ptr<D>(s);
        if constexpr (abandonable<D>) p->ferry_abandon();
        p->~D();
      },
      std::is_trivially_destructible_v<D> ? nullptr
                                          : +[](void* s) noexcept { inline_ptr<D>(s)->~D(); },
      std::is_trivially_copyable_v<D> ? nullptr : +[](void* dst, void* src) noexcept {
        D* from = inline_ptr<D>(src);
        ::new (dst) D(std::move(*from));
        from->~D();
      },
  };

  template <class D>
  static constexpr ops heap_ops{
      [](void* s) {
        struct deleter {
          D* p;
          ~deleter() { delete p; }
        } guard{heap_ptr<D>(s)};
        (*guard.p)();
      },
      [](void* s) noexcept {
        D* p = heap_ptr<D>(s);
        if constexpr (abandonable<D>) p->ferry_abandon();
        delete p;
      },
      +[](void* s) noexcept { delete heap_ptr<D>(s); },
      nullptr,  // the storage only holds a pointer
  };

  void take(task& other) noexcept {
    ops_ = std::exchange(other.ops_, nullptr);
    if (!ops_) return;
    if (ops_->relocate) {
      ops_->relocate(storage_, other.storage_);
    } else {
      std::memcpy(storage_, other.storage_, inline_size);
    }
  }

  void reset() noexcept {
    if (ops_ && ops_->destroy) ops_->destroy(storage_);
    ops_ = nullptr;
  }

  const ops* ops_ = nullptr;
  alignas(inline_align) unsigned char storage_[inline_size];
};

}  // namespace ferry::detail
