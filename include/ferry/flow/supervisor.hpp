// ferry/flow/supervisor.hpp — managers that wire one pipeline each, and the supervisor that
// runs them reliably (the aiopype seed's Manager and Flow).
//
//     namespace fl = ferry::flow;
//     class price_manager : public fl::manager {
//     public:
//       explicit price_manager(fl::manager_args a) : fl::manager(std::move(a)) {
//         fl::on(source_.data, [this](const std::string& body, auto t) { return extract_.handle(body, t); });
//         fl::on(extract_.price, writer_.sink());
//         set_source(source_);
//       }
//     private:
//       fl::rest_source source_{*this, "source", {.url = "http://127.0.0.1:8080/quote"}};
//       extract_price extract_{*this, "processor"};
//       fl::csv_output<std::chrono::system_clock::time_point, double> writer_{
//           *this, "writer", {.path = "prices.csv", .header = {"time", "price"}}};
//     };
//
//     fl::context root{io};
//     fl::queued_handler handler{io};
//     fl::supervisor flow{root, handler, [](const fl::failure_report& r) { log(r); }};
//     flow.add<price_manager>("prices", {.policy = fl::restart_policy::always});
//     co_await flow.run();                 // until every manager ended, or stop()
//
// Rules (spec/flow-processors.md A5, A6):
//  * A manager gets its name, message handler, a fresh child context and the supervisor's
//    reporter in manager_args; its constructor builds processors (named
//    "<manager>.<name>") and wiring. run() runs the source set with set_source() and
//    completes when it is done (A5); the first exception on the manager's error path
//    (fail(): a handler's exception, a source's failure) cancels the source and is what
//    run() throws once the source has stopped. close() disconnects every processor's
//    handlers and waits for deliveries in flight; with `drain` it first delivers what the
//    manager's topics still hold.
//  * The supervisor (A6) starts every registered manager when run() starts. A manager's
//    end is seen at once: its run() is a coroutine whose completion the supervisor awaits.
//    Every failure is reported to the error reporter (failure_report). A manager with
//    restart_policy::always that failed is torn down — handlers disconnected, the manager
//    destroyed, its child context closed (its resources' teardown callbacks run) — and,
//    after a delay, rebuilt by its factory in a fresh child context. The delay starts at
//    `initial_delay` and is multiplied by `factor` for every restart already in the window,
//    up to `max_delay`; more than `max_restarts` restarts within `window` gives up: the
//    report has gave_up set and an errc::restart_limit error. A manager that completes
//    normally (its source is done) is drained, torn down and not restarted.
//  * stop() stops every source (in registration order), drains the message handler (all of
//    it: give a supervisor a handler of its own), then tears the managers down in
//    registration order; run() then completes. Messages kept for a manager that is waiting
//    to restart (or gave up) stay in the handler: queued_handler::stats().pending counts them. A manager's
//    teardown failure (teardown_error from its context) is reported, never thrown.
//  * Threads: the supervisor, its managers and their contexts live on the executor of the
//    root context (one thread or a strand). run() and stop() are awaited there.
#pragma once

#include <ferry/flow/context.hpp>
#include <ferry/flow/processor.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace ferry::flow {

// One failure (or non-fatal report) as the error reporter sees it.
struct failure_report {
  std::string manager;        // the manager's name
  std::exception_ptr error;   // what went wrong
  bool fatal = true;          // false: a report that did not end the manager
  std::size_t restarts = 0;   // restarts of this manager within the window so far
  // Set when the manager will be rebuilt: after this delay.
  std::optional<std::chrono::steady_clock::duration> restart_in;
  bool gave_up = false;       // the restart limit was reached; the manager stays down
};

using error_reporter = std::function<void(const failure_report&)>;

// What a manager is built from.
struct manager_args {
  std::string name;
  message_handler* handler = nullptr;
  context ctx;
  error_reporter reporter;  // empty: reports go to stderr
};

