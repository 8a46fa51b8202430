// Managers and the supervisor: include/ferry/flow/supervisor.hpp.
#include <ferry/flow/supervisor.hpp>
#include <ferry/flow/detail/loop_event.hpp>

#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/this_coro.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <cmath>
#include <deque>
#include <iostream>
#include <mutex>

namespace ferry::flow {

using asio::experimental::as_tuple;

namespace {
void report_to(const error_reporter& reporter, const failure_report& r) {
  if (reporter) {
    try {
      reporter(r);
    } catch (const std::exception& e) {
      std::cerr << "ferry::flow: the error reporter threw: " << e.what() << '\n';
    } catch (...) {
      std::cerr << "ferry::flow: the error reporter threw\n";
    }
    return;
  }
  std::cerr << "ferry::flow: manager '" << r.manager << "'" << (r.fatal ? " failed: " : ": ")
            << describe_exception(r.error);
  if (r.restart_in) {
    std::cerr << " (restart in "
              << std::chrono::duration_cast<std::chrono::milliseconds>(*r.restart_in).count()
              << " ms)";
  }
  if (r.gave_up) std::cerr << " (restart limit reached: gave up)";
  std::cerr << '\n';
}

bool cancelled(const asio::cancellation_state& s) {
  return s.cancelled() != asio::cancellation_type::none;
}
}  // namespace

// --- manager ---------------------------------------------------------------------------------
namespace detail {
// Shared by the manager, its error path (held by subscribers) and its run().
struct manager_state : std::enable_shared_from_this<manager_state> {
  manager_state(std::string n, asio::any_io_executor e, error_reporter r)
      : name(std::move(n)), ex(std::move(e)), reporter(std::move(r)) {}
  const std::string name;
  const asio::any_io_executor ex;
  const error_reporter reporter;
  mutable std::mutex mu;
  std::exception_ptr failure;  // (mu) the first one
  std::shared_ptr<std::atomic<bool>> halted = std::make_shared<std::atomic<bool>>(false);
  // On ex only:
  bool running = false;
  asio::cancellation_signal cancel_source;

