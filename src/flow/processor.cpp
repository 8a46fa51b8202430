// Message handlers (inline and queued), ports and processors: include/ferry/flow/processor.hpp.
#include <ferry/flow/processor.hpp>
#include <ferry/flow/supervisor.hpp>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/post.hpp>
#include <asio/use_awaitable.hpp>

#include <algorithm>
#include <deque>
#include <iostream>
#include <unordered_map>

namespace ferry::flow {

using subscriber_list = std::vector<std::shared_ptr<subscriber>>;

// --- subscriber ------------------------------------------------------------------------------
// enter()/leave() and close() are a Dekker hand-shake of seq_cst operations: a delivery
// first counts itself in flight, then looks at `closed`; close() first sets `closed`, then
// looks at the count. Whichever comes second in the total order sees the other, so either
// the delivery backs off or close() waits for it.
namespace {
bool enter(subscriber& s) {
  s.in_flight.fetch_add(1, std::memory_order_seq_cst);
  if (!s.live()) {
    if (s.in_flight.fetch_sub(1, std::memory_order_seq_cst) == 1) s.idle.wake_all();
    return false;
  }
  return true;
}

void leave(subscriber& s) {
  if (s.in_flight.fetch_sub(1, std::memory_order_seq_cst) == 1) s.idle.wake_all();
}

template <class Ready>
asio::awaitable<void> wait_on(ferry::detail::loop_waiters& waiters, std::shared_ptr<const void> keep,
                              Ready ready) {
  while (!ready()) {
    auto op = ferry::detail::async_wait_until(waiters, keep, ready, std::nullopt, asio::use_awaitable);
    co_await std::move(op);
  }
}
}  // namespace

asio::awaitable<std::exception_ptr> subscriber::run(const void* payload) {
  if (!enter(*this)) co_return nullptr;
  std::exception_ptr failure;
  try {
    if (deliver) {
      deliver(payload);
    } else {
      auto op = deliver_async(payload);
      co_await std::move(op);
    }
  } catch (...) {
    failure = std::current_exception();
  }
  leave(*this);
  co_return failure;
}

asio::awaitable<void> subscriber::close() {
  closed.store(true, std::memory_order_seq_cst);
  ferry::detail::loop_waiters& waiters = idle;
  std::atomic<int>& count = in_flight;
  auto op = wait_on(waiters, nullptr, [&count] { return count.load(std::memory_order_seq_cst) == 0; });
  co_await std::move(op);
}

namespace detail {

// One topic of an in-process handler. Fields marked (mu) are guarded by the core's mutex.
struct topic_impl final : topic {
  topic_impl(std::string name, std::type_index type) : topic(std::move(name), type) {}
  std::shared_ptr<const subscriber_list> subs = std::make_shared<const subscriber_list>();  // (mu)
  std::deque<std::shared_ptr<const void>> queue;  // (mu) queued handler: not yet taken
  bool consumer_running = false;                  // (mu)
  // Queued: published, not yet acknowledged (queued + being delivered). Inline: publishes
  // running. seq_cst: the room and idle waiters read it (see loop_waiters.hpp).
  std::atomic<std::size_t> unacked{0};
  ferry::detail::loop_waiters room;  // publishers waiting for unacked < capacity
};

class handler_core : public std::enable_shared_from_this<handler_core> {
public:
  mutable std::mutex mu;
  std::unordered_map<std::string, std::shared_ptr<topic_impl>> topics;  // (mu)
  std::exception_ptr kept;                                              // (mu)
  ferry::detail::loop_waiters idle;  // drain(): woken whenever a message is acknowledged
  // Queued handler only.
  std::optional<asio::strand<asio::any_io_executor>> strand;
  std::size_t capacity = 0;
  std::atomic<bool> stopped{false};
  std::atomic<std::uint64_t> published{0};
  std::atomic<std::uint64_t> acknowledged{0};
  std::atomic<std::uint64_t> waits{0};
  std::atomic<std::size_t> pending{0};

  std::shared_ptr<topic> open(const std::string& name, std::type_index type) {
    std::lock_guard lock(mu);
    auto it = topics.find(name);
    if (it != topics.end()) {
      if (it->second->payload_type() != type) {
        throw ferry::error(make_error_code(errc::type_mismatch),
                           "topic '" + name + "' carries " + type_name(it->second->payload_type()) +
                               ", not " + type_name(type));
      }
      return it->second;
    }
    auto t = std::make_shared<topic_impl>(name, type);
    topics.emplace(name, t);
    return t;
  }