namespace detail {
struct manager_state;
}

class manager {
public:
  explicit manager(manager_args args);
  virtual ~manager();
  manager(const manager&) = delete;
  manager& operator=(const manager&) = delete;

  const std::string& name() const noexcept { return name_; }
  message_handler& handler() const noexcept { return *handler_; }
  // The manager's own child context: resources of this pipeline and their teardown.
  context& ctx() noexcept { return ctx_; }
  // "<manager name>.<name>", the seed's build_processor_name.
  std::string build_processor_name(std::string_view name) const;

  // The source whose end is the manager's end. Call once, from the constructor.
  void set_source(source& s);

  // Runs the source; see the header comment. errc::no_source without one.
  virtual asio::awaitable<void> run();
  // The error path: ends run() with `e` (the first one wins). Any thread.
  void fail(std::exception_ptr e);
  // The non-fatal report path (failure_report::fatal == false). Any thread.
  void report(std::exception_ptr e);
  // fail() as a function object that stays valid after the manager is gone (it then does
  // nothing): the error path handed to subscribers.
  std::function<void(std::exception_ptr)> error_path() const;
  // True from the first fail() on: handlers connected by this manager's processors take
  // no more messages (a queued handler keeps them for the next instance).
  std::shared_ptr<const std::atomic<bool>> halted_flag() const;
  // The first exception given to fail(), or null.
  std::exception_ptr failure() const;
  // Disconnects every processor of this manager (after draining its topics if `drain`).
  asio::awaitable<void> close(bool drain = false);

private:
  friend class processor;
  void adopt(processor& p);
  void forget(processor& p);

  std::string name_;
  message_handler* handler_;
  context ctx_;
  error_reporter reporter_;
  source* source_ = nullptr;
  std::vector<processor*> processors_;
  std::shared_ptr<detail::manager_state> state_;
};

enum class restart_policy { never, always };

struct restart_options {
  restart_policy policy = restart_policy::never;
  std::chrono::milliseconds initial_delay{100};
  std::chrono::milliseconds max_delay{30000};
  double factor = 2.0;
  std::size_t max_restarts = 5;           // within `window`
  std::chrono::milliseconds window{60000};
};

// How a registered manager stands.
struct manager_status {
  std::string name;
  bool running = false;        // a manager instance exists and runs
  std::size_t starts = 0;      // instances built so far
  std::size_t failures = 0;    // instances that failed
  bool gave_up = false;
  bool done = false;           // ended for good: done, stopped, failed without restart, gave up
};

namespace detail {
struct supervisor_state;
}

class supervisor {
public:
  using factory = std::function<std::unique_ptr<manager>(manager_args)>;

  // Managers get child contexts of `root` and publish through `handler`; failures go to
  // `reporter` (empty: stderr).
  supervisor(context root, message_handler& handler, error_reporter reporter = {});
  ~supervisor();
  supervisor(const supervisor&) = delete;
  supervisor& operator=(const supervisor&) = delete;

  // Registers a manager built by `make` (called again for every restart). Before run().
  void add(std::string name, factory make, restart_options options = {});
  // Registers manager type M, built as M(manager_args, extra...) (extra copied per build).
  template <class M, class... Extra>
  void add(std::string name, restart_options options = {}, Extra... extra) {
    add(std::move(name),
        factory([... extra = std::move(extra)](manager_args a) -> std::unique_ptr<manager> {
          return std::make_unique<M>(std::move(a), extra...);
        }),
        options);
  }

  // Starts every manager; completes when every one has ended for good (or after stop()).
  // Cancelling run() is stop() without the drain.
  asio::awaitable<void> run();
  // Stops sources, drains the handler, tears managers down in order; waits for run()'s end.
  asio::awaitable<void> stop();
  std::vector<manager_status> status() const;

private:
  std::shared_ptr<detail::supervisor_state> state_;
};

}  // namespace ferry::flow
