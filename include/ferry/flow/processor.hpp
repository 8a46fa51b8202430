// ferry/flow/processor.hpp — processors with typed event ports, wired through a message
// handler (the aiopype seed's Processor and SyncProtocol / AsyncProtocol).
//
//     namespace fl = ferry::flow;
//     fl::queued_handler handler{io.get_executor(), {.capacity = 1024}};
//
//     struct extract_price : fl::processor {
//       using fl::processor::processor;
//       fl::event<std::chrono::system_clock::time_point, double> price{*this, "price"};
//       asio::awaitable<void> handle(const std::string& body, std::chrono::system_clock::time_point t) {
//         co_await emit(price, t, parse_price(body));
//       }
//     };
//     struct ticker : fl::processor {
//       using fl::processor::processor;
//       fl::event<std::string, std::chrono::system_clock::time_point> data{*this, "data"};
//     };
//     ticker src{handler, "src"};
//     extract_price proc{handler, "proc"};
//     fl::on(src.data, [&](const std::string& b, auto t) { return proc.handle(b, t); });  // coroutine
//     fl::on(proc.price, [](auto t, double p) { std::cout << p << '\n'; });             // plain
//     co_await fl::emit(src.data, std::string{"{...}"}, std::chrono::system_clock::now());
//
// Rules (spec/flow-processors.md A1–A3, A8):
//  * A port is a member `event<Args...> name{*this, "name"}` of a processor; its topic is
//    "<processor name>.<port name>". on(port, h) connects a handler callable with
//    `const Args&...` that returns void (a plain handler, called where the handler delivers)
//    or asio::awaitable<void> (a coroutine handler, awaited). Any other handler does not
//    compile (the `port_handler` concept names the mismatch). emit(port, args...) copies the
//    arguments once into a shared payload and hands it to the processor's message handler;
//    every handler connected at that moment receives it, in the order they were connected.
//    A port with no handler connected takes the message and drops it (an event nobody
//    listens to), except:
//  * A3: every processor has an `error` port (event<std::exception_ptr>); emit on any port
//    named "error" with no handler connected throws unhandled_error_event naming the port
//    and carrying the emitted exception, so an error is never silently dropped. A handler
//    that throws does not stop delivery to the others: its exception goes to the error path
//    of the emitting processor's manager (manager::fail, which ends the manager so the
//    supervisor can restart it). A processor without a manager has no error path: the
//    inline handler rethrows the first handler exception from emit once every handler ran,
//    the queued handler keeps it and rethrows it from the next drain().
//  * A2, inline_handler (SyncProtocol): emit runs every handler before it completes,
//    awaiting coroutine handlers one after the other, on the emitter's executor.
//  * A2, queued_handler (AsyncProtocol): emit enqueues and completes at once; one consumer
//    per topic, all on the handler's strand, delivers in FIFO order per port. Nothing is
//    dropped: a message leaves its topic's queue only after every handler finished with it
//    (its acknowledgement), and `capacity` bounds the messages per topic not yet
//    acknowledged: emit on a full topic waits (back-pressure; cancellable). Messages queued
//    for a topic whose handlers were all disconnected wait for the next handler (a restarted
//    manager's processors reopen the same topics by name). When a manager fails, its
//    handlers are halted: its topics keep their messages, and the message a handler failed
//    on goes back to the front of its queue, so the manager's next instance receives them
//    (at-least-once: a message may then arrive twice, never not at all). drain() waits until
//    no topic with live handlers has anything queued or in flight; stop() drains, refuses
//    later emits (errc::handler_stopped) and drains what was accepted meanwhile.
//    A handler must not emit into its own topic (or a cycle of topics) with back-pressure:
//    a full topic would wait for the consumer that is waiting for it.
//  * A8, the interface: a processor only ever calls message_handler's open / subscribe /
//    unsubscribe / publish, with a payload of known type (topic::payload_type()). A
//    distributed implementation (Redis Streams) fits behind it: publish = XADD of the
//    payload encoded by a codec the application registers per payload type, subscribe = a
//    consumer-group reader that calls the subscriber and acknowledges (XACK) only after the
//    subscriber's delivery completed — at-least-once, as the in-process queue does.
//  * Once a processor's manager has failed, emit on its ports throws operation_aborted:
//    the pipeline is going down (a source that never suspends could not be cancelled).
//  * Threads: on/emit/disconnect may be called from any thread; handlers of a queued
//    handler run on its strand, never two at once (coroutine handlers interleave at their
//    co_await points only), so a processor needs no locks for state its handlers share.
//    Before a processor is destroyed, `co_await disconnect()` (manager::close does it for a
//    manager's processors) stops deliveries to its handlers and waits for those in flight.
#pragma once