  // Adds `s`, dropping subscribers closed meanwhile. True if a parked queue should restart.
  bool add(topic_impl& t, std::shared_ptr<subscriber> s) {
    std::lock_guard lock(mu);
    auto next = std::make_shared<subscriber_list>();
    for (const auto& old : *t.subs) {
      if (old->live()) next->push_back(old);
    }
    next->push_back(std::move(s));
    t.subs = std::move(next);
    if (strand && !t.queue.empty() && !t.consumer_running) {
      t.consumer_running = true;
      return true;
    }
    return false;
  }

  void remove(topic_impl& t, const std::shared_ptr<subscriber>& s) {
    std::lock_guard lock(mu);
    auto next = std::make_shared<subscriber_list>();
    for (const auto& old : *t.subs) {
      if (old != s && old->live()) next->push_back(old);
    }
    t.subs = std::move(next);
  }

  // A subscriber's exception: its error path, else kept for the emitter / drain().
  void failed(const subscriber& s, std::exception_ptr e, std::exception_ptr* first) {
    if (s.on_error) {
      s.on_error(std::move(e));
    } else if (first) {
      if (!*first) *first = std::move(e);
    } else {
      std::lock_guard lock(mu);
      if (!kept) kept = std::move(e);
    }
  }

  std::exception_ptr take_kept() {
    std::lock_guard lock(mu);
    return std::exchange(kept, nullptr);
  }

  static bool listened(const topic_impl& t) {
    // (mu held)
    for (const auto& s : *t.subs) {
      if (s->live()) return true;
    }
    return false;
  }

  bool topic_idle(const topic_impl& t) const {
    // (mu held)
    if (!listened(t) && !t.consumer_running) return true;  // parked: nobody to deliver to
    return t.queue.empty() && t.unacked.load(std::memory_order_seq_cst) == 0;
  }

  bool all_idle() const {
    std::lock_guard lock(mu);
    for (const auto& [name, t] : topics) {
      if (!topic_idle(*t)) return false;
    }
    return true;
  }

  bool one_idle(const topic_impl& t) const {
    std::lock_guard lock(mu);
    return topic_idle(t);
  }

  void start_consumer(const std::shared_ptr<topic_impl>& t);

