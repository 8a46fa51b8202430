// ferry/shared_context.hpp — one shared key/value context per loop (aiomisc's Context).
//
//     auto& shared = ferry::shared_context::of(io);
//     shared.set("config", load_config());                  // from any thread
//     auto cfg = co_await shared.async_get<config>("config", asio::use_awaitable);
//
// Unlike context_var, nothing here is copied per task: every task on the loop sees the same
// values (rule C6). A key can be awaited before it is set (the wait completes when it is
// set) or after (completes at once, through the waiter's executor). Setting may happen from
// any thread; re-setting replaces the value for later readers. clear() (the entrypoint
// calls it at shutdown) removes every value and completes pending waits with
// operation_aborted. A wait whose cancellation slot fires completes with
// operation_aborted. Reading a value as the wrong type completes with (or throws)
// ferry::errc::invalid_argument naming the key.
//
// Thread safety: all member functions may be called from any thread.
#pragma once

#include <ferry/error.hpp>

#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/error.hpp>
#include <asio/execution_context.hpp>
#include <asio/post.hpp>

#include <any>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

namespace ferry {

class shared_context : public asio::execution_context::service {
public:
  using key_type = shared_context;
  static inline asio::execution_context::id id;

  explicit shared_context(asio::execution_context& ctx) : asio::execution_context::service(ctx) {}

  // The shared context of a loop (created on first use).
  static shared_context& of(asio::execution_context& ctx) {
    return asio::use_service<shared_context>(ctx);
  }

  template <class T>
  void set(const std::string& name, T value) {
    std::list<waiter> ready;
    std::shared_ptr<const std::any> v = std::make_shared<const std::any>(std::move(value));
    {
      std::lock_guard lock(mu_);
      entry& e = entries_[name];
      e.value = v;
      ready.splice(ready.end(), e.waiters);
    }
    for (waiter& w : ready) w.complete({}, v);
  }

  // The value now, if set (and of type T; otherwise ferry::error invalid_argument).
  template <class T>
  std::optional<T> get(const std::string& name) const {
    std::shared_ptr<const std::any> v;
    {
      std::lock_guard lock(mu_);
      auto it = entries_.find(name);
      if (it == entries_.end() || !it->second.value) return std::nullopt;
      v = it->second.value;
    }
    if (const T* p = std::any_cast<T>(v.get())) return *p;
    throw error(errc::invalid_argument, type_mismatch(name));
  }

  bool contains(const std::string& name) const {
    std::lock_guard lock(mu_);
    auto it = entries_.find(name);
    return it != entries_.end() && it->second.value != nullptr;
  }

  // Completes with `void(std::error_code, T)` once `name` is set.
  template <class T, class CompletionToken>
  auto async_get(std::string name, CompletionToken&& token) {
    return asio::async_initiate<CompletionToken, void(std::error_code, T)>(
        [this](auto handler, std::string k) { start_get<T>(std::move(handler), std::move(k)); },
        token, std::move(name));
  }

  // Removes every value; pending waits complete with operation_aborted.
  void clear() {
    std::list<waiter> pending;
    {
      std::lock_guard lock(mu_);
      for (auto& [k, e] : entries_) pending.splice(pending.end(), e.waiters);
      entries_.clear();
    }
    for (waiter& w : pending) w.complete(asio::error::operation_aborted, nullptr);
  }

private:
  // A type-erased pending wait. complete() hands the result to the waiter's executor.
  // Exactly one party takes a waiter out of its list (under mu_): set(), clear() or the
  // cancellation handler; that party completes it.
  struct waiter {
    std::function<void(std::error_code, std::shared_ptr<const std::any>)> complete;
    std::uint64_t id = 0;
  };
  struct entry {
    std::shared_ptr<const std::any> value;
    std::list<waiter> waiters;
  };

  static std::string type_mismatch(const std::string& name) {
    return "ferry::shared_context: the value of '" + name + "' has another type";
  }

  template <class T, class Handler>
  void start_get(Handler handler, std::string name) {
    // A pending wait is outstanding work on the waiter's executor, like any Asio operation.
    auto ex = asio::prefer(asio::get_associated_executor(handler),
                           asio::execution::outstanding_work.tracked);
    // The handler lives in a shared slot so both the completion and a cancellation can
    // reach it; whichever comes first takes it.
    auto slot = asio::get_associated_cancellation_slot(handler);
    auto shared_handler = std::make_shared<Handler>(std::move(handler));
    auto deliver = [ex, shared_handler, name](std::error_code ec,
                                             std::shared_ptr<const std::any> v) mutable {
      Handler h = std::move(*shared_handler);
      T value{};
      if (!ec && v) {
        if (const T* p = std::any_cast<T>(v.get())) {
          value = *p;
        } else {
          ec = make_error_code(errc::invalid_argument);
        }
      }
      asio::post(ex, [h = std::move(h), ec, value = std::move(value)]() mutable {
        std::move(h)(ec, std::move(value));
      });
    };
    std::shared_ptr<const std::any> now;
    std::uint64_t waiter_id = 0;
    {
      std::lock_guard lock(mu_);
      entry& e = entries_[name];
      if (e.value) {
        now = e.value;
      } else {
        waiter_id = ++next_id_;
        e.waiters.push_back(waiter{deliver, waiter_id});
      }
    }
    if (now) {
      deliver({}, now);
      return;
    }
    if (slot.is_connected()) {
      slot.assign([this, name, waiter_id](asio::cancellation_type) {
        std::optional<waiter> taken;
        {
          std::lock_guard lock(mu_);
          auto e = entries_.find(name);
          if (e == entries_.end()) return;
          auto& ws = e->second.waiters;
          for (auto w = ws.begin(); w != ws.end(); ++w) {
            if (w->id == waiter_id) {
              taken.emplace(std::move(*w));
              ws.erase(w);
              break;
            }
          }
        }
        if (taken) taken->complete(asio::error::operation_aborted, nullptr);
      });
    }
  }

  void shutdown() override {
    std::lock_guard lock(mu_);
    entries_.clear();  // pending handlers are destroyed with the loop, as Asio does
  }

  mutable std::mutex mu_;
  std::map<std::string, entry> entries_;
  std::uint64_t next_id_ = 0;
};

}  // namespace ferry