  void fail(std::exception_ptr e) {
    {
      std::lock_guard lock(mu);
      if (failure) {
        // Not lost: a later failure of a pipeline already going down is still reported.
        if (e != failure) report(std::move(e));
        return;
      }
      failure = std::move(e);
      halted->store(true, std::memory_order_seq_cst);
    }
    // The source is stopped on its own executor.
    asio::post(ex, [self = shared_from_this()] {
      if (self->running) self->cancel_source.emit(asio::cancellation_type::terminal);
    });
  }
  void report(std::exception_ptr e) {
    asio::post(ex, [self = shared_from_this(), e = std::move(e)]() mutable {
      failure_report r;
      r.manager = self->name;
      r.error = std::move(e);
      r.fatal = false;
      report_to(self->reporter, r);
    });
  }
  std::exception_ptr first_failure() const {
    std::lock_guard lock(mu);
    return failure;
  }
};
}  // namespace detail

manager::manager(manager_args args)
    : name_(std::move(args.name)),
      handler_(args.handler),
      ctx_(std::move(args.ctx)),
      reporter_(std::move(args.reporter)) {
  if (handler_ == nullptr) {
    throw ferry::error(ferry::errc::invalid_argument, "manager '" + name_ + "': no message handler");
  }
  if (name_.empty()) throw ferry::error(ferry::errc::invalid_argument, "manager: the name must not be empty");
  state_ = std::make_shared<detail::manager_state>(name_, ctx_.get_executor(), reporter_);
}

manager::~manager() = default;

std::string manager::build_processor_name(std::string_view name) const {
  if (name.empty()) {
    throw ferry::error(ferry::errc::invalid_argument,
                       "manager '" + name_ + "': a processor name must not be empty");
  }
  std::string out = name_;
  out += '.';
  out += name;
  return out;
}

void manager::adopt(processor& p) { processors_.push_back(&p); }
void manager::forget(processor& p) {
  std::erase(processors_, &p);
  if (source_ == &p) source_ = nullptr;
}

void manager::set_source(source& s) {
  if (s.owner() != this) {
    throw ferry::error(ferry::errc::invalid_argument,
                       "manager '" + name_ + "': source '" + s.name() + "' belongs to another manager");
  }
  source_ = &s;
}

std::function<void(std::exception_ptr)> manager::error_path() const {
  return [w = std::weak_ptr<detail::manager_state>(state_)](std::exception_ptr e) {
    if (auto st = w.lock()) st->fail(std::move(e));
  };
}

void manager::fail(std::exception_ptr e) { state_->fail(std::move(e)); }

void manager::report(std::exception_ptr e) { state_->report(std::move(e)); }

std::shared_ptr<const std::atomic<bool>> manager::halted_flag() const { return state_->halted; }

std::exception_ptr manager::failure() const { return state_->first_failure(); }

namespace {
// Runs the source under the manager's cancellation signal; see manager::run.
asio::awaitable<void> run_manager(std::shared_ptr<detail::manager_state> st, source* src) {
  if (auto f = st->first_failure()) std::rethrow_exception(f);
  auto ex = co_await asio::this_coro::executor;
  struct join {
    explicit join(const asio::any_io_executor& e) : wake(e) {}
    flow::detail::loop_event wake;
    bool done = false;
    std::exception_ptr error;
  };
  auto j = std::make_shared<join>(ex);
  // The source references the manager: this frame waits for it whatever happens.
  const bool throwing = co_await asio::this_coro::throw_if_cancelled();
  co_await asio::this_coro::throw_if_cancelled(false);
  st->running = true;
  asio::co_spawn(ex, src->run(),
                 asio::bind_cancellation_slot(st->cancel_source.slot(), [j](std::exception_ptr e) {
                   j->done = true;
                   j->error = std::move(e);
                   j->wake.notify();
                 }));
  if (st->first_failure()) st->cancel_source.emit(asio::cancellation_type::terminal);
  bool forwarded = false;
  while (!j->done) {
    if (!forwarded) {
      asio::cancellation_state cs = co_await asio::this_coro::cancellation_state;
      if (cancelled(cs)) {
        forwarded = true;
        st->cancel_source.emit(asio::cancellation_type::terminal);
      }
    }
    auto wait = j->wake.wait();
    co_await std::move(wait);
  }
  st->running = false;
  st->cancel_source.slot().clear();
  co_await asio::this_coro::throw_if_cancelled(throwing);
  if (auto f = st->first_failure()) std::rethrow_exception(f);
  if (forwarded) throw std::system_error(asio::error::operation_aborted);
  if (j->error) std::rethrow_exception(j->error);
}
}  // namespace

asio::awaitable<void> manager::run() {
  if (source_ == nullptr) {
    throw ferry::error(make_error_code(errc::no_source),
                       "manager '" + name_ + "' has no source: call set_source() in its constructor");
  }
  return run_manager(state_, source_);
}

namespace {
asio::awaitable<void> close_manager(std::vector<processor*> procs, bool drain) {
  if (drain) {
    // A handler may emit downstream while a topic drains: go round until a whole pass
    // found every topic idle at once... bounded by the pipeline's depth in practice.
    for (std::size_t pass = 0; pass < 2 + procs.size(); ++pass) {
      for (processor* p : procs) {
        for (detail::port_base* port : p->ports()) {
          auto op = port->drain();
          co_await std::move(op);
        }
      }
    }
  }
  for (processor* p : procs) {
    auto op = p->disconnect();
    co_await std::move(op);
  }
}
}  // namespace

asio::awaitable<void> manager::close(bool drain) { return close_manager(processors_, drain); }

// --- supervisor ------------------------------------------------------------------------------
namespace detail {
struct supervised_entry {
  std::string name;
  supervisor::factory make;
  restart_options options;
  manager_status status;
  std::deque<std::chrono::steady_clock::time_point> restarts;  // within the window
  asio::cancellation_signal stop;  // cancels the running manager or the back-off wait
  // Cancelling is safe while a manager runs or the back-off waits, never in a teardown.
  enum class phase { starting, running, teardown, backoff } at = phase::starting;
  bool stop_requested = false;
  bool run_returned = false;       // the current manager's run() is over (teardown pending)
  bool teardown_go = false;        // stop(): tear down now (after the drain)
  bool ended = false;
};

struct supervisor_state {
  supervisor_state(context r, message_handler& h, error_reporter rep)
      : root(std::move(r)), handler(&h), reporter(std::move(rep)),
        wake(root.get_executor()) {}
  context root;
  message_handler* handler;
  error_reporter reporter;
  std::vector<std::unique_ptr<supervised_entry>> entries;
  flow::detail::loop_event wake;  // notify() wakes every waiter, who re-checks
  bool started = false;
  bool running = false;
  bool stopping = false;