  // The consumer of one topic, on the strand: takes messages in order and delivers each
  // to every open subscriber, awaiting coroutine handlers; acknowledges it afterwards.
};

// Delivers one message to every live subscriber of `subs`, in order, awaiting coroutine
// handlers. A handler's exception goes to its error path, else to `first` (the inline
// emitter's), else is kept for drain(). Shared by the inline publish and the consumers.
struct delivery_outcome {
  bool delivered = false;  // some subscriber took it
  bool redeliver = false;  // a handler failed into its pipeline's error path
};

asio::awaitable<delivery_outcome> deliver_all(handler_core& core, const subscriber_list& subs,
                                              const void* payload, std::exception_ptr* first) {
  delivery_outcome out;
  for (const auto& s : subs) {
    if (!enter(*s)) continue;
    out.delivered = true;
    std::exception_ptr failure;
    if (s->deliver) {
      try {
        s->deliver(payload);
      } catch (...) {
        failure = std::current_exception();
      }
    } else {
      try {
        auto op = s->deliver_async(payload);
        co_await std::move(op);
      } catch (...) {
        failure = std::current_exception();
      }
    }
    leave(*s);
    if (failure) {
      if (s->on_error) out.redeliver = true;
      core.failed(*s, std::move(failure), first);
    }
  }
  co_return out;
}

// A message leaves the queue (is acknowledged) once its subscribers are done with it. It
// goes back to the front, unacknowledged, when no subscriber could take it (all closed or
// halted under us) or when a handler failed into its pipeline's error path: that pipeline
// is going down, and its next instance gets the message again (at-least-once, A8).
asio::awaitable<void> consume_loop(std::shared_ptr<handler_core> core, std::shared_ptr<topic_impl> t) {
  for (;;) {
    std::shared_ptr<const void> msg;
    std::shared_ptr<const subscriber_list> subs;
    {
      std::lock_guard lock(core->mu);
      if (t->queue.empty() || !handler_core::listened(*t)) {
        t->consumer_running = false;
        break;
      }
      msg = std::move(t->queue.front());
      t->queue.pop_front();
      subs = t->subs;
    }
    auto op = deliver_all(*core, *subs, msg.get(), nullptr);
    const delivery_outcome done = co_await std::move(op);
    if (!done.delivered || done.redeliver) {
      std::lock_guard lock(core->mu);
      t->queue.push_front(std::move(msg));
      continue;
    }
    msg.reset();
    t->unacked.fetch_sub(1, std::memory_order_seq_cst);
    core->pending.fetch_sub(1, std::memory_order_relaxed);
    core->acknowledged.fetch_add(1, std::memory_order_relaxed);
    t->room.wake_all();
    core->idle.wake_all();
  }
}

// The consumer of one topic, on the strand.
asio::awaitable<void> consume(std::shared_ptr<handler_core> core, std::shared_ptr<topic_impl> t) {
  try {
    auto op = consume_loop(core, t);
    co_await std::move(op);
  } catch (...) {
    // Not expected (handler exceptions are caught); never leave the topic marked as having
    // a consumer, or drain() would wait for it forever.
    std::lock_guard lock(core->mu);
    t->consumer_running = false;
    if (!core->kept) core->kept = std::current_exception();
  }
  core->idle.wake_all();
}

// Posted, never dispatched: a publisher must not find itself delivering (emit returns
// first, A2), even when it runs on the thread that would run the strand.
void handler_core::start_consumer(const std::shared_ptr<topic_impl>& t) {
  asio::post(*strand, [core = shared_from_this(), t] {
    asio::co_spawn(*core->strand, consume(core, t), asio::detached);
  });
}

}  // namespace detail

namespace {
detail::topic_impl& impl_of(const std::shared_ptr<topic>& t) {
  return static_cast<detail::topic_impl&>(*t);
}

asio::awaitable<void> unsubscribe_from(detail::handler_core& core, const std::shared_ptr<topic>& t,
                                       std::shared_ptr<subscriber> s) {
  core.remove(impl_of(t), s);
  auto op = s->close();
  co_await std::move(op);
}

asio::awaitable<void> drain_all(std::shared_ptr<detail::handler_core> core) {
  auto op = wait_on(core->idle, core, [c = core.get()] { return c->all_idle(); });
  co_await std::move(op);
  if (auto e = core->take_kept()) std::rethrow_exception(e);
}

asio::awaitable<void> drain_one(std::shared_ptr<detail::handler_core> core, std::shared_ptr<topic> t) {
  // The wait keeps both alive: its abort path (loop teardown) touches the core's waiters.
  auto keep = std::make_shared<std::pair<std::shared_ptr<detail::handler_core>, std::shared_ptr<topic>>>(core, t);
  auto op = wait_on(core->idle, keep, [c = core.get(), &ti = impl_of(t)] { return c->one_idle(ti); });
  co_await std::move(op);
}
}  // namespace

// --- inline_handler --------------------------------------------------------------------------
inline_handler::inline_handler() : core_(std::make_shared<detail::handler_core>()) {}
inline_handler::~inline_handler() = default;

std::shared_ptr<topic> inline_handler::open(const std::string& name, std::type_index type) {
  return core_->open(name, type);
}

void inline_handler::subscribe(const std::shared_ptr<topic>& t, std::shared_ptr<subscriber> s) {
  core_->add(impl_of(t), std::move(s));
}

asio::awaitable<void> inline_handler::unsubscribe(const std::shared_ptr<topic>& t,
                                                  std::shared_ptr<subscriber> s) {
  return unsubscribe_from(*core_, t, std::move(s));
}

namespace {
asio::awaitable<void> publish_inline(std::shared_ptr<detail::handler_core> core,
                                     std::shared_ptr<topic> tp, std::shared_ptr<const void> payload) {
  auto& t = impl_of(tp);
  std::shared_ptr<const subscriber_list> subs;
  {
    std::lock_guard lock(core->mu);
    subs = t.subs;
  }
  t.unacked.fetch_add(1, std::memory_order_seq_cst);
  std::exception_ptr first;
  auto op = detail::deliver_all(*core, *subs, payload.get(), &first);
  co_await std::move(op);
  t.unacked.fetch_sub(1, std::memory_order_seq_cst);
  core->idle.wake_all();
  if (first) std::rethrow_exception(first);
}
}  // namespace

asio::awaitable<void> inline_handler::publish(const std::shared_ptr<topic>& t,
                                              std::shared_ptr<const void> payload,
                                              std::shared_ptr<const std::atomic<bool>>) {
  return publish_inline(core_, t, std::move(payload));
}

asio::awaitable<void> inline_handler::drain() { return drain_all(core_); }
asio::awaitable<void> inline_handler::drain(const std::shared_ptr<topic>& t) {
  return drain_one(core_, t);
}

// --- queued_handler --------------------------------------------------------------------------
queued_handler::queued_handler(asio::any_io_executor ex, queued_handler_options options)
    : core_(std::make_shared<detail::handler_core>()) {
  if (options.capacity == 0) {
    throw ferry::error(ferry::errc::invalid_argument, "queued_handler: capacity must be at least 1");
  }
  core_->strand.emplace(asio::make_strand(std::move(ex)));
  core_->capacity = options.capacity;
}

queued_handler::~queued_handler() = default;

std::shared_ptr<topic> queued_handler::open(const std::string& name, std::type_index type) {
  return core_->open(name, type);
}

void queued_handler::subscribe(const std::shared_ptr<topic>& t, std::shared_ptr<subscriber> s) {
  if (core_->add(impl_of(t), std::move(s))) {
    core_->start_consumer(std::static_pointer_cast<detail::topic_impl>(t));
  }
}

asio::awaitable<void> queued_handler::unsubscribe(const std::shared_ptr<topic>& t,
                                                  std::shared_ptr<subscriber> s) {
  return unsubscribe_from(*core_, t, std::move(s));
}

namespace {
asio::awaitable<void> publish_queued(std::shared_ptr<detail::handler_core> core,
                                     std::shared_ptr<detail::topic_impl> t,
                                     std::shared_ptr<const void> payload,
                                     std::shared_ptr<const std::atomic<bool>> abandon) {
  bool counted_wait = false;
  for (;;) {
    bool start = false;
    bool accepted = false;
    bool stopped = false;
    {
      std::lock_guard lock(core->mu);
      const bool listened = detail::handler_core::listened(*t);
      if (core->stopped.load(std::memory_order_seq_cst)) {
        stopped = true;
      } else if (!listened && t->queue.empty()) {
        co_return;  // nobody listens and nothing waits: an event nobody hears
      } else if (t->unacked.load(std::memory_order_seq_cst) < core->capacity) {
        t->queue.push_back(std::move(payload));
        t->unacked.fetch_add(1, std::memory_order_seq_cst);
        core->pending.fetch_add(1, std::memory_order_relaxed);
        core->published.fetch_add(1, std::memory_order_relaxed);
        accepted = true;
        if (listened && !t->consumer_running) {
          t->consumer_running = true;
          start = true;
        }
      }
    }
    if (stopped) {
      throw ferry::error(make_error_code(errc::handler_stopped),
                         "queued_handler: publish to '" + t->name() + "' after stop()");
    }
    if (accepted) {
      if (start) core->start_consumer(t);
      co_return;
    }
    if (!counted_wait) {
      counted_wait = true;
      core->waits.fetch_add(1, std::memory_order_relaxed);
    }
    if (abandon && abandon->load(std::memory_order_seq_cst)) {
      throw std::system_error(asio::error::operation_aborted,
                              "publish to '" + t->name() + "': the emitting pipeline has failed");
    }
    // Nobody wakes a waiter when `abandon` is set: with one, the wait looks again every 20 ms.
    const std::size_t cap = core->capacity;
    std::optional<std::chrono::steady_clock::time_point> deadline;
    if (abandon) deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(20);
    auto op = ferry::detail::async_wait_until(
        t->room, t,
        [ti = t.get(), c = core.get(), cap] {
          return ti->unacked.load(std::memory_order_seq_cst) < cap ||
                 c->stopped.load(std::memory_order_seq_cst);
        },
        deadline, asio::experimental::as_tuple(asio::use_awaitable));
    auto [ec] = co_await std::move(op);
    if (ec && ec != ferry::errc::timed_out) throw std::system_error(ec);
  }
}

// Drain, refuse, drain again: publishes accepted while the first drain ran (from other
// threads, or from handlers emitting downstream) are delivered before stop() returns.
asio::awaitable<void> stop_queued(std::shared_ptr<detail::handler_core> core) {
  std::exception_ptr failure;
  try {
    auto op = drain_all(core);
    co_await std::move(op);
  } catch (...) {
    failure = std::current_exception();
  }
  core->stopped.store(true, std::memory_order_seq_cst);
  try {
    auto op = drain_all(core);
    co_await std::move(op);
  } catch (...) {
    if (!failure) failure = std::current_exception();
  }
  std::vector<std::shared_ptr<detail::topic_impl>> all;
  {
    std::lock_guard lock(core->mu);
    for (const auto& [name, t] : core->topics) all.push_back(t);
  }
  for (const auto& t : all) t->room.wake_all();
  if (failure) std::rethrow_exception(failure);
}
}  // namespace

asio::awaitable<void> queued_handler::publish(const std::shared_ptr<topic>& t,
                                              std::shared_ptr<const void> payload,
                                              std::shared_ptr<const std::atomic<bool>> abandon) {
  return publish_queued(core_, std::static_pointer_cast<detail::topic_impl>(t), std::move(payload),
                        std::move(abandon));
}

asio::awaitable<void> queued_handler::drain() { return drain_all(core_); }
asio::awaitable<void> queued_handler::drain(const std::shared_ptr<topic>& t) {
  return drain_one(core_, t);
}
asio::awaitable<void> queued_handler::stop() { return stop_queued(core_); }

queued_handler_stats queued_handler::stats() const {
  queued_handler_stats s;
  s.published = core_->published.load(std::memory_order_relaxed);
  s.acknowledged = core_->acknowledged.load(std::memory_order_relaxed);
  s.waits = core_->waits.load(std::memory_order_relaxed);
  s.pending = core_->pending.load(std::memory_order_relaxed);
  return s;
}

asio::strand<asio::any_io_executor> queued_handler::get_strand() const { return *core_->strand; }

// --- ports -----------------------------------------------------------------------------------
namespace detail {

port_base::port_base(processor& owner, std::string name, std::type_index payload_type)
    : owner_(&owner), name_(std::move(name)) {
  topic_ = owner.handler().open(owner.name() + "." + name_, payload_type);
  std::lock_guard lock(owner.ports_mu_);
  owner.ports_.push_back(this);
}

port_base::~port_base() {
  {
    std::lock_guard lock(owner_->ports_mu_);
    std::erase(owner_->ports_, this);
  }
  // Without a disconnect() first, stop deliveries at least (ones in flight are the
  // owner's responsibility: see the header).
  std::lock_guard lock(mu_);
  for (const auto& s : subs_) s->closed.store(true, std::memory_order_seq_cst);
}

std::size_t port_base::connections() const {
  std::lock_guard lock(mu_);
  return subs_.size();
}

void port_base::connect(std::shared_ptr<subscriber> s) {
  if (manager* m = owner_->owner()) {
    s->on_error = m->error_path();
    s->halted = m->halted_flag();
  }
  {
    std::lock_guard lock(mu_);
    subs_.push_back(s);
  }
  owner_->handler().subscribe(topic_, std::move(s));
}

asio::awaitable<void> port_base::publish(std::shared_ptr<const void> payload,
                                         std::exception_ptr carried) {
  if (name_ == "error" && connections() == 0) {
    throw unhandled_error_event(topic_->name(), std::move(carried));
  }
  if (manager* m = owner_->owner(); m && m->failure()) {
    // The manager is going down: its processors stop emitting (a source looping through
    // an inline handler would otherwise never reach a point where it can be cancelled).
    throw std::system_error(asio::error::operation_aborted,
                            "emit on '" + topic_->name() + "': its manager has failed");
  }
  manager* m = owner_->owner();
  return owner_->handler().publish(topic_, std::move(payload), m ? m->halted_flag() : nullptr);
}

asio::awaitable<void> port_base::disconnect() {
  std::vector<std::shared_ptr<subscriber>> subs;
  {
    std::lock_guard lock(mu_);
    subs.swap(subs_);
  }
  // Closed at once, all of them: even if this wait is cancelled, no delivery to them starts
  // again (the handler drops closed subscribers from its lists).
  for (const auto& s : subs) s->closed.store(true, std::memory_order_seq_cst);
  message_handler& h = owner_->handler();
  std::shared_ptr<topic> t = topic_;
  for (auto& s : subs) {
    auto op = h.unsubscribe(t, std::move(s));
    co_await std::move(op);
  }
}

asio::awaitable<void> port_base::drain() {
  return owner_->handler().drain(topic_);
}

}  // namespace detail

// --- processor -------------------------------------------------------------------------------
processor::processor(processor_home home, std::string name)
    : manager_(home.owner),
      handler_(home.owner ? &home.owner->handler() : home.handler),
      name_(home.owner ? home.owner->build_processor_name(name) : std::move(name)) {
  if (name_.empty()) {
    throw ferry::error(ferry::errc::invalid_argument, "processor: the name must not be empty");
  }
  if (manager_) manager_->adopt(*this);
}

processor::~processor() {
  if (manager_) manager_->forget(*this);
}

std::vector<detail::port_base*> processor::ports() const {
  std::lock_guard lock(ports_mu_);
  return ports_;
}

asio::awaitable<void> processor::disconnect() {
  for (detail::port_base* p : ports()) {
    auto op = p->disconnect();
    co_await std::move(op);
  }
}

void processor::fail(std::exception_ptr e) {
  if (manager_) {
    manager_->fail(std::move(e));
  } else {
    std::rethrow_exception(e);
  }
}

void processor::report(std::exception_ptr e) {
  if (manager_) {
    manager_->report(std::move(e));
  } else {
    std::cerr << "ferry::flow: processor '" << name_ << "': " << describe_exception(e) << '\n';
  }
}

}  // namespace ferry::flow
