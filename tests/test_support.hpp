// Shared helpers for ferry's Boost.Test suites.
#pragma once

#include <boost/test/unit_test.hpp>

#include <chrono>
#include <condition_variable>
#include <mutex>

// Every test case gets a timeout so that a hang fails fast instead of stalling CI. The
// bound is generous because the sanitizer builds run several times slower.
#define FERRY_TEST_CASE(name) BOOST_AUTO_TEST_CASE(name, *boost::unit_test::timeout(120))

namespace ferry_test {

// Futures that carry an exception are read through std::shared_future in these tests. Why:
// libstdc++.so is not built with TSan, so the exception's reference count is invisible to
// it. std::future::get() drops its reference to the shared state *before* the catch block
// reads the exception; the worker then drops the last reference and frees it, and TSan,
// blind to the uninstrumented refcount, reports a race that cannot happen. A shared_future
// kept alive across the catch keeps the last release ordered through the (instrumented)
// shared-state refcount instead. The library itself never keeps an exception_ptr copy on
// the worker after handing it to the waiter.

// A one-shot gate threads can wait on (tests must not rely on sleeps for ordering).
class gate {
public:
  // Notifies under the lock: a waiter may destroy the gate as soon as it sees it open.
  void open() {
    std::lock_guard lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return open_; });
  }
  bool wait_for(std::chrono::milliseconds d) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, d, [&] { return open_; });
  }
  bool is_open() {
    std::lock_guard lock(mu_);
    return open_;
  }

private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

}  // namespace ferry_test