#include <ferry/detail/loop_waiters.hpp>
#include <ferry/flow/error.hpp>

#include <asio/any_io_executor.hpp>
#include <asio/awaitable.hpp>
#include <asio/strand.hpp>

#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <typeindex>
#include <utility>
#include <vector>

namespace ferry::flow {

class manager;
class processor;

// A named stream of messages of one payload type, owned by a message handler. Ports with
// the same topic name share it (a restarted manager's ports find their old queue).
class topic {
public:
  virtual ~topic() = default;
  topic(const topic&) = delete;
  topic& operator=(const topic&) = delete;
  const std::string& name() const noexcept { return name_; }
  // typeid(std::tuple<Args...>) of the port's event: what a payload points to.
  std::type_index payload_type() const noexcept { return type_; }

protected:
  topic(std::string name, std::type_index type) : name_(std::move(name)), type_(type) {}

private:
  std::string name_;
  std::type_index type_;
};

// One connected handler, type-erased: exactly one of deliver / deliver_async is set.
// `on_error` receives the handler's exception (empty: the message handler's own error
// path). The counters belong to the message handler that delivers to it.
class subscriber {
public:
  std::function<void(const void* payload)> deliver;
  std::function<asio::awaitable<void>(const void* payload)> deliver_async;
  std::function<void(std::exception_ptr)> on_error;
  // Set (by a manager) once the subscriber's pipeline has failed: no delivery starts, and
  // a queued message goes back to its queue for the pipeline's next instance.
  std::shared_ptr<const std::atomic<bool>> halted;

  // Open and not halted: a delivery may start.
  bool live() const noexcept {
    return !closed.load(std::memory_order_seq_cst) &&
           !(halted && halted->load(std::memory_order_seq_cst));
  }

  // Bookkeeping for unsubscribe: no delivery starts once `closed`; `in_flight` counts the
  // deliveries running; `idle` wakes an unsubscribe waiting for them (seq_cst hand-shake,
  // see ferry/detail/loop_waiters.hpp).
  std::atomic<bool> closed{false};
  std::atomic<int> in_flight{0};
  ferry::detail::loop_waiters idle;

