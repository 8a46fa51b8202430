// ferry/error.hpp — ferry's error codes and its one exception base.
//
// Expected outcomes (a pool that closed, a call that was refused, a wait that timed out) are
// std::error_code values in ferry's category. Everything ferry throws derives from
// ferry::error, a std::system_error, so one catch clause sees them all and `e.code()` says
// what happened:
//
//     try { asio::post(pool, work); }
//     catch (const ferry::error& e) {
//       if (e.code() == ferry::errc::pool_closed) { /* the pool was stopped */ }
//     }
#pragma once

#include <string>
#include <system_error>

namespace ferry {

enum class errc {
  pool_closed = 1,   // the pool was stopped; the work never ran
  would_deadlock,    // the call would block the thread that must make progress
  invalid_argument,  // bad input to a ferry function (message names it)
  timed_out,         // an optional timeout expired
  channel_closed,    // a channel or iterator was closed
  loop_gone,         // the event loop stopped or was destroyed while a thread waited on it
  no_value,          // a context_var has no value in this context and no default
  no_loop,           // sync_await found no loop in this thread's context
  invalid_token,     // a context_var token reset twice, or in another context
};

const std::error_category& error_category() noexcept;

inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

// The base of every exception ferry throws.
class error : public std::system_error {
public:
  explicit error(std::error_code ec) : std::system_error(ec) {}
  error(std::error_code ec, const std::string& what) : std::system_error(ec, what) {}
  error(errc e, const std::string& what) : std::system_error(make_error_code(e), what) {}
};

}  // namespace ferry

template <>
struct std::is_error_code_enum<ferry::errc> : std::true_type {};
