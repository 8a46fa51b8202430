#include <ferry/entrypoint.hpp>

#include <asio/signal_set.hpp>

#include <csignal>
#include <cstdio>
#include <thread>

namespace ferry {

using steady = std::chrono::steady_clock;

struct entrypoint::signal_state {
  asio::signal_set set;
  explicit signal_state(asio::io_context& io) : set(io, SIGINT, SIGTERM) {}
};

entrypoint::entrypoint(entrypoint_options options) : options_(options) {
  thread_pool_options po;
  po.threads = options_.pool_size;
  po.spin = options_.pool_spin;
  po.name = "ferry-ep";
  pool_ = std::make_unique<thread_pool>(std::move(po));
  io_ = std::make_unique<asio::io_context>(1);
  set_default_pool(*io_, *pool_);
}

entrypoint::~entrypoint() { shutdown(); }

void entrypoint::start_signals() {
  if (!options_.handle_signals || signals_) return;
  signals_ = std::make_unique<signal_state>(*io_);
  signals_->set.async_wait([this](std::error_code ec, int) {
    if (ec) return;  // cancelled at shutdown
    main_signal_.emit(asio::cancellation_type::terminal);
    for (auto& t : tasks_) {
      if (!t.done) t.signal.emit(asio::cancellation_type::terminal);
    }
  });
}

void entrypoint::request_stop() {
  asio::post(*io_, [this] {
    main_signal_.emit(asio::cancellation_type::terminal);
    for (auto& t : tasks_) {
      if (!t.done) t.signal.emit(asio::cancellation_type::terminal);
    }
  });
}

void entrypoint::report_task_failure(const std::exception_ptr& e) noexcept {
  try {
    std::rethrow_exception(e);
  } catch (const std::system_error& se) {
    if (se.code() == asio::error::operation_aborted) return;  // cancelled at shutdown
    std::fprintf(stderr, "ferry::entrypoint: a spawned task failed: %s\n", se.what());
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "ferry::entrypoint: a spawned task failed: %s\n", ex.what());
  } catch (...) {
    std::fprintf(stderr, "ferry::entrypoint: a spawned task failed (unknown exception)\n");
  }
}

bool entrypoint::run_until(const bool& done) {
  while (!done) {
    if (io_->stopped()) return false;
    if (options_.loop_spin.count() > 0) {
      const auto deadline = steady::now() + options_.loop_spin;
      std::size_t ran = 0;
      while (!done && (ran = io_->poll()) == 0 && steady::now() < deadline) {
      }
      if (done) break;
      if (ran != 0) continue;
    }
    if (io_->run_one() == 0) return done;
  }
  return true;
}

void entrypoint::shutdown() noexcept {
  if (shut_down_) return;
  shut_down_ = true;
  try {
    const auto deadline = steady::now() + options_.shutdown_timeout;
    const auto remaining = [&] {
      const auto left = deadline - steady::now();
      return left.count() > 0 ? std::chrono::duration_cast<std::chrono::nanoseconds>(left)
                              : std::chrono::nanoseconds(0);
    };
    if (io_->stopped()) io_->restart();

    // 1. Cancel what still runs and let it unwind.
    if (signals_) {
      std::error_code ignored;
      signals_->set.cancel(ignored);
    }
    for (auto& t : tasks_) {
      if (!t.done) t.signal.emit(asio::cancellation_type::terminal);
    }
    const auto tasks_left = [&] {
      std::size_t n = 0;
      for (const auto& t : tasks_) n += t.done ? 0 : 1;
      return n;
    };
    while (tasks_left() != 0 && remaining().count() > 0) {
      io_->run_one_for(std::chrono::duration_cast<std::chrono::milliseconds>(remaining()) +
                       std::chrono::milliseconds(1));
    }
    report_.tasks_still_running = tasks_left();

    // 2. Stop the pool: queued calls complete with pool_closed; deliver them; join.
    pool_->stop();
    io_->poll();
    const join_result joined = pool_->join_for(remaining());
    io_->poll();
    auto& loop = asio::use_service<detail::loop_service>(*io_);
    if (!joined.joined) report_.busy_workers = joined.still_busy;

    // 3. threaded_separate threads.
    report_.separate_threads = loop.separate_threads()->wait_all_for(remaining());
    loop.set_separate_thread_wait(std::chrono::nanoseconds(0));
    io_->poll();

    // 4. The shared context.
    shared_context::of(*io_).clear();
    io_->poll();

    // 5. The loop.
    signals_.reset();  // an I/O object of the loop: goes before it
    io_->stop();
    if (!report_.clean()) {
      std::fprintf(stderr, "ferry::entrypoint: shutdown timed out after %lld ms:",
                   static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                              options_.shutdown_timeout)
                                              .count()));
      if (report_.tasks_still_running) {
        std::fprintf(stderr, " %zu task(s) still running;", report_.tasks_still_running);
      }
      for (const auto& w : report_.busy_workers) {
        std::fprintf(stderr, " pool worker '%s' busy for %lld ms;", w.name.c_str(),
                     static_cast<long long>(w.busy_for.count() / 1000000));
      }
      for (const auto& t : report_.separate_threads) {
        std::fprintf(stderr, " separate thread '%s' running for %lld ms;", t.name.c_str(),
                     static_cast<long long>(t.running_for.count() / 1000000));
      }
      std::fprintf(stderr, " left detached\n");
      // Waiting longer would break the bound. A detached reaper takes over what the stuck
      // work still touches: it joins the pool, waits for the separate threads, and only
      // then destroys the loop, so late completions are discarded by a live loop instead
      // of touching a dead one.
      std::thread([pool = std::move(pool_), io = std::move(io_), tasks = std::move(tasks_),
                   threads = loop.separate_threads()]() mutable {
        pool.reset();
        threads->wait_all_for(std::chrono::hours(24 * 365));
        io.reset();
        tasks.clear();
      }).detach();
      return;
    }
    io_.reset();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry::entrypoint: error during shutdown: %s\n", e.what());
  }
}

}  // namespace ferry