  // Runs the handler once on `payload`, counting it in flight. Returns the handler's
  // exception (null on success); skips (and returns null) once closed. For message
  // handler implementations (the in-process ones inline the plain-handler case).
  asio::awaitable<std::exception_ptr> run(const void* payload);
  // Marks closed and waits until no delivery is in flight.
  asio::awaitable<void> close();
};

// Where processors send their messages (A8). Implementations: inline_handler,
// queued_handler; a distributed one fits behind the same five calls.
class message_handler {
public:
  virtual ~message_handler() = default;
  // The topic named `name` (created on first use). A name already open with another
  // payload type is errc::type_mismatch naming both types.
  virtual std::shared_ptr<topic> open(const std::string& name, std::type_index payload_type) = 0;
  // Delivers the topic's later messages to `s` too (after the subscribers already there).
  virtual void subscribe(const std::shared_ptr<topic>& t, std::shared_ptr<subscriber> s) = 0;
  // No delivery to `s` starts after this call; completes once none is in flight.
  virtual asio::awaitable<void> unsubscribe(const std::shared_ptr<topic>& t,
                                            std::shared_ptr<subscriber> s) = 0;
  // Hands a message (a std::tuple of the topic's payload type) to the topic's subscribers;
  // completes when the policy says the emitter may go on (see the implementations).
  // `abandon` (may be null) is the emitter's pipeline giving up: a publish waiting for room
  // while it is set completes with operation_aborted instead (a failed manager's handler
  // must not wait forever on a topic whose consumers it halted itself).
  virtual asio::awaitable<void> publish(const std::shared_ptr<topic>& t,
                                        std::shared_ptr<const void> payload,
                                        std::shared_ptr<const std::atomic<bool>> abandon) = 0;
  // Completes once every message published so far to a topic with subscribers has been
  // delivered and acknowledged; rethrows a kept handler exception (one with no error path).
  virtual asio::awaitable<void> drain() = 0;
  // Completes once `t` has nothing queued or in flight (or no subscriber to deliver to).
  virtual asio::awaitable<void> drain(const std::shared_ptr<topic>& t) = 0;
};

namespace detail {
class handler_core;
}

// SyncProtocol: publish delivers to every subscriber, in order, before it completes.
class inline_handler final : public message_handler {
public:
  inline_handler();
  ~inline_handler() override;
  std::shared_ptr<topic> open(const std::string& name, std::type_index payload_type) override;
  void subscribe(const std::shared_ptr<topic>& t, std::shared_ptr<subscriber> s) override;
  asio::awaitable<void> unsubscribe(const std::shared_ptr<topic>& t,
                                    std::shared_ptr<subscriber> s) override;
  asio::awaitable<void> publish(const std::shared_ptr<topic>& t,
                                std::shared_ptr<const void> payload,
                                std::shared_ptr<const std::atomic<bool>> abandon) override;
  asio::awaitable<void> drain() override;
  asio::awaitable<void> drain(const std::shared_ptr<topic>& t) override;

private:
  std::shared_ptr<detail::handler_core> core_;
};

struct queued_handler_options {
  // Messages per topic published but not yet acknowledged; emit waits beyond it.
  std::size_t capacity = 1024;
};

// Counters of a queued_handler, for tests and monitoring.
struct queued_handler_stats {
  std::uint64_t published = 0;     // messages accepted by publish
  std::uint64_t acknowledged = 0;  // messages every subscriber finished with
  std::uint64_t waits = 0;         // publishes that had to wait for room (back-pressure)
  std::size_t pending = 0;         // queued or in flight now, all topics
};

// AsyncProtocol: publish enqueues and completes; per-topic consumers on one strand deliver.
class queued_handler final : public message_handler {
public:
  explicit queued_handler(asio::any_io_executor ex, queued_handler_options options = {});
  template <class ExecutionContext>
    requires std::is_convertible_v<ExecutionContext&, asio::execution_context&>
  explicit queued_handler(ExecutionContext& ctx, queued_handler_options options = {})
      : queued_handler(asio::any_io_executor(ctx.get_executor()), options) {}
  ~queued_handler() override;

  std::shared_ptr<topic> open(const std::string& name, std::type_index payload_type) override;
  void subscribe(const std::shared_ptr<topic>& t, std::shared_ptr<subscriber> s) override;
  asio::awaitable<void> unsubscribe(const std::shared_ptr<topic>& t,
                                    std::shared_ptr<subscriber> s) override;
  // Waits while the topic holds `capacity` unacknowledged messages; errc::handler_stopped
  // after stop(); operation_aborted when cancelled while waiting.
  asio::awaitable<void> publish(const std::shared_ptr<topic>& t,
                                std::shared_ptr<const void> payload,
                                std::shared_ptr<const std::atomic<bool>> abandon) override;
  asio::awaitable<void> drain() override;
  asio::awaitable<void> drain(const std::shared_ptr<topic>& t) override;
  // Drains, then refuses every later publish (errc::handler_stopped).
  asio::awaitable<void> stop();
  queued_handler_stats stats() const;
  // The strand every delivery runs on.
  asio::strand<asio::any_io_executor> get_strand() const;

private:
  std::shared_ptr<detail::handler_core> core_;
};

namespace detail {
// The non-template part of a port: its topic, owner, and the handlers it connected.
class port_base {
public:
  port_base(processor& owner, std::string name, std::type_index payload_type);
  ~port_base();
  port_base(const port_base&) = delete;
  port_base& operator=(const port_base&) = delete;

  const std::string& name() const noexcept { return name_; }
  const std::string& topic_name() const noexcept { return topic_->name(); }
  processor& owner() const noexcept { return *owner_; }
  std::size_t connections() const;
  // Disconnects every handler connected to this port; waits for deliveries in flight.
  asio::awaitable<void> disconnect();
  // Waits until the port's topic has nothing queued or in flight.
  asio::awaitable<void> drain();

