// Nothing may hang a benchmark run: a watchdog thread ends the program, naming the stuck
// benchmark, when an armed run exceeds its limit. It sleeps on a condition variable until
// the armed deadline, so it adds no wake-ups to what is measured. main() owns one watchdog;
// each benchmark body holds a guarded_run for its duration.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

namespace ferry_bench {

class watchdog {
public:
  explicit watchdog(std::string program) : program_(std::move(program)), thread_([this] { watch(); }) {
    current() = this;
  }
  ~watchdog() {
    current() = nullptr;
    {
      std::lock_guard lock(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  watchdog(const watchdog&) = delete;
  watchdog& operator=(const watchdog&) = delete;

  void arm(std::string what, std::chrono::seconds limit) {
    {
      std::lock_guard lock(mu_);
      what_ = std::move(what);
      deadline_ = std::chrono::steady_clock::now() + limit;
      armed_ = true;
    }
    cv_.notify_all();
  }
  void disarm() {
    std::lock_guard lock(mu_);
    armed_ = false;
  }

  // The program's watchdog, while one exists.
  static watchdog*& current() {
    static watchdog* active = nullptr;
    return active;
  }

private:
  void watch() {
    std::unique_lock lock(mu_);
    while (!quit_) {
      if (!armed_) {
        cv_.wait(lock);
        continue;
      }
      if (std::chrono::steady_clock::now() >= deadline_) {
        std::fflush(stdout);
        std::fprintf(stderr, "%s: %s did not finish within its time limit; exiting instead of hanging\n",
                     program_.c_str(), what_.c_str());
        std::_Exit(3);
      }
      cv_.wait_until(lock, deadline_);
    }
  }

  const std::string program_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool quit_ = false;
  bool armed_ = false;
  std::string what_;
  std::chrono::steady_clock::time_point deadline_{};
  std::thread thread_;  // last: starts after the members it reads
};

// Arms the program's watchdog (if any) for one benchmark run.
class guarded_run {
public:
  explicit guarded_run(std::string name, std::chrono::seconds limit = std::chrono::seconds(120)) {
    if (watchdog* w = watchdog::current()) w->arm(std::move(name), limit);
  }
  ~guarded_run() {
    if (watchdog* w = watchdog::current()) w->disarm();
  }
  guarded_run(const guarded_run&) = delete;
  guarded_run& operator=(const guarded_run&) = delete;
};

}  // namespace ferry_bench
