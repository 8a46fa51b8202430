// Helpers shared by the suites that drive coroutines on an io_context (the flow suites).
#pragma once

#include "test_support.hpp"

#include <asio/co_spawn.hpp>
#include <asio/io_context.hpp>

#include <exception>
#include <string>
#include <system_error>
#include <utility>

namespace ferry_test {

// Runs `body()` on `io` until the loop runs out of work; rethrows its failure here, on the
// main thread. `body` is an lvalue: the lambda outlives the coroutine it starts.
template <class Body>
void run(asio::io_context& io, Body& body) {
  std::exception_ptr failure;
  bool finished = false;
  asio::co_spawn(io, body(), [&](std::exception_ptr e) {
    failure = e;
    finished = true;
  });
  io.run();
  io.restart();
  BOOST_REQUIRE(finished);
  if (failure) std::rethrow_exception(failure);
}

// The error code a synchronous call throws (a default-constructed code if it does not).
template <class F>
std::error_code error_of(F&& f) {
  try {
    std::forward<F>(f)();
  } catch (const std::system_error& e) {
    return e.code();
  }
  return {};
}

// The error code an exception_ptr carries (a default-constructed code if none).
inline std::error_code code_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::system_error& s) {
    return s.code();
  } catch (...) {
  }
  return {};
}

inline std::string message_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "<not a std::exception>";
  }
}

inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace ferry_test