  void notify() { wake.notify(); }
  asio::awaitable<void> wait() {
    auto op = wake.wait();
    co_await std::move(op);
  }
  // Stops an entry's manager (or back-off) now, or after its teardown if it is in one.
  void request_stop(supervised_entry& e) {
    e.stop_requested = true;
    if (e.at == supervised_entry::phase::running || e.at == supervised_entry::phase::backoff) {
      e.stop.emit(asio::cancellation_type::terminal);
    }
  }
  bool all_ended() const {
    return std::all_of(entries.begin(), entries.end(), [](const auto& e) { return e->ended; });
  }
};

namespace {
std::chrono::steady_clock::duration backoff(const restart_options& o, std::size_t previous) {
  double ms = static_cast<double>(o.initial_delay.count()) *
              std::pow(std::max(1.0, o.factor), static_cast<double>(previous));
  ms = std::min(ms, static_cast<double>(o.max_delay.count()));
  return std::chrono::milliseconds(static_cast<long long>(ms));
}

bool is_abort(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::system_error& x) {
    return x.code() == asio::error::operation_aborted;
  } catch (...) {
    return false;
  }
}

// Counts and reports a failure; returns the back-off delay when the manager is to be rebuilt.
std::optional<std::chrono::steady_clock::duration> judge(supervisor_state& st, supervised_entry& e,
                                                         const std::exception_ptr& error) {
  const restart_options& opt = e.options;
  ++e.status.failures;
  failure_report r{e.name, error, true, 0, {}, false};
  if (opt.policy != restart_policy::always) {
    report_to(st.reporter, r);
    return std::nullopt;
  }
  const auto now = std::chrono::steady_clock::now();
  while (!e.restarts.empty() && now - e.restarts.front() > opt.window) e.restarts.pop_front();
  r.restarts = e.restarts.size();
  if (e.restarts.size() >= opt.max_restarts) {
    r.gave_up = true;
    e.status.gave_up = true;
    report_to(st.reporter, r);
    return std::nullopt;
  }
  r.restart_in = backoff(opt, e.restarts.size());
  report_to(st.reporter, r);
  return r.restart_in;
}

asio::awaitable<void> run_entry(std::shared_ptr<supervisor_state> st, supervised_entry* e) {
  co_await asio::this_coro::throw_if_cancelled(false);
  auto ex = co_await asio::this_coro::executor;
  using phase = supervised_entry::phase;
  for (;;) {
    if (st->stopping || e->stop_requested) break;
    std::optional<context> child;
    std::unique_ptr<manager> m;
    std::exception_ptr error;
    ++e->status.starts;
    try {
      child.emplace(st->root.make_child());
      manager_args args{e->name, st->handler, *child,
                        [w = std::weak_ptr<supervisor_state>(st)](const failure_report& r) {
                          if (auto s = w.lock()) report_to(s->reporter, r);
                        }};
      m = e->make(std::move(args));
      if (!m) {
        throw ferry::error(ferry::errc::invalid_argument,
                           "supervisor: the factory of '" + e->name + "' returned no manager");
      }
    } catch (...) {
      error = std::current_exception();
    }
    if (m) {
      e->status.running = true;
      e->at = phase::running;
      try {
        auto op = m->run();
        co_await std::move(op);
      } catch (...) {
        error = std::current_exception();
      }
    }
    e->at = phase::teardown;
    e->run_returned = true;
    st->notify();
    const bool stopped = st->stopping || e->stop_requested;
    if (st->stopping) {
      while (!e->teardown_go) {
        auto op = st->wait();
        co_await std::move(op);
      }
    }
    // A failure is reported at once, before the teardown, with what happens next.
    std::optional<std::chrono::steady_clock::duration> restart_in;
    const bool judged = error && !stopped;
    if (judged) restart_in = judge(*st, *e, error);
    if (m) {
      try {
        auto op = m->close(!error && !stopped);
        co_await std::move(op);
      } catch (...) {
        if (!error) error = std::current_exception();
      }
      if (!error) error = m->failure();
      m.reset();  // its processors and listeners go first ...
    }
    try {
      if (child) {
        auto op = child->close(error);  // ... then its resources
        co_await std::move(op);
      }
    } catch (...) {
      failure_report r;
      r.manager = e->name;
      r.error = std::current_exception();
      r.fatal = false;
      report_to(st->reporter, r);
    }
    e->status.running = false;
    e->run_returned = false;
    if (stopped) {
      if (error && !is_abort(error)) report_to(st->reporter, {e->name, error, true, e->restarts.size(), {}, false});
      break;
    }
    if (!error) break;  // the source is done: so is the manager
    if (!judged) restart_in = judge(*st, *e, error);  // a failure found while closing
    if (!restart_in) break;
    const auto delay = *restart_in;
    if (st->stopping || e->stop_requested) break;
    e->at = phase::backoff;
    asio::steady_timer timer(ex, delay);
    auto op = timer.async_wait(as_tuple(asio::use_awaitable));
    auto [ec] = co_await std::move(op);
    e->at = phase::starting;
    if (ec || st->stopping || e->stop_requested) break;
    e->restarts.push_back(std::chrono::steady_clock::now());
  }
  e->status.done = true;
}
}  // namespace
}  // namespace detail

