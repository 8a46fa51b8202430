// ferry/context.hpp — task-local context: Python's contextvars, for C++.
//
//     ferry::context_var<int> user_id{"user_id"};
//     auto token = user_id.set(42);          // in this task's context
//     co_await do_threaded_write();          // the worker sees user_id == 42
//     user_id.reset(token);                  // back to the previous value (or none)
//
// Rules (spec/core.md C1–C5):
//  * A context maps variables to values. It is an immutable snapshot (O(1) to take: one
//    shared_ptr copy; a task that never sets a variable carries a null snapshot and pays
//    nothing). `set` replaces the running task's snapshot with a new one.
//  * "The running task" is whatever runs on this thread now: a coroutine spawned with
//    ferry::co_spawn (each gets its own copy of its spawner's context, so its writes are
//    invisible to the spawner and its siblings, and it keeps its values across every
//    co_await), a threaded call on a worker (runs in a copy of the caller's snapshot taken at
//    initiation; its writes never flow back), a copy_context().run(...) call, or else the
//    thread itself.
//  * get() without a value or a default throws ferry::error(errc::no_value) naming the
//    variable. reset(token) restores the value the variable had before the set that
//    produced the token; a token is single-use and only valid in the context that made it
//    (errc::invalid_token otherwise).
//
// Thread safety: a context_var object may be used from any thread; values are per context.
#pragma once

#include <ferry/error.hpp>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace ferry {

namespace detail {

// One immutable snapshot: variable id → value, sorted by id.
struct context_map {
  struct entry {
    std::uint64_t id;
    std::shared_ptr<const void> value;
  };
  std::vector<entry> entries;

  const entry* find(std::uint64_t id) const noexcept;
  // A copy with `id` set to `value` (or removed when value is null).
  std::shared_ptr<const context_map> with(std::uint64_t id,
                                          std::shared_ptr<const void> value) const;
};

using context_snapshot = std::shared_ptr<const context_map>;  // null: the empty context

// The mutable cell the running task writes through.
struct context_frame {
  context_snapshot snapshot;
};

// The frame of whatever runs on this thread now (the thread's own frame by default).
context_frame& current_frame() noexcept;

// Installs a frame for the lifetime of the scope (a task resuming, a hop running).
class context_scope {
public:
  explicit context_scope(context_frame& frame) noexcept;
  ~context_scope();
  context_scope(const context_scope&) = delete;
  context_scope& operator=(const context_scope&) = delete;

private:
  context_frame* previous_;
};

std::uint64_t next_context_var_id() noexcept;

}  // namespace detail

// A snapshot of a context you can carry and run code in (Python's contextvars.Context).
// run() executes in this object's context; the values it sets stay in this object.
class context {
public:
  context() = default;
  explicit context(detail::context_snapshot s) noexcept { frame_.snapshot = std::move(s); }

  template <class F>
  decltype(auto) run(F&& f) {
    detail::context_scope scope(frame_);
    return std::forward<F>(f)();
  }

  const detail::context_snapshot& snapshot() const noexcept { return frame_.snapshot; }

private:
  detail::context_frame frame_;
};

// A copy of the running task's context.
inline context copy_context() { return context(detail::current_frame().snapshot); }

template <class T>
class context_var {
public:
  // What set() returns; give it back to reset() once.
  class token {
  public:
    token(const token&) = delete;
    token(token&&) noexcept = default;
    token& operator=(token&&) noexcept = default;

  private:
    friend class context_var;
    token(const detail::context_frame* frame, std::shared_ptr<const void> previous)
        : frame_(frame), previous_(std::move(previous)) {}
    const detail::context_frame* frame_;
    std::shared_ptr<const void> previous_;  // null: the variable had no value
    bool used_ = false;
  };

  explicit context_var(std::string name) : name_(std::move(name)) {}
  context_var(std::string name, T default_value)
      : name_(std::move(name)), default_(std::move(default_value)) {}
  context_var(const context_var&) = delete;
  context_var& operator=(const context_var&) = delete;

  const std::string& name() const noexcept { return name_; }

  // The value in the running task's context, else the default, else ferry::error(no_value).
  T get() const {
    if (const T* v = find()) return *v;
    if (default_) return *default_;
    throw error(errc::no_value,
                "ferry::context_var '" + name_ + "' has no value in this context and no default");
  }

  // The value in the running task's context, else `fallback` (the default is not used).
  T get_or(T fallback) const {
    if (const T* v = find()) return *v;
    return fallback;
  }

  // True when the running task's context holds a value for this variable.
  bool has_value() const noexcept { return find() != nullptr; }

  token set(T value) {
    detail::context_frame& frame = detail::current_frame();
    std::shared_ptr<const void> previous;
    if (frame.snapshot) {
      if (const auto* e = frame.snapshot->find(id_)) previous = e->value;
    }
    std::shared_ptr<const void> v = std::make_shared<const T>(std::move(value));
    frame.snapshot = frame.snapshot ? frame.snapshot->with(id_, std::move(v))
                                    : detail::context_map{}.with(id_, std::move(v));
    return token(&frame, std::move(previous));
  }

  void reset(token& t) {
    detail::context_frame& frame = detail::current_frame();
    if (t.used_) {
      throw error(errc::invalid_token,
                  "ferry::context_var '" + name_ + "': token was already used");
    }
    if (t.frame_ != &frame) {
      throw error(errc::invalid_token,
                  "ferry::context_var '" + name_ + "': token was created in another context");
    }
    t.used_ = true;
    if (frame.snapshot) {
      frame.snapshot = frame.snapshot->with(id_, std::move(t.previous_));
    } else if (t.previous_) {
      frame.snapshot = detail::context_map{}.with(id_, std::move(t.previous_));
    }
  }

private:
  const T* find() const noexcept {
    const detail::context_snapshot& s = detail::current_frame().snapshot;
    if (!s) return nullptr;
    const auto* e = s->find(id_);
    return e ? static_cast<const T*>(e->value.get()) : nullptr;
  }

  const std::uint64_t id_ = detail::next_context_var_id();
  std::string name_;
  std::optional<T> default_;
};

}  // namespace ferry