  // Used by on() and emit(): subscribe a handler; publish a payload (`carried` is the
  // exception an error port carries, for unhandled_error_event).
  void connect(std::shared_ptr<subscriber> s);
  asio::awaitable<void> publish(std::shared_ptr<const void> payload, std::exception_ptr carried);

private:
  processor* owner_;
  std::string name_;
  std::shared_ptr<topic> topic_;
  mutable std::mutex mu_;
  std::vector<std::shared_ptr<subscriber>> subs_;
};
}  // namespace detail

// A handler for a port of event<Args...>: callable with the arguments as const lvalues,
// returning void or asio::awaitable<void>.
template <class F, class... Args>
concept port_handler =
    std::invocable<F&, const Args&...> &&
    (std::is_void_v<std::invoke_result_t<F&, const Args&...>> ||
     std::is_same_v<std::invoke_result_t<F&, const Args&...>, asio::awaitable<void>>);

// A typed event port: a member of a processor.
template <class... Args>
class event : public detail::port_base {
public:
  using payload_type = std::tuple<Args...>;
  event(processor& owner, std::string name)
      : detail::port_base(owner, std::move(name), typeid(payload_type)) {}
};

// Connects `handler` to `port` (A1). A handler that cannot take the port's arguments does
// not compile: the constraint port_handler<F, Args...> is not satisfied.
template <class... Args, class F>
  requires port_handler<F, Args...>
void on(event<Args...>& port, F handler) {
  using payload_type = std::tuple<Args...>;
  auto s = std::make_shared<subscriber>();
  if constexpr (std::is_void_v<std::invoke_result_t<F&, const Args&...>>) {
    s->deliver = [h = std::move(handler)](const void* p) mutable {
      std::apply(h, *static_cast<const payload_type*>(p));
    };
  } else {
    s->deliver_async = [h = std::move(handler)](const void* p) mutable {
      return std::apply(h, *static_cast<const payload_type*>(p));
    };
  }
  port.connect(std::move(s));
}

// Delivers (args...) to every handler connected to `port`, through its processor's message
// handler: co_await it. The arguments are copied (or moved) into one shared payload.
template <class... Args, class... Vs>
  requires std::constructible_from<std::tuple<Args...>, Vs&&...>
asio::awaitable<void> emit(event<Args...>& port, Vs&&... values) {
  auto payload = std::make_shared<const std::tuple<Args...>>(std::forward<Vs>(values)...);
  std::exception_ptr carried;
  if constexpr (std::is_same_v<std::tuple<Args...>, std::tuple<std::exception_ptr>>) {
    carried = std::get<0>(*payload);
  }
  return port.publish(std::move(payload), std::move(carried));
}

// Where a processor lives: in a manager (the usual case) or on a message handler alone.
// Converts from either, so processor constructors take one `processor_home`.
struct processor_home {
  processor_home(manager& m) noexcept : owner(&m) {}                 // NOLINT: implicit
  processor_home(message_handler& h) noexcept : handler(&h) {}       // NOLINT: implicit
  manager* owner = nullptr;
  message_handler* handler = nullptr;
};

// A message consumer / producer. Construct it inside a manager (its name is then
// "<manager>.<name>" and handler exceptions fail that manager) or on a message handler
// alone. Ports are members declared after this base.
class processor {
  // Declared first: ports (members of this class and of derived ones) register here.
  friend class detail::port_base;
  manager* manager_ = nullptr;
  message_handler* handler_;
  std::string name_;
  mutable std::mutex ports_mu_;
  std::vector<detail::port_base*> ports_;

public:
  // In a manager the name becomes "<manager>.<name>"; an empty name is invalid_argument.
  processor(processor_home home, std::string name);
  virtual ~processor();
  processor(const processor&) = delete;
  processor& operator=(const processor&) = delete;

  const std::string& name() const noexcept { return name_; }
  message_handler& handler() const noexcept { return *handler_; }
  manager* owner() const noexcept { return manager_; }

  // Disconnects the handlers of every port of this processor; waits for deliveries in flight.
  asio::awaitable<void> disconnect();

  // The ports of this processor, in declaration order.
  std::vector<detail::port_base*> ports() const;

  // A3: the error port. Emitting on it with no handler connected throws unhandled_error_event.
  event<std::exception_ptr> error{*this, "error"};

protected:
  // A handler's exception, or a processor's own failure: the manager's error path (it ends
  // the manager); without a manager, rethrown here.
  void fail(std::exception_ptr e);
  // A non-fatal problem worth knowing (e.g. a failure threshold with keep_going): the
  // manager's reporter; without a manager, stderr.
  void report(std::exception_ptr e);
};

// A processor that runs until it is done or stopped: the start of a pipeline (A4).
// run() is cancelled (terminal) to stop it; a normal return means the source is done.
class source : public processor {
public:
  using processor::processor;
  virtual asio::awaitable<void> run() = 0;
};

}  // namespace ferry::flow