supervisor::supervisor(context root, message_handler& handler, error_reporter reporter)
    : state_(std::make_shared<detail::supervisor_state>(std::move(root), handler, std::move(reporter))) {}

supervisor::~supervisor() = default;

void supervisor::add(std::string name, factory make, restart_options options) {
  if (state_->started) {
    throw ferry::error(ferry::errc::invalid_argument,
                       "supervisor: add('" + name + "') after run() started");
  }
  if (name.empty() || !make) {
    throw ferry::error(ferry::errc::invalid_argument, "supervisor: add needs a name and a factory");
  }
  if (options.factor < 1.0 || options.initial_delay.count() < 0 || options.max_delay < options.initial_delay) {
    throw ferry::error(ferry::errc::invalid_argument,
                       "supervisor: restart options of '" + name +
                           "' need factor >= 1 and 0 <= initial_delay <= max_delay");
  }
  for (const auto& e : state_->entries) {
    if (e->name == name) {
      throw ferry::error(ferry::errc::invalid_argument, "supervisor: a manager named '" + name + "' is already registered");
    }
  }
  auto e = std::make_unique<detail::supervised_entry>();
  e->name = std::move(name);
  e->make = std::move(make);
  e->options = options;
  e->status.name = e->name;
  state_->entries.push_back(std::move(e));
}

namespace {
asio::awaitable<void> run_supervisor(std::shared_ptr<detail::supervisor_state> st) {
  if (st->started) {
    throw ferry::error(ferry::errc::invalid_argument, "supervisor: run() called twice");
  }
  st->started = true;
  st->running = true;
  const bool throwing = co_await asio::this_coro::throw_if_cancelled();
  co_await asio::this_coro::throw_if_cancelled(false);
  for (auto& up : st->entries) {
    detail::supervised_entry* e = up.get();
    if (st->stopping) {
      e->ended = true;
      e->status.done = true;
      continue;
    }
    asio::co_spawn(st->root.get_executor(), detail::run_entry(st, e),
                   asio::bind_cancellation_slot(e->stop.slot(), [st, e](std::exception_ptr x) {
                     if (x) {  // not expected: run_entry handles its failures; never silent
                       report_to(st->reporter, {e->name, x, true, e->restarts.size(), {}, false});
                     }
                     e->status.done = true;
                     e->status.running = false;
                     e->ended = true;
                     st->notify();
                   }));
  }
  bool forwarded = false;
  while (!st->all_ended()) {
    if (!forwarded) {
      asio::cancellation_state cs = co_await asio::this_coro::cancellation_state;
      if (cancelled(cs)) {
        forwarded = true;
        for (auto& e : st->entries) {
          if (!e->ended) st->request_stop(*e);
        }
      }
    }
    auto op = st->wait();
    co_await std::move(op);
  }
  st->running = false;
  st->notify();
  co_await asio::this_coro::throw_if_cancelled(throwing);
  if (forwarded) throw std::system_error(asio::error::operation_aborted);
}

asio::awaitable<void> stop_supervisor(std::shared_ptr<detail::supervisor_state> st) {
  if (st->stopping) {
    while (st->running) {
      auto op = st->wait();
      co_await std::move(op);
    }
    co_return;
  }
  st->stopping = true;
  if (!st->running) co_return;
  // 1. Sources, in registration order: no new messages.
  for (auto& e : st->entries) {
    if (e->ended) continue;
    st->request_stop(*e);
    while (!e->run_returned && !e->ended) {
      auto op = st->wait();
      co_await std::move(op);
    }
  }
  // 2. Deliver what is queued, while every manager's handlers are still connected.
  try {
    auto op = st->handler->drain();
    co_await std::move(op);
  } catch (...) {
    report_to(st->reporter, {"(supervisor)", std::current_exception(), false, 0, {}, false});
  }
  // 3. Tear the managers down, in registration order.
  for (auto& e : st->entries) {
    e->teardown_go = true;
    st->notify();
    while (!e->ended) {
      auto op = st->wait();
      co_await std::move(op);
    }
  }
  while (st->running) {
    auto op = st->wait();
    co_await std::move(op);
  }
}
}  // namespace

asio::awaitable<void> supervisor::run() { return run_supervisor(state_); }
asio::awaitable<void> supervisor::stop() { return stop_supervisor(state_); }

std::vector<manager_status> supervisor::status() const {
  std::vector<manager_status> out;
  for (const auto& e : state_->entries) out.push_back(e->status);
  return out;
}

}  // namespace ferry::flow
